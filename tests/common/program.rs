//! The workspace's programs under test, found where `cargo build
//! --workspace` put them (next to the test double, which Cargo builds for
//! this package). A program that is missing, or older than its sources,
//! fails the test at once with what to run: a test never skips, and never
//! runs a stale binary.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The daemon, `qrexec-connect`.
pub const DAEMON: Program = Program {
    name: "qrexec-connect",
    sources: &[
        "src/bin/qrexec-connect",
        "crates/binding",
        "Cargo.toml",
        // status and policy read the config with the generator's library.
        "generator/lib.rs",
        "generator/config.rs",
        "generator/unit.rs",
        "generator/unit_name.rs",
    ],
};
/// The generator, `qrexec-connect-generator`.
pub const GENERATOR: Program = Program {
    name: "qrexec-connect-generator",
    sources: &["generator", "crates/binding"],
};
/// qubes.ConnectNFS, built as `qrexec-connect-nfs`.
pub const CONNECT_NFS: Program = Program {
    name: "qrexec-connect-nfs",
    sources: &["connect-nfs"],
};
/// The test double of qrexec-client-vm (this package's own binary).
pub const DOUBLE: &str = env!("CARGO_BIN_EXE_qrexec-client-vm-double");

/// The workspace root.
pub fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Cargo's output directory for this profile (`target/debug`).
pub fn out_dir() -> &'static Path {
    Path::new(DOUBLE).parent().unwrap()
}

/// A program of the workspace and the source paths it is built from.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    pub name: &'static str,
    sources: &'static [&'static str],
}

impl Program {
    /// The checked binary: panics if it is missing or stale.
    pub fn path(&self) -> PathBuf {
        let path = out_dir().join(self.name);
        let built = match std::fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(time) => time,
            Err(e) => panic!(
                "{}: {e}: run `cargo build --workspace` first (`make test` does)",
                path.display()
            ),
        };
        for source in self.sources {
            if let Some(newer) = newer_than(&workspace().join(source), built) {
                panic!(
                    "{} is older than {}: run `cargo build --workspace` first (`make test` does)",
                    path.display(),
                    newer.display()
                );
            }
        }
        path
    }
}

impl std::fmt::Display for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl AsRef<OsStr> for Program {
    fn as_ref(&self) -> &OsStr {
        // Checked once per program and test binary, then kept.
        use std::sync::OnceLock;
        static PATHS: [OnceLock<PathBuf>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let slot = match self.name {
            "qrexec-connect" => &PATHS[0],
            "qrexec-connect-generator" => &PATHS[1],
            _ => &PATHS[2],
        };
        slot.get_or_init(|| self.path()).as_os_str()
    }
}

/// A file under `path` (or `path` itself) modified after `time`.
fn newer_than(path: &Path, time: SystemTime) -> Option<PathBuf> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_dir() {
        let entries = std::fs::read_dir(path).ok()?;
        return entries
            .filter_map(Result::ok)
            .find_map(|entry| newer_than(&entry.path(), time));
    }
    let relevant = path.extension().is_some_and(|e| e == "rs") || path.ends_with("Cargo.toml");
    (relevant && meta.modified().ok()? > time).then(|| path.to_path_buf())
}
