//! What people see: logging setup, the progress bar (terminals only), peak-memory sampling,
//! and the human-readable summaries.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use fapm::RunControl;

/// Sets up `tracing` on stderr: warnings by default, more with `-v`, or as `RUST_LOG` says.
pub fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: warnings name files, and a pipe or a log gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .try_init();
}

/// A background thread that draws the progress bar (when stderr is a terminal and not
/// quiet) and samples peak anonymous memory.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Monitor {
    /// Starts monitoring `ctl`; `label` names the command on the bar.
    pub fn start(ctl: Arc<RunControl>, label: &'static str, show_bar: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(anon_memory()));
        let bar = (show_bar && std::io::stderr().is_terminal()).then(|| {
            // Hidden until the run knows its total, so it never flashes a full, empty bar.
            let bar = indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::hidden());
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>7} [{bar:30}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} ETA {eta} {wide_msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label);
            bar
        });
        let handle = {
            let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
            thread::spawn(move || loop {
                peak.fetch_max(anon_memory(), Ordering::Relaxed);
                if let Some(bar) = &bar {
                    let (done, total) = ctl.progress();
                    if total > 0 && bar.is_hidden() {
                        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    }
                    bar.set_length(total);
                    bar.set_position(done);
                    bar.set_message(fapm_stages::error::printable(&ctl.current()).into_owned());
                }
                if stop.load(Ordering::Relaxed) {
                    if let Some(bar) = &bar {
                        bar.finish_and_clear();
                    }
                    return;
                }
                // Parked rather than asleep, so that `finish` wakes it at once instead of every
                // command waiting out the rest of a 50 ms sleep at its end.
                thread::park_timeout(Duration::from_millis(50));
            })
        };
        Monitor { stop, peak, handle: Some(handle) }
    }

    /// Stops the bar and returns peak anonymous memory in bytes.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        self.peak.load(Ordering::Relaxed).max(anon_memory())
    }
}

/// Resident anonymous memory (heap, stacks) of this process; memory-mapped inputs are
/// page cache, not counted. 0 where /proc is not available.
fn anon_memory() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// `1.23 GB`-style sizes (decimal units), as the progress bar shows them. A `String`, so
/// that table columns can pad it.
pub fn bytes(n: u64) -> String {
    indicatif::DecimalBytes(n).to_string()
}

/// `bytes` over `seconds` as `1.23 GB/s` (decimal units), as the progress bar shows its rate.
pub fn rate(bytes: u64, seconds: f64) -> String {
    let per_second = bytes as f64 / seconds.max(1e-9);
    format!("{}/s", indicatif::DecimalBytes(per_second as u64))
}

/// A count with thousands separators.
pub fn count(n: u64) -> String {
    indicatif::HumanCount(n).to_string()
}

/// `x / y` as a percentage, 0 when `y` is 0.
pub fn percent(x: u64, y: u64) -> f64 {
    if y == 0 {
        0.0
    } else {
        100.0 * x as f64 / y as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_234_567), "1.23 MB");
        assert_eq!(format!("{:>8}", bytes(1500)), " 1.50 kB");
        assert_eq!(rate(3_000_000_000, 2.0), "1.50 GB/s");
        assert_eq!(rate(1_234_567, 1.0), "1.23 MB/s");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(12), "12");
        assert_eq!(percent(1, 0), 0.0);
    }
}
