//! The event loop: one accept task per binding, one waiter per child.
//!
//! The flow, in the order a reader meets it:
//! 1. [`run`] turns each inherited socket into a [`Binding`] (or logs why it
//!    cannot be one), tells systemd READY=1, and waits for SIGTERM/SIGINT.
//! 2. [`serve`] accepts connections on one binding, at most
//!    `--max-connections` live at a time, backing off on resource errors.
//! 3. [`Shared::start_client`] runs qrexec-client-vm with the connection as
//!    its stdio; [`Shared::wait_client`] logs how it ended.
//! 4. A binding whose `FileDescriptorName=` is invalid is still drained by
//!    [`refuse`], so its clients see EOF at once instead of hanging.
//!
//! Everything runs on one thread (a tokio current-thread runtime with a
//! LocalSet): the daemon only accepts and spawns, it never moves data.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::listener::{self, Connection, InheritedSocket};
use crate::notify::Notifier;
use crate::spawn::{self, ClientMode};
use qrexec_connect_binding::address::ListenAddress;
use qrexec_connect_binding::destination::Destination;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::Options;

/// How long the client may take to print its `--help` at start.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest pause after an accept() or spawn that failed for lack
/// of resources; doubles in between.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one repeated warning per this interval, with a count of the rest.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A listening socket whose name parsed into a destination.
struct Binding {
    listen: String,
    destination: Destination,
    socket: AsyncFd<OwnedFd>,
    live: Cell<usize>,
    slot_freed: Notify,
    accept_errors: RefCell<RateLimit>,
}

/// State every task shares.
struct Shared {
    options: Options,
    mode: Cell<Option<ClientMode>>,
    notifier: Notifier,
    status_changed: Notify,
    serving: usize,
    refused: usize,
    live: Cell<usize>,
    spawn_errors: RefCell<RateLimit>,
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
    let mut bindings = Vec::new();
    let mut refused = Vec::new();
    for InheritedSocket { fd, name } in sockets {
        let listen = ListenAddress::of_socket(fd.as_fd())
            .map(|a| a.to_string())
            .unwrap_or_else(|e| format!("(unknown address: {e})"));
        if let Err(why) = listener::check_listening_stream(fd.as_fd()) {
            error!(listen = %listen, fd_name = %name,
                "{listen} (socket named {name:?}) cannot be served: {why}; other bindings are not affected");
            continue;
        }
        let socket = match listener::set_nonblocking(fd.as_fd()).and_then(|()| watch(fd)) {
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
                bindings.push(Binding {
                    listen,
                    destination,
                    socket,
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

    let shared = Rc::new(Shared {
        mode: Cell::new(options.client_mode),
        notifier,
        status_changed: Notify::new(),
        serving: bindings.len(),
        refused: refused.len(),
        live: Cell::new(0),
        spawn_errors: RefCell::new(RateLimit::default()),
        options,
    });
    if shared.mode.get().is_none() && shared.serving > 0 {
        shared.probe_client().await;
    }
    for binding in bindings {
        tokio::task::spawn_local(serve(Rc::new(binding), shared.clone()));
    }
    for socket in refused {
        tokio::task::spawn_local(refuse(socket));
    }
    tokio::task::spawn_local(report_status(shared.clone()));

    wait_for_stop_signal().await;
    let _ = shared.notifier.notify("STOPPING=1");
    info!(
        "stopping; {} live connection(s) go on without the daemon",
        shared.live.get()
    );
    // Leave at once: the children are independent processes, and with
    // KillMode=process systemd leaves them running too.
    ExitCode::SUCCESS
}

/// Registers a listening socket with the event loop.
fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged until dropped.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
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

/// Accepts connections on one binding for as long as the daemon runs.
async fn serve(binding: Rc<Binding>, shared: Rc<Shared>) {
    let max = shared.options.max_connections;
    let mut backoff = BACKOFF_MIN;
    // From the limit warning until no client is left waiting: one episode,
    // one warning and one all-clear, however many slots free up in between.
    let mut saturated = false;
    loop {
        if binding.live.get() >= max {
            if !saturated {
                warn!(listen = %binding.listen,
                    "{}: {max} live connections, the --max-connections limit; new clients \
                     wait until one ends", binding.listen);
                saturated = true;
            }
            while binding.live.get() >= max {
                binding.slot_freed.notified().await;
            }
        }
        let mut ready = match binding.socket.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                error!(listen = %binding.listen, "{}: cannot wait for connections: {e}; \
                    this binding stops", binding.listen);
                return;
            }
        };
        let accepted = match ready.try_io(|socket| listener::accept(socket.get_ref().as_fd())) {
            Ok(result) => result,
            Err(_would_block) => {
                // The backlog is empty while below the limit: nobody waits.
                if saturated {
                    info!(listen = %binding.listen, "{}: below the limit again, accepting",
                        binding.listen);
                    saturated = false;
                }
                continue;
            }
        };
        match accepted {
            Ok(connection) => {
                backoff = BACKOFF_MIN;
                shared.start_client(&binding, connection).await;
            }
            Err(e) if listener::is_per_connection(&e) => {
                debug!(listen = %binding.listen, "{}: accept: {e}", binding.listen);
            }
            Err(e) => {
                let hint = if listener::is_resource_exhaustion(&e) {
                    "out of descriptors or memory; waiting before the next accept"
                } else {
                    "waiting before the next accept"
                };
                binding.accept_errors.borrow_mut().warn(|suppressed| {
                    warn!(listen = %binding.listen, "{}: cannot accept a connection: {e}; \
                        {hint}{suppressed}", binding.listen)
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Closes every connection to a binding that cannot be served, so clients
/// get EOF instead of waiting for a reply that will never come.
async fn refuse(socket: AsyncFd<OwnedFd>) {
    loop {
        let Ok(mut ready) = socket.readable().await else {
            return;
        };
        match ready.try_io(|socket| listener::accept(socket.get_ref().as_fd())) {
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
async fn report_status(shared: Rc<Shared>) {
    let mut ready_sent = false;
    let mut pause = BACKOFF_MIN;
    loop {
        let ready = if ready_sent { "" } else { "READY=1\n" };
        match shared
            .notifier
            .notify(&format!("{ready}STATUS={}", shared.status()))
        {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shared.status_changed.notified() => {}
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
        shared.status_changed.notified().await;
    }
}

impl Shared {
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
        let output = tokio::process::Command::new(client)
            .arg("--help")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let mode = match tokio::time::timeout(PROBE_TIMEOUT, output).await {
            Ok(Ok(output)) => {
                let mut text = output.stdout;
                text.extend_from_slice(&output.stderr);
                ClientMode::from_help_text(&text)
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
        self.mode.set(Some(mode));
        Some(mode)
    }

    /// Runs qrexec-client-vm for one accepted connection.
    async fn start_client(self: &Rc<Self>, binding: &Rc<Binding>, connection: Connection) {
        let Connection { socket, peer } = connection;
        let mode = match self.mode.get() {
            Some(mode) => mode,
            None => match self.probe_client().await {
                Some(mode) => mode,
                None => return, // the connection closes here; the client sees EOF
            },
        };
        let destination = &binding.destination;
        let cannot_run = |e: io::Error| {
            if e.kind() == io::ErrorKind::NotFound && self.options.client_mode.is_none() {
                self.mode.set(None); // probe again once it is back
            }
            self.spawn_errors.borrow_mut().warn(|suppressed| {
                warn!(listen = %binding.listen, peer = %peer,
                    "{}: cannot run {} for {peer}: {e}; connection closed{suppressed}",
                    binding.listen, self.options.client.to_string_lossy())
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
                self.spawn_errors.borrow_mut().warn(|suppressed| {
                    warn!(listen = %binding.listen, peer = %peer,
                        "{}: cannot start the splicer for {peer}: {e}; connection \
                        closed{suppressed}", binding.listen)
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
        binding.live.set(binding.live.get() + 1);
        self.live.set(self.live.get() + 1);
        self.status_changed.notify_one();
        debug!(listen = %binding.listen, qrexec_target = %destination.target,
            qrexec_service = %destination.service, peer = %peer,
            "{}: {peer} connected, running {} {}", binding.listen,
            destination.target, destination.service);
        tokio::task::spawn_local(self.clone().wait_client(binding.clone(), child, peer));
    }

    /// Waits for one client to end, frees its slot and logs how it ended.
    async fn wait_client(
        self: Rc<Self>,
        binding: Rc<Binding>,
        mut child: tokio::process::Child,
        peer: listener::Peer,
    ) {
        let started = Instant::now();
        let status = child.wait().await;
        binding.live.set(binding.live.get() - 1);
        self.live.set(self.live.get() - 1);
        binding.slot_freed.notify_one();
        self.status_changed.notify_one();
        let duration = started.elapsed();
        let destination = &binding.destination;
        let (code, words) = match status {
            Ok(status) => (spawn::exit_code(status), spawn::describe_exit(status)),
            Err(e) => (-1, format!("cannot be waited for: {e}")),
        };
        let message = format!(
            "{} -> {} {}: {peer}, {:.3}s, {words}",
            binding.listen,
            destination.target,
            destination.service,
            duration.as_secs_f64()
        );
        macro_rules! log_end {
            ($level:ident) => {
                $level!(listen = %binding.listen, qrexec_target = %destination.target,
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
