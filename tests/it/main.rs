//! fapm's integration tests: one binary (ripgrep-style), one module per concern.

mod cli;
mod faults;
mod fuzz_regressions;
mod hostile;
mod parts;
mod pipeline;
mod readback;
mod reference;
mod util;
