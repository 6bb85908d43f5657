#!/usr/bin/env bash
# Compares the prune time of two fapm binaries in alternating runs: on a noisy VM, where the
# same binary's time drifts by 10-25% between runs of benches/cli.sh, only pairs run side by
# side show a change of a few percent.
#
#   benches/ab.sh OLD_BINARY NEW_BINARY [extra prune arguments]
#   N=9 PAIR=bench-data/pair-850M benches/ab.sh /tmp/fapm-before target/release/fapm --threshold approx
#
# Environment: N (pairs, default 7), PAIR (a generated pair with base/ and ft/, default
# bench-data/pair-850M: make it with benches/cli.sh or examples/gen_pair).
#
# Prints, for each binary, the median wall and CPU (user + system) seconds and every run, and
# whether the two deltas are the same bytes (they must be: speed work changes no output).
set -euo pipefail

[[ $# -ge 2 ]] || { sed -n '2,9p' "$0" >&2; exit 2; }
A=$1 B=$2
shift 2
N=${N:-7}
PAIR=${PAIR:-bench-data/pair-850M}
[[ -d $PAIR/base && -d $PAIR/ft ]] || { echo "no pair at $PAIR (see benches/cli.sh)" >&2; exit 1; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

cat "$PAIR"/base/*.safetensors "$PAIR"/ft/*.safetensors >/dev/null
declare -A WALL CPU
for _ in $(seq "$N"); do
    for side in A B; do
        bin=${!side}
        sync
        /usr/bin/time -f '%e %U %S' -o "$OUT/time" "$bin" prune --base "$PAIR/base" --finetuned "$PAIR/ft" \
            --output "$OUT/$side.fapm" --overwrite --quiet "$@"
        read -r e u s <"$OUT/time"
        WALL[$side]+="$e "
        CPU[$side]+="$(awk -v u="$u" -v s="$s" 'BEGIN {print u + s}') "
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
for side in A B; do
    echo "${!side}: wall $(echo "${WALL[$side]}" | median) s [${WALL[$side]% }], cpu $(echo "${CPU[$side]}" | median) s [${CPU[$side]% }]"
done
if cmp -s "$OUT/A.fapm" "$OUT/B.fapm"; then echo "deltas: the same bytes"; else echo "deltas: DIFFER"; fi
