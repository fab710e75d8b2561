//! The generator's two modes: writing units (as systemd runs it) and
//! `--check` (a dry run for people).

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use qrexec_connect_binding::address::Specifiers;
use qrexec_connect_generator::config::{Config, ConfigDirs, Problem};
use qrexec_connect_generator::unit;

/// Prefix for messages that do not start with a config file's path.
const ME: &str = "qrexec-connect-generator";

// The flag that asks `qrexec-connect reconcile` to apply the new units: one
// definition of where it lives, shared with the reconcile step.
use qrexec_connect_binding::runtime_dir::RuntimeDir;

/// Normal run: units into `out`, then the reload flag. Fails only when
/// there were units to write and not one could be written.
pub fn generate(out: &Path) -> ExitCode {
    let config = Config::load(&ConfigDirs::from_env(), Specifiers::from_env());
    for problem in &config.problems {
        report(&describe(problem));
    }
    let (written, errors) = unit::write_units(out, &config.bindings);
    for error in &errors {
        report(&format!("{ME}: {error}"));
    }
    if let Err(why) = request_reload() {
        report(&format!(
            "{ME}: cannot request a reload of the daemon: {why}"
        ));
    }
    if written == 0 && !config.bindings.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Dry run: the units on stdout; on stderr the directories and files read
/// or skipped, the problems and a summary. Exit 1 if there is any problem
/// other than a warning.
pub fn check() -> ExitCode {
    let config = Config::load(&ConfigDirs::from_env(), Specifiers::from_env());
    for seen in &config.seen {
        report(&format!("{ME}: {seen}"));
    }
    for problem in &config.problems {
        report(&describe(problem));
    }
    let mut stdout = io::BufWriter::new(io::stdout().lock());
    for (i, binding) in config.bindings.iter().enumerate() {
        let separator = if i > 0 { "\n" } else { "" };
        let name = binding.unit_name();
        let text = unit::socket_unit(binding);
        // A closed stdout (e.g. `| head`) is not worth a panic.
        if write!(stdout, "{separator}==> {name} <==\n{text}").is_err() {
            break;
        }
    }
    let _ = stdout.flush();
    drop(stdout);
    let units = config.bindings.len();
    let warnings = config.problems.iter().filter(|p| p.is_warning()).count();
    let problems = config.problems.len() - warnings;
    report(&format!(
        "{ME}: {units} socket unit{}, {problems} problem{}, {warnings} warning{}",
        plural(units),
        plural(problems),
        plural(warnings)
    ));
    if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Messages about a config file start with its path (which names the
/// program well enough in the journal); others get the program name.
fn describe(problem: &Problem) -> String {
    match problem {
        Problem::NoUserDir => format!("{ME}: {problem}"),
        _ => problem.to_string(),
    }
}

/// One message, one line, one write: lines never interleave.
fn report(message: &str) {
    let _ = io::stderr()
        .lock()
        .write_all(format!("{message}\n").as_bytes());
}

/// Raises `$XDG_RUNTIME_DIR/qrexec-connect/reload-requested` (directory
/// 0700, empty file 0600; see [`RuntimeDir`]).
fn request_reload() -> Result<(), String> {
    RuntimeDir::from_env()
        .and_then(|dir| dir.raise_reload_flag())
        .map_err(|e| e.to_string())
}
