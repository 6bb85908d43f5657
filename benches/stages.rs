//! Per-stage throughput of the byte-level stages on one chunk of a realistic bf16 (or f32)
//! task vector: about 40% of the elements changed, as `gen_pair` makes them.
//!
//! Throughput is bytes of the stage's input per second: both tensors' chunk bytes for
//! scoring, the keys for histograms and selection, the fine-tuned chunk for encode and
//! decode, the raw payload for compression.
//!
//! ```text
//! cargo bench --bench stages
//! ```

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use fapm_stages::dtype::convert_chunk;
use fapm_stages::dtype::DType;
use fapm_stages::format::sparse::{decode_sparse, encode_sparse, encode_sparse_in_pieces, PIECE_BYTES};
use fapm_stages::format::{compress, Payload};
use fapm_stages::hash;
use fapm_stages::threshold::score::{sum_abs, Metric, Scorer};
use fapm_stages::threshold::select::{plan, Bins, Gather, Histogram, Hits, ThresholdMode};

const N: usize = 1 << 20;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        (t >> 64) as u64 ^ t as u64
    }
    fn normal(&mut self) -> f32 {
        let r = self.next();
        let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        (s as f32 * (1.0 / 65536.0) - 2.0) * 1.732_050_8
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A chunk pair: base ~ N(0, 0.02), ft = base + small task vector with 1% larger rows.
fn pair_f32() -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng(7);
    let mut base = Vec::with_capacity(N);
    let mut ft = Vec::with_capacity(N);
    for i in 0..N {
        let b = 0.02 * rng.normal();
        let big = if (i / 2048) % 100 == 0 { 12.0 } else { 1.0 };
        base.push(b);
        ft.push(b + 4e-5 * big * rng.normal());
    }
    (base, ft)
}

fn to_bf16(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect()
}

fn to_f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|&x| x.to_le_bytes()).collect()
}

type Group<'a> = BenchmarkGroup<'a, WallTime>;

/// One chunk of the benchmark pair in the stored dtypes, with a scorer for each.
struct Chunk {
    base: Vec<f32>,
    ft: Vec<f32>,
    base16: Vec<u8>,
    ft16: Vec<u8>,
    base32: Vec<u8>,
    ft32: Vec<u8>,
    s16: Scorer,
    s32: Scorer,
}

impl Chunk {
    fn new() -> Chunk {
        let (base, ft) = pair_f32();
        let (base16, ft16) = (to_bf16(&base), to_bf16(&ft));
        let (base32, ft32) = (to_f32_bytes(&base), to_f32_bytes(&ft));
        let mean = (base.iter().map(|x| x.abs() as f64).sum::<f64>() / N as f64) as f32;
        let s16 = Scorer { ft: DType::BF16, base: DType::BF16, metric: Metric::Fapm, mean, penalty: 1.0 };
        let s32 = Scorer { ft: DType::F32, base: DType::F32, metric: Metric::Fapm, mean, penalty: 1.0 };
        Chunk { base, ft, base16, ft16, base32, ft32, s16, s32 }
    }

    /// The bf16 chunk's keys, and how many elements are candidates.
    fn keys16(&self) -> (Vec<u32>, usize) {
        let mut keys = vec![0u32; N];
        let candidates = self.s16.keys(&self.ft16, &self.base16, &mut keys);
        (keys, candidates)
    }
}

fn stages(c: &mut Criterion) {
    let chunk = Chunk::new();
    let (keys, cand16) = chunk.keys16();
    eprintln!("bf16 chunk: {cand16} of {N} elements changed");

    let mut g = c.benchmark_group("stages");
    g.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(20);
    keys_fapm(&mut g, &chunk);
    keys_fapm_other_density(&mut g, &chunk);
    histogram_add(&mut g, &keys);
    let kept = selection(&mut g, &keys);
    g.throughput(Throughput::Bytes(chunk.base16.len() as u64));
    g.bench_function(BenchmarkId::new("sum_abs", "bf16"), |b| {
        b.iter(|| sum_abs(DType::BF16, black_box(&chunk.base16)))
    });
    let raw = encode(&mut g, &chunk, &kept);
    compress_zstd(&mut g, &raw, kept.len());
    decode(&mut g, &chunk, &raw);
    hash_and_convert(&mut g, &chunk);
    g.finish();
}

/// Scoring both tensors of the chunk, bf16 and f32.
fn keys_fapm(g: &mut Group, chunk: &Chunk) {
    let mut keys = vec![0u32; N];
    g.throughput(Throughput::Bytes((chunk.base16.len() + chunk.ft16.len()) as u64));
    g.bench_function(BenchmarkId::new("keys_fapm", "bf16_bf16"), |b| {
        b.iter(|| chunk.s16.keys(black_box(&chunk.ft16), black_box(&chunk.base16), &mut keys))
    });
    g.throughput(Throughput::Bytes((chunk.base32.len() + chunk.ft32.len()) as u64));
    let mut keys32 = vec![0u32; N];
    g.bench_function(BenchmarkId::new("keys_fapm", "f32_f32"), |b| {
        b.iter(|| chunk.s32.keys(black_box(&chunk.ft32), black_box(&chunk.base32), &mut keys32))
    });
}

/// Same kernels with the other candidate density: every bf16 element changed (d = 1e-3),
/// and half of the f32 elements unchanged (every other element copied from the base).
/// They tell branch mispredictions on the candidate test apart from the per-element cost.
fn keys_fapm_other_density(g: &mut Group, chunk: &Chunk) {
    let Chunk { base, ft, base16, ft16, base32, ft32, s16, s32 } = chunk;
    let ft16_all =
        to_bf16(&base.iter().enumerate().map(|(i, &b)| b + if i % 2 == 0 { 1e-3 } else { -1e-3 }).collect::<Vec<_>>());
    let ft32_half: Vec<u8> = {
        let half: Vec<f32> = ft
            .iter()
            .zip(base)
            .enumerate()
            .map(|(i, (&f, &b))| if splitmix(i as u64) & 1 == 0 { b } else { f })
            .collect();
        to_f32_bytes(&half)
    };
    let mut k2 = vec![0u32; N];
    eprintln!(
        "bf16 all-changed chunk: {} candidates; f32 half chunk: {}",
        s16.keys(&ft16_all, base16, &mut k2),
        s32.keys(&ft32_half, base32, &mut k2)
    );
    g.throughput(Throughput::Bytes((base16.len() + ft16.len()) as u64));
    g.bench_function(BenchmarkId::new("keys_fapm", "bf16_bf16_all_changed"), |b| {
        b.iter(|| s16.keys(black_box(&ft16_all), black_box(base16), &mut k2))
    });
    g.throughput(Throughput::Bytes((base32.len() + ft32.len()) as u64));
    g.bench_function(BenchmarkId::new("keys_fapm", "f32_f32_half_changed"), |b| {
        b.iter(|| s32.keys(black_box(&ft32_half), black_box(base32), &mut k2))
    });
}

/// Histograms of the keys: the high bins, then the low bins within the top one.
fn histogram_add(g: &mut Group, keys: &[u32]) {
    g.throughput(Throughput::Bytes((N * 4) as u64));
    g.bench_function(BenchmarkId::new("histogram_add", "high"), |b| {
        let mut h = Histogram::default();
        b.iter(|| h.add_high(black_box(keys)))
    });
    g.bench_function(BenchmarkId::new("histogram_add", "low_within"), |b| {
        let bin = keys.iter().copied().filter(|&k| k != 0).max().unwrap_or(0) >> 16;
        let mut h = Histogram::default();
        b.iter(|| h.add_low(bin, black_box(keys)))
    });
}

/// The cut that keeps 10% of the chunk, as the pipeline plans it, from a floor that
/// gathers about 12.5% of the chunk (what the sample's floor does on the benchmark pair).
/// Returns the kept indices.
fn selection(g: &mut Group, keys: &[u32]) -> Vec<u32> {
    let k = (N / 10) as u64;
    let mut sorted: Vec<u32> = keys.iter().copied().filter(|&k| k != 0).collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let floor = sorted.get(N / 8).map_or(1, |&k| (k & !0xffff).max(1));
    let mut gather = Gather::default();
    g.throughput(Throughput::Bytes((N * 4) as u64));
    g.bench_function(BenchmarkId::new("gather", "12pct"), |b| {
        let mut high = Histogram::default();
        b.iter(|| {
            gather.start(N);
            for (i, piece) in keys.chunks(4096).enumerate() {
                gather.add(black_box(piece), floor, i * 4096, &mut high);
            }
            gather.finish(&mut high)
        })
    });
    let mut hits = Hits::default();
    let cut = plan::<()>(k, ThresholdMode::Exact, floor, |bins| {
        let mut h = Histogram::default();
        match bins {
            Bins::High { floor } => {
                gather.start(N);
                gather.add(keys, floor, 0, &mut h);
                assert!(gather.finish(&mut h));
                hits.copy_from(&gather);
            }
            Bins::Low { bin } => h.add_low(bin, keys),
        }
        Ok(h)
    })
    .expect("plan");
    eprintln!("gathered {} of {N}", hits.len());
    g.bench_function(BenchmarkId::new("cut_select", "10pct"), |b| {
        let mut kept = vec![0u32; N];
        b.iter(|| cut.select(black_box(keys), u64::MAX, None, &mut kept))
    });
    g.bench_function(BenchmarkId::new("cut_select_hits", "10pct"), |b| {
        let mut kept = vec![0u32; N];
        b.iter(|| cut.select_hits(black_box(&hits), u64::MAX, None, &mut kept))
    });
    let mut kept = vec![0u32; N];
    let n = cut.select(keys, k, None, &mut kept);
    kept.truncate(n);
    eprintln!("kept {} of {N}", kept.len());
    kept
}

/// Encoding the kept values of the bf16 chunk; returns the raw payload.
fn encode(g: &mut Group, chunk: &Chunk, kept: &[u32]) -> Vec<u8> {
    let mut out = chunk.base16.clone();
    let mut raw = Vec::new();
    g.throughput(Throughput::Bytes(chunk.ft16.len() as u64));
    g.bench_function(BenchmarkId::new("encode_sparse", "bf16_10pct"), |b| {
        b.iter(|| encode_sparse(black_box(kept), black_box(&chunk.ft16), &mut out, 2, &mut raw))
    });
    // As the masker does it: the chunk rebuilt a cache-sized piece at a time.
    let mut piece = vec![0u8; PIECE_BYTES];
    g.bench_function(BenchmarkId::new("encode_sparse", "bf16_10pct_in_pieces"), |b| {
        b.iter(|| {
            // The dtypes are the same: the encoder copies the base values itself.
            let fill = |start: usize, out: &mut [u8]| Some(&chunk.base16[2 * start..2 * start + out.len()]);
            encode_sparse_in_pieces(black_box(kept), black_box(&chunk.ft16), 2, &mut raw, &mut piece, fill, |_| {})
        })
    });
    encode_sparse(kept, &chunk.ft16, &mut out, 2, &mut raw);
    raw
}

fn compress_zstd(g: &mut Group, raw: &[u8], kept: usize) {
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function(BenchmarkId::new("compress_zstd", "encoded_10pct"), |b| {
        b.iter(|| compress(black_box(raw), Payload::Sparse))
    });
    let z = compress(raw, Payload::Sparse).expect("compress");
    eprintln!("raw {} B -> zstd {} B ({:.2} B per kept value)", raw.len(), z.len(), z.len() as f64 / kept as f64);
}

fn decode(g: &mut Group, chunk: &Chunk, raw: &[u8]) {
    g.throughput(Throughput::Bytes(chunk.ft16.len() as u64));
    let mut dec = chunk.base16.clone();
    g.bench_function(BenchmarkId::new("decode_sparse", "bf16_10pct"), |b| {
        b.iter(|| decode_sparse(black_box(raw), &mut dec, 2).expect("decode"))
    });
}

/// Hashing a part of the fine-tuned chunk, and converting chunks to bf16.
fn hash_and_convert(g: &mut Group, chunk: &Chunk) {
    g.throughput(Throughput::Bytes(chunk.ft16.len() as u64));
    g.bench_function(BenchmarkId::new("hash_part", "2MiB"), |b| {
        b.iter(|| hash::hash_chunk(black_box(&chunk.ft16), 0, 2))
    });

    let mut conv = vec![0u8; chunk.base16.len()];
    g.throughput(Throughput::Bytes(chunk.base16.len() as u64));
    g.bench_function(BenchmarkId::new("convert_chunk", "bf16_to_bf16"), |b| {
        b.iter(|| convert_chunk(DType::BF16, DType::BF16, black_box(&chunk.base16), &mut conv))
    });
    g.throughput(Throughput::Bytes(chunk.base32.len() as u64));
    g.bench_function(BenchmarkId::new("convert_chunk", "f32_to_bf16"), |b| {
        b.iter(|| convert_chunk(DType::BF16, DType::F32, black_box(&chunk.base32), &mut conv))
    });
}

criterion_group!(benches, stages);
criterion_main!(benches);
