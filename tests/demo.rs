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
    let output = run(Command::new(workspace().join("demo/run.sh"))
        .env("BIN_DIR", bin)
        .env("CI", "true"));
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
    // The readiness check is not a connection: exactly two calls are logged.
    let calls = text
        .lines()
        .filter(|l| l.contains(" -> web-server "))
        .count();
    assert_eq!(calls, 2, "{text}");
}
