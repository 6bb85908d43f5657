//! Every model `apply` writes is read back by the ecosystem's own reader, the `safetensors`
//! crate, with the tensors fapm means it to hold.

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use crate::util::{fixture, read_tensors, run, s};

/// Every `.safetensors` file under `path` (itself when a file), as paths relative to it.
fn shards(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![PathBuf::new()];
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| PathBuf::from(e.unwrap().file_name()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    out.sort();
    out
}

/// A file as the crate reads it: metadata, and (name, dtype, shape, bytes) in file order.
type Read = (Option<std::collections::HashMap<String, String>>, Vec<(String, String, Vec<usize>, Vec<u8>)>);

fn crate_read(path: &Path) -> Read {
    let bytes = std::fs::read(path).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = metadata
        .offset_keys()
        .into_iter()
        .map(|name| {
            let t = file.tensor(&name).unwrap();
            (name, format!("{:?}", t.dtype()), t.shape().to_vec(), t.data().to_vec())
        })
        .collect();
    (metadata.metadata().clone(), tensors)
}

/// For every fixture pair (one file, sharded with an index, a plain directory, resized
/// vocabularies), at sparsity
/// 0 and 0.9: each output file is read by the crate; it holds the fine-tuned file's tensors
/// (names, order, dtypes, shapes, metadata), with the fine-tuned bytes at sparsity 0 and with
/// the bytes fapm's own reader sees at 0.9.
#[test]
fn every_applied_file_reads_back_with_the_safetensors_crate() {
    let pairs = [
        ("single/base.safetensors", "single/finetuned.safetensors"),
        ("sharded/base", "sharded/finetuned"),
        ("plain/base", "plain/finetuned"),
        ("resized/f32/base.safetensors", "resized/f32/finetuned.safetensors"),
        ("resized/bf16/base", "resized/bf16/finetuned"),
    ];
    for (base, ft) in pairs {
        for sparsity in ["0", "0.9"] {
            let dir = tempfile::tempdir().unwrap();
            let (base, ft) = (fixture(base), fixture(ft));
            let delta = dir.path().join("d.fapm");
            let out = dir.path().join(if ft.is_file() { "out.safetensors" } else { "out" });
            for args in [
                vec!["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "--sparsity", sparsity, "-q"],
                vec!["apply", "--base", s(&base), "--delta", s(&delta), "-o", s(&out), "-q"],
            ] {
                let o = run(&args);
                assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
            }
            let files = shards(&ft);
            assert_eq!(shards(&out), files, "{}", ft.display());
            for file in files {
                let under =
                    |root: &Path| if file.as_os_str().is_empty() { root.to_path_buf() } else { root.join(&file) };
                let (got, want) = (under(&out), under(&ft));
                let what = format!("{} at sparsity {sparsity}", got.display());
                let (meta, tensors) = crate_read(&got);
                let (want_meta, want_tensors) = crate_read(&want);
                assert_eq!(meta, want_meta, "{what}");
                let layout = |t: &Vec<(String, String, Vec<usize>, Vec<u8>)>| {
                    t.iter().map(|(n, d, s, _)| (n.clone(), d.clone(), s.clone())).collect::<Vec<_>>()
                };
                assert_eq!(layout(&tensors), layout(&want_tensors), "{what}");
                if sparsity == "0" {
                    assert!(tensors == want_tensors, "{what}: bytes differ from the fine-tuned model");
                }
                let ours: Vec<Vec<u8>> = read_tensors(&got).into_iter().map(|t| t.3).collect();
                let theirs: Vec<Vec<u8>> = tensors.into_iter().map(|t| t.3).collect();
                assert!(ours == theirs, "{what}: the two readers disagree");
            }
        }
    }
}
