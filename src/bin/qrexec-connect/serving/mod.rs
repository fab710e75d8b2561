//! Serving: what runs in the socket-activated daemon, per connection and
//! around it. Sockets from systemd in, `accept`, `qrexec-client-vm` spawned
//! for each connection, its end reaped and logged, the counters published.
//!
//! May use: tokio (one current-thread runtime: only here), nix, rustix, socket2,
//! listenfd, libc, tracing, the binding crate, and `crate::shared`. Never
//! `main`/`cli` or `crate::managing`: nothing here waits on `systemctl` or
//! reads the config, so a reader of the hot path reads only this folder.
//! `cli` builds [`Options`]; `main` hands them to [`daemon::run`].
//!
//! - `daemon`: the event loop, fds in → serve (accept) → spawn → wait and
//!   log; the daemon's [`Options`].
//! - `listener`: sockets from systemd, their checks, accept, peers.
//! - `spawn`: the qrexec-client-vm command line, client modes, the splicer,
//!   exit statuses in words.
//! - `notify`: sd_notify, non-blocking.
//! - `log`: journald or stderr, never blocking on a stalled journal.
//! - `published`: the counters' writer (the format is `shared::counters`).

pub mod daemon;
pub mod listener;
pub mod log;
pub mod notify;
pub mod published;
pub mod spawn;

pub use daemon::Options;
