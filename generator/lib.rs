//! The generator's two halves, as a library so that property tests can
//! drive them: [`config`] turns the config files into typed bindings once,
//! at the edge; [`unit`](mod@unit) turns each binding into a socket unit.
//! The command line and the two modes are in `main.rs` and `run.rs`.

pub mod config;
pub mod unit;
