//! `qrexec-connect add` and `remove` on a real user manager: they keep every
//! other byte of the file, return once the socket listens (or is closed),
//! print the dom0 rule, replace a LISTEN's line, change nothing for the same
//! line, take qvm-connect-tcp's form, lose nothing when run at once, refuse
//! what the generator refuses with its own message (and any argument that
//! would add a line or a field), and never edit what is not theirs: a
//! symlinked file, another user's file, a line of /etc, a file that would
//! hide an /etc file, a directory others can write.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Output};

use common::user_manager::UserManager;
use common::*;

const DIR: &str = ".config/qrexec-connect";
const CONF: &str = ".config/qrexec-connect/qrexec-connect.conf";

fn qc(manager: &UserManager, args: &[&str]) -> Output {
    run(manager.command("qrexec-connect").args(args))
}

fn shown(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn ok(manager: &UserManager, args: &[&str]) -> String {
    let output = qc(manager, args);
    assert!(output.status.success(), "{args:?}: {}", shown(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn conf(manager: &UserManager) -> PathBuf {
    manager.home.path().join(CONF)
}

fn read(manager: &UserManager) -> String {
    std::fs::read_to_string(conf(manager)).unwrap()
}

fn listens(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn unit(port: u16) -> String {
    format!("qrexec-connect-127.0.0.1:{port}.socket")
}

#[test]
fn add_and_remove_keep_every_other_byte_and_return_once_applied() {
    let (other, port, tcp) = (free_port(), free_port(), free_port());
    // CRLF line ends, a blank line, a comment after a line, no final newline.
    let original = format!(
        "# mine\r\n\r\n127.0.0.1:{other} server qubes.ConnectTCP+1 # keep\r\n# last, no newline"
    );
    let manager = UserManager::start(&[(CONF, &original)]);
    let listen = format!("127.0.0.1:{port}");

    let out = ok(&manager, &["add", &listen, "server", "qubes.ConnectTCP+22"]);
    assert_eq!(
        read(&manager),
        format!("{original}\r\n{listen} server qubes.ConnectTCP+22")
    );
    assert!(
        listens(port),
        "add returned before the socket listened:\n{out}"
    );
    assert!(
        out.contains("qubes.ConnectTCP +22 THIS-QUBE server allow"),
        "no dom0 rule:\n{out}"
    );

    // The same line again: nothing changes, not even the file's inode.
    let inode = std::fs::metadata(conf(&manager)).unwrap().ino();
    let out = ok(&manager, &["add", &listen, "server", "qubes.ConnectTCP+22"]);
    assert!(out.contains("nothing changed"), "{out}");
    assert_eq!(std::fs::metadata(conf(&manager)).unwrap().ino(), inode);

    // Another target: the line is replaced where it is, the mode kept,
    // and the manager has the new destination when add returns.
    std::fs::set_permissions(conf(&manager), std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = ok(&manager, &["add", &listen, "backup", "qubes.ConnectTCP+22"]);
    assert!(out.contains("replaced"), "{out}");
    assert_eq!(
        read(&manager),
        format!("{original}\r\n{listen} backup qubes.ConnectTCP+22")
    );
    let mode = std::fs::metadata(conf(&manager)).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o640);
    assert_eq!(
        manager.property(&unit(port), "FileDescriptorName"),
        "backup qubes.ConnectTCP+22"
    );

    // remove by a bare port: the file is as it was, the socket closed.
    let out = ok(&manager, &["remove", &port.to_string()]);
    assert_eq!(read(&manager), original);
    assert!(!listens(port), "remove returned while it listened:\n{out}");
    let again = qc(&manager, &["remove", &listen]);
    assert_eq!(again.status.code(), Some(1), "{}", shown(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains(&format!("binds {listen}")),
        "{}",
        shown(&again)
    );

    // qvm-connect-tcp's form, with its default target.
    let out = ok(&manager, &["add", "--tcp", &format!("{tcp}::22")]);
    assert_eq!(
        read(&manager),
        format!("{original}\r\n127.0.0.1:{tcp} @default qubes.ConnectTCP+22")
    );
    assert!(listens(tcp));
    assert!(
        out.contains("qubes.ConnectTCP +22 THIS-QUBE @default allow target=CHOOSE-A-QUBE"),
        "{out}"
    );
    ok(&manager, &["remove", &format!("127.0.0.1:{tcp}")]);
    assert_eq!(read(&manager), original);
    assert!(listens(other), "the other line's socket stopped");

    // A LISTEN bound in another file than --file names is changed where it
    // is, its comment kept; no new file appears.
    let out = ok(
        &manager,
        &[
            "add",
            "--file",
            "elsewhere",
            &format!("127.0.0.1:{other}"),
            "backup",
            "qubes.ConnectTCP+1",
        ],
    );
    assert!(out.contains("changed there"), "{out}");
    assert_eq!(
        read(&manager),
        original.replace(
            " server qubes.ConnectTCP+1 # keep",
            " backup qubes.ConnectTCP+1 # keep"
        )
    );
    assert!(!manager
        .home
        .path()
        .join(DIR)
        .join("elsewhere.conf")
        .exists());
    assert_eq!(
        manager.property(&unit(other), "FileDescriptorName"),
        "backup qubes.ConnectTCP+1"
    );
}

#[test]
fn two_adds_at_once_lose_nothing() {
    let manager = UserManager::start(&[]);
    // All at once: each one's lock, read and rename must see the others'.
    let manager_ref = &manager;
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let outputs: Vec<Output> = std::thread::scope(|scope| {
        let handles: Vec<_> = ports
            .iter()
            .map(|port| {
                scope.spawn(move || {
                    qc(
                        manager_ref,
                        &[
                            "add",
                            &format!("127.0.0.1:{port}"),
                            "server",
                            "qubes.ConnectTCP+22",
                        ],
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for output in &outputs {
        assert!(output.status.success(), "{}", shown(output));
    }
    let text = read(&manager);
    for port in &ports {
        let line = format!("127.0.0.1:{port} server qubes.ConnectTCP+22\n");
        assert_eq!(text.matches(&line).count(), 1, "{line:?} in:\n{text}");
        assert!(listens(*port), "{port}");
    }
    assert_eq!(text.lines().count(), ports.len());
}

/// What `qrexec-connect-generator --check` says of `line` as the last line
/// of `before`, after the `FILE:LINE: ` it starts with.
fn generator_says(before: &str, line: &str) -> String {
    let home = TempDir::new("add-check");
    let dir = home.path().join(DIR);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("qrexec-connect.conf");
    std::fs::write(&file, format!("{before}{line}\n")).unwrap();
    let output = run(Command::new(GENERATOR.path())
        .arg("--check")
        .env_clear()
        .env("HOME", home.path())
        .env("XDG_RUNTIME_DIR", home.path()));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let number = before.lines().count() + 1;
    let prefix = format!("{}:{number}: ", file.display());
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("the generator found nothing wrong with {line:?}:\n{stderr}"))
        .to_owned()
}

#[test]
fn add_refuses_what_the_generator_refuses_and_touches_nothing() {
    let (port, other) = (free_port(), free_port());
    let original = format!("# mine\n127.0.0.1:{other} server qubes.ConnectTCP+1\n");
    let manager = UserManager::start(&[(CONF, &original)]);
    let listen = format!("127.0.0.1:{port}");
    let listing = || {
        let mut names: Vec<_> = std::fs::read_dir(manager.home.path().join(DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let before = listing();
    let untouched = |what: &str| {
        assert_eq!(read(&manager), original, "{what}: the file changed");
        assert_eq!(listing(), before, "{what}: a file was left");
    };
    // The generator's own message, for its own reasons.
    let path = conf(&manager);
    for fields in [
        [listen.as_str(), "bad!name", "qubes.ConnectTCP+22"],
        [listen.as_str(), "server", "bad service"],
        ["2222", "server", "qubes.ConnectTCP+22"],
        ["/tmp", "server", "qubes.ConnectTCP+22"],
        [
            &format!("127.0.0.1:{other}"),
            "@anyvm",
            "qubes.ConnectTCP+22",
        ],
    ] {
        let output = qc(&manager, &[&["add"][..], &fields[..]].concat());
        let what = format!("{fields:?}");
        assert_eq!(output.status.code(), Some(1), "{what}: {}", shown(&output));
        let expected = generator_says(&original, &fields.join(" "));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("{}:3: {expected}", path.display())),
            "{what}: not the generator's message {expected:?}:\n{}",
            shown(&output)
        );
        untouched(&what);
    }
    // Arguments that would add a line, a field or a comment, or hide text.
    // A single argument may hold at most 128 KiB (MAX_ARG_STRLEN).
    let huge = format!("/{}", "a".repeat(100_000));
    let injected_target = format!("server\n127.0.0.1:{other} evil qubes.ConnectTCP+22");
    let injected_listen = format!("{listen}\n127.0.0.1:{other}");
    for fields in [
        [injected_listen.as_str(), "server", "qubes.ConnectTCP+22"],
        [
            listen.as_str(),
            injected_target.as_str(),
            "qubes.ConnectTCP+22",
        ],
        [listen.as_str(), "server", "qubes.ConnectTCP+22 #"],
        [listen.as_str(), "server", "qubes.ConnectTCP+22\r"],
        [listen.as_str(), "server\t", "qubes.ConnectTCP+22"],
        [listen.as_str(), "\u{202e}server", "qubes.ConnectTCP+22"],
        [huge.as_str(), "server", "qubes.ConnectTCP+22"],
    ] {
        let output = qc(&manager, &[&["add"][..], &fields[..]].concat());
        let what = format!(
            "{:?}",
            fields.map(|f| f.chars().take(40).collect::<String>())
        );
        assert_eq!(output.status.code(), Some(1), "{what}: {}", shown(&output));
        let stderr = &output.stderr;
        assert!(
            stderr.len() < 4096,
            "{what}: {} bytes of stderr",
            stderr.len()
        );
        assert!(
            stderr
                .iter()
                .all(|&b| matches!(b, b'\n' | b'\t') || !b.is_ascii_control()),
            "{what}: a control character on stderr: {}",
            shown(&output)
        );
        assert!(
            !String::from_utf8_lossy(stderr).contains('\u{202e}'),
            "{what}: {}",
            shown(&output)
        );
        untouched(&what);
    }
    // Bad command lines: exit 2.
    for args in [
        &["add"][..],
        &["add", &listen, "server"],
        &["add", &listen, "server", "qubes.X", "extra"],
        &["add", "--tcp", "1:a"],
        &["add", "--tcp", "0:a:22"],
        &["add", "--tcp", "1:a:22", &listen, "server", "qubes.X"],
        &["add", "--file", "../x", &listen, "server", "qubes.X"],
        &["add", "--file", ".hidden", &listen, "server", "qubes.X"],
        &["remove"],
        &["remove", "not-an-address"],
    ] {
        let output = qc(&manager, args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            shown(&output)
        );
        untouched(&format!("{args:?}"));
    }
    assert!(!listens(port));
}

#[test]
fn files_that_are_not_ours_to_edit_are_refused() {
    let (port, site) = (free_port(), free_port());
    let manager = UserManager::start(&[("dotfiles/qrexec-connect.conf", "# a dotfile\n")]);
    let dir = manager.home.path().join(DIR);
    std::fs::create_dir_all(&dir).unwrap();
    let listen = format!("127.0.0.1:{port}");
    let add = [listen.as_str(), "server", "qubes.ConnectTCP+22"];
    let refused = |args: &[&str], needle: &str| {
        let output = qc(&manager, args);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{args:?}: {}",
            shown(&output)
        );
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(needle),
            "{args:?}: no {needle:?}: {}",
            shown(&output)
        );
    };

    // A symlinked config file: neither followed nor replaced.
    let target = manager.home.path().join("dotfiles/qrexec-connect.conf");
    std::os::unix::fs::symlink(&target, conf(&manager)).unwrap();
    refused(&[&["add"][..], &add].concat(), "is a symbolic link");
    assert!(std::fs::symlink_metadata(conf(&manager))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "# a dotfile\n");

    // Another user's file.
    let theirs = dir.join("theirs.conf");
    std::fs::write(&theirs, "# theirs\n").unwrap();
    std::os::unix::fs::chown(&theirs, Some(2001), Some(2001)).unwrap();
    refused(
        &[&["add", "--file", "theirs"][..], &add].concat(),
        "belongs to uid 2001",
    );
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "# theirs\n");

    // Another user's config home (as with sudo keeping HOME): nothing is
    // created in it.
    let their_home = manager.scratch.path().join("their-config");
    std::fs::create_dir(&their_home).unwrap();
    std::os::unix::fs::chown(&their_home, Some(2001), Some(2001)).unwrap();
    let output = run(manager
        .command("env")
        .arg(format!("XDG_CONFIG_HOME={}", their_home.display()))
        .arg("qrexec-connect")
        .arg("add")
        .args(add));
    assert_eq!(output.status.code(), Some(1), "{}", shown(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("belongs to uid 2001"),
        "{}",
        shown(&output)
    );
    assert!(!their_home.join("qrexec-connect").exists());

    // A directory other users can write.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused(
        &[&["add", "--file", "mine"][..], &add].concat(),
        "writable by other users",
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(!dir.join("mine.conf").exists());

    // A line of /etc (an overlay on /etc for this namespace only).
    let site_line = format!("127.0.0.1:{site} server qubes.ConnectTCP+80\n");
    let setup = run(manager.command("sh").arg("-c").arg(format!(
        "set -e
         mkdir -p /run/.etc/upper /run/.etc/work
         mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/.etc/upper,workdir=/run/.etc/work /etc
         mkdir /etc/qrexec-connect
         printf '%s' '{site_line}' > /etc/qrexec-connect/site.conf"
    )));
    assert!(setup.status.success(), "{}", shown(&setup));
    let etc_file = manager.ns_path("/etc/qrexec-connect/site.conf");
    refused(
        &["remove", &format!("127.0.0.1:{site}")],
        "/etc/qrexec-connect/site.conf:1",
    );
    refused(
        &[
            "add",
            &format!("127.0.0.1:{site}"),
            "other",
            "qubes.ConnectTCP+80",
        ],
        "/etc/qrexec-connect/site.conf:1",
    );
    // A new user file named like an /etc file would hide all its lines.
    refused(
        &[&["add", "--file", "site"][..], &add].concat(),
        "would replace",
    );
    assert_eq!(std::fs::read_to_string(&etc_file).unwrap(), site_line);
    assert!(!dir.join("site.conf").exists());
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    assert_eq!(names.len(), 2, "files left: {names:?}");
    assert!(!listens(port));
}

#[test]
fn add_says_why_a_socket_does_not_listen() {
    let manager = UserManager::start(&[]);
    // Someone else holds the port.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let output = qc(
        &manager,
        &[
            "add",
            &format!("127.0.0.1:{port}"),
            "server",
            "qubes.ConnectTCP+22",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", shown(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("does not listen") && stderr.contains("in use"),
        "{}",
        shown(&output)
    );
    // The rule is printed all the same, and the line stays.
    assert!(String::from_utf8_lossy(&output.stdout).contains("server allow"));
    assert!(read(&manager).contains(&format!("127.0.0.1:{port} server")));
}
