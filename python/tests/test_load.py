"""load_file, safe_open and iter_patches give exactly what `fapm apply` writes."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors
import torch

import fapm
from conftest import PAIRS, VARIANTS, assert_same, read_np, read_pt, run, shards, to_np


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("framework", ["np", "pt"])
def test_load_file_equals_apply(cases, pair, variant, framework):
    c = cases(pair, variant)
    want = read_pt(c.applied) if framework == "pt" else read_np(c.applied)
    got = fapm.load_file(c.delta, c.base, framework=framework)
    assert list(got) == [n for s in shards(c.applied) for n in _data_order(s)]
    assert sorted(got) == sorted(want)
    for name in want:
        assert_same(got[name], want[name], name)


def _data_order(shard):
    """A shard's tensor names in data order (the order fapm's delta keeps)."""
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


@pytest.mark.parametrize("pair", list(PAIRS))
def test_safe_open_equals_apply(cases, fapm_bin, pair):
    c = cases(pair)
    want = read_pt(c.applied)
    with fapm.safe_open(c.delta, c.base, framework="pt") as f:
        assert sorted(f.keys()) == sorted(want)
        for name in reversed(f.keys()):  # any order, one at a time
            assert_same(f.get_tensor(name), want[name], name)
        cli = json.loads(run(fapm_bin, "inspect", c.delta, "--json").stdout)
        assert f.info() == cli
        meta = {}
        for s in shards(c.applied):
            with safetensors.safe_open(str(s), framework="pt") as g:
                meta.update(g.metadata() or {})
        assert f.metadata() == (meta or None)


def test_dtypes_of_the_fixtures(cases):
    c = cases("sharded")
    got = fapm.load_file(c.delta, c.base)
    assert got["model.layers.0.mlp.fc1.weight"].dtype == ml_dtypes.bfloat16
    assert got["model.embed_tokens.weight"].dtype == np.float16
    assert got["model.layers.0.ln.weight"].dtype == np.float64
    assert got["model.layers.1.attn.causal_mask"].dtype == np.bool_
    assert got["model.logit_scale"].shape == ()
    assert got["model.layers.0.empty_adapter.weight"].shape == (0, 8)
    pt = fapm.load_file(c.delta, c.base, framework="pt")
    assert pt["model.layers.0.mlp.fc1.weight"].dtype == torch.bfloat16
    assert pt["model.vocab_flags"].dtype == torch.uint8


def test_results_are_not_copies(cases):
    """The tensor shares the array Rust filled: no copy on the way to torch."""
    c = cases("single")
    with fapm.safe_open(c.delta, c.base, framework="pt") as f:
        t = f.get_tensor("model.embed_tokens.weight")
    a = t.view(torch.int16).numpy()
    assert a.base is not None and a.flags.owndata is False
    arr = fapm.load_file(c.delta, c.base)["model.embed_tokens.weight"]
    assert not arr.flags.owndata and arr.flags.c_contiguous and arr.flags.aligned


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pair", list(PAIRS))
def test_iter_patches_rebuilds(cases, pair, variant):
    c = cases(pair, variant)
    want = read_np(c.applied)
    base = read_np(c.base)
    seen = []
    for name, indices, values in fapm.iter_patches(c.delta, c.base):
        seen.append(name)
        w = want[name]
        if indices is None:  # stored whole
            assert_same(values, w, name)
            continue
        assert indices.dtype == np.int64 and values.dtype == w.dtype
        assert np.all(np.diff(indices) > 0)
        assert values.tobytes() == w.reshape(-1)[indices].tobytes(), name
        b = base[name]
        if b.dtype == w.dtype:
            rebuilt = b.copy().reshape(-1)
            rebuilt[indices] = values
            assert rebuilt.tobytes() == w.tobytes(), name
            # Nothing outside the patch changed.
            mask = np.ones(b.size, bool)
            mask[indices] = False
            assert b.reshape(-1)[mask].tobytes() == w.reshape(-1)[mask].tobytes()
    assert seen == fapm.safe_open(c.delta, c.base).keys()


def test_iter_patches_from_memory_and_names(cases):
    c = cases("single")
    from_path = {n: (i, v) for n, i, v in fapm.iter_patches(c.delta, c.base)}
    names = ["model.norm.weight", "model.position_ids"]
    base_pt = read_pt(c.base)
    got = list(fapm.iter_patches(c.delta, base_pt, names=names))
    assert [g[0] for g in got] == names
    i, v = from_path["model.norm.weight"]
    assert isinstance(got[0][1], torch.Tensor) and got[0][2].dtype == torch.bfloat16
    assert got[0][1].numpy().tobytes() == i.tobytes()
    assert to_np(got[0][2]).tobytes() == v.tobytes()
    assert got[1][1] is None and got[1][2].dtype == torch.int64
    # A wrong base in memory is refused, naming the tensor.
    base_pt["model.norm.weight"][3] += 1
    with pytest.raises(fapm.FapmError, match="model.norm.weight.*blake3 mismatch"):
        list(fapm.iter_patches(c.delta, base_pt, names=["model.norm.weight"]))
