//! Integration tests of the qrexec-client-vm test double
//! (`tests/doubles/qrexec-client-vm/main.rs`): the double is run as a program with sockets,
//! pipes and real TCP connections as its stdio, against TCP and Unix servers
//! and executables set up by each test.
//!
//! Nothing here sleeps to wait for something: reads block with a timeout,
//! and the one "nothing happens" check (the #9169 hang) bounds its wait.

use std::ffi::OsStr;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

const DOUBLE: &str = env!("CARGO_BIN_EXE_qrexec-client-vm-double");
/// Upper bound for anything that should happen; only reached on failure.
const LONG: Duration = Duration::from_secs(10);
/// How long the #9169 test waits for an EOF that must not come.
const QUIET: Duration = Duration::from_millis(300);

/// Held while writing an executable and while spawning: a child forked by
/// another test thread between our open() and close() of a script would
/// keep it open for writing and make exec fail with ETXTBSY.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

fn spawn_lock() -> MutexGuard<'static, ()> {
    SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "qrexec-double-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.0.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        p
    }

    fn script(&self, rel: &str, body: &str) -> PathBuf {
        let _g = spawn_lock();
        let p = self.write(rel, &format!("#!/bin/sh\n{body}\n"));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A run of the double being prepared.
struct Run {
    cmd: Command,
}

impl Run {
    fn new<I, S>(args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Run::with_program(DOUBLE, args)
    }

    fn with_program<I, S>(program: impl AsRef<OsStr>, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args);
        for v in [
            "QREXEC_DOUBLE_VERSION",
            "QREXEC_DOUBLE_POLICY",
            "QREXEC_DOUBLE_SOURCE",
            "QREXEC_DOUBLE_SERVICES",
            "QREXEC_DOUBLE_LOG",
        ] {
            cmd.env_remove(v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Run { cmd }
    }

    fn env(mut self, k: &str, v: impl AsRef<OsStr>) -> Run {
        self.cmd.env(k, v);
        self
    }

    fn old(self) -> Run {
        self.env("QREXEC_DOUBLE_VERSION", "old")
    }

    fn services(self, dir: &Path) -> Run {
        self.env("QREXEC_DOUBLE_SERVICES", dir)
    }

    fn stdin(mut self, s: impl Into<Stdio>) -> Run {
        self.cmd.stdin(s);
        self
    }

    fn stdout(mut self, s: impl Into<Stdio>) -> Run {
        self.cmd.stdout(s);
        self
    }

    /// Spawns; the Command (and our copies of the child's stdio) is dropped.
    fn spawn(mut self) -> Child {
        let _g = spawn_lock();
        self.cmd.spawn().expect("spawn the double")
    }

    /// Runs with `input` on a stdin pipe, capturing stdout and stderr.
    fn output(self, input: &[u8]) -> Output {
        let mut child = self.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = wait_output(child);
        writer.join().unwrap();
        out
    }
}

/// Waits for the child (at most LONG) and collects its output.
fn wait_output(child: Child) -> Output {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(LONG)
        .expect("the double did not exit in time")
        .unwrap()
}

/// Waits for the child (at most LONG); returns status and stderr.
fn wait_exit(mut child: Child) -> (ExitStatus, String) {
    let mut err = child.stderr.take();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        let _ = tx.send((child.wait(), s));
    });
    let (status, s) = rx
        .recv_timeout(LONG)
        .expect("the double did not exit in time");
    (status.unwrap(), s)
}

fn stdio<T: Into<OwnedFd>>(s: T) -> Stdio {
    Stdio::from(s.into())
}

/// Reads until EOF; fails if that takes longer than LONG.
fn read_to_eof(r: &mut impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).expect("EOF in time");
    v
}

fn read_exactly(r: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    r.read_exact(&mut v).expect("data in time");
    v
}

/// A TCP server on 127.0.0.1 that serves one connection with `f` and
/// sends what `f` returns on the channel.
fn tcp_server<T: Send + 'static>(
    f: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> (u16, mpsc::Receiver<T>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(LONG)).unwrap();
        let _ = tx.send(f(s));
    });
    (port, rx)
}

/// Echoes until EOF, then sends `tail`, then closes its write side.
fn echo_then(tail: &'static [u8]) -> impl FnOnce(TcpStream) -> usize {
    move |mut s| {
        let mut buf = vec![0; 64 * 1024];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).expect("echo read");
            if n == 0 {
                break;
            }
            total += n;
            s.write_all(&buf[..n]).unwrap();
        }
        s.write_all(tail).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        total
    }
}

/// Sends `msg`, closes its write side, then returns all it receives.
fn greet_then_read(msg: &'static [u8]) -> impl FnOnce(TcpStream) -> Vec<u8> {
    move |mut s| {
        s.write_all(msg).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        read_to_eof(&mut s)
    }
}

/// A connected TCP pair: (our end, the end given to the double).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (theirs, _) = l.accept().unwrap();
    ours.set_read_timeout(Some(LONG)).unwrap();
    (ours, theirs)
}

fn unix_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_read_timeout(Some(LONG)).unwrap();
    (a, b)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Sends 1 MiB through the double and an echo server, reads it all back.
fn one_mib_round_trip(args: &[&str], nonblocking: bool, same_tcp_socket: bool) {
    let (port, served) = tcp_server(echo_then(b""));
    let svc = format!("qubes.ConnectTCP+{port}");
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--", "server", &svc]);
    let run = Run::new(&full);
    let (ours, child) = if same_tcp_socket {
        let (ours, theirs) = tcp_pair();
        theirs.set_nonblocking(nonblocking).unwrap();
        let out = theirs.try_clone().unwrap();
        let child = run.stdin(stdio(theirs)).stdout(stdio(out)).spawn();
        (Box::new(ours) as Box<dyn Conn>, child)
    } else {
        let (ours, theirs) = unix_pair();
        theirs.set_nonblocking(nonblocking).unwrap();
        (
            Box::new(ours) as Box<dyn Conn>,
            run.stdin(stdio(theirs)).spawn(),
        )
    };
    let data = pattern(1 << 20, 0x5a);
    let mut w = ours.clone_box();
    let sent = data.clone();
    let writer = thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shut_write();
    });
    let mut r = ours;
    let got = read_to_eof(&mut r);
    writer.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "data corrupted");
    assert_eq!(served.recv_timeout(LONG).unwrap(), 1 << 20);
    let (status, err) = wait_exit(child);
    assert_eq!(status.code(), Some(0), "stderr: {err}");
}

/// Our end of a local connection, TCP or Unix.
trait Conn: Read + Write + Send {
    fn clone_box(&self) -> Box<dyn Conn>;
    fn shut_write(&self);
}

impl Conn for TcpStream {
    fn clone_box(&self) -> Box<dyn Conn> {
        Box::new(self.try_clone().unwrap())
    }
    fn shut_write(&self) {
        self.shutdown(Shutdown::Write).unwrap();
    }
}

impl Conn for UnixStream {
    fn clone_box(&self) -> Box<dyn Conn> {
        Box::new(self.try_clone().unwrap())
    }
    fn shut_write(&self) {
        self.shutdown(Shutdown::Write).unwrap();
    }
}

#[test]
fn forwards_one_mib_each_way_with_stdin_socket() {
    one_mib_round_trip(&["--use-stdin-socket"], false, false);
}

#[test]
fn forwards_one_mib_each_way_over_tcp_stdio_nonblocking() {
    // Same TCP socket as stdin and stdout, new mode: qubes.ConnectTCP's
    // exit-on-service-eof ends the call, so our end sees EOF.
    one_mib_round_trip(&["--no-filter-escape-chars-stdout"], true, true);
}

#[test]
fn forwards_one_mib_each_way_old_mode_pipes() {
    let (port, served) = tcp_server(echo_then(b""));
    let data = pattern(1 << 20, 0x33);
    let out = Run::new(["--", "server", &format!("qubes.ConnectTCP+{port}")])
        .old()
        .output(&data);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout == data);
    assert_eq!(served.recv_timeout(LONG).unwrap(), 1 << 20);
}

#[test]
fn half_close_both_ways_with_stdin_socket() {
    let dir = TempDir::new();

    // The service ends first; the client still gets to send afterwards.
    let (port, received) = tcp_server(greet_then_read(b"hello"));
    symlink(
        format!("/dev/tcp/127.0.0.1/{port}"),
        dir.path().join("test.First"),
    )
    .unwrap();
    let (mut ours, theirs) = unix_pair();
    let child = Run::new(["--use-stdin-socket", "vm", "test.First"])
        .services(dir.path())
        .stdin(stdio(theirs))
        .spawn();
    assert_eq!(read_to_eof(&mut ours), b"hello");
    ours.write_all(b"after the service's EOF").unwrap();
    ours.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        received.recv_timeout(LONG).unwrap(),
        b"after the service's EOF"
    );
    let (status, err) = wait_exit(child);
    assert_eq!(status.code(), Some(0), "{err}");

    // The client ends first; the service still gets to answer afterwards.
    let (port, served) = tcp_server(echo_then(b" and more after EOF"));
    symlink("/dev/tcp/127.0.0.1", dir.path().join("test.Second")).unwrap();
    let (mut ours, theirs) = unix_pair();
    let child = Run::new(["--use-stdin-socket", "vm", &format!("test.Second+{port}")])
        .services(dir.path())
        .stdin(stdio(theirs))
        .spawn();
    ours.write_all(b"ping").unwrap();
    ours.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut ours), b"ping and more after EOF");
    assert_eq!(served.recv_timeout(LONG).unwrap(), 4);
    let (status, err) = wait_exit(child);
    assert_eq!(status.code(), Some(0), "{err}");
}

#[test]
fn exit_on_service_eof_ends_the_call_in_new_mode_only() {
    // qubes.ConnectTCP (built in) has exit-on-service-eof: the call ends when
    // the service closes, even though our end never closed its side.
    let (port, _received) = tcp_server(greet_then_read(b"HTTP/1.0 200 OK\r\n\r\n"));
    let (mut ours, theirs) = tcp_pair();
    let out = theirs.try_clone().unwrap();
    let child = Run::new(["server", &format!("qubes.ConnectTCP+{port}")])
        .stdin(stdio(theirs))
        .stdout(stdio(out))
        .spawn();
    assert_eq!(read_to_eof(&mut ours), b"HTTP/1.0 200 OK\r\n\r\n");
    let (status, err) = wait_exit(child);
    assert_eq!(status.code(), Some(0), "{err}");
}

#[test]
fn old_mode_reproduces_the_eof_hang_on_a_shared_socket() {
    // qubes-issues #9169: stdin and stdout are one TCP socket, the service
    // closes first; the old client closes fd 1 only, so no FIN is sent.
    let (port, received) = tcp_server(greet_then_read(b"bye"));
    let (mut ours, theirs) = tcp_pair();
    let out = theirs.try_clone().unwrap();
    let mut child = Run::new(["server", &format!("qubes.ConnectTCP+{port}")])
        .old()
        .stdin(stdio(theirs))
        .stdout(stdio(out))
        .spawn();
    assert_eq!(read_exactly(&mut ours, 3), b"bye");
    ours.set_read_timeout(Some(QUIET)).unwrap();
    let mut buf = [0u8; 16];
    match ours.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected no EOF while the call lives, got {other:?}"),
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the call must still live"
    );

    // Our side closes its write half: the call ends and the EOF arrives.
    ours.set_read_timeout(Some(LONG)).unwrap();
    ours.write_all(b"thanks").unwrap();
    ours.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut ours), b"");
    assert_eq!(received.recv_timeout(LONG).unwrap(), b"thanks");
    let (status, err) = wait_exit(child);
    assert_eq!(status.code(), Some(0), "{err}");
}

#[test]
fn old_mode_with_a_pipe_as_stdout_propagates_eof() {
    let (port, received) = tcp_server(greet_then_read(b"bye"));
    let (ours, theirs) = unix_pair();
    let mut child = Run::new(["server", &format!("qubes.ConnectTCP+{port}")])
        .old()
        .stdin(stdio(theirs))
        .stdout(Stdio::piped())
        .spawn();
    let mut out = child.stdout.take().unwrap();
    // The pipe ends as soon as the service does, while the call goes on.
    assert_eq!(read_to_eof(&mut out), b"bye");
    assert!(child.try_wait().unwrap().is_none(), "fd 0 still open");
    (&ours).write_all(b"late").unwrap();
    ours.shutdown(Shutdown::Write).unwrap();
    assert_eq!(received.recv_timeout(LONG).unwrap(), b"late");
    let (status, err) = wait_exit(child);
    assert_eq!(status.code(), Some(0), "{err}");
}

#[test]
fn exit_on_client_eof_is_honoured_in_new_mode_only() {
    let dir = TempDir::new();
    let sock = dir.path().join("test.Sink");
    let l = UnixListener::bind(&sock).unwrap();
    dir.write(
        "rpc-config/test.Sink",
        "skip-service-descriptor=true\nexit-on-client-eof=true\n",
    );
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // Two calls; the service never closes on its own.
        let mut held = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            tx.send(b).unwrap();
            held.push(s);
        }
        // Keep both connections open until the test is over.
        let _ = tx.send(*b"done!");
        thread::park();
    });

    let out = Run::new(["vm", "test.Sink"])
        .services(dir.path())
        .output(b"first");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(&rx.recv_timeout(LONG).unwrap(), b"first");

    // Old mode ignores the flag: the call waits for the service.
    let (ours, theirs) = unix_pair();
    let mut child = Run::new(["vm", "test.Sink"])
        .old()
        .services(dir.path())
        .stdin(stdio(theirs))
        .spawn();
    (&ours).write_all(b"other").unwrap();
    ours.shutdown(Shutdown::Write).unwrap();
    assert_eq!(&rx.recv_timeout(LONG).unwrap(), b"other");
    assert_eq!(&rx.recv_timeout(LONG).unwrap(), b"done!");
    let deadline = Instant::now() + QUIET;
    while Instant::now() < deadline {
        assert!(child.try_wait().unwrap().is_none(), "old mode exited");
        thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

fn write_policy(dir: &TempDir, text: &str) -> PathBuf {
    dir.write("policy", text)
}

#[test]
fn policy_deny_and_no_match_refuse_with_126() {
    let dir = TempDir::new();
    let policy = write_policy(
        &dir,
        "# comment\n\
         qubes.ConnectTCP +22 client ssh-server allow\n\
         qubes.ConnectTCP * @anyvm @anyvm deny\n",
    );
    let log = dir.path().join("log");
    for (target, service) in [
        ("ssh-server", "qubes.ConnectTCP+23"), // explicit deny
        ("@default", "qubes.Other"),           // no matching line
        ("bad name!", "qubes.ConnectTCP+22"),  // invalid target
        ("ssh-server", "+qubes.ConnectTCP"),   // invalid service
    ] {
        let start = Instant::now();
        let out = Run::new(["--", target, service])
            .env("QREXEC_DOUBLE_POLICY", &policy)
            .env("QREXEC_DOUBLE_LOG", &log)
            .output(b"");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(out.status.code(), Some(126), "{target} {service}");
        assert_eq!(out.stderr, b"Request refused\n");
        assert!(out.stdout.is_empty());
    }
    let log = fs::read_to_string(&log).unwrap();
    assert_eq!(log.lines().count(), 4);
    assert!(log
        .lines()
        .all(|l| l.starts_with("pid=") && l.contains("] exit=126 note=\"")));
    assert!(log.contains(r#"argv=["--","ssh-server","qubes.ConnectTCP+23"]"#));
}

#[test]
fn policy_allow_with_target_redirect_and_per_qube_services() {
    let dir = TempDir::new();
    let policy = write_policy(
        &dir,
        "test.Where +redir client @default allow target=qube-b\n\
         test.Where * client @anyvm allow\n\
         * * @anyvm @anyvm deny\n",
    );
    let svc = dir.path().join("services");
    dir.script("services/qube-b/test.Where", "echo qube-b");
    dir.script("services/default/test.Where", "echo default");
    dir.script("services/test.Where", "echo generic");
    let call = |target: &str, service: &str, source: Option<&str>| {
        let mut run = Run::new([target, service])
            .env("QREXEC_DOUBLE_POLICY", &policy)
            .services(&svc);
        if let Some(s) = source {
            run = run.env("QREXEC_DOUBLE_SOURCE", s);
        }
        run.output(b"")
    };
    let out = call("@default", "test.Where+redir", None);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"qube-b\n");
    let out = call("$default", "test.Where+redir", None);
    assert_eq!(out.stdout, b"qube-b\n");
    let out = call("", "test.Where+x", None);
    assert_eq!(out.stdout, b"default\n");
    let out = call("qube-c", "test.Where+x", None);
    assert_eq!(out.stdout, b"generic\n");
    let out = call("qube-b", "test.Where+x", Some("intruder"));
    assert_eq!(out.status.code(), Some(126));
    assert_eq!(out.stderr, b"Request refused\n");
    // -s overrides QREXEC_DOUBLE_SOURCE (new mode only).
    let out = Run::new(["-s", "client", "qube-b", "test.Where"])
        .env("QREXEC_DOUBLE_POLICY", &policy)
        .env("QREXEC_DOUBLE_SOURCE", "intruder")
        .services(&svc)
        .output(b"");
    assert_eq!(out.stdout, b"qube-b\n");
}

/// Issue 20: a call to `@dispvm:TEMPLATE` (or `$dispvm:`) is allowed by a
/// rule naming that template and served by what the template has (in
/// Qubes, a new disposable of it); a rule for another template does not
/// match, and `@dispvm/TEMPLATE`, qrexec-connect's fd-name spelling, is
/// no target at all.
#[test]
fn a_disposable_target_is_matched_by_name_and_served_by_its_template() {
    let dir = TempDir::new();
    let policy = write_policy(
        &dir,
        "test.Where + client @dispvm:web-dvm allow\n\
         test.Where +redir client @dispvm allow target=@dispvm:print-dvm\n\
         * * @anyvm @anyvm deny\n",
    );
    let svc = dir.path().join("services");
    dir.script("services/web-dvm/test.Where", "echo web-dvm");
    dir.script("services/print-dvm/test.Where", "echo print-dvm");
    dir.script("services/test.Where", "echo generic");
    let call = |target: &str, service: &str| {
        Run::new(["--", target, service])
            .env("QREXEC_DOUBLE_POLICY", &policy)
            .services(&svc)
            .output(b"")
    };
    for target in ["@dispvm:web-dvm", "$dispvm:web-dvm"] {
        let out = call(target, "test.Where");
        assert_eq!(out.status.code(), Some(0), "{target}");
        assert_eq!(out.stdout, b"web-dvm\n", "{target}");
    }
    let out = call("@dispvm", "test.Where+redir");
    assert_eq!(out.stdout, b"print-dvm\n");
    for target in [
        "@dispvm:other-dvm",
        "@dispvm/web-dvm",
        "$dispvm/web-dvm",
        "@dispvm:",
    ] {
        let out = call(target, "test.Where");
        assert_eq!(out.status.code(), Some(126), "{target}");
        assert_eq!(out.stderr, b"Request refused\n", "{target}");
    }
}

#[test]
fn unknown_service_exits_127_silently() {
    let dir = TempDir::new();
    let out = Run::new(["vm", "test.Missing+x"])
        .services(dir.path())
        .output(b"");
    assert_eq!(out.status.code(), Some(127));
    assert!(out.stderr.is_empty() && out.stdout.is_empty());
}

#[test]
fn closed_port_exits_125_silently() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = Run::new(["vm", &format!("qubes.ConnectTCP+{port}")]).output(b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(out.stderr.is_empty() && out.stdout.is_empty());
    let out = Run::new(["vm", "qubes.ConnectTCP+notaport"]).output(b"");
    assert_eq!(out.status.code(), Some(125));
}

#[test]
fn bad_command_lines_exit_2_with_usage() {
    let cases: &[(bool, &[&str])] = &[
        (false, &["--bogus", "vm", "svc"]),
        (true, &["--bogus", "vm", "svc"]),
        (false, &["-x", "vm", "svc"]),
        (false, &["vm"]),
        (true, &[]),
        (false, &["--prefix-data"]),
        (false, &["-p", "a", "-p", "b", "vm", "svc"]),
        (true, &["--use-stdin-socket", "vm", "svc"]),
        (true, &["-s", "client", "vm", "svc"]),
        (true, &["--source-qube=client", "vm", "svc"]),
    ];
    for (old, args) in cases {
        let mut run = Run::new(*args);
        if *old {
            run = run.old();
        }
        let out = run.output(b"");
        assert_eq!(out.status.code(), Some(2), "{args:?} old={old}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("usage: "), "{args:?}: {err}");
    }
    let out = Run::new(["--buffer-size=12k", "vm", "svc"]).output(b"");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn help_lists_use_stdin_socket_only_in_new_mode() {
    let dir = TempDir::new();
    let old_link = dir.path().join("qrexec-client-vm-old");
    symlink(DOUBLE, &old_link).unwrap();
    for (run, new) in [
        (Run::new(["--help"]), true),
        (Run::new(["-h"]), true),
        (Run::new(["--help"]).old(), false),
        (Run::with_program(&old_link, ["--help"]), false),
    ] {
        let out = run.output(b"");
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("usage: "));
        assert!(text.contains("--prefix-data"));
        assert_eq!(text.contains("--use-stdin-socket"), new, "{text}");
        assert!(out.stderr.is_empty());
    }
    let out = Run::with_program(&old_link, ["--use-stdin-socket", "vm", "svc"]).output(b"");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn use_stdin_socket_needs_a_stream_socket_and_no_local_program() {
    let (dgram, _keep) = UnixDatagram::pair().unwrap();
    let (_ours, theirs) = unix_pair();
    let runs = [
        Run::new(["--use-stdin-socket", "vm", "qubes.ConnectTCP+1"]).stdin(Stdio::null()),
        Run::new(["--use-stdin-socket", "vm", "qubes.ConnectTCP+1"]).stdin(Stdio::piped()),
        Run::new(["--use-stdin-socket", "vm", "qubes.ConnectTCP+1"]).stdin(stdio(dgram)),
        Run::new(["--use-stdin-socket", "vm", "qubes.ConnectTCP+1", "/bin/cat"])
            .stdin(stdio(theirs)),
    ];
    for run in runs {
        let (status, err) = wait_exit(run.spawn());
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(!err.is_empty());
    }
    // A LOCAL_PROGRAM without the flag is allowed by the real client but
    // not implemented by the double.
    let out = Run::new(["vm", "qubes.ConnectTCP+1", "/bin/cat"]).output(b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not supported"));
}

/// A Unix socket service: returns everything the service received.
fn unix_service(path: &Path) -> mpsc::Receiver<Vec<u8>> {
    let l = UnixListener::bind(path).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(LONG)).unwrap();
        let got = read_to_eof(&mut s);
        s.write_all(b"ok").unwrap();
        let _ = tx.send(got);
    });
    rx
}

#[test]
fn unix_socket_service_gets_the_descriptor_unless_skipped() {
    let dir = TempDir::new();
    let svc = dir.path().join("svc");
    fs::create_dir(&svc).unwrap();
    let with = unix_service(&svc.join("test.Sock"));
    let elsewhere = dir.path().join("elsewhere.sock");
    let linked = unix_service(&elsewhere);
    symlink(&elsewhere, svc.join("test.Linked+arg2")).unwrap();
    let without = unix_service(&svc.join("test.Raw"));
    dir.write(
        "svc/rpc-config/test.Raw",
        "skip-service-descriptor = true\n",
    );

    let out = Run::new(["vm", "test.Sock+arg1"])
        .services(&svc)
        .env("QREXEC_DOUBLE_SOURCE", "src-qube")
        .output(b"hello");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"ok");
    assert_eq!(
        with.recv_timeout(LONG).unwrap(),
        b"test.Sock+arg1 src-qube\0hello"
    );

    let out = Run::new(["vm", "test.Linked+arg2"])
        .services(&svc)
        .output(b"x");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        linked.recv_timeout(LONG).unwrap(),
        b"test.Linked+arg2 client\0x"
    );

    let out = Run::new(["vm", "test.Raw"]).services(&svc).output(b"hello");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(without.recv_timeout(LONG).unwrap(), b"hello");
}

#[test]
fn executable_service_status_environment_and_signal() {
    let dir = TempDir::new();
    dir.script(
        "test.Exec",
        r#"printf '%s|%s|%s|' "$QREXEC_SERVICE_ARGUMENT" "$QREXEC_REMOTE_DOMAIN" "$1"; cat; exit 7"#,
    );
    dir.script("test.Killed", "kill -TERM $$");
    let out = Run::new(["vm", "test.Exec+arg1"])
        .services(dir.path())
        .output(b"data");
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(out.stdout, b"arg1|client|arg1|data");
    let out = Run::new(["vm", "test.Killed"])
        .services(dir.path())
        .output(b"");
    assert_eq!(out.status.code(), Some(128 + 15));
}

#[test]
fn prefix_data_goes_first_in_both_modes() {
    let dir = TempDir::new();
    dir.script("test.Cat", "cat");
    for old in [false, true] {
        let mut run = Run::new(["-p", "PREFIX:", "vm", "test.Cat"]).services(dir.path());
        if old {
            run = run.old();
        }
        let out = run.output(b"rest");
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(out.stdout, b"PREFIX:rest");
    }
    let (port, served) = tcp_server(echo_then(b""));
    let out = Run::new([
        "--prefix-data=GET / HTTP/1.0\r\n",
        "vm",
        &format!("qubes.ConnectTCP+{port}"),
    ])
    .output(b"\r\n");
    assert_eq!(out.stdout, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(served.recv_timeout(LONG).unwrap(), 18);
}

#[test]
fn log_records_argv_and_exit_status() {
    let dir = TempDir::new();
    let log = dir.path().join("calls.log");
    let (port, _served) = tcp_server(echo_then(b""));
    let svc = format!("qubes.ConnectTCP+{port}");
    let (mut ours, theirs) = unix_pair();
    let child = Run::new([
        "--no-filter-escape-chars-stdout",
        "--use-stdin-socket",
        "--",
        "ssh-server",
        &svc,
    ])
    .env("QREXEC_DOUBLE_LOG", &log)
    .stdin(stdio(theirs))
    .spawn();
    ours.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut ours), b"");
    let (status, _) = wait_exit(child);
    assert_eq!(status.code(), Some(0));
    let out = Run::new(["--help"])
        .env("QREXEC_DOUBLE_LOG", &log)
        .output(b"");
    assert_eq!(out.status.code(), Some(0));

    let text = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let expected = format!(
        r#"argv=["--no-filter-escape-chars-stdout","--use-stdin-socket","--","ssh-server","{svc}"] exit=0"#
    );
    assert!(lines[0].starts_with("pid="), "{}", lines[0]);
    assert!(lines[0].ends_with(&expected), "{}", lines[0]);
    assert!(
        lines[1].ends_with(r#"argv=["--help"] exit=0"#),
        "{}",
        lines[1]
    );
}
