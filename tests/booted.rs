//! The .deb in a booted Debian 12, as users get it in a Qubes template: a
//! Debian 12 system booted with systemd-nspawn (systemd as PID 1), with
//! user `user` (uid 1000) whose user manager runs because it lingers, the
//! qrexec-client-vm double as /usr/bin/qrexec-client-vm, and the package
//! installed with `apt-get install ./qrexec-connect_*.deb` while that
//! session runs. Then, as `user`: a config line and a daemon-reload serve;
//! a refused call shows in `status`, `status --json` and the journal; a
//! `%t` socket is the user's, mode 0600; `policy --source` prints the rule;
//! `systemctl restart user@1000` brings the bindings back; purge stops them
//! and leaves no file; with lingering and no login the bindings listen
//! after boot; an upgrade restarts the daemon without cutting a held
//! connection.
//!
//! The harness is tests/common/debian_root.rs (`Booted`). Inside the fresh
//! Debian run of tests/fresh_debian.rs these tests only check that they are
//! there (the outer run runs them).

mod common;
#[path = "common/debian_root.rs"]
mod debian_root;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{free_port, round_trip, run, wait_for, workspace, EchoServer, DOUBLE};
use debian_root::{cached_root, inside_fresh_root, Booted, RootSpec, USER_RUNTIME_DIR};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// Debian 12 with systemd booting it, user `user` (uid 1000) lingering:
/// logind starts user@1000.service at boot, without a login.
const BOOTED_DEBIAN: RootSpec = RootSpec {
    name: "booted-debian-12",
    variant: "minbase",
    include: &[
        "systemd-sysv",
        "dbus",
        "dbus-user-session",
        "libpam-systemd",
    ],
    customize: &[
        "chroot \"$1\" useradd --create-home --uid 1000 --shell /bin/bash user",
        "mkdir -p \"$1/var/lib/systemd/linger\" && touch \"$1/var/lib/systemd/linger/user\"",
    ],
};

const SETTLE: Duration = Duration::from_secs(30);
const CONFIG: &str = ".config/qrexec-connect/booted.conf";
/// The double's policy: dom0's answer, written by the tests.
const POLICY: &str = "/etc/qrexec-double.policy";

fn version() -> String {
    std::fs::read_to_string(workspace().join("version"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The client .deb of `make deb`, built again when a tracked file is newer
/// (`make deb` packs the tracked files).
fn client_deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let deb = workspace().join(format!(
            "target/dist/deb/qrexec-connect_{}_amd64.deb",
            version()
        ));
        let built = std::fs::metadata(&deb).and_then(|m| m.modified()).ok();
        let tracked = run(Command::new("git")
            .arg("-C")
            .arg(workspace())
            .args(["ls-files", "-z"]));
        assert!(tracked.status.success(), "git ls-files failed");
        let stale = built.is_none_or(|built| {
            tracked
                .stdout
                .split(|&b| b == 0)
                .filter(|name| !name.is_empty())
                .any(|name| {
                    let path = workspace().join(String::from_utf8_lossy(name).as_ref());
                    std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .is_ok_and(|changed| changed > built)
                })
        });
        if stale {
            let output = run(Command::new("make")
                .args(["-s", "-C"])
                .arg(workspace())
                .arg("deb"));
            assert!(
                output.status.success(),
                "make deb failed:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        assert!(deb.exists(), "make deb made no {}", deb.display());
        deb
    })
}

fn deb_name() -> String {
    format!("qrexec-connect_{}_amd64.deb", version())
}

/// The version of the upgrade: higher than the built one.
fn upgrade_version() -> String {
    format!("{}+upgrade1", version())
}

fn upgrade_deb_name() -> String {
    format!("qrexec-connect_{}_amd64.deb", upgrade_version())
}

/// The client .deb rebuilt with a higher version (its files and maintainer
/// scripts are those of `make deb`'s): what an upgrade installs.
fn upgrade_deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let dir = common::user_manager::target_dir().join("debian-roots/upgrade-deb");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tree = dir.join("tree");
        let deb = dir.join(upgrade_deb_name());
        let script = "set -e
            dpkg-deb --raw-extract \"$1\" \"$2\"
            sed -i \"s/^Version: .*/Version: $3/\" \"$2/DEBIAN/control\"
            dpkg-deb --root-owner-group --build \"$2\" \"$4\" >/dev/null";
        let output = run(Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(client_deb())
            .arg(&tree)
            .arg(upgrade_version())
            .arg(&deb));
        assert!(
            output.status.success(),
            "repacking the .deb with version {} failed: {}",
            upgrade_version(),
            String::from_utf8_lossy(&output.stderr)
        );
        deb
    })
}

fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| cached_root(&BOOTED_DEBIAN))
}

/// A booted system with the double in place and the .deb copied in, not
/// installed yet; user@1000 runs.
fn booted(tag: &str) -> Booted {
    let mut system = Booted::new(root(), tag);
    system.put(
        "/usr/bin/qrexec-client-vm",
        &std::fs::read(DOUBLE).unwrap(),
        0o755,
    );
    system.put(
        &format!("/srv/{}", deb_name()),
        &std::fs::read(client_deb()).unwrap(),
        0o644,
    );
    system.put(
        &format!("/srv/{}", upgrade_deb_name()),
        &std::fs::read(upgrade_deb()).unwrap(),
        0o644,
    );
    // The double reads its policy from the environment: every user
    // service gets it (no file of ours is named after the package).
    system.put(
        "/etc/systemd/user.conf.d/qrexec-double.conf",
        format!("[Manager]\nDefaultEnvironment=QREXEC_DOUBLE_POLICY={POLICY}\n").as_bytes(),
        0o644,
    );
    system.put(POLICY, b"", 0o644);
    system.boot();
    system.wait_user_manager();
    system
}

/// `apt-get install ./NAME` in /srv, where the .debs were put, as root.
fn apt_install(system: &Booted, name: &str) -> String {
    system.stdout(system.command("sh").args([
        "-c",
        "cd /srv && DEBIAN_FRONTEND=noninteractive apt-get install -y \"./$1\"",
        "sh",
        name,
    ]))
}

/// A booted system with the package installed by apt while user@1000 runs.
fn installed(tag: &str) -> Booted {
    let system = booted(tag);
    apt_install(&system, &deb_name());
    system
}

/// Allows `qubes.ConnectTCP +PORT` from `client` to `server` for each port
/// of `allowed`, denies every other call.
fn write_policy(system: &Booted, allowed: &[u16]) {
    let mut policy: String = allowed
        .iter()
        .map(|port| format!("qubes.ConnectTCP +{port} client server allow\n"))
        .collect();
    policy.push_str("qubes.ConnectTCP * @anyvm @anyvm deny\n");
    std::fs::write(system.path(POLICY), policy).unwrap();
}

/// Writes the user's config file (as the user) and runs daemon-reload.
fn configure(system: &Booted, lines: &str) {
    system.stdout(
        system
            .user_command("sh")
            .args([
                "-c",
                "mkdir -p \"$(dirname \"$1\")\" && printf %s \"$2\" > \"$1\"",
            ])
            .args(["sh", &format!("/home/user/{CONFIG}"), lines]),
    );
    system.stdout(
        system
            .user_command("systemctl")
            .args(["--user", "daemon-reload"]),
    );
}

fn line(port: u16, service_port: u16) -> String {
    format!("127.0.0.1:{port} server qubes.ConnectTCP+{service_port}\n")
}

fn exchange(port: u16, data: &[u8]) -> Option<Vec<u8>> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    round_trip(Box::new(stream), data.to_vec(), Duration::from_secs(5)).ok()
}

/// Waits until 127.0.0.1:PORT forwards to the echo server.
fn wait_forwarding(system: &Booted, port: u16, what: &str) {
    let deadline = Instant::now() + SETTLE;
    while exchange(port, b"ping").as_deref() != Some(b"ping") {
        assert!(
            Instant::now() < deadline,
            "{what}: 127.0.0.1:{port} does not forward\n{}\n{}",
            user_sockets(system),
            journal(system)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_refused(port: u16, what: &str) {
    common::wait_refused(what, port, SETTLE);
}

fn user_sockets(system: &Booted) -> String {
    String::from_utf8_lossy(
        &run(system.user_command("systemctl").args([
            "--user",
            "list-sockets",
            "--all",
            "--no-pager",
        ]))
        .stdout,
    )
    .into_owned()
}

/// The system's journal (every user's too), for failure reports.
fn journal(system: &Booted) -> String {
    String::from_utf8_lossy(
        &run(system.command("journalctl").args([
            "--no-pager",
            "-o",
            "short-monotonic",
            "-n",
            "80",
        ]))
        .stdout,
    )
    .into_owned()
}

/// The user's daemon's main pid, if it runs.
fn daemon_pid(system: &Booted) -> Option<u32> {
    system
        .stdout(system.user_command("systemctl").args([
            "--user",
            "show",
            "-p",
            "MainPID",
            "--value",
            "qrexec-connect.service",
        ]))
        .trim()
        .parse()
        .ok()
        .filter(|&pid| pid != 0)
}

/// The value of `key` in one line of `status --json`.
fn json_field(row: &str, key: &str) -> Option<String> {
    let pattern = format!("\"{key}\": ");
    let rest = &row[row.find(&pattern)? + pattern.len()..];
    Some(match rest.strip_prefix('"') {
        Some(text) => text[..text.find('"')?].to_owned(),
        None => rest.split([',', '}']).next()?.trim().to_owned(),
    })
}

#[test]
fn apt_installs_the_deb_into_a_running_lingering_session_and_one_line_serves() {
    if inside_fresh_root("booted") {
        return;
    }
    let started = Instant::now();
    let system = booted("install");
    // The session runs before the install: lingering, no login.
    assert_eq!(
        system
            .stdout(
                system
                    .command("systemctl")
                    .args(["is-active", "user@1000.service"])
            )
            .trim(),
        "active"
    );
    let output = apt_install(&system, &deb_name());
    assert!(output.contains("Setting up qrexec-connect"), "{output}");
    let echo = EchoServer::start();
    write_policy(&system, &[echo.port]);
    let port = free_port();
    configure(&system, &line(port, echo.port));
    wait_forwarding(
        &system,
        port,
        "one line and a daemon-reload after apt-get install",
    );
    // The daemon ran the client at its default path, where the double
    // stands in for Qubes' qrexec-client-vm; the journal names the call.
    let log = system.stdout(system.command("journalctl").args([
        "--no-pager",
        "-o",
        "cat",
        "_UID=1000",
        "-t",
        "qrexec-connect",
    ]));
    assert!(log.contains("server"), "{log}");
    eprintln!("{:.1?}", started.elapsed());
}

/// `qrexec-connect status --json` as the user: its object lines.
fn status_rows(system: &Booted) -> Vec<String> {
    let output = run(system
        .user_command("qrexec-connect")
        .args(["status", "--json"]));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with('{'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_refused_call_shows_in_status_its_json_and_the_journal_in_words() {
    if inside_fresh_root("booted") {
        return;
    }
    let started = Instant::now();
    let system = installed("refused");
    let echo = EchoServer::start();
    let forbidden = free_port(); // a service port no rule allows
    write_policy(&system, &[echo.port]);
    let (good, refused) = (free_port(), free_port());
    configure(
        &system,
        &(line(good, echo.port) + &line(refused, forbidden)),
    );
    wait_forwarding(&system, good, "the allowed binding");
    assert_ne!(exchange(refused, b"ping").as_deref(), Some(&b"ping"[..]));

    let listen = format!("127.0.0.1:{refused}");
    let row = wait_for("status --json to show the refusal", SETTLE, || {
        status_rows(&system).into_iter().find(|row| {
            json_field(row, "listen").as_deref() == Some(listen.as_str())
                && json_field(row, "last_result")
                    .is_some_and(|result| result.contains("refused by qrexec policy"))
        })
    });
    assert_eq!(
        json_field(&row, "state").as_deref(),
        Some("listening"),
        "{row}"
    );
    // The rule that would allow it (outside Qubes the qube's own name is
    // unknown: THIS-QUBE).
    assert!(
        json_field(&row, "hint").is_some_and(|hint| hint.contains(&format!(
            "qubes.ConnectTCP +{forbidden} THIS-QUBE server allow"
        ))),
        "{row}"
    );
    let plain = run(system.user_command("qrexec-connect").arg("status"));
    let text = String::from_utf8_lossy(&plain.stdout);
    assert_eq!(
        plain.status.code(),
        Some(1),
        "a refusal is not healthy:\n{text}"
    );
    assert!(
        text.contains("refused by qrexec policy") && text.contains("booted.conf:2"),
        "{text}"
    );
    // The journal says it in words, with the binding's fields.
    let journal = wait_for("the refusal in the journal", SETTLE, || {
        let text = system.stdout(system.command("journalctl").args([
            "--no-pager",
            "-o",
            "cat",
            "_UID=1000",
            "SYSLOG_IDENTIFIER=qrexec-connect",
            &format!("LISTEN={listen}"),
        ]));
        text.contains("refused by qrexec policy").then_some(text)
    });
    assert!(journal.contains(&format!("+{forbidden}")), "{journal}");
    eprintln!("{:.1?}", started.elapsed());
}

#[test]
fn a_runtime_dir_socket_belongs_to_the_user_with_mode_0600() {
    if inside_fresh_root("booted") {
        return;
    }
    let started = Instant::now();
    let system = installed("socket");
    let echo = EchoServer::start();
    write_policy(&system, &[echo.port]);
    // The README's form: its unit name has a `\x2d`, which reconcile must
    // read back from systemctl's quoted Wants= (issue 17).
    configure(
        &system,
        &format!(
            "%t/qrexec-connect/booted-agent server qubes.ConnectTCP+{}\n",
            echo.port
        ),
    );
    let socket = format!("{USER_RUNTIME_DIR}/qrexec-connect/booted-agent");
    let path = system.path(&socket);
    let metadata = wait_for(&format!("{socket} to exist"), SETTLE, || {
        std::fs::symlink_metadata(&path).ok()
    });
    assert!(metadata.file_type().is_socket(), "{socket} is not a socket");
    assert_eq!(metadata.uid(), 1000, "{socket} is not user's");
    assert_eq!(
        metadata.mode() & 0o7777,
        0o600,
        "{socket}: mode {:o}",
        metadata.mode()
    );
    let dir = std::fs::metadata(path.parent().unwrap()).unwrap();
    assert_eq!(
        (dir.uid(), dir.mode() & 0o7777),
        (1000, 0o700),
        "its directory"
    );
    // And it serves (root may connect; other users may not, by its mode).
    let served = wait_for("the socket to forward", SETTLE, || {
        let stream = std::os::unix::net::UnixStream::connect(&path).ok()?;
        round_trip(Box::new(stream), b"ping".to_vec(), Duration::from_secs(5)).ok()
    });
    assert_eq!(served, b"ping");
    eprintln!("{:.1?}", started.elapsed());
}

#[test]
fn policy_with_source_prints_the_rule_for_each_binding() {
    if inside_fresh_root("booted") {
        return;
    }
    let started = Instant::now();
    let system = installed("policy");
    let (port, service) = (free_port(), free_port());
    configure(&system, &line(port, service));
    let rules = system.stdout(
        system
            .user_command("qrexec-connect")
            .args(["policy", "--source", "work"]),
    );
    assert!(
        rules
            .lines()
            .any(|rule| rule == format!("qubes.ConnectTCP +{service} work server allow")),
        "{rules}"
    );
    // Outside Qubes (no qubesdb) the qube's name must be given.
    let output = run(system.user_command("qrexec-connect").arg("policy"));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--source NAME"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{:.1?}", started.elapsed());
}

#[test]
fn restarting_user_1000_brings_the_bindings_back() {
    if inside_fresh_root("booted") {
        return;
    }
    let started = Instant::now();
    let system = installed("relogin");
    let echo = EchoServer::start();
    write_policy(&system, &[echo.port]);
    let port = free_port();
    configure(&system, &line(port, echo.port));
    wait_forwarding(&system, port, "before the restart");
    let manager = |system: &Booted| {
        system
            .stdout(system.command("systemctl").args([
                "show",
                "-p",
                "MainPID",
                "--value",
                "user@1000.service",
            ]))
            .trim()
            .to_owned()
    };
    let before = manager(&system);
    system.stdout(
        system
            .command("systemctl")
            .args(["restart", "user@1000.service"]),
    );
    assert_ne!(manager(&system), before, "user@1000 was not restarted");
    // The new manager brings the binding back, with no daemon-reload by
    // the user.
    system.wait_user_manager();
    wait_forwarding(&system, port, "after systemctl restart user@1000");
    eprintln!("{:.1?}", started.elapsed());
}

#[test]
fn purge_stops_the_bindings_and_leaves_no_file() {
    if inside_fresh_root("booted") {
        return;
    }
    let started = Instant::now();
    let system = installed("purge");
    let echo = EchoServer::start();
    write_policy(&system, &[echo.port]);
    let port = free_port();
    let agent = format!("{USER_RUNTIME_DIR}/qrexec-connect/purge-agent");
    configure(
        &system,
        &format!(
            "{}%t/qrexec-connect/purge-agent server qubes.ConnectTCP+{}\n",
            line(port, echo.port),
            echo.port
        ),
    );
    wait_forwarding(&system, port, "before the purge");
    wait_for(&format!("{agent} to listen"), SETTLE, || {
        std::os::unix::net::UnixStream::connect(system.path(&agent)).ok()
    });
    let files = system.stdout(system.command("dpkg").args(["-L", "qrexec-connect"]));
    system.stdout(system.command("env").args([
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "purge",
        "-y",
        "qrexec-connect",
    ]));
    wait_refused(port, "after apt-get purge");
    // Nothing of the package's is left in the system, but the user's own
    // config.
    let mut left: Vec<String> = files
        .lines()
        .filter(|path| path.contains("qrexec"))
        .filter(|path| std::fs::symlink_metadata(system.path(path)).is_ok())
        .map(str::to_owned)
        .collect();
    let found = system.stdout(system.command("find").args([
        "/etc",
        "/usr",
        "/var",
        "-name",
        "*qrexec-connect*",
    ]));
    left.extend(found.lines().map(str::to_owned));
    assert!(left.is_empty(), "left after purge: {left:#?}");
    assert!(
        system.path(&format!("/home/user/{CONFIG}")).exists(),
        "purge removed the user's config"
    );
    // Nor in the running session: the prerm removed, as the user, our
    // runtime directory (state and the agent's socket) and the generated
    // units, before any daemon-reload.
    let session = system.stdout(system.command("find").args([
        USER_RUNTIME_DIR,
        "/home/user",
        "-name",
        "*qrexec-connect*",
        "-not",
        "-path",
        "/home/user/.config/qrexec-connect",
        "-not",
        "-path",
        &format!("/home/user/{CONFIG}"),
    ]));
    assert_eq!(session.trim(), "", "left in user's session after purge");
    // The manager forgets the stopped units at its next daemon-reload.
    system.stdout(
        system
            .user_command("systemctl")
            .args(["--user", "daemon-reload"]),
    );
    let units = system.stdout(system.user_command("systemctl").args([
        "--user",
        "list-units",
        "--all",
        "--plain",
        "--no-legend",
        "qrexec-connect*",
    ]));
    assert_eq!(units.trim(), "", "units left after purge and daemon-reload");
    eprintln!("{:.1?}", started.elapsed());
}

#[test]
fn with_lingering_and_no_login_the_bindings_listen_after_boot() {
    if inside_fresh_root("booted") {
        return;
    }
    let started = Instant::now();
    // The template: the package; the user's home: a config line.
    let mut system = installed("linger");
    let echo = EchoServer::start();
    write_policy(&system, &[echo.port]);
    let port = free_port();
    configure(&system, &line(port, echo.port));
    wait_forwarding(&system, port, "before the reboot");
    // The qube boots; nobody logs in, nothing runs as the user.
    system.reboot();
    let sessions = system.stdout(
        system
            .command("loginctl")
            .args(["list-sessions", "--no-legend"]),
    );
    assert_eq!(sessions.trim(), "", "someone logged in");
    wait_for("user@1000 to run (lingering)", SETTLE, || {
        let state = system.stdout(system.command("systemctl").args([
            "show",
            "-p",
            "ActiveState",
            "--value",
            "user@1000.service",
        ]));
        (state.trim() == "active").then_some(())
    });
    wait_forwarding(&system, port, "after boot, with no login");
    eprintln!("{:.1?}", started.elapsed());
}

/// Last: the check of a maintainer-script change made on another branch
/// (the postinst's try-restart of the running daemons after an upgrade).
#[test]
fn an_upgrade_restarts_the_daemon_without_cutting_a_held_connection() {
    if inside_fresh_root("booted") {
        return;
    }
    use std::io::{Read, Write};
    let started = Instant::now();
    let system = installed("upgrade");
    let echo = EchoServer::start();
    write_policy(&system, &[echo.port]);
    let port = free_port();
    configure(&system, &line(port, echo.port));
    wait_forwarding(&system, port, "before the upgrade");
    let mut held = TcpStream::connect(("127.0.0.1", port)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let echoed = |held: &mut TcpStream, data: &[u8]| {
        held.write_all(data).unwrap();
        let mut received = vec![0; data.len()];
        held.read_exact(&mut received).map(|_| received)
    };
    assert_eq!(echoed(&mut held, b"before").unwrap(), b"before");
    let before = daemon_pid(&system).expect("the daemon runs");

    let output = apt_install(&system, &upgrade_deb_name());
    assert!(output.contains(&upgrade_version()), "{output}");
    let after = wait_for_or(SETTLE, || daemon_pid(&system).filter(|&pid| pid != before))
        .unwrap_or_else(|| {
            panic!(
                "the upgrade did not restart the daemon: pid {before} still serves \
                 (the postinst restarts running daemons with try-restart)\n{output}"
            )
        });
    assert_ne!(after, before);
    match echoed(&mut held, b"after the upgrade") {
        Ok(received) => assert_eq!(received, b"after the upgrade"),
        Err(e) => panic!("the upgrade cut the held connection: {e}"),
    }
    wait_forwarding(&system, port, "after the upgrade");
    eprintln!("{:.1?}", started.elapsed());
}

/// Polls `check` until it returns Some, or None once `limit` passed.
fn wait_for_or<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A test process killed outright (a CI timeout, Ctrl-C) runs no Drop:
/// nspawn dies with it, but the container's systemd, its user manager and
/// any binding on the host's network would live on. The harness's reaper
/// ends them, removes the container's cgroups and its overlay. Run as two
/// processes: this test runs itself again (`QREXEC_CONNECT_BOOT_AND_HANG`)
/// to boot a system and wait, kills that process with SIGKILL, and checks
/// that nothing of the system is left.
#[test]
fn a_killed_test_process_leaves_no_system_behind() {
    if inside_fresh_root("booted") {
        return;
    }
    if std::env::var_os("QREXEC_CONNECT_BOOT_AND_HANG").is_some() {
        let mut system = Booted::new(root(), "killed");
        system.boot();
        println!("booted {} {}", system.leader(), system.run_dir().display());
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_killed_test_process_leaves_no_system_behind",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("QREXEC_CONNECT_BOOT_AND_HANG", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let booted = stdout
        .lines()
        .map_while(Result::ok)
        // After libtest's "test NAME ... " on the same line.
        .find_map(|line| line.split_once("booted ").map(|(_, rest)| rest.to_owned()))
        .expect("the child process did not boot a system");
    let (leader, overlay) = booted.split_once(' ').unwrap();
    let leader: u32 = leader.parse().unwrap();
    assert!(Path::new(&format!("/proc/{leader}")).exists());
    child.kill().unwrap();
    child.wait().unwrap();
    let stem = format!("qrexec-connect-test-booted-{}-", child.id());
    let left = || {
        let mut left = Vec::new();
        if Path::new(&format!("/proc/{leader}")).exists() {
            left.push(format!("the system's PID 1 ({leader})"));
        }
        if Path::new(overlay).exists() {
            left.push(overlay.to_owned());
        }
        for hierarchy in [
            "/sys/fs/cgroup/systemd",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup",
        ] {
            for entry in std::fs::read_dir(hierarchy).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with(&stem) {
                    left.push(entry.path().display().to_string());
                }
            }
        }
        left
    };
    let gone = wait_for_or(Duration::from_secs(30), || left().is_empty().then_some(()));
    assert!(gone.is_some(), "left 30 s after the kill: {:#?}", left());
}
