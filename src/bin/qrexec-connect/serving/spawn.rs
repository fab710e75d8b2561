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
//!   `shutdown(SHUT_WR)`. That mover is a [`Splicer`]: a forked copy of the
//!   daemon that keeps only the pipe and the socket. Not the daemon itself:
//!   the socket must stay in blocking mode for the client, which would block
//!   the daemon's loop, and a mover inside the daemon would die with it and
//!   cut live connections on `systemctl restart`. Forked, not exec'd: an
//!   exec costs about a millisecond per connection; a fork of the small,
//!   single-threaded daemon costs a fraction of that.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::errno::Errno;
use nix::spawn::{
    posix_spawn, posix_spawnp, PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags,
};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use qrexec_connect_binding::destination::Destination;
use qrexec_connect_binding::runtime_dir::RuntimeDir;

use crate::shared::signal_name;

/// How the client is connected to the accepted socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMode {
    /// `--use-stdin-socket`: the socket is fd 0 for both directions.
    StdinSocket,
    /// stdin is the socket, stdout a pipe moved by a [`Splicer`].
    Pipe,
}

impl ClientMode {
    fn word(self) -> &'static str {
        match self {
            ClientMode::StdinSocket => "stdin-socket",
            ClientMode::Pipe => "pipe",
        }
    }

    /// The mode found for this very client binary by an earlier start, from
    /// `$XDG_RUNTIME_DIR/qrexec-connect/client-mode`: a restarted daemon
    /// (each applied config change restarts it) then serves its first
    /// connection without running `--help` first. The binary is known by
    /// its device, inode, size and change time, so an upgraded client is
    /// probed again.
    pub fn recall(dir: &RuntimeDir, client: &OsStr) -> Option<ClientMode> {
        let text = dir.read(MODE_FILE).ok()??;
        let (identity, mode) = text.trim_end().rsplit_once('\n')?;
        if identity != client_identity(client)? {
            return None;
        }
        match mode.strip_prefix("mode=")? {
            "stdin-socket" => Some(ClientMode::StdinSocket),
            "pipe" => Some(ClientMode::Pipe),
            _ => None,
        }
    }

    /// Remembers a probed mode for [`ClientMode::recall`]; best effort.
    pub fn remember(self, dir: &RuntimeDir, client: &OsStr) {
        if let Some(identity) = client_identity(client) {
            let _ = dir.write_atomically(MODE_FILE, &format!("{identity}\nmode={}\n", self.word()));
        }
    }

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

/// The file of [`ClientMode::recall`] in our runtime directory.
const MODE_FILE: &str = "client-mode";

/// What tells one build of the client from another.
fn client_identity(client: &OsStr) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(client).ok()?;
    Some(format!(
        "client={}\ndev={}\nino={}\nsize={}\nctime={}.{}",
        client.to_string_lossy().replace('\n', "?"),
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.ctime(),
        meta.ctime_nsec()
    ))
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

/// Starts the client with `posix_spawn(3)`. Everything that does not change
/// from one connection to the next is built once, when the daemon starts:
/// the program's path, the environment (the daemon's own, already scrubbed
/// of `LISTEN_*` and `NOTIFY_SOCKET`), the spawn attributes, and through
/// [`Launcher::argv`] each binding's arguments. Per connection only the two
/// `dup2` file actions are new.
///
/// The child starts as std's `Command` started it: an empty signal mask,
/// SIGPIPE back to its default action (the daemon ignores it), handled
/// signals default as after any exec; fds 0 and 1 as given, stderr shared
/// with the daemon (the journal), every other descriptor closed by
/// close-on-exec (the daemon opens all of its descriptors that way).
pub struct Launcher {
    program: CString,
    /// A name without a slash is looked up in `$PATH`, as `Command` did.
    search_path: bool,
    environment: Vec<CString>,
    attributes: PosixSpawnAttr,
}

impl Launcher {
    pub fn new(program: &OsStr) -> io::Result<Launcher> {
        let program = c_string(program.as_bytes())?;
        let environment = std::env::vars_os()
            .filter_map(|(name, value)| {
                let mut entry = name.into_vec();
                entry.push(b'=');
                entry.extend_from_slice(value.as_bytes());
                CString::new(entry).ok()
            })
            .collect();
        let mut attributes = PosixSpawnAttr::init()?;
        attributes.set_sigmask(&SigSet::empty())?;
        let mut defaults = SigSet::empty();
        defaults.add(Signal::SIGPIPE);
        attributes.set_sigdefault(&defaults)?;
        attributes.set_flags(
            PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
        )?;
        Ok(Launcher {
            search_path: !program.as_bytes().contains(&b'/'),
            program,
            environment,
            attributes,
        })
    }

    /// The whole argument vector for one binding in one mode, argv\[0\]
    /// (the program as given) included.
    pub fn argv(&self, mode: ClientMode, destination: &Destination) -> io::Result<Vec<CString>> {
        std::iter::once(Ok(self.program.clone()))
            .chain(
                client_arguments(mode, destination)
                    .into_iter()
                    .map(|arg| c_string(arg.as_bytes())),
            )
            .collect()
    }

    /// The argument vector that asks the client for its `--help`.
    pub fn help_argv(&self) -> Vec<CString> {
        vec![self.program.clone(), c"--help".to_owned()]
    }

    /// Runs the client with `stdin`, `stdout` (and `stderr`, when given) as
    /// its fds 0, 1 (and 2); returns its pid. A missing program fails here
    /// with `NotFound`, as with `Command`.
    pub fn spawn(
        &self,
        argv: &[CString],
        stdin: BorrowedFd<'_>,
        stdout: BorrowedFd<'_>,
        stderr: Option<BorrowedFd<'_>>,
    ) -> io::Result<Pid> {
        let mut actions = PosixSpawnFileActions::init()?;
        actions.add_dup2(stdin.as_raw_fd(), 0)?;
        actions.add_dup2(stdout.as_raw_fd(), 1)?;
        if let Some(stderr) = stderr {
            actions.add_dup2(stderr.as_raw_fd(), 2)?;
        }
        let pid = if self.search_path {
            posix_spawnp(
                &self.program,
                &actions,
                &self.attributes,
                argv,
                &self.environment,
            )
        } else {
            posix_spawn(
                self.program.as_c_str(),
                &actions,
                &self.attributes,
                argv,
                &self.environment,
            )
        };
        Ok(pid?)
    }
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
}

/// The descriptors one connection's client gets; in [`ClientMode::Pipe`]
/// also the [`Splicer`] to start *before* the client: if the splicer cannot
/// start, no client has been run that would need killing. Dropping this
/// after the spawn (or instead of it) closes the daemon's copies, among them
/// the pipe's write end, so the splicer reads end of file when the client
/// ends or never started.
pub struct ClientStdio {
    pub socket: OwnedFd,
    /// The pipe's write end in [`ClientMode::Pipe`]; the socket otherwise.
    pipe_write: Option<OwnedFd>,
    pub splicer: Option<Splicer>,
}

impl ClientStdio {
    pub fn new(mode: ClientMode, socket: OwnedFd) -> io::Result<ClientStdio> {
        match mode {
            // stdout is the socket as well, as with systemd's
            // StandardInput=socket in Qubes' own forwarder units.
            ClientMode::StdinSocket => Ok(ClientStdio {
                socket,
                pipe_write: None,
                splicer: None,
            }),
            ClientMode::Pipe => {
                let (pipe_read, pipe_write) = pipe()?;
                // A bigger pipe means fewer, larger splices per GiB (1 MiB is the
                // default limit for unprivileged processes; failure only costs
                // speed).
                let _ = rustix::pipe::fcntl_setpipe_size(&pipe_read, 1 << 20);
                let splicer = Splicer {
                    pipe_read,
                    socket: socket.try_clone()?,
                };
                Ok(ClientStdio {
                    socket,
                    pipe_write: Some(pipe_write),
                    splicer: Some(splicer),
                })
            }
        }
    }

    pub fn stdin(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    pub fn stdout(&self) -> BorrowedFd<'_> {
        self.pipe_write.as_ref().unwrap_or(&self.socket).as_fd()
    }
}

/// Moves a pipe's bytes into a socket, then half-closes the socket.
#[derive(Debug)]
pub struct Splicer {
    pipe_read: OwnedFd,
    socket: OwnedFd,
}

impl Splicer {
    /// Forks the mover and returns once it runs on its own. It is forked
    /// twice so that it is nobody's child here: the daemon only reaps the
    /// short-lived middle process, and the mover is reaped by the service
    /// manager (or init) when it ends, even after the daemon is gone.
    ///
    /// Fails if either fork fails: the middle process exits with the second
    /// fork's errno, which is returned here. Nothing is left running then.
    ///
    /// Must be called from a single-threaded process: between fork and
    /// `_exit` the children only make async-signal-safe system calls.
    pub fn start(self) -> io::Result<()> {
        let (pipe_read, socket) = (self.pipe_read.as_raw_fd(), self.socket.as_raw_fd());
        // Every signal stays blocked from before the fork until the mover
        // has reset the handlers it inherited (those of the daemon's event
        // loop, which would swallow SIGTERM in a process that has closed the
        // loop's descriptors), so none can reach such a handler in between.
        let daemon_mask = block_all_signals()?;
        // SAFETY: the children only call fork, sigaction, sigprocmask,
        // close_range/close, prctl, splice, shutdown and _exit, on
        // descriptors they own.
        let middle = unsafe { libc::fork() };
        if middle == 0 {
            unsafe {
                match libc::fork() {
                    -1 => libc::_exit(errno().clamp(1, 255)),
                    0 => {}
                    _ => libc::_exit(0),
                }
                reset_signals();
                close_all_except(pipe_read, socket);
                // Its own name in ps and /proc (it is a copy of the daemon).
                libc::prctl(libc::PR_SET_NAME, c"qrexec-splice".as_ptr());
                splice_to_end(pipe_read, socket);
                libc::shutdown(socket, libc::SHUT_WR);
                libc::_exit(0)
            }
        }
        let forked = if middle < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
        set_signal_mask(&daemon_mask);
        forked?;
        // Our own child, which exits at once.
        let status = loop {
            match waitpid(Pid::from_raw(middle), None) {
                Err(Errno::EINTR) => continue,
                result => break result?,
            }
        };
        match status {
            WaitStatus::Exited(_, 0) => Ok(()),
            // The second fork failed with this errno: no mover exists.
            WaitStatus::Exited(_, errno) => Err(io::Error::from_raw_os_error(errno)),
            other => Err(io::Error::other(format!(
                "its first process ended abnormally ({other:?})"
            ))),
        }
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Blocks every signal in this thread; returns the mask to restore.
fn block_all_signals() -> io::Result<SigSet> {
    let mut previous = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut previous),
    )
    .map_err(|_| io::Error::other("cannot block signals"))?;
    Ok(previous)
}

fn set_signal_mask(mask: &SigSet) {
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(mask), None);
}

/// In the mover: every signal back to its default action (SIGTERM, SIGINT
/// and SIGHUP end it, as anyone sending them expects), except SIGPIPE,
/// which stays ignored so that a vanished peer ends the splice with EPIPE
/// and the mover still half-closes and exits normally; then unblocks all.
/// Only sigaction and sigprocmask: async-signal-safe.
unsafe fn reset_signals() {
    let mut action: libc::sigaction = std::mem::zeroed();
    action.sa_sigaction = libc::SIG_DFL;
    libc::sigemptyset(&mut action.sa_mask);
    // 1..65 covers every Linux signal (_NSIG is 65); the kernel refuses
    // SIGKILL and SIGSTOP, and the C library the two it keeps for itself.
    for signal in 1..65 {
        let wanted = if signal == libc::SIGPIPE {
            libc::SIG_IGN
        } else {
            libc::SIG_DFL
        };
        action.sa_sigaction = wanted;
        libc::sigaction(signal, &action, std::ptr::null_mut());
    }
    let mut none: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut none);
    libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
}

/// Closes every descriptor but two (the listening sockets and every other
/// connection must not stay open in a mover that may outlive the daemon).
unsafe fn close_all_except(a: i32, b: i32) {
    let (low, high) = (a.min(b) as u32, a.max(b) as u32);
    let mut ranges = [
        (0, low.wrapping_sub(1)),
        (low + 1, high.wrapping_sub(1)),
        (high + 1, u32::MAX),
    ];
    if low == 0 {
        ranges[0] = (1, 0); // empty
    }
    for (first, last) in ranges {
        if first > last {
            continue;
        }
        if libc::syscall(libc::SYS_close_range, first, last, 0) != 0 {
            // Kernels before 5.9: close one by one, up to a sane bound.
            for fd in first..=last.min(65_535) {
                libc::close(fd as i32);
            }
        }
    }
}

/// Splices until the pipe ends or the peer is gone.
unsafe fn splice_to_end(pipe_read: i32, socket: i32) {
    loop {
        let moved = libc::splice(
            pipe_read,
            std::ptr::null_mut(),
            socket,
            std::ptr::null_mut(),
            1 << 20,
            libc::SPLICE_F_MOVE,
        );
        if moved > 0 || (moved < 0 && *libc::__errno_location() == libc::EINTR) {
            continue;
        }
        return;
    }
}

pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Whatever the client prints for --help, a mode comes out.
    proptest! {
    #[test]
    fn any_help_text_gives_a_mode(
        before in prop::collection::vec(any::<u8>(), 0..300),
        after in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut with_option = before.clone();
        with_option.extend_from_slice(b"--use-stdin-socket");
        with_option.extend_from_slice(&after);
        prop_assert_eq!(ClientMode::from_help_text(&with_option), ClientMode::StdinSocket);
        let mut without: Vec<u8> = before.into_iter().chain(after).collect();
        without.retain(|&b| b != b'-');
        prop_assert_eq!(ClientMode::from_help_text(&without), ClientMode::Pipe);
    }
    }

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
