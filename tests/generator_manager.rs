//! The generator under a real `systemd --user` (private mount namespace, see
//! tests/common/user_manager.rs): what the user manager does with its
//! output, where a fixture cannot tell.

mod common;

use std::time::Duration;

use common::user_manager::UserManager;

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
