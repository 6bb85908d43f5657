#!/usr/bin/env bash
# CI for the Python package: installs what its tests need into the repository's own venv
# (.ci/venv.sh: .venv/, made on the first run and reused; pip skips what is installed), builds
# and installs the package from python/ into it, checks the type stubs against the built module,
# runs pytest and prints its summary line. Nothing goes into the system's Python. Run from
# anywhere; prints how long each part took. `python.sh install` stops once the package is
# installed, `python.sh test` starts from there (tests/all.sh builds the package in the
# background while other parts run).
set -euo pipefail
# shellcheck source=.ci/lib.sh
. "$(dirname "$0")/lib.sh"
phase_of install test "$@"
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
step() { echo "python.sh: $1 took $(( $(date +%s) - t0 )) s"; t0=$(date +%s); }
t0=$(date +%s)
# .ci/python-test.txt: torch pulls its CUDA libraries (about 3 GB, several minutes on a fresh
# machine; tests/all.sh starts this install in the background at its start).
if [ "$phase" != test ]; then
    python=$(bash .ci/venv.sh | tail -n 1)
    step "installing the test dependencies"
    # The repository's target directory, which outlives pip's temporary build directory: a
    # rebuild is incremental. The release profile, as users get: the dev profile or release
    # without LTO and debug info cost as much or more here (docs/PERFORMANCE.md, "CI time").
    CARGO_TARGET_DIR="$PWD/target" "$python" -m pip install -q --disable-pip-version-check ./python
    step "building and installing the package"
    [ "$phase" = all ] || exit 0
fi
python=${FAPM_VENV:-$PWD/.venv}/bin/python
# The tests run fapm apply to compare with: $FAPM_BIN (tests/all.sh: the binary `cargo test`
# built), else this build of it.
[ -n "${FAPM_BIN:-}" ] || cargo build --quiet --profile test --bin fapm
step "building the fapm binary"
# The stubs against the module they describe: a function, argument, default or class in one and
# not the other fails here. From python/tests, as pytest below: `fapm` is the installed package.
(cd python/tests && "$python" -m mypy.stubtest fapm._fapm)
step "checking the stubs (mypy.stubtest)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
(cd python/tests && "$python" -m pytest -q -p no:cacheprovider . 2>&1) | tee "$log"
status=${PIPESTATUS[0]}
set -e
step "pytest"
grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)' "$log" | tail -1
exit "$status"
