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

use qrexec_connect_generator::config::printable;

const USAGE: &str = "\
Usage: qrexec-connect-generator NORMAL-DIR [EARLY-DIR LATE-DIR]
       qrexec-connect-generator --check
       qrexec-connect-generator --help | --version

Writes one qrexec-connect-*.socket unit per line of the *.conf files in
$XDG_CONFIG_HOME/qrexec-connect/ (default ~/.config/qrexec-connect/) and
/etc/qrexec-connect/ into NORMAL-DIR, as a systemd user generator.

  --check        read the same files, print the units that would be written
                 and every problem; exit 1 if there is any problem
  -h, --help     show this help
  -V, --version  show the version

See qrexec-connect.conf(5).
";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let words: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    match words[..] {
        [b"--help" | b"-h"] => {
            let _ = std::io::stdout().write_all(USAGE.as_bytes());
            ExitCode::SUCCESS
        }
        [b"--version" | b"-V"] => {
            let version = concat!("qrexec-connect-generator ", env!("CARGO_PKG_VERSION"), "\n");
            let _ = std::io::stdout().write_all(version.as_bytes());
            ExitCode::SUCCESS
        }
        [b"--check"] => run::check(),
        // systemd passes three directories; with one, that one is used.
        [dir] | [dir, _, _] if !words.iter().any(|w| w.starts_with(b"-")) => {
            run::generate(Path::new(std::ffi::OsStr::from_bytes(dir)))
        }
        _ => usage_error(&what_is_wrong(&words)),
    }
}

/// Why `words` are not a valid command line (called only when they are not).
fn what_is_wrong(words: &[&[u8]]) -> String {
    // An argument is anyone's text: shown by the one printable rule.
    let shown = |w: &[u8]| printable(w);
    if let Some(option) = words.iter().find(|w| w.starts_with(b"-")) {
        return match *option {
            b"--help" | b"-h" | b"--version" | b"-V" | b"--check" => format!(
                "{} takes no other argument (got {})",
                shown(option),
                words.len() - 1
            ),
            _ => format!("unknown option '{}'", shown(option)),
        };
    }
    match words.len() {
        0 => "no output directory given".to_owned(),
        n => format!(
            "expected 1 output directory, or 3 as systemd passes them (normal, early, late); \
             got {n}"
        ),
    }
}

/// The reason, then the usage, on stderr; exit status 2.
fn usage_error(why: &str) -> ExitCode {
    let _ = std::io::stderr()
        .write_all(format!("qrexec-connect-generator: {why}\n\n{USAGE}").as_bytes());
    ExitCode::from(2)
}
