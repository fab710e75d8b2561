//! A stalled journald (issue 9): with journald stopped, its socket's queue
//! fills up; the daemon must keep accepting and serving every binding,
//! dropping the log lines it cannot send, and say how many it dropped once
//! the journal takes lines again. On a real `systemd --user` and journald.

mod common;

use std::time::{Duration, Instant};

use common::user_manager::UserManager;
use common::*;

const LIMIT: Duration = Duration::from_secs(20);
/// Connections made while journald is stopped: far more log lines than its
/// socket queues (net.unix.max_dgram_qlen, and the sender's buffer).
const CONNECTIONS: usize = 300;

/// Resumes a stopped process on drop, so that a failing test does not leave
/// journald stopped for the harness's cleanup.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

#[test]
fn a_stopped_journald_never_stops_connections_and_the_dropped_lines_are_counted() {
    let echo = EchoServer::start();
    let port = free_port();
    let manager = UserManager::start(&[(
        ".config/systemd/user/qrexec-connect-stall.socket",
        &format!(
            "[Socket]\nListenStream=127.0.0.1:{port}\n\
             FileDescriptorName=@default qubes.ConnectTCP+{}\n",
            echo.port
        ),
    )]);
    manager.daemon_reload();
    manager.systemctl_ok(&["start", "qrexec-connect-stall.socket"]);
    let endpoint = Endpoint::Tcp(([127, 0, 0, 1], port).into());
    let served = |data: &[u8]| {
        endpoint
            .connect()
            .and_then(|stream| round_trip(stream, data.to_vec(), Duration::from_secs(5)))
    };
    assert_eq!(served(b"warm-up").unwrap(), b"warm-up");
    manager.wait_journal(
        &["SYSLOG_IDENTIFIER=qrexec-connect"],
        "closed normally",
        LIMIT,
    );

    let journald = manager.journald_pid();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(journald as i32, libc::SIGSTOP) };
    let resume = Resume(journald);
    let started = Instant::now();
    for i in 0..CONNECTIONS {
        let data = format!("connection {i}").into_bytes();
        match served(&data) {
            Ok(received) if received == data => {}
            other => panic!(
                "with journald stopped, connection {i} was not served after {:.1?}: {other:?}",
                started.elapsed()
            ),
        }
    }
    println!(
        "{CONNECTIONS} connections with journald stopped in {:.2?}",
        started.elapsed()
    );
    drop(resume);

    // The next line the journal takes is preceded by the count. A resumed
    // journald may still be draining its queue when the next connection's
    // line comes (on a busy machine it does): that line is dropped and
    // counted too, so connect again until a line gets through.
    let mut after = 0;
    let entries = wait_for("the count of dropped lines in the journal", LIMIT, || {
        after += 1;
        assert_eq!(served(b"after").unwrap(), b"after");
        let text = manager.journal(&["SYSLOG_IDENTIFIER=qrexec-connect"]);
        text.contains("log messages were dropped while the journal was not accepting them")
            .then_some(text)
    });
    let dropped: u64 = entries
        .lines()
        .find(|l| l.contains("were dropped while the journal"))
        .and_then(|l| l.split("\"DROPPED_MESSAGES\":\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no DROPPED_MESSAGES field:\n{entries}"));
    assert!(
        dropped > 0 && dropped <= (CONNECTIONS + after) as u64,
        "{dropped} dropped"
    );
    println!("{dropped} log messages dropped");
}
