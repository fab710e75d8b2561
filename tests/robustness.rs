//! The daemon under load and failure (issue 6): ten thousand short
//! connections, more clients than `--max-connections`, running out of file
//! descriptors, and services (or the client itself) that crash, fail, hang
//! or are killed. After each, the daemon must hold exactly what it held when
//! idle: the same number of open fds and no child, running or zombie.
//!
//! Everything waits for a condition with a deadline. The few checks that
//! something does *not* happen (a client at the limit is not served) bound
//! their wait with [`QUIET`].

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Upper bound for anything that should happen; only reached on failure.
const LIMIT: Duration = Duration::from_secs(20);
/// How long a "nothing happens" check watches.
const QUIET: Duration = Duration::from_millis(300);

/// Held while this file writes an executable and while it starts a process:
/// a child forked by another test between our open() and close() of a
/// script would hold it open for writing, and exec'ing it would fail with
/// ETXTBSY.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

fn spawn_lock() -> MutexGuard<'static, ()> {
    SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn start(builder: ActivateBuilder) -> Activate {
    let _lock = spawn_lock();
    builder.start()
}

fn tcp4() -> Endpoint {
    Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port())))
}

fn connect_tcp(port: u16) -> String {
    format!("'' qubes.ConnectTCP+{port}")
}

/// The double's service directory (`QREXEC_DOUBLE_SERVICES`).
struct Services(TempDir);

impl Services {
    fn new(tag: &str) -> Services {
        Services(TempDir::new(tag))
    }

    fn dir(&self) -> &str {
        self.0.path().to_str().unwrap()
    }

    /// An executable service: a shell script with `body`.
    fn script(&self, name: &str, body: &str) {
        let path = self.0.path().join(name);
        let _lock = spawn_lock();
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A Unix socket service that echoes each call until EOF, then
    /// half-closes (no service descriptor first: `skip-service-descriptor`).
    fn unix_echo(&self, name: &str) {
        let config = self.0.path().join("rpc-config");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(config.join(name), "skip-service-descriptor=true\n").unwrap();
        let listener = UnixListener::bind(self.0.path().join(name)).unwrap();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                thread::spawn(move || {
                    let mut buf = [0; 4096];
                    while let Ok(n @ 1..) = stream.read(&mut buf) {
                        if stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
    }
}

/// One round trip through `endpoint`, so that the daemon has started and
/// probed its client; returns its idle fd count.
fn warm_up(daemon: &Activate, endpoint: &Endpoint) -> usize {
    let received = round_trip(endpoint.connect().unwrap(), b"warm-up".to_vec(), LIMIT)
        .unwrap_or_else(|e| panic!("warm-up: {e}\n{}", daemon.log_text()));
    assert_eq!(received, b"warm-up");
    idle_fd_count(daemon, LIMIT)
}

/// Connects, sends `data` without closing, and starts a thread that reports
/// on `done` (with `index`) when `data` has come back.
fn send_and_await_echo(
    addr: SocketAddr,
    index: usize,
    data: Vec<u8>,
    done: &mpsc::Sender<(usize, std::io::Result<()>)>,
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(&data).unwrap();
    let mut reader = stream.try_clone().unwrap();
    reader.set_read_timeout(Some(LIMIT)).unwrap();
    let done = done.clone();
    thread::spawn(move || {
        let mut echo = vec![0; data.len()];
        let result = reader.read_exact(&mut echo).and_then(|()| {
            (echo == data)
                .then_some(())
                .ok_or_else(|| std::io::Error::other(format!("echo {echo:?} for {data:?}")))
        });
        let _ = done.send((index, result));
    });
    stream
}

#[test]
fn ten_thousand_short_connections_all_echo_and_leave_nothing_behind() {
    const CONNECTIONS: usize = 10_000;
    const AT_ONCE: usize = 4;
    // Unix sockets on both sides: 10,000 TCP connections each way would
    // leave 20,000 sockets in TIME_WAIT on a machine others share.
    let services = Services::new("churn-services");
    services.unix_echo("test.Echo");
    let sockets = TempDir::new("churn");
    let endpoint = Endpoint::Path(sockets.path().join("churn.sock"));
    let daemon = start(
        Activate::builder()
            .listen(&endpoint, "'' test.Echo")
            .env("QREXEC_DOUBLE_SERVICES", services.dir()),
    );
    let idle = warm_up(&daemon, &endpoint);

    let daemon_cpu = cpu_time(daemon.pid());
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..AT_ONCE)
        .map(|_| {
            let (next, failures, endpoint) = (next.clone(), failures.clone(), endpoint.clone());
            thread::spawn(move || loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= CONNECTIONS {
                    return;
                }
                let data = format!("connection {index}\n").into_bytes();
                let result = endpoint
                    .connect()
                    .and_then(|stream| round_trip(stream, data.clone(), LIMIT));
                match result {
                    Ok(echo) if echo == data => {}
                    Ok(echo) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{index}: got {:?}", String::from_utf8_lossy(&echo))),
                    Err(e) => failures.lock().unwrap().push(format!("{index}: {e}")),
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let took = started.elapsed();
    let daemon_cpu = cpu_time(daemon.pid()) - daemon_cpu;
    println!(
        "churn: {CONNECTIONS} connections, {AT_ONCE} at a time, in {took:.2?}: {:.0} \
         connections/s; the daemon used {daemon_cpu:?} of CPU ({:.0} µs per connection)",
        CONNECTIONS as f64 / took.as_secs_f64(),
        daemon_cpu.as_secs_f64() * 1e6 / CONNECTIONS as f64
    );
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} connections did not get their echo, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    wait_until_idle(&daemon, idle, LIMIT);
}

#[test]
fn more_clients_than_max_connections_wait_their_turn_and_it_is_logged_once() {
    const MAX: usize = 5;
    const CLIENTS: usize = 20;
    let echo = EchoServer::start();
    let endpoint = tcp4();
    let Endpoint::Tcp(addr) = endpoint else {
        unreachable!()
    };
    let daemon = start(
        Activate::builder()
            .listen(&endpoint, &connect_tcp(echo.port))
            .arg(&format!("--max-connections={MAX}")),
    );
    let idle = warm_up(&daemon, &endpoint);
    let pid = daemon.pid();

    // Every connect succeeds (into the listen backlog); each client sends
    // its number and a thread reports when the echo is back.
    let (done, echoed) = mpsc::channel();
    let mut clients: Vec<Option<TcpStream>> = (0..CLIENTS)
        .map(|i| {
            Some(send_and_await_echo(
                addr,
                i,
                format!("client {i}").into(),
                &done,
            ))
        })
        .collect();
    let mut served = Vec::new();
    let next_served = |served: &mut Vec<usize>| {
        let (index, result) = echoed
            .recv_timeout(LIMIT)
            .unwrap_or_else(|_| panic!("no client served next\n{}", daemon.log_text()));
        result.unwrap_or_else(|e| panic!("client {index}: {e}"));
        served.push(index);
    };
    for _ in 0..MAX {
        next_served(&mut served);
    }
    daemon.wait_log("the --max-connections limit; new clients wait", LIMIT);
    assert!(
        echoed.recv_timeout(QUIET).is_err(),
        "a client was served beyond --max-connections={MAX}"
    );
    assert_eq!(live_children_of(pid).len(), MAX);

    // Each connection that ends lets exactly one waiting client in.
    let mut ended = 0;
    while served.len() < CLIENTS {
        let client = clients[served[ended]].take().unwrap();
        client.shutdown(Shutdown::Both).unwrap();
        ended += 1;
        next_served(&mut served);
        let children = children_of(pid).len();
        assert!(children <= MAX, "{children} clients running, limit {MAX}");
    }
    drop(clients);
    daemon.wait_log("below the limit again", LIMIT);
    wait_until_idle(&daemon, idle, LIMIT);

    // One saturation episode: one warning, one all-clear.
    let log = daemon.log_text();
    let warnings = log.matches("the --max-connections limit").count();
    let all_clear = log.matches("below the limit again").count();
    assert_eq!((warnings, all_clear), (1, 1), "{log}");
    let received = round_trip(endpoint.connect().unwrap(), b"after".to_vec(), LIMIT).unwrap();
    assert_eq!(received, b"after");
}

/// Sets the soft RLIMIT_NOFILE of another process (the hard limit stays:
/// raising it needs CAP_SYS_RESOURCE, which test machines may lack).
fn set_soft_fd_limit(pid: u32, soft: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads and writes plain rlimit structs.
    unsafe {
        assert_eq!(
            libc::prlimit(
                pid as i32,
                libc::RLIMIT_NOFILE,
                std::ptr::null(),
                &mut limit
            ),
            0,
            "prlimit: {}",
            std::io::Error::last_os_error()
        );
        limit.rlim_cur = soft;
        assert_eq!(
            libc::prlimit(
                pid as i32,
                libc::RLIMIT_NOFILE,
                &limit,
                std::ptr::null_mut()
            ),
            0,
            "prlimit: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn out_of_descriptors_it_waits_without_spinning_logs_once_and_recovers() {
    const TINY: u64 = 16;
    const HELD: usize = 12;
    const WAITING: usize = 5;
    let echo = EchoServer::start();
    let endpoint = tcp4();
    let Endpoint::Tcp(addr) = endpoint else {
        unreachable!()
    };
    let daemon = start(Activate::builder().listen(&endpoint, &connect_tcp(echo.port)));
    let pid = daemon.pid();
    // systemd-socket-activate execs the daemon in place at the first
    // connection, so a limit set now is the one the daemon starts with.
    set_soft_fd_limit(pid, TINY);
    let idle = warm_up(&daemon, &endpoint);
    assert!(idle < TINY as usize, "{idle} fds idle");

    // More simultaneous connections than free fds: a live connection costs
    // the daemon at most one fd (tokio's pidfd for the child; without a
    // free fd it falls back to SIGCHLD), so all are served.
    let (done, echoed) = mpsc::channel();
    let held: Vec<TcpStream> = (0..HELD)
        .map(|i| {
            let stream = send_and_await_echo(addr, i, format!("held {i}").into(), &done);
            let (index, result) = echoed.recv_timeout(LIMIT).unwrap();
            result.unwrap_or_else(|e| panic!("held {index}: {e}\n{}", daemon.log_text()));
            stream
        })
        .collect();
    assert!(open_fds(pid).len() <= TINY as usize);

    // A full descriptor table: lower the limit to the lowest free fd, so
    // every accept() fails with EMFILE. Clients wait in the backlog.
    let fds = open_fds(pid);
    let lowest_free = (0..).find(|fd| !fds.contains(fd)).unwrap();
    set_soft_fd_limit(pid, lowest_free as u64);
    let waiting: Vec<TcpStream> = (0..WAITING)
        .map(|i| send_and_await_echo(addr, HELD + i, format!("waiting {i}").into(), &done))
        .collect();
    daemon.wait_log("out of descriptors", LIMIT);
    let cpu_before = cpu_time(pid);
    let pressure = Instant::now();
    let served_under_pressure = echoed.recv_timeout(Duration::from_millis(1500));
    let wall = pressure.elapsed();
    let cpu = cpu_time(pid) - cpu_before;
    println!(
        "descriptor exhaustion: {cpu:?} of CPU in {wall:.2?} of pressure ({:.1}% of one core)",
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    );
    assert!(
        served_under_pressure.is_err(),
        "a client was served without a free fd?"
    );
    assert!(
        cpu.as_secs_f64() < 0.3 * wall.as_secs_f64(),
        "the daemon spins: {cpu:?} of CPU in {wall:?}"
    );
    let log = daemon.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot accept a connection"))
        .collect();
    assert_eq!(warnings.len(), 1, "not rate-limited:\n{log}");
    assert!(
        warnings[0].contains("Too many open files") && warnings[0].contains("out of descriptors"),
        "{}",
        warnings[0]
    );

    // The pressure ends: every waiting client is served.
    set_soft_fd_limit(pid, TINY);
    for _ in 0..WAITING {
        let (index, result) = echoed
            .recv_timeout(LIMIT)
            .unwrap_or_else(|_| panic!("waiting clients not served\n{}", daemon.log_text()));
        result.unwrap_or_else(|e| panic!("client {index}: {e}"));
    }
    drop(held);
    drop(waiting);
    wait_until_idle(&daemon, idle, LIMIT);
    let received = round_trip(endpoint.connect().unwrap(), b"normal".to_vec(), LIMIT).unwrap();
    assert_eq!(received, b"normal");
}

/// The log line for the end of a call to `service`.
fn end_line(log: &str, service: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains(&format!("-> '' {service}: ")))
        .map(str::to_owned)
}

#[test]
fn a_service_that_crashes_or_fails_closes_the_connection_and_the_log_says_why() {
    let services = Services::new("crash-services");
    services.script(
        "test.Crash",
        "read line; printf 'got %s\\n' \"$line\"; kill -KILL $$",
    );
    services.script("test.Fail", "read line; echo bye; exit 3");
    let echo = EchoServer::start();
    for client in CLIENTS {
        let (warm, crash, fail) = (tcp4(), tcp4(), tcp4());
        let daemon = start(
            activate(client)
                .listen(&warm, &connect_tcp(echo.port))
                .listen(&crash, "'' test.Crash")
                .listen(&fail, "'' test.Fail")
                .env("QREXEC_DOUBLE_SERVICES", services.dir()),
        );
        let idle = warm_up(&daemon, &warm);
        for (endpoint, reply, service, words) in [
            (
                &crash,
                &b"got hello\n"[..],
                "test.Crash",
                "service ended by signal SIGKILL (status 137)",
            ),
            (&fail, b"bye\n", "test.Fail", "service exited with status 3"),
        ] {
            let received = round_trip(endpoint.connect().unwrap(), b"hello\n".to_vec(), LIMIT)
                .unwrap_or_else(|e| panic!("{client:?} {service}: {e}\n{}", daemon.log_text()));
            assert_eq!(received, reply, "{client:?} {service}");
            let line = wait_for("the end of the call in the log", LIMIT, || {
                end_line(&daemon.log_text(), service)
            });
            assert!(line.contains(words), "{client:?}: {line}");
        }
        wait_until_idle(&daemon, idle, LIMIT);
    }
}

/// Kills the listed processes on drop, so a failing test leaves no hung
/// service behind.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

#[test]
fn a_hung_service_keeps_its_call_until_killed_then_the_client_sees_eof() {
    let services = Services::new("hang-services");
    let pids = services.0.path().join("hung.pids");
    services.script(
        "test.Hang",
        &format!("echo $$ >> '{}'; exec sleep 60", pids.display()),
    );
    let echo = EchoServer::start();
    let (warm, hang) = (tcp4(), tcp4());
    let daemon = start(
        Activate::builder()
            .listen(&warm, &connect_tcp(echo.port))
            .listen(&hang, "'' test.Hang")
            .env("QREXEC_DOUBLE_SERVICES", services.dir()),
    );
    let idle = warm_up(&daemon, &warm);
    let hung_services = |count: usize| {
        wait_for("the hung services to start", LIMIT, || {
            let text = std::fs::read_to_string(&pids).ok()?;
            let pids: Vec<u32> = text.lines().filter_map(|l| l.parse().ok()).collect();
            (pids.len() == count).then_some(pids)
        })
    };
    let mut left = hang.connect().unwrap();
    left.write_all(b"anyone there?").unwrap();
    let first = hung_services(1)[0];
    let mut waiting = hang.connect().unwrap();
    waiting.write_all(b"hello?").unwrap();
    let second = hung_services(2)[1];
    let _cleanup = KillOnDrop(vec![first, second]);

    // The first client gives up. Its call waits for the service's EOF, as
    // the real qrexec-client-vm does: the daemon has no idle timeout, so a
    // hung service keeps its call (one process, one slot) until it ends.
    drop(left);
    assert!(
        wait_for_quiet(|| live_children_of(daemon.pid()).len() != 2),
        "the call ended without the service"
    );
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    daemon.wait_log("service ended by signal SIGKILL", LIMIT);

    // The second client is still waiting for an answer: killing its service
    // must end its connection with EOF, not leave it hanging.
    waiting.set_timeout(Some(LIMIT)).unwrap();
    let started = Instant::now();
    unsafe { libc::kill(second as i32, libc::SIGKILL) };
    let mut reply = Vec::new();
    let result = waiting.read_to_end(&mut reply);
    assert!(
        result.is_ok() || result.as_ref().unwrap_err().kind() == ErrorKind::ConnectionReset,
        "{result:?} after {:?}\n{}",
        started.elapsed(),
        daemon.log_text()
    );
    assert!(reply.is_empty(), "{reply:?}");
    wait_for("both calls logged as killed", LIMIT, || {
        let log = daemon.log_text();
        let killed = log
            .lines()
            .filter(|l| l.contains("test.Hang: ") && l.contains("SIGKILL (status 137)"))
            .count();
        (killed == 2).then_some(())
    });
    wait_until_idle(&daemon, idle, LIMIT);
}

/// Watches `happened` for [`QUIET`]; true if it never became true.
fn wait_for_quiet(mut happened: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + QUIET;
    while Instant::now() < deadline {
        if happened() {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    true
}

#[test]
fn killing_the_client_mid_transfer_closes_the_connection_and_leaks_nothing() {
    const SIZE: usize = 4 << 20;
    // Unix sockets and pipes all the way: their buffers are fixed (a few
    // hundred KiB each, no TCP autotuning), so most of the 4 MiB cannot be
    // in flight yet when the client dies.
    let services = Services::new("kill-services");
    services.unix_echo("test.Echo");
    let sockets = TempDir::new("kill");
    for client in CLIENTS {
        let endpoint = Endpoint::Path(sockets.path().join(format!("{client:?}.sock")));
        let daemon = start(
            activate(client)
                .listen(&endpoint, "'' test.Echo")
                .env("QREXEC_DOUBLE_SERVICES", services.dir()),
        );
        let idle = warm_up(&daemon, &endpoint);

        let mut stream = endpoint.connect().unwrap();
        stream.set_timeout(Some(LIMIT)).unwrap();
        // The writer never half-closes: the call cannot end by itself, so
        // the client is certainly alive when it is killed.
        let mut writer = stream.duplicate();
        let sender = thread::spawn(move || writer.write_all(&random_bytes(SIZE, 7)));
        let mut received = 0;
        let mut buf = vec![0; 1 << 16];
        while received < 256 << 10 {
            match stream.read(&mut buf) {
                Ok(0) => panic!("{client:?}: EOF after {received} bytes"),
                Ok(n) => received += n,
                Err(e) => panic!("{client:?}: {e} after {received} bytes"),
            }
        }
        let children = live_children_of(daemon.pid());
        assert_eq!(children.len(), 1, "{client:?}");
        // In both modes the client is the daemon's only child (the splicer of
        // the pipe mode is forked away from it).
        let victim = children[0];
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        let started = Instant::now();
        let end = loop {
            match stream.read(&mut buf) {
                Ok(0) => break "EOF".to_owned(),
                Ok(n) => received += n,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break e.to_string(),
                Err(e) => panic!(
                    "{client:?}: {e} after {:?} instead of EOF or a reset\n{}",
                    started.elapsed(),
                    daemon.log_text()
                ),
            }
        };
        println!(
            "{client:?} client killed after {received} of {SIZE} bytes came back: {end} in {:.2?}",
            started.elapsed()
        );
        assert!(
            received < SIZE,
            "{client:?}: the transfer ended before the kill"
        );
        // The writer stops too: the connection is gone (EPIPE or a reset).
        let _ = sender.join().unwrap();
        daemon.wait_log("killed by signal SIGKILL", LIMIT);
        wait_until_idle(&daemon, idle, LIMIT);
    }
}
