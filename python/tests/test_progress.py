"""Progress bars of the long calls: they advance, end at their total, and can be turned off."""

import numpy as np
import pytest
from safetensors.numpy import save_file
from tqdm import tqdm as real_tqdm

import fapm
import fapm._progress
from conftest import copy_dict, read_np


class Recorder(real_tqdm):
    """tqdm, recording every bar made and the count after each update."""

    bars = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []
        self.delay_asked = kwargs.get("delay")
        Recorder.bars.append(self)

    def update(self, n=1):
        super().update(n)
        self.seen.append(self.n)


@pytest.fixture
def bars(monkeypatch):
    Recorder.bars = []
    monkeypatch.setattr(fapm._progress, "tqdm_class", lambda: Recorder)
    for v in fapm._progress.DISABLE_VARS + ("TQDM_DISABLE",):
        monkeypatch.delenv(v, raising=False)
    return Recorder.bars


def _one(bars, desc):
    (bar,) = [b for b in bars if b.desc == desc]
    return bar


def _ends_at_total(bar, steps_at_least=1):
    assert bar.total and bar.total > 0
    assert bar.seen == sorted(bar.seen), "never goes back"
    assert len(bar.seen) >= steps_at_least
    assert bar.seen[-1] == bar.total


def test_load_patch_and_iter_patches_advance_to_their_total(cases, bars):
    c = cases("sharded")
    # One step per tensor that has bytes (one has none: shape [0, 8]).
    names = [t for t in fapm.inspect(c.delta)["tensors"] if t["numel"]]
    fapm.load_file(c.delta, c.base, progress=True)
    bar = _one(bars, "fapm load")
    _ends_at_total(bar, steps_at_least=len(names))
    assert bar.delay_asked == 0  # progress=True: at once
    target = read_np(c.base)
    fapm.patch_(target, c.delta, progress=True)
    _ends_at_total(_one(bars, "fapm patch"), steps_at_least=len(names))
    target = read_np(c.base)
    for _ in fapm.iter_patches(c.delta, target, progress=True):
        pass
    _ends_at_total(_one(bars, "fapm patches"), steps_at_least=len(names))
    assert all(b.disable or b.n == b.total for b in bars)


@pytest.mark.parametrize("pair", ["sharded", "single", "resized-bf16"])
def test_prune_apply_verify_report_from_rust(cases, bars, tmp_path, pair):
    """Also with tensors that grew (added tokens): their added rows have no base to count."""
    c = cases(pair)
    fapm.prune(c.base, c.finetuned, tmp_path / "d.fapm", progress=True)
    _ends_at_total(_one(bars, "fapm prune"))
    fapm.apply(c.base, tmp_path / "d.fapm", tmp_path / c.applied.name, progress=True)
    _ends_at_total(_one(bars, "fapm apply"))
    fapm.verify(tmp_path / "d.fapm", c.base, progress=True)
    _ends_at_total(_one(bars, "fapm verify"))


def test_default_waits_a_second_and_opt_outs(cases, bars, monkeypatch, capfd):
    c = cases("single")
    fapm.load_file(c.delta, c.base)
    assert _one(bars, "fapm load").delay_asked == fapm._progress.DELAY > 0
    bars.clear()
    fapm.load_file(c.delta, c.base, progress=False)
    assert bars == []
    for var in fapm._progress.DISABLE_VARS:
        monkeypatch.setenv(var, "1")
        fapm.load_file(c.delta, c.base)
        fapm.prune(c.base, c.finetuned, c.delta.parent / "again.fapm", overwrite=True)
        monkeypatch.delenv(var)
        assert bars == []
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        fapm.load_file(c.delta, c.base, progress="yes")
    capfd.readouterr()


def test_real_tqdm_prints_only_when_asked(cases, capfd, monkeypatch, tmp_path):
    c = cases("single")
    for v in fapm._progress.DISABLE_VARS + ("TQDM_DISABLE",):
        monkeypatch.delenv(v, raising=False)
    target = copy_dict(read_np(c.base))
    capfd.readouterr()
    fapm.patch_(target, c.delta, progress=False)
    fapm.load_file(c.delta, c.base, progress=False)
    fapm.prune(c.base, c.finetuned, tmp_path / "a.fapm", progress=False)
    assert capfd.readouterr() == ("", "")
    # By default a call that takes less than a second draws nothing (no bar left at 0%).
    fapm.load_file(c.delta, c.base)
    fapm.prune(c.base, c.finetuned, tmp_path / "b.fapm")
    fapm.apply(c.base, tmp_path / "b.fapm", tmp_path / "b.safetensors")
    assert capfd.readouterr() == ("", "")
    fapm.load_file(c.delta, c.base, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "fapm load" in err and "100%" in err
    fapm.prune(c.base, c.finetuned, tmp_path / "c.fapm", progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "fapm prune: 100%" in err and " 0%" not in err


def test_without_tqdm_nothing_happens(cases, monkeypatch, capfd):
    c = cases("single")
    monkeypatch.setattr(fapm._progress, "tqdm_class", lambda: None)
    capfd.readouterr()
    fapm.load_file(c.delta, c.base, progress=True)
    assert capfd.readouterr() == ("", "")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Eight f32 tensors of 1M elements: a prune that takes more than the first 50 ms poll."""
    tmp = tmp_path_factory.mktemp("progress")
    rng = np.random.default_rng(1)
    base = {f"layer{i}.weight": rng.standard_normal(1 << 20, dtype=np.float32) for i in range(8)}
    ft = {k: v + np.float32(0.01) * rng.standard_normal(v.size, dtype=np.float32) for k, v in base.items()}
    save_file(base, tmp / "base.safetensors")
    save_file(ft, tmp / "ft.safetensors")
    return tmp / "base.safetensors", tmp / "ft.safetensors"


def test_a_callback_that_raises_stops_prune_as_ctrl_c_does(pair, tmp_path):
    """The Rust side calls progress(done, total, current) as it goes; an exception there
    cancels the run, which leaves no output behind."""
    base, ft = pair
    out = tmp_path / "out"
    out.mkdir()
    seen = []
    fapm._fapm.prune(base, ft, out / "d.fapm", progress=lambda *a: seen.append(a))
    done, total, _ = seen[-1]
    assert done == total == 2 * 8 * 4 << 20
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    assert {n for _, _, n in seen} <= {""} | {f"layer{i}.weight" for i in range(8)}
    (out / "d.fapm").unlink()
    calls = []

    def stop(done, total, current):
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fapm._fapm.prune(base, ft, out / "d.fapm", progress=stop)
    assert len(calls) == 1 and calls[0] < total
    assert list(out.iterdir()) == []
