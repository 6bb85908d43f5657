"""patch_ and patched: in place, bit for bit what `fapm apply` writes, all or nothing."""

import numpy as np
import pytest
import torch

import fapm
from conftest import PAIRS, VARIANTS, assert_same, copy_dict, module_from, raw, read_np, read_pt


def check_patched(target: dict, c, base: dict):
    """`target` holds apply's output for every tensor of the delta, the base elsewhere."""
    want = read_pt(c.applied) if isinstance(next(iter(base.values())), torch.Tensor) else read_np(c.applied)
    for name, w in want.items():
        assert_same(target[name], w, name)
    for name in set(base) - set(want):
        assert_same(target[name], base[name], name)


def check_untouched(target: dict, base: dict):
    assert sorted(target) == sorted(base)
    for name in base:
        assert_same(target[name], base[name], name)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("framework", ["np", "pt"])
def test_patch_dict(cases, pair, variant, framework):
    c = cases(pair, variant)
    base = read_pt(c.base) if framework == "pt" else read_np(c.base)
    target = copy_dict(base)
    same_dtype = {k: v for k, v in target.items()}
    assert fapm.patch_(target, c.delta) is target
    check_patched(target, c, base)
    # Pruned tensors of an unchanged dtype were patched where they are.
    for t in fapm.inspect(c.delta)["tensors"]:
        if t["mode"] != "whole" and t["base_dtype"] == t["dtype"] and t["base_shape"] is None:
            assert target[t["name"]] is same_dtype[t["name"]]


def test_patch_torch_module_with_prefix_and_rename(cases):
    c = cases("sharded")
    base = read_pt(c.base)
    want = read_pt(c.applied)
    # Names without the "model." prefix, as in a transformers model's inner module.
    model = module_from(base, prefix="model")
    model.base_model_prefix = "model"
    with pytest.raises(fapm.FapmError, match="classifier.weight.*stored whole in the delta but not in the model"):
        fapm.patch_(model, c.delta)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    check_untouched(model.state_dict(), before)
    params = dict(model.named_parameters())
    fapm.patch_(model, c.delta, rename={"classifier.weight": None})
    sd = model.state_dict()
    for name, w in want.items():
        if name == "classifier.weight":
            continue
        key = name[len("model.") :] if name.startswith("model.") else name
        assert_same(sd[key], w, name)
    # Parameters stay the same objects (optimizers and tied weights keep working).
    assert all(p is dict(model.named_parameters())[k] for k, p in params.items())
    assert_same(sd["lm_head.weight"], base["lm_head.weight"])  # base-only: untouched


def test_patch_module_with_rename_function(cases):
    c = cases("single")
    base = read_pt(c.base)
    want = read_pt(c.applied)
    model = module_from({"net." + k: v for k, v in base.items()})
    model.register_parameter("score_head", torch.nn.Parameter(torch.zeros(4, 64, dtype=torch.bfloat16)))
    # An extended tensor (16 positions added): patched from its base, given a new, larger buffer.
    model.register_parameter("pos", torch.nn.Parameter(base["model.embed_positions.weight"].clone()))
    special = {"score.weight": "score_head", "model.embed_positions.weight": "pos"}
    fapm.patch_(model, c.delta, rename=lambda n: special.get(n, "net." + n))
    sd = model.state_dict()
    assert_same(sd["score_head"], want["score.weight"])
    assert_same(sd["pos"], want["model.embed_positions.weight"])  # grew: replaced
    for name in want:
        if name not in special:
            assert_same(sd["net." + name], want[name], name)


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_patched_restores_the_base(cases, framework):
    c = cases("sharded", "s0.5-dense")
    base = read_pt(c.base) if framework == "pt" else read_np(c.base)
    target = copy_dict(base)
    with fapm.patched(target, c.delta) as t:
        assert t is target
        check_patched(target, c, base)
    check_untouched(target, base)
    # Also when the block raises.
    with pytest.raises(RuntimeError, match="inside"):
        with fapm.patched(target, c.delta):
            check_patched(target, c, base)
            raise RuntimeError("inside")
    check_untouched(target, base)


def test_patched_module_swaps(cases):
    """One base serves two fine-tunes in turn."""
    a, b = cases("single", "s0.9"), cases("single", "s0.5-dense")
    base = read_pt(a.base)
    model = module_from(base)
    keep = {"score.weight": None}
    for c in (a, b, a):
        with fapm.patched(model, c.delta, rename=keep):
            want = read_pt(c.applied)
            sd = model.state_dict()
            for name in want:
                if name != "score.weight":
                    assert_same(sd[name], want[name], name)
        check_untouched(model.state_dict(), base)


@pytest.mark.parametrize("check_base", [True, False])
def test_wrong_base_raises_and_leaves_target_untouched(cases, check_base):
    c = cases("sharded")
    base = read_np(c.base)
    # Break the last pruned tensor, so that others would be patched before it.
    name = "model.layers.1.mlp.fc1.weight"
    base[name].reshape(-1)[5] = np.float16(7.0)
    target = copy_dict(base)
    with pytest.raises(fapm.FapmError) as e:
        fapm.patch_(target, c.delta, check_base=check_base)
    assert name in str(e.value)
    if check_base:
        assert "base tensor differs from the one the delta was made from" in str(e.value)
    else:
        assert "reconstructed tensor does not match its recorded hash" in str(e.value)
    check_untouched(target, base)


def test_shape_or_dtype_mismatch_is_refused_before_writing(cases):
    c = cases("single")
    base = read_np(c.base)
    target = copy_dict(base)
    target["model.norm.weight"] = target["model.norm.weight"].astype(np.float32)
    snapshot = copy_dict(target)
    with pytest.raises(fapm.FapmError, match="'model.norm.weight': is F32 \\[64\\], but the delta was made against BF16"):
        fapm.patch_(target, c.delta)
    check_untouched(target, snapshot)
    del target["model.norm.weight"]
    with pytest.raises(fapm.FapmError, match="'model.norm.weight': not in the target"):
        fapm.patch_(target, c.delta)


def test_patch_refuses_non_contiguous_and_read_only(cases):
    c = cases("single")
    base = read_np(c.base)
    target = copy_dict(base)
    target["model.norm.weight"].setflags(write=False)
    with pytest.raises(fapm.FapmError, match="model.norm.weight.*read-only"):
        fapm.patch_(target, c.delta, check_base=False)
    check_untouched(target, base)
    t = read_pt(c.base)
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].t().contiguous().t()
    with pytest.raises(fapm.FapmError, match="up_proj.weight.*not contiguous"):
        fapm.patch_(t, c.delta, check_base=False)
    assert raw(t["model.norm.weight"]) == raw(read_pt(c.base)["model.norm.weight"])
