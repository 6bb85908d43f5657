"""fapm.sweep: each point pruned as `fapm prune` prunes it, evaluated on the patched model, the
base restored bit for bit (after the sweep, after an exception in evaluate, after Ctrl-C), and
the page it writes. The real-pair test (a sentence-transformers model from PyPI and a
fine-tune of it) is in test_sweep_real.py."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import PAIRS, read_pt, run

import fapm
from fapm.sweep import DEFAULT_PENALTIES, DEFAULT_SPARSITIES, pareto

BASE, FT = PAIRS["single"]


def loaded_base() -> dict:
    return {k: v.clone() for k, v in read_pt(BASE).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k].view(torch.uint8) if a[k].dtype
        .is_floating_point else a[k], b[k].view(torch.uint8) if b[k].dtype.is_floating_point else b[k])
        for k in a
    )


FINETUNED = read_pt(FT)


def distance(model: dict) -> dict:
    """An evaluation of a dict of tensors: how far it is from the fine-tune and from the base,
    and how many of its elements equal the fine-tune's."""
    base = read_pt(BASE)
    to_ft = sum(float((model[k].float() - FINETUNED[k].float()).norm()) for k in FINETUNED if k in model
                and model[k].is_floating_point())
    to_base = sum(float((model[k].float() - base[k].float()).norm()) for k in base
                  if k in model and base[k].is_floating_point() and model[k].shape == base[k].shape)
    return {"to_finetuned": to_ft, "to_base": to_base}


def test_each_point_is_what_fapm_prune_and_apply_give(fapm_bin, tmp_path):
    model = loaded_base()
    before = loaded_base()
    rows = fapm.sweep(model, BASE, FT, distance, sparsities=["0.5", 0.9], penalties=["0", "1"],
                      deltas=tmp_path / "deltas", html=tmp_path / "sweep.html")
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    assert [(r["sparsity"], r["penalty"]) for r in rows] == [("0.5", "0"), ("0.5", "1"), ("0.9", "0"), ("0.9", "1")]
    assert same(model, before), "the base is the base again, bit for bit"
    for r in rows:
        # The delta the sweep measured is the one `fapm prune` writes with the same flags.
        mine = tmp_path / "deltas" / f"s{r['sparsity']}-p{r['penalty']}.fapm"
        cli = tmp_path / "cli.fapm"
        run(fapm_bin, "prune", "--base", BASE, "--finetuned", FT, "--output", cli, "--sparsity", r["sparsity"],
            "--penalty", r["penalty"], "--overwrite", "--quiet")
        assert mine.read_bytes() == cli.read_bytes()
        assert r["delta_bytes"] == cli.stat().st_size
        out = tmp_path / "out.safetensors"
        run(fapm_bin, "apply", "--base", BASE, "--delta", cli, "--output", out, "--overwrite", "--quiet")
        want = distance(read_pt(out))
        assert (r["to_finetuned"], r["to_base"]) == (want["to_finetuned"], want["to_base"])
        assert r["command"] == (f"fapm prune --base {BASE} --finetuned {FT} --output DELTA.fapm "
                                f"--sparsity {r['sparsity']} --penalty {r['penalty']}")
        assert r["kept"] > 0 and r["metric"] == "fapm"
    # More kept: closer to the fine-tune.
    assert rows[0]["to_finetuned"] < rows[2]["to_finetuned"]
    page = (tmp_path / "sweep.html").read_text()
    assert page.count('<svg class="chart"') == 2, "one chart per metric"
    assert page.count("<tr>") == 1 + len(rows)
    assert str(tmp_path) not in page and "single/base.safetensors" in page, "checkpoints named, not located"


def test_defaults_are_a_handful_around_the_paper():
    assert "0.9" in DEFAULT_SPARSITIES and "1" in DEFAULT_PENALTIES
    assert 8 <= len(DEFAULT_SPARSITIES) * len(DEFAULT_PENALTIES) <= 25
    assert min(map(float, DEFAULT_SPARSITIES)) >= 0.5 and max(map(float, DEFAULT_SPARSITIES)) <= 0.99
    assert min(map(float, DEFAULT_PENALTIES)) == 0 and max(map(float, DEFAULT_PENALTIES)) <= 2


def test_magnitude_measures_one_point_per_sparsity(tmp_path):
    model = loaded_base()
    rows = fapm.sweep(model, BASE, FT, distance, sparsities=["0.9", "0.99"], metric="magnitude")
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    assert [(r["sparsity"], r["penalty"], r["metric"]) for r in rows] == [("0.9", None, "magnitude"),
                                                                         ("0.99", None, "magnitude")]
    assert "--metric magnitude" in rows[0]["command"] and "--penalty" not in rows[0]["command"]


def test_an_exception_in_evaluate_restores_the_base_and_keeps_the_points(tmp_path):
    model = loaded_base()
    before = loaded_base()
    calls = []

    def evaluate(m):
        calls.append(1)
        # Inside a point the model is patched: it is not the base.
        assert not same(m, before)
        if len(calls) == 3:
            raise ValueError("the evaluation broke")
        return {"n": float(len(calls))}

    with pytest.raises(ValueError, match="the evaluation broke") as e:
        fapm.sweep(model, BASE, FT, evaluate, sparsities=["0.5", "0.9"], penalties=["0", "1"],
                   html=tmp_path / "partial.html")
    assert same(model, before), "the base is restored after the exception"
    partial = e.value.fapm_sweep
    partial = partial.to_dict("records") if hasattr(partial, "to_dict") else partial
    assert [r["n"] for r in partial] == [1.0, 2.0]
    assert (tmp_path / "partial.html").exists()


def test_ctrl_c_returns_the_points_measured_so_far(tmp_path):
    model = loaded_base()
    before = loaded_base()
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"n": 1.0}

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rows = fapm.sweep(model, BASE, FT, evaluate, sparsities=["0.5", "0.9"], penalties=["1"])
    assert len(rows) == 1
    assert any("interrupted" in str(x.message) for x in w)
    assert same(model, before)


def test_bad_evaluations_and_settings_are_refused_with_the_base_restored():
    model = loaded_base()
    before = loaded_base()
    with pytest.raises(TypeError, match="dict of str to float"):
        fapm.sweep(model, BASE, FT, lambda m: 0.5, sparsities=["0.9"], penalties=["1"])
    with pytest.raises(TypeError, match="not a number"):
        fapm.sweep(model, BASE, FT, lambda m: {"x": "high"}, sparsities=["0.9"], penalties=["1"])
    with pytest.raises(fapm.FapmError, match="sparsity"):
        fapm.sweep(model, BASE, FT, distance, sparsities=["1.5"], penalties=["1"])
    with pytest.raises(ValueError, match="no point"):
        fapm.sweep(model, BASE, FT, distance, sparsities=[], penalties=["1"])
    assert same(model, before)


def test_pareto_marks_match_a_brute_force():
    rows = [
        {"delta_bytes": 100, "m": 0.9},
        {"delta_bytes": 50, "m": 0.9},   # beats the first: same metric, smaller
        {"delta_bytes": 10, "m": 0.2},
        {"delta_bytes": 10, "m": 0.1},   # beaten by the third
        {"delta_bytes": 200, "m": 0.95},
        {"delta_bytes": 70, "m": math.nan},
    ]
    assert pareto(rows, "m") == [False, True, True, False, True, False]
    # Lower is better: the smallest delta with the lowest value wins.
    assert pareto(rows, "m", higher_is_better=False) == [False, False, False, True, False, False]


def test_the_page_rings_the_pareto_points_and_gives_every_command(tmp_path):
    rows = [
        {"sparsity": s, "penalty": p, "metric": "fapm", "delta_bytes": b, "kept": 1, "acc": a,
         "command": "fapm prune ..."}
        for s, p, b, a in [("0.5", "0", 1000, 0.9), ("0.9", "0", 200, 0.8), ("0.5", "1", 1000, 0.85),
                           ("0.9", "1", 200, 0.82)]
    ]
    from fapm.sweep import write_html

    write_html(tmp_path / "p.html", rows, "/abs/models/base", "/abs/models/ft", higher_is_better=True)
    page = (tmp_path / "p.html").read_text()
    assert page.count('class="mark"') == 2, "(1000 B, 0.9) and (200 B, 0.82)"
    assert "λ = 0" in page and "λ = 1" in page
    assert len(re.findall(r"fapm prune --base base --finetuned ft --output DELTA.fapm --sparsity 0\.[59] "
                          r"--penalty [01]", page)) == 4
    assert "/abs/" not in page


EVAL_SCRIPT = """
import json, sys
import safetensors
def read(path):
    with safetensors.safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
model, ft = read(sys.argv[-1]), read(sys.argv[1])
to_ft = sum(float((model[k].float() - ft[k].float()).norm()) for k in ft if k in model
            and model[k].is_floating_point())
print(json.dumps({"to_finetuned": to_ft}))
"""


def test_the_command_form_applies_each_point_and_reads_the_commands_json(tmp_path):
    script = tmp_path / "evaluate.py"
    script.write_text(EVAL_SCRIPT)
    import sys

    from fapm.sweep import main, sweep_command

    points = dict(sparsities=["0.5", "0.9"], penalties=["0", "1"])
    rows = sweep_command(BASE, FT, [sys.executable, str(script), str(FT)], **points)
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    in_memory = fapm.sweep(loaded_base(), BASE, FT, distance, **points)
    in_memory = in_memory.to_dict("records") if hasattr(in_memory, "to_dict") else in_memory
    assert [r["to_finetuned"] for r in rows] == [r["to_finetuned"] for r in in_memory]
    assert [r["delta_bytes"] for r in rows] == [r["delta_bytes"] for r in in_memory]
    # A command that fails stops the sweep with the points measured so far.
    import subprocess

    with pytest.raises(subprocess.CalledProcessError) as e:
        sweep_command(BASE, FT, [sys.executable, "-c", "import sys; sys.exit(3)"], **points)
    assert len(e.value.fapm_sweep) == 0
    # python -m fapm.sweep prints a JSON object per point.
    out = subprocess.run([sys.executable, "-m", "fapm.sweep", "--base", str(BASE), "--finetuned", str(FT),
                          "--eval", f"{sys.executable} {script} {FT}", "--sparsities", "0.9", "--penalties", "1",
                          "--html", str(tmp_path / "cli.html")], capture_output=True, text=True, check=True)
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and lines[0]["to_finetuned"] == in_memory[3]["to_finetuned"]
    assert (tmp_path / "cli.html").exists()
    assert main is not None
