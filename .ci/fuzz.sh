#!/usr/bin/env bash
# A short coverage-guided fuzz run of every target in fuzz/ (fuzz/README.md): installs
# cargo-afl (which builds AFL++) when missing, builds the targets instrumented, runs each for
# FUZZ_SECONDS (default 15) on a copy of its seed corpus, and fails if any input crashes,
# hangs (over 2 s) or takes more memory than the bound. Standalone: `bash .ci/fuzz.sh`.
# FUZZ_TARGETS="delta paths" runs some targets only; FUZZ_TARGET_DIR (default fuzz/target)
# may point at a directory kept between runs, to skip the instrumented build's cold cost.
# Ends with `fuzz: P passed, F failed`. `fuzz.sh build` stops once the targets are built,
# `fuzz.sh run` starts from there (tests/all.sh builds them in the background).
set -uo pipefail
# shellcheck source=.ci/lib.sh
. "$(dirname "$0")/lib.sh"
phase_of build run "$@"
cd "$(dirname "$0")/.." || exit 1
root=$PWD
AFL_VERSION=0.18.2
secs=${FUZZ_SECONDS:-15}
targets=${FUZZ_TARGETS:-"delta header merge paths"}
target_dir=${FUZZ_TARGET_DIR:-$root/fuzz/target}
t0=$SECONDS

say() { echo "fuzz: $*" >&2; }

# What AFL++ needs in a container: no CPU frequency scaling or core binding to inspect, and
# core dumps that go to a file ("core") are fine; stop a target at its first crash.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1 AFL_NO_UI=1
export AFL_BENCH_UNTIL_CRASH=1

if [[ $phase != run ]]; then
    # 1. Tools: a C compiler and make build AFL++ (build-essential); cargo-afl, pinned.
    if ! command -v cc >/dev/null || ! command -v make >/dev/null; then
        say "installing build-essential"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential) >&2 || exit 1
    fi
    if [[ "$(cargo afl --version 2>/dev/null)" != *"$AFL_VERSION"* ]]; then
        say "installing cargo-afl $AFL_VERSION (builds AFL++)"
        cargo install cargo-afl --version "$AFL_VERSION" --locked >&2 || exit 1
    fi
    # AFL++ and its runtime are built once per Rust toolchain; "already built" is fine.
    if ! out=$(cargo afl config --build 2>&1) && [[ "$out" != *"already built"* ]]; then
        echo "$out" >&2
        say "could not build AFL++"
        exit 1
    fi
    say "tools ready after $((SECONDS - t0)) s"

    # 2. The targets, instrumented (fuzz/ is its own workspace).
    (cd fuzz && CARGO_TARGET_DIR="$target_dir" cargo afl build --release --locked --bins) >&2 || { say "build failed"; exit 1; }
    say "targets built after $((SECONDS - t0)) s"
    [[ $phase == all ]] || exit 0
fi

# 3. A short run of each on a copy of its seeds.
work=$(mktemp -d "${TMPDIR:-/tmp}/fapm-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
passed=0 failed=0
for t in $targets; do
    mkdir -p "$work/scratch-$t"
    cp -r "fuzz/corpus/$t" "$work/in-$t"
    FAPM_FUZZ_DIR="$work/scratch-$t" timeout $((secs + 120)) cargo afl fuzz -V "$secs" -t 2000 \
        -i "$work/in-$t" -o "$work/out-$t" -- "$target_dir/release/$t" >"$work/$t.log" 2>&1
    rc=$?
    out="$work/out-$t/default"
    count() { find "$out/$1" -type f ! -name README.txt 2>/dev/null | wc -l; }
    crashes=$(count crashes) hangs=$(count hangs)
    stat() { sed -n "s/^$1 *: //p" "$out/fuzzer_stats" 2>/dev/null; }
    execs=$(stat execs_done) cvg=$(stat bitmap_cvg)
    if [[ $rc -eq 0 && $crashes -eq 0 && $hangs -eq 0 && -n "$execs" ]]; then
        say "$t: ok, ${execs} execs, coverage ${cvg}"
        passed=$((passed + 1))
    else
        say "$t: FAILED (exit $rc, $crashes crashes, $hangs hangs); afl-fuzz said:"
        tail -n 20 "$work/$t.log" >&2
        for f in "$out"/crashes/id* "$out"/hangs/id*; do
            [[ -f $f ]] || continue
            say "  input $(basename "$f"): $(od -An -c -N 96 "$f" | tr -s ' ' | head -c 300)"
            mkdir -p fuzz/found && cp "$f" "fuzz/found/$t-$(basename "$f" | tr ':,' '--')"
        done
        failed=$((failed + 1))
    fi
done
say "total $((SECONDS - t0)) s"
echo "fuzz: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
