"""A stranger's delta through the Python package: files crafted as an attacker would craft them
(every block, manifest and footer hash recomputed, so that only the checks that matter can
refuse them), each refused cleanly (``FapmError`` naming the problem, the interpreter alive,
memory and time bounded), each with a valid twin that loads. Also: the budget binds the
decoder whatever the thread count, a base truncated under a load gives ``FapmError``, and
``patched()`` restores every tensor it can."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import numpy as np
import pytest
import zstandard
from safetensors.numpy import save_file

import fapm
from conftest import assert_same, read_np, run

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1}
MAX_BLOCK_ELEMS = 1 << 22
# Far more than an honest run here needs, far less than the hostile files ask for.
MEMORY_LIMIT = 1 << 30
# Tiny tensors whose delta records and base header (with three times as many tensors) each fit
# half of a 64M budget, not both.
TINY_TENSORS = 20_000


# -- Crafting ------------------------------------------------------------------------------


def unpack(path: Path):
    """A delta's manifest (as JSON) and the raw bytes of every block: ``(m, tensors, side)``,
    ``tensors`` by name, each a list of raw blocks; ``side`` each side file's bytes."""
    data = path.read_bytes()
    m_off, m_len, m_raw = struct.unpack_from("<QQQ", data, len(data) - 64)
    d = zstandard.ZstdDecompressor()
    m = json.loads(d.decompress(data[m_off : m_off + m_len], max_output_size=m_raw))

    def raw(b):
        return d.decompress(data[b["offset"] : b["offset"] + b["len"]], max_output_size=max(b["raw_len"], 1))

    tensors = {t["name"]: [raw(b) for b in t["blocks"]] for t in m["tensors"]}
    side = [b"".join(raw(b) for b in f["blocks"]) for f in m["side_files"]]
    return m, tensors, side


def pack(m: dict, tensors: dict, side, to: Path) -> Path:
    """Writes ``m`` with these raw blocks as a delta at ``to``, as fapm's writer would: every
    block compressed and hashed, side files' sizes, hashes and blocks from their bytes, the
    manifest compressed and the footer hashed. Tensor hashes are left as ``m`` says. Blocks
    that are the same object are compressed once."""
    out = bytearray(b"FAPMDLTA" + struct.pack("<II", m["version"], 0))
    c = zstandard.ZstdCompressor(level=1)
    packed_of = {}

    def block(raw: bytes) -> dict:
        if id(raw) not in packed_of:
            packed_of[id(raw)] = (raw, c.compress(raw))
        packed = packed_of[id(raw)][1]
        b = {"offset": len(out), "len": len(packed), "raw_len": len(raw), "hash": blake3.blake3(packed).hexdigest()}
        out.extend(packed)
        return b

    for t in m["tensors"]:
        t["blocks"] = [block(r) for r in tensors[t["name"]]]
    per = m["raw_block_bytes"]
    for f, data in zip(m["side_files"], side):
        f["size"], f["hash"] = len(data), blake3.blake3(data).hexdigest()
        f["blocks"] = [block(data[i : i + per]) for i in range(0, len(data), per)]
    text = json.dumps(m).encode()
    packed = c.compress(text)
    m_off = len(out)
    out.extend(packed)
    footer = struct.pack("<QQQ", m_off, len(packed), len(text))
    footer += blake3.blake3(bytes(out[:16]) + packed + footer).digest() + b"FAPMEND1"
    to.write_bytes(bytes(out) + footer)
    return to


def one_tensor(src: Path, name: str, to: Path, rows=None, block_elems=MAX_BLOCK_ELEMS, new_name=None) -> Path:
    """A single-file delta of tensor ``name`` of ``src`` alone, its first dimension set to
    ``rows`` (the shard header says the same), its blocks ``block_elems`` elements long: the
    tensor's one block of ``src`` (its payload's positions are relative to the block's start,
    so it stays valid), then blocks that keep nothing. ``rows=None``: the valid twin."""
    m, raws, _ = unpack(src)
    (t,) = [t for t in m["tensors"] if t["name"] == name]
    assert t["mode"] != "whole" and len(raws[name]) == 1
    shape = list(t["shape"])
    if rows is not None:
        shape[0] = rows
    n = math.prod(shape)
    size = SIZES[t["dtype"]]
    if new_name is not None:
        raws[new_name] = raws.pop(name)
        name = new_name
    header = {name: {"dtype": t["dtype"], "shape": shape, "data_offsets": [0, n * size]}}
    t.update(name=name, shard=0, shape=shape)
    m.update(
        shards=[{"name": m["shards"][0]["name"], "header": json.dumps(header)}],
        tensors=[t],
        base_only=[],
        block_elems=block_elems,
    )
    blocks = raws[name] + [b"\x00"] * (-(-n // block_elems) - 1)  # a count of 0: keeps nothing
    return pack(m, {name: blocks}, [], to)


def whole_tensor(src: Path, to: Path, n_bytes: int) -> Path:
    """A single-file delta of one U8 tensor ``w`` stored whole: ``n_bytes`` zeros, in 64 MiB
    blocks of one compressed frame each (a few KiB)."""
    m, _, _ = unpack(src)
    per = 64 << 20
    zeros = bytes(min(per, n_bytes))
    last = bytes(n_bytes % per) if n_bytes % per else zeros
    blocks = [zeros] * (n_bytes // per) + ([last] if n_bytes % per else [])
    header = {"w": {"dtype": "U8", "shape": [n_bytes], "data_offsets": [0, n_bytes]}}
    (tmpl,) = [t for t in m["tensors"] if t["mode"] == "whole"][:1]
    t = {**tmpl, "name": "w", "shard": 0, "dtype": "U8", "shape": [n_bytes], "candidates": n_bytes, "kept": n_bytes}
    t["out_hash"] = blake3.blake3(bytes(n_bytes)).hexdigest() if n_bytes <= 1 << 30 else "0" * 64
    m.update(
        shards=[{"name": m["shards"][0]["name"], "header": json.dumps(header)}],
        tensors=[t],
        base_only=[],
        raw_block_bytes=per,
    )
    return pack(m, {"w": blocks}, [], to)


# -- Running -------------------------------------------------------------------------------

# A child that tries one Python entry point on a delta and says how it ended; its memory is
# limited, so that allocating from a size the delta declares fails (an abort, on a build
# that does it) where honest work does not.
CHILD = textwrap.dedent(
    """
    import json, struct, sys, numpy as np, fapm, fapm.numpy as fnp
    what, delta, base = sys.argv[1:4]
    def st_load(path):
        # The base as a dict of arrays, BF16 included (safetensors.numpy has no BF16).
        data = open(path, "rb").read()
        n = struct.unpack_from("<Q", data)[0]
        header = json.loads(data[8 : 8 + n])
        return {
            k: fnp.to_array(np.frombuffer(data[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]],
                                          np.uint8).copy(), v["dtype"], v["shape"])
            for k, v in header.items() if k != "__metadata__"
        }
    try:
        if what == "load_file":
            fapm.load_file(delta, base)
        elif what == "get_tensor":
            with fapm.safe_open(delta, base) as f:
                for name in f.keys():
                    f.get_tensor(name)
        elif what == "patch_":
            fapm.patch_(st_load(base), delta)
        elif what == "iter_patches":
            for _ in fapm.iter_patches(delta, base):
                pass
        elif what == "iter_patches_dict":
            for _ in fapm.iter_patches(delta, st_load(base)):
                pass
        print("accepted")
    except fapm.FapmError as e:
        print("refused", str(e))
    """
)


def child(what: str, delta: Path, base: Path, limit: int = MEMORY_LIMIT, timeout: float = 60):
    import resource

    def limit_data():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    p = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(delta), str(base)],
        capture_output=True, text=True, timeout=timeout, preexec_fn=limit_data, env=env,
    )
    assert p.returncode == 0, f"{what}: the interpreter died ({p.returncode}): {p.stderr[-2000:]}"
    return p.stdout.strip()


def _pythonpath() -> str:
    """The children import the fapm that this process tests."""
    here = os.path.dirname(os.path.dirname(fapm.__file__))
    return os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])


def cli_refuses(fapm_bin, delta: Path, base: Path, tmp: Path, *needles) -> str:
    """``fapm apply`` exits 1 with one error line containing ``needles``, writes nothing."""
    out = tmp / "cli-out.safetensors"
    p = run(fapm_bin, "apply", "--base", base, "--delta", delta, "--output", out, "-q", check=False)
    assert p.returncode == 1, p.stderr
    (line,) = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    for n in needles:
        assert n in line, line
    assert not out.exists()
    return line[len("error: ") :]


# -- Counts and sizes ------------------------------------------------------------------------

ENTRY_POINTS = ["load_file", "get_tensor", "patch_", "iter_patches", "iter_patches_dict"]


def test_a_tensor_of_2_32_elements_allocates_nothing(cases, fapm_bin, tmp_path):
    c = cases("single")
    name = "model.layers.0.mlp.down_proj.weight"  # BF16 [64, 128], pruned
    bad = one_tensor(c.delta, name, tmp_path / "huge.fapm", rows=(1 << 32) // 128)
    assert bad.stat().st_size < 16 << 10  # 1024 blocks: an 8 GiB tensor in a few KB
    good = one_tensor(c.delta, name, tmp_path / "twin.fapm")
    for what in ENTRY_POINTS:
        out = child(what, bad, c.base)
        assert out.startswith("refused") and name in out, (what, out)
        assert child(what, good, c.base) == "accepted", what
    # The same refusal as the command line's, word for word.
    msg = cli_refuses(fapm_bin, bad, c.base, tmp_path, name)
    with pytest.raises(fapm.FapmError) as e:
        fapm.load_file(bad, c.base)
    assert str(e.value) == msg
    want = read_np(c.applied)[name]
    assert_same(fapm.load_file(good, c.base)[name], want, name)


def test_an_extended_tensor_of_16_gib_allocates_nothing(cases, fapm_bin, tmp_path):
    c = cases("resized-f32")
    name = "embed.weight"  # F32 [48, 16] grown from [40, 16]
    bad = one_tensor(c.delta, name, tmp_path / "huge.fapm", rows=(16 << 30) // (16 * 4))
    assert bad.stat().st_size < 16 << 10
    good = one_tensor(c.delta, name, tmp_path / "twin.fapm")
    # The reader refuses it as it opens the delta, as it does for the command line: zero rows
    # past the base bound neither by the base nor by what the delta stores.
    refusal = "appends more zero elements than its base tensor and its stored ones together"
    for what in ["load_file", "get_tensor", "iter_patches", "iter_patches_dict"]:
        out = child(what, bad, c.base)
        assert out.startswith("refused") and name in out and refusal in out, (what, out)
        assert child(what, good, c.base) == "accepted", what
    with pytest.raises(fapm.FapmError, match=refusal):
        fapm.patch_(read_np(c.base), bad)
    assert_same(fapm.load_file(good, c.base)[name], read_np(c.applied)[name], name)


def test_a_whole_tensor_from_a_zip_bomb_is_bounded_by_the_budget(cases, tmp_path):
    c = cases("single")
    # 16 GiB of zeros in 256 blocks of a few KiB: nothing bounds it but the budget.
    bad = whole_tensor(c.delta, tmp_path / "bomb.fapm", 16 << 30)
    assert bad.stat().st_size < 1 << 20
    for what in ["load_file", "get_tensor", "iter_patches"]:
        out = child(what, bad, c.base)
        assert out.startswith("refused") and "'w'" in out and "no base tensor bounds" in out, (what, out)
    # The twin, 128 MiB of zeros, loads within the default budget (256 MiB), and a budget
    # below it refuses it: the rule is the budget's.
    good = whole_tensor(c.delta, tmp_path / "twin.fapm", 128 << 20)
    got = fapm.load_file(good, c.base)["w"]
    assert got.shape == (128 << 20,) and not got.any()
    with pytest.raises(fapm.FapmError, match="no base tensor bounds"):
        fapm.load_file(good, c.base, memory_budget="64M")


def test_a_delta_and_its_base_share_one_budget(fapm_bin, tmp_path):
    """``load_file``, ``safe_open`` and ``iter_patches`` open the delta and its base within one
    budget, as ``fapm apply`` does: records and headers that each fit the budget's metadata
    half alone, but not together, are refused, and open within a budget twice as large."""
    rng = np.random.default_rng(7)
    ft = {f"layer.{i}.w": rng.standard_normal(2).astype(np.float32) for i in range(TINY_TENSORS)}
    base = {k: v * 2 for k, v in ft.items()}
    # Tensors only the base has (ignored) make its header the larger part.
    base.update({f"unused.{i}.w": np.zeros(2, np.float32) for i in range(3 * TINY_TENSORS)})
    b, f, delta = tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "d.fapm"
    save_file(base, str(b))
    save_file(ft, str(f))
    run(fapm_bin, "prune", "--base", b, "--finetuned", f, "--output", delta, "--sparsity", "0", "--quiet")
    d = fapm._fapm.Delta(delta, memory_budget="64M")
    assert 0 < d.metadata_bytes < 32 << 20, d.metadata_bytes
    fapm._fapm.Checkpoint(b, memory_budget="64M")  # alone, it fits
    over = "needs more memory than the memory budget allows"
    with pytest.raises(fapm.FapmError, match=over):
        fapm._fapm.Checkpoint(b, memory_budget="64M", charged=d.metadata_bytes)
    with pytest.raises(fapm.FapmError, match=over):
        fapm.load_file(delta, b, memory_budget="64M")
    with pytest.raises(fapm.FapmError, match=over):
        fapm.safe_open(delta, b, memory_budget="64M")
    with pytest.raises(fapm.FapmError, match=over):
        next(fapm.iter_patches(delta, b, memory_budget="64M"))
    # Within twice the budget (a whole load_file of 20,000 tensors takes seconds: the two
    # calls that open the same way and read one tensor show it).
    got = fapm.safe_open(delta, b, memory_budget="128M").get_tensor("layer.7.w")
    assert_same(got, ft["layer.7.w"], "layer.7.w")
    name, _, values = next(fapm.iter_patches(delta, b, memory_budget="128M"))
    assert name == "layer.0.w" and len(values) == 2


# -- Part deltas ------------------------------------------------------------------------------


def test_a_part_delta_is_refused_with_the_cli_message(fapm_bin, tmp_path):
    from conftest import PAIRS

    base, ft = PAIRS["sharded"]
    parts = []
    for i in (1, 2):
        parts.append(tmp_path / f"p{i}.fapm")
        run(fapm_bin, "prune", "--base", base, "--finetuned", ft, "--output", parts[-1], "--part", f"{i}/2", "-q")
    msg = cli_refuses(fapm_bin, parts[0], base, tmp_path, "part 1 of 2")
    target = read_np(base)
    before = {k: v.copy() for k, v in target.items()}
    calls = {
        "load_file": lambda: fapm.load_file(parts[0], base),
        "safe_open": lambda: fapm.safe_open(parts[0], base),
        "patch_": lambda: fapm.patch_(target, parts[0]),
        "patched": lambda: fapm.patched(target, parts[0]).__enter__(),
        "iter_patches": lambda: fapm.iter_patches(parts[0], base),  # on the call, not the first next()
    }
    for what, call in calls.items():
        with pytest.raises(fapm.FapmError) as e:
            call()
        assert str(e.value) == msg, what
    for k, v in before.items():
        assert_same(target[k], v, k)
    # The twin: the parts merged load, as apply writes them.
    whole = tmp_path / "whole.fapm"
    run(fapm_bin, "merge", *parts, "--output", whole, "-q")
    run(fapm_bin, "apply", "--base", base, "--delta", whole, "--output", tmp_path / "out", "-q")
    for k, v in read_np(tmp_path / "out").items():
        assert_same(fapm.load_file(whole, base)[k], v, k)


# -- Messages ---------------------------------------------------------------------------------

EVIL = "x\x1b]0;owned\x07\x1b[2J\r\n\x9b31m\x7f\u202e.weight"


@pytest.fixture(scope="module")
def evil_pair(fapm_bin, tmp_path_factory):
    """A pair whose one tensor has a name full of terminal escapes, and its delta (valid)."""
    tmp = tmp_path_factory.mktemp("evil")
    rng = np.random.default_rng(5)
    base = {EVIL: rng.standard_normal((64, 64), dtype=np.float32), "ok.weight": np.ones(64, np.float32)}
    ft = {k: v + np.float32(0.01) for k, v in base.items()}
    save_file(base, tmp / "base.safetensors")
    save_file(ft, tmp / "ft.safetensors")
    save_file({"ok.weight": base["ok.weight"]}, tmp / "other.safetensors")
    run(fapm_bin, "prune", "--base", tmp / "base.safetensors", "--finetuned", tmp / "ft.safetensors",
        "--output", tmp / "d.fapm", "-q")
    return tmp


def _printable(s: str) -> bool:
    return not any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or ch in "\u202e\u2028" for ch in s)


def test_messages_are_escaped_as_the_cli_escapes_them(evil_pair, fapm_bin, tmp_path):
    d, base, other = evil_pair / "d.fapm", evil_pair / "base.safetensors", evil_pair / "other.safetensors"
    # The twin: the names are data, and the delta loads with its base.
    got = fapm.load_file(d, base)
    assert set(got) == {EVIL, "ok.weight"}
    msg = cli_refuses(fapm_bin, d, other, tmp_path, "owned")
    with pytest.raises(fapm.FapmError) as e:
        fapm.load_file(d, other)
    assert str(e.value) == msg and _printable(msg) and "\\u{1b}" in msg
    # Messages the Python half makes, with names from the delta.
    for call in (
        lambda: fapm.patch_({"ok.weight": np.ones(64, np.float32)}, d),
        lambda: list(fapm.iter_patches(d, {"ok.weight": np.ones(64, np.float32)})),
        lambda: fapm.patch_({EVIL: np.ones(3, np.float32), "ok.weight": np.ones(64, np.float32)}, d),
    ):
        with pytest.raises(fapm.FapmError) as e:
            call()
        assert "owned" in str(e.value) and _printable(str(e.value)), str(e.value)


def test_settings_are_checked_by_the_cli_code(cases, fapm_bin, tmp_path):
    c = cases("single")
    p = run(fapm_bin, "apply", "--base", c.base, "--delta", c.delta, "--output", tmp_path / "o",
            "--memory-budget", "12 parsecs", check=False)
    (line,) = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    for call in (
        lambda: fapm.load_file(c.delta, c.base, memory_budget="12 parsecs"),
        lambda: fapm.patch_(read_np(c.base), c.delta, memory_budget="12 parsecs"),
        lambda: fapm.iter_patches(c.delta, c.base, memory_budget="12 parsecs"),
        lambda: fapm.inspect(c.delta, memory_budget="12 parsecs"),
        lambda: fapm.verify(c.delta, memory_budget="12 parsecs"),
    ):
        with pytest.raises(fapm.FapmError) as e:
            call()
        assert "error: " + str(e.value) == line
    # Honest values of both are accepted everywhere.
    got = fapm.load_file(c.delta, c.base, threads=3, memory_budget="64M")
    for k, v in read_np(c.applied).items():
        assert_same(got[k], v, k)
    target = read_np(c.base)
    with fapm.patched(target, c.delta, threads=1, memory_budget="64M"):
        pass
    assert sum(1 for _ in fapm.iter_patches(c.delta, c.base, threads=2, memory_budget="64M")) == len(got)


# -- patched() ---------------------------------------------------------------------------------


def test_patched_restores_every_tensor_it_can_then_raises(cases):
    c = cases("single")
    base = read_np(c.base)
    target = {k: v.copy() for k, v in base.items()}
    # Code inside the block makes two patched tensors read-only: they cannot be reverted.
    broken = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(fapm.FapmError) as e:
        with fapm.patched(target, c.delta):
            for k in broken:
                target[k].flags.writeable = False
    assert all(k in str(e.value) for k in broken) and "could not restore 2 tensor" in str(e.value)
    ft = read_np(c.applied)
    for k, v in base.items():
        assert_same(target[k], ft[k] if k in broken else v, k)
    # Raised inside the block too: the block's exception is chained.
    target = {k: v.copy() for k, v in base.items()}
    with pytest.raises(fapm.FapmError) as e:
        with fapm.patched(target, c.delta):
            target[broken[0]].flags.writeable = False
            raise KeyError("inside")
    assert isinstance(e.value.__context__, KeyError)


# -- The budget ------------------------------------------------------------------------------

RSS_CHILD = textwrap.dedent(
    """
    import sys, fapm
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    delta, base, threads, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    f = fapm.safe_open(delta, base, threads=threads, memory_budget=budget)
    start = hwm()
    largest = 0
    for name in f.keys():
        t = f.get_tensor(name)
        largest = max(largest, t.nbytes)
        del t
    print(start, hwm(), largest)
    """
)


@pytest.fixture(scope="module")
def wide_pair(fapm_bin, tmp_path_factory):
    """Two f32 tensors of 16M elements (16 blocks each, 128 MiB in all) and a delta at 50%."""
    tmp = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(1)
    base = {f"l{i}.weight": rng.standard_normal(16 << 20, dtype=np.float32) for i in range(2)}
    save_file(base, tmp / "base.safetensors")
    ft = {k: v + np.float32(0.01) * rng.standard_normal(v.size, dtype=np.float32) for k, v in base.items()}
    save_file(ft, tmp / "ft.safetensors")
    del base, ft
    run(fapm_bin, "prune", "--base", tmp / "base.safetensors", "--finetuned", tmp / "ft.safetensors",
        "--output", tmp / "d.fapm", "--sparsity", "0.5", "-q")
    return tmp


def test_python_decoding_stays_within_the_budget_at_16_threads(wide_pair):
    """Peak RSS while loading at 16 threads with the smallest budget, 64 MiB: what fapm itself
    holds (the window of blocks, about 4.5 MiB each here) is the budget's; the output array
    the caller asked for (64 MiB) and the base tensor's mapped pages (64 MiB of the page cache,
    released after each tensor) are not."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    budget = 64 << 20
    p = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(wide_pair / "d.fapm"), str(wide_pair / "base.safetensors"), "16", "64M"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert p.returncode == 0, p.stderr
    start, peak, largest = map(int, p.stdout.split())
    grown = peak - start
    print(f"peak RSS grew by {grown >> 20} MiB (budget 64 MiB, output {largest >> 20} MiB)")
    assert grown <= budget + 2 * largest + (16 << 20), f"{grown >> 20} MiB"


# -- SIGBUS ------------------------------------------------------------------------------------

SIGBUS_CHILD = textwrap.dedent(
    """
    import os, sys, threading, time, fapm
    delta, base, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    size = os.path.getsize(base)
    def shrink():
        time.sleep(delay)
        os.truncate(base, 4096)
    threading.Thread(target=shrink).start()
    # Loads back to back, so that the truncation lands inside one, however fast it is.
    try:
        for _ in range(200):
            fapm.load_file(delta, base)
        print("accepted")
    except fapm.FapmError as e:
        print("refused", str(e))
    """
)


def test_a_base_truncated_under_a_load_gives_fapm_error(wide_pair, tmp_path):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    seen = set()
    base = tmp_path / "base.safetensors"
    for delay in (0.3, 0.15, 0.5, 0.8, 0.05):
        # With faulthandler on (as pytest runs it) and off: the guard keeps it for other faults.
        for fh in ([], ["-X", "faulthandler"]):
            base.write_bytes((wide_pair / "base.safetensors").read_bytes())
            p = subprocess.run(
                [sys.executable, *fh, "-c", SIGBUS_CHILD, str(wide_pair / "d.fapm"), str(base), str(delay)],
                capture_output=True, text=True, timeout=120, env=env,
            )
            assert p.returncode == 0, f"the interpreter died ({p.returncode}): {p.stderr[-2000:]}"
            out = p.stdout.strip()
            assert out == "accepted" or out.startswith("refused"), out
            if "truncated while fapm was reading it" in out:
                assert str(base) in out
                seen.add(bool(fh))
        if seen == {False, True}:
            return
    pytest.fail(f"the truncation never landed inside a load: {seen}")
