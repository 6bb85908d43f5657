//! Generates a seeded, Llama-like bf16 base / fine-tuned checkpoint pair for benchmarks.
//!
//! ```text
//! cargo run --release --example gen_pair -- --out DIR --params 850M --shards 4 --seed 1
//! cargo run --release --example gen_pair -- --out DIR --shape llama3-8b   # 8.03 B, 16.06 GB
//! ```
//!
//! writes `DIR/base` and `DIR/ft`, each a sharded Hugging Face directory
//! (`model-0000K-of-0000N.safetensors`, `model.safetensors.index.json`, `config.json`).
//!
//! Base weights are `N(0, 0.02)` in bf16 (norm weights around 1). The fine-tuned model is
//! `bf16(base + d)` where the task vector `d` has row and column structure: a few rows and
//! columns change a lot, most elements change by less than half a bf16 ulp and round back to
//! the base value, and a share of the embedding rows (tokens never seen in fine-tuning) do not
//! change at all. Scores therefore tie massively, as in real bf16 fine-tunes.
//!
//! Every chunk of every tensor has its own seed, so the output depends only on the
//! arguments, not on the thread count. Chunks are generated in parallel and written in
//! order through buffered writers; memory stays at a few chunks.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

/// Elements per generated chunk.
const CHUNK: usize = 1 << 20;

#[derive(Parser)]
#[command(about = "Generate a seeded Llama-like bf16 base/fine-tuned checkpoint pair")]
struct Args {
    /// Output directory (gets `base/` and `ft/`).
    #[arg(long)]
    out: PathBuf,
    /// Approximate total parameter count, e.g. 850M, 1.1G, 20M.
    #[arg(long, default_value = "850M", value_parser = parse_count)]
    params: u64,
    /// A named architecture instead of one sized by `--params`: `llama3-8b` (hidden 4096,
    /// 32 layers, intermediate 14336, vocabulary 128256, 32 heads, 8 KV heads: 8.03 B
    /// parameters, 16.06 GB per model in bf16).
    #[arg(long, value_parser = ["llama3-8b"])]
    shape: Option<String>,
    /// Number of shards per model.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Replace an existing output directory.
    #[arg(long)]
    overwrite: bool,
}

fn parse_count(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1e3),
        Some('M' | 'm') => (&s[..s.len() - 1], 1e6),
        Some('G' | 'g' | 'B' | 'b') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let v: f64 = num.parse().map_err(|e| format!("bad count {s:?}: {e}"))?;
    if v.is_nan() || v <= 0.0 {
        return Err(format!("bad count {s:?}"));
    }
    Ok((v * mult) as u64)
}

/// What kind of values a tensor holds.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Embedding rows: a share of rows never changes.
    Embed,
    /// A linear layer.
    Linear,
    /// RMSNorm weight (around 1).
    Norm,
}

struct Spec {
    name: String,
    shape: Vec<u64>,
    kind: Kind,
}

impl Spec {
    fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    fn rows_cols(&self) -> (u64, u64) {
        match self.shape.as_slice() {
            [c] => (1, *c),
            [r, c] => (*r, *c),
            _ => unreachable!(),
        }
    }
}

struct Arch {
    hidden: u64,
    inter: u64,
    heads: u64,
    kv_heads: u64,
    layers: u64,
    vocab: u64,
}

/// Llama-3-8B: the shape of the 8B benchmark (`--shape llama3-8b`).
const LLAMA3_8B: Arch = Arch { hidden: 4096, inter: 14336, heads: 32, kv_heads: 8, layers: 32, vocab: 128256 };

/// A TinyLlama-shaped architecture (GQA 8:1, mlp 2.75x) whose size is close to `params`.
fn arch(params: u64) -> Arch {
    let mut vocab = 32000;
    let per_layer = |h: u64| {
        let kv = h / 8;
        let inter = h * 11 / 4;
        2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    };
    let mut hidden = 4096;
    // Embeddings (input + lm_head) take about a sixth of the model, as in TinyLlama.
    while hidden > 256 && 2 * vocab * hidden > params / 6 {
        hidden /= 2;
    }
    // Small test models: shrink the vocabulary rather than the width.
    vocab = vocab.min((params / 12 / hidden).max(1000));
    let rest = params.saturating_sub(2 * vocab * hidden + hidden);
    let layers = ((rest as f64 / per_layer(hidden) as f64).round() as u64).max(1);
    let heads = (hidden / 64).max(1);
    Arch { hidden, inter: hidden * 11 / 4, heads, kv_heads: (heads / 8).max(1), layers, vocab }
}

fn tensors(a: &Arch) -> Vec<Spec> {
    let h = a.hidden;
    let kv = a.kv_heads * (h / a.heads);
    let mut v = Vec::new();
    let mut t = |name: String, shape: Vec<u64>, kind: Kind| v.push(Spec { name, shape, kind });
    t("model.embed_tokens.weight".into(), vec![a.vocab, h], Kind::Embed);
    for l in 0..a.layers {
        let p = format!("model.layers.{l}");
        t(format!("{p}.input_layernorm.weight"), vec![h], Kind::Norm);
        t(format!("{p}.self_attn.q_proj.weight"), vec![h, h], Kind::Linear);
        t(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], Kind::Linear);
        t(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], Kind::Linear);
        t(format!("{p}.self_attn.o_proj.weight"), vec![h, h], Kind::Linear);
        t(format!("{p}.post_attention_layernorm.weight"), vec![h], Kind::Norm);
        t(format!("{p}.mlp.gate_proj.weight"), vec![a.inter, h], Kind::Linear);
        t(format!("{p}.mlp.up_proj.weight"), vec![a.inter, h], Kind::Linear);
        t(format!("{p}.mlp.down_proj.weight"), vec![h, a.inter], Kind::Linear);
    }
    t("model.norm.weight".into(), vec![h], Kind::Norm);
    t("lm_head.weight".into(), vec![a.vocab, h], Kind::Linear);
    v
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// wyrand: small and fast.
struct Rng(u64);

impl Rng {
    #[inline(always)]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        (t >> 64) as u64 ^ t as u64
    }
    /// Approximately standard normal (Irwin-Hall of four 16-bit uniforms, tails at 3.46).
    #[inline(always)]
    fn normal(&mut self) -> f32 {
        let r = self.next();
        let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        (s as f32 * (1.0 / 65536.0) - 2.0) * 1.732_050_8
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
}

/// Per-row and per-column scales of one tensor's task vector.
struct Structure {
    rows: Vec<f32>,
    cols: Vec<f32>,
    sigma: f32,
}

fn structure(spec: &Spec, seed: u64, tensor: u64) -> Structure {
    let (r, c) = spec.rows_cols();
    let mut rng = Rng(splitmix(seed ^ splitmix(tensor.wrapping_mul(0x1000_0001))));
    // Most changes are below half a bf16 ulp of a 0.02 weight (ulp there is ~1.2e-4).
    let sigma = match spec.kind {
        Kind::Norm => 2e-3,
        _ => 4e-5 * (0.6 + 0.8 * rng.unit()),
    };
    let rows = (0..r)
        .map(|_| {
            let u = rng.unit();
            match spec.kind {
                Kind::Embed if u < 0.35 => 0.0, // tokens never seen in fine-tuning
                _ if u < 0.01 => 12.0,
                _ if u < 0.05 => 4.0,
                _ => 1.0,
            }
        })
        .collect();
    let cols = (0..c)
        .map(|_| {
            let u = rng.unit();
            if u < 0.005 {
                10.0
            } else if u < 0.03 {
                3.0
            } else {
                1.0
            }
        })
        .collect();
    Structure { rows, cols, sigma }
}

/// Generates elements `[start, start + len)` of a tensor, bf16 little-endian, base and ft.
fn chunk(
    spec: &Spec,
    st: &Structure,
    seed: u64,
    tensor: u64,
    index: u64,
    start: u64,
    len: usize,
) -> (Vec<u8>, Vec<u8>) {
    let mut rng = Rng(splitmix(seed ^ splitmix(tensor << 32 ^ index) ^ 0x5eed));
    let (_, cols) = spec.rows_cols();
    let (mut row, mut col) = ((start / cols) as usize, (start % cols) as usize);
    let mut base = vec![0u8; len * 2];
    let mut ft = vec![0u8; len * 2];
    let (mean, sd) = if spec.kind == Kind::Norm { (1.0f32, 0.05f32) } else { (0.0, 0.02) };
    for (b, f) in base.chunks_exact_mut(2).zip(ft.chunks_exact_mut(2)) {
        let pre = half::bf16::from_f32(mean + sd * rng.normal());
        let d = st.sigma * st.rows[row] * st.cols[col] * rng.normal();
        let post = half::bf16::from_f32(pre.to_f32() + d);
        b.copy_from_slice(&pre.to_bits().to_le_bytes());
        f.copy_from_slice(&post.to_bits().to_le_bytes());
        col += 1;
        if col == cols as usize {
            col = 0;
            row += 1;
        }
    }
    (base, ft)
}

/// Splits tensors into `n` consecutive groups of about equal bytes.
fn shard_groups(specs: &[Spec], n: usize) -> Vec<Vec<usize>> {
    let total: u64 = specs.iter().map(|s| s.numel() * 2).sum();
    let mut groups = vec![Vec::new(); n];
    let mut acc = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let g = ((acc as u128 * n as u128 / total.max(1) as u128) as usize).min(n - 1);
        groups[g].push(i);
        acc += s.numel() * 2;
    }
    groups.retain(|g| !g.is_empty());
    groups
}

/// A shard's 8-byte length and JSON header, serialized by the `safetensors` crate (the data
/// is streamed after it: the crate's own writers want every tensor's bytes in memory).
fn header(specs: &[Spec], group: &[usize]) -> Vec<u8> {
    let mut off = 0usize;
    let infos = group
        .iter()
        .map(|&i| {
            let s = &specs[i];
            let end = off + s.numel() as usize * 2;
            let info = TensorInfo {
                dtype: Dtype::BF16,
                shape: s.shape.iter().map(|&d| d as usize).collect(),
                data_offsets: (off, end),
            };
            off = end;
            (s.name.clone(), info)
        })
        .collect();
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(format), infos).expect("consistent tensor offsets");
    let mut h = serde_json::to_vec(&metadata).expect("json");
    // Padded to 8 bytes, as the crate pads, so that the data is aligned.
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out
}

fn write_side(dir: &Path, a: &Arch, specs: &[Spec], groups: &[Vec<usize>], names: &[String]) -> std::io::Result<()> {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a.hidden,
        "intermediate_size": a.inter,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "num_hidden_layers": a.layers,
        "vocab_size": a.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
    });
    fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let mut wm = serde_json::Map::new();
    for (g, name) in groups.iter().zip(names) {
        for &i in g {
            wm.insert(specs[i].name.clone(), name.clone().into());
        }
    }
    let total: u64 = specs.iter().map(|s| s.numel() * 2).sum();
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": wm });
    fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index)?)
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let a = match args.shape.as_deref() {
        Some("llama3-8b") => LLAMA3_8B,
        _ => arch(args.params),
    };
    let specs = tensors(&a);
    let total: u64 = specs.iter().map(Spec::numel).sum();
    let n = args.shards.max(1);
    let groups = shard_groups(&specs, n);
    let names: Vec<String> =
        (0..groups.len()).map(|k| format!("model-{:05}-of-{:05}.safetensors", k + 1, groups.len())).collect();
    if args.out.exists() {
        if !args.overwrite {
            eprintln!("error: {} exists (use --overwrite)", args.out.display());
            std::process::exit(1);
        }
        fs::remove_dir_all(&args.out)?;
    }
    let (bdir, fdir) = (args.out.join("base"), args.out.join("ft"));
    for d in [&bdir, &fdir] {
        fs::create_dir_all(d)?;
        write_side(d, &a, &specs, &groups, &names)?;
    }
    let batch = 2 * rayon::current_num_threads();
    for (g, name) in groups.iter().zip(&names) {
        let h = header(&specs, g);
        let mut bw = BufWriter::with_capacity(8 << 20, File::create(bdir.join(name))?);
        let mut fw = BufWriter::with_capacity(8 << 20, File::create(fdir.join(name))?);
        bw.write_all(&h)?;
        fw.write_all(&h)?;
        for &i in g {
            let s = &specs[i];
            let st = structure(s, args.seed, i as u64);
            let n = s.numel();
            let chunks: Vec<u64> = (0..n.div_ceil(CHUNK as u64)).collect();
            for win in chunks.chunks(batch) {
                let out: Vec<(Vec<u8>, Vec<u8>)> = win
                    .par_iter()
                    .map(|&c| {
                        let start = c * CHUNK as u64;
                        let len = (n - start).min(CHUNK as u64) as usize;
                        chunk(s, &st, args.seed, i as u64, c, start, len)
                    })
                    .collect();
                for (b, f) in out {
                    bw.write_all(&b)?;
                    fw.write_all(&f)?;
                }
            }
        }
        bw.flush()?;
        fw.flush()?;
    }
    eprintln!(
        "{}: {} params ({} layers, hidden {}), {} tensors, {} shards, {:.2} GB per model, {:.1}s",
        args.out.display(),
        total,
        a.layers,
        a.hidden,
        specs.len(),
        groups.len(),
        total as f64 * 2.0 / 1e9,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
