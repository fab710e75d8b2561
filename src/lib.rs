//! qrexec-connect: bind local sockets to Qubes qrexec services through systemd
//! socket activation.
//!
//! The library holds everything the programs share and nothing that needs an
//! async runtime, so the generator can link it without tokio:
//!
//! * [`binding`]: what a valid TARGET, SERVICE and `FileDescriptorName=` is,
//!   shared by the generator (writer) and the daemon (reader);
//! * [`address`]: listen addresses, as written in config and as read back
//!   from an inherited socket;
//! * [`config`]: the binding config files and their line grammar;
//! * [`unit`](mod@unit): socket unit names and text, as the generator writes them;
//! * [`listener`], [`spawn`], [`notify`]: the daemon's sockets, children and
//!   service-manager notifications (plain syscalls; the event loop is in the
//!   daemon binary);
//! * [`policy`]: the dom0 policy that a config needs;
//! * [`reconcile`]: making `daemon-reload` apply binding changes;
//! * [`recover`]: bringing bindings back after systemd gave up on the daemon;
//! * [`runtime_dir`]: our directory under `$XDG_RUNTIME_DIR` (the reload
//!   flag, the reconcile and recovery state), shared by all of them.
//!
//! Design notes: `docs/design.md`.

pub mod address;
pub mod binding;
pub mod config;
pub mod listener;
pub mod notify;
pub mod policy;
pub mod reconcile;
pub mod recover;
pub mod runtime_dir;
pub mod spawn;
pub mod unit;
