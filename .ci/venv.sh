#!/usr/bin/env bash
# The repository's own Python environment for the tests: creates .venv/ at the top of the
# repository (ignored by git) when it is missing or broken, else reuses it, and installs what the
# tests need (.ci/python-test.txt) into it in one pip session; pip skips what is installed, so a
# warm run takes seconds. Nothing is installed into the system's Python. Prints the venv's python
# on its last line. FAPM_VENV=DIR puts the environment elsewhere.
#
# tests/all.sh runs this in the background while the Rust tests build; .ci/python.sh and
# .ci/container.sh run it again (a no-op then) so that each also works alone.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FAPM_VENV:-$PWD/.venv}
# A venv whose interpreter is gone (another Python on PATH since) is made anew.
if ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    rm -rf "$venv"
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        # Debian's python3 leaves ensurepip to the python3-venv package.
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r .ci/python-test.txt
echo "$venv/bin/python"
