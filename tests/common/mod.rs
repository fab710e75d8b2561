//! Test harness: real systemd, real sockets, the qrexec-client-vm double.
//!
//! * [`Activate`] runs the daemon under `systemd-socket-activate`, which
//!   listens and passes fds exactly as the manager does.
//! * [`UserManager`] runs a real `systemd --user` and `systemd-journald` in a
//!   private mount namespace (recipe: docs/systemd-facts.md),
//!   with the project installed by `make install-client` and overlaid on
//!   /usr inside that namespace only.
//! * [`EchoServer`] stands in for the service in the "service qube".
//!
//! Waiting is always for a condition (a socket that answers, a file that
//! appears, a unit state), polled with a deadline; never a bare sleep.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub mod program;
#[allow(unused_imports)] // each test binary uses some
pub use program::{workspace, CONNECT_NFS, DAEMON, DOUBLE, GENERATOR};

/// Polls `check` every few milliseconds until it returns Some or `limit` passes.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Waits until a TCP connection to 127.0.0.1:`port` is refused (nothing
/// listens there any more). On timeout the panic says what the last attempt
/// got and which processes listen on the port, with their command lines and
/// cgroups: a binding that outlives its removal and a stranger that took the
/// port look the same from the test's side, and a CI log is all there is.
pub fn wait_refused(what: &str, port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(2);
    loop {
        let last = match TcpStream::connect(("127.0.0.1", port)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return,
            Err(e) => format!("error {e}"),
            Ok(stream) => format!("connected from {:?}", stream.local_addr()),
        };
        if Instant::now() > deadline {
            panic!(
                "timed out after {limit:?} waiting for {what}: 127.0.0.1:{port} to refuse; \
                 the last attempt: {last}\n{}",
                listeners_on(port)
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Who listens on a TCP port, for failure reports: `ss`'s rows, then the
/// command line and cgroup of each process named there.
pub fn listeners_on(port: u16) -> String {
    let filter = format!("sport = :{port}");
    let rows = Command::new("ss")
        .args(["-H", "-ltnpe", &filter])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_else(|e| format!("ss: {e}\n"));
    let mut report = format!("listening on port {port} (ss -ltnpe):\n{rows}");
    let mut pids: Vec<&str> = rows
        .split("pid=")
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .collect();
    pids.sort();
    pids.dedup();
    for pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        report.push_str(&format!(
            "pid {pid}: {}\n  cgroup: {}\n",
            String::from_utf8_lossy(&cmdline).replace('\0', " "),
            cgroup.lines().collect::<Vec<_>>().join(" | ")
        ));
    }
    report
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "qrexec-connect-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `script` with `sh` in a private mount namespace of its own; the
/// script sets the namespace up, prints `ready` and then holds it
/// (`exec sleep infinity`). Returns once it is ready: the process whose
/// `/proc/PID/root` and `nsenter -t PID -m` reach the namespace.
pub fn hold_mount_namespace(script: &str) -> Child {
    let mut holder = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("unshare runs (tests need root)");
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "namespace setup failed");
    holder
}

/// A free TCP port on 127.0.0.1 (the kernel's pick, released at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// A TCP server on 127.0.0.1 that echoes each connection until EOF, then
/// half-closes. With `reply_then_close`, it sends a fixed reply and closes
/// at once without reading (a service that ends first).
pub struct EchoServer {
    pub port: u16,
    pub connections: std::sync::Arc<AtomicUsize>,
}

impl EchoServer {
    pub fn start() -> EchoServer {
        Self::start_with(None)
    }

    pub fn start_replying(reply: &'static [u8]) -> EchoServer {
        Self::start_with(Some(reply))
    }

    fn start_with(reply: Option<&'static [u8]>) -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || match reply {
                    Some(reply) => {
                        let _ = stream.write_all(reply);
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                    None => {
                        let mut buf = vec![0; 1 << 16];
                        loop {
                            match stream.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if stream.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = stream.shutdown(Shutdown::Write);
                    }
                });
            }
        });
        EchoServer { port, connections }
    }
}

/// Any stream a test talks through.
pub trait Stream: Read + Write + Send + 'static {
    fn half_close(&self) -> io::Result<()>;
    fn set_timeout(&self, limit: Option<Duration>) -> io::Result<()>;
    fn duplicate(&self) -> Box<dyn Stream>;
}

/// TCP and Unix streams answer the same calls under the same names.
macro_rules! impl_stream {
    ($($kind:ty),*) => {$(
        impl Stream for $kind {
            fn half_close(&self) -> io::Result<()> {
                self.shutdown(Shutdown::Write)
            }
            fn set_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
                self.set_read_timeout(limit)
            }
            fn duplicate(&self) -> Box<dyn Stream> {
                Box::new(self.try_clone().unwrap())
            }
        }
    )*};
}

impl_stream!(TcpStream, UnixStream);

/// Where a test connects: the forms a binding can listen on.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Path(PathBuf),
    Abstract(String),
}

impl Endpoint {
    /// The form `systemd-socket-activate -l` and `ListenStream=` take.
    pub fn listen_arg(&self) -> String {
        match self {
            Endpoint::Tcp(addr) => addr.to_string(),
            Endpoint::Path(path) => path.display().to_string(),
            Endpoint::Abstract(name) => format!("@{name}"),
        }
    }

    pub fn connect(&self) -> io::Result<Box<dyn Stream>> {
        Ok(match self {
            Endpoint::Tcp(addr) => Box::new(TcpStream::connect(addr)?),
            Endpoint::Path(path) => Box::new(UnixStream::connect(path)?),
            Endpoint::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                Box::new(UnixStream::connect_addr(&addr)?)
            }
        })
    }
}

/// Sends `data`, half-closes, and reads everything back until EOF, with
/// writing and reading at the same time (a full buffer must not deadlock).
pub fn round_trip(stream: Box<dyn Stream>, data: Vec<u8>, limit: Duration) -> io::Result<Vec<u8>> {
    stream.set_timeout(Some(limit))?;
    let mut writer = stream.duplicate();
    let sender = std::thread::spawn(move || -> io::Result<()> {
        writer.write_all(&data)?;
        writer.half_close()
    });
    let mut reader = stream;
    let mut received = Vec::new();
    reader.read_to_end(&mut received)?;
    sender.join().unwrap()?;
    Ok(received)
}

/// The qrexec-connect daemon under `systemd-socket-activate`.
pub struct Activate {
    pub child: Child,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    log_changed: std::sync::Arc<std::sync::Condvar>,
}

/// Builder: sockets with their fd names, daemon options, double environment.
pub struct ActivateBuilder {
    listens: Vec<(String, String, bool)>,
    daemon_args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Activate {
    pub fn builder() -> ActivateBuilder {
        ActivateBuilder {
            listens: Vec::new(),
            daemon_args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Waits until the daemon's log contains `needle`; returns the log.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut log = self.log.lock().unwrap();
        loop {
            if log.contains(needle) {
                return log.clone();
            }
            let now = Instant::now();
            if now > deadline {
                panic!("timed out waiting for {needle:?} in the daemon's log:\n{log}");
            }
            log = self
                .log_changed
                .wait_timeout(log, deadline - now)
                .unwrap()
                .0;
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The pid of the daemon (systemd-socket-activate execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Activate {
    /// Starts `command` with its stdout and stderr collected into the log.
    fn capture(mut command: Command) -> Activate {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the daemon's launcher runs");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log_changed = std::sync::Arc::new(std::sync::Condvar::new());
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            let changed = log_changed.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                    changed.notify_all();
                }
            });
        }
        Activate {
            child,
            log,
            log_changed,
        }
    }

    /// Starts the daemon with sockets the test made itself, passed the way
    /// the manager does (fds 3.., LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES):
    /// for kinds systemd-socket-activate cannot mix, such as a datagram
    /// socket beside stream sockets.
    pub fn with_sockets(sockets: Vec<(std::os::fd::OwnedFd, &str)>, args: &[&str]) -> Activate {
        let names: Vec<&str> = sockets.iter().map(|s| s.1).collect();
        let fds = sockets.into_iter().map(|s| s.0).collect();
        Activate::with_raw_fd_names(fds, std::ffi::OsStr::new(&names.join(":")), args)
    }
}

/// The two ways the daemon runs a client: a current client with
/// `--use-stdin-socket`, and an old one (R4.2 before qrexec 4.2.19) whose
/// stdout is a pipe drained by the splicer. Either way the client is the
/// daemon's only child per connection.
#[derive(Debug, Clone, Copy)]
pub enum Client {
    Current,
    Old,
}

pub const CLIENTS: [Client; 2] = [Client::Current, Client::Old];

/// A daemon builder whose double plays the given client.
pub fn activate(client: Client) -> ActivateBuilder {
    let builder = Activate::builder();
    match client {
        Client::Current => builder,
        Client::Old => builder.env("QREXEC_DOUBLE_VERSION", "old"),
    }
}

impl Drop for Activate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ActivateBuilder {
    /// Listens on `endpoint` with `FileDescriptorName=fd_name`.
    pub fn listen(mut self, endpoint: &Endpoint, fd_name: &str) -> Self {
        self.listens
            .push((endpoint.listen_arg(), fd_name.to_owned(), false));
        self
    }

    /// Listens on a datagram socket (which the daemon must refuse).
    pub fn listen_datagram(mut self, endpoint: &Endpoint, fd_name: &str) -> Self {
        self.listens
            .push((endpoint.listen_arg(), fd_name.to_owned(), true));
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.daemon_args.push(arg.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts systemd-socket-activate and waits until every socket listens.
    /// systemd-socket-activate only execs the daemon on the first
    /// connection; the caller's first connect triggers it.
    pub fn start(self) -> Activate {
        let mut command = Command::new("systemd-socket-activate");
        let names: Vec<&str> = self.listens.iter().map(|l| l.1.as_str()).collect();
        for (listen, _, datagram) in &self.listens {
            if *datagram {
                command.arg("--datagram");
            }
            command.arg(format!("--listen={listen}"));
        }
        command.arg(format!("--fdname={}", names.join(":")));
        // systemd-socket-activate passes on only the variables named with -E.
        for (key, value) in &self.env {
            command.arg(format!("--setenv={key}={value}"));
        }
        command.arg(DAEMON);
        if !self
            .daemon_args
            .iter()
            .any(|a| a.starts_with("--qrexec-client-vm"))
        {
            command.arg(format!("--qrexec-client-vm={DOUBLE}"));
        }
        command.args(&self.daemon_args);
        let activate = Activate::capture(command);
        let count = self.listens.len();
        for index in 0..count {
            activate.wait_log(&format!("as {}.", index + 3), Duration::from_secs(10));
        }
        activate
    }
}

/// Runs a command and returns its output, panicking with context on spawn failure.
pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// The open fds of a process (numbers), from /proc.
pub fn open_fds(pid: u32) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    fds
}

/// Every process id, from /proc.
pub fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

/// The direct children of a process, from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&child| parent_of(child) == Some(pid))
        .collect()
}

/// The parent pid of a process, if it exists.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// The state letter of a process (R, S, Z, ...).
pub fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// Every descendant of a process, deepest last.
pub fn descendants_of(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        for child in children_of(p) {
            all.push(child);
            queue.push(child);
        }
    }
    all
}

/// The environment of a process, from /proc.
pub fn environment_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|bytes| {
            bytes
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub mod user_manager;

/// CPU time a process has used so far (user + system, all its threads),
/// from fields 14 and 15 of /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // fields[0] is field 3 (state): utime is field 14, stime field 15.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// The children of a process that are still running (not zombies).
pub fn live_children_of(pid: u32) -> Vec<u32> {
    children_of(pid)
        .into_iter()
        .filter(|&child| state_of(child).is_some_and(|s| s != 'Z'))
        .collect()
}

/// What a daemon holds when no connection is live: its open fd count.
/// Waits until it has no child at all (running or zombie) and its fd count
/// has not changed for 50 ms (a child is reaped a moment before the daemon
/// closes the pidfd it waited on).
pub fn idle_fd_count(daemon: &Activate, limit: Duration) -> usize {
    let pid = daemon.pid();
    let mut last: Option<(usize, Instant)> = None;
    wait_for("the daemon to settle with no child", limit, || {
        let count = open_fds(pid).len();
        if !children_of(pid).is_empty() {
            last = None;
            return None;
        }
        match last {
            Some((before, since)) if before == count => {
                (since.elapsed() >= Duration::from_millis(50)).then_some(count)
            }
            _ => {
                last = Some((count, Instant::now()));
                None
            }
        }
    })
}

/// Waits until a daemon is back to `idle_fds` open fds with no child left,
/// running or zombie; on timeout, panics with what it still holds.
pub fn wait_until_idle(daemon: &Activate, idle_fds: usize, limit: Duration) {
    let pid = daemon.pid();
    let deadline = Instant::now() + limit;
    loop {
        let children = children_of(pid);
        let fds = open_fds(pid);
        if children.is_empty() && fds.len() == idle_fds {
            return;
        }
        if Instant::now() > deadline {
            let states: Vec<String> = children
                .iter()
                .map(|&c| format!("{c}:{}", state_of(c).unwrap_or('?')))
                .collect();
            let links: Vec<String> = fds
                .iter()
                .map(|fd| {
                    let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"));
                    format!(
                        "{fd}->{}",
                        target.map_or("?".into(), |t| t.display().to_string())
                    )
                })
                .collect();
            panic!(
                "after {limit:?} the daemon still holds {} fds (idle: {idle_fds}): {links:?}; \
                 children {states:?}\n{}",
                fds.len(),
                daemon.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Activate {
    /// Like [`Activate::with_sockets`], but `LISTEN_FDNAMES` is given whole
    /// and as raw bytes: fewer names than sockets, names that are not UTF-8,
    /// anything a launcher other than systemd could pass.
    pub fn with_raw_fd_names(
        sockets: Vec<std::os::fd::OwnedFd>,
        fd_names: &std::ffi::OsStr,
        args: &[&str],
    ) -> Activate {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let raw: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
        let mut command = Command::new("sh");
        // $$ is the shell's pid, which exec hands on to the daemon.
        command
            .arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(DAEMON)
            .arg(format!("--qrexec-client-vm={DOUBLE}"))
            .args(args)
            .env("LISTEN_FDS", raw.len().to_string())
            .env("LISTEN_FDNAMES", fd_names)
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET");
        // SAFETY: only dup2 and close, which are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                let base = 100 + raw.len() as i32;
                for (i, &fd) in raw.iter().enumerate() {
                    if libc::dup2(fd, base + i as i32) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                for i in 0..raw.len() as i32 {
                    if libc::dup2(base + i, 3 + i) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(base + i);
                }
                Ok(())
            });
        }
        let activate = Activate::capture(command);
        drop(sockets); // the daemon holds its own copies now
        activate
    }
}
