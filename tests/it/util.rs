//! Test helpers: writing safetensors files (with the `safetensors` crate), reading tensors
//! back, running the binary.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fapm_stages::checkpoint::Checkpoint;
use fapm_stages::dtype::DType;
use safetensors::tensor::TensorView;
use safetensors::View;

/// A tensor to write: name, dtype, shape, little-endian bytes.
#[derive(Clone, Debug)]
pub struct T {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl T {
    pub fn new(name: &str, dtype: DType, shape: &[u64], data: Vec<u8>) -> T {
        assert_eq!(data.len() as u64, shape.iter().product::<u64>() * dtype.size() as u64, "{name}");
        T { name: name.into(), dtype, shape: shape.to_vec(), data }
    }
}

/// The `safetensors` crate's name for one of our dtypes.
pub fn st_dtype(dtype: DType) -> safetensors::Dtype {
    serde_json::from_value(serde_json::json!(dtype.name())).expect("a dtype both know")
}

/// Serializes tensors as one safetensors file with the `safetensors` crate, which lays them
/// out as every file it (and Python's `safetensors`) writes: by dtype alignment, then name.
pub fn safetensors_bytes(tensors: &[T], metadata: Option<&str>) -> Vec<u8> {
    let metadata = metadata.map(|m| serde_json::from_str(m).expect("string-to-string metadata"));
    let views = tensors.iter().map(|t| {
        let shape = t.shape.iter().map(|&d| d as usize).collect();
        (t.name.as_str(), TensorView::new(st_dtype(t.dtype), shape, &t.data).expect("a consistent tensor"))
    });
    safetensors::serialize(views, metadata).unwrap()
}

/// Puts tensors in the order [`safetensors_bytes`] lays them out.
pub fn sort_as_written(tensors: &mut [T]) {
    tensors.sort_by(|a, b| st_dtype(b.dtype).cmp(&st_dtype(a.dtype)).then_with(|| a.name.cmp(&b.name)));
}

pub fn write_safetensors(path: &Path, tensors: &[T]) {
    std::fs::write(path, safetensors_bytes(tensors, Some("{\"format\":\"pt\"}"))).unwrap();
}

/// Tensors read back: (name, dtype, shape, bytes) in checkpoint order.
pub type Tensors = Vec<(String, DType, Vec<u64>, Vec<u8>)>;

/// Every tensor of a checkpoint, in order.
pub fn read_tensors(path: &Path) -> Tensors {
    let c = Checkpoint::open(path).unwrap();
    c.tensors().map(|t| (t.info().name.clone(), t.info().dtype, t.info().shape.clone(), t.bytes().to_vec())).collect()
}

/// The fapm binary built for these tests.
pub fn fapm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fapm"))
}

/// Runs fapm with `args`; returns its output.
pub fn run(args: &[&str]) -> Output {
    fapm().args(args).output().unwrap()
}

/// Runs `fapm apply --base BASE --delta DELTA -o OUT -q` and asserts that it succeeds.
pub fn apply_ok(base: &Path, delta: &Path, out: &Path) {
    let o = run(&["apply", "--base", s(base), "--delta", s(delta), "-o", s(out), "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A fixture path under `fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// A tiny deterministic generator (xorshift*), so tests need no extra crates.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-12), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// A pair big enough (2 x 100 MB of F32) that prune takes a while.
pub fn big_pair(dir: &Path) -> (PathBuf, PathBuf) {
    big_pair_shaped(dir, &[25 << 20])
}

/// [`big_pair`] with a given shape (of 25 Mi elements).
pub fn big_pair_shaped(dir: &Path, shape: &[u64]) -> (PathBuf, PathBuf) {
    let n: usize = 25 << 20;
    assert_eq!(shape.iter().product::<u64>(), n as u64);
    let (base, ft) = (dir.join("base.safetensors"), dir.join("ft.safetensors"));
    for (path, shift) in [(&base, 0u32), (&ft, 1)] {
        let shape = shape.iter().map(|&d| d as usize).collect();
        let w = Generated { shape, n, shift };
        safetensors::serialize_to_file([("w", w)], None, path).unwrap();
    }
    (base, ft)
}

/// The one F32 tensor of a [`big_pair`] file, made when the writer asks for its bytes.
struct Generated {
    shape: Vec<usize>,
    n: usize,
    shift: u32,
}

impl View for Generated {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let value = |i: usize| {
            let x = (i as u32).wrapping_mul(2_654_435_761) >> 9;
            x as f32 * 1e-6 + (i as u32 % 7 * self.shift) as f32 * 1e-7
        };
        Cow::Owned(f32s((0..self.n).map(value)))
    }
    fn data_len(&self) -> usize {
        4 * self.n
    }
}

/// Asserts a failed run: exit code 1, one `error:` line on stderr containing every needle.
pub fn assert_error(out: &Output, needles: &[&str], what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
    assert!(stderr.starts_with("error: "), "{what}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{what}: '{n}' not in {stderr}");
    }
    stderr
}

/// Entries of `dir` other than `keep`: temporaries or partial outputs left behind.
pub fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

/// A path as `&str`, for argument lists.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Little-endian F32 bytes.
pub fn f32s(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// A small valid pair: two F32 tensors and an I64 one.
pub fn small_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.safetensors");
    let ft = dir.join("ft.safetensors");
    let b = f32s((0..64).map(|i| i as f32 * 0.25));
    let f = f32s((0..64).map(|i| i as f32 * 0.25 + if i % 3 == 0 { 0.125 } else { 0.0 }));
    let ids: Vec<u8> = (0..4u64).flat_map(u64::to_le_bytes).collect();
    write_safetensors(&base, &[T::new("a", DType::F32, &[8, 8], b.clone()), T::new("b", DType::F32, &[64], b)]);
    write_safetensors(
        &ft,
        &[
            T::new("a", DType::F32, &[8, 8], f.clone()),
            T::new("b", DType::F32, &[64], f),
            T::new("ids", DType::I64, &[4], ids),
        ],
    );
    (base, ft)
}

/// A safetensors file from a literal header and data buffer, written by hand: the tests of
/// malformed files need headers that the `safetensors` crate refuses to write.
pub fn raw_shard(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// A checkpoint of 3,000 tiny identical F32 tensors as both base and fine-tuned, pruned into
/// `dir/d.fapm`: (base, delta). Its table and manifest are large and very compressible.
pub fn many_tiny_tensors(dir: &Path) -> (PathBuf, PathBuf) {
    let tensors: Vec<T> =
        (0..3000).map(|i| T::new(&format!("layer.{i}.weight"), DType::F32, &[2], f32s([1.0, 2.0]))).collect();
    let (base, ft) = (dir.join("b.safetensors"), dir.join("f.safetensors"));
    write_safetensors(&base, &tensors);
    write_safetensors(&ft, &tensors);
    let d = dir.join("d.fapm");
    let out = run(&["prune", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&d), "-q"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (base, d)
}
