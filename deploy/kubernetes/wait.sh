#!/usr/bin/env bash
# Waits until a Job is Complete (exit 0) or Failed (exit 1, with its pods listed), whichever comes
# first: `kubectl wait` takes one condition, and waiting for complete alone would hang until its
# timeout once a part has failed.
#
#   deploy/kubernetes/wait.sh JOB [SECONDS_BETWEEN_LOOKS]        (exit 2: no such Job)
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 JOB [SECONDS_BETWEEN_LOOKS]" >&2
    exit 2
fi
job=$1 every=${2:-10}
while :; do
    # The types of the conditions that hold, e.g. "SuccessCriteriaMet Complete".
    state=$(kubectl get "job/$job" -o 'jsonpath={.status.conditions[?(@.status=="True")].type}') || exit 2
    case " $state " in
    *" Complete "*)
        echo "job/$job complete"
        exit 0
        ;;
    *" Failed "*)
        echo "job/$job failed:" >&2
        kubectl get pods -l "batch.kubernetes.io/job-name=$job" >&2 || true
        exit 1
        ;;
    esac
    sleep "$every"
done
