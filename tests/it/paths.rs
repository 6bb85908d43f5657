//! Paths inside a delta (SPEC section 4, issue 19): side files are data, never a planted git
//! repository, hidden files, weights or pickles in disguise; every path is bounded and checked
//! in linear time; invisible characters never print raw; code travels but is always named.
//! Crafted deltas have every hash recomputed (`hostile::pack`), so each edit reaches the path
//! rules themselves.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use fapm_stages::format::{DeltaReader, SideFile};

use crate::hostile::{pack, prune_json, sub_shard_delta, unpack, Unpacked};
use crate::util::*;

/// A side file to craft: its path and contents.
type File<'a> = (&'a str, &'a [u8]);

/// `u` with its side files replaced by `files`.
fn with_side_files(u: &Unpacked, files: &[File]) -> Unpacked {
    let mut c = Unpacked { m: u.m.clone(), tensors: u.tensors.clone(), side: Vec::new() };
    let proto = u.m.side_files[0].clone();
    c.m.side_files = files.iter().map(|(p, _)| SideFile { path: (*p).into(), ..proto.clone() }).collect();
    c.side = files.iter().map(|(_, d)| d.to_vec()).collect();
    c
}

/// `verify`, `inspect`, `inspect --json` and `apply` of `delta` each exit 1 with one `error:`
/// line that names the delta and holds `needle`, within `limit` of wall time each, and leave
/// nothing at the output.
fn refused(delta: &Path, base: &Path, needle: &str, what: &str, limit: Duration) {
    let out = delta.with_file_name("refused-out");
    let (d, b, o) = (s(delta), s(base), s(&out));
    let name = delta.file_name().unwrap().to_str().unwrap();
    for args in [
        vec!["verify", d],
        vec!["inspect", d],
        vec!["inspect", d, "--json"],
        vec!["apply", "--base", b, "--delta", d, "-o", o, "-q"],
    ] {
        let start = Instant::now();
        let run = run(&args);
        let took = start.elapsed();
        let err = assert_error(&run, &[name, needle], &format!("{what}: {args:?}"));
        assert!(run.stdout.is_empty(), "{what}: {args:?} printed {:?}", String::from_utf8_lossy(&run.stdout));
        assert!(took < limit, "{what}: {args:?} took {took:?}: {err}");
        eprintln!("{what}: {} refused in {took:?}", args[0]);
    }
    assert!(!out.exists(), "{what}: output written");
}

/// The limit for a refusal: far above the milliseconds it takes, far below the minutes the
/// quadratic check took (a loaded machine runs slow).
const QUICK: Duration = Duration::from_secs(5);

/// Every hostile path is refused by every reader; each has a valid twin that is accepted.
/// On main `apply` wrote `.git/config` (whose `core.fsmonitor` runs at the next
/// `git status`), `model.safetensors` beside the verified shards, and pickles.
#[test]
fn hostile_side_file_paths_are_refused_by_every_reader() {
    let dir = tempfile::tempdir().unwrap();
    let (base_dir, _, delta) = sub_shard_delta(dir.path());
    let u = unpack(&delta);
    let fsmonitor: &[u8] = b"[core]\n\tfsmonitor = touch /tmp/pwned\n";
    let long = format!("{}.txt", "a".repeat(4093)); // 4097 bytes
    let deep = format!("{}/f.txt", vec!["d"; 64].join("/")); // 65 components
    let cases: Vec<(Vec<File>, &str)> = vec![
        (vec![(".git/HEAD", b"ref: refs/heads/main\n"), (".git/config", fsmonitor)], "starting with '.'"),
        (vec![("a/.hidden", b"x")], "starting with '.'"),
        (vec![("model.safetensors", b"x")], "weight or pickle format (.safetensors)"),
        (vec![("training_args.bin", b"x")], "weight or pickle format (.bin)"),
        (vec![("x.PT", b"x")], "weight or pickle format (.PT)"),
        (vec![("tokenizer/embeddings.npy", b"x")], "weight or pickle format (.npy)"),
        (vec![(&long, b"x")], "4097 bytes long"),
        (vec![(&deep, b"x")], "more than 64 components"),
        (vec![("config.json\u{200b}", b"x")], "U+200B"),
        (vec![("note\u{202e}txt.md", b"x")], "U+202E"),
        (vec![("\u{feff}config.json", b"x")], "U+FEFF"),
        (vec![("a\u{2028}b.txt", b"x")], "U+2028"),
        (vec![("sub/model.safetensors", b"x")], "side file"),
        (vec![("sub/model.safetensors/x.json", b"x")], "inside the file 'sub/model.safetensors'"),
        (vec![("model.safetensors.index.json", b"{}")], "named twice"),
    ];
    let bad = dir.path().join("bad.fapm");
    for (files, needle) in &cases {
        pack(&with_side_files(&u, files), &bad);
        let what = format!("{:?}", files.iter().map(|f| f.0.escape_default().to_string()).collect::<Vec<_>>());
        refused(&bad, &base_dir, needle, &what, QUICK);
    }

    // A side file whose path is a shard's, or lies inside one: the shard renamed to a
    // name without an extension, so that only the uniqueness rule can catch them.
    let mut renamed = Unpacked { m: u.m.clone(), tensors: u.tensors.clone(), side: u.side.clone() };
    renamed.m.shards[0].name = "sub/weights".into();
    let good = dir.path().join("renamed.fapm");
    pack(&renamed, &good);
    assert!(run(&["verify", s(&good)]).status.success(), "the renamed shard alone is valid");
    for (p, needle) in [("sub/weights", "named twice"), ("sub/weights/config.json", "inside the file 'sub/weights'")] {
        let mut c = with_side_files(&renamed, &[(p, b"x")]);
        c.m.shards[0].name = "sub/weights".into();
        pack(&c, &bad);
        refused(&bad, &base_dir, needle, p, QUICK);
    }

    // The valid twins: data files and code, accepted, the code named everywhere.
    let twin = with_side_files(
        &u,
        &[("config.json", b"{}"), ("tokenizer/vocab.txt", b"a\nb\n"), ("a.py", b"print(1)\n"), ("x.json", b"[]")],
    );
    let good = dir.path().join("good.fapm");
    pack(&twin, &good);
    let o = run(&["verify", s(&good), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["code_files"], serde_json::json!(["a.py"]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("this delta ships code: a.py"));
    let o = run(&["inspect", s(&good)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("this delta ships code: a.py"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("side file a.py") && l.ends_with("code")), "{text}");
    let o = run(&["inspect", s(&good), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["code_files"], serde_json::json!(["a.py"]));
    let out = dir.path().join("out");
    let o = run(&["apply", "--base", s(&base_dir), "--delta", s(&good), "-o", s(&out), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("code     this delta ships code: a.py"));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["code_files"], serde_json::json!(["a.py"]));
    assert_eq!(fs::read(out.join("tokenizer/vocab.txt")).unwrap(), b"a\nb\n");
    assert_eq!(fs::read(out.join("a.py")).unwrap(), b"print(1)\n");
}

/// A delta of a few KB with one side file path of a million components: on main every
/// reader hashed every prefix of it (quadratic: minutes, deaf to Ctrl-C and SIGTERM). Now its
/// length refuses it at once.
#[test]
fn a_path_of_a_million_components_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (base_dir, _, delta) = sub_shard_delta(dir.path());
    let u = unpack(&delta);
    let huge = vec!["a"; 1_000_000].join("/");
    let mut c = with_side_files(&u, &[(&huge, b"x")]);
    // Incompressible text, so that the manifest passes the decompression-bomb ratio and
    // reaches the path check.
    let mut rng = Rng(19);
    c.m.tool = (0..1500).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
    let bad = dir.path().join("huge.fapm");
    pack(&c, &bad);
    assert!(fs::metadata(&bad).unwrap().len() < 8 << 10, "a few KB of delta");
    refused(&bad, &base_dir, "1999999 bytes long", "a million components", QUICK);
}

/// Tensor names are not paths, so a delta may hold invisible characters in them; they are
/// escaped wherever they print, and `--json` keeps their meaning (a surrogate pair above
/// U+FFFF). Two tensors `w` and `w` + U+200B never look the same.
#[test]
fn invisible_characters_in_names_are_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, delta) = sub_shard_delta(dir.path());
    let mut u = unpack(&delta);
    let evil = ["a\u{200b}", "b\u{feff}\u{e0001}"];
    for (t, name) in u.m.tensors.iter_mut().zip(evil) {
        let header = u.m.shards[t.shard].header.replace(&format!("\"{}\"", t.name), &format!("\"{name}\""));
        u.m.shards[t.shard].header = header;
        t.name = name.into();
    }
    let bad = dir.path().join("names.fapm");
    pack(&u, &bad);
    let o = run(&["inspect", s(&bad)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("a\\u{200b}") && text.contains("b\\u{feff}\\u{e0001}"), "{text}");
    let o = run(&["inspect", s(&bad), "--json"]);
    let raw = String::from_utf8(o.stdout).unwrap();
    for c in ['\u{200b}', '\u{feff}', '\u{e0001}'] {
        assert!(!raw.contains(c), "{raw:?}");
    }
    let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let names: Vec<&str> = v["tensors"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names[..2], evil);
}

/// `prune` embeds data and code, never hidden files, weights or pickles: each left out is
/// named with its reason in a warning, the summary and `--json`; code is named.
#[test]
fn prune_leaves_out_hidden_files_weights_and_pickles() {
    let dir = tempfile::tempdir().unwrap();
    let (base_dir, ft_dir, _) = sub_shard_delta(dir.path());
    fs::create_dir_all(ft_dir.join(".git")).unwrap();
    fs::write(ft_dir.join(".git/config"), b"[core]\n\tfsmonitor = touch /tmp/pwned\n").unwrap();
    fs::write(ft_dir.join(".gitattributes"), b"*.bin filter=lfs\n").unwrap();
    for f in ["training_args.bin", "optimizer.pt", "rng_state.pth", "x.npy", "extra.safetensors"] {
        fs::write(ft_dir.join(f), b"\x80\x04pickle").unwrap();
    }
    fs::create_dir_all(ft_dir.join("tools")).unwrap();
    fs::write(ft_dir.join("run.py"), b"print('hi')\n").unwrap();
    fs::write(ft_dir.join("tools/gen.py"), b"pass\n").unwrap();
    let out = dir.path().join("p.fapm");
    let (json, stderr) = prune_json(&base_dir, &ft_dir, &out);
    assert_eq!(json["embedded_side_files"], serde_json::json!(["config.json", "run.py", "tools/gen.py"]), "{stderr}");
    assert_eq!(json["code_files"], serde_json::json!(["run.py", "tools/gen.py"]));
    let left: Vec<(String, String)> = json["left_out_side_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["path"].as_str().unwrap().into(), l["reason"].as_str().unwrap().into()))
        .collect();
    let paths: Vec<&str> = left.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(
        paths,
        [".git/", ".gitattributes", "extra.safetensors", "optimizer.pt", "rng_state.pth", "training_args.bin", "x.npy"]
    );
    for (p, reason) in &left {
        let expected = if p.starts_with('.') {
            "starting with '.'".to_string()
        } else {
            format!("(.{})", p.rsplit('.').next().unwrap())
        };
        assert!(reason.contains(&expected), "{p}: {reason}");
        // Named in a warning and in the summary.
        assert!(stderr.lines().any(|l| l.contains("WARN") && l.contains(p.as_str())), "{p}: {stderr}");
        assert!(stderr.lines().any(|l| l.starts_with("left out") && l.contains(p.as_str())), "{p}: {stderr}");
    }
    assert!(stderr.contains("code     this delta ships code: run.py, tools/gen.py"), "{stderr}");
    let m = DeltaReader::open(&out).unwrap().manifest;
    let carried: Vec<&str> = m.side_files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(carried, ["config.json", "run.py", "tools/gen.py"]);
    // And what it wrote applies, with the code named.
    let o = run(&["apply", "--base", s(&base_dir), "--delta", s(&out), "-o", s(&dir.path().join("o"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("this delta ships code: run.py, tools/gen.py"));
    assert!(!dir.path().join("o/.git").exists() && !dir.path().join("o/training_args.bin").exists());
}

/// The golden deltas, written before these rules, hold no path they refuse.
#[test]
fn golden_deltas_still_verify() {
    let mut n = 0;
    for e in fs::read_dir(fixture("golden")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "fapm") {
            let o = run(&["verify", s(&p)]);
            assert!(o.status.success(), "{}: {}", p.display(), String::from_utf8_lossy(&o.stderr));
            n += 1;
        }
    }
    assert!(n > 0, "no golden deltas found");
}
