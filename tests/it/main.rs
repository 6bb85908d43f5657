//! fapm's integration tests: one binary (ripgrep-style), one module per concern.

mod bounds;
mod cli;
mod crash;
mod faults;
mod fuzz_regressions;
mod hostile;
mod hub;
mod parts;
mod paths;
mod pipeline;
mod readback;
mod reference;
mod report;
mod util;
