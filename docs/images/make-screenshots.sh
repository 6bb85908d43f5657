#!/usr/bin/env bash
# Regenerates the README screenshots: a terminal session (tmux -> aha -> headless Chromium)
# and the rendered report. Needs: apt-get install tmux aha chromium. Usage:
#   docs/images/make-screenshots.sh BASE_DIR FINETUNED_DIR
# with a model pair big enough that prune runs a few seconds (so the progress bar shows).
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
tmux new-session -d -s fapm-shot -x 118 -y 24
tmux send-keys -t fapm-shot "clear; fapm() { $fapm \"\$@\"; }; clear" Enter
sleep 0.5
tmux send-keys -t fapm-shot "fapm prune --base $base --finetuned $ft --output $work/model.fapm" Enter
for _ in $(seq 100); do # wait for the bar to be a third of the way
  tmux capture-pane -t fapm-shot -p | grep -q '\[=\{10,\}' && break
  sleep 0.05
done
tmux capture-pane -t fapm-shot -e -p > "$work/progress.ansi"
while tmux capture-pane -t fapm-shot -p | grep -q '\[=*>* *\]'; do sleep 0.5; done
sleep 2
tmux send-keys -t fapm-shot "clear; fapm prune --base $base --finetuned $ft --output $work/model.fapm --overwrite && fapm apply --base $base --delta $work/model.fapm --output $work/model && fapm inspect $work/model.fapm | head -8" Enter
while ! tmux capture-pane -t fapm-shot -p | grep -q 'kept / total'; do sleep 0.5; done
sleep 1
tmux resize-window -t fapm-shot -y 24
tmux capture-pane -t fapm-shot -e -p > "$work/summary.ansi"
tmux kill-session -t fapm-shot
term_html "$work/progress.ansi" "$work/progress.html"
term_html "$work/summary.ansi" "$work/summary.html"
shoot "$work/progress.html" "$PWD/$out/terminal-progress.png" 1000 110
shoot "$work/summary.html" "$PWD/$out/terminal-summary.png" 1000 500
"$fapm" report --base "$base" --finetuned "$ft" --output "$work/report" --quiet
shoot "$work/report/index.html" "$PWD/$out/report.png" 1100 1400
rm -rf "$work"
echo "wrote $out/terminal-progress.png $out/terminal-summary.png $out/report.png"
