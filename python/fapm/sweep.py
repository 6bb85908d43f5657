"""``fapm.sweep``: choose a sparsity and a penalty strength on your own evaluation.

Weight-space measures (``fapm report``) can only rank candidates; what decides is how much of
the task the pruned model keeps and how much general skill it loses, at what delta size, on the
user's own evaluation. ``sweep`` prunes each candidate point with the same Rust code as
``fapm prune``, patches the loaded base model in place with ``patched`` (no model is written to
disk), calls ``evaluate(model)`` and puts the base back, so a loaded model serves every point.
"""

from __future__ import annotations

import html as _html
import math
import os
import shlex
import sys
import tempfile
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._fapm import prune as _prune

PathLike = Union[str, "os.PathLike[str]"]

#: The sparsities tried by default: around the paper's 90%, from light to extreme pruning.
DEFAULT_SPARSITIES: Tuple[str, ...] = ("0.5", "0.75", "0.9", "0.99")

#: The penalty strengths tried by default: magnitude (0), half the paper's, the paper's (1),
#: twice the paper's.
DEFAULT_PENALTIES: Tuple[str, ...] = ("0", "0.5", "1", "2")


def _decimal(v: Union[str, float, int]) -> str:
    """A sparsity or penalty as the decimal string the command line takes (``0.9`` -> ``"0.9"``)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"fapm.sweep: expected a number or a decimal string, got {v!r}")
    return repr(v) if isinstance(v, float) else str(v)


def _name(path: PathLike) -> str:
    """How the page names a checkpoint (never an absolute path: a page is shared): a Hugging
    Face cache snapshot as ``org/name``, a directory by its name, a file by its directory and
    its own name; as ``fapm report`` does."""
    parts = [p for p in os.fspath(path).split(os.sep) if p not in ("", ".", "..")]
    for p in reversed(parts):
        if p.startswith("models--"):
            return p[len("models--"):].replace("--", "/", 1)
    if not parts:
        return "."
    if len(parts) >= 2 and parts[-1].endswith(".safetensors"):
        return parts[-2] + "/" + parts[-1]
    return parts[-1]


def _command(base: str, finetuned: str, sparsity: str, penalty: Optional[str], metric: str, threshold: str) -> str:
    args = ["fapm", "prune", "--base", base, "--finetuned", finetuned, "--output", "DELTA.fapm",
            "--sparsity", sparsity]
    if metric != "fapm":
        args += ["--metric", metric]
    elif penalty is not None:
        args += ["--penalty", penalty]
    if threshold != "exact":
        args += ["--threshold", threshold]
    return " ".join(shlex.quote(a) for a in args)


def _metrics(out: Any) -> Dict[str, float]:
    if not isinstance(out, Mapping):
        raise TypeError(f"fapm.sweep: evaluate(model) must return a dict of str to float, got {type(out).__name__}")
    metrics = {}
    for k, v in out.items():
        if not isinstance(k, str):
            raise TypeError(f"fapm.sweep: evaluate(model) returned a non-string key {k!r}")
        try:
            metrics[k] = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"fapm.sweep: evaluate(model)[{k!r}] is not a number: {v!r}") from None
    return metrics


def _prefix_rename(model, delta: str):
    """For a ``torch.nn.Module`` that holds the checkpoint's tensors under one prefix (a
    sentence-transformers model keeps its transformer's under ``0.auto_model.`` or ``0.model.``),
    the ``rename`` that adds it; None when names resolve as they are (or for a dict)."""
    state = getattr(model, "state_dict", None)
    if state is None or isinstance(model, Mapping):
        return None
    from ._fapm import inspect as _inspect

    keys = set(state().keys())
    names = [t["name"] for t in _inspect(delta)["tensors"]]
    prefix = getattr(model, "base_model_prefix", "")
    if not names or any(n in keys or (prefix and (f"{prefix}.{n}" in keys or n.split(".", 1)[-1] in keys))
                        for n in names):
        return None
    for n in names:
        found = {k[: -len(n)] for k in keys if k.endswith("." + n)}
        if len(found) == 1:
            (p,) = found
            if all(p + m in keys for m in names if any(k.endswith("." + m) for k in keys)):
                return lambda name: p + name
            return None
    return None


def _table(rows: List[Dict[str, Any]]):
    try:
        import pandas
    except ImportError:
        return rows
    return pandas.DataFrame(rows)


def sweep(
    model,
    base: PathLike,
    finetuned: PathLike,
    evaluate: Callable[[Any], Mapping[str, float]],
    *,
    sparsities: Sequence[Union[str, float]] = DEFAULT_SPARSITIES,
    penalties: Sequence[Union[str, float]] = DEFAULT_PENALTIES,
    metric: str = "fapm",
    threshold: str = "exact",
    html: Optional[PathLike] = None,
    higher_is_better: Union[bool, Mapping[str, bool]] = True,
    rename=None,
    deltas: Optional[PathLike] = None,
    threads: Optional[int] = None,
    memory_budget: Optional[str] = None,
    verbose: bool = False,
):
    """Prunes ``finetuned`` against ``base`` at every (sparsity, penalty) point, patches
    ``model`` (the base, loaded: a ``torch.nn.Module`` or a dict of arrays / tensors) in place
    with each point's delta, calls ``evaluate(model)`` (a dict of metric name to number) and
    puts the base back: ``model`` is bit for bit the base again after every point, when the
    sweep ends, and when it fails (``patched`` restores it, also when ``evaluate`` raises).

    Each point is pruned by the same Rust code as ``fapm prune --sparsity S --penalty L
    --metric M --threshold T`` (``penalties`` are ignored, and one point per sparsity is
    measured, with ``metric="magnitude"``); its delta is written to a temporary directory (to
    ``deltas``, named ``s{S}-p{L}.fapm``, when given) and nothing else is written but ``html``.
    ``rename``, ``threads`` and ``memory_budget`` are ``patched``'s. Without ``rename``, a
    ``torch.nn.Module`` that holds every checkpoint tensor under one prefix (a
    sentence-transformers model: ``0.auto_model.`` or ``0.model.``) is patched under it, so
    ``sweep(SentenceTransformer(base), base, finetuned, evaluate)`` works as it is.

    Returns one row per point, in the order measured (sparsity-major): ``sparsity`` and
    ``penalty`` (the decimal strings the command line takes; penalty ``None`` for magnitude),
    ``metric``, ``delta_bytes`` (the delta file's size), ``kept`` (positions kept), every metric
    ``evaluate`` returned, and ``command`` (the ``fapm prune`` command line of the point). The
    rows are a pandas ``DataFrame`` when pandas can be imported, else a list of dicts.

    ``html=PATH`` writes a page in the style of ``fapm report``: each metric against the delta's
    size, one curve per penalty strength, the Pareto points ringed (no other point is at least
    as good on the metric with a delta no larger, and better on one; ``higher_is_better`` says
    which way each metric goes, for all or per name), and every point's command.

    Interrupting (Ctrl-C, ``KeyboardInterrupt``) stops after restoring the base and **returns
    the points measured so far** (with a ``RuntimeWarning``), and writes ``html`` from them. Any
    other exception, from ``evaluate`` or from pruning, propagates once the base is restored,
    with the points measured so far attached to it as ``exc.fapm_sweep``.
    """
    from . import patched  # the package's own, imported here to avoid an import cycle

    state = {"rename": rename}

    def measure(delta: str, first: bool) -> Dict[str, float]:
        if state["rename"] is None and first:
            state["rename"] = _prefix_rename(model, delta)
        with patched(model, delta, rename=state["rename"], threads=threads, memory_budget=memory_budget):
            return _metrics(evaluate(model))

    return _sweep(measure, base, finetuned, sparsities, penalties, metric, threshold, html, higher_is_better,
                  deltas, threads, memory_budget, verbose)


def _sweep(measure, base, finetuned, sparsities, penalties, metric, threshold, html, higher_is_better, deltas,
           threads, memory_budget, verbose):
    """The loop ``sweep`` and ``sweep_command`` share: prune each point, ``measure(delta,
    first)`` it, collect the rows; the interruption and failure rules of ``sweep``."""
    sps = [_decimal(s) for s in sparsities]
    pens: List[Optional[str]] = [_decimal(p) for p in penalties] if metric == "fapm" else [None]
    if not sps or not pens:
        raise ValueError("fapm.sweep: no point to measure (empty sparsities or penalties)")
    base_s, ft_s = os.fspath(base), os.fspath(finetuned)
    rows: List[Dict[str, Any]] = []
    points = [(s, p) for s in sps for p in pens]
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="fapm-sweep-") as tmp:
        out_dir = os.fspath(deltas) if deltas is not None else tmp
        if deltas is not None:
            os.makedirs(out_dir, exist_ok=True)
        try:
            for i, (s, p) in enumerate(points):
                path = os.path.join(out_dir, f"s{s}-p{p if p is not None else 'magnitude'}.fapm")
                kw: Dict[str, Any] = dict(sparsity=s, metric=metric, threshold=threshold, overwrite=True,
                                          threads=threads, memory_budget=memory_budget)
                if p is not None:
                    kw["penalty"] = p
                summary = _prune(base_s, ft_s, path, **kw)
                metrics = measure(path, i == 0)
                row: Dict[str, Any] = {
                    "sparsity": s,
                    "penalty": p,
                    "metric": metric,
                    "delta_bytes": int(summary["delta_bytes"]),
                    "kept": int(summary["kept"]),
                }
                for k, v in metrics.items():
                    row[k if k not in row else f"metric:{k}"] = v
                row["command"] = _command(base_s, ft_s, s, p, metric, threshold)
                rows.append(row)
                if deltas is None:
                    os.unlink(path)
                if verbose:
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                    print(f"fapm.sweep: {i + 1}/{len(points)} sparsity {s} penalty {p}: "
                          f"{row['delta_bytes']} bytes; {shown}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            interrupted = True
        except BaseException as e:
            try:
                e.fapm_sweep = _table(rows)  # type: ignore[attr-defined]
            except Exception:
                pass
            if html is not None and rows:
                write_html(html, rows, base_s, ft_s, higher_is_better)
            raise
    if interrupted:
        warnings.warn(f"fapm.sweep interrupted: returning the {len(rows)} of {len(points)} points measured",
                      RuntimeWarning, stacklevel=3)
    if html is not None:
        write_html(html, rows, base_s, ft_s, higher_is_better)
    return _table(rows)


def sweep_command(
    base: PathLike,
    finetuned: PathLike,
    command: Union[str, Sequence[str]],
    *,
    sparsities: Sequence[Union[str, float]] = DEFAULT_SPARSITIES,
    penalties: Sequence[Union[str, float]] = DEFAULT_PENALTIES,
    metric: str = "fapm",
    threshold: str = "exact",
    html: Optional[PathLike] = None,
    higher_is_better: Union[bool, Mapping[str, bool]] = True,
    deltas: Optional[PathLike] = None,
    threads: Optional[int] = None,
    memory_budget: Optional[str] = None,
    verbose: bool = False,
):
    """``sweep`` for an evaluation outside Python: each point's delta is applied (``fapm
    apply``) into a temporary model directory (a file for a single-file checkpoint), and
    ``command`` runs with that path as its last argument and must print one JSON object of
    metric name to number on stdout. ``command`` is a list of arguments, or a string split as
    a shell would (``shlex``), never run by a shell. A command that fails raises
    ``subprocess.CalledProcessError`` with the points measured so far as ``exc.fapm_sweep``.
    The same loop, table, page and rules as ``sweep``; also ``python -m fapm.sweep``."""
    import json
    import subprocess

    from ._fapm import apply as _apply

    args = shlex.split(command) if isinstance(command, str) else list(command)
    ft_is_file = os.path.isfile(os.fspath(finetuned))

    def measure(delta: str, first: bool) -> Dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="fapm-sweep-model-") as tmp:
            out = os.path.join(tmp, "model.safetensors" if ft_is_file else "model")
            _apply(os.fspath(base), delta, out, threads=threads, memory_budget=memory_budget)
            done = subprocess.run(args + [out], stdout=subprocess.PIPE, check=True, text=True)
        try:
            return _metrics(json.loads(done.stdout))
        except json.JSONDecodeError as e:
            raise ValueError(f"fapm.sweep: the evaluation command printed no JSON object: {e}") from None

    return _sweep(measure, base, finetuned, sparsities, penalties, metric, threshold, html, higher_is_better,
                  deltas, threads, memory_budget, verbose)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fapm.sweep``: ``sweep_command`` from the command line; prints the table as
    one JSON object per line."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m fapm.sweep", description=sweep_command.__doc__)
    ap.add_argument("--base", required=True)
    ap.add_argument("--finetuned", required=True)
    ap.add_argument("--eval", required=True, metavar="CMD",
                    help="run as CMD MODEL_PATH for each point; prints a JSON object of metrics")
    ap.add_argument("--sparsities", default=",".join(DEFAULT_SPARSITIES))
    ap.add_argument("--penalties", default=",".join(DEFAULT_PENALTIES))
    ap.add_argument("--metric", default="fapm")
    ap.add_argument("--threshold", default="exact")
    ap.add_argument("--html")
    ap.add_argument("--deltas")
    a = ap.parse_args(argv)
    rows = sweep_command(a.base, a.finetuned, a.eval, sparsities=a.sparsities.split(","),
                         penalties=a.penalties.split(","), metric=a.metric, threshold=a.threshold, html=a.html,
                         deltas=a.deltas, verbose=True)
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    for r in rows:
        print(json.dumps(r))
    return 0



_SETTINGS = ("sparsity", "penalty", "metric", "delta_bytes", "kept", "command")


def metric_names(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """The metrics ``evaluate`` returned, in first-seen order."""
    names: List[str] = []
    for r in rows:
        for k in r:
            if k not in _SETTINGS and k not in names:
                names.append(k)
    return names


def pareto(rows: Sequence[Mapping[str, Any]], name: str, higher_is_better: bool = True) -> List[bool]:
    """For each row, whether it is Pareto-optimal on metric ``name`` against ``delta_bytes``:
    no other row is at least as good on both (better on the metric in the direction
    ``higher_is_better`` says, smaller delta) and strictly better on one."""
    sign = 1.0 if higher_is_better else -1.0
    vals = [(sign * float(r[name]), int(r["delta_bytes"])) for r in rows]
    out = []
    for v, b in vals:
        if math.isnan(v):
            out.append(False)
            continue
        out.append(not any(v2 >= v and b2 <= b and (v2 > v or b2 < b) for v2, b2 in vals if not math.isnan(v2)))
    return out


# The report's colours of the penalty strengths, magnitude (orange) to the strongest (purple).
_COLORS = ["#e67814", "#96a01e", "#1e9682", "#1f64b4", "#783ca0", "#a03c3c", "#555555"]
_STYLE = ("body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1600px;"
          "padding:0 1.5em;color:#222;line-height:1.45}h1{margin-bottom:.2em}h2{margin-top:2em;"
          "border-bottom:1px solid #ddd;padding-bottom:.2em}code{background:#f3f3f3;padding:0 .25em;"
          "border-radius:3px}.grid{display:flex;flex-wrap:wrap;gap:1.2em}figure{margin:0}figure svg{width:100%;"
          "height:auto;display:block;font-family:system-ui,-apple-system,Segoe UI,sans-serif}"
          "figcaption{font-size:.9em;color:#444;margin-top:.3em}table{border-collapse:collapse;font-size:.85em}"
          "td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}td:last-child{text-align:left;"
          "font-family:monospace}.note{color:#555;font-size:.9em}")


def _size(b: float) -> str:
    if b < 1e4:
        return f"{b:.0f} B"
    if b < 1e6:
        return f"{b / 1e3:.1f} kB"
    if b < 1e9:
        return f"{b / 1e6:.1f} MB"
    return f"{b / 1e9:.2f} GB"


def _ticks(lo: float, hi: float) -> List[float]:
    """1, 2 and 5 times powers of ten between lo and hi (bytes), at most about eight."""
    out: List[float] = []
    for e in range(int(math.floor(math.log10(max(lo, 1.0)))), int(math.ceil(math.log10(max(hi, 1.0)))) + 1):
        out += [m * 10.0 ** e for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    return out[:: max(1, len(out) // 8)]


def _tick(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:g} {unit}"
    return f"{b:g} B"


def _num(v: float) -> str:
    return f"{v:.4g}"


def _chart(rows: Sequence[Mapping[str, Any]], name: str, better_up: bool) -> str:
    """One metric against the delta's size (log x), one line per penalty, Pareto points ringed."""
    w, h = 720.0, 380.0
    left, right, top, bottom = 76.0, w - 16.0, 78.0, h - 48.0
    xs = [float(r["delta_bytes"]) for r in rows]
    ys = [float(r[name]) for r in rows]
    fin = [y for y in ys if math.isfinite(y)]
    x0, x1 = math.log10(max(min(xs), 1.0)), math.log10(max(max(xs), 1.0))
    if x1 - x0 < 0.2:
        x0, x1 = x0 - 0.1, x1 + 0.1
    pad = (x1 - x0) * 0.06
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = (min(fin), max(fin)) if fin else (0.0, 1.0)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    ypad = (y1 - y0) * 0.08
    y0, y1 = y0 - ypad, y1 + ypad

    def px(b: float) -> float:
        return left + (math.log10(max(b, 1.0)) - x0) / (x1 - x0) * (right - left)

    def py(v: float) -> float:
        return bottom - (v - y0) / (y1 - y0) * (bottom - top)

    def text(x, y, s, anchor="start", size=12, color="#222"):
        return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
                f'fill="{color}">{_html.escape(s)}</text>')

    e = _html.escape
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w:.0f} {h:.0f}" '
           f'width="{w:.0f}" height="{h:.0f}" role="img"><title>{e(name)} against delta size</title>']
    out.append(text(16, 24, f"{name} against delta size", size=16))
    out.append(text(16, 44, ("higher" if better_up else "lower") + " is better; ringed: Pareto (no point is better "
                    "with a delta no larger)", size=12, color="#666"))
    # Grid, ticks.
    for i in range(6):
        v = y0 + (y1 - y0) * i / 5
        y = py(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e6e6e6"/>')
        out.append(text(left - 7, y + 4, _num(v), anchor="end", size=11))
    for t in _ticks(10 ** x0, 10 ** x1):
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#222"/>')
        out.append(text(x, bottom + 17, _tick(t), anchor="middle", size=11))
    out.append(f'<polyline points="{left},{top} {left},{bottom} {right},{bottom}" fill="none" stroke="#222"/>')
    out.append(text((left + right) / 2, h - 10, "delta size (log scale; left is smaller)", anchor="middle"))
    out.append(f'<g transform="translate(18 {(top + bottom) / 2:.1f}) rotate(-90)">'
               + text(0, 0, name, anchor="middle") + "</g>")
    marks = pareto(rows, name, better_up)
    pens: List[Any] = []
    for r in rows:
        if r["penalty"] not in pens:
            pens.append(r["penalty"])
    lx = right
    for k, pen in reversed(list(enumerate(pens))):
        label = "magnitude" if pen is None else f"λ = {pen}"
        color = _COLORS[k % len(_COLORS)]
        out.append(text(lx, 64, label, anchor="end"))
        lx -= 7.2 * len(label) + 6
        out.append(f'<line x1="{lx - 18:.1f}" y1="60" x2="{lx:.1f}" y2="60" stroke="{color}" stroke-width="3"/>')
        lx -= 30
    for k, pen in enumerate(pens):
        color = _COLORS[k % len(_COLORS)]
        pts = sorted(((float(r["delta_bytes"]), float(r[name]), i) for i, r in enumerate(rows)
                      if r["penalty"] == pen and math.isfinite(float(r[name]))))
        if len(pts) > 1:
            line = " ".join(f"{px(b):.1f},{py(v):.1f}" for b, v, _ in pts)
            out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2" '
                       'stroke-linejoin="round"/>')
        for b, v, i in pts:
            r = rows[i]
            tip = (f"sparsity {r['sparsity']}, penalty {r['penalty']}: {name} {_num(v)}, delta {_size(b)}"
                   f"{', Pareto' if marks[i] else ''}")
            out.append(f'<circle cx="{px(b):.1f}" cy="{py(v):.1f}" r="3.5" fill="{color}"><title>{e(tip)}</title>'
                       '</circle>')
            if marks[i]:
                out.append(f'<circle class="mark" cx="{px(b):.1f}" cy="{py(v):.1f}" r="7" fill="none" '
                           'stroke="#222" stroke-width="1.5"/>')
    # Each sparsity's points sit close together (the same number kept): one label above them.
    for sp in dict.fromkeys(r["sparsity"] for r in rows):
        near = [(float(r["delta_bytes"]), float(r[name])) for r in rows if r["sparsity"] == sp
                and math.isfinite(float(r[name]))]
        if near:
            b = sum(p[0] for p in near) / len(near)
            top_y = min(py(p[1]) for p in near)
            out.append(text(px(b), max(top_y - 12, top + 8), f"sparsity {sp}", anchor="middle", size=10,
                            color="#666"))
    out.append("</svg>")
    return "".join(out)


def write_html(path: PathLike, rows: Sequence[Mapping[str, Any]], base: str, finetuned: str,
               higher_is_better: Union[bool, Mapping[str, bool]] = True) -> None:
    """Writes the sweep's page: one chart per metric against the delta's size and the table of
    every point with its ``fapm prune`` command (checkpoints named, not located)."""
    bn, fn = _name(base), _name(finetuned)
    named: List[Dict[str, Any]] = []
    for row in rows:
        r = dict(row)
        r["command"] = _command(bn, fn, r["sparsity"], r["penalty"], r["metric"],
                                "approx" if "--threshold approx" in r["command"] else "exact")
        named.append(r)
    rows = named
    names = metric_names(rows)

    def up(n: str) -> bool:
        return higher_is_better if isinstance(higher_is_better, bool) else bool(higher_is_better.get(n, True))

    e = _html.escape
    parts = ["<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
             "<title>fapm sweep</title>\n", f"<style>{_STYLE}</style>\n</head>\n<body>\n",
             "<h1>fapm sweep: your evaluation at each sparsity and penalty</h1>\n",
             f"<p class=\"note\">base <code>{e(bn)}</code><br>fine-tuned <code>{e(fn)}</code></p>\n",
             f"<p>{len(rows)} points, each pruned by <code>fapm prune</code>, patched into the loaded base and "
             "evaluated by your own <code>evaluate(model)</code>. One curve per penalty strength &lambda; "
             "(<code>--penalty</code>; 0 is magnitude pruning, 1 the paper's FAPM) through its sparsities; "
             "x is the delta file's size. A ringed point is Pareto-optimal for that metric: no other point "
             "does better with a delta no larger. Prune the one you choose with the command in the table."
             "</p>\n", "<div class=\"grid\">\n"]
    for n in names:
        parts.append(f"<figure style=\"flex:1 1 560px;max-width:720px\">{_chart(rows, n, up(n))}"
                     f"<figcaption>{e(n)} against the delta's size</figcaption></figure>\n")
    parts.append("</div>\n<h2>Every point</h2>\n<table>\n<tr>")
    head = ["sparsity", "penalty", "delta size"] + names + ["Pareto on", "command"]
    parts.append("".join(f"<th>{e(h)}</th>" for h in head) + "</tr>\n")
    marks = {n: pareto(rows, n, up(n)) for n in names}
    for i, r in enumerate(rows):
        cells = [r["sparsity"], "-" if r["penalty"] is None else r["penalty"], _size(r["delta_bytes"])]
        cells += [_num(float(r[n])) for n in names]
        cells.append(", ".join(n for n in names if marks[n][i]))
        cells.append(r["command"])
        parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>\n")
    parts.append("</table>\n</body>\n</html>\n")
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(parts))
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
