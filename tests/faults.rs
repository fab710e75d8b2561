//! Faults around the daemon that it must survive (issue 9), under
//! `systemd-socket-activate`: a service manager that does not read its
//! notifications, a pipe-mode splicer told to stop, and a process limit that
//! makes forking the splicer or spawning the client fail half way.
//!
//! The stalled journal needs a real journald: see `tests/journal_stall.rs`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// Upper bound for anything that should happen; only reached on failure.
const LIMIT: Duration = Duration::from_secs(20);

fn tcp4() -> Endpoint {
    Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port())))
}

fn connect_tcp(port: u16) -> String {
    format!("'' qubes.ConnectTCP+{port}")
}

fn echoes(endpoint: &Endpoint, data: &[u8], daemon: &Activate) {
    let received = endpoint
        .connect()
        .and_then(|stream| round_trip(stream, data.to_vec(), Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_text()));
    assert_eq!(received, data, "{}", daemon.log_text());
}

/// Every datagram waiting on `socket`, as text.
fn drain(socket: &UnixDatagram) -> Vec<String> {
    let mut messages = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => messages.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return messages,
            Err(e) => panic!("reading the notify socket: {e}"),
        }
    }
}

#[test]
fn a_notify_socket_that_nobody_reads_never_stops_connections_and_ready_comes_later() {
    let echo = EchoServer::start();
    let dir = TempDir::new("notify-full");
    let path = dir.path().join("notify");
    let manager = UnixDatagram::bind(&path).unwrap();
    manager.set_nonblocking(true).unwrap();
    // Fill the "manager's" queue before the daemon starts: every
    // notification it sends now finds the queue full.
    let filler = UnixDatagram::unbound().unwrap();
    filler.set_nonblocking(true).unwrap();
    let mut filled = 0;
    while filler.send_to(b"FILLER=1", &path).is_ok() {
        filled += 1;
    }
    assert!(filled > 0);

    let endpoint = tcp4();
    let daemon = Activate::builder()
        .listen(&endpoint, &connect_tcp(echo.port))
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .start();
    // Each connection changes the status twice.
    for i in 0..50 {
        echoes(&endpoint, format!("connection {i}").as_bytes(), &daemon);
    }

    // The manager reads again: READY=1 was kept, and the newest status
    // arrives (older ones may have been dropped: a later one replaces them).
    let mut seen: Vec<String> = Vec::new();
    wait_for("READY=1 and the idle status", LIMIT, || {
        seen.extend(drain(&manager).into_iter().filter(|m| m != "FILLER=1"));
        let ready = seen.iter().any(|m| m.lines().any(|l| l == "READY=1"));
        let last_status = seen
            .iter()
            .flat_map(|m| m.lines())
            .rfind(|l| l.starts_with("STATUS="));
        (ready && last_status == Some("STATUS=1 binding(s), 0 live connection(s)")).then_some(())
    });
}

/// Every message to the manager wakes it; a burst of connections must not
/// cost two of them per connection. The status is coalesced, and the
/// newest one still arrives once the burst is over.
#[test]
fn a_burst_of_connections_sends_few_status_updates_and_ends_with_the_current_one() {
    let echo = EchoServer::start();
    let dir = TempDir::new("notify-burst");
    let path = dir.path().join("notify");
    let manager = UnixDatagram::bind(&path).unwrap();
    manager.set_nonblocking(true).unwrap();
    let endpoint = tcp4();
    let daemon = Activate::builder()
        .listen(&endpoint, &connect_tcp(echo.port))
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .start();
    let connections = 100;
    for i in 0..connections {
        echoes(&endpoint, format!("connection {i}").as_bytes(), &daemon);
    }
    let mut seen: Vec<String> = Vec::new();
    wait_for("the idle status after the burst", LIMIT, || {
        seen.extend(drain(&manager));
        let last_status = seen
            .iter()
            .flat_map(|m| m.lines())
            .rfind(|l| l.starts_with("STATUS="));
        (last_status == Some("STATUS=1 binding(s), 0 live connection(s)")).then_some(())
    });
    let statuses = seen
        .iter()
        .filter(|m| m.lines().any(|l| l.starts_with("STATUS=")))
        .count();
    assert!(
        statuses <= 20,
        "{statuses} status messages for {connections} connections"
    );
}

/// The pid of the process whose open fds include `link` (`socket:[N]`),
/// among those named `comm`.
fn process_holding(comm: &str, link: &Path) -> Option<u32> {
    all_pids().into_iter().find(|&pid| {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        name.trim_end() == comm
            && open_fds(pid).into_iter().any(|fd| {
                std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                    .ok()
                    .as_deref()
                    == Some(link)
            })
    })
}

fn exited(pid: u32) -> bool {
    matches!(state_of(pid), None | Some('Z'))
}

#[test]
fn the_pipe_mode_splicer_stops_on_sigterm_and_sigint() {
    let echo = EchoServer::start();
    let endpoint = tcp4();
    let daemon = activate(Client::Old)
        .listen(&endpoint, &connect_tcp(echo.port))
        .start();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut live = endpoint.connect().unwrap();
        live.set_timeout(Some(LIMIT)).unwrap();
        live.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        live.read_exact(&mut buf).unwrap();
        // The splicer is the process named qrexec-splice that holds the
        // connection the client has as its stdin.
        let client = wait_for("the live client", LIMIT, || {
            live_children_of(daemon.pid()).first().copied()
        });
        let connection = std::fs::read_link(format!("/proc/{client}/fd/0")).unwrap();
        let splicer = wait_for("the splicer", LIMIT, || {
            process_holding("qrexec-splice", &connection)
        });
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(splicer as i32, signal) };
        wait_for(
            &format!("the splicer to exit on signal {signal}"),
            Duration::from_secs(5),
            || exited(splicer).then_some(()),
        );
        // The client ends when its peer does.
        drop(live);
        wait_for("the client to end", LIMIT, || {
            live_children_of(daemon.pid()).is_empty().then_some(())
        });
    }
}

/// A cgroup (v1) of the pids controller holding one process, removed on drop.
struct PidsCgroup(PathBuf);

const PIDS_ROOT: &str = "/sys/fs/cgroup/pids";

impl PidsCgroup {
    fn holding(pid: u32, tag: &str) -> PidsCgroup {
        let path =
            Path::new(PIDS_ROOT).join(format!("qrexec-connect-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        let cgroup = PidsCgroup(path);
        cgroup.write("cgroup.procs", &pid.to_string());
        cgroup
    }

    fn write(&self, file: &str, value: &str) {
        std::fs::write(self.0.join(file), value)
            .unwrap_or_else(|e| panic!("{}/{file} = {value}: {e}", self.0.display()));
    }

    fn current(&self) -> u64 {
        let text = std::fs::read_to_string(self.0.join("pids.current")).unwrap();
        text.trim().parse().unwrap()
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        // Whatever is left goes back to the root, then the group can go.
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(Path::new(PIDS_ROOT).join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn when_a_fork_fails_half_way_the_connection_closes_nothing_is_left_and_the_log_says_so() {
    let echo = EchoServer::start();
    let endpoint = tcp4();
    let mut daemon = activate(Client::Old)
        .listen(&endpoint, &connect_tcp(echo.port))
        .start();
    echoes(&endpoint, b"warm-up", &daemon);
    let idle = idle_fd_count(&daemon, LIMIT);
    let cgroup = PidsCgroup::holding(daemon.pid(), "fork");
    // The daemon is one process with one thread. In pipe mode a connection
    // first forks the splicer's middle process, which forks the splicer and
    // exits, then spawns the client. With room for one more process the
    // second fork fails; with none, the first.
    for headroom in [1, 0] {
        wait_for("the daemon alone in its cgroup", LIMIT, || {
            (cgroup.current() == 1).then_some(())
        });
        cgroup.write("pids.max", &(1 + headroom).to_string());
        let before = daemon.log_text().len();
        let result = endpoint
            .connect()
            .and_then(|stream| round_trip(stream, b"hello".to_vec(), LIMIT));
        // The connection is closed at once: end of file, or a reset that
        // our write or half-close runs into. Not a timeout.
        match result {
            Ok(received) => assert!(received.is_empty(), "headroom {headroom}: {received:?}"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::NotConnected | ErrorKind::BrokenPipe
                ),
                "headroom {headroom}: {e}"
            ),
        }
        if headroom == 1 {
            // (The second failure in a row falls under the rate limit.)
            let log = daemon.wait_log("connection closed", LIMIT)[before..].to_owned();
            assert!(
                log.contains("cannot start the splicer for 127.0.0.1:")
                    && log.contains("Resource temporarily unavailable"),
                "headroom {headroom}:\n{log}"
            );
        }
        // No process of that connection is left: no client, no splicer.
        wait_for(
            "every process of the failed connection to end",
            LIMIT,
            || (cgroup.current() == 1 && children_of(daemon.pid()).is_empty()).then_some(()),
        );
        wait_until_idle(&daemon, idle, LIMIT);
    }
    cgroup.write("pids.max", "max");
    echoes(&endpoint, b"after", &daemon);
    let _ = daemon.child.kill();
    let _ = daemon.child.wait();
}
