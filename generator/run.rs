//! The generator's two modes: writing units (as systemd runs it) and
//! `--check` (a dry run for people).

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use qrexec_connect_binding::address::Specifiers;
use qrexec_connect_generator::config::{
    printable_message, Binding, Config, ConfigDirs, Problem, Seen, TEXT_INDENT,
};
use qrexec_connect_generator::unit;

use crate::clash;

/// Prefix for messages that do not start with a config file's path.
const ME: &str = "qrexec-connect-generator";

// The flag that asks `qrexec-connect reconcile` to apply the new units: one
// definition of where it lives, shared with the reconcile step.
use qrexec_connect_binding::runtime_dir::{RuntimeDir, GENERATED_FILE};

/// Normal run: units into `out`, then the reload flag. Fails only when
/// there were units to write and not one could be written.
pub fn generate(out: &Path) -> ExitCode {
    let config = Config::load(&ConfigDirs::from_env(), Specifiers::from_env());
    for problem in &config.problems {
        report_problem(problem);
    }
    let (written, errors) = unit::write_units(out, &config.bindings);
    for error in &errors {
        report(&format!("{ME}: {error}"));
    }
    // The record of what was written, then the flag that asks the reload
    // step to apply it (see RuntimeDir).
    match RuntimeDir::from_env() {
        Err(why) => report(&format!(
            "{ME}: cannot request a reload of the daemon: {why}"
        )),
        Ok(dir) => {
            if let Err(why) = write_manifest(&dir, out, &config.bindings) {
                report(&format!(
                    "{ME}: cannot record the units written (the reload step will ask the \
                     manager about each one): {why}"
                ));
            }
            if let Err(why) = dir.raise_reload_flag() {
                report(&format!(
                    "{ME}: cannot request a reload of the daemon: {why}"
                ));
            }
        }
    }
    if written == 0 && !config.bindings.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// What `--check` reads and shows.
pub struct CheckOptions {
    /// Only these files (`--check FILE...`); empty: the config directories.
    pub files: Vec<PathBuf>,
    /// Also the directories and files read, and the units on stdout.
    pub verbose: bool,
}

/// Dry run, answering like `sshd -t`: on stderr the errors and warnings,
/// each with its line's text indented below, and a one-line summary;
/// stdout stays empty unless `verbose` asks for the units. Exit 1 if there
/// is an error; warnings alone exit 0.
pub fn check(options: &CheckOptions) -> ExitCode {
    let specifiers = Specifiers::from_env();
    let config = if options.files.is_empty() {
        Config::load(&ConfigDirs::from_env(), specifiers.clone())
    } else {
        Config::load_files(&options.files, specifiers.clone())
    };
    for seen in &config.seen {
        // A file left out is shown: it may be the one the user meant.
        if options.verbose || matches!(seen, Seen::Skipped { .. }) {
            report(&format!("{ME}: {seen}"));
        }
    }
    for problem in &config.problems {
        report_problem(problem);
    }
    let mut errors = config.problems.iter().filter(|p| !p.is_warning()).count();
    let warnings = config.problems.len() - errors;
    match clash::clashes(&config.bindings, &specifiers) {
        Ok(clashes) => {
            for clash in &clashes {
                report_with_text(&clash.to_string(), Some(&clash.text));
            }
            errors += clashes.len();
        }
        Err(why) => report(&format!(
            "{ME}: clashes with other qrexec-connect-*.socket units not checked: {why}"
        )),
    }
    if options.verbose {
        write_units(&config.bindings);
    }
    let files = config
        .seen
        .iter()
        .filter(|seen| matches!(seen, Seen::Read { .. }))
        .count();
    let bindings = config.bindings.len();
    report(&format!(
        "{ME}: {bindings} binding{}, {errors} error{}, {warnings} warning{} in {files} file{}",
        plural(bindings),
        plural(errors),
        plural(warnings),
        plural(files),
    ));
    if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The units `bindings` become, on stdout, each under a `==> NAME <==`
/// header as `tail` prints files.
fn write_units(bindings: &[Binding]) {
    let mut stdout = io::BufWriter::new(io::stdout().lock());
    for (i, binding) in bindings.iter().enumerate() {
        let separator = if i > 0 { "\n" } else { "" };
        let name = binding.unit_name();
        let text = unit::socket_unit(binding);
        // A closed stdout (e.g. `| head`) is not worth a panic.
        if write!(stdout, "{separator}==> {name} <==\n{text}").is_err() {
            break;
        }
    }
    let _ = stdout.flush();
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Messages about a config file start with its path (which names the
/// program well enough in the journal); others get the program name. The
/// line's text, if any, follows on a line of its own, indented.
fn report_problem(problem: &Problem) {
    match problem {
        Problem::NoUserDir => report(&format!("{ME}: {problem}")),
        _ => {
            let out = problem.report() + "\n";
            let _ = io::stderr().lock().write_all(out.as_bytes());
        }
    }
}

/// One message, one line, one write: lines never interleave. What a message
/// quotes of the config is already cut and escaped; the rest (paths from
/// the environment, system errors) is escaped here, so no message can hold
/// a line break, an escape sequence or a bidirectional control.
fn report(message: &str) {
    report_with_text(message, None);
}

/// A message and, on a line of its own, indented, the config line it is
/// about: both escaped like [`report`], in one write.
fn report_with_text(message: &str, text: Option<&str>) {
    let mut out = printable_message(message);
    if let Some(text) = text {
        out += &format!("\n{TEXT_INDENT}{}", printable_message(text));
    }
    out.push('\n');
    let _ = io::stderr().lock().write_all(out.as_bytes());
}

/// Records what this run wrote, for the reload step
/// (`$XDG_RUNTIME_DIR/qrexec-connect/generated`, see [`GENERATED_FILE`]):
/// the units now in `out`, except those that a unit file or drop-in of the
/// same name elsewhere may change. On failure the old record is removed,
/// so that a stale one is never trusted. Prefix drop-ins
/// (`qrexec-connect-.socket.d/`) are not considered: ours sets no address or
/// fd name, and a user's that does is only applied when the line changes.
fn write_manifest(dir: &RuntimeDir, out: &Path, bindings: &[Binding]) -> io::Result<()> {
    let overridden = units_elsewhere();
    let mut text = String::new();
    for binding in bindings {
        let name = binding.unit_name();
        if overridden.contains(name) || !out.join(name).exists() {
            continue;
        }
        // Names, addresses and fd names never hold line breaks or ']'
        // (the grammar and the unit-name escaping see to it).
        text += &format!(
            "[{name}]\nlisten={}\nfd_name={}\n",
            binding.listen().to_listen_stream(),
            binding.fd_name()
        );
    }
    dir.write_atomically(GENERATED_FILE, &text)
        .inspect_err(|_| {
            let _ = dir.remove(GENERATED_FILE);
        })
}

/// Names of `qrexec-connect-*.socket` units (and `*.socket.d` drop-in
/// directories) in the user unit directories other than ours: a file there
/// may replace or change a generated unit.
fn units_elsewhere() -> HashSet<String> {
    let env = |name: &str| std::env::var_os(name).map(PathBuf::from);
    let home = env("HOME");
    let config = env("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config")));
    let data = env("XDG_DATA_HOME").or_else(|| home.as_ref().map(|h| h.join(".local/share")));
    let runtime = env("XDG_RUNTIME_DIR");
    let mut dirs: Vec<PathBuf> = [
        "/etc/systemd/user",
        "/etc/xdg/systemd/user",
        "/run/systemd/user",
        "/usr/local/share/systemd/user",
        "/usr/share/systemd/user",
        "/usr/local/lib/systemd/user",
        "/usr/lib/systemd/user",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    for base in config.iter() {
        dirs.push(base.join("systemd/user"));
        dirs.push(base.join("systemd/user.control"));
    }
    for base in data.iter() {
        dirs.push(base.join("systemd/user"));
    }
    for base in runtime.iter() {
        for sub in [
            "user",
            "user.control",
            "transient",
            "generator.early",
            "generator.late",
        ] {
            dirs.push(base.join("systemd").join(sub));
        }
    }
    let mut names = HashSet::new();
    for dir in dirs {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(unit) = name.strip_suffix(".d") {
                names.insert(unit.to_owned());
            } else {
                names.insert(name);
            }
        }
    }
    names.retain(|name| name.starts_with("qrexec-connect-") && name.ends_with(".socket"));
    names
}
