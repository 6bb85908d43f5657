"""Shared fixtures: the fapm binary, deltas of the checked-in fixture pairs made with it, and
`fapm apply`'s output read back with the real safetensors library."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch

import fapm
import fapm.numpy as fnp
import fapm.torch as fpt

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
PAIRS = {
    "single": (FIXTURES / "single/base.safetensors", FIXTURES / "single/finetuned.safetensors"),
    "sharded": (FIXTURES / "sharded/base", FIXTURES / "sharded/finetuned"),
    "plain": (FIXTURES / "plain/base", FIXTURES / "plain/finetuned"),
    "resized-bf16": (FIXTURES / "resized/bf16/base", FIXTURES / "resized/bf16/finetuned"),
    "resized-f32": (FIXTURES / "resized/f32/base.safetensors", FIXTURES / "resized/f32/finetuned.safetensors"),
}
# (sparsity, extra prune flags): pruned tensors only; pruned and dense ones.
VARIANTS = {"s0.9": ("0.9", []), "s0.5-dense": ("0.5", ["--exclude", "norm|bias|ln|embed"])}


@pytest.fixture(scope="session")
def fapm_bin() -> Path:
    """The fapm binary: $FAPM_BIN, else built with cargo (the test profile, which
    `cargo test --workspace` has usually built already)."""
    if os.environ.get("FAPM_BIN"):
        return Path(os.environ["FAPM_BIN"])
    subprocess.run(
        ["cargo", "build", "--quiet", "--profile", "test", "--bin", "fapm"], cwd=REPO, check=True
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "fapm"


def run(bin_: Path, *args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_), *map(str, args)], capture_output=True, text=True, check=check)


class Case:
    """A fixture pair pruned and applied by the command line."""

    def __init__(self, bin_, tmp: Path, pair: str, variant: str):
        self.base, self.finetuned = PAIRS[pair]
        sparsity, flags = VARIANTS[variant]
        self.delta = tmp / "d.fapm"
        run(bin_, "prune", "--base", self.base, "--finetuned", self.finetuned, "--output", self.delta,
            "--sparsity", sparsity, *flags, "--quiet")
        self.applied = tmp / ("out.safetensors" if self.finetuned.is_file() else "out")
        run(bin_, "apply", "--base", self.base, "--delta", self.delta, "--output", self.applied, "--quiet")
        self.pair, self.variant = pair, variant


@pytest.fixture(scope="session")
def cases(fapm_bin, tmp_path_factory):
    made = {}

    def get(pair: str, variant: str = "s0.9") -> Case:
        if (pair, variant) not in made:
            made[pair, variant] = Case(fapm_bin, tmp_path_factory.mktemp(f"{pair}-{variant}"), pair, variant)
        return made[pair, variant]

    return get


def shards(path: Path):
    """A checkpoint's shard files, as fapm finds them."""
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(path.glob("*.safetensors"))


def read_pt(path: Path) -> dict:
    """Every tensor of a checkpoint, read with the safetensors library, in file order."""
    out = {}
    for shard in shards(path):
        with safetensors.safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def to_np(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as a NumPy array of the same dtype (bf16: ml_dtypes), copied."""
    raw = fpt.as_bytes(t.contiguous(), False).copy()
    return fnp.to_array(raw, fpt.dtype_name(t), list(t.shape))


def read_np(path: Path) -> dict:
    return {k: to_np(v) for k, v in read_pt(path).items()}


def raw(x) -> bytes:
    """The bytes of an array or tensor."""
    if isinstance(x, torch.Tensor):
        return fpt.as_bytes(x.contiguous(), False).tobytes()
    return np.ascontiguousarray(x).tobytes()


def assert_same(got, want, name=""):
    """Same dtype, shape and bytes."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), name
        assert got.dtype == want.dtype, name
    else:
        assert isinstance(got, np.ndarray), name
        assert got.dtype == want.dtype, name
    assert list(got.shape) == list(want.shape), name
    assert raw(got) == raw(want), name


def copy_dict(d: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy()) for k, v in d.items()}


def module_from(tensors: dict, prefix: str = "") -> torch.nn.Module:
    """An nn.Module whose state_dict holds `tensors` (names with `prefix` stripped): floating
    tensors as parameters, others as buffers; submodules made from the dotted names."""
    root = torch.nn.Module()
    for name, t in tensors.items():
        if prefix and name.startswith(prefix + "."):
            name = name[len(prefix) + 1 :]
        *path, attr = name.split(".")
        m = root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, torch.nn.Module())
            m = getattr(m, p)
        if t.is_floating_point():
            m.register_parameter(attr, torch.nn.Parameter(t.clone(), requires_grad=t.dtype.is_floating_point))
        else:
            m.register_buffer(attr, t.clone())
    return root


__all__ = ["fapm"]
