//! The `fapm` binary: parses flags, runs one command, prints its summary, and maps errors to
//! exit codes (1: bad input or failure, 2: usage; SPEC section 6).

mod cli;
mod progress;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use fapm::config::{self, ApplyConfig, InspectConfig, MergeConfig, VerifyConfig};
use fapm::{Error, RunControl};
use fapm_stages::error::{one_line, printable};
use serde_json::json;

use cli::{Cli, Command};
use progress::{bytes, count, percent, rate, Monitor};

/// mimalloc keeps freed blocks for reuse instead of returning them to the OS, so buffers
/// allocated again are not faulted in and zeroed again (docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Like other Unix filters: when the reader of our output goes away (`fapm inspect | head`)
    // end quietly instead of panicking in println!. Outputs are committed before anything is
    // printed, so nothing partial is left.
    // SAFETY: called first thing, before any other thread exists; SIG_DFL is a valid handler.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Transparent huge pages would round each large buffer up to whole 2 MiB pages of
    // resident memory, which a memory budget cannot account for (docs/PERFORMANCE.md).
    // SAFETY: prctl(PR_SET_THP_DISABLE) sets a flag of this process and reads no memory.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0)
    };
    fapm::sigbus::install();
    let cli = Cli::parse();
    let quiet = match &cli.command {
        Command::Prune(a) => a.run.summary.quiet,
        Command::Apply(a) => a.run.summary.quiet,
        Command::Merge(a) => a.summary.quiet,
        Command::Verify(a) => a.run.summary.quiet,
        Command::Report(a) => a.summary.quiet,
        Command::Card(a) => a.summary.quiet,
        Command::Inspect(_) => false,
    };
    progress::init_logging(cli.verbose, quiet);
    let ctl = Arc::new(RunControl::default());
    {
        let ctl = Arc::clone(&ctl);
        // Ctrl-C and SIGTERM: stop at the next chunk, clean up, exit 1.
        let _ = ctrlc::set_handler(move || ctl.cancel());
    }
    match run(cli.command, &ctl) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::from(1)
        }
    }
}

/// A list of names from files, each escaped, comma-separated.
fn names<S: AsRef<str>>(list: &[S]) -> String {
    list.iter().map(|n| printable(n.as_ref())).collect::<Vec<_>>().join(", ")
}

/// Prints a `--json` summary on stdout: one line, with every character a terminal could act
/// on written as a JSON escape ([`fapm::json::TerminalSafe`]).
fn print_json(v: &serde_json::Value) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    // As println! would, but a closed stdout ends the process quietly (SIGPIPE, above). The
    // final newline goes around the escaping writer, which would escape it.
    let escaped = {
        let mut out = fapm::json::TerminalSafe::new(&mut stdout);
        serde_json::to_writer(&mut out, v).map_err(std::io::Error::from).and_then(|()| out.flush())
    };
    let _ = escaped.and_then(|()| stdout.write_all(b"\n")).and_then(|()| stdout.flush());
}

/// A `--json` summary with the peak memory of this process, which only the binary measures.
fn with_peak(mut summary: serde_json::Value, peak: u64) -> serde_json::Value {
    summary["peak_memory_bytes"] = json!(peak);
    summary
}

/// This process's environment, where the configuration reads `--part auto` and the Hugging
/// Face settings.
fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

fn run(command: Command, ctl: &Arc<RunControl>) -> Result<(), Error> {
    match command {
        Command::Prune(a) => prune(a, ctl),
        Command::Apply(a) => apply(a, ctl),
        Command::Verify(a) => verify(a, ctl),
        Command::Merge(a) => merge(a, ctl),
        Command::Inspect(a) => {
            let delta = a.name.delta(&a.delta);
            inspect(&InspectConfig::new(&delta, a.memory.memory_budget.as_deref(), env)?, a.json, ctl)
        }
        Command::Report(a) => report(a, ctl),
        Command::Card(a) => card(a, ctl),
    }
}

fn prune(a: cli::PruneArgs, ctl: &Arc<RunControl>) -> Result<(), Error> {
    let cfg = a.options().check(env)?;
    let (quiet, json_out) = (a.run.summary.quiet, a.run.summary.json);
    let monitor = Monitor::start(Arc::clone(ctl), "prune", !quiet);
    let result = fapm::prune(&cfg, ctl);
    let peak = monitor.finish();
    let s = result?;
    if json_out {
        print_json(&with_peak(fapm::json::prune(&s), peak));
    }
    if !quiet {
        print_prune_summary(&s, peak);
    }
    Ok(())
}

/// The human-readable summary of a prune, on stderr.
fn print_prune_summary(s: &fapm::PruneSummary, peak: u64) {
    eprintln!(
        "pruned  {} tensors pruned, {} dense, {} whole, {} base-only ignored",
        s.pruned, s.dense, s.whole, s.base_only
    );
    eprintln!(
        "kept    {} of {} elements ({:.2}%); {} had changed ({:.2}%)",
        count(s.kept),
        count(s.elements),
        percent(s.kept, s.elements),
        count(s.candidates),
        percent(s.candidates, s.elements)
    );
    eprintln!(
        "size    fine-tuned model {} -> delta {} ({:.1}x smaller)",
        bytes(s.finetuned_bytes),
        bytes(s.delta_bytes),
        s.finetuned_bytes as f64 / s.delta_bytes.max(1) as f64
    );
    if !s.embedded_side_files.is_empty() {
        let (n, list) = (s.embedded_side_files.len(), names(&s.embedded_side_files));
        eprintln!("embedded {n} side files: {list}");
    }
    print_code_files(&s.code_files);
    for l in &s.left_out_side_files {
        eprintln!("left out {} ({})", printable(&l.path), l.reason);
    }
    eprintln!("time    {:.2} s, {} of input, peak memory {}", s.seconds, rate(s.input_bytes, s.seconds), bytes(peak));
    eprintln!("wrote   {}", printable(&s.output.display().to_string()));
}

fn apply(a: cli::ApplyArgs, ctl: &Arc<RunControl>) -> Result<(), Error> {
    let delta = a.name.delta(&a.delta);
    let cfg = ApplyConfig::new(a.base, &delta, Some(a.output), a.overwrite, &a.run.options(), env)?;
    let monitor = Monitor::start(Arc::clone(ctl), "apply", !a.run.summary.quiet);
    let result = fapm::apply(&cfg, ctl);
    let peak = monitor.finish();
    report_apply("applied", result?, peak, &a.run.summary);
    Ok(())
}

/// `verify`: with `--base`, an apply that writes nothing; without, the delta's own hashes.
fn verify(a: cli::VerifyArgs, ctl: &Arc<RunControl>) -> Result<(), Error> {
    let delta = a.name.delta(&a.delta);
    let cfg = VerifyConfig::new(&delta, a.base, a.delta_only, &a.run.options(), env)?;
    let monitor = Monitor::start(Arc::clone(ctl), "verify", !a.run.summary.quiet);
    let result = fapm::verify(&cfg, ctl);
    let peak = monitor.finish();
    report_apply("verified", result?, peak, &a.run.summary);
    Ok(())
}

fn merge(a: cli::MergeArgs, ctl: &Arc<RunControl>) -> Result<(), Error> {
    let cfg = MergeConfig::new(a.parts, a.output, a.overwrite, a.memory.memory_budget.as_deref())?;
    let monitor = Monitor::start(Arc::clone(ctl), "merge", !a.summary.quiet);
    let result = fapm::merge(&cfg, ctl);
    let peak = monitor.finish();
    let s = result?;
    if a.summary.json {
        print_json(&with_peak(fapm::json::merge(&s), peak));
    }
    if !a.summary.quiet {
        eprintln!(
            "merged   {} parts: {} tensors, {} side files, {} blocks copied",
            s.parts, s.tensors, s.side_files, s.blocks
        );
        eprintln!("time     {:.2} s, {}, peak memory {}", s.seconds, rate(s.delta_bytes, s.seconds), bytes(peak));
        eprintln!("wrote    {} ({})", printable(&s.output.display().to_string()), bytes(s.delta_bytes));
    }
    Ok(())
}

/// `card`: the delta and its model card in a folder, ready for `hf upload`.
fn card(a: cli::CardArgs, ctl: &RunControl) -> Result<(), Error> {
    let hub = fapm::hub::Env::read(env);
    let cfg = fapm::card::CardConfig {
        delta: a.name.delta(&a.delta).resolve(&hub)?,
        output: a.output,
        report: a.report,
        finetuned_card: a.finetuned_card,
        repo_id: a.repo_id,
        hub,
        memory_budget: config::memory_budget(a.memory.memory_budget.as_deref())?,
        overwrite: a.overwrite,
    };
    let s = fapm::card::card(&cfg, ctl)?;
    if a.summary.json {
        let mut v = serde_json::to_value(&s).expect("a summary serializes");
        v["command"] = json!("card");
        print_json(&v);
    }
    if !a.summary.quiet {
        let base = s
            .base_model
            .as_deref()
            .map_or("none recorded: users pass --base".to_owned(), |b| printable(b).into_owned());
        eprintln!("card     base_model {base}; license {}", s.license.as_deref().unwrap_or("none found"));
        let out = printable(&s.output.display().to_string()).into_owned();
        eprintln!("wrote    {out} ({} and README.md); publish: hf upload ORG/NAME {out}", printable(&s.delta_file));
    }
    Ok(())
}

#[cfg(feature = "report")]
fn report(a: cli::ReportArgs, ctl: &RunControl) -> Result<(), Error> {
    let cfg = fapm::ReportConfig {
        base: a.base,
        finetuned: a.finetuned,
        output: a.output,
        tensors: config::regexes("--tensor", &a.tensor)?,
        overwrite: a.overwrite,
        memory_budget: config::memory_budget(a.memory.memory_budget.as_deref())?,
    };
    let start = std::time::Instant::now();
    let s = fapm::report::report_with(&cfg, ctl)?;
    if a.summary.json {
        print_json(&fapm::json::report(&s, start.elapsed().as_secs_f64()));
    }
    if !a.summary.quiet {
        let extended = match s.extended_tensors {
            0 => String::new(),
            n => format!(" ({n} extended: their base-shaped part)"),
        };
        eprintln!(
            "report   {} tensors charted{extended}, heatmaps of {}; {} files in {:.2} s",
            s.tensors_charted,
            names(&s.heatmap_tensors),
            s.files.len(),
            start.elapsed().as_secs_f64()
        );
        eprintln!("open     {}", printable(&s.output.join("index.html").display().to_string()));
    }
    Ok(())
}

#[cfg(not(feature = "report"))]
fn report(_: cli::ReportArgs, _: &RunControl) -> Result<(), Error> {
    Err(Error::Config("report is not built in: build fapm with the `report` feature (on by default)".into()))
}

fn report_apply(verb: &str, s: fapm::ApplySummary, peak: u64, how: &cli::SummaryArgs) {
    if how.json {
        print_json(&with_peak(fapm::json::apply(verb, &s), peak));
    }
    if how.quiet {
        return;
    }
    eprintln!(
        "{verb:<9}{} tensors ({}), {} side files, {} blocks; all hashes match",
        s.tensors,
        bytes(s.tensor_bytes),
        s.side_files,
        s.blocks
    );
    print_code_files(&s.code_files);
    if let Some(repo) = &s.recorded_base {
        eprintln!("base     {} (the base the delta records, from the Hugging Face cache)", printable(repo));
    }
    if s.base_tensors_checked > 0 {
        eprintln!("base     {} base tensors match the delta's hashes", s.base_tensors_checked);
    }
    if let Some([i, n]) = s.part {
        eprintln!("part     {i} of {n} of a partitioned prune: join all {n} parts with `fapm merge` to apply them");
    }
    eprintln!("time     {:.2} s, {}, peak memory {}", s.seconds, rate(s.tensor_bytes, s.seconds), bytes(peak));
    if let Some(out) = &s.output {
        eprintln!("wrote    {}", printable(&out.display().to_string()));
    }
}

/// Names every code file a delta carries (SPEC section 4), on stderr.
fn print_code_files(code: &[String]) {
    if !code.is_empty() {
        eprintln!("code     this delta ships code: {}", names(code));
    }
}

fn inspect(cfg: &InspectConfig, json_out: bool, ctl: &RunControl) -> Result<(), Error> {
    let path = cfg.delta.as_path();
    let (m, size) = fapm::inspect(cfg, ctl)?;
    let encoded = |t: &fapm_stages::format::TensorRecord| t.blocks.iter().map(|b| b.len).sum::<u64>();
    if json_out {
        // Streamed: a JSON value of a large manifest would take many times its size.
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let written = fapm::json::inspect_to(&mut out, path, &m, size).and_then(|()| {
            use std::io::Write;
            writeln!(out)?;
            out.flush()
        });
        return written.map_err(|e| Error::io(std::path::Path::new("<stdout>"), e));
    }
    println!(
        "{}  ({}, format v{}, written by {})",
        printable(&path.display().to_string()),
        bytes(size),
        m.version,
        printable(&m.tool)
    );
    println!(
        "metric {}, sparsity {}, threshold {}, {} {} shard(s), {} side file(s), {} base-only tensor(s)",
        m.metric.name(),
        printable(&m.sparsity),
        match m.threshold {
            fapm_stages::threshold::select::ThresholdMode::Exact => "exact",
            fapm_stages::threshold::select::ThresholdMode::Approx => "approx",
        },
        if m.source == fapm_stages::format::Source::File { "file," } else { "directory," },
        m.shards.len(),
        m.side_files.len(),
        m.base_only.len()
    );
    if m.metric == fapm_stages::threshold::score::Metric::Fapm && m.penalty != "1" {
        println!("penalty {}", one_line(&m.penalty));
    }
    for r in &m.sparsity_for {
        println!("sparsity {} for tensors matching {}", one_line(&r.sparsity), one_line(&r.pattern));
    }
    if let Some(p) = &m.part {
        println!(
            "part {} of {}: tensors {} to {} of {}; merge all {} parts with `fapm merge` before applying",
            p.index,
            p.count,
            p.first + 1,
            p.first + m.tensors.len() as u64,
            p.total,
            p.count
        );
    }
    let width = m.tensors.iter().map(|t| printable(&t.name).chars().count()).max().unwrap_or(6).clamp(6, 60);
    println!(
        "{:<width$}  {:<6}  {:<9}  {:<18}  {:>24}  {:>10}",
        "tensor", "mode", "dtype", "shape", "kept / total", "encoded"
    );
    for t in &m.tensors {
        let dtype = match t.base_dtype {
            Some(b) if b != t.dtype => format!("{b}->{}", t.dtype),
            _ => t.dtype.to_string(),
        };
        let kept = match &t.extended {
            _ if t.mode == fapm_stages::format::Mode::Whole => "all".to_string(),
            Some(e) => format!("{} / {} +{} new", count(t.kept), count(t.diffed_numel()), count(e.stored)),
            None => format!("{} / {}", count(t.kept), count(t.numel())),
        };
        println!(
            "{:<width$}  {:<6}  {:<9}  {:<18}  {:>24}  {:>10}",
            printable(&t.name),
            t.mode.name(),
            dtype,
            format!("{:?}", t.shape),
            kept,
            bytes(encoded(t))
        );
    }
    for f in &m.side_files {
        let code = if fapm_stages::paths::is_code(&f.path) { "  code" } else { "" };
        println!("side file {}  ({}){code}", printable(&f.path), bytes(f.size));
    }
    let code = fapm::pipeline::apply::code_files(&m);
    if !code.is_empty() {
        println!("this delta ships code: {}", names(&code));
    }
    Ok(())
}
