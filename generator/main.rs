//! `qrexec-connect-generator`: the systemd user generator that turns the
//! lines of `qrexec-connect.conf(5)` into socket units.
//!
//! This file only reads argv and dispatches; the work is in `run.rs` and in
//! the library's `config` and `unit` modules. No async runtime and no
//! logging framework: a generator runs at every manager start and
//! daemon-reload and must be done in milliseconds; stderr reaches the
//! journal through the user manager.

mod run;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "\
Usage: qrexec-connect-generator NORMAL-DIR [EARLY-DIR LATE-DIR]
       qrexec-connect-generator --check
       qrexec-connect-generator --help | --version

Writes one qrexec-connect-*.socket unit per line of the *.conf files in
$XDG_CONFIG_HOME/qrexec-connect/ (default ~/.config/qrexec-connect/) and
/etc/qrexec-connect/ into NORMAL-DIR, as a systemd user generator.

  --check    read the same files, print the units that would be written
             and every problem; exit 1 if there is any problem
  --help     show this help
  --version  show the version

See qrexec-connect.conf(5).
";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let first = args.first().map(|a| a.as_bytes());
    match (first, args.len()) {
        (Some(b"--help" | b"-h"), 1) => {
            let _ = std::io::stdout().write_all(USAGE.as_bytes());
            ExitCode::SUCCESS
        }
        (Some(b"--version"), 1) => {
            let version = concat!("qrexec-connect-generator ", env!("CARGO_PKG_VERSION"), "\n");
            let _ = std::io::stdout().write_all(version.as_bytes());
            ExitCode::SUCCESS
        }
        (Some(b"--check"), 1) => run::check(),
        // systemd passes three directories; with one, that one is used.
        (Some(dir), 1..=3) if !dir.starts_with(b"-") => run::generate(Path::new(&args[0])),
        _ => {
            let _ = std::io::stderr().write_all(USAGE.as_bytes());
            ExitCode::from(2)
        }
    }
}
