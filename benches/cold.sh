#!/usr/bin/env bash
# Cold and warm end-to-end timings of prune, verify --base and apply against their I/O floors,
# on a generated pair: the 0.85B one by default, or the Llama-3-8B shape (SHAPE=llama3-8b:
# 2 x 16.06 GB, larger than most machines' memory). Needs root to drop the page cache.
#
#   benches/cold.sh                           # 0.85B pair, N=3 runs each, data under ./bench-data
#   SHAPE=llama3-8b BENCH_DIR=/big/disk benches/cold.sh
#
# Environment: BENCH_DIR (default ./bench-data), N (runs, default 3), PARAMS (default 850M),
# FAPM (the binary, default the release build), SHAPE (a gen_pair --shape; overrides PARAMS), SHARDS (default 4), MIN_FREE_GB (disk space
# left free for others, default 10), WARM=0 to skip the warm runs, COLD=0 the cold ones.
#
# Floors: prune against `cat` of both models, verify --base against `cat` of the base and the
# delta, apply against `cp -r` of the base followed by `sync` (a durable copy: apply syncs).
# Each cold run starts from a dropped page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`).
# Prints the median wall and CPU seconds of each, input GB/s, CPU seconds per GB of input and
# the ratio to the floor, and the load average. When the disk has no room for the pair, the
# delta and apply's output (plus MIN_FREE_GB), says so and skips what does not fit.
set -euo pipefail

cd "$(dirname "$0")/.."
BENCH_DIR=${BENCH_DIR:-./bench-data}
N=${N:-3}
PARAMS=${PARAMS:-850M}
SHAPE=${SHAPE:-}
SHARDS=${SHARDS:-4}
MIN_FREE_GB=${MIN_FREE_GB:-10}
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release --quiet --bin fapm --example gen_pair
FAPM=${FAPM:-$TARGET/release/fapm}
NAME=${SHAPE:-$PARAMS}
PAIR=$BENCH_DIR/pair-$NAME
OUT=$BENCH_DIR/out-$NAME
BASE=$PAIR/base
FT=$PAIR/ft
mkdir -p "$BENCH_DIR"

# Bytes of one model of the pair, before it exists: gen_pair prints it; 8B: 16.06 GB.
model_gb() { [[ $NAME == llama3-8b ]] && echo 16.1 || awk -v p="${PARAMS%[MmGgBb]}" -v u="${PARAMS: -1}" \
    'BEGIN {m = (u ~ /[Mm]/) ? 1e6 : (u ~ /[GgBb]/) ? 1e9 : 1; printf "%.1f", p * m * 2 / 1e9}'; }
free_gb() { df -BG --output=avail "$BENCH_DIR" | tail -1 | tr -dc 0-9; }
GB=$(model_gb)
if [[ ! -f $FT/model.safetensors.index.json ]]; then
    need=$(awk -v g="$GB" -v m="$MIN_FREE_GB" 'BEGIN {printf "%d", 2 * g * 1.05 + m + 1}')
    if (($(free_gb) < need)); then
        echo "skipped: the $NAME pair needs $need GB free (2 x $GB GB + $MIN_FREE_GB GB left for others), $(free_gb) GB are"
        exit 0
    fi
    echo "generating $PAIR ..." >&2
    size=(--params "$PARAMS")
    [[ -n $SHAPE ]] && size=(--shape "$SHAPE")
    "$TARGET/release/examples/gen_pair" --out "$PAIR" "${size[@]}" --shards "$SHARDS" --seed 1 --overwrite
fi
mkdir -p "$OUT"
# apply writes a whole model: only when it fits beside everything else.
APPLY=1
need=$(awk -v g="$GB" -v m="$MIN_FREE_GB" 'BEGIN {printf "%d", 1.1 * g + m}')
if (($(free_gb) < need)); then
    APPLY=0
    echo "apply and the copy floor skipped: they write $GB GB and $(free_gb) GB are free ($MIN_FREE_GB GB stay free)"
fi

bytes() { du -bc "$@" | tail -1 | cut -f1; }
base_bytes=$(bytes "$BASE"/*.safetensors)
ft_bytes=$(bytes "$FT"/*.safetensors)

COLD_OK=1
[[ -w /proc/sys/vm/drop_caches ]] || COLD_OK=0
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# measure NAME MODE CMD...: N runs (MODE cold: each from a dropped page cache; warm: after
# reading the inputs once); the median wall and CPU (user + sys) seconds.
declare -A SECS CPU
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
measure() {
    local name=$1 mode=$2 times=() cpus=()
    shift 2
    for _ in $(seq "$N"); do
        rm -rf "$OUT/applied" "$OUT/copy"
        if [[ $mode == cold ]]; then drop; else sync; cat "$BASE"/*.safetensors "$FT"/*.safetensors >/dev/null; fi
        /usr/bin/time -f '%e %U %S' -o "$OUT/time.txt" "$@" >"$OUT/run.stdout" 2>"$OUT/run.stderr" || {
            echo "$name failed:" >&2
            cat "$OUT/run.stderr" >&2
            exit 1
        }
        read -r s u k <"$OUT/time.txt"
        times+=("$s")
        cpus+=("$(awk -v u="$u" -v k="$k" 'BEGIN {print u + k}')")
    done
    rm -rf "$OUT/applied" "$OUT/copy"
    SECS[$name]=$(printf '%s\n' "${times[@]}" | median)
    CPU[$name]=$(printf '%s\n' "${cpus[@]}" | median)
    echo "  $name: ${times[*]} s (median ${SECS[$name]}), cpu ${cpus[*]} s" >&2
}

if [[ ! -f $OUT/delta.fapm ]]; then
    "$FAPM" prune --base "$BASE" --finetuned "$FT" --output "$OUT/delta.fapm" --overwrite --quiet
fi
delta_bytes=$(stat -c %s "$OUT/delta.fapm")

run_all() { # MODE
    local m=$1
    measure "cat_both_$m" "$m" sh -c "cat '$BASE'/*.safetensors '$FT'/*.safetensors >/dev/null"
    measure "prune_$m" "$m" "$FAPM" prune --base "$BASE" --finetuned "$FT" --output "$OUT/p.fapm" --overwrite --quiet
    cmp "$OUT/p.fapm" "$OUT/delta.fapm" # the same bytes, cold or warm
    measure "prune_approx_$m" "$m" "$FAPM" prune --base "$BASE" --finetuned "$FT" --output "$OUT/p.fapm" \
        --overwrite --quiet --threshold approx
    measure "cat_base_delta_$m" "$m" sh -c "cat '$BASE'/*.safetensors '$OUT/delta.fapm' >/dev/null"
    measure "verify_$m" "$m" "$FAPM" verify "$OUT/delta.fapm" --base "$BASE"
    if ((APPLY)); then
        measure "copy_sync_$m" "$m" sh -c "cp -r '$BASE' '$OUT/copy' && sync"
        measure "apply_$m" "$m" "$FAPM" apply --base "$BASE" --delta "$OUT/delta.fapm" --output "$OUT/applied" --quiet
    fi
}

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
MODES=()
[[ ${COLD:-1} == 1 ]] && { ((COLD_OK)) && MODES+=(cold) || echo "cold runs skipped: cannot drop the page cache (not root)"; }
[[ ${WARM:-1} == 1 ]] && MODES+=(warm)
for m in "${MODES[@]}"; do
    echo "measuring $m (N=$N) ..." >&2
    run_all "$m"
done

row() { # NAME INPUT_BYTES [FLOOR]
    local s=${SECS[$1]:-} c=${CPU[$1]:-}
    [[ -z $s ]] && return 0
    local ratio=-
    [[ -n ${3:-} && -n ${SECS[$3]:-} ]] && ratio=$(awk -v a="$s" -v b="${SECS[$3]}" 'BEGIN {printf "%.2fx %s", a / b, "'"$3"'"}')
    awk -v n="$1" -v s="$s" -v c="$c" -v b="$2" -v q="$ratio" \
        'BEGIN {printf "| %-20s | %8.2f | %7.2f | %10.2f | %8.2f | %s |\n", n, s, c, b / s / 1e9, c / (b / 1e9), q}'
}
echo
echo "load average before the runs: $LOAD0, after: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"
echo "pair: $PAIR ($(awk -v b="$((base_bytes + ft_bytes))" 'BEGIN {printf "%.2f", b / 1e9}') GB both models), delta $(awk -v b="$delta_bytes" 'BEGIN {printf "%.2f", b / 1e9}') GB, N=$N"
echo
echo "| run                  | median s | CPU s | input GB/s | CPU s/GB | vs floor |"
echo "|----------------------|---------:|------:|-----------:|---------:|----------|"
for m in "${MODES[@]}"; do
    row "cat_both_$m" "$((base_bytes + ft_bytes))"
    row "prune_$m" "$((base_bytes + ft_bytes))" "cat_both_$m"
    row "prune_approx_$m" "$((base_bytes + ft_bytes))" "cat_both_$m"
    row "cat_base_delta_$m" "$((base_bytes + delta_bytes))"
    row "verify_$m" "$((base_bytes + delta_bytes))" "cat_base_delta_$m"
    row "copy_sync_$m" "$base_bytes"
    row "apply_$m" "$((base_bytes + delta_bytes))" "copy_sync_$m"
done
