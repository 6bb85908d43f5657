//! Models and deltas named by Hugging Face repo id, found in a cache laid out on disk as
//! `huggingface_hub` lays it out (refs, snapshots of symlinks, blobs, several revisions). The
//! same layouts are checked against the real `huggingface_hub` in python/tests/test_hub.py.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::util::{fapm, fixture, s};

/// A commit id made from a label, as the Hub's are: 40 hexadecimal digits.
pub fn commit(label: &str) -> String {
    blake3::hash(label.as_bytes()).to_hex()[..40].to_owned()
}

/// Puts every file under `src` into `cache` as revision `commit` of `repo`, the way
/// `huggingface_hub` downloads them: content-addressed blobs, a snapshot of relative symlinks
/// into them, and `refs/REV` holding the commit for each of `refs`.
pub fn cache_repo(cache: &Path, repo: &str, commit: &str, refs: &[&str], src: &Path) -> PathBuf {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = dir.join("snapshots").join(commit);
    for entry in walk(src) {
        let rel = entry.strip_prefix(src).unwrap();
        let bytes = fs::read(&entry).unwrap();
        let blob = blake3::hash(&bytes).to_hex().to_string();
        fs::create_dir_all(dir.join("blobs")).unwrap();
        fs::write(dir.join("blobs").join(&blob), &bytes).unwrap();
        let link = snapshot.join(rel);
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        let up = "../".repeat(rel.components().count() + 1);
        std::os::unix::fs::symlink(format!("{up}blobs/{blob}"), &link).unwrap();
    }
    for r in refs {
        let path = dir.join("refs").join(r);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, commit).unwrap();
    }
    snapshot
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// fapm with the cache at `cache`, offline unless `online`, from working directory `cwd`.
fn hub_fapm(cache: &Path, cwd: &Path, args: &[&str]) -> Output {
    hub_cmd(cache, cwd).env("HF_HUB_OFFLINE", "1").args(args).output().unwrap()
}

fn hub_cmd(cache: &Path, cwd: &Path) -> Command {
    let mut c = fapm();
    c.env_remove("HF_HOME").env_remove("HF_TOKEN").env("HF_HUB_CACHE", cache).current_dir(cwd);
    c
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn fails(o: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
    err
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap()
}

fn same_tree(a: &Path, b: &Path) {
    let mut x: Vec<_> = walk(a).iter().map(|p| p.strip_prefix(a).unwrap().to_path_buf()).collect();
    let mut y: Vec<_> = walk(b).iter().map(|p| p.strip_prefix(b).unwrap().to_path_buf()).collect();
    x.sort();
    y.sort();
    assert_eq!(x, y);
    for rel in x {
        assert!(fs::read(a.join(&rel)).unwrap() == fs::read(b.join(&rel)).unwrap(), "{}", rel.display());
    }
}

/// Prune by repo id -> card -> apply by the card's repo id with no base -> verify: the model
/// is bit for bit the one of the path-based run, and the delta records both repositories.
#[test]
fn repo_ids_from_prune_to_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, work) = (dir.path().join("cache"), dir.path().join("work"));
    fs::create_dir_all(&work).unwrap();
    let (cb, cf) = (commit("base"), commit("ft"));
    cache_repo(&cache, "org/base", &cb, &["main"], &fixture("sharded/base"));
    cache_repo(&cache, "org/ft", &cf, &["main"], &fixture("sharded/finetuned"));
    let d = work.join("d.fapm");
    ok(hub_fapm(&cache, &work, &["prune", "--base", "org/base", "--finetuned", "org/ft", "-o", s(&d), "-q"]));
    let v = json(&ok(hub_fapm(&cache, &work, &["inspect", s(&d), "--json"])));
    assert_eq!(v["version"], 3);
    assert_eq!(v["base_repo"], serde_json::json!({"repo": "org/base", "revision": "main", "commit": cb}));
    assert_eq!(v["finetuned_repo"]["commit"], serde_json::json!(cf));

    // The same prune from the fixtures' paths gives the same model.
    let by_path = work.join("path.fapm");
    let (b, f) = (fixture("sharded/base"), fixture("sharded/finetuned"));
    ok(hub_fapm(&cache, &work, &["prune", "--base", s(&b), "--finetuned", s(&f), "-o", s(&by_path), "-q"]));
    let want = work.join("want");
    ok(hub_fapm(&cache, &work, &["apply", "--base", s(&b), "--delta", s(&by_path), "-o", s(&want), "-q"]));

    let folder = work.join("folder");
    let o = ok(hub_fapm(&cache, &work, &["card", s(&d), "-o", s(&folder), "--repo-id", "me/ft-fapm", "--json"]));
    assert_eq!(json(&o)["base_model"], "org/base");
    let readme = fs::read_to_string(folder.join("README.md")).unwrap();
    assert!(readme.starts_with("---\nbase_model: org/base\nlibrary_name: fapm\n"), "{readme}");
    assert!(readme.contains(&cb) && readme.contains("fapm apply --delta me/ft-fapm --output model/"));
    assert!(readme.contains("fapm.patch_(model, \"me/ft-fapm\")"));
    cache_repo(&cache, "me/ft-fapm", &commit("delta"), &["main"], &folder);

    let out = work.join("out");
    let o = ok(hub_fapm(&cache, &work, &["apply", "--delta", "me/ft-fapm", "-o", s(&out)]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("org/base@{cb} (the base the delta records")), "{err}");
    same_tree(&out, &want);
    // A delta folder on disk works as well as its repo id; verify finds the base too.
    let o = ok(hub_fapm(&cache, &work, &["verify", "me/ft-fapm", "--json"]));
    assert!(json(&o)["base_tensors_checked"].as_u64().unwrap() > 0);
    let o = ok(hub_fapm(&cache, &work, &["verify", s(&folder), "--delta-only", "--json"]));
    assert_eq!(json(&o)["base_tensors_checked"], 0);
}

/// Revisions: `@REV`, `--revision`, a commit id; an existing local path wins over a repo id and
/// `hf://` forces the repo.
#[test]
fn revisions_and_local_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, work) = (dir.path().join("cache"), dir.path().join("work"));
    let (c1, c2) = (commit("one"), commit("two"));
    cache_repo(&cache, "org/base", &c1, &["main"], &fixture("sharded/base"));
    cache_repo(&cache, "org/ft", &c1, &["main"], &fixture("sharded/finetuned"));
    cache_repo(&cache, "org/ft", &c2, &["v2", "refs/pr/1"], &fixture("plain/finetuned"));
    // A local directory named like the repo id shadows it.
    fs::create_dir_all(work.join("org")).unwrap();
    copy_dir(&fixture("plain/base"), &work.join("org/base"));
    let d = work.join("d.fapm");
    let prune = |base: &str, ft: &str| {
        hub_fapm(&cache, &work, &["prune", "--base", base, "--finetuned", ft, "-o", s(&d), "-q", "--overwrite"])
    };
    let recorded = |key: &str| json(&ok(hub_fapm(&cache, &work, &["inspect", s(&d), "--json"])))[key].clone();

    ok(prune("org/base", "org/ft@v2"));
    assert!(recorded("base_repo").is_null(), "the local org/base is used");
    assert_eq!(recorded("finetuned_repo"), serde_json::json!({"repo": "org/ft", "revision": "v2", "commit": c2}));
    ok(prune("hf://org/base", &format!("org/ft@{c1}")));
    assert_eq!(recorded("base_repo")["commit"], serde_json::json!(c1));
    assert_eq!(recorded("finetuned_repo")["revision"], serde_json::json!(c1));
    ok(prune("org/base", "org/ft@refs/pr/1"));
    assert_eq!(recorded("finetuned_repo")["commit"], serde_json::json!(c2));

    // --revision names the delta's revision; with @REV too, they must agree.
    cache_repo(&cache, "me/delta", &c2, &["v1"], &{
        let folder = work.join("folder");
        ok(hub_fapm(&cache, &work, &["card", s(&d), "-o", s(&folder)]));
        folder
    });
    ok(hub_fapm(&cache, &work, &["inspect", "me/delta", "--revision", "v1"]));
    ok(hub_fapm(&cache, &work, &["inspect", "me/delta@v1"]));
    fails(
        &hub_fapm(&cache, &work, &["inspect", "me/delta@v1", "--revision", "v2"]),
        &["names revision 'v1' and --revision 'v2'"],
    );
    fails(
        &hub_fapm(&cache, &work, &["inspect", "me/delta"]),
        &["me/delta@main is not in the Hugging Face cache", "hf download me/delta --revision main"],
    );
}

fn copy_dir(from: &Path, to: &Path) {
    for f in walk(from) {
        let dest = to.join(f.strip_prefix(from).unwrap());
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::copy(&f, dest).unwrap();
    }
}

/// Offline, unknown, unreachable and incomplete repositories: one line that names the repo,
/// the revision and the command that fetches it; nothing written.
#[test]
fn missing_repositories_are_named_with_their_fetch_command() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, work) = (dir.path().join("cache"), dir.path().to_path_buf());
    let d = work.join("d.fapm");
    let (plain_base, plain_ft) = (fixture("plain/base"), fixture("plain/finetuned"));
    let (sharded_base, sharded_ft) = (fixture("sharded/base"), fixture("sharded/finetuned"));
    let args = ["prune", "--base", "org/nothing@v3", "--finetuned", s(&plain_ft), "-o", s(&d)];
    fails(
        &hub_fapm(&cache, &work, &args),
        &[
            "org/nothing@v3 is not in the Hugging Face cache",
            "HF_HUB_OFFLINE is set",
            "hf download org/nothing --revision v3 --include '*.safetensors'",
        ],
    );
    // Online, at an endpoint where nothing listens: the fetch fails, and says so.
    let o = hub_cmd(&cache, &work)
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .args(args)
        .output()
        .unwrap();
    fails(&o, &["org/nothing@v3 is not in the Hugging Face cache", "fetching it from http://127.0.0.1:9 failed"]);
    // A snapshot that lacks a shard its index names is incomplete.
    let snap = cache_repo(&cache, "org/partial", &commit("p"), &["main"], &sharded_base);
    fs::remove_file(snap.join("model-00002-of-00002.safetensors")).unwrap();
    let args = ["prune", "--base", "org/partial", "--finetuned", s(&sharded_ft), "-o", s(&d)];
    fails(&hub_fapm(&cache, &work, &args), &["org/partial@main is not in the Hugging Face cache"]);
    // A delta without a recorded base needs --base.
    ok(hub_fapm(&cache, &work, &["prune", "--base", s(&plain_base), "--finetuned", s(&plain_ft), "-o", s(&d), "-q"]));
    let out = work.join("out");
    fails(
        &hub_fapm(&cache, &work, &["apply", "--delta", s(&d), "-o", s(&out)]),
        &["does not record its base", "--base"],
    );
    assert!(!out.exists());
    // Names that are neither a path nor a valid repo id.
    fails(&hub_fapm(&cache, &work, &["inspect", "hf://a/b/c"]), &["invalid repo id 'a/b/c'"]);
    fails(
        &hub_fapm(&cache, &work, &["inspect", "hf://org/x@a/../b"]),
        &["revision has an empty, '.' or '..' component"],
    );
}

/// Parts of two fine-tunes with one layout (same shard names and headers, different weights)
/// are told apart by their content sample, and merge refuses to join them.
#[test]
fn merge_refuses_parts_of_two_finetunes_with_one_layout() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    copy_dir(&fixture("sharded/finetuned"), &a);
    copy_dir(&fixture("sharded/finetuned"), &b);
    // Change the last byte of b's first shard: a weight, not the header.
    let shard = b.join("model-00001-of-00003.safetensors");
    let mut bytes = fs::read(&shard).unwrap();
    *bytes.last_mut().unwrap() ^= 0x55;
    fs::write(&shard, bytes).unwrap();
    let base = fixture("sharded/base");
    let (p1, p2) = (dir.path().join("p1.fapm"), dir.path().join("p2.fapm"));
    for (ft, part, out) in [(&a, "1/2", &p1), (&b, "2/2", &p2)] {
        ok(crate::util::run(&["prune", "--base", s(&base), "--finetuned", s(ft), "-o", s(out), "--part", part, "-q"]));
    }
    let merged = dir.path().join("m.fapm");
    let o = crate::util::run(&["merge", s(&p1), s(&p2), "-o", s(&merged)]);
    fails(&o, &["fine-tuned checkpoint's contents differs"]);
    assert!(!merged.exists());
}

/// `fapm card --report DIR` quotes the report's whole-model trade-off: one row per point of
/// its report.json, the Pareto points starred; a license is carried from the fine-tune's card.
#[cfg(feature = "report")]
#[test]
fn a_card_quotes_a_report_and_the_finetunes_license() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = (fixture("sharded/base"), fixture("sharded/finetuned"));
    let (d, report, folder) = (dir.path().join("d.fapm"), dir.path().join("report"), dir.path().join("card"));
    ok(crate::util::run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&d), "-q"]));
    ok(crate::util::run(&["report", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&report), "-q"]));
    let card_md = dir.path().join("ft-README.md");
    fs::write(&card_md, "---\nlicense: other\nlicense_name: my-license\ntags: [x]\n---\n# ft\n").unwrap();
    let args = ["card", s(&d), "-o", s(&folder), "--report", s(&report), "--finetuned-card", s(&card_md), "-q"];
    ok(crate::util::run(&args));
    let text = fs::read_to_string(folder.join("README.md")).unwrap();
    let points: serde_json::Value = serde_json::from_slice(&fs::read(report.join("report.json")).unwrap()).unwrap();
    let points = points["points"].as_array().unwrap();
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("| 0.") || l.starts_with("| 1 |")).collect();
    assert_eq!(rows.len(), points.len(), "{text}");
    for (row, p) in rows.iter().zip(points) {
        let (sp, pen) = (p["sparsity"].as_str().unwrap(), p["penalty"].as_str().unwrap());
        assert!(row.starts_with(&format!("| {sp} | {pen} |")), "{row}");
        assert_eq!(row.ends_with("★ |"), p["pareto"].as_bool().unwrap(), "{row}");
    }
    assert!(text.contains("license: other\nlicense_name: my-license\n"), "{text}");
    assert!(fs::read(folder.join("d.fapm")).unwrap() == fs::read(&d).unwrap());
    // A report.json that is not one is refused, naming it; nothing is written.
    fs::write(report.join("report.json"), "{\"fapm_report\": 9, \"points\": []}").unwrap();
    let o = crate::util::run(&["card", s(&d), "-o", s(&dir.path().join("card2")), "--report", s(&report)]);
    fails(&o, &["report.json", "report format 9"]);
    assert!(!dir.path().join("card2").exists());
}

/// Rewrites the delta at `path` as format version 2 would have it: no content sample, version
/// 2 in the manifest and the preamble, the footer's hash recomputed (blocks untouched).
fn as_version_2(path: &Path) {
    let mut file = fs::read(path).unwrap();
    let footer = &file[file.len() - 64..];
    let word = |i: usize| u64::from_le_bytes(footer[i * 8..i * 8 + 8].try_into().unwrap()) as usize;
    let (offset, len, raw) = (word(0), word(1), word(2));
    let text = zstd::bulk::decompress(&file[offset..offset + len], raw).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&text).unwrap();
    m["version"] = 2.into();
    m["part"].as_object_mut().unwrap().remove("finetuned_sample");
    file[8..12].copy_from_slice(&2u32.to_le_bytes());
    fs::write(path, &file).unwrap();
    crate::hostile::with_manifest_text(path, &serde_json::to_vec(&m).unwrap(), path);
}

/// Parts written by an older fapm (format version 2) still verify, but merge, whose output is
/// the delta this fapm's prune writes, refuses them by name (the merge fuzz target found that
/// it joined them into a file its own reader refused).
#[test]
fn merge_refuses_parts_of_an_older_format() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = (fixture("sharded/base"), fixture("sharded/finetuned"));
    let parts: Vec<PathBuf> = (1..=2).map(|i| dir.path().join(format!("p{i}.fapm"))).collect();
    for (i, p) in parts.iter().enumerate() {
        let part = format!("{}/2", i + 1);
        ok(crate::util::run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(p), "--part", &part, "-q"]));
        as_version_2(p);
        ok(crate::util::run(&["verify", s(p), "-q"]));
    }
    let merged = dir.path().join("m.fapm");
    let o = crate::util::run(&["merge", s(&parts[0]), s(&parts[1]), "-o", s(&merged)]);
    fails(&o, &["p1.fapm", "a part of delta format version 2", "prune this part again"]);
    assert!(!merged.exists());
}
