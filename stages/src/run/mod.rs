//! How the stages run: the shared cancellation flag and progress counters ([`RunControl`]),
//! the memory budget shared out among the stages ([`Budget`]), and the runner: the worker
//! pool, stage threads that cancel the others when they fail, and the ordered sliding window
//! of per-chunk jobs.

pub mod budget;
pub mod control;
pub mod runner;

pub use budget::Budget;
pub use control::RunControl;
