//! Issue 20: `@dispvm:TEMPLATE` targets on a real user manager. A config
//! line takes the real spelling; a hand-written unit writes the template
//! after `/` in `FileDescriptorName=` (systemd refuses `:` there); either
//! way the client is called with the real target, and `status`, `policy`
//! and the journal show it.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::user_manager::UserManager;
use common::*;

const SETTLE: Duration = Duration::from_secs(10);
const CONFIG: &str = ".config/qrexec-connect/disposables.conf";
const HAND: &str = "qrexec-connect-hand-dispvm.socket";
/// Where the double logs each call, and the policy it obeys (inside the
/// manager's namespace).
const DOUBLE_LOG: &str = "/run/double.log";
const POLICY: &str = "/run/dispvm.policy";

/// One exchange on a fresh connection, or None if it did not work.
fn exchange(port: u16, data: &[u8]) -> Option<Vec<u8>> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    round_trip(Box::new(stream), data.to_vec(), Duration::from_secs(5)).ok()
}

#[test]
fn a_disposable_target_is_served_and_shown_by_its_real_name() {
    let echo = EchoServer::start();
    let (line_port, hand_port) = (free_port(), free_port());
    let service = format!("qubes.ConnectTCP+{}", echo.port);
    let manager = UserManager::start_with(
        &[
            (
                CONFIG,
                &format!("127.0.0.1:{line_port} @dispvm:web-dvm {service}\n"),
            ),
            (
                &format!(".config/systemd/user/{HAND}"),
                &format!(
                    "[Socket]\nListenStream=127.0.0.1:{hand_port}\n\
                     FileDescriptorName=@dispvm/print-dvm {service}\n\
                     Service=qrexec-connect.service\n"
                ),
            ),
        ],
        &[(
            "qrexec-connect.service.d/double.conf",
            &format!(
                "[Service]\nEnvironment=QREXEC_DOUBLE_LOG={DOUBLE_LOG} \
                 QREXEC_DOUBLE_POLICY={POLICY} QREXEC_DOUBLE_SOURCE=work\n"
            ),
        )],
    );
    manager.systemctl_ok(&["start", HAND]);

    // The policy `policy` writes is the one the double obeys: each binding
    // is allowed to its own disposable template, and nothing else.
    let policy = run(manager
        .command("qrexec-connect")
        .args(["policy", "--source", "work"]));
    let rules = String::from_utf8_lossy(&policy.stdout).into_owned();
    assert!(policy.status.success(), "policy failed: {policy:?}");
    let rule_lines: Vec<&str> = rules.lines().filter(|l| !l.starts_with('#')).collect();
    let argument = format!("+{}", echo.port);
    assert_eq!(
        rule_lines,
        [
            format!("qubes.ConnectTCP {argument} work @dispvm:web-dvm allow"),
            format!("qubes.ConnectTCP {argument} work @dispvm:print-dvm allow"),
        ],
        "{rules}"
    );
    manager.write_file(POLICY, &rules);

    for port in [line_port, hand_port] {
        wait_for(&format!("127.0.0.1:{port} to answer"), SETTLE, || {
            (exchange(port, b"disposable")? == b"disposable").then_some(())
        });
    }

    // The client was called with the real target, never the fd name's.
    // The double writes its line when it exits, which may come just after
    // the test has read the last byte: wait for both lines.
    let calls: Vec<String> = ["web-dvm", "print-dvm"]
        .iter()
        .map(|template| format!("\"@dispvm:{template}\",\"{service}\"] exit=0"))
        .collect();
    let log = wait_for("the double's log of both calls", SETTLE, || {
        let log = std::fs::read_to_string(manager.ns_path(DOUBLE_LOG)).ok()?;
        calls.iter().all(|call| log.contains(call)).then_some(log)
    });
    assert!(
        !log.contains("@dispvm/"),
        "an encoded target reached the client:\n{log}"
    );

    // status: the TARGET column and --json.
    let status = run(manager.command("qrexec-connect").args(["status", "--json"]));
    let json = String::from_utf8_lossy(&status.stdout).into_owned();
    for template in ["web-dvm", "print-dvm"] {
        let field = format!("\"target\": \"@dispvm:{template}\"");
        assert!(
            json.contains(&field),
            "no {field} in status --json:\n{json}"
        );
    }
    // Both healthy: the encoded fd name is what the config asks for.
    assert_eq!(
        json.matches("\"state\": \"listening\"").count(),
        2,
        "{json}"
    );
    let plain = run(manager
        .command("qrexec-connect")
        .args(["status"])
        .env("COLUMNS", "200"));
    let plain = String::from_utf8_lossy(&plain.stdout).into_owned();
    assert!(
        plain.contains("@dispvm:web-dvm") && plain.contains("@dispvm:print-dvm"),
        "{plain}"
    );
    assert!(!plain.contains("@dispvm/"), "{plain}");

    // The journal's QREXEC_TARGET field finds each binding's connections.
    for template in ["web-dvm", "print-dvm"] {
        let target = format!("QREXEC_TARGET=@dispvm:{template}");
        let entries = manager.journal(&[&target]);
        assert!(
            entries.contains("127.0.0.1:"),
            "no journal entry with {target}:\n{}",
            manager.messages()
        );
    }
}
