#!/usr/bin/env bash
# Renders `fapm report` in headless Chromium and checks what a reader would see: the charts
# are SVG in the page with their titles and axis labels as text, every heatmap the page shows
# exists, and the screenshot holds the page's white, its text and the heatmaps' colours (not
# a blank or an error page). With --write, the screenshot also becomes the README's
# docs/images/report.png. Installs Debian's chromium when it is missing (.ci/packages.sh), so it
# never passes for want of a browser. Usage (from anywhere):
#   docs/images/check-report.sh [--write]
set -euo pipefail
cd "$(dirname "$0")/../.."
write=${1:-}
bash .ci/packages.sh chromium
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The test profile: what `cargo test` builds anyway, and several times faster than dev here.
cargo build --quiet --profile test --bin fapm --example gen_pair
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
"$target/debug/examples/gen_pair" --out "$work/pair" --params 10M --shards 2 --seed 1 2>/dev/null
(cd "$work" && "$target/debug/fapm" report --base pair/base --finetuned pair/ft --output report --quiet --json \
    >summary.json)

browser() { # extra chromium arguments...
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$work/chrome" --hide-scrollbars "$@" "file://$work/report/index.html" 2>/dev/null
}
browser --dump-dom >"$work/dom.html"
browser --window-size=1400,2800 --screenshot="$work/report.png" >/dev/null

python3 - "$work" <<'EOF'
import json, re, struct, sys, zlib
from pathlib import Path

work = Path(sys.argv[1])
summary = json.loads((work / "summary.json").read_text())
dom = (work / "dom.html").read_text()
fail = []
charts = re.findall(r'<svg class="chart".*?</svg>', dom, re.S)
heatmaps = re.findall(r'<svg class="heatmap".*?</svg>', dom, re.S)
if len(charts) < 2:
    fail.append(f"{len(charts)} SVG charts in the rendered page")
for c in charts:
    texts = re.findall(r"<text[^>]*>([^<]+)</text>", c)
    legend = {"λ = 0 (magnitude)", "λ = 0.25", "λ = 0.5", "λ = 1 (FAPM)", "λ = 2"}
    if not legend <= set(texts) or len(texts) < 10:
        fail.append(f"a chart without its legend of penalty strengths, title and tick labels as text: {texts[:4]}")
tradeoff = [c for c in charts if ">Trade-off: energy kept against forgetting</text>" in c]
if len(tradeoff) != 1 or len(re.findall(r"<circle[^>]*><title>[^<]*--penalty", tradeoff[0])) != 25:
    fail.append("no trade-off chart with a point for each of 5 strengths x 5 sparsities")
elif not re.search(r'class="mark"', tradeoff[0]) or "points are Pareto-optimal" not in dom:
    fail.append("no Pareto point ringed in the trade-off chart, or no sentence naming them")
if re.search(r">NaN<|\bNaN\b", dom):
    fail.append("the page shows NaN")
report = json.loads((work / "report" / "report.json").read_text())
if report.get("fapm_report") != 1 or len(report.get("points", [])) != 25:
    fail.append("report.json is not the documented layout")
pngs = len(summary["files"]) - 2
if len(heatmaps) != pngs or pngs == 0:
    fail.append(f"{len(heatmaps)} heatmaps in the page, {pngs} PNG files written")
for href in re.findall(r'<image href="([^"]+)"', dom):
    if not (work / "report" / href).is_file():
        fail.append(f"the page shows {href}, which was not written")


def pixels(path):
    """An 8-bit RGB or RGBA PNG, decoded: (width, height, channels, rows of bytes)."""
    data = path.read_bytes()
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            ch = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride, rows, prev = zlib.decompress(idat), width * ch, [], bytearray(width * ch)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - ch] if i >= ch else 0
            b, c = prev[i], prev[i - ch] if i >= ch else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    return width, height, ch, rows


w, h, ch, rows = pixels(work / "report.png")
white = dark = colour = total = 0
for line in rows[::4]:
    for x in range(0, w * ch, 4 * ch):
        r, g, b = line[x], line[x + 1], line[x + 2]
        total += 1
        white += min(r, g, b) > 235
        dark += max(r, g, b) < 90
        colour += max(r, g, b) - min(r, g, b) > 80
shares = {k: v / total for k, v in {"white": white, "dark": dark, "colour": colour}.items()}
if not (shares["white"] > 0.3 and shares["dark"] > 0.003 and shares["colour"] > 0.05):
    fail.append(f"the screenshot does not look like the report: {shares}")
print(
    f"rendered: {len(charts)} SVG charts, {len(heatmaps)} heatmaps; screenshot {w}x{h}, "
    + ", ".join(f"{k} {v:.1%}" for k, v in shares.items())
)
if fail:
    print("\n".join("FAIL: " + f for f in fail), file=sys.stderr)
    sys.exit(1)
EOF
if [[ $write == --write ]]; then
    cp "$work/report.png" docs/images/report.png
    echo "wrote docs/images/report.png"
fi
