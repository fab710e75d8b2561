//! What the qrexec-connect generator and daemon must agree on, and nothing
//! else: one crate, so the writer and the reader of a socket unit can never
//! disagree, and small, so the generator stays small (std and libc only).
//!
//! A binding is a listen address tied to a destination (TARGET SERVICE):
//!
//! * [`address`]: the listen-address grammar, as written in config and as
//!   read back from an inherited socket;
//! * [`collision`]: when two listen addresses are one for the kernel
//!   (a wildcard takes the port on every address);
//! * [`destination`]: what a valid TARGET, SERVICE and
//!   `FileDescriptorName=` is (the generator writes the fd name, the daemon
//!   reads it back from `LISTEN_FDNAMES`);
//! * [`runtime_dir`]: the reload protocol: our directory under
//!   `$XDG_RUNTIME_DIR`, the flag the generator raises and the reconcile
//!   step lowers, the names of the state files.
//!
//! Design notes: `docs/design.md`; the map of the workspace:
//! `docs/architecture.md`.

pub mod address;
pub mod collision;
pub mod destination;
pub mod runtime_dir;
