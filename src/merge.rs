//! `merge`: the part deltas of a partitioned prune (SPEC section 7) in, the delta one prune
//! without `--part` writes out, byte for byte.
//!
//! A part holds the records and encoded blocks of a contiguous run of the tensors, and part 1
//! the side files. Merge checks that the parts come from the same inputs and options and that
//! their runs are the ones the split rule gives, then copies every block as it is (its hash
//! checked, never decoded) into one file, in tensor order, one block at a time.

use std::path::PathBuf;
use std::time::Instant;

use fapm_stages::format::{Block, DeltaReader, DeltaWriter, Manifest, PartRecord, VERSION};
use fapm_stages::read::partition::split;
use fapm_stages::{Error, Result};

use crate::config::MergeConfig;
use crate::output::{Kind, Staged};
use fapm_stages::run::RunControl;

/// What a merge did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MergeSummary {
    /// The delta written.
    pub output: PathBuf,
    /// Parts merged.
    pub parts: usize,
    /// Tensors in the delta.
    pub tensors: usize,
    /// Side files in the delta.
    pub side_files: usize,
    /// Blocks copied.
    pub blocks: usize,
    /// Bytes of the delta.
    pub delta_bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Merges the part deltas `parts` (any order) into the delta `output`.
pub fn merge(cfg: &MergeConfig, ctl: &RunControl) -> Result<MergeSummary> {
    let (output, overwrite) = (cfg.output.as_path(), cfg.overwrite);
    let start = Instant::now();
    let readers = open_in_order(&cfg.parts, cfg.memory_budget, ctl)?;
    check_runs(&readers)?;
    let total: u64 = readers.iter().map(|r| r.size).sum();
    ctl.set_total(total);

    let staged = Staged::new(output, Kind::File, overwrite)?;
    let mut writer = DeltaWriter::new(staged.create_file(staged.path())?, output)?;
    let mut copy = |reader: &DeltaReader, blocks: &[Block], what: &str| -> Result<Vec<Block>> {
        blocks
            .iter()
            .map(|b| {
                ctl.check()?;
                let packed = reader.packed_block(b, what)?;
                ctl.advance(b.len);
                writer.block(&packed, b.raw_len)
            })
            .collect()
    };
    let mut tensors = Vec::new();
    for r in &readers {
        ctl.set_current(&r.path.display().to_string());
        for t in &r.manifest.tensors {
            let blocks = copy(r, &t.blocks, &t.name)?;
            tensors.push(fapm_stages::format::TensorRecord { blocks, ..t.clone() });
        }
    }
    let first = &readers[0];
    let side_files = first
        .manifest
        .side_files
        .iter()
        .map(|f| Ok(fapm_stages::format::SideFile { blocks: copy(first, &f.blocks, &f.path)?, ..f.clone() }))
        .collect::<Result<Vec<_>>>()?;
    let manifest = Manifest { tensors, side_files, part: None, ..first.manifest.clone() };
    let summary = MergeSummary {
        output: output.to_path_buf(),
        parts: readers.len(),
        tensors: manifest.tensors.len(),
        side_files: manifest.side_files.len(),
        blocks: manifest.blocks().count(),
        delta_bytes: writer.finish(&manifest)?,
        seconds: 0.0,
    };
    ctl.check()?;
    staged.commit()?;
    Ok(MergeSummary { seconds: start.elapsed().as_secs_f64(), ..summary })
}

/// Opens every part and orders them by part number; refuses a whole delta, parts of other
/// inputs or options, and a missing or repeated part, naming the file. One file named twice
/// is refused before any part is opened, and each part is checked against those opened before
/// it as soon as it is opened, so a bad list costs at most one part's manifest more. All the
/// manifests are held until the end: each is read within its share of the budget, so that
/// together they stay within it.
fn open_in_order(paths: &[PathBuf], memory_budget: u64, ctl: &RunControl) -> Result<Vec<DeltaReader>> {
    refuse_repeated_files(paths)?;
    let share = memory_budget / paths.len().max(1) as u64;
    let mut readers: Vec<DeltaReader> = Vec::with_capacity(paths.len());
    for path in paths {
        ctl.check()?;
        let r = DeltaReader::open_within(path, share, ctl)?;
        if r.manifest.part.is_none() {
            return Err(Error::invalid(path, "not a part of a partitioned prune (it is a whole delta already)"));
        }
        // The merged delta is the one this fapm's prune writes: of its format version only.
        if r.manifest.version != VERSION {
            return Err(Error::invalid(
                path,
                format!(
                    "a part of delta format version {}: merge joins parts of version {VERSION} (this fapm's); prune this part again",
                    r.manifest.version
                ),
            ));
        }
        if let Some(first) = readers.first() {
            if let Some(field) = disagreement(&first.manifest, &r.manifest) {
                return Err(Error::invalid(
                    &r.path,
                    format!(
                        "this part does not belong with {}: its {field} differs (parts must come from the same inputs and options)",
                        first.path.display()
                    ),
                ));
            }
        }
        if let Some(other) = readers.iter().find(|o| part(o).index == part(&r).index) {
            let p = part(&r);
            return Err(Error::invalid(
                &r.path,
                format!("part {} of {} is given twice (also {})", p.index, p.count, other.path.display()),
            ));
        }
        readers.push(r);
    }
    readers.sort_by_key(|r| part(r).index);
    let Some(first) = readers.first() else {
        return Err(Error::Config("merge needs at least one part".into()));
    };
    let count = part(first).count;
    let have: Vec<u32> = readers.iter().map(|r| part(r).index).collect();
    if let Some(missing) = (1..=count).find(|i| !have.contains(i)) {
        return Err(Error::invalid(
            &first.path,
            format!("part {missing} of {count} is missing: prune it with --part {missing}/{count}, then merge again"),
        ));
    }
    Ok(readers)
}

/// Refuses a list that names one file twice (the same device and inode, however spelled),
/// before anything is opened.
fn refuse_repeated_files(paths: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashMap::with_capacity(paths.len());
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if let Some(other) = seen.insert((meta.dev(), meta.ino()), path) {
            return Err(Error::invalid(path, format!("this file is given twice (also as {})", other.display())));
        }
    }
    Ok(())
}

fn part(r: &DeltaReader) -> &PartRecord {
    r.manifest.part.as_ref().expect("only parts are kept")
}

/// The first field in which two parts' manifests disagree where parts of one prune agree.
fn disagreement(a: &Manifest, b: &Manifest) -> Option<&'static str> {
    let (pa, pb) = (a.part.as_ref()?, b.part.as_ref()?);
    let fields: [(&str, bool); 18] = [
        ("format version", a.version == b.version),
        ("tool", a.tool == b.tool),
        ("metric", a.metric == b.metric),
        ("penalty", a.penalty == b.penalty),
        ("sparsity", a.sparsity == b.sparsity),
        ("--sparsity-for", a.sparsity_for == b.sparsity_for),
        ("threshold", a.threshold == b.threshold),
        ("--include/--exclude", a.include == b.include && a.exclude == b.exclude),
        ("block size", a.block_elems == b.block_elems && a.raw_block_bytes == b.raw_block_bytes),
        ("source", a.source == b.source && a.index == b.index),
        ("fine-tuned shards", a.shards == b.shards),
        ("base-only tensors", a.base_only == b.base_only),
        ("number of parts", pa.count == pb.count),
        ("number of tensors", pa.total == pb.total),
        ("base checkpoint", pa.base == pb.base),
        ("fine-tuned checkpoint", pa.finetuned == pb.finetuned),
        ("fine-tuned checkpoint's contents", pa.finetuned_sample == pb.finetuned_sample),
        ("repositories", a.base_repo == b.base_repo && a.finetuned_repo == b.finetuned_repo),
    ];
    fields.iter().find(|(_, same)| !same).map(|(name, _)| *name)
}

/// Checks that the parts hold the runs of tensors the split rule gives, and that only part 1
/// carries side files.
fn check_runs(readers: &[DeltaReader]) -> Result<()> {
    let sizes: Vec<u64> = readers
        .iter()
        .flat_map(|r| &r.manifest.tensors)
        .map(|t| t.numel().saturating_mul(t.dtype.size() as u64))
        .collect();
    let total = part(&readers[0]).total;
    if sizes.len() as u64 != total {
        return Err(Error::invalid(
            &readers[0].path,
            format!("the parts hold {} tensors, the checkpoint has {total}", sizes.len()),
        ));
    }
    let runs = split(&sizes, part(&readers[0]).count);
    for (r, run) in readers.iter().zip(runs) {
        let p = part(r);
        if p.first != run.start as u64 || r.manifest.tensors.len() != run.len() {
            return Err(Error::invalid(
                &r.path,
                format!("part {} of {} does not hold the tensors its number gives", p.index, p.count),
            ));
        }
        if p.index != 1 && !r.manifest.side_files.is_empty() {
            return Err(Error::invalid(&r.path, "only part 1 may carry side files"));
        }
    }
    Ok(())
}
