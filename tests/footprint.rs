//! The generator runs at every login and every daemon-reload: it must not
//! carry the daemon's async runtime.

use std::process::Command;

#[test]
fn the_generator_does_not_link_tokio() {
    let symbols = |binary: &str| {
        let out = Command::new("nm")
            .args(["--demangle", binary])
            .output()
            .expect("nm (binutils) runs");
        assert!(out.status.success(), "nm {binary} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The daemon does use tokio: this shows the check can see it.
    assert!(symbols(env!("CARGO_BIN_EXE_qrexec-connect")).contains("tokio::"));
    let generator = symbols(env!("CARGO_BIN_EXE_qrexec-connect-generator"));
    let found: Vec<&str> = generator
        .lines()
        .filter(|l| l.contains("tokio::"))
        .take(5)
        .collect();
    assert!(found.is_empty(), "the generator links tokio: {found:#?}");
}
