//! Measurement, not a test: time from `systemctl --user daemon-reload` to a
//! new binding answering, and what the journal shows for one add, one
//! remove and one no-op reload. Run with `make bench-reload`.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::user_manager::UserManager;
use common::*;

const CONFIG: &str = ".config/qrexec-connect/bench.conf";

fn line(port: u16, service_port: u16) -> String {
    format!("127.0.0.1:{port} @default qubes.ConnectTCP+{service_port}\n")
}

fn answers(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port))
        .ok()
        .and_then(|s| round_trip(Box::new(s), b"x".to_vec(), Duration::from_secs(2)).ok())
        .is_some_and(|r| r == b"x")
}

/// Journal lines about qrexec-connect since `cursor_lines` lines ago.
fn new_messages(manager: &UserManager, before: usize) -> String {
    manager
        .messages()
        .lines()
        .skip(before)
        .filter(|l| l.contains("qrexec-connect"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
#[ignore = "measurement for the issue notes, run by make bench-reload"]
fn reload_to_new_binding_latency() {
    let echo = EchoServer::start();
    let first = free_port();
    let manager = UserManager::start(&[(CONFIG, &line(first, echo.port))]);
    wait_for("the first binding", Duration::from_secs(10), || {
        answers(first).then_some(())
    });
    let mut config = line(first, echo.port);
    let mut samples = Vec::new();
    for round in 0..20 {
        // Keep the daemon running, as it would be in use.
        assert!(answers(first));
        let port = free_port();
        config += &line(port, echo.port);
        std::fs::write(manager.home.path().join(CONFIG), &config).unwrap();
        let before = manager.messages().lines().count();
        let started = Instant::now();
        manager.daemon_reload();
        wait_for("the new binding", Duration::from_secs(10), || {
            answers(port).then_some(())
        });
        samples.push(started.elapsed());
        if round == 0 {
            manager.settle();
            println!("journal, one add:\n{}\n", new_messages(&manager, before));
        }
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "daemon-reload to new binding answering, 20 adds: median {:.1} ms, min {:.1} ms, max {:.1} ms",
        ms(samples[10]),
        ms(samples[0]),
        ms(samples[19])
    );

    manager.settle();
    let before = manager.messages().lines().count();
    config = line(first, echo.port);
    std::fs::write(manager.home.path().join(CONFIG), &config).unwrap();
    manager.daemon_reload();
    manager.settle();
    println!(
        "journal, one remove (19 bindings):\n{}\n",
        new_messages(&manager, before)
    );

    let before = manager.messages().lines().count();
    manager.daemon_reload();
    manager.settle();
    println!(
        "journal, one no-op reload:\n{}\n",
        new_messages(&manager, before)
    );
}
