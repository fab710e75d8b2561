//! The event loop: one accept task per served socket, one waiter per child.
//!
//! The flow, in the order a reader meets it (fds in, serve, spawn, wait):
//! 1. [`run`] turns each inherited socket into a [`ServedSocket`] (or logs
//!    why it cannot be one), tells systemd READY=1, and waits for
//!    SIGTERM/SIGINT.
//! 2. [`serve`] accepts connections on one socket, at most
//!    `--max-connections` live at a time, backing off on resource errors.
//! 3. [`Daemon::start_client`] runs qrexec-client-vm for the socket's
//!    destination with the connection as its stdio.
//! 4. [`Daemon::wait_client`] waits for it and logs how it ended.
//!
//! A socket whose `FileDescriptorName=` is not a valid destination is still
//! drained by [`refuse`], so its clients see EOF at once instead of hanging.
//!
//! Everything runs on one thread (a tokio current-thread runtime with a
//! LocalSet): the daemon only accepts and spawns, it never moves data.

use std::cell::{Cell, RefCell};
use std::io;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::listener::{self, Connection, InheritedSocket};
use crate::notify::Notifier;
use crate::spawn::{self, ClientMode};
use qrexec_connect_binding::destination::Destination;
use qrexec_connect_binding::runtime_dir::RuntimeDir;
use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::published::Published;
use crate::Options;

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
    live: Cell<usize>,
    slot_freed: Notify,
    accept_errors: RefCell<RateLimit>,
}

/// The daemon's state, daemon by every task.
struct Daemon {
    options: Options,
    mode: Cell<Option<ClientMode>>,
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
    local.block_on(&runtime, serve_all(options, sockets, notifier))
}

async fn serve_all(
    options: Options,
    sockets: Vec<InheritedSocket>,
    notifier: Notifier,
) -> ExitCode {
    let mut served = Vec::new();
    let mut refused = Vec::new();
    for InheritedSocket {
        socket,
        fd_name: name,
    } in sockets
    {
        let listen = listener::local_address(&socket)
            .map(|a| a.to_string())
            .unwrap_or_else(|e| format!("(unknown address: {e})"));
        if let Err(why) = listener::check_listening_stream(&socket) {
            error!(listen = %listen, fd_name = %name,
                "{listen} (socket named {name:?}) cannot be served: {why}; other bindings are not affected");
            continue;
        }
        let socket = match socket.set_nonblocking(true).and_then(|()| watch(socket)) {
            Ok(socket) => socket,
            Err(e) => {
                error!(listen = %listen, "{listen}: cannot watch this socket: {e}");
                continue;
            }
        };
        match Destination::from_fd_name(&name) {
            Ok(destination) => {
                info!(listen = %listen, qrexec_target = %destination.target,
                    qrexec_service = %destination.service,
                    "{listen} (target {}, service {})", destination.target, destination.service);
                served.push(ServedSocket {
                    listen,
                    destination,
                    listener: socket,
                    live: Cell::new(0),
                    slot_freed: Notify::new(),
                    accept_errors: RefCell::new(RateLimit::default()),
                });
            }
            Err(why) => {
                error!(listen = %listen, fd_name = %name,
                    "{listen}: invalid FileDescriptorName={name:?}: {why}; its connections will be \
                     closed at once, other bindings are not affected");
                refused.push(socket);
            }
        }
    }

    let daemon = Rc::new(Daemon {
        mode: Cell::new(options.client_mode),
        notifier,
        status_changed: Notify::new(),
        serving: served.len(),
        refused: refused.len(),
        live: Cell::new(0),
        spawn_errors: RefCell::new(RateLimit::default()),
        published: Published::new(),
        options,
    });
    for socket in &served {
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
    if daemon.mode.get().is_none() && daemon.serving > 0 {
        daemon.probe_client().await;
    }
    for socket in served {
        tokio::task::spawn_local(serve(Rc::new(socket), daemon.clone()));
    }
    for socket in refused {
        tokio::task::spawn_local(refuse(socket));
    }
    tokio::task::spawn_local(report_status(daemon.clone()));

    wait_for_stop_signal().await;
    let _ = daemon.notifier.notify("STOPPING=1");
    info!(
        "stopping; {} live connection(s) go on without the daemon",
        daemon.live.get()
    );
    // Leave at once: the children are independent processes, and with
    // KillMode=process systemd leaves them running too.
    ExitCode::SUCCESS
}

/// Registers a listening socket with the event loop.
fn watch(socket: Socket) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: the Socket owns its descriptor, which stays open and the same
    // until the AsyncFd (which owns the Socket) drops it.
    unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into())
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            error!("cannot watch SIGTERM/SIGINT; the default action will apply");
            std::future::pending::<()>().await
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

    /// Asks the client once whether it has `--use-stdin-socket`.
    async fn probe_client(&self) -> Option<ClientMode> {
        let client = &self.options.client;
        let dir = RuntimeDir::from_env().ok();
        if let Some(mode) = dir.as_ref().and_then(|dir| ClientMode::recall(dir, client)) {
            debug!(
                "{}: mode remembered from an earlier start",
                client.to_string_lossy()
            );
            self.set_mode(mode);
            return Some(mode);
        }
        let output = tokio::process::Command::new(client)
            .arg("--help")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let mode = match tokio::time::timeout(PROBE_TIMEOUT, output).await {
            Ok(Ok(output)) => {
                let mut text = output.stdout;
                text.extend_from_slice(&output.stderr);
                let mode = ClientMode::from_help_text(&text);
                if let Some(dir) = &dir {
                    mode.remember(dir, client);
                }
                mode
            }
            Ok(Err(e)) => {
                self.spawn_errors.borrow_mut().warn(|suppressed| {
                    warn!(
                        "cannot run {}: {e}; connections will be closed until it can be run \
                        (install qubes-core-agent, or set --qrexec-client-vm=){suppressed}",
                        client.to_string_lossy()
                    )
                });
                return None;
            }
            Err(_) => {
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
        let mode = match self.mode.get() {
            Some(mode) => mode,
            None => match self.probe_client().await {
                Some(mode) => mode,
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
        let (command, splicer) =
            match spawn::client_command(mode, &self.options.client, destination, socket) {
                Ok(parts) => parts,
                Err(e) => return cannot_run(e),
            };
        // The splicer first: if it cannot start, no client has run yet.
        if let Some(splicer) = splicer {
            if let Err(e) = splicer.start() {
                self.published
                    .not_started(&served.listen, &format!("cannot start the splicer: {e}"));
                self.spawn_errors.borrow_mut().warn(|suppressed| {
                    warn!(listen = %served.listen, peer = %peer,
                        "{}: cannot start the splicer for {peer}: {e}; connection \
                        closed{suppressed}", served.listen)
                });
                return;
            }
        }
        // The command holds the pipe's write end and is dropped here, so the
        // splicer sees end of file when the client ends (or never started).
        let child = match tokio::process::Command::from(command).spawn() {
            Ok(child) => child,
            Err(e) => return cannot_run(e),
        };
        served.live.set(served.live.get() + 1);
        self.live.set(self.live.get() + 1);
        self.status_changed.notify_one();
        self.published.connected(&served.listen);
        debug!(listen = %served.listen, qrexec_target = %destination.target,
            qrexec_service = %destination.service, peer = %peer,
            "{}: {peer} connected, running {} {}", served.listen,
            destination.target, destination.service);
        tokio::task::spawn_local(self.clone().wait_client(served.clone(), child, peer));
    }

    /// Waits for one client to end, frees its slot and logs how it ended.
    async fn wait_client(
        self: Rc<Self>,
        served: Rc<ServedSocket>,
        mut child: tokio::process::Child,
        peer: listener::Peer,
    ) {
        let started = Instant::now();
        let status = child.wait().await;
        served.live.set(served.live.get() - 1);
        self.live.set(self.live.get() - 1);
        served.slot_freed.notify_one();
        self.status_changed.notify_one();
        let duration = started.elapsed();
        let destination = &served.destination;
        let (code, words) = match status {
            Ok(status) => (spawn::exit_code(status), spawn::describe_exit(status)),
            Err(e) => (-1, format!("cannot be waited for: {e}")),
        };
        self.published.ended(&served.listen, code, &words);
        let message = format!(
            "{} -> {} {}: {peer}, {:.3}s, {words}",
            served.listen,
            destination.target,
            destination.service,
            duration.as_secs_f64()
        );
        macro_rules! log_end {
            ($level:ident) => {
                $level!(listen = %served.listen, qrexec_target = %destination.target,
                    qrexec_service = %destination.service, peer = %peer,
                    duration_ms = duration.as_millis() as u64, exit_status = code, "{message}")
            };
        }
        match code {
            0 => log_end!(info),
            126 => log_end!(warn),
            _ => log_end!(warn),
        }
    }
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
