//! `apply` and `verify`: rebuild the fine-tuned model from the base and a delta, checking
//! every hash on the way; or check a delta alone. The graph, wired here:
//!
//! ```text
//! read: base tensor of each record ──► decode: a window of blocks on the pool ──► output shards (pwrite)
//! then: side files, index, sync, rename into place
//! ```
//!
//! `verify DELTA` runs the decoder without a base and writes nothing; `verify DELTA --base`
//! is `apply` without an output, and so is `verify DELTA` of a delta that records its base's
//! repository (unless `--delta-only`).

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fapm_stages::bounded_json as json;
use fapm_stages::checkpoint::{parse_header, Checkpoint, INDEX_FILE};
use fapm_stages::format::{DeltaReader, Manifest, Source};
use fapm_stages::{Error, Result};

use crate::config::{ApplyConfig, VerifyConfig};
use crate::output::{Kind, Staged};
use fapm_stages::checkpoint::TensorRef;
use fapm_stages::decode::{DecodeStage, DecodeTotals, ModelFiles};
use fapm_stages::read;
use fapm_stages::read::ahead::{Position, ReadAhead};
use fapm_stages::run::runner::pool;
use fapm_stages::run::{Budget, RunControl};

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
    /// The side files that are code (`.py`, ...; `paths::is_code`), named so nobody runs
    /// them unawares (SPEC section 4).
    pub code_files: Vec<String>,
    /// Blocks whose hash was checked.
    pub blocks: usize,
    /// Bytes of tensor data written or checked.
    pub tensor_bytes: u64,
    /// For a part of a partitioned prune: its number and the number of parts.
    pub part: Option<[u32; 2]>,
    /// The base, when it was found through the repository the delta records
    /// (`org/name@commit`) rather than given.
    pub recorded_base: Option<String>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Rebuilds the model described by `cfg.delta` from `cfg.base`; writes it to `cfg.output`
/// (or, without an output, only checks: `verify --base`).
pub fn apply(cfg: &ApplyConfig, ctl: &RunControl) -> Result<ApplySummary> {
    let start = Instant::now();
    // One budget: the delta's records and the base's headers take at most half of it; the
    // window of blocks gets what they leave.
    let memory = json::RunMemory::new(cfg.memory_budget);
    let delta = DeltaReader::open_within(&cfg.delta, cfg.memory_budget, ctl)?;
    delta.refuse_part()?;
    let (base_path, recorded_base) = match &cfg.base {
        Some(path) => (path.clone(), None),
        None => (recorded_base(&delta, &cfg.hub)?, delta.manifest.base_repo.as_ref().map(|r| r.to_string())),
    };
    let base = Checkpoint::open_within(&base_path, cfg.memory_budget, ctl)?;
    let m = &delta.manifest;
    let bases = read::base_tensors(m, &base)?;
    let kind = if m.source == Source::Directory { Kind::Directory } else { Kind::File };
    let staged = cfg.output.as_deref().map(|o| Staged::new(o, kind, cfg.overwrite)).transpose()?;
    let outputs = staged.as_ref().map(|s| create_outputs(m, s, cfg.output.as_deref().unwrap())).transpose()?;
    let pool = pool(cfg.threads)?;
    let budget = Budget::new(memory.working(), cfg.threads, m.block_elems);
    let decode = DecodeStage {
        delta: &delta,
        bases: Some(&bases),
        output: outputs.as_ref(),
        window: budget.decode_window(delta.block_memory()),
        pool: &pool,
        ctl,
    };
    let decoded = read_ahead(&delta, Some(&bases), ctl, || decode.run())?;
    if let (Some(staged), Some(out)) = (&staged, &cfg.output) {
        write_side_files(&delta, staged, out)?;
        if m.index {
            write_index(m, &staged.path().join(INDEX_FILE), out)?;
        }
    } else {
        check_side_files(&delta)?;
    }
    ctl.check()?;
    drop(outputs);
    if let Some(staged) = staged {
        staged.commit()?;
    }
    let mut summary = ApplySummary::new(decoded, cfg.output.clone(), m, start);
    summary.recorded_base = recorded_base;
    Ok(summary)
}

/// The base a delta records (its repo id and commit, format version 3), found in the Hugging
/// Face cache or fetched ([`crate::hub`]); its tensors' hashes are checked as any base's are.
pub fn recorded_base(delta: &DeltaReader, hub: &crate::hub::Env) -> Result<PathBuf> {
    let Some(repo) = &delta.manifest.base_repo else {
        return Err(Error::Config(format!(
            "{} does not record its base (it was pruned from a local path, not a repo id); give the base (--base)",
            fapm_stages::error::printable(&delta.path.display().to_string())
        )));
    };
    let name = crate::hub::Name::Repo { id: repo.repo.clone(), revision: Some(repo.commit.clone()) };
    Ok(crate::hub::resolve(&name, crate::hub::Want::Weights, hub)?.path)
}

/// `verify`: with a base, [`apply`] without an output; without, every hash inside the delta
/// checked and every block decoded.
pub fn verify(cfg: &VerifyConfig, ctl: &RunControl) -> Result<ApplySummary> {
    let apply_cfg = ApplyConfig {
        base: cfg.base.clone(),
        delta: cfg.delta.clone(),
        hub: cfg.hub.clone(),
        output: None,
        threads: cfg.threads,
        memory_budget: cfg.memory_budget,
        overwrite: false,
    };
    if cfg.base.is_some() {
        return apply(&apply_cfg, ctl);
    }
    let start = Instant::now();
    let memory = json::RunMemory::new(cfg.memory_budget);
    let delta = DeltaReader::open_within(&cfg.delta, cfg.memory_budget, ctl)?;
    if !cfg.delta_only && delta.manifest.base_repo.is_some() && delta.manifest.part.is_none() {
        // apply opens it again within a budget of its own.
        drop((delta, memory));
        return apply(&apply_cfg, ctl);
    }
    let pool = pool(cfg.threads)?;
    let budget = Budget::new(memory.working(), cfg.threads, delta.manifest.block_elems);
    let decode = DecodeStage {
        delta: &delta,
        bases: None,
        output: None,
        window: budget.decode_window(delta.block_memory()),
        pool: &pool,
        ctl,
    };
    let decoded = read_ahead(&delta, None, ctl, || decode.run())?;
    check_side_files(&delta)?;
    Ok(ApplySummary::new(decoded, None, &delta.manifest, start))
}

/// Runs `decode` with a reader thread beside it that brings each record's blocks and base
/// tensor into memory ahead of the decoder (`read::ahead`), following the run's progress.
fn read_ahead<T>(
    delta: &DeltaReader,
    bases: Option<&[Option<TensorRef>]>,
    ctl: &RunControl,
    decode: impl FnOnce() -> Result<T>,
) -> Result<T> {
    // A second descriptor of the delta, for the advice only: the page cache is the file's.
    let Ok(file) = fs::File::open(&delta.path) else { return decode() };
    let m = &delta.manifest;
    let ahead = ReadAhead::decode(m, &file, bases);
    let starts = m.tensors.iter().scan(0u64, |done, t| {
        let start = *done;
        *done += t.numel() * t.dtype.size() as u64;
        Some(start)
    });
    let at = Position::by_progress(starts.collect());
    ahead.beside(&at, ctl, decode)
}

impl ApplySummary {
    fn new(d: DecodeTotals, output: Option<PathBuf>, m: &Manifest, start: Instant) -> Self {
        ApplySummary {
            output,
            tensors: d.tensors,
            base_tensors_checked: d.base_tensors_checked,
            side_files: m.side_files.len(),
            code_files: code_files(m),
            blocks: d.blocks,
            tensor_bytes: d.tensor_bytes,
            part: m.part.as_ref().map(|p| [p.index, p.count]),
            recorded_base: None,
            seconds: start.elapsed().as_secs_f64(),
        }
    }
}

/// The paths of the side files of `m` that are code, in the delta's order.
pub fn code_files(m: &Manifest) -> Vec<String> {
    m.side_files.iter().filter(|f| fapm_stages::paths::is_code(&f.path)).map(|f| f.path.clone()).collect()
}

/// Creates the output file or directory of shards, headers written and data sized.
fn create_outputs(m: &Manifest, staged: &Staged, dest: &Path) -> Result<ModelFiles> {
    let tmp = staged.path();
    if m.source == Source::Directory {
        fs::create_dir(tmp).map_err(|e| Error::io(dest, e))?;
    }
    let mut out = ModelFiles { dest: dest.to_path_buf(), files: Vec::new(), data_start: Vec::new(), begin: Vec::new() };
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
