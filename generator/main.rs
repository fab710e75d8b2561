//! `qrexec-connect-generator`: the systemd user generator that turns the
//! lines of `qrexec-connect.conf(5)` into socket units.
//!
//! This file only reads argv and dispatches; the work is in `run.rs` and in
//! the library's `config` and `unit` modules. No async runtime and no
//! logging framework: a generator runs at every manager start and
//! daemon-reload and must be done in milliseconds; stderr reaches the
//! journal through the user manager.

mod clash;
mod run;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;

use qrexec_connect_generator::config::printable;

const HELP: &str = "\
Usage: qrexec-connect-generator NORMAL-DIR [EARLY-DIR LATE-DIR]
       qrexec-connect-generator --check [--verbose] [FILE...]
       qrexec-connect-generator --help | --version

Writes one qrexec-connect-*.socket unit per line of the *.conf files in
$XDG_CONFIG_HOME/qrexec-connect/ (default ~/.config/qrexec-connect/) and
/etc/qrexec-connect/ into NORMAL-DIR, as a systemd user generator.

  --check        read the same files (or just each FILE) and print every
                 error and warning, then a summary; also ask the user manager
                 whether another qrexec-connect-*.socket unit listens on a
                 line's address. Exit status 1 if there is an error;
                 warnings alone exit 0
  -v, --verbose  with --check: also list the files read and skipped, and
                 print the units that would be written
  -h, --help     show this help
  -V, --version  show the version

See qrexec-connect-generator(8) and qrexec-connect.conf(5).
";

/// What an error shows of the usage: one line, then where the help is.
const SHORT_USAGE: &str = "\
Usage: qrexec-connect-generator NORMAL-DIR [EARLY-DIR LATE-DIR] | --check [--verbose] [FILE...]
Try 'qrexec-connect-generator --help'.
";

/// What the command line asks for.
enum Mode {
    Help,
    Version,
    Check(run::CheckOptions),
    Generate(PathBuf),
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match parse(&args) {
        Ok(Mode::Help) => {
            let _ = std::io::stdout().write_all(HELP.as_bytes());
            ExitCode::SUCCESS
        }
        Ok(Mode::Version) => {
            let version = concat!("qrexec-connect-generator ", env!("CARGO_PKG_VERSION"), "\n");
            let _ = std::io::stdout().write_all(version.as_bytes());
            ExitCode::SUCCESS
        }
        Ok(Mode::Check(options)) => run::check(&options),
        Ok(Mode::Generate(dir)) => run::generate(&dir),
        Err(why) => usage_error(&why),
    }
}

/// The command line, or why it is not a valid one. `--` ends the options
/// (for a FILE whose name starts with `-`).
fn parse(args: &[OsString]) -> Result<Mode, String> {
    // An argument is anyone's text: shown by the one printable rule.
    let shown = |w: &OsString| format!("\"{}\"", printable(w.as_bytes()));
    let mut options: Vec<&OsString> = Vec::new();
    let mut operands: Vec<&OsString> = Vec::new();
    let mut only_operands = false;
    for arg in args {
        if only_operands || !arg.as_bytes().starts_with(b"-") || arg.as_bytes() == b"-" {
            operands.push(arg);
        } else if arg.as_bytes() == b"--" {
            only_operands = true;
        } else {
            options.push(arg);
        }
    }
    let (mut check, mut verbose) = (false, false);
    for option in &options {
        match option.as_bytes() {
            b"--help" | b"-h" | b"--version" | b"-V" => {
                if args.len() > 1 {
                    return Err(format!(
                        "{} takes no other argument (got {})",
                        shown(option),
                        args.len() - 1
                    ));
                }
                return Ok(if matches!(option.as_bytes(), b"--help" | b"-h") {
                    Mode::Help
                } else {
                    Mode::Version
                });
            }
            b"--check" => check = true,
            b"--verbose" | b"-v" => verbose = true,
            _ => return Err(format!("unknown option {}", shown(option))),
        }
    }
    if check {
        let files = operands.iter().map(PathBuf::from).collect();
        return Ok(Mode::Check(run::CheckOptions { files, verbose }));
    }
    if verbose {
        return Err("\"--verbose\" works only with --check".to_owned());
    }
    match operands[..] {
        // systemd passes three directories; with one, that one is used.
        [dir] | [dir, _, _] => Ok(Mode::Generate(PathBuf::from(dir))),
        [] => Err("no output directory given".to_owned()),
        _ => Err(format!(
            "expected 1 output directory, or 3 as systemd passes them (normal, early, late); \
             got {}",
            operands.len()
        )),
    }
}

/// The reason, a usage line and where the help is, on stderr; exit status 2.
fn usage_error(why: &str) -> ExitCode {
    let _ = std::io::stderr()
        .write_all(format!("qrexec-connect-generator: {why}\n{SHORT_USAGE}").as_bytes());
    ExitCode::from(2)
}
