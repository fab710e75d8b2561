//! `make demo` shows the product's main path, quietly: the config line, the
//! unit the generator writes from it, a request served through the binding,
//! a refused one, and the status row that explains the refusal.

mod common;

use std::path::Path;
use std::process::Command;

use common::program::out_dir;
use common::{run, workspace, DAEMON, DOUBLE, GENERATOR};

#[test]
fn the_demo_walks_from_config_line_to_status_row() {
    // Checked up to date (the demo runs them from the same directory).
    let _ = (DAEMON.path(), GENERATOR.path(), Path::new(DOUBLE));
    let bin = out_dir();
    // As `make demo | cat` or CI runs it: no terminal (stdin is /dev/null,
    // stdout a pipe), and a terminal type that has bold.
    let output = run(Command::new(workspace().join("demo/run.sh"))
        .env("BIN_DIR", bin)
        .env("TERM", "xterm-256color")
        .env_remove("CI"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    for shown in [
        "web-server  qubes.ConnectTCP+", // the config line
        "ListenStream=127.0.0.1:",       // the generated unit
        "FileDescriptorName=web-server qubes.ConnectTCP+",
        "=>  Hello from the web server",         // served
        "refused by qrexec policy (status 126)", // the status row
        "hint: dom0 refused the call",
        "qubes.ConnectTCP +22 demo-client web-server allow", // policy
    ] {
        assert!(
            text.contains(shown),
            "the demo does not show {shown:?}:\n{text}"
        );
    }
    for noise in ["Listening on", "Execing", "Communication attempt"] {
        assert!(!text.contains(noise), "the demo shows {noise:?}:\n{text}");
    }
    // Without a terminal the output is plain text: no escape codes.
    assert!(
        !text.contains('\x1b'),
        "the demo prints escape codes without a terminal:\n{}",
        text.escape_debug()
    );
    // The status hint and the policy step name the same source qube.
    let words = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        words.contains("prints them all): qubes.ConnectTCP +22 demo-client web-server allow"),
        "the status hint does not name the qube the policy step names:\n{text}"
    );
    // No half of a message left over from filtering: every line of the
    // status step is a whole row, detail or note.
    assert!(
        !text.lines().any(|line| line.trim() == "unknown"),
        "the demo shows a stray line:\n{text}"
    );
    // The readiness check is not a connection: exactly two calls are logged.
    let calls = text
        .lines()
        .filter(|l| l.contains(" -> web-server "))
        .count();
    assert_eq!(calls, 2, "{text}");
}

/// The README's first screen gives the two commands that work on a fresh
/// machine, `make demo` and `make test`; CI runs exactly that test command,
/// and tests/fresh_debian.rs runs both on a fresh Debian 12.
#[test]
fn the_readme_opens_with_the_commands_ci_and_the_fresh_debian_test_run() {
    let read = |file: &str| std::fs::read_to_string(workspace().join(file)).unwrap();
    let readme = read("README.md");
    let first_screen: Vec<&str> = readme.lines().take(24).collect();
    for command in ["make demo", "make test"] {
        assert!(
            first_screen
                .iter()
                .any(|line| line.trim_start().starts_with(command)),
            "the README's first screen does not give `{command}`:\n{}",
            first_screen.join("\n")
        );
    }
    let ci = read(".ci/run");
    let last_command = ci
        .lines()
        .rfind(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .unwrap();
    assert_eq!(
        last_command, "make test",
        ".ci/run does not end with the README's test command"
    );
    assert!(
        read("tests/fresh_debian.rs").contains("for command in demo test; do"),
        "tests/fresh_debian.rs no longer runs make demo and make test"
    );
}
