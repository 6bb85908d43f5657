#!/bin/bash
# Submit the prune array (N parts) and the merge job that runs when every part has succeeded.
#
#   deploy/slurm/submit.sh N BASE FINETUNED PARTS_DIR DELTA [prune options]
#
# sbatch options for both jobs (partition, account, time limit) come from the usual SBATCH_*
# environment variables, e.g. SBATCH_PARTITION=cpu SBATCH_TIMELIMIT=1:00:00.
set -euo pipefail
if [ $# -lt 5 ]; then
    echo "usage: $0 N BASE FINETUNED PARTS_DIR DELTA [prune options]" >&2
    exit 2
fi
n=$1 base=$2 finetuned=$3 parts=$4 delta=$5
shift 5
here=$(dirname "$0")
prune=$(sbatch --parsable --array="1-$n" "$here/prune.sbatch" "$base" "$finetuned" "$parts" "$@")
prune=${prune%%;*}
merge=$(sbatch --parsable --dependency="afterok:$prune" --kill-on-invalid-dep=yes \
    "$here/merge.sbatch" "$parts" "$delta")
merge=${merge%%;*}
echo "submitted prune job $prune (array 1-$n) and merge job $merge (after every part succeeds)"
