#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, and fapm pruned in parts on it through deploy/slurm:
# 1. the array job over fixtures/sharded with N = 3 and the merge job after it (afterok): the
#    merged delta must be byte-identical to a one-machine prune, and apply of it must pass;
# 2. an array with ids 10, 12, 14 whose task 12 fails: the merge job is cancelled, merge names
#    the missing part, and that task run again alone, then the merge, give the same delta.
#
# Needs root on Debian (no systemd needed): installs munge and Slurm from Debian's packages when
# missing (.ci/packages.sh), and runs its own munged, slurmctld and slurmd, listening on 127.0.0.1
# only, with their state under /var/spool/fapm-ci-slurm; they are stopped when the script ends,
# however it ends, and any left by an earlier run are stopped first. FAPM=path/to/fapm uses that
# binary (tests/all.sh: the one `cargo test` built), otherwise `cargo build --profile test`
# builds one.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
state=/var/spool/fapm-ci-slurm
host=$(hostname -s)
daemons=(slurmd slurmctld munged)   # the order they are stopped in
work=
prune_job=
merge_job=
passed=0

# shellcheck source=.ci/lib.sh
. "$repo/.ci/lib.sh"

stop_daemons() {
    local name pid i
    for name in "${daemons[@]}"; do
        [ -f "$state/pids/$name" ] || continue
        pid=$(cat "$state/pids/$name")
        rm -f "$state/pids/$name"
        # Only the process this script started under that name: a stale pid may be reused.
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || continue
        kill "$pid" 2>/dev/null || continue
        for ((i = 0; i < 100; i++)); do
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
        [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null
    done
    return 0
}

show_logs() {
    local f
    # The daemons' own stderr repeats their log file, and matters only if they stopped before
    # opening it.
    for f in ${work:+"$work"/*.out} "$state"/log/*.stderr; do
        [ -f "${f%.stderr}.log" ] && f=${f%.stderr}.log
        [ -f "$f" ] || continue
        echo "---- $f (last 40 lines)"
        tail -n 40 "$f"
    done
}

finish() {
    local status=$?
    trap - EXIT
    if [ "$status" -ne 0 ]; then
        show_logs
    fi
    if [ "$status" -ne 0 ] && [ -n "$prune_job$merge_job" ]; then
        scancel ${prune_job:+"$prune_job"} ${merge_job:+"$merge_job"} 2>/dev/null || true
    fi
    stop_daemons
    [ -n "$work" ] && rm -rf "$work"
    echo "slurm: $passed passed, $((status == 0 ? 0 : 1)) failed"
    exit "$status"
}
trap finish EXIT

# ---- packages
t=$(now)
bash "$repo/.ci/packages.sh" slurm
echo "slurm: packages ready in $(since "$t") s ($(slurmctld -V))"

# ---- fapm
t=$(now)
find_fapm
echo "slurm: fapm ready in $(since "$t") s ($FAPM)"

# ---- cluster
t=$(now)
stop_daemons
rm -rf "$state"
mkdir -p "$state"/{pids,log,munge,run,ctld,spool}
chmod 755 "$state" "$state/run"  # clients of munged reach its socket as any user
chmod 700 "$state/munge"
dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$state/munge/munge.key"
socket=$state/run/munge.socket
cat >"$state/slurm.conf" <<CONF
ClusterName=fapm-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
$(slurmd -C | sed -n 1p) NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$state/slurm.conf

munged -F --key-file="$state/munge/munge.key" --socket="$socket" \
    --pid-file="$state/munge/munged.pid" --seed-file="$state/munge/seed" \
    --log-file="$state/log/munged.log" 2>"$state/log/munged.stderr" &
echo $! >"$state/pids/munged"
for ((i = 0; i < 100; i++)); do
    [ -S "$socket" ] && break
    [ -d "/proc/$(cat "$state/pids/munged")" ] || fail "munged did not start"
    sleep 0.1
done
[ -S "$socket" ] || fail "munged did not open $socket in 10 s"

slurmctld -D -f "$SLURM_CONF" 2>"$state/log/slurmctld.stderr" &
echo $! >"$state/pids/slurmctld"
slurmd -D -f "$SLURM_CONF" 2>"$state/log/slurmd.stderr" &
echo $! >"$state/pids/slurmd"
node=
for ((i = 0; i < 300; i++)); do
    node=$(sinfo -h -N -n "$host" -o %T 2>/dev/null || true)
    [ "$node" = idle ] && break
    for name in slurmctld slurmd; do
        [ -d "/proc/$(cat "$state/pids/$name")" ] || fail "$name stopped"
    done
    sleep 0.2
done
[ "$node" = idle ] || fail "node $host is '$node', not idle, after 60 s"
echo "slurm: cluster up in $(since "$t") s (node $host idle)"

# ---- jobs
# wait_jobs ID...: until none of the jobs is pending, running or completing (5 minutes at most).
wait_jobs() {
    local i left
    for ((i = 0; i < 1500; i++)); do
        left=$(squeue -h -j "$(IFS=,; echo "$*")" -o %i 2>/dev/null) || left=unknown
        [ -z "$left" ] && return 0
        sleep 0.2
    done
    fail "jobs still in the queue after 5 minutes: $left"
}

# expect_states ID 'TASK STATE...': the final state of each task of a job (TASK is the array
# task id, or - for a job that is not an array).
expect_states() {
    local got
    got=$(scontrol -o show job "$1" | awk '{
        t = "-"; s = ""
        for (i = 1; i <= NF; i++) {
            if ($i ~ /^ArrayTaskId=/) t = substr($i, 13)
            if ($i ~ /^JobState=/) s = substr($i, 10)
        }
        print t, s
    }' | sort -n | paste -sd ' ')
    [ "$got" = "$2" ] || fail "job $1: expected '$2', got '$got'"
}

work=$(mktemp -d)
cd "$work"
mkdir bin
ln -s "$FAPM" bin/fapm
export PATH=$work/bin:$PATH # the job files run fapm from PATH; sbatch passes the environment
base=$repo/fixtures/sharded/base
finetuned=$repo/fixtures/sharded/finetuned
options=(--sparsity 0.8 --metric fapm)
fapm prune --base "$base" --finetuned "$finetuned" --output one.fapm "${options[@]}" --quiet

# 1. deploy/slurm/submit.sh: the array job and the merge after it give the one-machine delta, and
# apply of it passes.
t=$(now)
submitted=$(bash "$repo/deploy/slurm/submit.sh" 3 "$base" "$finetuned" parts merged.fapm "${options[@]}")
echo "slurm: $submitted"
read -r prune_job merge_job < <(sed -E 's/.*prune job ([0-9]+).*merge job ([0-9]+).*/\1 \2/' <<<"$submitted")
wait_jobs "$prune_job" "$merge_job"
expect_states "$prune_job" "1 COMPLETED 2 COMPLETED 3 COMPLETED"
expect_states "$merge_job" "- COMPLETED"
echo "slurm: 3 parts and the merge done in $(since "$t") s"
parts=$(cd parts && echo *)
[ "$parts" = "part-1.fapm part-2.fapm part-3.fapm" ] || fail "parts/ holds $parts"
cmp one.fapm merged.fapm || fail "the merged delta differs from the one-machine delta"
fapm apply --base "$base" --delta merged.fapm --output applied --quiet
fapm verify merged.fapm --base "$base"
passed=$((passed + 1))

# 2. By hand, as deploy/slurm/README.md says, with task ids 10, 12, 14 (fapm numbers the parts
# from the array's first id and step). Task 12 fails (its part's path is taken by a directory):
# the merge job is cancelled; merge of the parts that are there names the missing one; task 12
# run again alone, then the merge, give the same delta.
t=$(now)
mkdir -p parts2/part-12.fapm
prune_job=$(sbatch --parsable --array=10-14:2 "$repo/deploy/slurm/prune.sbatch" \
    "$base" "$finetuned" parts2 "${options[@]}")
prune_job=${prune_job%%;*}
merge_job=$(sbatch --parsable --dependency="afterok:$prune_job" --kill-on-invalid-dep=yes \
    "$repo/deploy/slurm/merge.sbatch" parts2 merged2.fapm)
merge_job=${merge_job%%;*}
wait_jobs "$prune_job" "$merge_job"
expect_states "$prune_job" "10 COMPLETED 12 FAILED 14 COMPLETED"
expect_states "$merge_job" "- CANCELLED"
rmdir parts2/part-12.fapm
rc=0
fapm merge parts2/part-*.fapm --output merged2.fapm 2>merge.err || rc=$?
[ "$rc" -eq 1 ] || fail "merge of parts 1 and 3 of 3: exit $rc, expected 1"
[ ! -e merged2.fapm ] || fail "the refused merge left merged2.fapm behind"
grep -E '^error: .*part.*2' merge.err >/dev/null || fail "merge's error does not name part 2: $(cat merge.err)"
echo "slurm: merge without part 2 says: $(cat merge.err)"
prune_job=$(FAPM_PART=2/3 sbatch --parsable --array=12 "$repo/deploy/slurm/prune.sbatch" \
    "$base" "$finetuned" parts2 "${options[@]}")
prune_job=${prune_job%%;*}
merge_job=$(sbatch --parsable --dependency="afterok:$prune_job" \
    "$repo/deploy/slurm/merge.sbatch" parts2 merged2.fapm)
merge_job=${merge_job%%;*}
wait_jobs "$prune_job" "$merge_job"
expect_states "$prune_job" "12 COMPLETED"
expect_states "$merge_job" "- COMPLETED"
cmp one.fapm merged2.fapm || fail "the merged delta after the rerun differs from the one-machine delta"
echo "slurm: a failed part rerun and merged in $(since "$t") s"
passed=$((passed + 1))
