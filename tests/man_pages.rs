//! Every man page builds from its scdoc source and renders without a
//! warning, and documents every message a user can meet.

use std::process::Command;

const PAGES: [&str; 4] = [
    "qrexec-connect.8",
    "qrexec-connect-generator.8",
    "qrexec-connect.conf.5",
    "qubes.ConnectNFS.8",
];

fn render(page: &str) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let made = Command::new("make")
        .args(["-s", "-C", dir, &format!("man/{page}")])
        .output()
        .expect("make runs");
    assert!(
        made.status.success(),
        "{page}: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let shown = Command::new("man")
        .args(["--warnings", "-l", &format!("{dir}/man/{page}")])
        .env("MANWIDTH", "80")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .expect("man runs");
    let warnings = String::from_utf8_lossy(&shown.stderr);
    assert!(
        shown.status.success() && warnings.trim().is_empty(),
        "{page}: {warnings}"
    );
    String::from_utf8_lossy(&shown.stdout).into_owned()
}

#[test]
fn every_page_renders_without_warnings() {
    for page in PAGES {
        let text = render(page);
        assert!(
            text.contains("NAME") && text.contains("SEE ALSO"),
            "{page}:\n{text}"
        );
    }
}

#[test]
fn the_daemon_page_lists_the_messages_it_logs() {
    let text = render("qrexec-connect.8")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for message in [
        "refused by qrexec policy",
        "service not found",
        "qrexec could not start the call",
        "invalid FileDescriptorName=",
        "not a stream socket",
        "must be started by systemd socket activation",
        "--max-connections limit",
        "cannot accept a connection",
        "cannot start the splicer",
        "log messages were dropped",
        "restarting the binding sockets",
        "the reload watcher",
    ] {
        assert!(
            text.contains(message),
            "qrexec-connect(8) does not mention {message:?}"
        );
    }
}
