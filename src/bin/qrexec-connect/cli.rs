//! The command line of `qrexec-connect`: which command, which options, the
//! help texts, and the one error format.
//!
//! One table, [`COMMANDS`], says what each command is called, who runs it,
//! what it takes and what its help says; the top `--help`, each command's
//! help, the parsing and the "did you mean" all read it, so a new command is
//! one entry (plus its arm in `main.rs`). Users' commands are listed first,
//! the ones systemd runs under their own heading, the daemon's options last:
//! a user reads `--help` for `status` and `policy`, never to start the
//! daemon.
//!
//! An error is always three lines on stderr, exit 2:
//!
//! ```text
//! qrexec-connect: MESSAGE
//! Usage: qrexec-connect COMMAND ...      (that command's usage line)
//! Try 'qrexec-connect COMMAND --help'.
//! ```
//!
//! and a value the user gave is shown by [`quoted`]: in double quotes,
//! through the project's one [`printable`] rule, so a control, bidi or
//! invisible character is escaped and a huge argument is cut. The whole
//! help is printed only when asked for.
//!
//! With no command, the arguments are the daemon's options (systemd starts
//! it so). `-h`/`--help` anywhere asks for help, of the command when there
//! is one; `-d`/`--debug` is accepted before and after a command (a user who
//! wants more output should not get an error; the commands already print
//! all they know).

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use qrexec_connect_generator::config::printable;

use crate::serving::spawn::ClientMode;
use crate::serving::Options;
use crate::shared::DEFAULT_CLIENT;

/// LSB exit status for "invalid or excess argument(s)".
pub const EXIT_USAGE: u8 = 2;

/// Default cap on live connections per binding: systemd-socket-proxyd's
/// default, and enough for any interactive use of a qube; each connection is
/// a qrexec-client-vm process, so this also bounds memory.
const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Who runs a command: the help lists users' commands first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    User,
    Systemd,
}

/// An option of a command: `--name` or, with a value, `--name VALUE` or
/// `--name=VALUE`.
#[derive(Debug)]
pub struct OptionSpec {
    pub name: &'static str,
    /// For an option that takes a value, its placeholder as the help and
    /// the usage write it after the name, with the separator they show
    /// (` NAME`, or `=DIR` as a unit file passes it); both are accepted.
    pub value: Option<&'static str>,
    pub help: &'static str,
}

/// A command: everything its help, the top help and the parser need.
#[derive(Debug)]
pub struct CommandSpec {
    pub name: &'static str,
    pub runner: Runner,
    /// What follows the name in its usage line (`[--json]`).
    pub synopsis: &'static str,
    /// One or two lines for the top help (wrapped at 50 columns).
    pub summary: &'static str,
    /// The paragraph of its own help, after the usage line.
    pub description: &'static str,
    pub options: &'static [OptionSpec],
    /// The operands it takes, at most one of each, in order (`help
    /// COMMAND`, `add LISTEN TARGET SERVICE`); the command checks how many
    /// it needs.
    pub operands: &'static [&'static str],
}

/// Every command, users' first, each group in the order the help shows it.
pub const COMMANDS: [CommandSpec; 7] = [
    CommandSpec {
        name: "add",
        runner: Runner::User,
        synopsis: "(LISTEN TARGET SERVICE | --tcp SPEC) [--file NAME]",
        summary: "bind LISTEN to TARGET's SERVICE for good: adds\n\
                  the line, applies it, prints the dom0 rule",
        description: "Adds the line LISTEN TARGET SERVICE to ~/.config/qrexec-connect/NAME.conf,\n\
                      checked as the generator checks it (a line with the same LISTEN is\n\
                      replaced, in whichever of your files holds it), applies it with\n\
                      'systemctl --user daemon-reload', returns once the socket listens,\n\
                      and prints the dom0 rule the binding needs. --tcp SPEC is\n\
                      qvm-connect-tcp's LOCALPORT:TARGET:PORT: an empty LOCALPORT is PORT,\n\
                      an empty TARGET is @default; the socket listens on 127.0.0.1 only.\n\
                      Exit 0 when it listens, 1 otherwise, 2 for a bad argument.",
        options: &[
            OptionSpec {
                name: "--file",
                value: Some(" NAME"),
                help: "the file in ~/.config/qrexec-connect\n(default qrexec-connect.conf)",
            },
            OptionSpec {
                name: "--tcp",
                value: Some(" LOCALPORT:TARGET:PORT"),
                help: "127.0.0.1:LOCALPORT TARGET\nqubes.ConnectTCP+PORT",
            },
        ],
        operands: &["LISTEN", "TARGET", "SERVICE"],
    },
    CommandSpec {
        name: "remove",
        runner: Runner::User,
        synopsis: "LISTEN",
        summary: "remove the binding of LISTEN from your files and\n\
                  return once its socket is closed",
        description: "Removes the line of LISTEN from the file in ~/.config/qrexec-connect\n\
                      that holds it, runs 'systemctl --user daemon-reload' and returns once\n\
                      the socket no longer listens. A bare PORT is 127.0.0.1:PORT. A line of\n\
                      /etc/qrexec-connect is reported, not edited. Exit 0 when it is gone, 1\n\
                      otherwise, 2 for a bad argument.",
        options: &[],
        operands: &["LISTEN"],
    },
    CommandSpec {
        name: "status",
        runner: Runner::User,
        synopsis: "[--json]",
        summary: "each binding: where it comes from, whether it\n\
                  listens, its connections and how the last ended;\n\
                  exit 0 only when all are well",
        description: "Shows each binding: where it comes from, whether it listens, its\n\
                      connections and how the last one ended, with a hint when something\n\
                      is wrong. Exit 0 when all are well, 1 otherwise, 2 for a bad argument.",
        options: &[OptionSpec {
            name: "--json",
            value: None,
            help: "print a JSON array (problems go to standard error)",
        }],
        operands: &[],
    },
    CommandSpec {
        name: "policy",
        runner: Runner::User,
        synopsis: "[--source NAME]",
        summary: "the dom0 policy that allows exactly this qube's\n\
                  bindings: read it, then install it in dom0",
        description: "Prints the dom0 policy that allows exactly this qube's bindings, for\n\
                      /etc/qubes/policy.d/30-qrexec-connect-NAME.policy in dom0 (the output\n\
                      and standard error give the exact name and the commands). The policy\n\
                      is dom0's security boundary: read it before you install it.",
        options: &[OptionSpec {
            name: "--source",
            value: Some(" NAME"),
            help: "this qube's name (default: qubesdb-read /name)",
        }],
        operands: &[],
    },
    CommandSpec {
        name: "help",
        runner: Runner::User,
        synopsis: "[COMMAND]",
        summary: "this help, or a command's",
        description: "Shows the help of qrexec-connect, or of COMMAND.",
        options: &[],
        operands: &["COMMAND"],
    },
    CommandSpec {
        name: "reconcile",
        runner: Runner::Systemd,
        synopsis: "[--runtime-dir=DIR]",
        summary: "apply changed qrexec-connect-*.socket units after\n\
                  'systemctl --user daemon-reload'\n\
                  (qrexec-connect-reconcile.service)",
        description: "Applies changed qrexec-connect-*.socket units after\n\
                      'systemctl --user daemon-reload'. Run by\n\
                      qrexec-connect-reconcile.service, not by hand.",
        options: &[OptionSpec {
            name: "--runtime-dir",
            value: Some("=DIR"),
            help: "the runtime directory (default $XDG_RUNTIME_DIR)",
        }],
        operands: &[],
    },
    CommandSpec {
        name: "recover",
        runner: Runner::Systemd,
        synopsis: "",
        summary: "bring failed bindings or the reload watcher back,\n\
                  with a backoff (qrexec-connect-recover.service)",
        description: "Brings failed bindings or the reload watcher back, with a backoff.\n\
                      Run by qrexec-connect-recover.service, not by hand.",
        options: &[],
        operands: &[],
    },
];

/// The heading of the commands systemd runs.
const SYSTEMD_HEADING: &str = "Run by systemd, not by hand:";
/// The heading of the daemon's options.
const DAEMON_HEADING: &str = "The daemon (no COMMAND; systemd starts it for the sockets):";

/// The top help's start, before the generated sections.
const TOP_INTRO: &str = "\
Usage: qrexec-connect COMMAND [OPTIONS]
Forwards local sockets to qrexec services: a socket per line of
~/.config/qrexec-connect/*.conf (see qrexec-connect.conf(5)).
";

const TOP_USAGE: &str = "Usage: qrexec-connect COMMAND [OPTIONS]";

const DAEMON_USAGE: &str = "Usage: qrexec-connect [--qrexec-client-vm=PATH] \
                            [--max-connections=N] [--client-mode=MODE] [--debug]";

/// The daemon's section of the top help, after its heading.
const DAEMON_HELP: &str = "\
\x20 --qrexec-client-vm=PATH  the client to run (default /usr/bin/qrexec-client-vm)
  --max-connections=N      live connections per binding (default 256); at the
                           cap, new clients wait in the socket's backlog
  --client-mode=MODE       auto (default: ask the client's --help),
                           stdin-socket (--use-stdin-socket), or pipe (older
                           clients: stdout through a pipe and a splicer)
  -d, --debug              log every connection, not only its end

For each connection accepted on a socket named (FileDescriptorName=)
\"TARGET SERVICE\", the daemon runs qrexec-client-vm TARGET SERVICE with the
connection as its stdin/stdout. An option's value may also be the next
argument.
";

/// The column where descriptions start in every help.
const COLUMN: usize = 27;

/// What the command line asks for.
#[derive(Debug)]
pub enum Request {
    /// The daemon, with its options.
    Daemon(Options),
    /// A command, with the options it was given (by their names).
    Command(&'static CommandSpec, Given),
    /// The top help (`None`) or a command's.
    Help(Option<&'static CommandSpec>),
    Version,
}

/// The options and operand a command was given.
#[derive(Debug, Default)]
pub struct Given {
    pub options: Vec<(&'static str, Option<OsString>)>,
    pub operands: Vec<OsString>,
}

impl Given {
    /// Whether the flag `name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.options.iter().any(|(n, _)| *n == name)
    }

    /// The value of `name`, if it was given.
    pub fn value(&self, name: &str) -> Option<&OsStr> {
        self.options
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// A bad command line: the message, and the command whose usage it shows
/// (`None`: the top usage; the daemon has its own).
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError {
    pub usage: Usage,
    pub message: String,
}

/// Whose usage line an error shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Top,
    Daemon,
    Command(&'static str),
}

impl UsageError {
    fn new(usage: Usage, message: impl Into<String>) -> UsageError {
        UsageError {
            usage,
            message: message.into(),
        }
    }
}

/// `text` as every message shows a value the user gave: in double quotes,
/// with control, bidi and invisible characters escaped, cut when huge.
pub fn quoted(text: &OsStr) -> String {
    format!("\"{}\"", printable(text.as_bytes()))
}

/// The command called `name`.
pub fn command(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Options every command accepts besides its own.
fn is_help(arg: &[u8]) -> bool {
    matches!(arg, b"-h" | b"--help")
}

fn is_debug(arg: &[u8]) -> bool {
    matches!(arg, b"-d" | b"--debug")
}

/// The daemon's options that take a value.
const DAEMON_VALUE_OPTIONS: [&str; 3] =
    ["--qrexec-client-vm", "--max-connections", "--client-mode"];

/// Reads the whole command line: the daemon's options up to the first
/// argument that is not an option or an option's value, which names the
/// command; the rest is that command's.
pub fn parse(args: &[OsString]) -> Result<Request, UsageError> {
    let mut index = 0;
    while let Some(arg) = args.get(index) {
        let bytes = arg.as_bytes();
        if !bytes.starts_with(b"-") {
            return parse_command(&args[..index], arg, &args[index + 1..]);
        }
        let takes_next = DAEMON_VALUE_OPTIONS.iter().any(|o| o.as_bytes() == bytes);
        index += if takes_next { 2 } else { 1 };
    }
    parse_daemon(args)
}

/// A command line with a command word: `before` are the options before it.
fn parse_command(
    before: &[OsString],
    word: &OsStr,
    after: &[OsString],
) -> Result<Request, UsageError> {
    let Some(spec) = word.to_str().and_then(command) else {
        return Err(unknown_command(Usage::Top, word));
    };
    let usage = Usage::Command(spec.name);
    let mut help = false;
    for arg in before {
        let bytes = arg.as_bytes();
        match bytes {
            _ if is_help(bytes) => help = true,
            _ if is_debug(bytes) => {}
            b"-V" | b"--version" => return Ok(Request::Version),
            _ => {
                let name = bytes.split(|&b| b == b'=').next().unwrap_or(bytes);
                let message = if DAEMON_VALUE_OPTIONS.iter().any(|o| o.as_bytes() == name) {
                    format!(
                        "{} is an option of the daemon, not of {}",
                        printable(name),
                        spec.name
                    )
                } else {
                    unknown_option(arg, &[], None)
                };
                return Err(UsageError::new(usage, message));
            }
        }
    }
    // Help anywhere wins over any mistake in the rest.
    if help || after.iter().any(|a| is_help(a.as_bytes())) {
        return Ok(Request::Help(Some(spec)));
    }
    let given = command_arguments(spec, after)?;
    if spec.name == "help" {
        return match given.operands.first() {
            None => Ok(Request::Help(None)),
            Some(word) => match word.to_str().and_then(command) {
                Some(asked) => Ok(Request::Help(Some(asked))),
                None => Err(unknown_command(usage, word)),
            },
        };
    }
    Ok(Request::Command(spec, given))
}

/// A command's own arguments, read by its [`OptionSpec`]s.
fn command_arguments(spec: &'static CommandSpec, args: &[OsString]) -> Result<Given, UsageError> {
    let usage = Usage::Command(spec.name);
    let error = |message: String| UsageError::new(usage, message);
    let mut given = Given::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let bytes = arg.as_bytes();
        if is_debug(bytes) {
            continue;
        }
        if !bytes.starts_with(b"-") {
            match spec.operands {
                operands if given.operands.len() < operands.len() => {
                    given.operands.push(arg.clone())
                }
                [operand] => {
                    return Err(error(format!(
                        "{} takes one {operand}, not {} too",
                        spec.name,
                        quoted(arg)
                    )))
                }
                [_, _, ..] => {
                    return Err(error(format!(
                        "{} takes {}, not {} too",
                        spec.name,
                        spec.operands.join(" "),
                        quoted(arg)
                    )))
                }
                [] => {
                    return Err(error(format!(
                        "{} takes no argument {}",
                        spec.name,
                        quoted(arg)
                    )))
                }
            }
            continue;
        }
        let (name, inline) = match bytes.iter().position(|&b| b == b'=') {
            Some(at) => (&bytes[..at], Some(OsStr::from_bytes(&bytes[at + 1..]))),
            None => (bytes, None),
        };
        let Some(option) = spec.options.iter().find(|o| o.name.as_bytes() == name) else {
            return Err(error(unknown_option(arg, spec.options, Some(spec.name))));
        };
        let value = match (option.value, inline) {
            (None, None) => None,
            (None, Some(_)) => return Err(error(format!("{} takes no value", option.name))),
            (Some(_), Some(value)) => Some(value.to_owned()),
            (Some(placeholder), None) => Some(args.next().cloned().ok_or_else(|| {
                error(format!("{0} needs a value: {0}{placeholder}", option.name))
            })?),
        };
        if given.options.iter().any(|(n, _)| *n == option.name) {
            return Err(error(format!("{} is given twice", option.name)));
        }
        given.options.push((option.name, value));
    }
    Ok(given)
}

/// The error for a word that names no command, with the closest names.
fn unknown_command(usage: Usage, word: &OsStr) -> UsageError {
    let names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
    let mut message = format!("unknown command {}", quoted(word));
    message += &did_you_mean(&String::from_utf8_lossy(word.as_bytes()), &names);
    UsageError::new(usage, message)
}

/// The message for an option nobody takes, with the closest of `options`
/// (for the daemon, `None` as the command: its own options).
fn unknown_option(arg: &OsStr, options: &[OptionSpec], command: Option<&str>) -> String {
    let bytes = arg.as_bytes();
    let name = bytes.split(|&b| b == b'=').next().unwrap_or(bytes);
    let mut message = format!("unknown option {}", quoted(arg));
    if let Some(command) = command {
        let _ = write!(message, " for {command}");
    }
    let names: Vec<&str> = match command {
        Some(_) => options.iter().map(|o| o.name).collect(),
        None => DAEMON_VALUE_OPTIONS
            .into_iter()
            .chain(["--debug", "--help", "--version"])
            .collect(),
    };
    message + &did_you_mean(&String::from_utf8_lossy(name), &names)
}

/// `; did you mean NAME?` for the names closest to `word`, if any is close:
/// a prefix of it, or an edit distance small for the name's length (a
/// swapped pair of letters counts as one edit, a case change as none).
fn did_you_mean(word: &str, names: &[&str]) -> String {
    let word = word.to_lowercase();
    let close: Vec<(usize, &str)> = names
        .iter()
        .filter_map(|&name| {
            let distance = if name.starts_with(&word) && !word.is_empty() {
                1
            } else {
                edit_distance(&word, name)
            };
            (distance <= 2 && 2 * distance < name.len()).then_some((distance, name))
        })
        .collect();
    let Some(best) = close.iter().map(|(d, _)| *d).min() else {
        return String::new();
    };
    let best: Vec<&str> = close
        .iter()
        .filter(|(d, _)| *d == best)
        .map(|(_, n)| *n)
        .collect();
    format!("; did you mean {}?", best.join(" or "))
}

/// Edits (insert, delete, replace, swap two neighbours) from `a` to `b`:
/// the optimal string alignment distance, on characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // rows[i][j]: the distance between a[..i] and b[..j].
    let mut rows = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

/// The daemon's options, in any order; `--help` or `--version` anywhere
/// wins over what follows it (an error before it is still reported).
fn parse_daemon(args: &[OsString]) -> Result<Request, UsageError> {
    let error = |message: String| UsageError::new(Usage::Daemon, message);
    let mut options = Options {
        client: DEFAULT_CLIENT.into(),
        max_connections: DEFAULT_MAX_CONNECTIONS,
        client_mode: None,
        debug: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let bytes = arg.as_bytes();
        let (name, value) = match bytes.iter().position(|&b| b == b'=') {
            Some(at) => (
                &bytes[..at],
                Some(OsString::from(OsStr::from_bytes(&bytes[at + 1..]))),
            ),
            None if DAEMON_VALUE_OPTIONS.iter().any(|o| o.as_bytes() == bytes) => {
                let value = args.next().cloned().ok_or_else(|| {
                    let name = printable(bytes);
                    error(format!("{name} needs a value: {name}=VALUE"))
                })?;
                (bytes, Some(value))
            }
            None => (bytes, None),
        };
        let shown = value.as_deref().map(quoted).unwrap_or_default();
        let text = value.as_deref().and_then(OsStr::to_str);
        match (name, text, value.is_some()) {
            (b"-h" | b"--help", _, false) => return Ok(Request::Help(None)),
            (b"-V" | b"--version", _, false) => return Ok(Request::Version),
            (b"-d" | b"--debug", _, false) => options.debug = true,
            (b"-h" | b"--help" | b"-V" | b"--version" | b"-d" | b"--debug", _, true) => {
                return Err(error(format!("{} takes no value", printable(name))))
            }
            (b"--qrexec-client-vm", _, true) => match value {
                Some(path) if !path.is_empty() => options.client = path,
                _ => {
                    return Err(error(
                        "--qrexec-client-vm needs a path, not an empty value".to_owned(),
                    ))
                }
            },
            (b"--max-connections", text, true) => {
                options.max_connections = text
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        error(format!(
                            "--max-connections needs a positive number, not {shown}"
                        ))
                    })?
            }
            (b"--client-mode", text, true) => {
                options.client_mode = match text {
                    Some("auto") => None,
                    Some("stdin-socket") => Some(ClientMode::StdinSocket),
                    Some("pipe") => Some(ClientMode::Pipe),
                    _ => {
                        return Err(error(format!(
                            "--client-mode is auto, stdin-socket or pipe, not {shown}"
                        )))
                    }
                }
            }
            _ => return Err(error(unknown_option(arg, &[], None))),
        }
    }
    Ok(Request::Daemon(options))
}

/// `NAME SYNOPSIS` and its summary, as an entry of the top help.
fn entry(out: &mut String, left: &str, text: &str) {
    let mut lines = text.lines();
    if left.len() + 2 < COLUMN {
        let _ = writeln!(
            out,
            "  {left:<width$}{}",
            lines.next().unwrap_or(""),
            width = COLUMN - 2
        );
    } else {
        let _ = writeln!(out, "  {left}");
    }
    for line in lines {
        let _ = writeln!(out, "{:COLUMN$}{line}", "");
    }
}

/// The commands of one [`Runner`], as entries.
fn command_entries(out: &mut String, runner: Runner) {
    for spec in COMMANDS.iter().filter(|c| c.runner == runner) {
        entry(
            out,
            format!("{} {}", spec.name, spec.synopsis).trim_end(),
            spec.summary,
        );
    }
}

/// `qrexec-connect --help`: users' commands, the options, the commands
/// systemd runs, then the daemon.
pub fn top_help() -> String {
    let mut out = String::from(TOP_INTRO);
    out += "\nCommands:\n";
    command_entries(&mut out, Runner::User);
    out += "\nOptions:\n";
    entry(
        &mut out,
        "-h, --help",
        "show this help; after a COMMAND, its help",
    );
    entry(&mut out, "-V, --version", "show the version");
    let _ = write!(out, "\n{SYSTEMD_HEADING}\n");
    command_entries(&mut out, Runner::Systemd);
    let _ = write!(out, "\n{DAEMON_HEADING}\n{DAEMON_HELP}");
    out += "\nSee qrexec-connect(8).\n";
    out
}

/// `qrexec-connect COMMAND --help`.
pub fn command_help(spec: &CommandSpec) -> String {
    let mut out = format!(
        "{}\n{}\n\nOptions:\n",
        usage_line(Usage::Command(spec.name)),
        spec.description
    );
    for option in spec.options {
        let left = match option.value {
            Some(value) => format!("{}{value}", option.name),
            None => option.name.to_owned(),
        };
        entry(&mut out, &left, option.help);
    }
    entry(&mut out, "-h, --help", "show this help");
    out += "\nSee qrexec-connect(8).\n";
    out
}

/// The one usage line an error shows.
fn usage_line(usage: Usage) -> String {
    match usage {
        Usage::Top => TOP_USAGE.to_owned(),
        Usage::Daemon => DAEMON_USAGE.to_owned(),
        Usage::Command(name) => {
            let synopsis = command(name).map_or("", |c| c.synopsis);
            format!("Usage: qrexec-connect {name} {synopsis}")
                .trim_end()
                .to_owned()
        }
    }
}

/// Prints a usage error in the one format (see the module doc); exit 2.
pub fn usage_error(error: &UsageError) -> ExitCode {
    let help = match error.usage {
        Usage::Top | Usage::Daemon => "qrexec-connect --help".to_owned(),
        Usage::Command(name) => format!("qrexec-connect {name} --help"),
    };
    eprintln!(
        "qrexec-connect: {}\n{}\nTry '{help}'.",
        error.message,
        usage_line(error.usage)
    );
    ExitCode::from(EXIT_USAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn edit_distance_counts_a_swap_as_one() {
        assert_eq!(edit_distance("status", "status"), 0);
        assert_eq!(edit_distance("stauts", "status"), 1);
        assert_eq!(edit_distance("stats", "status"), 1);
        assert_eq!(edit_distance("", "help"), 4);
        assert_eq!(edit_distance("policy", "recover"), 7);
    }

    #[test]
    fn only_close_names_are_suggested() {
        let names = ["status", "policy", "help", "reconcile", "recover"];
        assert_eq!(did_you_mean("stuats", &names), "; did you mean status?");
        assert_eq!(
            did_you_mean("rec", &names),
            "; did you mean reconcile or recover?"
        );
        assert_eq!(did_you_mean("xyzzy", &names), "");
        assert_eq!(did_you_mean("ab", &names), "");
        assert_eq!(did_you_mean("", &names), "");
    }

    #[test]
    fn policy_source_is_read_strictly() {
        let source = |list: &[&str]| match parse(&args(list)) {
            Ok(Request::Command(_, given)) => Ok(given.value("--source").map(OsStr::to_owned)),
            Ok(other) => panic!("{list:?}: {other:?}"),
            Err(error) => Err(error.message),
        };
        assert_eq!(source(&["policy"]), Ok(None));
        assert_eq!(
            source(&["policy", "--source", "work"]),
            Ok(Some("work".into()))
        );
        assert_eq!(
            source(&["policy", "--source=work"]),
            Ok(Some("work".into()))
        );
        assert_eq!(source(&["policy", "--source="]), Ok(Some("".into())));
        assert!(source(&["policy", "--source"]).is_err());
        assert!(source(&["policy", "--source", "a", "--source=b"]).is_err());
        assert!(source(&["policy", "--json"]).is_err());
    }

    #[test]
    fn the_daemon_takes_no_command_word_as_an_option_value() {
        match parse(&args(&["--qrexec-client-vm", "status", "-d"])) {
            Ok(Request::Daemon(options)) => {
                assert_eq!(options.client, "status");
                assert!(options.debug);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_entry_fits_80_columns() {
        let mut texts = vec![top_help()];
        texts.extend(COMMANDS.iter().map(command_help));
        for text in texts {
            for line in text.lines() {
                assert!(line.chars().count() <= 80, "{line}");
            }
        }
    }
}
