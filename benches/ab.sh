#!/usr/bin/env bash
# Compares the prune (or apply, or verify) time of two fapm binaries in alternating runs: on a
# noisy VM, where the same binary's time drifts by 10-25% between runs of benches/cli.sh, only
# pairs run side by side show a change of a few percent.
#
#   benches/ab.sh OLD_BINARY NEW_BINARY [extra arguments of the command]
#   N=9 PAIR=bench-data/pair-850M benches/ab.sh /tmp/fapm-before target/release/fapm --threshold approx
#   CMD=apply benches/ab.sh /tmp/fapm-before target/release/fapm
#   COLD=1 N=3 PAIR=bench-data/pair-llama3-8b benches/ab.sh /tmp/fapm-before target/release/fapm
#
# Environment: N (pairs, default 7), PAIR (a generated pair with base/ and ft/, default
# bench-data/pair-850M: make it with benches/cli.sh or examples/gen_pair), CMD (prune, apply
# or verify --base; default prune). apply and verify run on a delta that OLD_BINARY makes first.
# COLD=1 (root): the page cache is dropped before every run, and each round starts with a cold
# `cat` of the command's inputs, the floor each run is divided by (the machine's speed drifts
# between rounds, so each run is compared with its own round's floor).
#
# Prints, for each binary, the median wall and CPU (user + system) seconds and every run (with
# COLD=1 also the median ratio to the floor), and whether the two outputs are the same bytes
# (they must be: speed work changes no output).
set -euo pipefail

[[ $# -ge 2 ]] || { sed -n '2,21p' "$0" >&2; exit 2; }
A=$1 B=$2
shift 2
N=${N:-7}
PAIR=${PAIR:-bench-data/pair-850M}
[[ -d $PAIR/base && -d $PAIR/ft ]] || { echo "no pair at $PAIR (see benches/cli.sh)" >&2; exit 1; }
CMD=${CMD:-prune}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# args SIDE: the command's arguments, its output named after SIDE, into ARGS.
args() {
    case $CMD in
    prune) ARGS=(prune --base "$PAIR/base" --finetuned "$PAIR/ft" --output "$OUT/$1.fapm" --overwrite --quiet) ;;
    apply) ARGS=(apply --base "$PAIR/base" --delta "$OUT/in.fapm" --output "$OUT/$1.out" --overwrite --quiet) ;;
    verify) ARGS=(verify "$OUT/in.fapm" --base "$PAIR/base" --quiet) ;;
    *) echo "CMD must be prune, apply or verify" >&2; exit 2 ;;
    esac
}
if [[ $CMD != prune ]]; then
    "$A" prune --base "$PAIR/base" --finetuned "$PAIR/ft" --output "$OUT/in.fapm" --quiet
fi

COLD=${COLD:-0}
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
if [[ $COLD == 1 ]]; then
    [[ -w /proc/sys/vm/drop_caches ]] || { echo "COLD=1 needs root (it drops the page cache)" >&2; exit 1; }
    case $CMD in
    prune) INPUTS=("$PAIR"/base/*.safetensors "$PAIR"/ft/*.safetensors) ;;
    verify | apply) INPUTS=("$PAIR"/base/*.safetensors "$OUT/in.fapm") ;;
    esac
else
    cat "$PAIR"/base/*.safetensors "$PAIR"/ft/*.safetensors >/dev/null
fi
declare -A WALL CPU RATIO
for _ in $(seq "$N"); do
    if [[ $COLD == 1 ]]; then
        drop
        /usr/bin/time -f '%e' -o "$OUT/time" cat "${INPUTS[@]}" >/dev/null
        floor=$(cat "$OUT/time")
        WALL[floor]+="$floor "
    fi
    for side in A B; do
        bin=${!side}
        if [[ $COLD == 1 ]]; then drop; else sync; fi
        args "$side"
        /usr/bin/time -f '%e %U %S' -o "$OUT/time" "$bin" "${ARGS[@]}" "$@"
        read -r e u s <"$OUT/time"
        WALL[$side]+="$e "
        CPU[$side]+="$(awk -v u="$u" -v s="$s" 'BEGIN {print u + s}') "
        [[ $COLD == 1 ]] && RATIO[$side]+="$(awk -v e="$e" -v f="$floor" 'BEGIN {printf "%.3f", e / f}') "
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
[[ $COLD == 1 ]] && echo "cold cat of the inputs (floor): $(echo "${WALL[floor]}" | median) s [${WALL[floor]% }]"
for side in A B; do
    ratio=""
    [[ $COLD == 1 ]] && ratio=", vs floor $(echo "${RATIO[$side]}" | median)x [${RATIO[$side]% }]"
    echo "${!side}: wall $(echo "${WALL[$side]}" | median) s [${WALL[$side]% }], cpu $(echo "${CPU[$side]}" | median) s [${CPU[$side]% }]$ratio"
done
case $CMD in
prune) if cmp -s "$OUT/A.fapm" "$OUT/B.fapm"; then echo "deltas: the same bytes"; else echo "deltas: DIFFER"; fi ;;
apply) if diff -rq "$OUT/A.out" "$OUT/B.out" >/dev/null; then echo "models: the same bytes"; else echo "models: DIFFER"; fi ;;
verify) echo "verify: both passed every run" ;;
esac
