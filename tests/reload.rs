//! `systemctl --user daemon-reload` applies config changes, on a real user
//! manager with the generator, the units and the reconcile step installed
//! by `make install-client`, and never cuts a live connection.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::user_manager::UserManager;
use common::*;

/// How long a change may take to show. The requirement is 2 s; the figure
/// measured on this machine is in bench/ and the issue notes. The tests
/// allow more so that a loaded CI machine does not fail them.
const SETTLE: Duration = Duration::from_secs(10);
const LIMIT: Duration = Duration::from_secs(20);
const CONFIG: &str = ".config/qrexec-connect/test.conf";

fn line(port: u16, target: &str, service_port: u16) -> String {
    format!("127.0.0.1:{port} {target} qubes.ConnectTCP+{service_port}\n")
}

/// One exchange on a fresh connection, or None if it did not work.
fn exchange(port: u16, data: &[u8]) -> Option<Vec<u8>> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    round_trip(Box::new(stream), data.to_vec(), Duration::from_secs(5)).ok()
}

fn wait_forwarding(port: u16, expect: &[u8], send: &[u8]) {
    wait_for(
        &format!("127.0.0.1:{port} to answer {expect:?}"),
        SETTLE,
        || (exchange(port, send)? == expect).then_some(()),
    );
}

fn wait_refused(port: u16) {
    common::wait_refused("a removed or moved binding", port, SETTLE);
}

/// A connection that is open and has echoed once.
fn held_connection(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.write_all(b"hold").unwrap();
    let mut buf = [0; 4];
    stream.read_exact(&mut buf).unwrap();
    stream
}

fn still_works(mut stream: TcpStream, what: &str) {
    stream.write_all(b"more").unwrap();
    let mut buf = [0; 4];
    stream
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: the held connection broke: {e}"));
    assert_eq!(&buf, b"more", "{what}");
    let rest = round_trip(Box::new(stream), b"bye".to_vec(), LIMIT).unwrap();
    assert_eq!(rest, b"bye", "{what}");
}

fn write_config(manager: &UserManager, text: &str) {
    std::fs::write(manager.home.path().join(CONFIG), text).unwrap();
}

fn socket_states(manager: &UserManager) -> String {
    manager.systemctl_ok(&[
        "list-units",
        "--all",
        "--plain",
        "--no-legend",
        "qrexec-connect-*.socket",
    ])
}

#[test]
fn config_lines_listen_at_start_and_bad_lines_reach_the_journal() {
    let echo = EchoServer::start();
    let (v4, v6) = (free_port(), free_port());
    let abstract_name = format!("qrexec-connect-e2e-{}", std::process::id());
    let config = format!(
        "# every form of LISTEN\n\
         127.0.0.1:{v4} @default qubes.ConnectTCP+{p}\n\
         [::1]:{v6} work qubes.ConnectTCP+{p}\n\
         %t/qrexec-connect/echo vault qubes.ConnectTCP+{p}\n\
         @{abstract_name} '' qubes.ConnectTCP+{p}\n\
         2222 work qubes.ConnectTCP+22\n",
        p = echo.port
    );
    let manager = UserManager::start(&[(CONFIG, &config)]);
    let path = manager.ns_path("/run/user/0/qrexec-connect/echo");
    let endpoints = [
        Endpoint::Tcp(format!("127.0.0.1:{v4}").parse().unwrap()),
        Endpoint::Tcp(format!("[::1]:{v6}").parse().unwrap()),
        Endpoint::Path(path),
        Endpoint::Abstract(abstract_name),
    ];
    for endpoint in &endpoints {
        let data = random_bytes(64 << 10, 7);
        let received = wait_for(&format!("{endpoint:?} to forward"), SETTLE, || {
            round_trip(endpoint.connect().ok()?, data.clone(), LIMIT).ok()
        });
        assert!(received == data, "{endpoint:?}");
    }
    let journal = manager.wait_journal(&[], "test.conf:6: ", LIMIT);
    assert!(
        journal.contains("test.conf:6: ") && journal.contains("127.0.0.1:2222"),
        "the bad line is reported with FILE:LINE and a suggestion:\n{journal}"
    );
}

#[test]
fn reload_adds_changes_and_removes_bindings_without_cutting_connections() {
    let echo = EchoServer::start();
    let other = EchoServer::start_replying(b"other service\n");
    let (a, b, moved) = (free_port(), free_port(), free_port());
    let manager = UserManager::start(&[(CONFIG, &line(a, "@default", echo.port))]);
    wait_forwarding(a, b"a", b"a");

    // 1. A new line listens while the daemon runs and serves a live connection.
    let held_a = held_connection(a);
    let daemon = manager
        .main_pid("qrexec-connect.service")
        .expect("daemon runs");
    write_config(
        &manager,
        &(line(a, "@default", echo.port) + &line(b, "@default", echo.port)),
    );
    manager.daemon_reload();
    wait_forwarding(b, b"b", b"b");
    still_works(held_a, "binding a across adding b");

    // 3. A changed SERVICE is used by new connections; the old one goes on.
    let held_b = held_connection(b);
    write_config(
        &manager,
        &(line(a, "@default", echo.port) + &line(b, "@default", other.port)),
    );
    manager.daemon_reload();
    wait_forwarding(b, b"other service\n", b"");
    still_works(held_b, "binding b across its own change");

    // 4. A changed LISTEN listens on the new address only.
    let held_a = held_connection(a);
    write_config(
        &manager,
        &(line(moved, "@default", echo.port) + &line(b, "@default", other.port)),
    );
    manager.daemon_reload();
    wait_forwarding(moved, b"m", b"m");
    wait_refused(a);
    still_works(held_a, "binding a across its move");

    // 2. A removed line no longer listens.
    write_config(&manager, &line(moved, "@default", echo.port));
    manager.daemon_reload();
    wait_refused(b);
    wait_forwarding(moved, b"m", b"m");
    assert_ne!(manager.main_pid("qrexec-connect.service"), Some(daemon));
    let states = socket_states(&manager);
    assert!(!states.contains("failed"), "{states}");
}

#[test]
fn a_reload_without_changes_restarts_nothing_and_logs_nothing() {
    let echo = EchoServer::start();
    let a = free_port();
    let manager = UserManager::start(&[(CONFIG, &line(a, "@default", echo.port))]);
    wait_forwarding(a, b"a", b"a");
    let daemon = manager.main_pid("qrexec-connect.service").unwrap();
    // Wait until the start-up reconcile has recorded its state.
    let state = manager.ns_path("/run/user/0/qrexec-connect/applied");
    wait_for("the first reconcile", SETTLE, || {
        let text = std::fs::read_to_string(&state).ok()?;
        text.contains(&format!("127.0.0.1:{a}")).then_some(())
    });
    let entered = manager.property(&unit_for(a), "ActiveEnterTimestampMonotonic");
    let before = manager.journal(&[]).lines().count();
    let runs = |m: &UserManager| {
        m.property(
            "qrexec-connect-reconcile.service",
            "InactiveEnterTimestampMonotonic",
        )
    };
    let last_run = runs(&manager);
    manager.daemon_reload();
    // The reconcile still runs after the reload: wait for that, then check.
    wait_for("reconcile to run after the reload", SETTLE, || {
        (runs(&manager) != last_run).then_some(())
    });
    assert_eq!(manager.main_pid("qrexec-connect.service"), Some(daemon));
    assert_eq!(
        manager.property(&unit_for(a), "ActiveEnterTimestampMonotonic"),
        entered
    );
    let journal = manager.journal(&[]);
    let new_lines: Vec<&str> = journal.lines().skip(before).collect();
    let noisy: Vec<&&str> = new_lines
        .iter()
        .filter(|l| {
            l.contains("qrexec-connect") && !l.contains("Reloading") && !l.contains("Reloaded")
        })
        .collect();
    assert!(noisy.is_empty(), "a no-op reload logged: {noisy:#?}");
    wait_forwarding(a, b"a", b"a");
}

fn unit_for(port: u16) -> String {
    format!("qrexec-connect-127.0.0.1:{port}.socket")
}

#[test]
fn enable_now_of_a_hand_written_socket_works_while_the_daemon_serves() {
    let echo = EchoServer::start();
    let (a, hand) = (free_port(), free_port());
    let manager = UserManager::start(&[(CONFIG, &line(a, "@default", echo.port))]);
    wait_forwarding(a, b"a", b"a");
    let held = held_connection(a);
    assert!(manager.main_pid("qrexec-connect.service").is_some());
    std::fs::create_dir_all(manager.home.path().join(".config/systemd/user")).unwrap();
    std::fs::write(
        manager.home.path().join(".config/systemd/user/qrexec-connect-foo.socket"),
        format!(
            "[Socket]\nListenStream=127.0.0.1:{hand}\nFileDescriptorName=@default qubes.ConnectTCP+{}\n\n\
             [Install]\nWantedBy=sockets.target\n",
            echo.port
        ),
    )
    .unwrap();
    manager.daemon_reload();
    manager.systemctl_ok(&["enable", "--now", "qrexec-connect-foo.socket"]);
    wait_forwarding(hand, b"hand", b"hand");
    wait_forwarding(a, b"a", b"a");
    still_works(held, "binding a across enable --now of another socket");
    let messages = manager.messages();
    assert!(
        !messages.contains("can still be activated"),
        "the handover is not quiet:\n{messages}"
    );

    // And removing the hand-written unit is applied by a reload too.
    manager.systemctl_ok(&["disable", "qrexec-connect-foo.socket"]);
    std::fs::remove_file(
        manager
            .home
            .path()
            .join(".config/systemd/user/qrexec-connect-foo.socket"),
    )
    .unwrap();
    manager.daemon_reload();
    wait_refused(hand);
}

#[test]
fn a_burst_of_reloads_ends_in_the_right_state() {
    let echo = EchoServer::start();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let manager = UserManager::start(&[(CONFIG, &line(ports[0], "@default", echo.port))]);
    wait_forwarding(ports[0], b"x", b"x");
    for round in 0..10 {
        // Alternate between subsets so every reload changes something.
        let text: String = ports
            .iter()
            .enumerate()
            .filter(|(i, _)| (round + i) % 2 == 0 || *i == 3)
            .map(|(_, &p)| line(p, "@default", echo.port))
            .collect();
        write_config(&manager, &text);
        manager.daemon_reload();
    }
    // After round 9: indexes with (9 + i) even, i.e. 1 and 3.
    wait_forwarding(ports[1], b"1", b"1");
    wait_forwarding(ports[3], b"3", b"3");
    wait_refused(ports[0]);
    wait_refused(ports[2]);
    let states = socket_states(&manager);
    assert!(!states.contains("failed"), "{states}");
    manager.settle();
    let daemons = children_of(manager.manager_pid())
        .into_iter()
        .filter(|&pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args[0].ends_with(b"/qrexec-connect") && !args.contains(&&b"reconcile"[..])
        })
        .count();
    assert!(daemons <= 1, "{daemons} daemons run under the manager");
}

/// Every applied change restarts the daemon; the restarted one must not
/// run `qrexec-client-vm --help` again before its first connection (that
/// cost milliseconds of the next connection), unless the client binary
/// changed.
#[test]
fn a_restarted_daemon_remembers_its_client_mode_until_the_client_changes() {
    let echo = EchoServer::start();
    let (a, b, c) = (free_port(), free_port(), free_port());
    let log = std::env::temp_dir().join(format!("qc-probe-log-{}", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let manager = UserManager::start(&[(CONFIG, &line(a, "@default", echo.port))]);
    // The client is a copy in the scratch directory, so that the test can
    // put a new build in its place.
    let client = manager.scratch.path().join("qrexec-client-vm");
    std::fs::copy(DOUBLE, &client).unwrap();
    manager.write_file(
        "/run/systemd/user/qrexec-connect.service.d/client.conf",
        &format!(
            "[Service]\nEnvironment=QREXEC_DOUBLE_LOG={}\nExecStart=\n\
             ExecStart=/usr/bin/qrexec-connect --qrexec-client-vm={}\n",
            log.display(),
            client.display()
        ),
    );
    manager.daemon_reload();
    manager.settle();
    let probes = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"--help\""))
            .count()
    };
    // The probe runs beside the first connection (issue 19), and the
    // double logs a call when it exits: wait for the line.
    let probed = |n: usize, what: &str| {
        wait_for(what, SETTLE, || (probes() >= n).then_some(()));
        assert_eq!(probes(), n, "{what}");
    };
    wait_forwarding(a, b"a", b"a");
    probed(1, "the first start probes");

    write_config(
        &manager,
        &(line(a, "@default", echo.port) + &line(b, "@default", echo.port)),
    );
    manager.daemon_reload();
    wait_forwarding(b, b"b", b"b");
    assert_eq!(probes(), 1, "the restarted daemon probed again");

    // A new build of the client (here: its inode changes) is probed again.
    let copy = manager.scratch.path().join("qrexec-client-vm.new");
    std::fs::copy(&client, &copy).unwrap();
    std::fs::rename(&copy, &client).unwrap();
    write_config(
        &manager,
        &(line(a, "@default", echo.port) + &line(c, "@default", echo.port)),
    );
    manager.daemon_reload();
    wait_forwarding(c, b"c", b"c");
    // Exactly two: the restart in between did not probe either.
    probed(2, "a changed client is probed, and only it");
    let _ = std::fs::remove_file(&log);
}

/// `qrexec-connect status --json` inside the manager's namespace: its rows.
fn status_rows(manager: &UserManager) -> Vec<String> {
    let output = run(manager.command("qrexec-connect").args(["status", "--json"]));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .map(str::to_owned)
        .collect()
}

/// Issue 17, item 1. Every LISTEN but `ADDRESS:PORT` gives a unit name
/// with a `\` (systemd-escape turns `-` and `/` into `\x2d` and `-`), and
/// `systemctl show` quotes such names in a list (`Wants=`). Each form,
/// added to a running session by one daemon-reload while the daemon
/// serves another binding, must listen and answer, and status must not
/// ask for a reload that would not help.
#[test]
fn reload_adds_bindings_whose_unit_names_have_escapes() {
    let echo = EchoServer::start();
    let first = free_port();
    let mut config = line(first, "@default", echo.port);
    let manager = UserManager::start(&[(CONFIG, &config)]);
    wait_forwarding(first, b"first", b"first");
    manager.settle();
    assert!(manager.main_pid("qrexec-connect.service").is_some());

    let path = manager.scratch.path().join("path-with-dash.sock");
    let abstract_name = format!("qrexec-connect-test-{}-name-with-dash", std::process::id());
    let added = [
        (
            "%t/qrexec-connect/my-agent".to_owned(),
            Endpoint::Path(manager.ns_path("/run/user/0/qrexec-connect/my-agent")),
        ),
        (path.display().to_string(), Endpoint::Path(path.clone())),
        (
            format!("@{abstract_name}"),
            Endpoint::Abstract(abstract_name),
        ),
    ];
    for (listen, endpoint) in &added {
        config += &format!("{listen} @default qubes.ConnectTCP+{}\n", echo.port);
        write_config(&manager, &config);
        manager.daemon_reload();
        let data = random_bytes(4096, 17);
        let answered = wait_for(
            &format!("{listen}, added by one daemon-reload, to answer"),
            SETTLE,
            || round_trip(endpoint.connect().ok()?, data.clone(), LIMIT).ok(),
        );
        assert!(answered == data, "{listen}: the answer differs");
        wait_forwarding(first, b"still", b"still");
    }

    manager.settle();
    let rows = status_rows(&manager);
    for (listen, _) in &added {
        let row = rows
            .iter()
            .find(|row| row.contains(&format!("\"listen\": \"{listen}\"")))
            .unwrap_or_else(|| panic!("no status row for {listen}:\n{rows:#?}"));
        assert!(
            row.contains("\"state\": \"listening\"") && !row.contains("daemon-reload"),
            "status for {listen}: {row}"
        );
    }
}
