//! What the fuzz targets share: turning fuzz input into a delta whose hashes are right (as an
//! attacker who recomputes every hash would write it), a scratch directory for the APIs that
//! take a path, the memory bound, and the path rule of SPEC section 4 as an oracle.
//!
//! # Delta input encoding
//!
//! The first byte chooses how the rest becomes a delta file:
//!
//! - `S`: `[version u8][n u32 LE][n bytes of manifest JSON][blocks]`. The harness walks the
//!   manifest's blocks in file order (tensors, then side files), takes each block's `len` bytes
//!   from `blocks` in turn, and rewrites its `offset` and `hash`; then compresses the manifest
//!   and writes preamble and footer (hash included). So mutations of the manifest and of the
//!   compressed blocks reach the checks behind the hashes.
//! - `s`: as `S`, but offsets and lengths are kept as written and the whole `blocks` region is
//!   kept: only the hashes are recomputed (of whatever bytes each block names, when in range).
//! - `C`: as `S`, but `blocks` holds each block's *decompressed* payload (`raw_len` bytes of
//!   it); the harness compresses it and fills in `offset`, `len`, `raw_len` and `hash`. This
//!   fuzzes the sparse block decoder (varints, gaps, byte planes) directly.
//! - anything else: the rest is the file itself, hashes and all.
//!
//! When the manifest text is not JSON, `S`, `s` and `C` keep it and the blocks as they are.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

/// The memory budget the targets give the readers: small, so that "refused within the
/// budget" is exercised with fuzz-sized inputs.
pub const BUDGET: u64 = 16 << 20;

/// The most memory (peak resident set, KiB) a target process may reach: fapm's default budget
/// (256 MiB, which `verify_delta` uses) plus 64 MiB for the harness and the runtime.
pub const RSS_LIMIT_KIB: i64 = (256 + 64) << 10;

const MAGIC: &[u8; 8] = b"FAPMDLTA";
const END_MAGIC: &[u8; 8] = b"FAPMEND1";
const PREAMBLE_LEN: usize = 16;

/// The scratch directory of this fuzzer instance: `$FAPM_FUZZ_DIR`, or a directory in
/// `/dev/shm` (else the temporary directory) named after the parent process, which is AFL's
/// fork server, so that the children of one fuzzer share one directory. Only one child of an
/// instance runs at a time, so fixed file names inside it do not collide.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = match std::env::var_os("FAPM_FUZZ_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let shm = Path::new("/dev/shm");
                let root = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
                // SAFETY: getppid has no preconditions and cannot fail.
                root.join(format!("fapm-fuzz-{}", unsafe { libc::getppid() }))
            }
        };
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// Writes `bytes` to `name` in the scratch directory (replacing it) and returns its path.
pub fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).expect("write scratch file");
    path
}

/// Empties (or creates) directory `name` in the scratch directory and returns its path.
pub fn fresh_dir(name: &str) -> PathBuf {
    let path = scratch().join(name);
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).expect("scratch directory");
    path
}

/// Panics (a finding) when the process's peak resident set is over [`RSS_LIMIT_KIB`]. Called
/// after every input: the peak only grows, so the input that raised it is the one reported.
pub fn check_memory() {
    // SAFETY: getrusage writes only into the struct it is given.
    let peak = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u.ru_maxrss
    };
    assert!(peak <= RSS_LIMIT_KIB, "peak RSS {peak} KiB is over the {RSS_LIMIT_KIB} KiB bound");
}

/// The delta file that fuzz input `data` stands for (see the module docs).
pub fn delta_file(data: &[u8]) -> Vec<u8> {
    match data.split_first() {
        Some((&mode @ (b'S' | b's' | b'C'), rest)) => structured(mode, rest),
        Some((_, rest)) => rest.to_vec(),
        None => Vec::new(),
    }
}

fn structured(mode: u8, rest: &[u8]) -> Vec<u8> {
    if rest.len() < 5 {
        return rest.to_vec();
    }
    let version = u32::from(rest[0]);
    let n = u32::from_le_bytes(rest[1..5].try_into().unwrap()) as usize;
    let body = &rest[5..];
    let (text, region) = body.split_at(n.min(body.len()));
    match serde_json::from_slice::<Value>(text) {
        Ok(mut manifest) => {
            let blocks = fix_blocks(&mut manifest, mode, region);
            assemble(version, &serde_json::to_vec(&manifest).unwrap(), &blocks)
        }
        Err(_) => assemble(version, text, region),
    }
}

fn fix_blocks(manifest: &mut Value, mode: u8, region: &[u8]) -> Vec<u8> {
    let Value::Object(m) = manifest else { return region.to_vec() };
    let mut lists: Vec<&mut Value> = Vec::new();
    // Tensors' blocks come first in the file, then side files'.
    let (mut tensors, mut sides) = (None, None);
    for (k, v) in m.iter_mut() {
        match k.as_str() {
            "tensors" => tensors = Some(v),
            "side_files" => sides = Some(v),
            _ => {}
        }
    }
    lists.extend(tensors);
    lists.extend(sides);
    let mut objects = Vec::new();
    for list in lists {
        objects.extend(block_objects_of(list));
    }
    let mut out = Vec::new();
    let mut pos = 0usize;
    for b in objects {
        let field = |b: &serde_json::Map<String, Value>, k: &str| b.get(k).and_then(Value::as_u64).unwrap_or(0);
        match mode {
            b's' => {
                let (off, len) = (field(b, "offset") as usize, field(b, "len") as usize);
                let at = off.saturating_sub(PREAMBLE_LEN);
                if let Some(bytes) = region.get(at..at.saturating_add(len)) {
                    b.insert("hash".into(), Value::String(blake3::hash(bytes).to_hex().to_string()));
                }
            }
            b'C' => {
                let take = (field(b, "raw_len") as usize).min(region.len() - pos);
                let raw = &region[pos..pos + take];
                pos += take;
                let packed = zstd::bulk::compress(raw, 1).expect("zstd");
                b.insert("offset".into(), Value::from((PREAMBLE_LEN + out.len()) as u64));
                b.insert("len".into(), Value::from(packed.len() as u64));
                b.insert("raw_len".into(), Value::from(take as u64));
                b.insert("hash".into(), Value::String(blake3::hash(&packed).to_hex().to_string()));
                out.extend_from_slice(&packed);
            }
            _ => {
                let take = (field(b, "len") as usize).min(region.len() - pos);
                let bytes = &region[pos..pos + take];
                pos += take;
                b.insert("offset".into(), Value::from((PREAMBLE_LEN + out.len()) as u64));
                b.insert("len".into(), Value::from(take as u64));
                b.insert("hash".into(), Value::String(blake3::hash(bytes).to_hex().to_string()));
                out.extend_from_slice(bytes);
            }
        }
    }
    if mode == b's' {
        region.to_vec()
    } else {
        out
    }
}

fn block_objects_of(list: &mut Value) -> Vec<&mut serde_json::Map<String, Value>> {
    let mut out = Vec::new();
    if let Value::Array(records) = list {
        for r in records {
            if let Some(Value::Array(blocks)) = r.get_mut("blocks") {
                out.extend(blocks.iter_mut().filter_map(Value::as_object_mut));
            }
        }
    }
    out
}

/// A delta file of format `version`: preamble, `blocks`, the compressed `manifest`, footer.
pub fn assemble(version: u32, manifest: &[u8], blocks: &[u8]) -> Vec<u8> {
    let mut pre = MAGIC.to_vec();
    pre.extend_from_slice(&version.to_le_bytes());
    pre.extend_from_slice(&[0; 4]);
    let packed = zstd::bulk::compress(manifest, 1).expect("zstd");
    let mut footer = Vec::with_capacity(64);
    footer.extend_from_slice(&((PREAMBLE_LEN + blocks.len()) as u64).to_le_bytes());
    footer.extend_from_slice(&(packed.len() as u64).to_le_bytes());
    footer.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
    let mut h = blake3::Hasher::new();
    h.update(&pre);
    h.update(&packed);
    h.update(&footer[..24]);
    footer.extend_from_slice(h.finalize().as_bytes());
    footer.extend_from_slice(END_MAGIC);
    let mut file = pre;
    file.extend_from_slice(blocks);
    file.extend_from_slice(&packed);
    file.extend_from_slice(&footer);
    file
}

/// Splits `data` into at most `max` pieces, each `[len u32 LE][len bytes]` (the last piece
/// takes what is left when its length runs past the end).
pub fn pieces(mut data: &[u8], max: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while out.len() < max && data.len() >= 4 {
        let n = (u32::from_le_bytes(data[..4].try_into().unwrap()) as usize).min(data.len() - 4);
        out.push(&data[4..4 + n]);
        data = &data[4 + n..];
    }
    out
}

/// `[len u32 LE][bytes]`: the inverse of [`pieces`], for making seeds.
pub fn piece(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

/// Unicode format characters (category Cf, Unicode 15.1) and the line and paragraph
/// separators (Zl, Zp): invisible, so SPEC section 4 refuses them in paths.
fn is_invisible(c: char) -> bool {
    matches!(c as u32,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x890..=0x891 | 0x8E2 | 0x180E
        | 0x200B..=0x200F | 0x2028..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF
        | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3
        | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F)
}

/// Weight and pickle formats, which SPEC section 4 says are never side files.
pub const WEIGHT_SUFFIXES: &[&str] = &[
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".gguf",
    ".h5",
    ".msgpack",
    ".onnx",
    ".npy",
    ".npz",
    ".joblib",
    ".tflite",
    ".mlmodel",
    ".ot",
];

/// Why `p` breaks the rule of SPEC section 4 for a path inside a delta, or `None` when it
/// keeps it: relative, `/`-separated, every component non-empty, not `.` or `..` and not
/// starting with `.`, no `\`, no control or invisible character, at most 4096 bytes and 64
/// components. `side_file` adds: not in a weight or pickle format.
pub fn spec_path_violation(p: &str, side_file: bool) -> Option<&'static str> {
    if p.is_empty() {
        return Some("empty");
    }
    if p.len() > 4096 {
        return Some("longer than 4096 bytes");
    }
    if p.split('/').count() > 64 {
        return Some("more than 64 components");
    }
    if p.chars().any(|c| c == '\\' || c.is_control() || is_invisible(c)) {
        return Some("a backslash, control or invisible character");
    }
    if p.split('/').any(|c| c.is_empty() || c.starts_with('.')) {
        return Some("an empty component or one starting with '.'");
    }
    let lower = p.to_ascii_lowercase();
    if side_file && WEIGHT_SUFFIXES.iter().any(|s| lower.ends_with(s)) {
        return Some("a weight or pickle format");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_input_round_trips_into_a_readable_delta() {
        let m = r#"{"tensors":[{"blocks":[{"offset":0,"len":3,"raw_len":3,"hash":""}]}]}"#;
        let mut input = vec![b'S', 2];
        input.extend_from_slice(&(m.len() as u32).to_le_bytes());
        input.extend_from_slice(m.as_bytes());
        input.extend_from_slice(b"abcXYZ");
        let file = delta_file(&input);
        assert_eq!(&file[16..19], b"abc");
        assert_eq!(&file[file.len() - 8..], END_MAGIC);
    }

    #[test]
    fn the_spec_rule_refuses_what_it_names() {
        assert_eq!(spec_path_violation("config.json", true), None);
        assert_eq!(spec_path_violation("tokenizer/vocab.txt", true), None);
        for p in ["", ".git/HEAD", "a/.b", "a//b", "a\u{202e}b", "a\\b", "x.bin", "../x"] {
            assert!(spec_path_violation(p, true).is_some(), "{p:?}");
        }
        assert!(spec_path_violation("a/".repeat(64).trim_end_matches('/'), false).is_none());
        assert!(spec_path_violation("a/".repeat(65).trim_end_matches('/'), false).is_some());
    }
}
