#!/usr/bin/env bash
# Regenerates the README screenshots: a terminal session (tmux -> aha -> headless Chromium)
# on a model pair, and the rendered report (docs/images/check-report.sh --write, which checks
# it in the browser on a generated 10M-parameter pair). Needs: apt-get install tmux aha
# chromium. Usage:
#   docs/images/make-screenshots.sh BASE_DIR FINETUNED_DIR
# with any model pair (the README's comes from benches/gen_pair.rs, 850M parameters).
set -euo pipefail
cd "$(dirname "$0")/../.."
base=$1 ft=$2
out=docs/images
work=$(mktemp -d)
cargo build --release --quiet
fapm=$PWD/target/release/fapm
shoot() { # html-file png-file width height
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/chrome" --hide-scrollbars --window-size="$3,$4" \
    --screenshot="$2" "file://$1" 2>/dev/null
}
term_html() { # ansi-file html-file
  aha --black --title fapm < "$1" | sed 's/<pre>/<pre style="font-size:14px;line-height:1.25;margin:8px">/' > "$2"
}
tmux kill-session -t fapm-shot 2>/dev/null || true
tmux new-session -d -s fapm-shot -x 150 -y 24 -c "$work"
ln -s "$fapm" "$work/fapm"
ln -s "$(realpath "$base")" "$work/base"
ln -s "$(realpath "$ft")" "$work/finetuned"
tmux send-keys -t fapm-shot "export PATH=$work:\$PATH PS1='$ '; clear" Enter
sleep 0.5
tmux send-keys -t fapm-shot "clear; fapm prune --base base --finetuned finetuned --output model.fapm --overwrite && fapm apply --base base --delta model.fapm --output model && fapm inspect model.fapm | head -8" Enter
while ! tmux capture-pane -t fapm-shot -p | grep -q 'kept / total'; do sleep 0.5; done
sleep 1
tmux capture-pane -t fapm-shot -e -p > "$work/summary.ansi"
tmux kill-session -t fapm-shot
term_html "$work/summary.ansi" "$work/summary.html"
shoot "$work/summary.html" "$PWD/$out/terminal-summary.png" 1250 420
rm -rf "$work"
docs/images/check-report.sh --write
echo "wrote $out/terminal-summary.png $out/report.png"
