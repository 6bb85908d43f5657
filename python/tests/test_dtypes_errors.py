"""Every dtype; the command-line functions and their errors; Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fapm
from conftest import assert_same, copy_dict, read_np, read_pt, run

# Every safetensors dtype, with the NumPy dtype fapm gives.
ALL = {
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float8_e5m2: ml_dtypes.float8_e5m2,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.uint16: np.uint16,
    torch.int32: np.int32,
    torch.uint32: np.uint32,
    torch.int64: np.int64,
    torch.uint64: np.uint64,
}


@pytest.fixture(scope="module")
def all_dtypes(fapm_bin, tmp_path_factory):
    """A pair with a tensor of every dtype: floats diffed (and f32 -> bf16, f64 -> f16 across
    dtypes), the rest stored whole; a delta of it and apply's output."""
    tmp = tmp_path_factory.mktemp("dtypes")
    g = torch.Generator().manual_seed(3)
    base, ft = {}, {}
    for i, dt in enumerate(ALL):
        name = f"t{i}.{str(dt).split('.')[-1]}"
        x = torch.randn(37, 29, generator=g)
        if dt.is_floating_point:
            base[name] = x.to(dt)
            ft[name] = (x + 0.01 * torch.randn(37, 29, generator=g)).to(dt)
        else:
            base[name] = (x * 50).to(torch.int64).to(dt)
            ft[name] = (x * 50 + 3).to(torch.int64).to(dt)
    base["cross.bf16"] = torch.randn(64, 40, generator=g)
    ft["cross.bf16"] = (base["cross.bf16"] + 0.02).to(torch.bfloat16)
    base["cross.f16"] = torch.randn(3000, generator=g).to(torch.float64)
    ft["cross.f16"] = (base["cross.f16"] * 1.01).to(torch.float16)
    save_file(base, tmp / "base.safetensors")
    save_file(ft, tmp / "ft.safetensors")
    delta, out = tmp / "d.fapm", tmp / "out.safetensors"
    run(fapm_bin, "prune", "--base", tmp / "base.safetensors", "--finetuned", tmp / "ft.safetensors",
        "--output", delta, "--sparsity", "0.7", "--quiet")
    run(fapm_bin, "apply", "--base", tmp / "base.safetensors", "--delta", delta, "--output", out, "--quiet")
    return tmp / "base.safetensors", delta, out


def test_every_dtype(all_dtypes):
    base, delta, out = all_dtypes
    want = read_pt(out)
    modes = {t["name"]: t["mode"] for t in fapm.inspect(delta)["tensors"]}
    assert sorted(set(modes.values())) == ["pruned", "whole"]
    pt = fapm.load_file(delta, base, framework="pt")
    npd = fapm.load_file(delta, base, framework="np")
    for name, w in want.items():
        assert_same(pt[name], w, name)
        assert npd[name].dtype == np.dtype(ALL[w.dtype]), name
        assert npd[name].tobytes() == pt[name].contiguous().view(torch.uint8).numpy().tobytes(), name
    # Patching a dict of tensors of every dtype (cross-dtype ones are replaced).
    target = read_pt(base)
    fapm.patch_(target, delta)
    for name, w in want.items():
        assert_same(target[name], w, name)
    target = read_np(base)
    with fapm.patched(target, delta):
        for name, w in read_np(out).items():
            assert_same(target[name], w, name)
    for name, w in read_np(base).items():
        assert_same(target[name], w, name)


def _cli_error(fapm_bin, *args) -> str:
    p = run(fapm_bin, *args, check=False)
    assert p.returncode == 1, p.stderr
    (line,) = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    return line[len("error: ") :]


def test_errors_carry_the_cli_message(cases, fapm_bin, tmp_path):
    c = cases("single")
    missing = tmp_path / "missing.fapm"
    with pytest.raises(fapm.FapmError) as e:
        fapm.load_file(missing, c.base)
    assert str(e.value) == _cli_error(fapm_bin, "inspect", missing)
    corrupt = tmp_path / "corrupt.fapm"
    data = bytearray(c.delta.read_bytes())
    data[100] ^= 0x40  # inside the first blocks
    corrupt.write_bytes(bytes(data))
    with pytest.raises(fapm.FapmError) as e:
        fapm.load_file(corrupt, c.base)
    out = tmp_path / "o.safetensors"
    assert str(e.value) == _cli_error(fapm_bin, "apply", "--base", c.base, "--delta", corrupt, "--output", out)
    assert "hash mismatch" in str(e.value)
    with pytest.raises(fapm.FapmError) as e:
        fapm.verify(corrupt)
    assert str(e.value) == _cli_error(fapm_bin, "verify", corrupt)
    with pytest.raises(fapm.FapmError) as e:
        fapm.prune(c.base, c.finetuned, tmp_path / "x.fapm", sparsity="1.5")
    msg = _cli_error(fapm_bin, "prune", "--base", c.base, "--finetuned", c.finetuned, "--output",
                     tmp_path / "x.fapm", "--sparsity", "1.5")
    assert str(e.value) == msg
    with pytest.raises(fapm.FapmError, match="tensor 'nope': not in this delta"):
        fapm.safe_open(c.delta, c.base).get_tensor("nope")
    other = cases("sharded").delta
    with pytest.raises(fapm.FapmError) as e:
        fapm.load_file(other, c.base)
    assert str(e.value) == _cli_error(fapm_bin, "apply", "--base", c.base, "--delta", other, "--output", out)
    with pytest.raises(ValueError, match="framework"):
        fapm.safe_open(c.delta, c.base, framework="jax")
    with pytest.raises(TypeError, match="torch.nn.Module or a dict"):
        fapm.patch_([1, 2], c.delta)
    assert issubclass(fapm.FapmError, Exception)


def _strip(v: dict) -> dict:
    """A summary without what differs from run to run."""
    return {k: x for k, x in v.items() if k not in ("seconds", "throughput_gb_per_s", "peak_memory_bytes", "output")}


def test_commands_return_the_cli_json(cases, fapm_bin, tmp_path):
    c = cases("sharded")
    got = fapm.prune(c.base, c.finetuned, tmp_path / "py.fapm", sparsity="0.9")
    cli = json.loads(run(fapm_bin, "prune", "--base", c.base, "--finetuned", c.finetuned, "--output",
                         tmp_path / "cli.fapm", "--json", "--quiet").stdout)
    assert set(got) == set(cli) - {"peak_memory_bytes"}
    assert _strip(got) == _strip(cli)
    assert (tmp_path / "py.fapm").read_bytes() == (tmp_path / "cli.fapm").read_bytes()
    got = fapm.apply(c.base, tmp_path / "py.fapm", tmp_path / "py-out")
    cli = json.loads(run(fapm_bin, "apply", "--base", c.base, "--delta", tmp_path / "cli.fapm", "--output",
                         tmp_path / "cli-out", "--json", "--quiet").stdout)
    assert _strip(got) == _strip(cli) and got["output"] == str(tmp_path / "py-out")
    files = sorted(p.relative_to(tmp_path / "cli-out") for p in (tmp_path / "cli-out").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "py-out") for p in (tmp_path / "py-out").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "py-out" / f).read_bytes() == (tmp_path / "cli-out" / f).read_bytes()
    with pytest.raises(fapm.FapmError, match="already exists"):
        fapm.apply(c.base, tmp_path / "py.fapm", tmp_path / "py-out")
    for args, kw in ((("--base", c.base), {"base": c.base}), ((), {})):
        got = fapm.verify(tmp_path / "py.fapm", **kw)
        cli = json.loads(run(fapm_bin, "verify", tmp_path / "cli.fapm", *args, "--json", "--quiet").stdout)
        assert _strip(got) == _strip(cli)
    cli = json.loads(run(fapm_bin, "inspect", tmp_path / "cli.fapm", "--json").stdout)
    got = fapm.inspect(tmp_path / "py.fapm")
    assert {**got, "file": None} == {**cli, "file": None}


# A child that loops a call on a large delta until Ctrl-C; it reports where the interrupt
# landed and whether the target is the base, the fine-tune, or (never) a mix.
CHILD = textwrap.dedent(
    """
    import signal, sys, time, hashlib, numpy as np, ml_dtypes, fapm
    # Ctrl-C raises KeyboardInterrupt even when this test runs where SIGINT is ignored (a
    # non-interactive shell's background job), which Python would otherwise inherit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from safetensors.numpy import load_file
    base = load_file(sys.argv[1])
    what, delta = sys.argv[3], sys.argv[2]
    want = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in base.items()}
    target = {k: v.copy() for k, v in base.items()}
    inside = False
    try:
        print("ready", flush=True)
        while True:
            inside = True
            if what == "patch":
                fapm.patch_(target, delta)
            else:
                fapm.load_file(delta, sys.argv[1])
            inside = False
            if what == "patch":
                target = {k: v.copy() for k, v in base.items()}
    except KeyboardInterrupt:
        got = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in target.items()}
        ft = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in fapm.load_file(delta, sys.argv[1]).items()}
        state = "base" if got == want else "finetuned" if got == ft else "mix"
        print("interrupted", "inside" if inside else "outside", state, flush=True)
    """
)


@pytest.fixture(scope="module")
def big_pair(fapm_bin, tmp_path_factory):
    """A pair of 24 f32 tensors of 1.5M elements (2 blocks each) and its delta at 50%."""
    tmp = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    from safetensors.numpy import save_file as save_np

    base = {f"layer{i}.weight": rng.standard_normal(1_500_000, dtype=np.float32) for i in range(24)}
    ft = {k: v + np.float32(0.01) * rng.standard_normal(v.size, dtype=np.float32) for k, v in base.items()}
    save_np(base, tmp / "base.safetensors")
    save_np(ft, tmp / "ft.safetensors")
    run(fapm_bin, "prune", "--base", tmp / "base.safetensors", "--finetuned", tmp / "ft.safetensors",
        "--output", tmp / "d.fapm", "--sparsity", "0.5", "--quiet")
    return tmp


@pytest.mark.parametrize("what", ["patch", "load"])
def test_ctrl_c_interrupts_and_patch_is_all_or_nothing(big_pair, what):
    # The child imports the fapm that this process tests.
    here = os.path.dirname(os.path.dirname(fapm.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    for attempt, delay in enumerate((0.3, 0.7, 1.1)):
        p = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(big_pair / "base.safetensors"), str(big_pair / "d.fapm"), what],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        sent = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert time.monotonic() - sent < 5, "Ctrl-C took too long to be seen"
        assert p.returncode == 0, err
        where, state = out.split()[1:]
        assert state != "mix", out
        if where == "inside":
            if what == "patch":
                # The base: unless the interrupt came after the last write, as patch_ returned.
                assert state in ("base", "finetuned"), out
                if state == "finetuned":
                    continue
            return
    pytest.fail("the interrupt never landed inside the call")
