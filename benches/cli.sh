#!/usr/bin/env bash
# End-to-end timings of the fapm binary on a generated 0.85B bf16 pair, against I/O floors.
#
#   benches/cli.sh                 # N=3 runs each, data under ./bench-data
#   BENCH_DIR=/big/disk N=5 benches/cli.sh
#
# Environment: BENCH_DIR (default ./bench-data), N (runs per measurement, default 3),
# PARAMS (default 850M), SHARDS (default 4), LIMIT (cgroup memory limit, default 512M),
# SKIP_CGROUP=1 to skip the memory-limited runs.
#
# Prints: median seconds, input GB/s and peak RSS of each command, the ratios to the floors,
# the memory-limited runs (success and the cgroup's peak), and the delta size against the
# XOR+zstd baseline (benches/xor_baseline.rs).
set -euo pipefail

cd "$(dirname "$0")/.."
BENCH_DIR=${BENCH_DIR:-./bench-data}
N=${N:-3}
PARAMS=${PARAMS:-850M}
SHARDS=${SHARDS:-4}
LIMIT=${LIMIT:-512M}
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release --quiet --bin fapm --example gen_pair --example xor_baseline
FAPM=$TARGET/release/fapm
PAIR=$BENCH_DIR/pair-$PARAMS
OUT=$BENCH_DIR/out
BASE=$PAIR/base
FT=$PAIR/ft

if [[ ! -f $FT/model.safetensors.index.json ]]; then
    echo "generating $PAIR ..." >&2
    "$TARGET/release/examples/gen_pair" --out "$PAIR" --params "$PARAMS" --shards "$SHARDS" --seed 1 --overwrite
fi
mkdir -p "$OUT"

base_bytes=$(du -bc "$BASE"/*.safetensors | tail -1 | cut -f1)
ft_bytes=$(du -bc "$FT"/*.safetensors | tail -1 | cut -f1)
both_bytes=$((base_bytes + ft_bytes))

warm() { cat "$BASE"/*.safetensors "$FT"/*.safetensors >/dev/null; }
echo "warming the page cache ..." >&2
warm

# measure NAME CMD...: runs CMD N times; records the median wall seconds, the median CPU
# seconds (user + sys: less sensitive than wall time to other jobs on the machine) and the
# max peak RSS.
declare -A SECS CPU RSS
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
measure() {
    local name=$1
    shift
    local times=() cpus=() peak=0
    for _ in $(seq "$N"); do
        # Untimed: the previous run's written files go to disk now, not during this run
        # (the copy floor leaves 1.7 GB dirty, whose write-back otherwise slows what follows).
        sync
        /usr/bin/time -f '%e %M %U %S' -o "$OUT/time.txt" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" || {
            echo "$name failed:" >&2
            cat "$OUT/$name.stderr" >&2
            exit 1
        }
        read -r s kb u k <"$OUT/time.txt"
        times+=("$s")
        cpus+=("$(awk -v u="$u" -v k="$k" 'BEGIN {print u + k}')")
        ((kb > peak)) && peak=$kb
    done
    SECS[$name]=$(printf '%s\n' "${times[@]}" | median)
    CPU[$name]=$(printf '%s\n' "${cpus[@]}" | median)
    RSS[$name]=$peak
    echo "  $name: ${times[*]} s (median ${SECS[$name]}), cpu ${cpus[*]} s" >&2
}

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
echo "measuring (N=$N) ..." >&2
# The commands that only read come first: writing 1.7 GB (the copy floor, apply) and
# deleting it again leaves the machine slower for a while (freed page cache), which
# otherwise lands on whatever runs next.
measure floor_cat sh -c "cat '$BASE'/*.safetensors '$FT'/*.safetensors >/dev/null"
measure prune_exact "$FAPM" prune --base "$BASE" --finetuned "$FT" --output "$OUT/exact.fapm" \
    --threshold exact --overwrite --quiet --json
measure prune_approx "$FAPM" prune --base "$BASE" --finetuned "$FT" --output "$OUT/approx.fapm" \
    --threshold approx --overwrite --quiet --json
delta_bytes=$(stat -c %s "$OUT/exact.fapm")
measure verify "$FAPM" verify "$OUT/exact.fapm" --base "$BASE"
measure floor_copy sh -c "cat '$BASE'/*.safetensors >'$OUT/copy.bin'"
rm -f "$OUT/copy.bin"
measure apply "$FAPM" apply --base "$BASE" --delta "$OUT/exact.fapm" --output "$OUT/applied" --overwrite --quiet

row() { # name input_bytes floor_name
    local s=${SECS[$1]} c=${CPU[$1]} rss=${RSS[$1]}
    local ratio=-
    [[ -n ${3:-} ]] && ratio=$(awk -v a="$s" -v b="${SECS[$3]}" 'BEGIN {printf "%.1fx %s", a / b, "'"$3"'"}')
    awk -v n="$1" -v s="$s" -v c="$c" -v b="$2" -v r="$rss" -v q="$ratio" \
        'BEGIN {printf "| %-13s | %7.2f | %7.2f | %7.3f | %8.0f | %s |\n", n, s, c, b / s / 1e9, r / 1024, q}'
}
echo
echo "load average before the runs: $LOAD0"
echo "pair: $PAIR ($(awk -v b="$both_bytes" 'BEGIN {printf "%.2f", b / 1e9}') GB both models), N=$N, $(nproc) cores"
echo
echo "| run           | median s | CPU s | input GB/s | peak RSS MiB | vs floor |"
echo "|---------------|---------:|------:|-----------:|-------------:|----------|"
row floor_cat "$both_bytes"
row floor_copy "$base_bytes"
row prune_exact "$both_bytes" floor_cat
row prune_approx "$both_bytes" floor_cat
row apply "$((base_bytes + delta_bytes))" floor_copy
row verify "$((base_bytes + delta_bytes))" floor_cat
echo
echo "(peak RSS counts the memory-mapped checkpoint pages that were touched; fapm's own"
echo " accounting is peak_memory_bytes in $OUT/prune_exact.stdout)"
grep -o '"peak_memory_bytes":[0-9]*' "$OUT/prune_exact.stdout" || true

# Memory-limited runs, page cache of the inputs evicted first so it is charged to the group.
evict() { python3 -c 'import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)' "$@"; }

limited() { # NAME CMD...
    local name=$1 dir status peak
    shift
    evict "$BASE"/*.safetensors "$FT"/*.safetensors "$OUT"/exact.fapm
    if [[ -n $CG2 ]]; then
        dir=$CG2/fapm-bench-$name
        mkdir "$dir"
        echo "$LIMIT" >"$dir/memory.max"
        echo 0 >"$dir/memory.swap.max" 2>/dev/null || true
        (echo $BASHPID >"$dir/cgroup.procs" && exec "$@") >"$OUT/lim-$name.stdout" 2>"$OUT/lim-$name.stderr" && status=ok || status="FAILED ($?)"
        peak=$(cat "$dir/memory.peak" 2>/dev/null || echo "?")
    else
        dir=$CG1/fapm-bench-$name
        mkdir "$dir"
        echo "$LIMIT" >"$dir/memory.limit_in_bytes"
        (echo $BASHPID >"$dir/cgroup.procs" && exec "$@") >"$OUT/lim-$name.stdout" 2>"$OUT/lim-$name.stderr" && status=ok || status="FAILED ($?)"
        peak=$(cat "$dir/memory.max_usage_in_bytes")
    fi
    rmdir "$dir" 2>/dev/null || true
    awk -v n="$name" -v s="$status" -v p="$peak" 'BEGIN {printf "| %-7s | %-10s | %8.0f |\n", n, s, p / 1048576}'
}

echo
if [[ -n ${SKIP_CGROUP:-} ]]; then
    echo "memory-limited runs skipped (SKIP_CGROUP)"
else
    CG2= CG1=
    if [[ -f /sys/fs/cgroup/cgroup.controllers ]] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
        CG2=/sys/fs/cgroup$(grep '^0::' /proc/self/cgroup | cut -d: -f3)
        [[ -w $CG2 ]] || CG2=
    fi
    if [[ -z $CG2 && -d /sys/fs/cgroup/memory ]]; then
        CG1=/sys/fs/cgroup/memory$(grep ':memory:' /proc/self/cgroup | cut -d: -f3)
        [[ -w $CG1 ]] || CG1=
    fi
    if [[ -z $CG2 && -z $CG1 ]]; then
        echo "memory-limited runs skipped: no writable memory cgroup"
    else
        echo "under a $LIMIT memory limit (cgroup ${CG2:+v2 $CG2}${CG1:+v1 $CG1}), inputs evicted from the page cache first:"
        echo
        echo "| run     | result     | peak MiB |"
        echo "|---------|------------|---------:|"
        limited prune "$FAPM" prune --base "$BASE" --finetuned "$FT" --output "$OUT/limited.fapm" --overwrite --quiet
        limited apply "$FAPM" apply --base "$BASE" --delta "$OUT/exact.fapm" --output "$OUT/limited-applied" --overwrite --quiet
        limited verify "$FAPM" verify "$OUT/exact.fapm" --base "$BASE"
        rm -rf "$OUT/limited-applied"
        warm
    fi
fi

# Size against the best generic lossless alternative.
kept=$(grep -o '"kept":[0-9]*' "$OUT/prune_exact.stdout" | cut -d: -f2)
xor=$("$TARGET/release/examples/xor_baseline" "$BASE" "$OUT/applied")
xor_bytes=$(echo "$xor" | grep -o '"total_bytes":[0-9]*' | cut -d: -f2)
echo
echo "size at sparsity 0.9, exact ($kept values kept):"
echo
echo "| encoding                         | bytes | bytes per kept value |"
echo "|----------------------------------|------:|---------------------:|"
awk -v d="$delta_bytes" -v x="$xor_bytes" -v k="$kept" 'BEGIN {
    printf "| fapm delta                       | %d | %.3f |\n", d, d / k
    printf "| XOR with base, 2 planes, zstd -3 | %d | %.3f |\n", x, x / k }'
echo "xor_baseline: $xor"
