#!/usr/bin/env bash
# The long campaign: `bash fuzz/campaign.sh TARGET MINUTES` runs one afl-fuzz process (one
# core) on TARGET for MINUTES, resuming fuzz/campaign/TARGET when it exists, and prints the
# figures docs/SECURITY.md records (from fuzzer_stats) and the CPU time used. Build first:
# `cd fuzz && cargo afl build --release` (or set FUZZ_TARGET_DIR to the target directory of an
# instrumented build, as .ci/fuzz.sh does). Output dirs stay out of git (fuzz/.gitignore).
set -euo pipefail
cd "$(dirname "$0")"
t=$1 minutes=$2
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1 AFL_NO_UI=1
out=campaign/$t
input=corpus/$t
if [[ -d $out/default/queue ]]; then input=-; fi # resume
mkdir -p "$out" "/dev/shm/fapm-fuzz-campaign-$t"
# The CPU time of the whole process tree (afl-fuzz, its fork server, every execution), from a
# cgroup v1 cpuacct group when one can be made (as root); time(1) below sees only what afl-fuzz
# itself reaps, a lower bound.
cg=/sys/fs/cgroup/cpuacct/fapm-fuzz-campaign-$t
if mkdir -p "$cg" 2>/dev/null && echo $$ >"$cg/tasks" 2>/dev/null; then
    cpu0=$(cat "$cg/cpuacct.usage")
else
    cg=
fi
FAPM_FUZZ_DIR=/dev/shm/fapm-fuzz-campaign-$t /usr/bin/time -f "cpu_seconds %U user %S sys" -o "$out/time-$(date +%s).txt" \
    cargo afl fuzz -V $((minutes * 60)) -t 2000 -i "$input" -o "$out" -- "${FUZZ_TARGET_DIR:-$PWD/target}/release/$t" \
    >"$out/afl.log" 2>&1 || true
rm -rf "/dev/shm/fapm-fuzz-campaign-$t"
if [[ -n $cg ]]; then
    cpu1=$(cat "$cg/cpuacct.usage")
    echo $$ >/sys/fs/cgroup/cpuacct/tasks
    rmdir "$cg" 2>/dev/null || true
    printf "cpu_minutes_process_tree %d.%02d\n" $(((cpu1 - cpu0) / 60000000000)) $((((cpu1 - cpu0) / 600000000) % 100)) | tee -a "$out/cpu.txt"
fi
cat "$out"/time-*.txt
grep -E '^(run_time|execs_done|execs_per_sec|corpus_count|bitmap_cvg|edges_found|total_edges|saved_crashes|saved_hangs|peak_rss_mb) ' \
    "$out/default/fuzzer_stats"
