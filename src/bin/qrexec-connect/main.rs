//! `qrexec-connect`: the socket-activated daemon, plus `reconcile`, run by
//! systemd after each daemon-reload.
//!
//! main only reads the command line and dispatches; the event loop is in
//! `daemon.rs`, logging in `log.rs`.

mod daemon;
mod listener;
mod log;
mod manager;
mod notify;
mod policy;
mod published;
mod reconcile;
mod recover;
mod spawn;
mod status;

use std::ffi::OsString;
use std::process::ExitCode;

use spawn::{ClientMode, DEFAULT_CLIENT};

/// LSB exit status for "program is not configured".
const EXIT_NOT_CONFIGURED: u8 = 6;
/// LSB exit status for "invalid or excess argument(s)".
const EXIT_INVALID_ARGUMENT: u8 = 2;

/// Default cap on live connections per binding: systemd-socket-proxyd's
/// default, and enough for any interactive use of a qube; each connection is
/// a qrexec-client-vm process, so this also bounds memory.
const DEFAULT_MAX_CONNECTIONS: usize = 256;

const USAGE: &str = "\
Usage: qrexec-connect [OPTIONS]
Started by systemd socket activation: for each connection accepted on a
socket named (FileDescriptorName=) \"TARGET SERVICE\", runs
qrexec-client-vm TARGET SERVICE with the connection as its stdin/stdout.

Options (in any order; a value may also be the next argument):
  --qrexec-client-vm=PATH  the client to run (default /usr/bin/qrexec-client-vm)
  --max-connections=N      live connections per binding (default 256); at the
                           cap, new clients wait in the socket's backlog
  --client-mode=MODE       auto (default: ask the client's --help),
                           stdin-socket (--use-stdin-socket), or pipe (older
                           clients: stdout through a pipe and a splicer)
  -d, --debug              log every connection, not only its end
  -h, --help               show this help
  -V, --version            show the version

Commands:
  qrexec-connect reconcile  apply changed qrexec-connect-*.socket units after
                            'systemctl --user daemon-reload' (run by
                            qrexec-connect-reconcile.service)
  qrexec-connect status [--json]
                            each binding: where it comes from, whether it
                            listens, its connections and how the last ended;
                            exit 0 only when all are well
  qrexec-connect policy [--source NAME]
                            the dom0 policy that allows exactly this qube's
                            bindings (NAME: this qube, from qubesdb-read /name)
  qrexec-connect recover    bring failed bindings or the reload watcher back,
                            with a backoff (run by
                            qrexec-connect-recover.service)

See qrexec-connect(8).
";

/// The daemon's settings from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub client: OsString,
    pub max_connections: usize,
    pub client_mode: Option<ClientMode>,
    pub debug: bool,
}

/// What the command line asks for.
#[derive(Debug)]
enum Request {
    Run(Options),
    Help,
    Version,
}

/// Options that take a value, as `--name=VALUE` or `--name VALUE`.
const VALUE_OPTIONS: [&str; 3] = ["--qrexec-client-vm", "--max-connections", "--client-mode"];

/// Reads the options in any order; `--help` or `--version` anywhere wins
/// over what follows it (an error before it is still reported).
fn parse_options(args: Vec<OsString>) -> Result<Request, String> {
    let mut options = Options {
        client: DEFAULT_CLIENT.into(),
        max_connections: DEFAULT_MAX_CONNECTIONS,
        client_mode: None,
        debug: false,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg
            .to_str()
            .ok_or_else(|| format!("argument {arg:?} is not UTF-8"))?;
        let (name, value) = match text.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None if VALUE_OPTIONS.contains(&text) => {
                let value = args
                    .next()
                    .ok_or_else(|| format!("{text} needs a value: {text}=VALUE (see --help)"))?;
                let value = value
                    .into_string()
                    .map_err(|v| format!("the value {v:?} of {text} is not UTF-8"))?;
                (text, Some(value))
            }
            None => (text, None),
        };
        match (name, value.as_deref()) {
            ("-h" | "--help", None) => return Ok(Request::Help),
            ("-V" | "--version", None) => return Ok(Request::Version),
            ("--qrexec-client-vm", Some(path)) if !path.is_empty() => options.client = path.into(),
            ("--qrexec-client-vm", Some(_)) => {
                return Err("--qrexec-client-vm needs a path, not an empty value".to_owned())
            }
            ("--max-connections", Some(n)) => {
                options.max_connections = n.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                    format!("--max-connections needs a positive number, not {n:?}")
                })?
            }
            ("--client-mode", Some(mode)) => {
                options.client_mode = match mode {
                    "auto" => None,
                    "stdin-socket" => Some(ClientMode::StdinSocket),
                    "pipe" => Some(ClientMode::Pipe),
                    other => {
                        return Err(format!(
                            "--client-mode is auto, stdin-socket or pipe, not {other:?}"
                        ))
                    }
                }
            }
            ("-d" | "--debug", None) => options.debug = true,
            ("-h" | "--help" | "-V" | "--version" | "-d" | "--debug", Some(_)) => {
                return Err(format!("{name} takes no value"))
            }
            _ => return Err(format!("unknown option {text:?}")),
        }
    }
    Ok(Request::Run(options))
}

fn main() -> ExitCode {
    // Claim what systemd handed us before anything else runs: this scrubs
    // LISTEN_* and NOTIFY_SOCKET from the environment while there is only
    // one thread, so no child ever inherits them.
    let sockets = listener::take_from_systemd();
    let notifier = notify::Notifier::from_env();

    let mut args = std::env::args_os().skip(1);
    let first = args.next();
    // Subcommands come first and are one arm each.
    match first.as_ref().and_then(|a| a.to_str()) {
        Some("status") => return status::status(&args.collect::<Vec<_>>()),
        Some("policy") => return policy::run(&args.collect::<Vec<_>>()),
        Some("recover") => {
            return match recover::run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("qrexec-connect recover: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some("reconcile") => {
            // `--runtime-dir=%t` from the unit; the environment otherwise.
            let runtime_dir = args.next().and_then(|arg| {
                arg.to_str()?
                    .strip_prefix("--runtime-dir=")
                    .map(OsString::from)
            });
            return match reconcile::run(runtime_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("qrexec-connect reconcile: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let options = match parse_options(first.into_iter().chain(args).collect()) {
        Ok(Request::Run(options)) => options,
        Ok(Request::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Request::Version) => {
            println!("qrexec-connect {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("qrexec-connect: {message}\nTry 'qrexec-connect --help'.");
            return ExitCode::from(EXIT_INVALID_ARGUMENT);
        }
    };
    if sockets.is_empty() {
        eprintln!(
            "qrexec-connect: must be started by systemd socket activation (through a \
             qrexec-connect-*.socket unit, or systemd-socket-activate to try it): no listening \
             sockets were passed"
        );
        return ExitCode::from(EXIT_NOT_CONFIGURED);
    }
    log::init(options.debug);
    daemon::run(options, sockets, notifier)
}
