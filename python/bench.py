"""Time and memory of the Python package against `fapm apply` (a benchmark, not a test).

    cargo build --release && cargo run --release --example gen_pair -- --out bench-data/pair-850M ...
    python3 python/bench.py --base bench-data/pair-850M/base --finetuned bench-data/pair-850M/ft \\
        --fapm target/release/fapm [--runs 3]

Prunes the pair at 90% sparsity with the binary (once), then measures, each in a fresh Python
process: `load_file` (framework "pt"), `patch_` of the base loaded as a dict of torch tensors,
one `patched` swap (enter and exit), and `fapm apply` into a new directory; and, as the
yardstick (issue 21: load_file and patch_ within 1.5x of it), safetensors' eager load of the
fine-tuned model (`backend="pread"` where the installed safetensors has it) and that load plus
a copy of every tensor. The ratio column is each row's time over the eager load's. Memory is the peak
of anonymous memory (RssAnon, sampled every 2 ms) above what the process held before the call:
the model a call returns or patches is counted only when the call allocates it. Prints a
Markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
peak = [0]
stop = False
def sample():
    while not stop:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
import fapm, torch
from safetensors.torch import load_file
what, base, delta = sys.argv[1:4]
if what in ("patch", "swap"):
    model = load_file(base + "/model-00001-of-00004.safetensors")
    for f in sorted(__import__("glob").glob(base + "/*.safetensors"))[1:]:
        model.update(load_file(f))
    # safetensors maps the file: copy into anonymous memory, as a model loaded for use is,
    # so that writing into it is not counted as copy-on-write of the mapping.
    model = {k: v.clone() for k, v in model.items()}
before = anon()
peak[0] = before
threading.Thread(target=sample, daemon=True).start()
out = {}
t = time.perf_counter()
if what == "load":
    tensors = fapm.load_file(delta, base, framework="pt")
elif what in ("st", "st_copy"):
    import glob, inspect
    eager = {"backend": "pread"} if "backend" in inspect.signature(load_file).parameters else {}
    tensors = {}
    for f in sorted(glob.glob(delta + "/*.safetensors")):
        tensors.update(load_file(f, **eager))
    if what == "st_copy":
        tensors = {k: v.clone() for k, v in tensors.items()}
elif what == "patch":
    fapm.patch_(model, delta)
elif what == "swap":
    cm = fapm.patched(model, delta)
    cm.__enter__()
    out["enter"] = time.perf_counter() - t
    t2 = time.perf_counter()
    cm.__exit__(None, None, None)
    out["exit"] = time.perf_counter() - t2
out["seconds"] = time.perf_counter() - t
stop = True
time.sleep(0.01)
out["peak_extra"] = max(peak[0], anon()) - before
print(json.dumps(out))
"""


def child(what: str, base: Path, delta: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, what, str(base), str(delta)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def apply_cli(fapm_bin: Path, base: Path, delta: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    p = subprocess.run(
        [str(fapm_bin), "apply", "--base", str(base), "--delta", str(delta), "--output", str(out), "--json", "--quiet"],
        capture_output=True, text=True, check=True,
    )
    seconds = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "peak_extra": json.loads(p.stdout)["peak_memory_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--finetuned", type=Path, required=True)
    ap.add_argument("--fapm", type=Path, required=True, help="a release build of the fapm binary")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fapm-py-bench")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    delta = a.work / "ft-s0.9.fapm"
    if not delta.exists():
        subprocess.run([str(a.fapm), "prune", "--base", str(a.base), "--finetuned", str(a.finetuned),
                        "--output", str(delta), "--quiet"], check=True)
    ft = str(a.finetuned)
    rows = {
        "safetensors `load_file` of the fine-tune (eager)": lambda: child("st", a.base, Path(ft)),
        "safetensors `load_file` of the fine-tune + a copy of each tensor": lambda: child("st_copy", a.base, Path(ft)),
        "`fapm.load_file` (framework \"pt\")": lambda: child("load", a.base, delta),
        "`fapm.patch_` of a loaded dict of tensors": lambda: child("patch", a.base, delta),
        "`fapm.patched` swap (enter + exit)": lambda: child("swap", a.base, delta),
        "`fapm apply` into a new directory": lambda: apply_cli(a.fapm, a.base, delta, a.work / "applied"),
    }
    print(f"delta {delta.stat().st_size / 1e6:.1f} MB; medians of {a.runs}; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores")
    print("| operation | time | vs safetensors eager | peak memory above the process before it |")
    print("|---|---:|---:|---:|")
    eager = None
    for label, f in rows.items():
        runs = [f() for _ in range(a.runs)]
        secs = statistics.median(r["seconds"] for r in runs)
        eager = eager or secs
        mem = statistics.median(r["peak_extra"] for r in runs)
        extra = ""
        if "enter" in runs[0]:
            extra = (f" (enter {statistics.median(r['enter'] for r in runs):.2f} s, "
                     f"exit {statistics.median(r['exit'] for r in runs):.2f} s)")
        print(f"| {label} | {secs:.2f} s{extra} | {secs / eager:.2f}x | {mem / 1e6:.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
