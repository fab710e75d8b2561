//! The dom0 policy files the project itself names, in one list: the shared
//! NFS file and the examples of `policy-examples/`, the Salt formula's file
//! (`salt/qrexec-connect/policy.sls`), and the single file of versions
//! before per-qube files. `qrexec-connect policy` suggests
//! `30-qrexec-connect-SOURCE.policy` for each client qube
//! ([`super::file_name`]); a name here must never be one of those, or
//! installing a qube's file would replace (and a highstate erase) rules of
//! other qubes. Every name here has a `.` right after `30-qrexec-connect`,
//! where a qube's file has a `-`. Std only: `tests/salt.rs` and
//! `tests/policy_examples.rs` include this file with `#[path]` to check the
//! formula and the examples against it.

/// The fixed file names, without the directory.
pub const FIXED_POLICY_FILES: [&str; 5] = [
    "30-qrexec-connect.policy",
    "30-qrexec-connect.nfs.policy",
    "30-qrexec-connect.salt.policy",
    "30-qrexec-connect.ssh-agent.policy",
    "30-qrexec-connect.tcp.policy",
];
