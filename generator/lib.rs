//! The generator's library half, so that property tests (and the daemon's
//! `status` and `policy`) can use it. Dependencies point one way:
//! [`unit_name`] needs only a listen address; [`config`] turns the config
//! files into typed [`config::Binding`]s once, at the edge, naming each
//! binding's unit with [`unit_name`] and asking [`owner`] whether another
//! user can take its socket path; [`unit`](mod@unit) turns each binding
//! into a socket unit. The command line and the two modes are in `main.rs`
//! and `run.rs`.

pub mod config;
pub mod owner;
pub mod unit;
pub mod unit_name;
