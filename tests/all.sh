#!/usr/bin/env bash
# Every test of fapm, as the README's test command: the Rust suite, a short run of each fuzz
# target, a one-node Slurm cluster
# running the partitioned prune, the container image and the Kubernetes manifests run as pods
# would run them, the Python package's tests (with torch) and the report checked in headless
# Chromium. Installs what it needs: Debian's packages (as root), and PyPI's into the
# repository's own venv, .venv/ (.ci/venv.sh), never into the system's Python. Run on a fresh
# machine or again on a warm one. Each part prints its time; the last line counts every
# test of every part. With --lint (.ci/run), rustfmt's check runs first, as a part, and clippy
# lints the workspace's crates (and the Python package's) while the build compiles them.
set -euo pipefail
cd "$(dirname "$0")/.."
lint=
case ${1:-} in
--lint) lint=1 ;;
"") ;;
*)
    echo "usage: $0 [--lint]" >&2
    exit 2
    ;;
esac
export CARGO_TERM_COLOR=never
times=()
part() { # NAME COMMAND...
    local name=$1 start=$SECONDS
    shift
    "$@"
    times+=("$name $((SECONDS - start)) s")
    echo "time: $name $((SECONDS - start)) s"
}
log=$(mktemp -d)
installs=() # the background installs' pids
finish() {
    local status=$? pid
    trap - EXIT
    # An install is not cut off half-way (dpkg, pip): a failed run still waits for it.
    for pid in "${installs[@]}"; do
        [ -z "$pid" ] || wait "$pid" 2>/dev/null || true
    done
    rm -rf "$log"
    exit "$status"
}
trap finish EXIT
# Python 3 with venv (Debian's python3 leaves it to python3-venv), before the background apt-get
# session so that two never wait on dpkg's lock; a no-op where they are installed.
python3 -c 'import ensurepip, venv' 2>/dev/null ||
    { apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null; }
# The installs wait on the network, the build and the Rust tests on the CPU: Debian's packages
# for the Slurm, container and browser parts (one apt-get session) and the Python dependencies
# (torch pulls about 3 GB of CUDA libraries; into .venv/, one pip session) install in the
# background from here, and each part first waits for what it needs. The parts' own scripts then
# find them installed.
bash .ci/packages.sh slurm container chromium >"$log/debian-packages" 2>&1 &
installs[0]=$!
bash .ci/venv.sh >"$log/python-packages" 2>&1 &
installs[1]=$!
# The container part's base image (a Debian root file system: debootstrap, about 2 minutes on a
# fresh machine, then kept) once the apt-get session has ended (it needs debootstrap and podman;
# packages.sh is a no-op then), so that a failure here fails the container part alone.
{
    while kill -0 "${installs[0]}" 2>/dev/null; do sleep 2; done
    bash .ci/packages.sh container && bash deploy/container/build.sh --base
} >"$log/container-base" 2>&1 &
installs[2]=$!
ready() { # INDEX NAME: waits for the background install INDEX; shows its log if it failed
    local start=$SECONDS pid=${installs[$1]}
    [ -n "$pid" ] || return 0
    installs[$1]=
    if ! wait "$pid"; then
        echo "error: installing $2 in the background failed:" >&2
        cat "$log/$2" >&2
        exit 1
    fi
    echo "install: $2 ready (waited $((SECONDS - start)) s for it)"
}
lint_time=0
if [ -n "$lint" ]; then
    part fmt cargo fmt --all -- --check
    lint_time=$SECONDS
    # Clippy lints the workspace's crates as the build compiles them (clippy-driver as the
    # workspace's compiler wrapper, as `cargo clippy` runs it), so the dependencies are compiled
    # once, not once checked for clippy and again built for the tests; -D warnings as
    # `cargo clippy --workspace --all-targets -- -D warnings` would give it. Dependencies never
    # go through the wrapper.
    export RUSTC_WORKSPACE_WRAPPER CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
    RUSTC_WORKSPACE_WRAPPER=$(rustup which clippy-driver)
fi
# The tests' build on its own, so that its time shows apart from the tests' own; every target
# (benches and examples too) so that clippy sees them all.
part build${lint:+-clippy} cargo test --workspace --all-targets --no-run
# What the later parts build, in the background from here, each beside the others' work: the
# Python package (a release build whose long serial chain leaves a core free much of the time)
# and the fuzz targets (cargo-afl and AFL++ on a fresh machine, then the instrumented build).
# The package's build waits for the pip session installing the test dependencies to end
# (python.sh install runs it again, a no-op then, or the error if it failed).
{
    while kill -0 "${installs[1]}" 2>/dev/null; do sleep 2; done
    bash .ci/python.sh install
} >"$log/python-build" 2>&1 &
installs[3]=$!
# Not through clippy: cargo-afl's own install and the fuzz workspace are not this workspace.
FUZZ_TARGET_DIR=${FUZZ_TARGET_DIR:-/var/cache/fapm-fuzz/target}
export FUZZ_TARGET_DIR
env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS bash .ci/fuzz.sh build >"$log/fuzz-build" 2>&1 &
installs[4]=$!
# The parts below run the fapm binary that build made for the integration tests (the test
# profile, with the dev-dependencies' features): `cargo build --bin fapm` alone would build the
# crate and some of its dependencies again, for their features without the dev-dependencies.
FAPM=${CARGO_TARGET_DIR:-$PWD/target}/debug/fapm
export FAPM FAPM_BIN=$FAPM
rust_tests() { cargo test --workspace 2>&1 | tee "$log/rust"; }
part rust-tests rust_tests
# A short coverage-guided run of every fuzz target (15 s each, .ci/fuzz.sh); the instrumented
# build is kept outside the clone (FUZZ_TARGET_DIR), so a machine builds it once.
fuzz() {
    ready 4 fuzz-build
    bash .ci/fuzz.sh run 2>&1 | tee "$log/fuzz"
}
part fuzz fuzz
slurm() {
    ready 0 debian-packages
    bash .ci/slurm.sh 2>&1 | tee "$log/slurm"
}
part slurm slurm
container() {
    ready 0 debian-packages
    ready 2 container-base
    ready 3 python-build # the one pip session in .venv/ at a time
    bash .ci/container.sh 2>&1 | tee "$log/container"
}
part container container
python_tests() {
    ready 3 python-build
    bash .ci/python.sh test 2>&1 | tee "$log/python"
}
part python python_tests
browser() {
    ready 0 debian-packages
    bash docs/images/check-report.sh 2>&1 | tee "$log/browser"
}
part report-browser browser
# With --lint, the test suite's own time too: the run's but fmt-clippy (and the installs' start).
echo "times: $(IFS=,; echo "${times[*]}" | sed 's/,/, /g'),${lint:+ tests $((SECONDS - lint_time)) s,} all $SECONDS s"
# Rust: "test result: ok. P passed; F failed"; fuzzing, Slurm and the container: "fuzz: P
# passed, F failed", "slurm: ...", "container: ..."; pytest:
# "P passed in S s", which .ci/python.sh prints again as its last line: counted once; the browser
# check is one test that passed if we got here.
# Any failure stopped the script above (set -e, pipefail), so only passes are left to count.
awk '/^test result:/ { p += $4; f += $6 }
     /^(slurm|container|fuzz): [0-9]+ passed/ { p += $2; f += $4 }
     /^=* *[0-9]+ passed/ && !seen[$0]++ { sub(/^=+ */, ""); p += $1 }
     END { printf "total: %d passed, %d failed\n", p + 1, f }' "$log/rust" "$log/fuzz" "$log/slurm" "$log/container" "$log/python"
