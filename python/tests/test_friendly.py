"""What a new user runs into: numbers as Python numbers, arguments given the wrong way round, a
model patched twice, and how much `import fapm` imports."""

import os
import subprocess
import sys
from decimal import Decimal

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fapm
from conftest import copy_dict, module_from, raw, read_np, read_pt, run


def _cli_error(fapm_bin, *args) -> str:
    """The message after `error: ` of a fapm command that fails with exit code 1."""
    p = run(fapm_bin, *args, check=False)
    assert p.returncode == 1, p.stderr
    (line,) = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    return line[len("error: ") :]


def _prune_cli(fapm_bin, c, out, *flags):
    run(fapm_bin, "prune", "--base", c.base, "--finetuned", c.finetuned, "--output", out, *flags, "--quiet")
    return out.read_bytes()


@pytest.mark.parametrize(
    "kwargs, flags",
    [
        ({"sparsity": 0.9}, ["--sparsity", "0.9"]),
        ({"sparsity": 0.1, "penalty": 0.5}, ["--sparsity", "0.1", "--penalty", "0.5"]),
        ({"sparsity": 1}, ["--sparsity", "1"]),
        ({"sparsity": 0}, ["--sparsity", "0"]),
        ({"sparsity": 1.0, "penalty": 2}, ["--sparsity", "1.0", "--penalty", "2"]),
        # repr(1e-05) is '1e-05': the same decimal, written out.
        ({"sparsity": 1e-05, "penalty": 2.5e-3}, ["--sparsity", "0.00001", "--penalty", "0.0025"]),
        ({"sparsity": np.float64(0.75)}, ["--sparsity", "0.75"]),
        # NumPy's float32 as its str (the shortest decimal of its precision); a Decimal as written.
        ({"sparsity": np.float32(0.9), "penalty": Decimal("0.50")}, ["--sparsity", "0.9", "--penalty", "0.50"]),
        (
            {"sparsity_for": {"embed|lm_head": 0.5, "norm": 0}, "memory_budget": 2**30},
            ["--sparsity-for", "embed|lm_head=0.5", "--sparsity-for", "norm=0", "--memory-budget", "1G"],
        ),
        ({"sparsity_for": [("fc1", 0.25), "fc2=0.5"]}, ["--sparsity-for", "fc1=0.25", "--sparsity-for", "fc2=0.5"]),
    ],
)
def test_numbers_are_the_decimals_their_repr_shows(cases, fapm_bin, tmp_path, kwargs, flags):
    """A float is the decimal its repr shows, exactly as the command line reads that text:
    the same delta, byte for byte (the delta records the decimal as given)."""
    c = cases("sharded")
    fapm.prune(c.base, c.finetuned, tmp_path / "py.fapm", **kwargs)
    assert (tmp_path / "py.fapm").read_bytes() == _prune_cli(fapm_bin, c, tmp_path / "cli.fapm", *flags)


def test_bad_numbers_are_refused_with_the_cli_message(cases, fapm_bin, tmp_path):
    c = cases("single")
    out = tmp_path / "x.fapm"
    for kwargs, flags in [
        ({"sparsity": float("nan")}, ["--sparsity", "nan"]),
        ({"sparsity": float("inf")}, ["--sparsity", "inf"]),
        ({"sparsity": 1.5}, ["--sparsity", "1.5"]),
        ({"sparsity": -0.5}, ["--sparsity=-0.5"]),
        ({"penalty": float("nan")}, ["--penalty", "nan"]),
        ({"penalty": float("-inf")}, ["--penalty=-inf"]),
        ({"memory_budget": 1000}, ["--memory-budget", "1000"]),
    ]:
        with pytest.raises(fapm.FapmError) as e:
            fapm.prune(c.base, c.finetuned, out, **kwargs)
        cli = _cli_error(
            fapm_bin, "prune", "--base", c.base, "--finetuned", c.finetuned, "--output", out, *flags
        )
        assert str(e.value) == cli, kwargs
    assert not out.exists()
    for bad in (True, False, None, [0.9], b"0.9"):
        with pytest.raises(TypeError, match="sparsity must be a number or a string"):
            fapm.prune(c.base, c.finetuned, out, sparsity=bad)
    with pytest.raises(TypeError, match="penalty"):
        fapm.prune(c.base, c.finetuned, out, penalty=True)
    with pytest.raises(TypeError, match="memory_budget"):
        fapm.load_file(c.delta, c.base, memory_budget=True)
    with pytest.raises(TypeError, match="sparsity_for"):
        fapm.prune(c.base, c.finetuned, out, sparsity_for="norm=0")
    assert not out.exists()


def test_memory_budget_as_bytes_everywhere(cases):
    c = cases("single")
    want = fapm.load_file(c.delta, c.base)
    got = fapm.load_file(c.delta, c.base, memory_budget=256 << 20)
    assert all(np.array_equal(got[k].view(np.uint8), want[k].view(np.uint8)) for k in want)
    assert fapm.inspect(c.delta, memory_budget=float(1 << 30))["tensors"]
    with pytest.raises(fapm.FapmError, match="below the minimum of 64M"):
        fapm.verify(c.delta, memory_budget=1 << 20)


def test_a_checkpoint_given_as_the_delta_and_swapped_arguments(cases, fapm_bin, tmp_path):
    c = cases("single")
    # The arguments swapped: both are named.
    for call in (fapm.load_file, fapm.safe_open, fapm.iter_patches):
        with pytest.raises(fapm.FapmError) as e:
            call(c.base, c.delta)
        assert str(e.value) == (
            f"{c.base}: is a safetensors checkpoint (a model), not a fapm delta, and {c.delta} is the "
            f"delta: the arguments are swapped ({call.__name__}(delta, base, ...))"
        )
    with pytest.raises(fapm.FapmError, match="the arguments are swapped \\(apply\\(delta, base"):
        fapm.apply(c.delta, c.base, tmp_path / "out.safetensors")
    # A checkpoint where only a delta can be.
    for call, args in (
        (fapm.patch_, (read_np(c.base), c.finetuned)),
        (fapm.verify, (c.finetuned,)),
        (fapm.inspect, (c.finetuned,)),
        (fapm.load_file, (c.finetuned, c.finetuned)),
    ):
        with pytest.raises(fapm.FapmError) as e:
            call(*args)
        assert str(e.value) == (
            f"{c.finetuned}: is a safetensors checkpoint (a model), not a fapm delta "
            "(a delta is what fapm.prune or `fapm prune` writes)"
        )
    # A directory of shards too.
    s = cases("sharded")
    with pytest.raises(fapm.FapmError, match="sharded/finetuned: is a safetensors checkpoint"):
        fapm.verify(s.finetuned)
    # A delta where only a checkpoint can be: the command line's own message.
    with pytest.raises(fapm.FapmError) as e:
        fapm.load_file(c.delta, c.delta)
    want = f"{c.delta}: is a fapm delta, not a safetensors checkpoint (were the base and the delta swapped?)"
    assert str(e.value) == want
    assert _cli_error(fapm_bin, "prune", "--base", c.delta, "--finetuned", c.finetuned, "--output",
                      tmp_path / "x.fapm") == want
    with pytest.raises(fapm.FapmError) as e:
        fapm.prune(c.delta, c.finetuned, tmp_path / "x.fapm")
    assert str(e.value) == want
    # A model and a delta swapped.
    model = module_from(read_pt(c.base))
    for call in (fapm.patch_, fapm.patched):
        with pytest.raises(fapm.FapmError) as e:
            with contextlib_nullcontext(call(c.delta, model)):
                pass
        assert str(e.value) == (
            f"{call.__name__}: the model given is a path ({c.delta}) and the delta a Module: the arguments "
            f"are swapped ({call.__name__}(model, delta))"
        )
    with pytest.raises(fapm.FapmError, match="iter_patches: the model given is a path"):
        fapm.iter_patches(model, c.base)


def contextlib_nullcontext(x):
    """``x`` if it is a context manager (patched's), else one that does nothing."""
    import contextlib

    return x if hasattr(x, "__enter__") else contextlib.nullcontext(x)


def test_escaped_names_in_the_new_messages(cases, tmp_path):
    """Paths in the messages go through the command line's escaping."""
    c = cases("single")
    odd = tmp_path / "a\x1b[31mb.safetensors"
    odd.write_bytes(c.base.read_bytes())
    with pytest.raises(fapm.FapmError) as e:
        fapm.verify(odd)
    assert "\x1b" not in str(e.value) and "a\\u{1b}[31mb.safetensors" in str(e.value)


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_patching_a_model_twice_says_so(cases, framework):
    c = cases("sharded", "s0.5-dense")
    base = read_pt(c.base) if framework == "pt" else read_np(c.base)
    target = copy_dict(base)
    fapm.patch_(target, c.delta)
    once = copy_dict(target)
    with pytest.raises(fapm.FapmError, match="this model already holds the delta's result") as e:
        fapm.patch_(target, c.delta)
    assert str(e.value).startswith("target '")
    # Nothing was written.
    for k, v in once.items():
        assert raw(v) == raw(target[k]), k
    with pytest.raises(fapm.FapmError, match="already holds the delta's result"):
        with fapm.patched(target, c.delta):
            pass


@pytest.fixture(scope="module")
def same_dtypes(tmp_path_factory):
    """A pair whose tensors keep their dtype and shape (f32, bf16) and its delta at 50%."""
    tmp = tmp_path_factory.mktemp("same")
    g = torch.Generator().manual_seed(7)
    base = {f"w{i}": torch.randn(300, 17, generator=g).to(dt) for i, dt in enumerate([torch.float32, torch.bfloat16])}
    ft = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    save_file(base, tmp / "base.safetensors")
    save_file(ft, tmp / "ft.safetensors")
    fapm.prune(tmp / "base.safetensors", tmp / "ft.safetensors", tmp / "d.fapm", sparsity=0.5)
    fapm.prune(tmp / "base.safetensors", tmp / "ft.safetensors", tmp / "all.fapm", sparsity=0)
    return tmp


@pytest.mark.parametrize("kept", ["d.fapm", "all.fapm"])
def test_the_result_as_the_base_says_so(same_dtypes, fapm_bin, tmp_path, kept):
    """The delta's result given as the base: the fine-tune itself when every change is kept,
    apply's output in any case."""
    base, ft, delta = same_dtypes / "base.safetensors", same_dtypes / "ft.safetensors", same_dtypes / kept
    fapm.apply(base, delta, tmp_path / "out.safetensors")
    for b in [tmp_path / "out.safetensors"] + ([ft] if kept == "all.fapm" else []):
        msg = _cli_error(fapm_bin, "apply", "--base", b, "--delta", delta, "--output", tmp_path / "o.safetensors")
        assert msg == (
            f"{b}: tensor 'w0': this model already holds the delta's result (the fine-tuned tensor), not the base "
            "the delta was made from: it was patched already, or it is the fine-tuned model"
        )
        with pytest.raises(fapm.FapmError) as e:
            fapm.load_file(delta, b)
        assert str(e.value) == msg
    target = read_pt(tmp_path / "out.safetensors")
    with pytest.raises(fapm.FapmError) as e:
        fapm.patch_(target, delta)
    assert str(e.value) == "target 'w0': " + msg.split(": ", 1)[1]


def test_a_grown_tensor_patched_twice(cases):
    """A fine-tune that grew a tensor (added tokens): the grown tensor cannot be hashed against
    the base, the others say the model holds the result already."""
    r = cases("resized-f32")
    target = read_np(r.base)
    fapm.patch_(target, r.delta)
    with pytest.raises(fapm.FapmError, match="already holds the delta's result"):
        fapm.patch_(target, r.delta)
    # Without the base check, the grown tensor's dtype and shape say what may be wrong.
    with pytest.raises(fapm.FapmError, match="the dtype and shape of the delta's result: was the model patched"):
        fapm.patch_(target, r.delta, check_base=False)


def _imported(code: str) -> set:
    """The modules that running ``code`` in a fresh interpreter imports (``-X importtime``)."""
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(fapm.__file__))},
    )
    names = set()
    for line in p.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "fapm" in names or code != "import fapm", p.stderr[-2000:]
    return names


def test_import_fapm_imports_neither_torch_nor_ml_dtypes():
    names = _imported("import fapm")
    heavy = {n for n in names if n.split(".")[0] in ("torch", "ml_dtypes", "tqdm", "safetensors")}
    assert not heavy, sorted(heavy)
    # bf16 in NumPy brings ml_dtypes when it is asked for.
    names = _imported("import fapm.numpy as f, numpy as np; f.to_array(np.zeros(2, np.uint16), 'BF16', [2])")
    assert "ml_dtypes" in names and "torch" not in names
