//! The README's two commands on a fresh Debian 12, as a new user runs them:
//! a Debian 12 root with only Rust (`cargo-web`, `rustc-web`), git and make
//! added to the standard system, a `git clone` of this checkout's HEAD, then
//! `make demo` and `make test` as root. Both must pass: `make test` installs
//! what the tests need from tests/debian-packages.txt itself, so a package
//! missing from that list fails here, in CI, and not on a user's machine.
//!
//! The inner `make test` runs every test again, this one and tests/booted.rs
//! included: those build Debian roots of their own, so there they only check
//! that they run inside the root this test made and leave a receipt, which
//! this test requires (tests/common/debian_root.rs, `inside_fresh_root`).
//!
//! Also: `make test` without root, or on a machine without apt-get, stops
//! before building anything, with the command to run.

mod common;
#[path = "common/debian_root.rs"]
mod debian_root;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{run, workspace, TempDir};
use debian_root::{cached_root, inside_fresh_root, tail, RootRun, RootSpec, EXCHANGE, INSIDE_VAR};

/// A fresh Debian 12 (the standard system) plus what the README says to add.
const FRESH_DEBIAN: RootSpec = RootSpec {
    name: "fresh-debian-12",
    variant: "standard",
    include: &["cargo-web", "rustc-web", "git", "make"],
    customize: &[],
};

/// A hang guard for the whole inner run (it builds everything twice over:
/// debug, and the packages' release builds); not a speed check.
const INNER_RUN_LIMIT: Duration = Duration::from_secs(60 * 60);

/// The user-manager lock of tests/common/user_manager.rs: the inner tests'
/// managers and the host's take turns, as the managers of two checkouts do.
const USER_MANAGER_LOCK: &str = "/tmp/qrexec-connect-test-user-manager.lock";

fn git(args: &[&str]) -> String {
    let output = run(Command::new("git").arg("-C").arg(workspace()).args(args));
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn the_readme_commands_pass_on_a_fresh_debian_12() {
    if inside_fresh_root("fresh_debian") {
        return;
    }
    let root = cached_root(&FRESH_DEBIAN);
    let fresh = RootRun::new(&root, "fresh-debian");
    // What the user clones: this checkout's HEAD (committed work only).
    let head = git(&["rev-parse", "HEAD"]);
    let bundle = fresh.exchange().join("qrexec-connect.bundle");
    git(&[
        "bundle",
        "create",
        "--quiet",
        bundle.to_str().unwrap(),
        "HEAD",
    ]);
    let nonce = format!("{}-{}", std::process::id(), head);
    std::fs::write(fresh.exchange().join("nonce"), &nonce).unwrap();
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(USER_MANAGER_LOCK)
        .unwrap();
    // Downloaded packages are kept between runs (apt's own cache, nothing
    // else): apt still resolves and installs everything each time.
    let apt_cache = common::user_manager::target_dir().join("debian-roots/apt-archives");
    std::fs::create_dir_all(apt_cache.join("partial")).unwrap();
    let fresh = fresh
        .bind(Path::new(USER_MANAGER_LOCK), USER_MANAGER_LOCK)
        .bind(&apt_cache, "/var/cache/apt/archives");
    let log = common::user_manager::target_dir().join("debian-roots/fresh-debian-run.log");
    let _ = std::fs::remove_file(&log);
    // The README's commands, each timed; `time` is not in the standard
    // system, `date` is.
    let script = format!(
        "cd /root
         git clone --quiet {EXCHANGE}/qrexec-connect.bundle qrexec-connect
         cd qrexec-connect
         echo \"fresh-debian: cloned $(git rev-parse HEAD)\"
         for command in demo test; do
             start=$(date +%s)
             echo \"fresh-debian: make $command\"
             make $command
             echo \"fresh-debian: make $command passed in $(( $(date +%s) - start )) s\"
         done"
    );
    let started = Instant::now();
    let status = fresh.run(
        &script,
        &[
            (
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ),
            ("HOME", "/root"),
            ("USER", "root"),
            ("LOGNAME", "root"),
            ("SHELL", "/bin/bash"),
            ("TERM", "dumb"),
            (INSIDE_VAR, &nonce),
        ],
        &log,
        INNER_RUN_LIMIT,
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let phases: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("fresh-debian: "))
        .collect();
    eprintln!(
        "fresh Debian 12 run: {:.0?} in all\n{}",
        started.elapsed(),
        phases.join("\n")
    );
    assert!(
        status.success(),
        "the README's commands failed on a fresh Debian 12 ({status}); the whole log is {}:\n{}",
        log.display(),
        tail(&text, 80)
    );
    assert!(
        text.contains(&format!("fresh-debian: cloned {head}\n")),
        "the clone is not of HEAD {head}:\n{}",
        phases.join("\n")
    );
    for command in ["demo", "test"] {
        assert!(
            text.contains(&format!("fresh-debian: make {command} passed in ")),
            "make {command} did not pass:\n{}",
            tail(&text, 40)
        );
    }
    // The inner make test ran the tests that would build Debian roots of
    // their own, and they saw that they were inside.
    let receipts = std::fs::read_to_string(fresh.exchange().join("inside")).unwrap_or_default();
    for test in ["fresh_debian", "booted"] {
        assert!(
            receipts.lines().any(|line| line == test),
            "the inner make test did not run {test} inside the root (receipts: {receipts:?})"
        );
    }
}

/// The files `make test-packages` reads, copied where any user can read them.
fn makefile_copy() -> TempDir {
    let copy = TempDir::new("makefile");
    for file in ["Makefile", "version", "tests/debian-packages.txt"] {
        let target = copy.path().join(file);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(workspace().join(file), &target).unwrap();
    }
    let output = run(Command::new("chmod").arg("-R").arg("a+rX").arg(copy.path()));
    assert!(output.status.success());
    copy
}

/// `make test` in the copy, with `prefix` before it (runuser, env ...).
fn make_test(copy: &TempDir, prefix: &[&str]) -> (bool, String) {
    let output = run(Command::new(prefix[0])
        .args(&prefix[1..])
        .args(["make", "-C"])
        .arg(copy.path())
        .arg("test"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn make_test_without_root_stops_before_building_with_the_command_to_run() {
    let copy = makefile_copy();
    let (passed, text) = make_test(&copy, &["runuser", "-u", "nobody", "--"]);
    assert!(!passed, "{text}");
    assert!(text.contains("run  sudo make test"), "{text}");
    assert!(!text.contains("cargo"), "it went on to build:\n{text}");
    assert!(!copy.path().join("target").exists(), "{text}");
}

#[test]
fn make_test_without_apt_stops_before_building_with_the_command_to_run() {
    let copy = makefile_copy();
    // The tools the recipe uses, and no apt-get or dpkg-query.
    let bin = TempDir::new("no-apt-bin");
    for tool in ["sh", "sed", "awk", "grep", "xargs", "id", "make", "cat"] {
        let found = run(Command::new("sh").args(["-c", &format!("command -v {tool}")]));
        let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
        assert!(found.status.success(), "{tool} is not installed");
        std::os::unix::fs::symlink(path, bin.path().join(tool)).unwrap();
    }
    let path = format!("PATH={}", bin.path().display());
    let (passed, text) = make_test(&copy, &["env", &path]);
    assert!(!passed, "{text}");
    assert!(text.contains("this machine has no apt-get"), "{text}");
    assert!(text.contains("run  sudo make test  on Debian 12"), "{text}");
    assert!(!copy.path().join("target").exists(), "{text}");
}
