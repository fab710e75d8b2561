//! The event loop: one accept task per served socket, one reaper for all
//! children.
//!
//! The flow, in the order a reader meets it (fds in, serve, spawn, wait):
//! 1. [`run`] turns each inherited socket into a [`ServedSocket`] (or logs
//!    why it cannot be one), tells systemd READY=1, and waits for
//!    SIGTERM/SIGINT.
//! 2. [`serve`] accepts connections on one socket, at most
//!    `--max-connections` live at a time, backing off on resource errors.
//! 3. [`Daemon::start_client`] runs qrexec-client-vm for the socket's
//!    destination with the connection as its stdio (`posix_spawn`, with
//!    the argv built once per binding: see [`spawn::Launcher`]).
//! 4. [`supervise`] reads one signalfd for SIGCHLD, SIGTERM and SIGINT
//!    (blocked in the daemon, reset in its children); on SIGCHLD
//!    [`Daemon::reap`] collects every child that ended with a `waitid` loop
//!    and [`Daemon::client_ended`] frees its slot and logs how it ended.
//!    One table of live children (pid → binding, peer, start time) is the
//!    whole per-connection state: no task, pidfd or buffer per child.
//!
//! A socket whose `FileDescriptorName=` is not a valid destination is still
//! drained by [`refuse`], so its clients see EOF at once instead of hanging.
//!
//! Everything runs on one thread (a tokio current-thread runtime with a
//! LocalSet): the daemon only accepts and spawns, it never moves data.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::listener::{self, Connection, InheritedSocket};
use super::notify::Notifier;
use super::spawn::{self, ClientMode, ClientStdio, Launcher};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use qrexec_connect_binding::destination::Destination;
use qrexec_connect_binding::runtime_dir::RuntimeDir;
use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use super::published::Published;

/// The daemon's settings, as `cli` read them from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub client: OsString,
    pub max_connections: usize,
    pub client_mode: Option<ClientMode>,
    pub debug: bool,
}

/// How long the client may take to print its `--help` at start.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest pause after an accept() or spawn that failed for lack
/// of resources; doubles in between.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one STATUS= per this interval: each one wakes the service manager.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);
/// At most one repeated warning per this interval, with a count of the rest.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A listening socket whose fd name parsed into a destination: what the
/// daemon serves for one binding.
struct ServedSocket {
    /// The address, as the log names the binding.
    listen: String,
    destination: Destination,
    listener: AsyncFd<Socket>,
    /// The client's whole argv in each mode, built once.
    argv_stdin_socket: Vec<CString>,
    argv_pipe: Vec<CString>,
    live: Cell<usize>,
    slot_freed: Notify,
    accept_errors: RefCell<RateLimit>,
}

impl ServedSocket {
    fn argv(&self, mode: ClientMode) -> &[CString] {
        match mode {
            ClientMode::StdinSocket => &self.argv_stdin_socket,
            ClientMode::Pipe => &self.argv_pipe,
        }
    }
}

/// A process the daemon started and has not reaped yet.
enum Child {
    /// One connection's client.
    Client {
        served: Rc<ServedSocket>,
        peer: listener::Peer,
        started: Instant,
        /// Started in stdin-socket mode while the probe had not answered
        /// yet: a copy of the connection, to start it again in pipe mode
        /// should the client turn out to be an old one (see [`Tentative`]).
        tentative: Option<OwnedFd>,
    },
    /// The client's `--help`, run to learn its mode.
    Probe,
}

/// A connection whose client, started with `--use-stdin-socket` before
/// the probe answered, exited with status 2: what an old client does with an
/// option it does not know, before it reads anything or calls qrexec. It
/// waits here for the probe: pipe mode starts it again, stdin-socket mode
/// ends it as it ended.
struct Tentative {
    served: Rc<ServedSocket>,
    peer: listener::Peer,
    started: Instant,
    socket: OwnedFd,
    status: ExitStatus,
}

/// The daemon's state, shared by every task.
struct Daemon {
    options: Options,
    launcher: Launcher,
    /// Every child not reaped yet, by pid.
    children: RefCell<HashMap<Pid, Child>>,
    mode: Cell<Option<ClientMode>>,
    /// The probe runs in the background (the first start without a mode
    /// remembered): meanwhile connections are served in stdin-socket mode,
    /// tentatively.
    probing: Cell<bool>,
    /// Tentative connections that ended with status 2, waiting for the probe.
    parked: RefCell<Vec<Tentative>>,
    notifier: Notifier,
    status_changed: Notify,
    serving: usize,
    refused: usize,
    live: Cell<usize>,
    spawn_errors: RefCell<RateLimit>,
    /// Counters for `qrexec-connect status`, written off the connection path.
    published: Rc<Published>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(options: Options, sockets: Vec<InheritedSocket>, notifier: Notifier) -> ExitCode {
    // Blocked before any thread exists (a thread inherits the mask), and
    // read from one signalfd by `supervise`. Children start with an empty
    // mask (`Launcher`), the splicer resets its own.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        signals.add(signal);
    }
    if let Err(e) = signals.thread_block() {
        error!("cannot block SIGCHLD, SIGTERM and SIGINT to watch them: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the event loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve_all(options, sockets, notifier, signals))
}

/// The daemon's life on the event loop: watch the signals, prepare each
/// inherited socket, start serving them, and stop on SIGTERM or SIGINT.
async fn serve_all(
    options: Options,
    sockets: Vec<InheritedSocket>,
    notifier: Notifier,
    signals: SigSet,
) -> ExitCode {
    let signals =
        match SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(io::Error::from)
            .and_then(watch)
        {
            Ok(signals) => signals,
            Err(e) => {
                error!("cannot watch SIGCHLD, SIGTERM and SIGINT: {e}");
                return ExitCode::FAILURE;
            }
        };
    let launcher = match Launcher::new(&options.client) {
        Ok(launcher) => launcher,
        Err(e) => {
            error!(
                "cannot prepare to run {}: {e}",
                options.client.to_string_lossy()
            );
            return ExitCode::FAILURE;
        }
    };
    let mut served = Vec::new();
    let mut refused = Vec::new();
    for inherited in sockets {
        match prepare(inherited, &launcher) {
            Some(Ok(socket)) => served.push(socket),
            Some(Err(socket)) => refused.push(socket),
            None => {}
        }
    }
    let daemon = Daemon::new(options, launcher, notifier, &served, refused.len());
    // The reaper first: the probe's child is reaped by it too.
    let stop = supervise(daemon.clone(), signals);
    tokio::select! {
        _ = stop => {}
        _ = start(daemon.clone(), served, refused) => {}
    }
    let _ = daemon.notifier.notify("STOPPING=1");
    info!(
        "stopping; {} live connection(s) go on without the daemon",
        daemon.live.get()
    );
    // Leave at once: the children are independent processes, and with
    // KillMode=process systemd leaves them running too.
    ExitCode::SUCCESS
}

/// One socket from systemd made ready: `Ok` to serve, `Err` (still
/// watched) when its `FileDescriptorName=` is not a destination, so that its
/// clients are refused at once; `None`, logged, when it cannot be used.
fn prepare(
    inherited: InheritedSocket,
    launcher: &Launcher,
) -> Option<Result<ServedSocket, AsyncFd<Socket>>> {
    let InheritedSocket {
        socket,
        fd_name: name,
    } = inherited;
    let listen = listener::local_address(&socket)
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("(unknown address: {e})"));
    if let Err(why) = listener::check_listening_stream(&socket) {
        error!(listen = %listen, fd_name = %name,
            "{listen} (socket named {name:?}) cannot be served: {why}; other bindings are not affected");
        return None;
    }
    let socket = match socket.set_nonblocking(true).and_then(|()| watch(socket)) {
        Ok(socket) => socket,
        Err(e) => {
            error!(listen = %listen, "{listen}: cannot watch this socket: {e}");
            return None;
        }
    };
    let parsed = Destination::from_fd_name(&name)
        .map_err(|e| e.to_string())
        .and_then(|destination| {
            let argv = |mode| launcher.argv(mode, &destination).map_err(|e| e.to_string());
            Ok((
                argv(ClientMode::StdinSocket)?,
                argv(ClientMode::Pipe)?,
                destination,
            ))
        });
    match parsed {
        Ok((argv_stdin_socket, argv_pipe, destination)) => {
            info!(listen = %listen, qrexec_target = %destination.target,
                qrexec_service = %destination.service,
                "{listen} (target {}, service {})", destination.target, destination.service);
            Some(Ok(ServedSocket {
                listen,
                destination,
                listener: socket,
                argv_stdin_socket,
                argv_pipe,
                live: Cell::new(0),
                slot_freed: Notify::new(),
                accept_errors: RefCell::new(RateLimit::default()),
            }))
        }
        Err(why) => {
            error!(listen = %listen, fd_name = %name,
                "{listen}: invalid FileDescriptorName={name:?}: {why}; its connections will be \
                 closed at once, other bindings are not affected");
            Some(Err(socket))
        }
    }
}

/// Starts a task per socket (served or refused), the probe of the client
/// when its mode is unknown, and the status reports; never returns.
async fn start(daemon: Rc<Daemon>, served: Vec<ServedSocket>, refused: Vec<AsyncFd<Socket>>) {
    // Not on the first connection's path: the probe answers while that
    // connection is already served, tentatively, in stdin-socket mode.
    let mut probe = false;
    if daemon.mode.get().is_none() && daemon.serving > 0 {
        match daemon.recall_mode() {
            Some(mode) => daemon.set_mode(mode),
            None => {
                daemon.probing.set(true);
                probe = true;
            }
        }
    }
    for socket in served {
        tokio::task::spawn_local(serve(Rc::new(socket), daemon.clone()));
    }
    // Spawned after the accept tasks, so it runs after them: the
    // connection that socket activation started us for is waiting in
    // the backlog, and its client starts before the probe's.
    if probe {
        tokio::task::spawn_local(daemon.clone().probe_in_background());
    }
    for socket in refused {
        tokio::task::spawn_local(refuse(socket));
    }
    tokio::task::spawn_local(report_status(daemon.clone()));
    std::future::pending::<()>().await
}

/// A type that owns its descriptor: it stays open and the same for as long
/// as the value lives.
trait OwnsFd: AsRawFd {}
impl OwnsFd for Socket {}
impl OwnsFd for SignalFd {}

/// Registers a descriptor the daemon reads (a listening socket, the
/// signalfd) with the event loop.
fn watch<T: OwnsFd>(owner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` owns its descriptor (OwnsFd), which stays open and the
    // same until the AsyncFd, which owns the `T`, drops it.
    unsafe { AsyncFd::register_with_interest(owner, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into())
}

/// Reaps children on SIGCHLD; returns on SIGTERM or SIGINT.
async fn supervise(daemon: Rc<Daemon>, signals: AsyncFd<SignalFd>) {
    loop {
        let mut ready = match signals.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                error!("cannot wait for signals: {e}; stopping");
                return;
            }
        };
        // One read per wake-up, not a read until EAGAIN (one syscall per
        // connection fewer): the kernel hands pending signals out lowest
        // number first, so after SIGCHLD (17) none of ours (SIGINT 2,
        // SIGTERM 15) is left pending, and one that arrives later wakes the
        // (edge-triggered) loop again. SIGCHLD does not queue: one pending
        // stands for every child that ended, and `reap` collects them all.
        match ready.get_inner().read_signal() {
            Ok(Some(info)) if info.ssi_signo == libc::SIGCHLD as u32 => {
                ready.clear_ready();
                daemon.reap();
            }
            Ok(Some(_)) => return,
            Ok(None) => ready.clear_ready(),
            Err(Errno::EINTR) => {}
            Err(e) => {
                error!("cannot read the signals: {e}; stopping");
                return;
            }
        }
    }
}

/// Accepts connections on one socket for as long as the daemon runs.
async fn serve(served: Rc<ServedSocket>, daemon: Rc<Daemon>) {
    let max = daemon.options.max_connections;
    let mut backoff = BACKOFF_MIN;
    // From the limit warning until no client is left waiting: one episode,
    // one warning and one all-clear, however many slots free up in between.
    let mut saturated = false;
    loop {
        if served.live.get() >= max {
            if !saturated {
                warn!(listen = %served.listen,
                    "{}: {max} live connections, the --max-connections limit; new clients \
                     wait until one ends", served.listen);
                saturated = true;
            }
            while served.live.get() >= max {
                served.slot_freed.notified().await;
            }
        }
        let mut ready = match served.listener.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                error!(listen = %served.listen, "{}: cannot wait for connections: {e}; \
                    this binding stops", served.listen);
                return;
            }
        };
        let accepted = match ready.try_io(|socket| listener::accept(socket.get_ref())) {
            Ok(result) => result,
            Err(_would_block) => {
                // The backlog is empty while below the limit: nobody waits.
                if saturated {
                    info!(listen = %served.listen, "{}: below the limit again, accepting",
                        served.listen);
                    saturated = false;
                }
                continue;
            }
        };
        match accepted {
            Ok(connection) => {
                backoff = BACKOFF_MIN;
                daemon.start_client(&served, connection).await;
            }
            Err(e) if listener::is_per_connection(&e) => {
                debug!(listen = %served.listen, "{}: accept: {e}", served.listen);
            }
            Err(e) => {
                let hint = if listener::is_resource_exhaustion(&e) {
                    "out of descriptors or memory; waiting before the next accept"
                } else {
                    "waiting before the next accept"
                };
                served.accept_errors.borrow_mut().warn(|suppressed| {
                    warn!(listen = %served.listen, "{}: cannot accept a connection: {e}; \
                        {hint}{suppressed}", served.listen)
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Closes every connection to a binding that cannot be served, so clients
/// get EOF instead of waiting for a reply that will never come.
async fn refuse(socket: AsyncFd<Socket>) {
    loop {
        let Ok(mut ready) = socket.readable().await else {
            return;
        };
        match ready.try_io(|socket| listener::accept(socket.get_ref())) {
            Ok(Ok(connection)) => drop(connection),
            Ok(Err(e)) if listener::is_per_connection(&e) => {}
            Ok(Err(_)) => tokio::time::sleep(BACKOFF_MAX).await,
            Err(_would_block) => {}
        }
    }
}

/// Tells the service manager READY=1, then the status whenever the counts
/// change (coalesced: one update per wake). Sends never wait: while the
/// manager's queue is full, the message is tried again after a pause (or at
/// the next change) with the status of that moment, so READY=1 is never
/// lost (without it systemd would kill the daemon after its start timeout)
/// and a STATUS= that could not be sent is replaced by the current one.
async fn report_status(daemon: Rc<Daemon>) {
    let mut ready_sent = false;
    let mut pause = BACKOFF_MIN;
    loop {
        let ready = if ready_sent { "" } else { "READY=1\n" };
        match daemon
            .notifier
            .notify(&format!("{ready}STATUS={}", daemon.status()))
        {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = daemon.status_changed.notified() => {}
                }
                pause = (pause * 2).min(BACKOFF_MAX);
                continue;
            }
            // Sent, or the manager cannot be reached at all (retrying would
            // not help: systemd reports a missing READY=1 itself).
            _ => {
                ready_sent = true;
                pause = BACKOFF_MIN;
            }
        }
        // Each message wakes the manager: at most one per STATUS_INTERVAL,
        // however many connections start and end meanwhile (the changes
        // gather in one wake-up, and the newest status goes next).
        tokio::time::sleep(STATUS_INTERVAL).await;
        daemon.status_changed.notified().await;
    }
}

impl Daemon {
    /// The shared state, with the counters' publisher started for the
    /// sockets it serves.
    fn new(
        options: Options,
        launcher: Launcher,
        notifier: Notifier,
        served: &[ServedSocket],
        refused: usize,
    ) -> Rc<Daemon> {
        let daemon = Rc::new(Daemon {
            mode: Cell::new(options.client_mode),
            probing: Cell::new(false),
            parked: RefCell::new(Vec::new()),
            launcher,
            children: RefCell::new(HashMap::new()),
            notifier,
            status_changed: Notify::new(),
            serving: served.len(),
            refused,
            live: Cell::new(0),
            spawn_errors: RefCell::new(RateLimit::default()),
            published: Published::new(),
            options,
        });
        for socket in served {
            daemon.published.serve(
                &socket.listen,
                socket.destination.target.as_str(),
                socket.destination.service.as_str(),
            );
        }
        daemon
            .published
            .client(&daemon.options.client.to_string_lossy(), None);
        tokio::task::spawn_local(daemon.published.clone().publish());
        daemon
    }

    fn status(&self) -> String {
        let mut status = format!(
            "{} binding(s), {} live connection(s)",
            self.serving,
            self.live.get()
        );
        if self.refused > 0 {
            status += &format!(
                ", {} socket(s) with an invalid name (see the log)",
                self.refused
            );
        }
        status
    }

    /// Collects every child that has ended (SIGCHLD is coalesced: one
    /// signal may stand for many).
    fn reap(&self) {
        loop {
            let (pid, status) = match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    (pid, ExitStatus::from_raw((code & 0xff) << 8))
                }
                Ok(WaitStatus::Signaled(pid, signal, core)) => (
                    pid,
                    ExitStatus::from_raw(signal as i32 | if core { 0x80 } else { 0 }),
                ),
                // Only WEXITED is asked for; anything else is not an end.
                Ok(WaitStatus::StillAlive) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                // ECHILD: no child left.
                Err(_) => return,
            };
            let child = self.children.borrow_mut().remove(&pid);
            let Some(Child::Client {
                served,
                peer,
                started,
                tentative,
            }) = child
            else {
                continue;
            };
            match (tentative, status.code(), self.mode.get()) {
                (Some(socket), Some(2), None | Some(ClientMode::Pipe)) => {
                    let tentative = Tentative {
                        served,
                        peer,
                        started,
                        socket,
                        status,
                    };
                    if self.mode.get().is_some() {
                        self.retry_in_pipe_mode(tentative);
                    } else {
                        self.parked.borrow_mut().push(tentative);
                    }
                }
                _ => self.client_ended(&served, &peer, started, status),
            }
        }
    }

    /// Runs the probe while the first connections are served tentatively,
    /// then settles them.
    async fn probe_in_background(self: Rc<Self>) {
        let mode = self.probe_client().await;
        self.probing.set(false);
        if mode == Some(ClientMode::StdinSocket) {
            // The tentative clients were right: drop the spare copies.
            for child in self.children.borrow_mut().values_mut() {
                if let Child::Client { tentative, .. } = child {
                    *tentative = None;
                }
            }
        }
        for parked in self.parked.take() {
            if mode == Some(ClientMode::Pipe) {
                self.retry_in_pipe_mode(parked);
            } else {
                self.client_ended(&parked.served, &parked.peer, parked.started, parked.status);
            }
        }
    }

    /// Starts an old client again for a connection that a tentative
    /// `--use-stdin-socket` client left untouched; the connection stays
    /// live, and is counted and logged once.
    fn retry_in_pipe_mode(&self, parked: Tentative) {
        let Tentative {
            served,
            peer,
            started,
            socket,
            status,
        } = parked;
        debug!(listen = %served.listen, peer = %peer,
            "{}: the client has no --use-stdin-socket; {peer} is served again through a pipe",
            served.listen);
        match self.launch(&served, ClientMode::Pipe, socket) {
            Ok(pid) => {
                self.children.borrow_mut().insert(
                    pid,
                    Child::Client {
                        served,
                        peer,
                        started,
                        tentative: None,
                    },
                );
            }
            Err(e) => {
                let client = self.options.client.to_string_lossy();
                let (what, e) = match e {
                    Launch::Client(e) => (&*client, e),
                    Launch::Splicer(e) => ("the splicer", e),
                };
                self.spawn_errors.borrow_mut().warn(|suppressed| {
                    warn!(listen = %served.listen, peer = %peer,
                        "{}: cannot run {what} for {peer}: {e}; connection closed{suppressed}",
                        served.listen)
                });
                self.client_ended(&served, &peer, started, status);
            }
        }
    }

    /// Starts the client (and in pipe mode the splicer first) for one
    /// connection; returns its pid. The error says what could not start.
    fn launch(
        &self,
        served: &ServedSocket,
        mode: ClientMode,
        socket: OwnedFd,
    ) -> Result<Pid, Launch> {
        let mut stdio = ClientStdio::new(mode, socket).map_err(Launch::Client)?;
        // The splicer first: if it cannot start, no client has run yet.
        if let Some(splicer) = stdio.splicer.take() {
            splicer.start().map_err(Launch::Splicer)?;
        }
        let spawned = self
            .launcher
            .spawn(served.argv(mode), stdio.stdin(), stdio.stdout(), None);
        // Our copies of the socket and of the pipe's write end close here,
        // so the splicer sees end of file when the client ends (or never
        // started).
        drop(stdio);
        spawned.map_err(Launch::Client)
    }

    /// Runs the client's `--help` and returns what it printed (stdout and
    /// stderr), or `None` if it did not end its output within
    /// [`PROBE_TIMEOUT`] (it is killed then).
    async fn run_help(&self) -> io::Result<Option<Vec<u8>>> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let null = std::fs::File::open("/dev/null")?;
        let argv = self.launcher.help_argv();
        let pid = self
            .launcher
            .spawn(&argv, null.as_fd(), theirs.as_fd(), Some(theirs.as_fd()))?;
        self.children.borrow_mut().insert(pid, Child::Probe);
        drop(theirs);
        ours.set_nonblocking(true)?;
        let ours = tokio::net::UnixStream::from_std(ours)?;
        let read_all = async {
            let mut text = Vec::new();
            let mut buffer = [0; 4096];
            loop {
                ours.readable().await?;
                match ours.try_read(&mut buffer) {
                    Ok(0) => return Ok::<_, io::Error>(text),
                    Ok(n) => text.extend_from_slice(&buffer[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(PROBE_TIMEOUT, read_all).await {
            Ok(text) => text.map(Some),
            Err(_) => {
                // Reaped by `reap` once it is gone.
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                Ok(None)
            }
        }
    }

    /// The client's mode as an earlier start found it, if remembered.
    fn recall_mode(&self) -> Option<ClientMode> {
        let client = &self.options.client;
        let mode = ClientMode::recall(&RuntimeDir::from_env().ok()?, client)?;
        debug!(
            "{}: mode remembered from an earlier start",
            client.to_string_lossy()
        );
        Some(mode)
    }

    /// Asks the client once whether it has `--use-stdin-socket`.
    async fn probe_client(&self) -> Option<ClientMode> {
        let client = &self.options.client;
        if let Some(mode) = self.recall_mode() {
            self.set_mode(mode);
            return Some(mode);
        }
        let dir = RuntimeDir::from_env().ok();
        let mode = match self.run_help().await {
            Ok(Some(text)) => {
                let mode = ClientMode::from_help_text(&text);
                if let Some(dir) = &dir {
                    mode.remember(dir, client);
                }
                mode
            }
            Err(e) => {
                self.spawn_errors.borrow_mut().warn(|suppressed| {
                    warn!(
                        "cannot run {}: {e}; connections will be closed until it can be run \
                        (install qubes-core-agent, or set --qrexec-client-vm=){suppressed}",
                        client.to_string_lossy()
                    )
                });
                return None;
            }
            Ok(None) => {
                warn!(
                    "{} --help did not answer within {PROBE_TIMEOUT:?}; assuming it lacks \
                     --use-stdin-socket",
                    client.to_string_lossy()
                );
                ClientMode::Pipe
            }
        };
        info!(
            "{}: {}",
            client.to_string_lossy(),
            match mode {
                ClientMode::StdinSocket => "supports --use-stdin-socket",
                ClientMode::Pipe =>
                    "has no --use-stdin-socket; its output goes through a pipe and a splicer",
            }
        );
        self.set_mode(mode);
        Some(mode)
    }

    fn set_mode(&self, mode: ClientMode) {
        self.mode.set(Some(mode));
        self.published.client(
            &self.options.client.to_string_lossy(),
            Some(match mode {
                ClientMode::StdinSocket => "stdin-socket",
                ClientMode::Pipe => "pipe",
            }),
        );
    }

    /// Runs qrexec-client-vm for one accepted connection.
    async fn start_client(self: &Rc<Self>, served: &Rc<ServedSocket>, connection: Connection) {
        let Connection { socket, peer } = connection;
        let (mode, tentative) = match self.mode.get() {
            Some(mode) => (mode, None),
            // The first connections while the probe runs at start: keep a
            // copy of the socket to start an old client again.
            None if self.probing.get() => match socket.try_clone() {
                Ok(copy) => (ClientMode::StdinSocket, Some(copy)),
                Err(_) => (ClientMode::StdinSocket, None),
            },
            // Probed again on the connection's path: only after the client
            // could not be found.
            None => match self.probe_client().await {
                Some(mode) => (mode, None),
                None => return, // the connection closes here; the client sees EOF
            },
        };
        let destination = &served.destination;
        let cannot_run = |e: io::Error| {
            if e.kind() == io::ErrorKind::NotFound && self.options.client_mode.is_none() {
                self.mode.set(None); // probe again once it is back
            }
            self.published.not_started(
                &served.listen,
                &format!("cannot run {}: {e}", self.options.client.to_string_lossy()),
            );
            self.spawn_errors.borrow_mut().warn(|suppressed| {
                warn!(listen = %served.listen, peer = %peer,
                    "{}: cannot run {} for {peer}: {e}; connection closed{suppressed}",
                    served.listen, self.options.client.to_string_lossy())
            });
        };
        let pid = match self.launch(served, mode, socket) {
            Ok(pid) => pid,
            Err(Launch::Client(e)) => return cannot_run(e),
            Err(Launch::Splicer(e)) => {
                self.published
                    .not_started(&served.listen, &format!("cannot start the splicer: {e}"));
                self.spawn_errors.borrow_mut().warn(|suppressed| {
                    warn!(listen = %served.listen, peer = %peer,
                        "{}: cannot start the splicer for {peer}: {e}; connection \
                        closed{suppressed}", served.listen)
                });
                return;
            }
        };
        served.live.set(served.live.get() + 1);
        self.live.set(self.live.get() + 1);
        self.status_changed.notify_one();
        self.published.connected(&served.listen);
        debug!(listen = %served.listen, qrexec_target = %destination.target,
            qrexec_service = %destination.service, peer = %peer,
            "{}: {peer} connected, running {} {}", served.listen,
            destination.target, destination.service);
        self.children.borrow_mut().insert(
            pid,
            Child::Client {
                served: served.clone(),
                peer,
                started: Instant::now(),
                tentative,
            },
        );
    }

    /// One client has ended: frees its slot and logs how it ended.
    fn client_ended(
        &self,
        served: &ServedSocket,
        peer: &listener::Peer,
        started: Instant,
        status: ExitStatus,
    ) {
        served.live.set(served.live.get() - 1);
        self.live.set(self.live.get() - 1);
        served.slot_freed.notify_one();
        self.status_changed.notify_one();
        let duration = started.elapsed();
        let destination = &served.destination;
        let (code, words) = (spawn::exit_code(status), spawn::describe_exit(status));
        self.published.ended(&served.listen, code, &words);
        // The message is formatted by the logger, only if the entry is sent
        // (not while the journal is refusing entries).
        macro_rules! log_end {
            ($level:ident) => {
                $level!(listen = %served.listen, qrexec_target = %destination.target,
                    qrexec_service = %destination.service, peer = %peer,
                    duration_ms = duration.as_millis() as u64, exit_status = code,
                    "{} -> {} {}: {peer}, {:.3}s, {words}", served.listen, destination.target,
                    destination.service, duration.as_secs_f64())
            };
        }
        match code {
            0 => log_end!(info),
            126 => log_end!(warn),
            _ => log_end!(warn),
        }
    }
}

/// What [`Daemon::launch`] could not start.
enum Launch {
    Client(io::Error),
    Splicer(io::Error),
}

/// Lets one warning through per [`LOG_INTERVAL`] and counts the rest.
#[derive(Default)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// Calls `log` with a suffix naming how many were suppressed, or not at all.
    fn warn(&mut self, log: impl FnOnce(&str)) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < LOG_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        let suffix = match self.suppressed {
            0 => String::new(),
            n => format!(" ({n} similar message(s) suppressed)"),
        };
        log(&suffix);
        self.last = Some(now);
        self.suppressed = 0;
    }
}
