//! Managing: the commands that talk to the user manager or edit the config,
//! run by a user (`status`, `policy`, `add`, `remove`) or by systemd after a
//! reload or a failure (`reconcile`, `recover`). Each runs once and exits;
//! none is on a connection's path.
//!
//! May use: std, `systemctl --user` (through `manager` only), the
//! generator's library (the config grammar), the binding crate, socket2,
//! rustix, serde/serde_ini, libc, `crate::shared`, and `crate::cli` for the
//! one usage-error format. Never tokio and never `crate::serving`: what the
//! daemon and `status` share (the counters file, signal names, the default
//! client) is in `crate::shared`. Blocking is fine here.
//!
//! - `manager`: `systemctl --user` (run, list the sockets, show, one property).
//! - `reconcile`: after daemon-reload, apply changed socket units; the state file.
//! - `recover`: bring bindings back after systemd gave up, with a backoff.
//! - `status`: one row per binding from the config, the manager and the counters.
//! - `policy`: the dom0 rules the bindings need, never wider.
//! - `edit`: `add` and `remove`, a line of a config file.

pub mod edit;
pub mod manager;
pub mod policy;
pub mod reconcile;
pub mod recover;
pub mod status;
