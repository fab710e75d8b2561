//! The generator under a real `systemd --user` (private mount namespace, see
//! tests/common/user_manager.rs): what the user manager does with its
//! output, where a fixture cannot tell.

mod common;
#[path = "common/other_user.rs"]
mod other_user;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::Duration;

use common::user_manager::UserManager;
use other_user::{OtherUser, OTHER_UID};
use qrexec_connect_binding::address::ListenAddress;
use qrexec_connect_generator::unit_name::socket_unit_name;

const LIMIT: Duration = Duration::from_secs(20);

/// A LISTEN naming an existing file: systemd would unlink the file and bind
/// its socket there. The generator must refuse the line, so the file
/// survives the manager's start and every daemon-reload.
#[test]
fn a_listen_path_naming_a_file_never_costs_the_file() {
    let precious = "precious notes\n";
    let manager = UserManager::start(&[
        ("victim.txt", precious),
        (
            ".config/qrexec-connect/bindings.conf",
            "# the second line is fine\n%h/victim.txt @default svc\n%t/fine @default svc\n",
        ),
    ]);
    let victim = manager.home.path().join("victim.txt");
    let config = manager
        .home
        .path()
        .join(".config/qrexec-connect/bindings.conf");
    let refused = "qrexec-connect-home-victim.txt.socket";
    let message = format!(
        "{}:2: \\\"{}\\\" exists and is a regular file",
        config.display(),
        victim.display()
    );

    let check = |when: &str| {
        // The generator runs synchronously before the manager loads units, and
        // sockets.target is started with them: a socket bound there would
        // already have replaced the file.
        manager.settle();
        assert_eq!(
            std::fs::read_to_string(&victim).ok().as_deref(),
            Some(precious),
            "{when}: the victim file is gone or changed\n{}",
            manager.messages()
        );
        assert_eq!(
            manager.property(refused, "LoadState"),
            "not-found",
            "{when}: the unit was generated"
        );
        assert_eq!(
            manager.property("qrexec-connect-runtime-fine.socket", "ActiveState"),
            "active",
            "{when}: the good line of the same file is not listening\n{}",
            manager.messages()
        );
    };
    check("after the manager started");
    manager.wait_journal(&[], &message, LIMIT);

    manager.daemon_reload();
    check("after a daemon-reload");
    // One message per generator run: the reload printed it again.
    wait_for_count(&manager, &message, 2);
}

fn wait_for_count(manager: &UserManager, needle: &str, count: usize) {
    common::wait_for(
        &format!("{count} journal entries with {needle:?}"),
        LIMIT,
        || (manager.journal(&[]).matches(needle).count() >= count).then_some(()),
    );
}

/// Issue 17, item 4: a LISTEN path where another user's socket already is
/// (here in /tmp, left by uid 2001). Bound there, the binding either fails
/// and leaves the path to them (a user's manager cannot remove another
/// user's file from a sticky directory), so the user's clients talk to
/// their program, or takes it from them (root's manager). The generator
/// refuses the line and names the owner, by name once the account resolves.
#[test]
fn a_socket_path_another_user_holds_is_refused_naming_them() {
    let path = format!("/tmp/qrexec-connect-test-{}-theirs", std::process::id());
    let _ = std::fs::remove_file(&path);
    let squatter = OtherUser::listen(&path);
    let config = ".config/qrexec-connect/bindings.conf";
    let manager = UserManager::start(&[(
        config,
        &format!("{path} @default svc\n%t/fine @default svc\n"),
    )]);
    let refused = socket_unit_name(&ListenAddress::parse(&path).unwrap());
    let message = format!(
        "{}:1: \\\"{path}\\\" is a socket of uid {OTHER_UID}",
        manager.home.path().join(config).display()
    );

    let check = |when: &str| {
        manager.settle();
        assert_eq!(
            manager.property(&refused, "LoadState"),
            "not-found",
            "{when}: the unit was generated\n{}",
            manager.messages()
        );
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(
            meta.file_type().is_socket() && meta.uid() == OTHER_UID,
            "{when}: the socket was replaced"
        );
        assert_eq!(
            manager.property("qrexec-connect-runtime-fine.socket", "ActiveState"),
            "active",
            "{when}: the good line of the same file is not listening"
        );
    };
    check("after the manager started");
    manager.wait_journal(&[], &message, LIMIT);

    // With an account for the uid, the message names it.
    let passwd = manager.scratch.path().join("passwd");
    let mut accounts = std::fs::read_to_string("/etc/passwd").unwrap();
    accounts.push_str(&format!(
        "mallory:x:{OTHER_UID}:{OTHER_UID}::/nonexistent:/usr/sbin/nologin\n"
    ));
    std::fs::write(&passwd, accounts).unwrap();
    let mount = common::run(
        manager
            .command("mount")
            .arg("--bind")
            .arg(&passwd)
            .arg("/etc/passwd"),
    );
    assert!(mount.status.success(), "{mount:?}");
    manager.daemon_reload();
    check("after a daemon-reload");
    manager.wait_journal(&[], &format!("{message} (mallory)"), LIMIT);
    drop(squatter);
    let _ = std::fs::remove_file(&path);
}

/// Issue 22: a config line and an old hand-written unit (as the Python
/// qrexec-connect had users write) on the same address. Only one socket can
/// bind it, so `--check` names both, the line and the unit with its file,
/// and says how to move to the line; after that advice, it is clean. The
/// address is the kernel's: a unit on a bare port (`ListenStream=2241`,
/// which systemd binds as `[::]:2241`, both families) or on `0.0.0.0`
/// takes a line's `127.0.0.1` on that port too.
#[test]
fn check_names_a_hand_written_unit_on_a_lines_address() {
    let old = [
        ("qrexec-connect-old-ssh.socket", "127.0.0.1:2240"),
        ("qrexec-connect-old-bare.socket", "2241"),
        ("qrexec-connect-old-any.socket", "0.0.0.0:2242"),
    ];
    let files: Vec<(String, String)> = old
        .iter()
        .map(|(unit, listen)| {
            (
                format!(".config/systemd/user/{unit}"),
                format!(
                    "[Socket]\nListenStream={listen}\nFileDescriptorName=ssh-server\n\
                     [Install]\nWantedBy=sockets.target\n"
                ),
            )
        })
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let manager = UserManager::start(&files);
    for (unit, _) in old {
        manager.systemctl_ok(&["enable", "--now", unit]);
    }
    // The lines are added afterwards, as a user migrating would: no reload yet.
    let config = ".config/qrexec-connect/ssh.conf";
    let config_path = manager.home.path().join(config);
    std::fs::create_dir_all(config_path.parent().unwrap()).unwrap();
    std::fs::write(
        &config_path,
        "127.0.0.1:2240 ssh-server qubes.ConnectTCP+22\n\
         127.0.0.1:2241 ssh-server qubes.ConnectTCP+23\n\
         127.0.0.1:2242 ssh-server qubes.ConnectTCP+24\n",
    )
    .unwrap();
    let check = || {
        common::run(
            manager
                .command("/usr/lib/systemd/user-generators/qrexec-connect-generator")
                .arg("--check"),
        )
    };

    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let clash = |line: usize, (unit, _): (&str, &str), address: &str, text: &str| {
        format!(
            "{config}:{line}: {unit} ({file}) already listens on {address}: only one socket can \
             have it, and this line's fails while that one listens; if this line replaces it, \
             run 'systemctl --user disable --now {unit}'\n\
             \x20   {text}\n",
            config = config_path.display(),
            file = manager
                .home
                .path()
                .join(format!(".config/systemd/user/{unit}"))
                .display(),
        )
    };
    assert_eq!(
        stderr,
        clash(
            1,
            old[0],
            "127.0.0.1:2240",
            "127.0.0.1:2240 ssh-server qubes.ConnectTCP+22"
        ) + &clash(
            2,
            old[1],
            "[::]:2241 (which takes 127.0.0.1:2241 too)",
            "127.0.0.1:2241 ssh-server qubes.ConnectTCP+23"
        ) + &clash(
            3,
            old[2],
            "0.0.0.0:2242 (which takes 127.0.0.1:2242 too)",
            "127.0.0.1:2242 ssh-server qubes.ConnectTCP+24"
        ) + "qrexec-connect-generator: 3 bindings, 3 errors, 0 warnings in 1 file\n",
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");

    for (unit, _) in old {
        manager.systemctl_ok(&["disable", "--now", unit]);
    }
    let out = check();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "qrexec-connect-generator: 3 bindings, 0 errors, 0 warnings in 1 file\n"
    );
    assert_eq!(out.status.code(), Some(0));
}

/// Issue 17: a binding that listens, whose unit name has an escape (the
/// README's `%t/qrexec-connect/...` form, `\x2d` for each `-`), is the
/// line's own unit, not a clash: `--check` of the config that made it is
/// clean, also in the `--check FILE` form the Salt client state uses.
/// (`systemctl show` prints `Id=` as it is; `--check` used to unescape it
/// and then took the unit for another one on the line's address.)
#[test]
fn check_is_clean_for_a_live_binding_whose_unit_name_has_an_escape() {
    let config = ".config/qrexec-connect/agent.conf";
    let manager = UserManager::start(&[(
        config,
        "%t/qrexec-connect/ssh-agent @default qubes.ConnectSSHAgent\n",
    )]);
    let socket = manager.ns_path("/run/user/0/qrexec-connect/ssh-agent");
    common::wait_for("the agent's socket to listen", LIMIT, || {
        std::os::unix::net::UnixStream::connect(&socket).ok()
    });
    let config_path = manager.home.path().join(config);
    for args in [
        vec!["--check".to_owned()],
        vec!["--check".to_owned(), config_path.display().to_string()],
    ] {
        let out = common::run(
            manager
                .command("/usr/lib/systemd/user-generators/qrexec-connect-generator")
                .args(&args),
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "qrexec-connect-generator: 1 binding, 0 errors, 0 warnings in 1 file\n",
            "{args:?}"
        );
        assert_eq!(out.status.code(), Some(0), "{args:?}");
    }
}

/// Issue 17 §4: a symlink another user owns on the way to a socket path
/// (in a sticky directory such as /tmp only its owner may replace it) lets
/// them lead the path to a socket of theirs whenever they like: seen, the
/// victim's clients connected to the other user's program. So is a file
/// of theirs where systemd would make a directory, and a link of theirs
/// that dangles. `--check` refuses each, naming the entry and its owner;
/// a link of our own into a directory of our own is fine.
#[test]
fn a_link_another_user_owns_on_the_way_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let base = std::path::PathBuf::from(format!(
        "/tmp/qrexec-connect-test-{}-links",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&base);
    let sticky = base.join("sticky");
    let mine = base.join("mine");
    for (dir, mode) in [(&base, 0o755), (&sticky, 0o1777), (&mine, 0o700)] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let theirs = |name: &str, make: &dyn Fn(&std::path::Path)| {
        let path = sticky.join(name);
        make(&path);
        std::os::unix::fs::lchown(&path, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
        path
    };
    let link = theirs("their-link", &|p| {
        std::os::unix::fs::symlink(&mine, p).unwrap()
    });
    let dangling = theirs("their-dangling", &|p| {
        std::os::unix::fs::symlink(base.join("nowhere"), p).unwrap()
    });
    let file = theirs("their-file", &|p| std::fs::write(p, "").unwrap());
    // A link of ours that leads through theirs.
    std::os::unix::fs::symlink(&link, sticky.join("our-link")).unwrap();
    std::os::unix::fs::symlink(&mine, sticky.join("our-own")).unwrap();
    let config = base.join("bindings.conf");
    std::fs::write(
        &config,
        format!(
            "{0}/their-link/agent vault qubes.SshAgent\n\
             {0}/their-dangling/agent vault qubes.SshAgent\n\
             {0}/their-file/sub/agent vault qubes.SshAgent\n\
             {0}/our-link/agent vault qubes.SshAgent\n\
             {0}/our-own/agent vault qubes.SshAgent\n",
            sticky.display()
        ),
    )
    .unwrap();
    let out = common::run(
        std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/debug/qrexec-connect-generator"
        ))
        .arg("--check")
        .arg(&config),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (line, entry) in [(1, &link), (2, &dangling), (3, &file), (4, &link)] {
        let expected = format!("{}:{line}: ", config.display());
        let said = stderr
            .lines()
            .find(|l| l.starts_with(&expected))
            .unwrap_or_else(|| panic!("line {line} was not refused:\n{stderr}"));
        assert!(
            said.contains(&format!(
                "goes through {:?}, which belongs to uid {OTHER_UID}",
                entry.display().to_string()
            )),
            "line {line}: {said}"
        );
    }
    assert!(
        !stderr.contains(&format!("{}:5: ", config.display())),
        "our own link was refused:\n{stderr}"
    );
    assert!(
        stderr.contains("1 binding, 4 errors, 0 warnings in 1 file"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let _ = std::fs::remove_dir_all(&base);
}

/// Issue 17 §4: a directory that our own primary group may write is safe
/// only while nobody else is in that group. With another member (a
/// `users` group for all, as some systems have), they can replace the
/// socket: refused like any group others write. Run with an /etc/group in
/// which root's group has a member, in a mount namespace of its own.
#[test]
fn a_directory_our_shared_group_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let base = std::path::PathBuf::from(format!(
        "/tmp/qrexec-connect-test-{}-group",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&base);
    let shared = base.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    for (dir, mode) in [(&base, 0o755), (&shared, 0o775)] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let gid = std::fs::metadata(&shared).unwrap().gid();
    let config = base.join("bindings.conf");
    std::fs::write(
        &config,
        format!("{}/agent vault qubes.SshAgent\n", shared.display()),
    )
    .unwrap();
    let generator = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/debug/qrexec-connect-generator"
    );
    let check = |group: &str| {
        let file = base.join("group");
        std::fs::write(&file, group).unwrap();
        common::run(std::process::Command::new("unshare").args([
            "-m",
            "sh",
            "-c",
            "mount --bind \"$1\" /etc/group && exec \"$2\" --check \"$3\"",
            "sh",
            &file.display().to_string(),
            generator,
            &config.display().to_string(),
        ]))
    };
    // Our group alone: its write bit is ours.
    let out = check(&format!("ours:x:{gid}:\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 binding, 0 errors"), "{stderr}");
    // Another member: they can write there.
    let out = check(&format!("ours:x:{gid}:mallory\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "is under {:?}, which the members of group {gid} (ours) can write (and it is not sticky)",
            shared.display().to_string()
        )),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let _ = std::fs::remove_dir_all(&base);
}
