//! The reload path under faults, on a real user manager: a reload that lands
//! while the daemon is still starting, a reload flag that cannot be removed
//! as a file, a manager without `XDG_RUNTIME_DIR`, and a runtime directory
//! with planted symlinks. Each must end with every binding as configured and
//! reload handling still on; none may write through a symlink.

mod common;

use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::user_manager::UserManager;
use common::*;

const SETTLE: Duration = Duration::from_secs(15);
const CONFIG: &str = ".config/qrexec-connect/test.conf";
const OUR_DIR: &str = "/run/user/0/qrexec-connect";

fn line(port: u16, service_port: u16) -> String {
    format!("127.0.0.1:{port} @default qubes.ConnectTCP+{service_port}\n")
}

fn exchange(port: u16, data: &[u8]) -> Option<Vec<u8>> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    round_trip(Box::new(stream), data.to_vec(), Duration::from_secs(5)).ok()
}

fn wait_forwarding(port: u16) {
    wait_for(&format!("127.0.0.1:{port} to forward"), SETTLE, || {
        (exchange(port, b"ping")? == b"ping").then_some(())
    });
}

fn wait_refused(manager: &UserManager, port: u16) {
    let refused = || match TcpStream::connect(("127.0.0.1", port)) {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    };
    let deadline = std::time::Instant::now() + SETTLE;
    while !refused() {
        assert!(
            std::time::Instant::now() < deadline,
            "127.0.0.1:{port} still accepts connections (a ghost binding)\n\
             state file: {:?}\n{}",
            std::fs::read_to_string(manager.ns_path(&format!("{OUR_DIR}/applied"))),
            manager.messages()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_config(manager: &UserManager, text: &str) {
    std::fs::write(manager.home.path().join(CONFIG), text).unwrap();
}

/// Reload handling still works: a new line listens after one daemon-reload.
fn assert_a_reload_still_applies(manager: &UserManager, config: &str, echo: &EchoServer) {
    let new = free_port();
    write_config(manager, &format!("{config}{}", line(new, echo.port)));
    manager.daemon_reload();
    wait_for("a binding added by daemon-reload to answer", SETTLE, || {
        (exchange(new, b"new")? == b"new").then_some(())
    });
    let path_unit = manager.property("qrexec-connect-reconcile.path", "ActiveState");
    assert_eq!(path_unit, "active", "{}", manager.messages());
}

/// A manager with one binding that forwards, settled: the echo server behind
/// it, its config text and the manager.
fn one_binding(run_units: &[(&str, &str)]) -> (EchoServer, String, UserManager) {
    let echo = EchoServer::start();
    let first = free_port();
    let config = line(first, echo.port);
    let manager = UserManager::start_with(&[(CONFIG, &config)], run_units);
    wait_forwarding(first);
    manager.settle();
    (echo, config, manager)
}

/// Issue 9, item 1. The daemon holds every socket's fd and name from the
/// moment it is started, not from when it reports ready: a reload that
/// lands while it is still starting must stop it too, or a removed binding
/// keeps answering through the daemon's copy of its socket.
#[test]
fn a_reload_while_the_daemon_starts_leaves_no_ghost_binding() {
    let echo = EchoServer::start();
    let (kept, removed) = (free_port(), free_port());
    let both = line(kept, echo.port) + &line(removed, echo.port);
    let manager = UserManager::start(&[(CONFIG, &both)]);
    // The daemon serves from the moment it runs (its client probe no
    // longer holds up readiness, issue 19), so the start is held open by
    // an ExecStartPost= that waits for the test: the unit stays
    // `activating` while the daemon already holds every socket.
    let release = manager.scratch.path().join("release-start");
    manager.write_file(
        "/run/systemd/user/qrexec-connect.service.d/slow-start.conf",
        &format!(
            "[Service]\nExecStartPost=timeout 30 sh -c 'until [ -e {release} ]; do sleep 0.1; done'\n",
            release = release.display()
        ),
    );
    manager.daemon_reload();
    manager.settle();

    // The first connection starts the daemon, whose start then waits.
    let first = std::thread::spawn(move || exchange(kept, b"first"));
    wait_for("the daemon to be starting", SETTLE, || {
        (manager.property("qrexec-connect.service", "ActiveState") == "activating").then_some(())
    });
    write_config(&manager, &line(kept, echo.port));
    manager.daemon_reload();
    manager.settle();
    std::fs::write(&release, "").unwrap();

    assert_eq!(first.join().unwrap().as_deref(), Some(&b"first"[..]));
    wait_forwarding(kept);
    wait_refused(&manager, removed);
    // And it stays gone: later reloads see the true state.
    manager.daemon_reload();
    manager.settle();
    wait_forwarding(kept);
    wait_refused(&manager, removed);
    let applied = std::fs::read_to_string(manager.ns_path(&format!("{OUR_DIR}/applied"))).unwrap();
    assert!(
        !applied.contains(&format!(":{removed}")),
        "the state file records a removed binding:\n{applied}"
    );
}

/// Issue 9, item 4. Whatever stands at the flag's path, the reconcile step
/// clears it before it can fail, so the path unit never hits its start
/// limit and later reloads are still applied.
#[test]
fn a_directory_at_the_reload_flag_does_not_switch_reloads_off() {
    let (echo, config, manager) = one_binding(&[]);

    let flag = manager.ns_path(&format!("{OUR_DIR}/reload-requested"));
    std::fs::create_dir_all(flag.join("planted/deeper")).unwrap();
    std::fs::write(flag.join("planted/file"), "x").unwrap();
    wait_for("the planted flag to be handled", SETTLE, || {
        let path_state = manager.property("qrexec-connect-reconcile.path", "ActiveState");
        (!flag.exists() || path_state == "failed").then_some(())
    });
    // If it was handled by failing, the cause goes away now; reloads must
    // work from here on either way.
    let _ = std::fs::remove_dir_all(&flag);
    assert_a_reload_still_applies(&manager, &config, &echo);
}

/// Issue 9, item 4, second cause: the reconcile step runs without
/// `XDG_RUNTIME_DIR` in its environment (here a drop-in unsets it). It
/// still finds the flag, because the unit tells it where `%t` is.
#[test]
fn reloads_apply_when_the_environment_lacks_xdg_runtime_dir() {
    let (echo, config, manager) = one_binding(&[(
        "qrexec-connect-reconcile.service.d/no-runtime-dir.conf",
        "[Service]\nUnsetEnvironment=XDG_RUNTIME_DIR\n",
    )]);
    // Twice: the first reload may land before the start limit is reached.
    assert_a_reload_still_applies(&manager, &config, &echo);
    let config = std::fs::read_to_string(manager.home.path().join(CONFIG)).unwrap();
    assert_a_reload_still_applies(&manager, &config, &echo);
}

/// Issue 9, item 9. The state is written to a fresh private file and
/// renamed into place: a symlink planted at the temporary name is not
/// followed, the state file is 0600, and a missing directory is recreated
/// 0700.
#[test]
fn reconcile_writes_its_state_privately_and_never_through_a_symlink() {
    let (echo, config, manager) = one_binding(&[]);

    let victim = manager.scratch.path().join("victim.txt");
    std::fs::write(&victim, "precious\n").unwrap();
    let dir = manager.ns_path(OUR_DIR);
    std::os::unix::fs::symlink(&victim, dir.join("applied.tmp")).unwrap();
    assert_a_reload_still_applies(&manager, &config, &echo);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");

    let applied = std::fs::symlink_metadata(dir.join("applied")).unwrap();
    assert!(applied.file_type().is_file());
    assert_eq!(applied.permissions().mode() & 0o777, 0o600, "applied");

    // Without the generator having run first (nothing recreates it).
    std::fs::remove_dir_all(&dir).unwrap();
    manager.systemctl_ok(&["start", "qrexec-connect-reconcile.service"]);
    let made = std::fs::symlink_metadata(&dir).unwrap();
    assert!(made.is_dir());
    assert_eq!(made.permissions().mode() & 0o777, 0o700, "{OUR_DIR}");
    assert_eq!(made.uid(), 0);
    let applied = std::fs::symlink_metadata(dir.join("applied")).unwrap();
    assert_eq!(applied.permissions().mode() & 0o777, 0o600, "applied");
}

/// Issue 17, item 1, second part. `\xff\xfe` (not UTF-8) in one of the
/// files under `%t/qrexec-connect/` counts as empty: a reconcile run with
/// the garbage there succeeds, a binding added by daemon-reload answers, and
/// the file is written anew as text (`rewritten`: who rewrites it when).
fn garbage_counts_as_empty(file: &str, rewritten: Rewritten) {
    let (echo, config, manager) = one_binding(&[]);
    let path = manager.ns_path(&format!("{OUR_DIR}/{file}"));
    // Put in place whole (a rename), as a reader would meet it.
    let garbage = manager.ns_path(&format!("{OUR_DIR}/{file}.garbage"));
    std::fs::write(&garbage, b"\xff\xfe").unwrap();
    std::fs::rename(&garbage, &path).unwrap();

    // Raised as the generator raises it (unless the garbage is the flag),
    // so the reconcile step meets the garbage before any generator run
    // replaces it.
    let flag = manager.ns_path(&format!("{OUR_DIR}/reload-requested"));
    if path != flag {
        std::fs::write(&flag, b"").unwrap();
    }
    manager.settle();
    assert_eq!(
        manager.property("qrexec-connect-reconcile.service", "Result"),
        "success",
        "reconcile with garbage in {file}:\n{}",
        manager.messages()
    );

    assert_a_reload_still_applies(&manager, &config, &echo);
    match rewritten {
        Rewritten::AsText => wait_for(&format!("{file} to be rewritten as text"), SETTLE, || {
            let bytes = std::fs::read(&path).ok()?;
            (!bytes.is_empty() && std::str::from_utf8(&bytes).is_ok()).then_some(())
        }),
        Rewritten::Lowered => assert!(!path.exists(), "{file} is still there"),
    }
}

/// The recovery step's history (`recovery`) is read only when systemd gave
/// up on the daemon: garbage there must not keep the bindings down.
#[test]
fn garbage_in_the_recovery_history_counts_as_none() {
    let (echo, config, manager) = one_binding(&[]);
    let port: u16 = config
        .split([':', ' '])
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap();
    let history = manager.ns_path(&format!("{OUR_DIR}/recovery"));
    std::fs::write(&history, b"\xff\xfe").unwrap();
    // Kill the daemon after a connection until systemd stops its sockets
    // (start limit: 5 starts in 10 s), which starts the recovery step.
    for _ in 0..5 {
        wait_forwarding(port);
        manager.kill_daemon(SETTLE);
    }
    let _ = exchange(port, b"sixth start");
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while exchange(port, b"ping").as_deref() != Some(b"ping") {
        assert!(
            std::time::Instant::now() < deadline,
            "the binding did not come back by itself:\n{}",
            manager.messages()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read(&history).unwrap();
    let text = String::from_utf8(text).expect("the history is rewritten as text");
    assert!(
        text.starts_with("1 "),
        "a first recovery in a row: {text:?}"
    );
    assert_a_reload_still_applies(&manager, &config, &echo);
}

/// What becomes of a state file once a binding was added.
enum Rewritten {
    /// Written again, as text, by the reload or the connections after it.
    AsText,
    /// Removed (the reload flag).
    Lowered,
}

#[test]
fn garbage_in_the_applied_state_counts_as_empty() {
    garbage_counts_as_empty("applied", Rewritten::AsText);
}

#[test]
fn garbage_in_the_generators_record_counts_as_empty() {
    garbage_counts_as_empty("generated", Rewritten::AsText);
}

#[test]
fn garbage_in_the_remembered_client_mode_counts_as_unknown() {
    garbage_counts_as_empty("client-mode", Rewritten::AsText);
}

#[test]
fn garbage_in_the_published_counters_counts_as_empty() {
    garbage_counts_as_empty("connections", Rewritten::AsText);
}

#[test]
fn garbage_in_the_reload_flag_still_raises_it() {
    garbage_counts_as_empty("reload-requested", Rewritten::Lowered);
}
