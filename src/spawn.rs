//! Starting `qrexec-client-vm` for one connection.
//!
//! The accepted socket becomes the child's stdin (and stdout): the daemon is
//! not in the data path. Two ways, chosen once per daemon start:
//!
//! * [`ClientMode::StdinSocket`]: the installed client knows
//!   `--use-stdin-socket` (qrexec 4.2.19+): fd 0 carries both directions and
//!   the client propagates EOF itself. One process per connection.
//! * [`ClientMode::Pipe`]: older clients. Giving them the same socket as stdin
//!   and stdout loses the service's EOF (qubes-issues #9169), so stdout is a
//!   pipe whose bytes are moved to the socket with `splice(2)`, followed by
//!   `shutdown(SHUT_WR)`. That mover is [`relay`], run as a small process
//!   of its own (`qrexec-connect relay ...`) rather than inside the daemon:
//!   the socket must stay in blocking mode for the client, which would block
//!   the daemon's loop, and a relay in the daemon would die with it and cut
//!   live connections on `systemctl restart`.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};

use crate::binding::Destination;

/// Where qrexec-client-vm lives on a Qubes qube.
pub const DEFAULT_CLIENT: &str = "/usr/bin/qrexec-client-vm";

/// How the client is connected to the accepted socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMode {
    /// `--use-stdin-socket`: the socket is fd 0 for both directions.
    StdinSocket,
    /// stdin is the socket, stdout a pipe moved by a relay process.
    Pipe,
}

impl ClientMode {
    /// Reads a client's `--help` text: does it offer `--use-stdin-socket`?
    pub fn from_help_text(help: &[u8]) -> ClientMode {
        let needle = b"--use-stdin-socket";
        if help.windows(needle.len()).any(|w| w == needle) {
            ClientMode::StdinSocket
        } else {
            ClientMode::Pipe
        }
    }
}

/// The client's arguments for one call: never filter the data stream, always
/// filter what reaches the journal, and `--` so a target can never be taken
/// for an option.
pub fn client_arguments(mode: ClientMode, destination: &Destination) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--no-filter-escape-chars-stdout".into(),
        "--filter-escape-chars-stderr".into(),
    ];
    if mode == ClientMode::StdinSocket {
        args.push("--use-stdin-socket".into());
    }
    args.push("--".into());
    args.push(destination.target.as_str().into());
    args.push(destination.service.as_str().into());
    args
}

/// Builds the command for one connection. The caller spawns it.
///
/// `relay_program` is this program itself (`/proc/self/exe`), used in
/// [`ClientMode::Pipe`] as `relay_program relay CLIENT ARGS...`.
pub fn client_command(
    mode: ClientMode,
    client: &OsStr,
    relay_program: &OsStr,
    destination: &Destination,
    socket: OwnedFd,
) -> io::Result<Command> {
    let args = client_arguments(mode, destination);
    let mut command = match mode {
        ClientMode::StdinSocket => {
            let mut command = Command::new(client);
            // stdout is the socket as well, as with systemd's
            // StandardInput=socket in Qubes' own forwarder units.
            command.stdout(Stdio::from(socket.try_clone()?));
            command.args(args);
            command
        }
        ClientMode::Pipe => {
            let mut command = Command::new(relay_program);
            command.arg0("qrexec-connect");
            command.arg("relay").arg(client).args(args);
            command.stdout(Stdio::null());
            command
        }
    };
    command.stdin(Stdio::from(socket)).stderr(Stdio::inherit());
    Ok(command)
}

/// Runs the client with fd 0 (the connection) as stdin and a pipe as stdout,
/// moves the pipe's bytes to fd 0 with `splice(2)`, half-closes fd 0 when
/// the client's output ends, and ends the way the client ended: the same
/// exit code, or the same signal (so the daemon's log line does not depend
/// on the client mode). Never returns.
pub fn relay(client: &OsStr, args: &[OsString]) -> ! {
    let code = match run_relay(client, args) {
        Ok(status) => match status.signal() {
            Some(signal) => {
                // SAFETY: default action, then the same signal, at our own pid.
                unsafe {
                    libc::signal(signal, libc::SIG_DFL);
                    libc::raise(signal);
                }
                128 + signal // only if the signal did not end us
            }
            None => status.code().unwrap_or(125),
        },
        Err(code) => code,
    };
    std::process::exit(code)
}

fn run_relay(client: &OsStr, args: &[OsString]) -> Result<ExitStatus, i32> {
    let (pipe_read, pipe_write) = match pipe() {
        Ok(ends) => ends,
        Err(e) => {
            eprintln!("qrexec-connect relay: cannot create a pipe: {e}");
            return Err(125);
        }
    };
    // A bigger pipe means fewer, larger splices per GiB (1 MiB is the
    // default limit for unprivileged processes; failure only costs speed).
    // SAFETY: fcntl on a pipe we own.
    unsafe { libc::fcntl(pipe_read.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    let mut child = match Command::new(client)
        .args(args)
        .stdin(Stdio::inherit())
        .stdout(Stdio::from(pipe_write))
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "qrexec-connect relay: cannot run {}: {e}",
                client.to_string_lossy()
            );
            return Err(125);
        }
    };
    // The Command dropped its copy of the write end, so the pipe ends when
    // the client closes its stdout or exits.
    let socket = 0;
    loop {
        // SAFETY: plain splice between two fds we hold.
        let moved = unsafe {
            libc::splice(
                pipe_read.as_raw_fd(),
                std::ptr::null_mut(),
                socket,
                std::ptr::null_mut(),
                1 << 20,
                libc::SPLICE_F_MOVE,
            )
        };
        if moved > 0 {
            continue;
        }
        if moved < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break; // end of the client's output, or the peer is gone
    }
    // SAFETY: shutdown on fd 0, which is our connection.
    unsafe { libc::shutdown(socket, libc::SHUT_WR) };
    drop(pipe_read); // a client still writing now gets EPIPE, not a hang
    child.wait().map_err(|_| 125)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just created both fds.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// An exit status as a shell would report it: the code, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 125,
    }
}

/// What a client exit status means, in words for the journal.
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(signal) = status.signal() {
        return format!("killed by signal {}", signal_name(signal));
    }
    match status.code() {
        Some(0) => "closed normally (status 0)".to_owned(),
        Some(126) => "refused by qrexec policy (status 126)".to_owned(),
        Some(125) => "qrexec could not start the call (status 125)".to_owned(),
        Some(127) => "service not found (status 127)".to_owned(),
        Some(code) if code > 128 && code < 128 + 65 => format!(
            "service ended by signal {} (status {code})",
            signal_name(code - 128)
        ),
        Some(code) => format!("service exited with status {code}"),
        None => "ended for an unknown reason".to_owned(),
    }
}

/// The conventional name of a signal number (`SIGTERM`), or `signal N`.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => return format!("signal {signal}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_put_the_destination_after_double_dash() {
        let d = Destination::from_fd_name("'' qubes.ConnectTCP+22").unwrap();
        let args = client_arguments(ClientMode::StdinSocket, &d);
        assert_eq!(
            args,
            [
                "--no-filter-escape-chars-stdout",
                "--filter-escape-chars-stderr",
                "--use-stdin-socket",
                "--",
                "",
                "qubes.ConnectTCP+22"
            ]
        );
        let args = client_arguments(ClientMode::Pipe, &d);
        assert!(!args.iter().any(|a| a == "--use-stdin-socket"));
    }

    #[test]
    fn help_text_decides_the_mode() {
        assert_eq!(
            ClientMode::from_help_text(b"  --use-stdin-socket  use fd 0"),
            ClientMode::StdinSocket
        );
        assert_eq!(
            ClientMode::from_help_text(b"usage: qrexec-client-vm"),
            ClientMode::Pipe
        );
    }

    #[test]
    fn exit_statuses_in_words() {
        let code = |c: i32| ExitStatus::from_raw(c << 8);
        assert!(describe_exit(code(126)).contains("refused by qrexec policy"));
        assert!(describe_exit(code(125)).contains("could not start"));
        assert!(describe_exit(code(127)).contains("service not found"));
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "killed by signal SIGKILL"
        );
    }
}
