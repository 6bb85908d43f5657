"""Repo ids, checked against the real ``huggingface_hub``: a Hugging Face cache laid out on disk
(refs, snapshots of symlinks into blobs, several revisions) holding the fixtures; every
resolution fapm makes is the one ``try_to_load_from_cache`` and ``scan_cache_dir`` make; prune ->
card -> apply by repo id -> verify, from the command line and from Python, bit for bit the
path-based run; ``ModelCard.load`` reads the card. No server: nothing here downloads (the docs
say what that leaves untested)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, scan_cache_dir, try_to_load_from_cache

import fapm

from conftest import FIXTURES, run

BASE, FT = FIXTURES / "sharded/base", FIXTURES / "sharded/finetuned"


def commit(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


def cache_repo(cache: Path, repo: str, sha: str, refs, src: Path) -> Path:
    """Puts ``src`` into ``cache`` as commit ``sha`` of ``repo``, as huggingface_hub stores a
    download: blobs named by content hash, a snapshot of relative symlinks, refs/NAME -> sha."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / sha
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, root / "blobs" / blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(rel.parts) + 1)) / "blobs" / blob)
    for r in refs:
        (root / "refs" / r).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / r).write_text(sha)
    return snap


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A cache with the sharded fixture's base (main) and fine-tune (main, and a second
    revision v2 that is the plain fixture), offline, as the process's environment."""
    cache = tmp_path / "hub"
    cache_repo(cache, "org/base", commit("base"), ["main"], BASE)
    cache_repo(cache, "org/ft", commit("ft"), ["main"], FT)
    cache_repo(cache, "org/ft", commit("ft2"), ["v2"], FIXTURES / "plain/finetuned")
    for k in ("HF_HOME", "HF_TOKEN", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def test_resolution_is_huggingface_hubs(hub):
    # Each name fapm resolves is the snapshot huggingface_hub finds for that file.
    for name, repo, rev, probe in [
        ("org/base", "org/base", None, "model.safetensors.index.json"),
        ("org/ft", "org/ft", None, "config.json"),
        ("org/ft@v2", "org/ft", "v2", "config.json"),
        (f"org/ft@{commit('ft2')}", "org/ft", commit("ft2"), "config.json"),
        ("hf://org/ft@main", "org/ft", "main", "config.json"),
    ]:
        want = try_to_load_from_cache(repo, probe, cache_dir=str(hub), revision=rev)
        assert isinstance(want, str), (name, want)
        got = fapm._fapm.Checkpoint(name).path
        assert Path(got) == Path(want).parent, name
        # and the file fapm would read is the same blob
        assert (Path(got) / probe).resolve() == Path(want).resolve()
    # The cache as huggingface_hub scans it: every revision fapm can name, with its refs.
    info = scan_cache_dir(hub)
    seen = {(r.repo_id, rev.commit_hash, frozenset(rev.refs)) for r in info.repos for rev in r.revisions}
    assert ("org/ft", commit("ft2"), frozenset({"v2"})) in seen
    for repo_id, sha, refs in seen:
        for ref in refs | {sha}:
            assert Path(fapm._fapm.Checkpoint(f"{repo_id}@{ref}").path).name == sha


def test_prune_card_apply_by_repo_id(hub, tmp_path, fapm_bin):
    d = tmp_path / "d.fapm"
    s = fapm.prune("org/base", "org/ft", str(d))
    assert s["command"] == "prune"
    info = fapm.inspect(str(d))
    assert info["version"] == 3
    assert info["base_repo"] == {"repo": "org/base", "revision": "main", "commit": commit("base")}
    assert info["finetuned_repo"]["commit"] == commit("ft")

    folder = tmp_path / "card"
    fapm.card(str(d), str(folder), repo_id="me/ft-fapm")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "org/base"
    assert card.data.library_name == "fapm"
    assert "sparse-delta" in card.data.tags
    cache_repo(hub, "me/ft-fapm", commit("delta"), ["main"], folder)
    assert try_to_load_from_cache("me/ft-fapm", "d.fapm", cache_dir=str(hub)) == str(
        Path(fapm._fapm.Delta("me/ft-fapm").path)
    )

    # The path-based run, from the command line.
    by_path, want = tmp_path / "p.fapm", tmp_path / "want"
    run(fapm_bin, "prune", "--base", BASE, "--finetuned", FT, "-o", by_path, "-q")
    run(fapm_bin, "apply", "--base", BASE, "--delta", by_path, "-o", want, "-q")

    # By repo id, without a base: from the command line and from Python.
    out_cli, out_py = tmp_path / "cli", tmp_path / "py"
    run(fapm_bin, "apply", "--delta", "me/ft-fapm", "-o", out_cli, "-q")
    fapm.apply(None, "me/ft-fapm", str(out_py))
    for out in (out_cli, out_py):
        for f in want.rglob("*"):
            if f.is_file():
                assert (out / f.relative_to(want)).read_bytes() == f.read_bytes(), f
    v = fapm.verify("me/ft-fapm")
    assert v["base_tensors_checked"] > 0
    assert fapm.verify("me/ft-fapm", delta_only=True)["base_tensors_checked"] == 0

    # Python loads and patches by repo id, finding the base the delta records.
    tensors = fapm.load_file("me/ft-fapm")
    import safetensors.numpy

    for shard in want.glob("*.safetensors"):
        for name, arr in safetensors.numpy.load_file(str(shard)).items():
            assert tensors[name].tobytes() == arr.tobytes() and tensors[name].shape == arr.shape, name
    model = {}
    for shard in Path(fapm._fapm.Checkpoint("org/base").path).glob("*.safetensors"):
        model.update(safetensors.numpy.load_file(str(shard)))
    fapm.patch_(model, "me/ft-fapm")
    for name, arr in tensors.items():
        assert model[name].tobytes() == arr.tobytes(), name


def test_offline_and_unknown_repos_are_named(hub, tmp_path):
    with pytest.raises(fapm.FapmError, match=r"org/nothing@main is not in the Hugging Face cache .* HF_HUB_OFFLINE is set; fetch it with: hf download org/nothing --revision main"):
        fapm.load_file("org/nothing")
    with pytest.raises(fapm.FapmError, match="does not record its base"):
        d = tmp_path / "local.fapm"
        fapm.prune(str(BASE), str(FT), str(d))
        fapm.load_file(str(d))


def test_a_local_path_shadows_a_repo_id(hub, tmp_path):
    # tmp_path is the working directory: a folder org/base there is what "org/base" names.
    shutil.copytree(FIXTURES / "plain/base", tmp_path / "org/base")
    assert Path(fapm._fapm.Checkpoint("org/base").path) == Path("org/base")
    assert Path(fapm._fapm.Checkpoint("hf://org/base").path).name == commit("base")
