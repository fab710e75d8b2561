//! `qrexec-connect status` and `qrexec-connect policy` on a real user
//! manager: status reflects an added, a removed, a failed and a refused
//! binding and a config change not yet reloaded, in its exit status and in
//! `--json`; policy prints rules the project's checker accepts and that
//! allow exactly the configured calls.

mod common;

use std::net::TcpStream;
use std::process::Output;
use std::time::Duration;

use common::user_manager::UserManager;
use common::*;
use qubes_policy::{check_policy_file, evaluate, Call, Verdict};

const SETTLE: Duration = Duration::from_secs(20);
const CONFIG: &str = ".config/qrexec-connect/status.conf";

fn line(port: u16, target: &str, service_port: u16) -> String {
    format!("127.0.0.1:{port} {target} qubes.ConnectTCP+{service_port}\n")
}

fn status(manager: &UserManager) -> (Output, Vec<String>) {
    let output = run(manager.command("qrexec-connect").args(["status", "--json"]));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let rows = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .map(str::to_owned)
        .collect();
    (output, rows)
}

/// The value of `key` in one `--json` object line: a string's contents,
/// or the literal (number, null).
fn field(row: &str, key: &str) -> String {
    let pattern = format!("\"{key}\": ");
    let at = row
        .find(&pattern)
        .unwrap_or_else(|| panic!("no {key} in {row}"))
        + pattern.len();
    let rest = &row[at..];
    if let Some(rest) = rest.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => value.push(chars.next().unwrap()),
                c => value.push(c),
            }
        }
        value
    } else {
        rest.split([',', '}']).next().unwrap().trim().to_owned()
    }
}

fn row_for(rows: &[String], port: u16) -> Option<&String> {
    let listen = format!("127.0.0.1:{port}");
    rows.iter().find(|r| field(r, "listen") == listen)
}

/// Waits until status shows the row for `port` with `check` true.
fn wait_row(manager: &UserManager, port: u16, what: &str, check: impl Fn(&str) -> bool) -> String {
    let mut last;
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let (output, rows) = status(manager);
        if let Some(row) = row_for(&rows, port) {
            if check(row) {
                return row.clone();
            }
        }
        last = format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            std::time::Instant::now() < deadline,
            "127.0.0.1:{port}: {what}; status said:\n{last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exchange(port: u16) -> Option<Vec<u8>> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    round_trip(Box::new(stream), b"ping".to_vec(), Duration::from_secs(5)).ok()
}

#[test]
fn status_follows_bindings_through_connections_changes_and_failures() {
    let echo = EchoServer::start();
    let (good, refused, added, failing) = (free_port(), free_port(), free_port(), echo.port);
    let forbidden = free_port(); // a service port no rule allows
    let policy_file = std::env::temp_dir().join(format!("qc-status-policy-{}", std::process::id()));
    std::fs::write(
        &policy_file,
        format!(
            "qubes.ConnectTCP +{p} client server allow\n\
             qubes.ConnectTCP * @anyvm @anyvm deny\n",
            p = echo.port
        ),
    )
    .unwrap();
    let config = line(good, "server", echo.port) + &line(refused, "server", forbidden);
    let manager = UserManager::start_with(
        &[(CONFIG, &config)],
        &[(
            "qrexec-connect.service.d/policy.conf",
            &format!(
                "[Service]\nEnvironment=QREXEC_DOUBLE_POLICY={}\n",
                policy_file.display()
            ),
        )],
    );
    wait_for("the good binding to forward", SETTLE, || {
        (exchange(good)? == b"ping").then_some(())
    });
    manager.settle();

    // A refused call: the client sees EOF, status says why and what to add.
    assert_ne!(exchange(refused).as_deref(), Some(&b"ping"[..]));
    let row = wait_row(&manager, refused, "the refusal to show", |r| {
        field(r, "last_result").contains("refused by qrexec policy")
    });
    assert_eq!(field(&row, "state"), "listening");
    assert_eq!(field(&row, "total"), "1");
    assert!(field(&row, "last_end").ends_with('Z'), "{row}");
    assert!(
        field(&row, "hint").contains(&format!("qubes.ConnectTCP +{forbidden} ")),
        "{row}"
    );
    assert!(field(&row, "source").ends_with("status.conf:2"), "{row}");
    let row = wait_row(&manager, good, "one good connection", |r| {
        field(r, "total") == "1"
    });
    assert!(
        field(&row, "last_result").contains("closed normally"),
        "{row}"
    );
    let (output, _) = status(&manager);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a refused binding is not healthy"
    );

    // Changes not yet applied: one line added, the refused one removed.
    let config = line(good, "server", echo.port) + &line(added, "server", echo.port);
    std::fs::write(manager.home.path().join(CONFIG), &config).unwrap();
    let row = wait_row(&manager, added, "the new line to be pending", |r| {
        field(r, "state") == "not-applied"
    });
    assert!(field(&row, "hint").contains("daemon-reload"), "{row}");
    wait_row(&manager, refused, "the removed line to be pending", |r| {
        field(r, "state") == "not-applied" && field(r, "detail").contains("removed")
    });

    // Applied: the new line listens, the removed one is gone, all is well.
    manager.daemon_reload();
    manager.settle();
    wait_row(&manager, added, "the new line to listen", |r| {
        field(r, "state") == "listening"
    });
    let (output, rows) = status(&manager);
    assert!(row_for(&rows, refused).is_none(), "{rows:#?}");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // A binding systemd cannot bind (its port is taken): failed, with
    // systemd's result, and status is not healthy.
    let config = config + &line(failing, "server", echo.port);
    std::fs::write(manager.home.path().join(CONFIG), &config).unwrap();
    manager.daemon_reload();
    let row = wait_row(&manager, failing, "the taken port to fail", |r| {
        field(r, "state") == "failed"
    });
    assert!(!field(&row, "detail").is_empty(), "{row}");
    let (output, _) = status(&manager);
    assert_eq!(output.status.code(), Some(1));
    // The plain view has the same rows, with sources and hints.
    let text = run(manager.command("qrexec-connect").arg("status"));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("LISTEN") && text.contains("failed"), "{text}");
    assert!(text.contains("status.conf:3"), "{text}");
    let _ = std::fs::remove_file(policy_file);
}

/// Characters that must never reach the terminal as they are.
const HOSTILE: [char; 5] = ['\u{202e}', '\u{200b}', '\u{a0}', '\u{1b}', '\u{9b}'];

/// Parses `--json` output with Python's JSON reader (strict about control
/// characters in strings) and returns each row's `listen` and `source`,
/// decoded, one per line, as `repr()`s so that nothing raw is printed.
fn decoded_json(text: &[u8]) -> String {
    let mut python = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys\n\
             for row in json.load(sys.stdin):\n    print(repr(row['listen']), repr(row['source']))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut stdin = python.stdin.take().unwrap();
    let text = text.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&text);
    });
    let output = python.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        output.status.success(),
        "status --json is not valid JSON: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Every field status shows (LISTEN from a config line and from a
/// hand-written unit, file names, invalid lines) is printable and cut: a
/// bidirectional override, zero-width and non-ASCII spaces, escape
/// sequences, a line break in a file name and a 20 MB line never reach the
/// terminal raw, and the output stays small. `--json` is valid JSON whose
/// strings hold the exact values, escaped.
#[test]
fn status_shows_every_field_printable_and_cut() {
    let huge = format!("@{} vm svc\n", "a".repeat(20_000_000));
    let config = "@evil\u{202e}txt.exe vm qubes.ConnectTCP+1\n\
                  %t/zero\u{200b}width vm qubes.ConnectTCP+2\n\
                  @esc vm svc\u{1b}[2J\u{9b}2J\n\
                  127.0.0.1:1\u{a0}vm svc\n"
        .to_owned()
        + &huge;
    let hand_written = "[Socket]\nListenStream=@hand\u{202e}made\u{200b}\n\
                        FileDescriptorName=vm qubes.ConnectTCP+3\n\
                        [Install]\nWantedBy=sockets.target\n";
    let manager = UserManager::start(&[
        (CONFIG, &config),
        (".config/qrexec-connect/a\u{202e}fnoc.conf", "@x vm svc\n"),
        (".config/qrexec-connect/new\nline.conf", "@y vm svc\n"),
        (
            ".config/systemd/user/qrexec-connect-hand.socket",
            hand_written,
        ),
    ]);
    manager.settle();
    manager.systemctl_ok(&["enable", "--now", "qrexec-connect-hand.socket"]);

    // Wide enough that no field is broken across lines.
    let output = run(manager
        .command("env")
        .arg("COLUMNS=1000")
        .arg("qrexec-connect")
        .arg("status"));
    let text = String::from_utf8(output.stdout).expect("status prints UTF-8");
    assert!(
        text.len() < 64 * 1024,
        "status printed {} bytes",
        text.len()
    );
    let raw: Vec<char> = text.chars().filter(|c| HOSTILE.contains(c)).collect();
    assert!(raw.is_empty(), "raw {raw:?} in:\n{text}");
    assert!(!text.contains("new\nline"), "{text}");
    for shown in [
        "@evil\\u{202e}txt.exe",
        "zero\\u{200b}width",
        "@hand\\u{202e}made\\u{200b}",
        "a\\u{202e}fnoc.conf",
        "new\\x0aline.conf",
        "svc\\x1b[2J\\u{9b}2J",
        "127.0.0.1:1\\u{a0}vm",
        "…(20000008 bytes)",
    ] {
        assert!(text.contains(shown), "{shown} is not in:\n{text}");
    }

    let output = run(manager.command("qrexec-connect").args(["status", "--json"]));
    assert!(
        output.stdout.len() < 64 * 1024,
        "status --json printed {} bytes",
        output.stdout.len()
    );
    let json = String::from_utf8(output.stdout.clone()).expect("--json is UTF-8");
    let raw: Vec<char> = json.chars().filter(|c| HOSTILE.contains(c)).collect();
    assert!(raw.is_empty(), "raw {raw:?} in:\n{json}");
    // A unit's value exactly; a config line the generator refused (these
    // two: systemd would lose their sockets at a daemon-reload) as the
    // printable text its error shows.
    let decoded = decoded_json(&output.stdout);
    for exact in [
        "'@hand\\u202emade\\u200b'",
        r"'@evil\\u{202e}txt.exe'",
        r"'%t/zero\\u{200b}width'",
    ] {
        assert!(decoded.contains(exact), "{exact} is not in:\n{decoded}");
    }
}

/// A config line whose port another user holds: systemd's result
/// (`resources`) is explained in words, with the holder's uid from /proc.
#[test]
fn status_says_who_holds_a_taken_address() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let port = free_port();
    let mut holder = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket, sys\n\
             s = socket.socket()\n\
             s.bind(('127.0.0.1', int(sys.argv[1])))\n\
             s.listen()\n\
             print('ready', flush=True)\n\
             sys.stdin.read()",
            &port.to_string(),
        ])
        .uid(2001)
        .gid(2001)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut ready = String::new();
    std::io::BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready", "the holder could not bind {port}");

    let manager = UserManager::start(&[(CONFIG, &line(port, "server", 22))]);
    let row = wait_row(&manager, port, "the taken port to fail", |r| {
        field(r, "state") == "failed"
    });
    assert_eq!(field(&row, "detail"), "resources", "{row}");
    let hint = field(&row, "hint");
    assert!(
        hint.contains(&format!(
            "127.0.0.1:{port} is in use by another process (uid 2001)"
        )),
        "{row}"
    );
    let text = run(manager.command("qrexec-connect").arg("status"));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("in use by another process (uid 2001)"),
        "{text}"
    );
    let _ = holder.kill();
    let _ = holder.wait();
}

/// The units named in the `systemctl show` calls logged by the wrapper.
fn units_shown(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').any(|w| w == "show"))
        .flat_map(|l| l.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter(|w| w.starts_with("qrexec-connect-") && w.ends_with(".socket"))
        .collect()
}

/// Status scales with the bindings: `systemctl show` costs about 1 ms a
/// unit in the manager, so status asks it only about the units it cannot
/// read from the generator's record (hand-written ones) and never about
/// the healthy generated ones; 100,000 lines not applied yet are read and
/// shown, one bounded row each. (A `systemctl` first in PATH logs its
/// arguments and runs the real one.)
#[test]
fn status_asks_the_manager_only_about_units_it_cannot_read_elsewhere() {
    const LOADED: usize = 300;
    const PENDING: usize = 100_000;
    let mut config: String = (0..LOADED)
        .map(|i| format!("@loaded{i} vm qubes.ConnectTCP+{}\n", i + 1))
        .collect();
    let hand_written = "[Socket]\nListenStream=@hand\nFileDescriptorName=vm qubes.ConnectTCP+3\n";
    let manager = UserManager::start(&[
        (CONFIG, &config),
        (
            ".config/systemd/user/qrexec-connect-hand.socket",
            hand_written,
        ),
    ]);
    manager.settle();
    manager.systemctl_ok(&["start", "qrexec-connect-hand.socket"]);
    let log = manager.scratch.path().join("systemctl.log");
    manager.write_executable(
        "systemctl",
        &format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\nexec /usr/bin/systemctl \"$@\"\n",
            log.display()
        ),
    );
    let status = |args: &[&str]| {
        let _ = std::fs::remove_file(&log);
        let path = format!("PATH={}:/usr/bin:/bin", manager.scratch.path().display());
        let output = run(manager
            .command("env")
            .arg(path)
            .arg("qrexec-connect")
            .args(args));
        (output, units_shown(&log))
    };

    let (output, shown) = status(&["status", "--json"]);
    let rows = String::from_utf8_lossy(&output.stdout)
        .matches("\"listen\"")
        .count();
    assert_eq!(
        rows,
        LOADED + 1,
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(output.status.code(), Some(0));
    assert!(
        shown.len() <= 1,
        "status asked about {} socket units: {:?}...",
        shown.len(),
        &shown[..shown.len().min(5)]
    );

    for i in 0..PENDING {
        config += &format!("@pending{i} vm qubes.ConnectTCP+{}\n", i % 60_000 + 1);
    }
    std::fs::write(manager.home.path().join(CONFIG), &config).unwrap();
    for args in [&["status"][..], &["status", "--json"][..]] {
        let (output, shown) = status(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}: not applied yet");
        let bindings = LOADED + 1 + PENDING;
        let text = String::from_utf8_lossy(&output.stdout);
        assert_eq!(text.matches("@pending").count(), PENDING, "{args:?}");
        assert!(
            // About 420 bytes a row in --json since it has `unit`.
            output.stdout.len() < 500 * bindings,
            "{args:?}: {} bytes for {bindings} bindings",
            output.stdout.len()
        );
        assert!(shown.len() <= 1, "{args:?}: asked about {}", shown.len());
    }
}

#[test]
fn policy_allows_exactly_the_configured_bindings() {
    let config = "127.0.0.1:2222 ssh-server qubes.ConnectTCP+22\n\
                  [::1]:2222 ssh-server qubes.ConnectTCP+22\n\
                  %t/qrexec-connect/agent @default qubes.ConnectSSHAgent\n\
                  127.0.0.1:2049 nfs-server qubes.ConnectNFS+127.0.1.1\n\
                  @disposable @dispvm qubes.ConnectTCP+80\n";
    let manager = UserManager::start(&[(CONFIG, config)]);
    let output = run(manager
        .command("qrexec-connect")
        .args(["policy", "--source", "work"]));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{text}");
    let rules: Vec<_> = check_policy_file(&text)
        .unwrap_or_else(|e| panic!("the checker refuses the policy: {e}\n{text}"))
        .into_iter()
        .map(|(_, rule)| rule)
        .collect();
    assert_eq!(rules.len(), 4, "one rule per distinct call:\n{text}");
    // Exactly the four calls, from work only, each with its argument
    // (none for the agent), @default sent to the placeholder.
    fn call<'a>(target: &'a str, service: &'a str) -> Call<'a> {
        Call {
            source: "work",
            target,
            service,
        }
    }
    use qubes_policy::{allowed, Grant};
    let expected: std::collections::BTreeSet<Grant> = [
        Grant::for_call(call("ssh-server", "qubes.ConnectTCP+22"), None),
        Grant::for_call(
            call("@default", "qubes.ConnectSSHAgent"),
            Some("CHOOSE-A-QUBE"),
        ),
        Grant::for_call(call("nfs-server", "qubes.ConnectNFS+127.0.1.1"), None),
        Grant::for_call(call("@dispvm", "qubes.ConnectTCP+80"), None),
    ]
    .into_iter()
    .collect();
    assert_eq!(allowed(&rules), Ok(expected), "{text}");
    let verdict = |target: &str, service: &str| evaluate(&rules, call(target, service)).unwrap();
    for (target, service) in [
        ("ssh-server", "qubes.ConnectTCP+23"),
        ("ssh-server", "qubes.ConnectTCP"),
        ("nfs-server", "qubes.ConnectNFS+127.0.1.2"),
        ("@default", "qubes.ConnectSSHAgent+x"),
        ("other", "qubes.ConnectTCP+22"),
    ] {
        assert!(
            !matches!(verdict(target, service), Verdict::Allow { .. }),
            "{target} {service} is allowed:\n{text}"
        );
    }
    assert!(text.contains("CHOOSE"), "{text}");
    assert!(text.contains("qrexec-connect-nfs"), "{text}");
    assert!(
        text.contains("/etc/qubes-rpc/qubes.ConnectSSHAgent"),
        "{text}"
    );
    // Without a name and without qubesdb: a clear refusal, nothing printed.
    let output = run(manager.command("qrexec-connect").arg("policy"));
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--source"));
}

/// `qrexec-connect policy` and the Salt formula write the same allow rules
/// (docs/policy-lines.md): for the README's ssh-client, the rules of the
/// policy examples, with the one difference the format allows, the
/// placeholder for a target that only dom0 can choose.
#[test]
fn policy_prints_the_rules_of_the_policy_examples() {
    let repo = common::workspace().display().to_string();
    let read = |path: &str| std::fs::read_to_string(format!("{repo}/{path}")).unwrap();
    let config = read("examples/ssh.conf") + &read("examples/ssh-agent.conf");
    let manager = UserManager::start(&[(CONFIG, &config)]);
    let output = run(manager
        .command("qrexec-connect")
        .args(["policy", "--source", "ssh-client"]));
    let text = String::from_utf8_lossy(&output.stdout);
    let rules: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.replace("target=CHOOSE-A-QUBE", "target=vault"))
        .collect();
    let expected: Vec<String> = ["tcp", "ssh-agent"]
        .iter()
        .flat_map(|name| {
            read(&format!("policy-examples/30-qrexec-connect.{name}.policy"))
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(rules, expected, "{text}");
}

/// The plain view of `status`, with an exit status.
fn plain_status(manager: &UserManager, columns: &str) -> (Option<i32>, String) {
    let output = run(manager
        .command("env")
        .arg(format!("COLUMNS={columns}"))
        .arg("qrexec-connect")
        .arg("status"));
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// A hand-written unit in the Python tool's style, with `@dispvm:TEMPLATE`
/// in `FileDescriptorName=`: systemd drops the name (it refuses `:`) and
/// passes the unit's name, so every connection is closed at once. Status
/// must call it invalid and say why, in `--json` and in the plain view, and
/// the daemon's journal message must say the same in words.
#[test]
fn status_calls_a_unit_whose_fd_name_systemd_dropped_invalid() {
    let port = free_port();
    let unit = "qrexec-connect-dvm.socket";
    let hand_written = format!(
        "[Socket]\nListenStream=127.0.0.1:{port}\n\
         FileDescriptorName=@dispvm:fedora-dvm qubes.ConnectTCP+1235\n\
         [Install]\nWantedBy=sockets.target\n"
    );
    let manager = UserManager::start(&[(&format!(".config/systemd/user/{unit}"), &hand_written)]);
    manager.settle();
    manager.systemctl_ok(&["enable", "--now", unit]);
    // What systemd 252 made of it: the unit's own name.
    assert_eq!(manager.property(unit, "FileDescriptorName"), unit);
    assert_ne!(exchange(port).as_deref(), Some(&b"ping"[..]));

    let row = wait_row(&manager, port, "the unit to be invalid", |r| {
        field(r, "state") == "invalid"
    });
    let detail = field(&row, "detail");
    assert!(
        detail.contains("systemd dropped FileDescriptorName=@dispvm:fedora-dvm")
            && detail.contains("':'"),
        "{row}"
    );
    assert_eq!(field(&row, "unit"), unit, "{row}");
    let (code, text) = plain_status(&manager, "80");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("systemd dropped FileDescriptorName="),
        "{text}"
    );

    let journal = manager.wait_journal(
        &["SYSLOG_IDENTIFIER=qrexec-connect"],
        "FileDescriptorName=",
        SETTLE,
    );
    let entry = journal
        .lines()
        .find(|l| l.contains("qrexec-connect-dvm.socket") && l.contains("invalid"))
        .unwrap_or_else(|| panic!("no message about the unit:\n{journal}"));
    assert!(
        entry.contains("dropped") && entry.contains("refuses ':'"),
        "{entry}"
    );
}

/// A config line and an old hand-written unit on the same address: both
/// rows say `conflict`, each names the other unit, and the hint is the
/// command that retires the old one.
#[test]
fn status_names_both_units_of_a_clash() {
    let port = free_port();
    let old = "qrexec-connect-old.socket";
    let hand_written = format!(
        "[Socket]\nListenStream=127.0.0.1:{port}\n\
         FileDescriptorName=server qubes.ConnectTCP+22\n\
         [Install]\nWantedBy=sockets.target\n"
    );
    let manager = UserManager::start(&[(&format!(".config/systemd/user/{old}"), &hand_written)]);
    manager.settle();
    manager.systemctl_ok(&["enable", "--now", old]);
    std::fs::create_dir_all(manager.home.path().join(".config/qrexec-connect")).unwrap();
    std::fs::write(manager.home.path().join(CONFIG), line(port, "server", 22)).unwrap();
    manager.daemon_reload();
    manager.settle();
    let generated = format!("qrexec-connect-127.0.0.1:{port}.socket");
    let wait_conflict = |unit: &str| {
        wait_for("both rows to show the clash", SETTLE, || {
            let (_, rows) = status(&manager);
            rows.iter()
                .find(|r| field(r, "unit") == unit && field(r, "state") == "conflict")
                .cloned()
        })
    };
    let row = wait_conflict(&generated);
    assert!(field(&row, "detail").contains(old), "{row}");
    assert!(
        field(&row, "hint").contains(&format!("systemctl --user disable --now {old}")),
        "{row}"
    );
    let row = wait_conflict(old);
    assert!(field(&row, "detail").contains(&generated), "{row}");
    assert!(field(&row, "detail").contains("status.conf:1"), "{row}");
    let (code, text) = plain_status(&manager, "80");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("disable --now"), "{text}");
}

/// A config line and an old hand-written unit on one socket path: both
/// start (systemd removes a file in its way and binds again), and the hint
/// says to retire the old one and then restart the kept one. Retiring the
/// old unit removes the socket file both share, so the kept unit still
/// looks active while nothing can connect: status must not call it
/// `listening`, and its hint (a restart) must bring the path back.
#[test]
fn status_never_calls_a_path_binding_without_its_socket_file_listening() {
    let old = "qrexec-connect-old-p.socket";
    let manager = UserManager::start(&[
        (
            &format!(".config/systemd/user/{old}"),
            "[Socket]\nListenStream=%t/rt.sock\n\
             FileDescriptorName=server qubes.ConnectTCP+22\n\
             [Install]\nWantedBy=sockets.target\n",
        ),
        (CONFIG, "%t/rt.sock server qubes.ConnectTCP+23\n"),
    ]);
    manager.systemctl_ok(&["enable", "--now", old]);
    manager.daemon_reload();
    manager.settle();
    let row_of =
        |rows: &[String], unit: &str| rows.iter().find(|r| field(r, "unit") == unit).cloned();
    let kept = wait_for("the config line's row", SETTLE, || {
        let (_, rows) = status(&manager);
        let row = rows.iter().find(|r| field(r, "listen") == "%t/rt.sock")?;
        Some(field(row, "unit"))
    });
    let row = wait_for("both rows to show the clash", SETTLE, || {
        let (_, rows) = status(&manager);
        let row = row_of(&rows, &kept)?;
        (field(&row, "state") == "conflict"
            && row_of(&rows, old).is_some_and(|r| field(&r, "state") == "conflict"))
        .then_some(row)
    });
    let hint = field(&row, "hint");
    assert!(
        hint.contains(&format!("systemctl --user disable --now {old}"))
            && hint.contains(&format!("systemctl --user restart {kept}")),
        "{row}"
    );
    // The old unit binds last, so the file is its socket; retiring it, as
    // the hint says first, removes the file.
    manager.systemctl_ok(&["restart", old]);
    manager.systemctl_ok(&["disable", "--now", old]);
    manager.settle();
    let path = manager.ns_path("/run/user/0/rt.sock");
    assert!(
        std::os::unix::net::UnixStream::connect(&path).is_err(),
        "the path still reaches a socket"
    );
    let (output, rows) = status(&manager);
    let row = row_of(&rows, &kept).expect("the kept unit's row");
    assert_eq!(field(&row, "state"), "unreachable", "{row}");
    assert_eq!(
        field(&row, "hint"),
        format!(
            "its socket file /run/user/0/rt.sock is gone, so nothing can connect: \
             systemctl --user restart {kept}"
        ),
        "{row}"
    );
    assert_eq!(output.status.code(), Some(1), "{row}");
    let (code, text) = plain_status(&manager, "80");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("unreachable"), "{text}");

    manager.systemctl_ok(&["restart", &kept]);
    let (output, rows) = status(&manager);
    let row = row_of(&rows, &kept).expect("the kept unit's row");
    assert_eq!(field(&row, "state"), "listening", "{row}");
    assert_eq!(output.status.code(), Some(0), "{row}");
    assert!(std::fs::symlink_metadata(&path).is_ok());
}

/// Masked, stopped by hand, and a call qrexec could not start (125): each
/// gets its own words, none of them "run daemon-reload".
#[test]
fn status_says_masked_stopped_and_125_in_their_own_words() {
    let (masked, stopped, closed) = (free_port(), free_port(), free_port());
    let nothing_listens = free_port();
    let config = line(masked, "server", 22)
        + &line(stopped, "server", 22)
        + &line(closed, "server", nothing_listens);
    let manager = UserManager::start(&[(CONFIG, &config)]);
    manager.settle();
    let unit = |port: u16| format!("qrexec-connect-127.0.0.1:{port}.socket");
    manager.systemctl_ok(&["mask", "--now", &unit(masked)]);
    manager.settle();
    manager.systemctl_ok(&["stop", &unit(stopped)]);
    assert_ne!(exchange(closed).as_deref(), Some(&b"ping"[..]));

    let row = wait_row(&manager, masked, "the masked unit", |r| {
        field(r, "state") == "masked"
    });
    assert!(
        field(&row, "hint").contains(&format!("systemctl --user unmask {}", unit(masked))),
        "{row}"
    );
    let row = wait_row(&manager, stopped, "the stopped unit", |r| {
        field(r, "state") == "stopped"
    });
    let hint = field(&row, "hint");
    assert!(
        hint.contains(&format!("systemctl --user start {}", unit(stopped)))
            && !hint.contains("daemon-reload"),
        "{row}"
    );
    let row = wait_row(&manager, closed, "the failed call", |r| {
        field(r, "last_status") == "125"
    });
    let hint = field(&row, "hint");
    assert!(
        hint.contains("could not start the call")
            && hint.contains(&format!("nothing listens on port {nothing_listens}")),
        "{row}"
    );
}

/// Counters are kept across the daemon restart a reload causes: a binding
/// the reload did not touch keeps its TOTAL and LAST.
#[test]
fn status_counters_survive_the_restart_a_reload_causes() {
    let echo = EchoServer::start();
    let (kept, added) = (free_port(), free_port());
    let manager = UserManager::start(&[(CONFIG, &line(kept, "server", echo.port))]);
    manager.settle();
    assert_eq!(exchange(kept).as_deref(), Some(&b"ping"[..]));
    wait_row(&manager, kept, "one connection counted", |r| {
        field(r, "total") == "1"
    });
    let before = manager.main_pid("qrexec-connect.service");

    let config = line(kept, "server", echo.port) + &line(added, "server", echo.port);
    std::fs::write(manager.home.path().join(CONFIG), config).unwrap();
    manager.daemon_reload();
    manager.settle();
    assert_eq!(exchange(added).as_deref(), Some(&b"ping"[..]));
    wait_row(&manager, added, "the new daemon to count", |r| {
        field(r, "total") == "1"
    });
    assert_ne!(
        manager.main_pid("qrexec-connect.service"),
        before,
        "restarted"
    );
    let (_, rows) = status(&manager);
    let row = row_for(&rows, kept).expect("the kept binding");
    assert_eq!(field(row, "total"), "1", "{row}");
    assert!(
        field(row, "last_result").contains("closed normally"),
        "{row}"
    );
}

/// At 80 columns, and narrower, every line of the plain view fits; the
/// unit name is shown, and an invalid line shows its raw LISTEN once and
/// its FILE:LINE once.
#[test]
fn status_fits_the_terminal() {
    let echo = EchoServer::start();
    let port = free_port();
    let config = format!(
        "%t/qrexec-connect/a-rather-long-socket-name-for-the-agent vm qubes.ConnectSSHAgent\n\
         127.0.0.1:{port} a-long-service-qube-name qubes.ConnectTCP+{}\n\
         @bogus-listen-word vm\n",
        echo.port
    );
    let manager = UserManager::start(&[(CONFIG, &config)]);
    manager.settle();
    assert_eq!(exchange(port).as_deref(), Some(&b"ping"[..]));
    wait_row(&manager, port, "one connection counted", |r| {
        field(r, "total") == "1"
    });
    for columns in ["80", "60"] {
        let (_, text) = plain_status(&manager, columns);
        let width: usize = columns.parse().unwrap();
        for line in text.lines() {
            assert!(
                line.chars().count() <= width,
                "{columns} columns: {} wide: {line:?}\n{text}",
                line.chars().count()
            );
        }
        assert!(
            text.contains(&format!("qrexec-connect-127.0.0.1:{port}.socket")),
            "{text}"
        );
        assert!(text.contains("closed normally"), "{text}");
        assert_eq!(text.matches("status.conf:3").count(), 1, "{text}");
        assert_eq!(text.matches("@bogus-listen-word").count(), 1, "{text}");
    }
}
