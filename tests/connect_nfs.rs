//! `qubes.ConnectNFS` (the `qrexec-connect-nfs` program) run the way qrexec
//! runs it: argument in `QREXEC_SERVICE_ARGUMENT`, the connection on
//! stdin/stdout (two pipes, or one socket for both), and a stand-in NFS
//! server on a port picked at run time, passed in `QREXEC_CONNECT_NFS_PORT`.
//!
//! Linux routes all of 127.0.0.0/8 to lo, so 127.0.1.1 and 127.0.1.2 can be
//! bound without any setup; the tests rely on that, as the README does.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

#[path = "common/program.rs"]
#[allow(dead_code)]
mod program;

use program::CONNECT_NFS as PROGRAM;
/// Upper bound for anything a test waits on; only reached when a test fails.
const PATIENCE: Duration = Duration::from_secs(30);
const MIB: usize = 1024 * 1024;

/// The stand-in NFS server: a listener on 127.0.0.1, port chosen by the kernel.
struct Server {
    listener: TcpListener,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the test server");
        Server { listener }
    }

    fn port(&self) -> u16 {
        self.listener.local_addr().unwrap().port()
    }

    /// The next connection; the listener was ready before the program
    /// started, so this only waits for the program to connect.
    fn accept(&self) -> (TcpStream, SocketAddr) {
        let (stream, peer) = self.listener.accept().expect("accept");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_write_timeout(Some(PATIENCE)).unwrap();
        (stream, peer)
    }

    /// True when nobody has connected (checked after the program exited).
    fn saw_no_connection(&self) -> bool {
        self.listener.set_nonblocking(true).unwrap();
        let none =
            matches!(self.listener.accept(), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        self.listener.set_nonblocking(false).unwrap();
        none
    }
}

/// How the program's stdin and stdout are connected.
enum Wiring {
    /// Two pipes, as qrexec does for executable services (it uses two
    /// socketpairs; a pipe is the stricter case: it cannot be shut down).
    Pipes,
    /// One socket as both stdin and stdout, as socket activation would do.
    OneSocket,
}

/// The program, started with `argument` (None: variable unset).
struct Run {
    child: Child,
    /// Dropping it disarms the watchdog.
    _watchdog: mpsc::Sender<()>,
}

/// Kills the program if it is still running after [`PATIENCE`], so a bug
/// that leaves a pipe open fails the test (EOF, then a mismatch) instead of
/// hanging it. It signals through a pidfd, which names this process even
/// after it has been reaped, so it can never hit a reused pid.
fn watchdog(child: &Child) -> mpsc::Sender<()> {
    // SAFETY: pidfd_open(2) on our own, not yet reaped, child.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    assert!(fd >= 0, "pidfd_open: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let (arm, armed) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = armed.recv_timeout(PATIENCE) {
            // SAFETY: pidfd_send_signal(2) with a valid pidfd and no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
    });
    arm
}

impl Run {
    fn start(argument: Option<&str>, port: u16, wiring: Wiring) -> (Run, Ends) {
        let mut command = Command::new(PROGRAM);
        command
            .env_remove("QREXEC_SERVICE_ARGUMENT")
            .env_remove("QREXEC_REMOTE_DOMAIN")
            .env("QREXEC_CONNECT_NFS_PORT", port.to_string())
            .stderr(Stdio::piped());
        if let Some(argument) = argument {
            command.env("QREXEC_SERVICE_ARGUMENT", argument);
        }
        let ours = match wiring {
            Wiring::Pipes => {
                command.stdin(Stdio::piped()).stdout(Stdio::piped());
                None
            }
            Wiring::OneSocket => {
                let (ours, theirs) = UnixStream::pair().unwrap();
                let theirs_too = theirs.try_clone().unwrap();
                command
                    .stdin(Stdio::from(OwnedFd::from(theirs)))
                    .stdout(Stdio::from(OwnedFd::from(theirs_too)));
                Some(ours)
            }
        };
        let mut child = command.spawn().expect("start qrexec-connect-nfs");
        // The Command holds the child's copies of the socket: drop it so the
        // only holder of the far end is the child.
        drop(command);
        let ends = match ours {
            Some(socket) => Ends::Socket(socket),
            None => Ends::Pipes {
                stdin: Some(child.stdin.take().unwrap()),
                stdout: Some(child.stdout.take().unwrap()),
            },
        };
        let _watchdog = watchdog(&child);
        (Run { child, _watchdog }, ends)
    }

    /// Waits for the exit (the watchdog bounds it); returns the status and
    /// stderr. A run the watchdog had to kill fails here.
    fn finish(self) -> (ExitStatus, String) {
        let output = self.child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.code().is_some(),
            "qrexec-connect-nfs killed (hung for {PATIENCE:?}?): {:?}, stderr: {stderr}",
            output.status
        );
        (output.status, stderr)
    }
}

/// The test's ends of the program's stdin and stdout.
enum Ends {
    Pipes {
        stdin: Option<ChildStdin>,
        stdout: Option<ChildStdout>,
    },
    Socket(UnixStream),
}

impl Ends {
    /// Sends everything, then signals EOF on the program's stdin.
    fn send_and_close(&mut self, data: &[u8]) {
        match self {
            Ends::Pipes { stdin, .. } => {
                let mut pipe = stdin.take().expect("stdin already closed");
                pipe.write_all(data).unwrap();
            }
            Ends::Socket(socket) => {
                socket.write_all(data).unwrap();
                socket.shutdown(Shutdown::Write).unwrap();
            }
        }
    }

    /// Reads the program's stdout until EOF.
    fn receive_to_eof(&mut self) -> Vec<u8> {
        let mut data = Vec::new();
        match self {
            Ends::Pipes { stdout, .. } => {
                let mut pipe = stdout.take().expect("stdout already read");
                pipe.read_to_end(&mut data).expect("read stdout");
            }
            Ends::Socket(socket) => {
                socket.set_read_timeout(Some(PATIENCE)).unwrap();
                socket
                    .read_to_end(&mut data)
                    .expect("client side: no EOF on stdout in time");
            }
        }
        data
    }

    /// A writer for the program's stdin that can move to another thread.
    fn stdin_writer(&mut self) -> Box<dyn Write + Send> {
        match self {
            Ends::Pipes { stdin, .. } => Box::new(stdin.take().expect("stdin already closed")),
            Ends::Socket(socket) => Box::new(HalfClosing(socket.try_clone().unwrap())),
        }
    }
}

/// A socket writer that shuts down its sending side when dropped.
struct HalfClosing(UnixStream);

impl Write for HalfClosing {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for HalfClosing {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Write);
    }
}

/// Deterministic bytes that differ per seed (xorshift), so a lost, doubled
/// or reordered chunk shows up as a mismatch.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut data = Vec::new();
    stream
        .read_to_end(&mut data)
        .expect("server side: no EOF from qrexec-connect-nfs in time");
    data
}

fn assert_clean_exit((status, stderr): (ExitStatus, String)) {
    assert!(status.success(), "status {status:?}, stderr: {stderr}");
    assert_eq!(stderr, "", "a clean run prints nothing");
}

// ---------------------------------------------------------------------------
// The source address
// ---------------------------------------------------------------------------

#[test]
fn the_server_sees_the_address_given_as_argument() {
    for source in ["127.0.1.1", "127.0.1.2", "127.0.0.2"] {
        let server = Server::start();
        let (run, mut ends) = Run::start(Some(source), server.port(), Wiring::Pipes);
        let (mut stream, peer) = server.accept();
        let expected: Ipv4Addr = source.parse().unwrap();
        assert_eq!(peer.ip(), IpAddr::V4(expected), "argument {source}");
        ends.send_and_close(b"");
        assert_eq!(read_all(&mut stream), b"");
        drop(stream);
        assert_eq!(ends.receive_to_eof(), b"");
        assert_clean_exit(run.finish());
    }
}

// ---------------------------------------------------------------------------
// Bytes and half-close, both orders, both wirings
// ---------------------------------------------------------------------------

/// The client sends 1 MiB and closes its side first. The server must see EOF
/// (stdin EOF became shutdown(SHUT_WR)) while it can still answer; its
/// 1 MiB answer must reach the client, then EOF.
fn client_closes_first(wiring: Wiring) {
    let up = pattern(1, MIB);
    let down = pattern(2, MIB);
    let server = Server::start();
    let (run, mut ends) = Run::start(Some("127.0.1.1"), server.port(), wiring);
    let mut stdin = ends.stdin_writer();
    let up_sent = up.clone();
    let writer = thread::spawn(move || {
        stdin.write_all(&up_sent).unwrap();
        // Dropping the writer closes the program's stdin.
    });
    let (mut stream, _) = server.accept();
    let down_sent = down.clone();
    let server_side = thread::spawn(move || {
        let received = read_all(&mut stream);
        // EOF seen, connection still open the other way: answer now.
        stream.write_all(&down_sent).unwrap();
        received
    });
    let received_by_client = ends.receive_to_eof();
    writer.join().unwrap();
    let received_by_server = server_side.join().unwrap();
    assert!(received_by_server == up, "client-to-server bytes differ");
    assert!(received_by_client == down, "server-to-client bytes differ");
    assert_clean_exit(run.finish());
}

/// The server sends 1 MiB and shuts down its sending side first. The client
/// must see EOF on stdout while its stdin is still open, and what it sends
/// afterwards must still reach the server.
fn server_closes_first(wiring: Wiring) {
    let up = pattern(3, MIB);
    let down = pattern(4, MIB);
    let server = Server::start();
    let (run, mut ends) = Run::start(Some("127.0.1.2"), server.port(), wiring);
    let (mut stream, _) = server.accept();
    let down_sent = down.clone();
    let server_side = thread::spawn(move || {
        stream.write_all(&down_sent).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        read_all(&mut stream)
    });
    // Nothing has been written to stdin yet: EOF here can only come from
    // the server's shutdown.
    let received_by_client = ends.receive_to_eof();
    assert!(received_by_client == down, "server-to-client bytes differ");
    ends.send_and_close(&up);
    let received_by_server = server_side.join().unwrap();
    assert!(received_by_server == up, "client-to-server bytes differ");
    assert_clean_exit(run.finish());
}

#[test]
fn pipes_client_closes_first() {
    client_closes_first(Wiring::Pipes);
}

#[test]
fn pipes_server_closes_first() {
    server_closes_first(Wiring::Pipes);
}

#[test]
fn one_socket_client_closes_first() {
    client_closes_first(Wiring::OneSocket);
}

/// The qubes-issues #9169 case: stdout is the same socket as stdin, so
/// closing fd 1 alone would not reach the client.
#[test]
fn one_socket_server_closes_first() {
    server_closes_first(Wiring::OneSocket);
}

// ---------------------------------------------------------------------------
// Peers that go away
// ---------------------------------------------------------------------------

/// The client stops reading (EPIPE on stdout) while the server still sends:
/// the program ends quietly once the client also closes stdin.
#[test]
fn a_client_that_stops_reading_ends_the_call_quietly() {
    let server = Server::start();
    let (run, mut ends) = Run::start(Some("127.0.1.1"), server.port(), Wiring::Pipes);
    let (mut stream, _) = server.accept();
    let server_side = thread::spawn(move || {
        let chunk = pattern(5, 64 * 1024);
        // Keeps sending until the program is gone; an error ends it.
        while stream.write_all(&chunk).is_ok() {}
    });
    if let Ends::Pipes { stdout, .. } = &mut ends {
        drop(stdout.take());
    }
    ends.send_and_close(b"last words");
    assert_clean_exit(run.finish());
    server_side.join().unwrap();
}

/// The server resets the connection: the client gets EOF on stdout, and
/// the program ends quietly once the client closes stdin.
#[test]
fn a_server_reset_ends_the_call_quietly() {
    let server = Server::start();
    let (run, mut ends) = Run::start(Some("127.0.1.1"), server.port(), Wiring::Pipes);
    let (stream, _) = server.accept();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER with a valid `linger` struct and its size; closing
    // with a zero linger time sends RST instead of FIN.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
    drop(stream);
    assert_eq!(ends.receive_to_eof(), b"");
    ends.send_and_close(b"anyone there?");
    assert_clean_exit(run.finish());
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// Runs with a bad argument; returns stderr after checking the exit code
/// and that no connection was attempted.
fn refused(argument: Option<&str>) -> String {
    let server = Server::start();
    let (run, _ends) = Run::start(argument, server.port(), Wiring::Pipes);
    let (status, stderr) = run.finish();
    assert_eq!(
        status.code(),
        Some(2),
        "argument {argument:?}, stderr: {stderr}"
    );
    assert!(server.saw_no_connection(), "argument {argument:?} was used");
    // Every refusal says how to call the service and what policy allows it.
    assert!(stderr.contains("qubes.ConnectNFS+127.0.1.1"), "{stderr}");
    assert!(stderr.contains("qubes.ConnectNFS +127.0.1.1 "), "{stderr}");
    stderr
}

#[test]
fn refuses_arguments_that_are_not_a_loopback_host_address() {
    let cases = [
        ("10.0.0.1", "not a loopback address"),
        ("127.0.0.1", "the NFS server's own address"),
        ("127.0.0.1:5", "the port is always the NFS port, 2049"),
        ("127.0.0.1_5", "\"1_5\" is not a decimal number"),
        ("garbage", "not the four of 127.X.Y.Z"),
        ("127.1", "short forms like 127.1 are not accepted"),
        ("127.0.1.01", "leading zero"),
        ("127.0.1.256", "larger than 255"),
        ("127.0.0.0", "network address"),
        ("127.255.255.255", "broadcast address"),
        ("::1", "IPv6 is not supported"),
    ];
    for (argument, why) in cases {
        let stderr = refused(Some(argument));
        assert!(
            stderr.contains(&format!(
                "bad source address {argument:?} in QREXEC_SERVICE_ARGUMENT"
            )),
            "{stderr}"
        );
        assert!(stderr.contains(why), "argument {argument}: {stderr}");
    }
}

#[test]
fn refuses_a_missing_argument() {
    let stderr = refused(Some(""));
    assert!(
        stderr.contains("QREXEC_SERVICE_ARGUMENT is empty"),
        "{stderr}"
    );
    let stderr = refused(None);
    assert!(
        stderr.contains("QREXEC_SERVICE_ARGUMENT is not set"),
        "{stderr}"
    );
}

#[test]
fn a_refusal_names_the_calling_qube() {
    let server = Server::start();
    let output = Command::new(PROGRAM)
        .env("QREXEC_SERVICE_ARGUMENT", "10.0.0.1")
        .env("QREXEC_REMOTE_DOMAIN", "work")
        .env("QREXEC_CONNECT_NFS_PORT", server.port().to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr.contains("call from work: bad source address"),
        "{stderr}"
    );
    assert!(
        stderr.contains("qubes.ConnectNFS +127.0.1.1 work nfs-server allow"),
        "{stderr}"
    );
}

#[test]
fn refuses_a_bad_test_port() {
    let output = Command::new(PROGRAM)
        .env("QREXEC_SERVICE_ARGUMENT", "127.0.1.1")
        .env("QREXEC_CONNECT_NFS_PORT", "nfs")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad QREXEC_CONNECT_NFS_PORT \"nfs\""),
        "{stderr}"
    );
    assert!(stderr.contains("for tests only"), "{stderr}");
}

/// Nothing listens on the port: a socket bound to it but not listening
/// holds the port, so the refusal is certain (no free-port race).
#[test]
fn connect_failure_is_reported_with_exit_1() {
    // SAFETY: socket(2); the fd is wrapped at once so it is closed on drop.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh socket owned by nothing else.
    let holder = unsafe { OwnedFd::from_raw_fd(fd) };
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut bound = address;
    let mut length = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid sockaddr_in pointers with their true lengths.
    unsafe {
        assert_eq!(
            libc::bind(
                holder.as_raw_fd(),
                (&address as *const libc::sockaddr_in).cast(),
                length
            ),
            0
        );
        assert_eq!(
            libc::getsockname(
                holder.as_raw_fd(),
                (&mut bound as *mut libc::sockaddr_in).cast(),
                &mut length
            ),
            0
        );
    }
    let port = u16::from_be(bound.sin_port);

    let output = Command::new(PROGRAM)
        .env("QREXEC_SERVICE_ARGUMENT", "127.0.1.1")
        .env("QREXEC_CONNECT_NFS_PORT", port.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot connect from 127.0.1.1 to the NFS server at 127.0.0.1:{port}"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("is the NFS server running"), "{stderr}");
    assert!(output.stdout.is_empty());
    drop(holder);
}

// ---------------------------------------------------------------------------
// The test-only port override
// ---------------------------------------------------------------------------

/// The shipped (release) build has no port override: it always connects to
/// 2049. Building the release profile here would take minutes (LTO, every
/// dependency), so the program's one source file is compiled the way the
/// release profile differs for it, with debug assertions off, against the
/// libc this test run already built.
#[test]
fn a_build_without_debug_assertions_ignores_the_port_variable() {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    // The newest build of each crate the program uses (older ones may
    // linger in deps/ from earlier builds).
    let rlib = |krate: &str| {
        std::fs::read_dir(&deps)
            .unwrap()
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                let name = path.file_name().unwrap().to_string_lossy();
                name.starts_with(&format!("lib{krate}-")) && name.ends_with(".rlib")
            })
            .max_by_key(|path| std::fs::metadata(path).unwrap().modified().unwrap())
            .unwrap_or_else(|| panic!("{krate} built for this test run"))
    };
    let out = std::env::temp_dir().join(format!("qubes.ConnectNFS-release-{}", std::process::id()));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let built = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "-C",
            "debug-assertions=off",
        ])
        .arg("--extern")
        .arg(format!("libc={}", rlib("libc").display()))
        .arg("--extern")
        .arg(format!("socket2={}", rlib("socket2").display()))
        .arg("-L")
        .arg(format!("dependency={}", deps.display()))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../connect-nfs/main.rs"
        ))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "rustc: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let server = Server::start();
    for value in [server.port().to_string(), "nfs".to_owned()] {
        let output = Command::new("timeout")
            .arg("10")
            .arg(&out)
            .env("QREXEC_SERVICE_ARGUMENT", "127.0.1.1")
            .env("QREXEC_CONNECT_NFS_PORT", &value)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stderr.contains("QREXEC_CONNECT_NFS_PORT"),
            "QREXEC_CONNECT_NFS_PORT={value}: {stderr}"
        );
        assert_ne!(output.status.code(), Some(2), "{stderr}");
        if output.status.code() == Some(1) {
            assert!(stderr.contains("127.0.0.1:2049"), "{stderr}");
        }
    }
    assert!(server.saw_no_connection(), "the variable was used");
    let _ = std::fs::remove_file(&out);
}
