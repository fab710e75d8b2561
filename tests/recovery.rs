//! A daemon that keeps failing makes systemd stop every binding socket
//! (start limit hit). The bindings must come back by themselves once the
//! cause is gone, with no daemon-reload, and the journal must say what
//! happened and what was done. On a real user manager with the units
//! installed by `make install-client`.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::user_manager::UserManager;
use common::*;

/// The promise: bindings answer again within 30 s after the cause stops.
const COME_BACK: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(10);
const LIMIT: Duration = Duration::from_secs(20);
const CONFIG: &str = ".config/qrexec-connect/test.conf";

fn line(port: u16, service_port: u16) -> String {
    format!("127.0.0.1:{port} @default qubes.ConnectTCP+{service_port}\n")
}

fn unit_for(port: u16) -> String {
    format!("qrexec-connect-127.0.0.1:{port}.socket")
}

/// One exchange on a fresh connection, or None if it did not work.
fn exchange(port: u16, data: &[u8]) -> Option<Vec<u8>> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    round_trip(Box::new(stream), data.to_vec(), Duration::from_secs(5)).ok()
}

fn answers(port: u16) -> bool {
    exchange(port, b"ping").as_deref() == Some(&b"ping"[..])
}

/// Waits until every listed socket is `failed`; returns their results.
fn wait_all_failed(manager: &UserManager, units: &[String]) -> Vec<String> {
    wait_for("the binding sockets to fail", LIMIT, || {
        let states: Vec<String> = units
            .iter()
            .map(|unit| manager.property(unit, "ActiveState"))
            .collect();
        states.iter().all(|state| state == "failed").then(|| {
            units
                .iter()
                .map(|unit| manager.property(unit, "Result"))
                .collect()
        })
    })
}

/// The journal entry (a JSON line) that contains every one of `needles`.
fn wait_entry_with(manager: &UserManager, needles: &[&str], limit: Duration) -> String {
    wait_for(&format!("a journal entry with {needles:?}"), limit, || {
        manager
            .journal(&[])
            .lines()
            .find(|entry| needles.iter().all(|needle| entry.contains(needle)))
            .map(str::to_owned)
    })
}

#[test]
fn bindings_come_back_by_themselves_after_repeated_crashes() {
    let echo = EchoServer::start();
    let (a, b) = (free_port(), free_port());
    let manager = UserManager::start(&[(CONFIG, &(line(a, echo.port) + &line(b, echo.port)))]);
    // Crash the daemon after each connection until systemd gives up on it.
    let mut kills = 0;
    while kills < 5 {
        wait_for("binding a to answer", SETTLE, || answers(a).then_some(()));
        let pid = manager
            .main_pid("qrexec-connect.service")
            .expect("the daemon runs after a connection");
        // SAFETY: kill(2) on the daemon's pid, read from the manager just now.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        wait_for("the manager to notice the kill", SETTLE, || {
            (manager.main_pid("qrexec-connect.service") != Some(pid)).then_some(())
        });
        kills += 1;
    }
    // The next connection asks for a sixth start in a few seconds: refused.
    assert!(!answers(a), "a sixth start was allowed");
    let results = wait_all_failed(&manager, &[unit_for(a), unit_for(b)]);
    assert!(
        results.iter().all(|r| r == "service-start-limit-hit"),
        "{results:?}"
    );
    let failed_at = Instant::now();

    wait_for("binding a to come back without a reload", COME_BACK, || {
        answers(a).then_some(())
    });
    wait_for("binding b to come back without a reload", SETTLE, || {
        answers(b).then_some(())
    });
    eprintln!("bindings back {:?} after they failed", failed_at.elapsed());

    // What happened, in words, and what was done.
    wait_entry_with(
        &manager,
        &[
            "qrexec-connect.service",
            "killed by signal SIGKILL",
            &unit_for(a),
        ],
        LIMIT,
    );
    wait_entry_with(&manager, &["restarting the binding sockets in"], LIMIT);
}

#[test]
fn a_start_failure_is_explained_and_bindings_return_once_its_cause_is_gone() {
    let echo = EchoServer::start();
    let a = free_port();
    let manager = UserManager::start_with(
        &[(CONFIG, &line(a, echo.port))],
        &[(
            "qrexec-connect.service.d/cause.conf",
            "[Service]\nExecStartPre=test -e /run/cause-gone\n",
        )],
    );
    // The first connection: the daemon cannot start, systemd retries at
    // once (the connection is still pending) until the start limit.
    assert!(!answers(a), "the daemon started despite its ExecStartPre");
    // Our line says why, in words.
    wait_entry_with(
        &manager,
        &[
            "qrexec-connect.service",
            "ExecStartPre",
            "test -e /run/cause-gone",
            "exited with status 1",
        ],
        LIMIT,
    );
    manager.write_file("/run/cause-gone", "");
    let cause_gone = Instant::now();
    wait_for(
        "the binding to come back without a reload",
        COME_BACK,
        || answers(a).then_some(()),
    );
    eprintln!(
        "binding back {:?} after the cause was gone",
        cause_gone.elapsed()
    );
}

#[test]
fn the_recovery_unit_passes_systemd_analyze_verify_without_a_word() {
    let manager = UserManager::start(&[]);
    let out = manager
        .command("systemd-analyze")
        .args([
            "--user",
            "verify",
            "/usr/lib/systemd/user/qrexec-connect-recover.service",
        ])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// Issue 9, item 4, the other half: whatever makes the reconcile step fail
/// over and over (here a drop-in whose ExecStartPre= fails while a file
/// exists, so the flag is never lowered), the reload watcher hits its
/// start limit and fails. Once the cause is gone it must come back by
/// itself and apply the reload it missed.
#[test]
fn the_reload_watcher_comes_back_after_it_failed() {
    let echo = EchoServer::start();
    let (a, b) = (free_port(), free_port());
    let manager = UserManager::start_with(
        &[(CONFIG, &line(a, echo.port))],
        &[(
            "qrexec-connect-reconcile.service.d/blocked.conf",
            "[Service]\nExecStartPre=/bin/sh -c 'test ! -e /run/block-reconcile'\n",
        )],
    );
    wait_for("binding a to answer", SETTLE, || answers(a).then_some(()));
    manager.settle();

    manager.write_file("/run/block-reconcile", "");
    std::fs::write(
        manager.home.path().join(CONFIG),
        line(a, echo.port) + &line(b, echo.port),
    )
    .unwrap();
    manager.daemon_reload();
    wait_for("the reload watcher to fail", LIMIT, || {
        (manager.property("qrexec-connect-reconcile.path", "ActiveState") == "failed").then_some(())
    });
    wait_entry_with(
        &manager,
        &["qrexec-connect recover", "qrexec-connect-reconcile.path"],
        LIMIT,
    );
    assert!(!answers(b), "b answers although its reload was blocked");

    // The cause goes; no daemon-reload from here on.
    let gone = Instant::now();
    std::fs::remove_file(manager.ns_path("/run/block-reconcile")).unwrap();
    wait_for(
        "binding b to answer without another reload",
        COME_BACK,
        || answers(b).then_some(()),
    );
    eprintln!(
        "b answered {:.2} s after the cause was gone",
        gone.elapsed().as_secs_f64()
    );
    assert_eq!(
        manager.property("qrexec-connect-reconcile.path", "ActiveState"),
        "active"
    );
}
