//! `qrexec-connect`: reads the command line (`cli`) and hands it to the room
//! that does the work, nothing more.
//!
//! - `serving/`: the socket-activated daemon (no command, or only its
//!   options), tokio; what runs per connection.
//! - `managing/`: `add`, `remove`, `status`, `policy` for users and
//!   `reconcile`, `recover` for systemd; `systemctl` and the config grammar,
//!   no tokio.
//! - `shared/`: the little both rooms read (the counters file's format,
//!   signal names, the default client).
//!
//! The order of start-up is here because it must come first: the fds and
//! the notify socket are claimed before anything else runs.

mod cli;
mod managing;
mod serving;
mod shared;

use std::ffi::OsString;
use std::process::ExitCode;

use cli::{CommandSpec, Given, Request};
use managing::{edit, policy, reconcile, recover, status};
use serving::{daemon, listener, log, notify};

/// LSB exit status for "program is not configured".
const EXIT_NOT_CONFIGURED: u8 = 6;

fn main() -> ExitCode {
    // Claim what systemd handed us before anything else runs: this scrubs
    // LISTEN_* and NOTIFY_SOCKET from the environment while there is only
    // one thread, so no child ever inherits them.
    let sockets = listener::take_from_systemd();
    let notifier = notify::Notifier::from_env();

    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let options = match cli::parse(&args) {
        Ok(Request::Daemon(options)) => options,
        Ok(Request::Command(spec, given)) => return dispatch(spec, given),
        Ok(Request::Help(None)) => {
            print!("{}", cli::top_help());
            return ExitCode::SUCCESS;
        }
        Ok(Request::Help(Some(spec))) => {
            print!("{}", cli::command_help(spec));
            return ExitCode::SUCCESS;
        }
        Ok(Request::Version) => {
            println!("qrexec-connect {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(error) => return cli::usage_error(&error),
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

/// Runs a command with the options [`cli::parse`] checked; one arm each.
fn dispatch(spec: &CommandSpec, given: Given) -> ExitCode {
    match spec.name {
        // status reads its own (already checked) flag.
        "status" => {
            let json: &[OsString] = &["--json".into()];
            status::status(if given.flag("--json") { json } else { &[] })
        }
        "add" => edit::add(&given),
        "remove" => edit::remove(&given),
        "policy" => policy::run(given.value("--source")),
        "recover" => report("recover", recover::run()),
        // `--runtime-dir=%t` from the unit; the environment otherwise.
        "reconcile" => report(
            "reconcile",
            reconcile::run(given.value("--runtime-dir").map(OsString::from)),
        ),
        other => unreachable!("command {other} has no arm in dispatch"),
    }
}

/// The exit status of a command run by systemd, its error on stderr.
fn report(command: &str, result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qrexec-connect {command}: {e}");
            ExitCode::FAILURE
        }
    }
}
