//! `apply` and `verify`: rebuild the fine-tuned model from the base and a delta, checking
//! every hash on the way; or check a delta alone.
//!
//! Work is a flat list of (tensor, block) items processed a window at a time on the worker
//! pool. Each item decodes its block onto the converted base chunk and writes the result at
//! its own offset of its shard (`pwrite`), so no ordering is needed for the output; hashes
//! are computed per chunk and merged per tensor, in order, to name the first bad tensor.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fapm_stages::checkpoint::{parse_header, Checkpoint, TensorRef, INDEX_FILE};
use fapm_stages::encode::decode_sparse;
use fapm_stages::format::{block_sizes, DeltaReader, Manifest, Mode, Source, TensorRecord};
use fapm_stages::hash::{self, Part};
use fapm_stages::score::convert_chunk;
use fapm_stages::{Error, Result};

use super::{pool, Ctl};
use crate::config::ApplyConfig;
use crate::output::Staged;

/// What an apply or verify run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApplySummary {
    /// The model written (none for verify).
    pub output: Option<PathBuf>,
    /// Tensors reconstructed or checked.
    pub tensors: usize,
    /// Tensors whose base hash was checked.
    pub base_tensors_checked: usize,
    /// Side files written or checked.
    pub side_files: usize,
    /// Blocks whose hash was checked.
    pub blocks: usize,
    /// Bytes of tensor data written or checked.
    pub tensor_bytes: u64,
    /// For a part of a partitioned prune: its number and the number of parts.
    pub part: Option<[u32; 2]>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// One block of one tensor.
#[derive(Clone, Copy)]
struct Item {
    tensor: usize,
    block: usize,
    /// First element (diffable) or byte (whole) of the block, and how many.
    start: u64,
    len: u64,
    parts: usize,
}

/// What one item produced.
struct Done {
    out: Option<Part>,
    base: Option<Part>,
    kept: u64,
}

/// Where reconstructed tensors go.
struct Outputs {
    /// The destination, to name in errors.
    dest: PathBuf,
    files: Vec<File>,
    /// Per shard: byte offset of the data buffer in the file.
    data_start: Vec<u64>,
    /// Per tensor record: byte offset of the tensor in its shard's data buffer.
    begin: Vec<u64>,
}

/// Rebuilds the model described by `cfg.delta` from `cfg.base`; writes it to `cfg.output`
/// (or, without an output, only checks: `verify --base`).
pub fn apply(cfg: &ApplyConfig, ctl: &Ctl) -> Result<ApplySummary> {
    let start = Instant::now();
    let delta = DeltaReader::open_within(&cfg.delta, cfg.memory_budget)?;
    if let Some(p) = &delta.manifest.part {
        return Err(Error::invalid(
            &cfg.delta,
            format!(
                "this is part {} of {} of a partitioned prune, not a whole delta: join all {} parts with \
                 `fapm merge PART... --output DELTA`, then use DELTA",
                p.index, p.count, p.count
            ),
        ));
    }
    let base = Checkpoint::open_within(&cfg.base, cfg.memory_budget)?;
    let m = &delta.manifest;
    let bases = resolve_base(m, &base)?;
    let staged = cfg.output.as_deref().map(|o| Staged::new(o, cfg.overwrite)).transpose()?;
    let outputs = staged.as_ref().map(|s| create_outputs(m, s, cfg.output.as_deref().unwrap())).transpose()?;
    let pool = pool(cfg.threads)?;
    let window = window(cfg.threads, cfg.memory_budget, m.block_elems, delta.block_memory());
    let mut summary = run(&delta, Some(&bases), outputs.as_ref(), &pool, window, ctl)?;
    if let (Some(staged), Some(out)) = (&staged, &cfg.output) {
        write_side_files(&delta, staged, out)?;
        if m.index {
            write_index(m, &staged.path().join(INDEX_FILE), out)?;
        }
        for f in outputs.as_ref().map(|o| &o.files[..]).unwrap_or(&[]) {
            f.sync_all().map_err(|e| Error::io(out, e))?;
        }
    } else {
        check_side_files(&delta)?;
    }
    ctl.check()?;
    drop(outputs);
    if let Some(staged) = staged {
        staged.commit()?;
    }
    summary.output = cfg.output.clone();
    summary.side_files = m.side_files.len();
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Checks every hash inside a delta and decodes every block, without a base.
pub fn verify_delta(path: &Path, threads: usize, ctl: &Ctl) -> Result<ApplySummary> {
    let start = Instant::now();
    let delta = DeltaReader::open(path)?;
    let pool = pool(threads)?;
    let window =
        window(threads, crate::config::DEFAULT_MEMORY_BUDGET, delta.manifest.block_elems, delta.block_memory());
    let mut summary = run(&delta, None, None, &pool, window, ctl)?;
    check_side_files(&delta)?;
    summary.side_files = delta.manifest.side_files.len();
    summary.part = delta.manifest.part.as_ref().map(|p| [p.index, p.count]);
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

fn window(threads: usize, memory_budget: u64, block_elems: u64, block_memory: u64) -> usize {
    // An item holds a block (compressed + raw), the output chunk and nothing else; the block
    // size is the delta's (validated to at most MAX_BLOCK_ELEMS), not this build's default.
    let per_item = (block_elems.max(fapm_stages::format::RAW_BLOCK_BYTES / 8) * 30).max(block_memory);
    (2 * threads).clamp(1, (memory_budget / 2 / per_item).max(1) as usize)
}

/// The base tensor of every pruned and dense record, checked for name, dtype and shape.
fn resolve_base(m: &Manifest, base: &Checkpoint) -> Result<Vec<Option<TensorRef>>> {
    m.tensors.iter().map(|t| crate::reconstruct::base_tensor(base, t)).collect()
}

/// Creates the output file or directory of shards, headers written and data sized.
fn create_outputs(m: &Manifest, staged: &Staged, dest: &Path) -> Result<Outputs> {
    let tmp = staged.path();
    if m.source == Source::Directory {
        fs::create_dir(tmp).map_err(|e| Error::io(dest, e))?;
    }
    let mut out = Outputs { dest: dest.to_path_buf(), files: Vec::new(), data_start: Vec::new(), begin: Vec::new() };
    for shard in &m.shards {
        let path = if m.source == Source::File { tmp.to_path_buf() } else { tmp.join(&shard.name) };
        create_parents(staged, &path, dest)?;
        let infos = parse_header(&path, &shard.header, u64::MAX)?;
        let data_len = infos.iter().map(|t| t.end).max().unwrap_or(0);
        let file = staged.create_file(&path)?;
        staged.track(&path);
        let mut head = (shard.header.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(shard.header.as_bytes());
        file.write_all_at(&head, 0).map_err(|e| Error::io(dest, e))?;
        file.set_len(head.len() as u64 + data_len).map_err(|e| Error::io(dest, e))?;
        out.data_start.push(head.len() as u64);
        out.files.push(file);
        out.begin.extend(infos.iter().map(|t| t.begin));
    }
    Ok(out)
}

/// Decodes every block (onto the base when given), writes and hashes, a sliding window of
/// blocks at a time.
fn run(
    delta: &DeltaReader,
    bases: Option<&[Option<TensorRef>]>,
    outputs: Option<&Outputs>,
    pool: &rayon::ThreadPool,
    window: usize,
    ctl: &Ctl,
) -> Result<ApplySummary> {
    let m = &delta.manifest;
    let mut items = Vec::new();
    for (ti, t) in m.tensors.iter().enumerate() {
        let sizes: Vec<(u64, u64)> = match t.mode {
            Mode::Whole => block_sizes(t.numel() * t.dtype.size() as u64, m.raw_block_bytes).collect(),
            _ => block_sizes(t.numel(), m.block_elems).collect(),
        };
        let parts = sizes.len();
        items.extend(sizes.into_iter().enumerate().map(|(block, (start, len))| Item {
            tensor: ti,
            block,
            start,
            len,
            parts,
        }));
    }
    ctl.total
        .store(m.tensors.iter().map(|t| t.numel() * t.dtype.size() as u64).sum(), std::sync::atomic::Ordering::Relaxed);
    let mut summary = ApplySummary { tensors: m.tensors.len(), blocks: m.blocks().count(), ..Default::default() };
    let mut next = 0; // the next tensor to finish
    let (mut outs, mut base_parts, mut kept) = (Vec::new(), Vec::new(), 0u64);
    let mut finish = |upto: usize, outs: &mut Vec<Part>, base_parts: &mut Vec<Part>, kept: &mut u64| -> Result<()> {
        while next < upto {
            let t = &m.tensors[next];
            let bases = bases.map(|b| b[next].as_ref());
            finish_tensor(delta, t, bases.flatten(), bases.is_some(), outs, base_parts, *kept)?;
            // Unmap as we go rather than all at exit (see prune).
            bases.flatten().iter().for_each(|b| b.release());
            summary.base_tensors_checked += bases.flatten().is_some() as usize;
            summary.tensor_bytes += t.numel() * t.dtype.size() as u64;
            outs.clear();
            base_parts.clear();
            *kept = 0;
            next += 1;
        }
        Ok(())
    };
    // A sliding window of blocks on the pool; results are taken in order.
    let job = |it| -> (&Item, Result<Done>) {
        (it, item(delta, it, bases.and_then(|b| b[it.tensor].as_ref()), bases.is_some(), outputs))
    };
    super::ordered(pool, &items, window, ctl, job, |(it, d)| {
        ctl.set_current(&m.tensors[it.tensor].name);
        finish(it.tensor, &mut outs, &mut base_parts, &mut kept)?;
        let d = d?;
        outs.extend(d.out);
        base_parts.extend(d.base);
        kept += d.kept;
        let t = &m.tensors[it.tensor];
        let unit = if t.mode == Mode::Whole { 1 } else { t.dtype.size() as u64 };
        ctl.advance(it.len * unit);
        Ok(true)
    })?;
    finish(m.tensors.len(), &mut outs, &mut base_parts, &mut kept)?;
    Ok(summary)
}

/// Processes one block.
fn item(
    delta: &DeltaReader,
    it: &Item,
    base: Option<&TensorRef>,
    with_base: bool,
    outputs: Option<&Outputs>,
) -> Result<Done> {
    let m = &delta.manifest;
    let t = &m.tensors[it.tensor];
    let raw = delta.block(&t.blocks[it.block], &t.name)?;
    let size = t.dtype.size() as u64;
    let (bytes, byte_start, kept, base_part) = if t.mode == Mode::Whole {
        (raw, it.start, 0, None)
    } else {
        let mut out = vec![0u8; (it.len * size) as usize];
        let mut base_part = None;
        // An extended tensor's appended elements (past the base's) are decoded onto zero bits.
        let diffed = t.diffed_numel();
        let from_base = it.len.min(diffed.saturating_sub(it.start));
        if let (Some(b), true) = (base, from_base > 0) {
            let bs = b.info().dtype.size() as u64;
            let chunk = &b.bytes()[(it.start * bs) as usize..((it.start + from_base) * bs) as usize];
            convert_chunk(t.dtype, b.info().dtype, chunk, &mut out[..(from_base * size) as usize]);
            base_part = Some(hash::part(chunk, it.start * bs, diffed.div_ceil(m.block_elems) as usize));
        }
        let kept = decode_sparse(&raw, &mut out, size as usize)
            .map_err(|e| Error::tensor(&delta.path, &t.name, format!("corrupt block {}: {e}", it.block)))?;
        (out, it.start * size, kept, base_part)
    };
    if let Some(o) = outputs {
        let offset = o.data_start[t.shard] + o.begin[it.tensor] + byte_start;
        let file = &o.files[t.shard];
        file.write_all_at(&bytes, offset).map_err(|e| Error::io(&o.dest, e))?;
        fapm_stages::writeback::start(file, offset, bytes.len() as u64);
    }
    let out = (with_base || t.mode == Mode::Whole).then(|| hash::part(&bytes, byte_start, it.parts));
    Ok(Done { out, base: base_part, kept })
}

/// Checks a finished tensor's hashes and kept count.
fn finish_tensor(
    delta: &DeltaReader,
    t: &TensorRecord,
    base: Option<&TensorRef>,
    with_base: bool,
    outs: &[Part],
    base_parts: &[Part],
    kept: u64,
) -> Result<()> {
    let recorded = t.kept + t.extended.as_ref().map_or(0, |e| e.stored);
    if t.mode != Mode::Whole && kept != recorded {
        return Err(Error::tensor(
            &delta.path,
            &t.name,
            format!("blocks hold {kept} kept values, the record says {recorded}"),
        ));
    }
    if let (Some(b), Some(want)) = (base, t.base_hash) {
        if hash::merge(base_parts) != want {
            return Err(Error::tensor(
                &b.shard.path,
                &t.name,
                "base tensor differs from the one the delta was made from (blake3 mismatch): wrong or corrupt base model",
            ));
        }
    }
    if (with_base || t.mode == Mode::Whole) && hash::merge(outs) != t.out_hash {
        return Err(Error::tensor(&delta.path, &t.name, "reconstructed tensor does not match its recorded hash"));
    }
    Ok(())
}

/// The contents of one side file, hash-checked.
fn side_file(delta: &DeltaReader, i: usize) -> Result<Vec<u8>> {
    let f = &delta.manifest.side_files[i];
    let mut data = Vec::with_capacity(f.size as usize);
    for b in &f.blocks {
        data.extend_from_slice(&delta.block(b, &f.path)?);
    }
    if blake3::hash(&data).as_bytes() != &f.hash.0 {
        return Err(Error::tensor(&delta.path, &f.path, "side file does not match its recorded hash"));
    }
    Ok(data)
}

fn check_side_files(delta: &DeltaReader) -> Result<()> {
    (0..delta.manifest.side_files.len()).try_for_each(|i| side_file(delta, i).map(|_| ()))
}

fn write_side_files(delta: &DeltaReader, staged: &Staged, dest: &Path) -> Result<()> {
    for (i, f) in delta.manifest.side_files.iter().enumerate() {
        let data = side_file(delta, i)?;
        let path = staged.path().join(&f.path);
        create_parents(staged, &path, dest)?;
        staged.track(&path);
        crate::output::write_new(&path, data).map_err(|e| Error::io(dest.join(&f.path), e))?;
    }
    Ok(())
}

/// Creates the missing directories between the staged directory and `path`, registering
/// each with the SIGBUS guard.
fn create_parents(staged: &Staged, path: &Path, dest: &Path) -> Result<()> {
    let Some(parent) = path.parent() else { return Ok(()) };
    let Ok(rel) = parent.strip_prefix(staged.path()) else { return Ok(()) };
    let mut dir = staged.path().to_path_buf();
    for part in rel.components() {
        dir.push(part);
        if !dir.is_dir() {
            fs::create_dir(&dir).map_err(|e| Error::io(dest, e))?;
            staged.track(&dir);
        }
    }
    Ok(())
}

/// Writes a regenerated `model.safetensors.index.json`: total tensor bytes and every
/// tensor's shard, sorted by name.
fn write_index(m: &Manifest, path: &Path, dest: &Path) -> Result<()> {
    let total: u64 = m.tensors.iter().map(|t| t.numel() * t.dtype.size() as u64).sum();
    let weight_map: std::collections::BTreeMap<&str, &str> =
        m.tensors.iter().map(|t| (t.name.as_str(), m.shards[t.shard].name.as_str())).collect();
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let mut text = serde_json::to_string_pretty(&index).expect("an index always serializes");
    text.push('\n');
    crate::output::write_new(path, text).map_err(|e| Error::io(dest.join(INDEX_FILE), e))
}
