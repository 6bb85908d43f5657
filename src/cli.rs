//! The command line as clap sees it: raw flags, help text and defaults. Values are checked
//! in `config.rs`, so that bad values exit with code 1 and usage errors with code 2.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use fapm::config::options;

/// Forgetting-aware pruning of fine-tuned checkpoints into compact, verified sparse deltas.
///
/// `prune` keeps the top (1 - sparsity) of each weight matrix's task vector, scored by the
/// FAPM metric, and writes it as a delta file; `apply` rebuilds the pruned model from the base
/// and the delta, bit-exact and verified.
#[derive(Debug, Parser)]
#[command(name = "fapm", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prune a fine-tuned checkpoint's task vector into a sparse delta file.
    Prune(PruneArgs),
    /// Rebuild a model from the base checkpoint and a delta, verifying every hash.
    Apply(ApplyArgs),
    /// Join the part deltas of a partitioned prune (--part) into the one delta a single prune writes.
    Merge(MergeArgs),
    /// Show a delta's header and every tensor it holds.
    Inspect(InspectArgs),
    /// Check every hash in a delta; with --base, also the base and the full reconstruction.
    Verify(VerifyArgs),
    /// Draw FAPM's pictures for your model: heatmaps and the trade-off, as PNG + index.html + report.json.
    Report(ReportArgs),
    /// Make a Hub-ready delta repository: a folder with the delta and a README.md model card.
    Card(CardArgs),
}

/// Where a delta comes from: a file, a delta folder (`fapm card`) or a Hub repo id.
#[derive(Debug, Args)]
pub struct DeltaName {
    /// The revision of a delta named by repo id (a branch, tag or commit) [default: main].
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
}

/// `--memory-budget`, taken by every command that reads a delta or a checkpoint.
#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// Bound on the memory fapm allocates (manifests, channels, chunks, histograms), e.g. 512M,
    /// 2G. Memory-mapped inputs are paged in and out by the OS. [default: 256M]
    #[arg(long, value_name = "SIZE")]
    pub memory_budget: Option<String>,
}

/// How a command reports: quietly or not, and as JSON or not.
#[derive(Debug, Args)]
pub struct SummaryArgs {
    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    pub quiet: bool,
    /// Print one JSON summary object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Flags shared by the commands that run a pipeline on the worker pool.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Worker threads [default: one per core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub summary: SummaryArgs,
}

impl RunArgs {
    /// The threads and memory options as given, for `config` to check.
    pub fn options(&self) -> options::Run {
        options::Run { threads: self.threads, memory_budget: self.memory.memory_budget.clone() }
    }
}

/// `fapm prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The base (pre-trained) checkpoint: a .safetensors file, a directory, or a Hugging Face
    /// repo id (org/name[@REV], hf://org/name: found in the Hugging Face cache, fetched if
    /// missing); its repo id and commit are recorded in the delta.
    #[arg(long, value_name = "PATH|REPO")]
    pub base: PathBuf,
    /// The fine-tuned checkpoint: a .safetensors file, a directory, or a repo id.
    #[arg(long, value_name = "PATH|REPO")]
    pub finetuned: PathBuf,
    /// The delta file to write.
    #[arg(long, short, value_name = "DELTA")]
    pub output: PathBuf,
    /// Fraction of each pruned tensor's elements reset to the base, an exact decimal in [0, 1].
    #[arg(long, default_value = "0.9", value_name = "S")]
    pub sparsity: String,
    /// Per-tensor sparsity: tensors whose name matches RE are pruned at S (repeatable; the first
    /// matching rule wins, --sparsity applies to the rest).
    #[arg(long, value_name = "RE=S")]
    pub sparsity_for: Vec<String>,
    /// Score: fapm (the paper's forgetting-aware metric) or magnitude (|delta|).
    #[arg(long, default_value = "fapm", value_name = "METRIC")]
    pub metric: String,
    /// FAPM's penalty strength L in S = |d| - L * mean(|W|) * |d| / |W|: 1 is the paper's metric,
    /// 0 is magnitude; more penalty keeps fewer changes that are large relative to their weight.
    #[arg(long, default_value = "1", value_name = "L")]
    pub penalty: String,
    /// exact: keep precisely the top k; approx: k too, choosing freely among scores within 2^-7 relative of the boundary.
    #[arg(long, default_value = "exact", value_name = "MODE")]
    pub threshold: String,
    /// Prune only tensors whose name matches this regex (repeatable) [default: all].
    #[arg(long, value_name = "RE")]
    pub include: Vec<String>,
    /// Never prune tensors whose name matches this regex (repeatable); they keep every change.
    #[arg(long, value_name = "RE")]
    pub exclude: Vec<String>,
    /// Write only part I of N of the tensors, for `fapm merge`: I/N, `auto` (a Slurm array
    /// task) or `auto/N` (a Kubernetes indexed job).
    #[arg(long, value_name = "I/N")]
    pub part: Option<String>,
    /// Replace DELTA if it exists.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

impl PruneArgs {
    /// The options as given, for `config` to check.
    pub fn options(&self) -> options::Prune {
        options::Prune {
            base: self.base.clone(),
            finetuned: self.finetuned.clone(),
            output: self.output.clone(),
            sparsity: self.sparsity.clone(),
            sparsity_for: self.sparsity_for.clone(),
            metric: self.metric.clone(),
            penalty: self.penalty.clone(),
            threshold: self.threshold.clone(),
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            part: self.part.clone(),
            overwrite: self.overwrite,
            run: self.run.options(),
        }
    }
}

/// `fapm merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The part deltas written by `prune --part`, in any order.
    #[arg(required = true, value_name = "PART")]
    pub parts: Vec<PathBuf>,
    /// The delta file to write.
    #[arg(long, short, value_name = "DELTA")]
    pub output: PathBuf,
    /// Replace DELTA if it exists.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub summary: SummaryArgs,
}

/// `fapm apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The base checkpoint the delta was made against (a path or repo id) [default: the base
    /// repository and commit the delta records, from the Hugging Face cache].
    #[arg(long, value_name = "PATH|REPO")]
    pub base: Option<PathBuf>,
    /// The delta: a file, a delta folder, or a repo id (org/name[@REV], hf://org/name).
    #[arg(long, value_name = "DELTA")]
    pub delta: PathBuf,
    #[command(flatten)]
    pub name: DeltaName,
    /// Where to write the model: a file if the fine-tuned input was a file, else a directory.
    #[arg(long, short, value_name = "PATH")]
    pub output: PathBuf,
    /// Replace PATH if it exists.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `fapm inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The delta: a file, a delta folder, or a repo id.
    pub delta: PathBuf,
    #[command(flatten)]
    pub name: DeltaName,
    /// Print the header and tensor table as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
}

/// `fapm verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The delta: a file, a delta folder, or a repo id.
    pub delta: PathBuf,
    #[command(flatten)]
    pub name: DeltaName,
    /// Also check this base and the full reconstruction (writes nothing) [default: the base
    /// the delta records, if it records one].
    #[arg(long, value_name = "PATH|REPO")]
    pub base: Option<PathBuf>,
    /// Check the delta's own hashes only, even when it records its base.
    #[arg(long)]
    pub delta_only: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `fapm report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The base checkpoint.
    #[arg(long, value_name = "PATH")]
    pub base: PathBuf,
    /// The fine-tuned checkpoint.
    #[arg(long, value_name = "PATH")]
    pub finetuned: PathBuf,
    /// The directory to write (index.html and PNG files).
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,
    /// Draw heatmaps for the matrices whose name matches this regex (repeatable; the first 16
    /// matches) [default: up to 4 matrices spread over the model].
    #[arg(long, value_name = "RE")]
    pub tensor: Vec<String>,
    /// Replace DIR if it exists.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub summary: SummaryArgs,
}

/// `fapm card`.
#[derive(Debug, Args)]
pub struct CardArgs {
    /// The delta: a file, a delta folder, or a repo id.
    pub delta: PathBuf,
    #[command(flatten)]
    pub name: DeltaName,
    /// The folder to write: the delta and README.md, ready for `hf upload ORG/NAME FOLDER`.
    #[arg(long, short, value_name = "FOLDER")]
    pub output: PathBuf,
    /// A `fapm report` directory whose whole-model trade-off the card quotes.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// This delta repository's own repo id, for the card's usage lines [default: ORG/NAME].
    #[arg(long, value_name = "ORG/NAME")]
    pub repo_id: Option<String>,
    /// The fine-tuned model's card (README.md), for its license [default: the fine-tune's
    /// repository in the Hugging Face cache, when the delta records one].
    #[arg(long, value_name = "FILE")]
    pub finetuned_card: Option<PathBuf>,
    /// Replace FOLDER if it exists.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub summary: SummaryArgs,
}

impl DeltaName {
    /// The delta as named, for `config` to find.
    pub fn delta(&self, name: &std::path::Path) -> options::Delta {
        options::Delta { name: name.to_path_buf(), revision: self.revision.clone() }
    }
}
