//! `units/user-sessions` as root runs it (postinst, %post, `make
//! install-client`), against users who control their own processes: what
//! each user's process gets from root, what reaches root's terminal, and
//! how long a user can hold the install.
//!
//! What is real and what is not: the script, bash, setsid, timeout,
//! setpriv, env, script(1) (root's terminal is a pseudo-terminal) and the
//! kernel's sessions, ttys and ptrace are real. The one fake is
//! `systemctl`, the only program user-sessions runs as a user: the Python
//! program `tests/user_sessions/systemctl`, mounted over
//! /usr/bin/systemctl in a private mount namespace, records what it was
//! handed, writes terminal escapes, and then exits, ignores SIGTERM, or has
//! a process of its user hold it in ptrace-stop. Each user (uids 2001,
//! 2002, 2003, no passwd entry needed) has a `/run/user/UID` of its own
//! (a tmpfs on /run in the namespace) with a socket at `systemd/private`,
//! which is all user-sessions looks for; no real manager runs, so nothing
//! answers on it.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::*;

/// The workspace root (this package is its tests/ directory).
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const FAKE_SYSTEMCTL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/user_sessions/systemctl");

fn user_sessions() -> String {
    format!("{REPO}/units/user-sessions")
}

/// A private mount namespace with a fresh /run holding one runtime
/// directory per user, and the fake systemctl in place of the real one.
struct Sessions {
    holder: Child,
    _scratch: TempDir,
}

/// What the fake systemctl recorded in one call: `key value` lines.
#[derive(Debug)]
struct Call(Vec<(String, String)>);

impl Call {
    fn get(&self, key: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {key} in {self:#?}"))
    }
    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Options for the namespace.
#[derive(Default)]
struct Setup {
    /// No /usr/bin/setpriv.
    without_setpriv: bool,
}

impl Sessions {
    /// `users`: (uid, mode of the fake systemctl) for each running session.
    fn start(users: &[(u32, &str)]) -> Sessions {
        Self::start_with(users, Setup::default())
    }

    fn start_with(users: &[(u32, &str)], setup: Setup) -> Sessions {
        let scratch = TempDir::new("user-sessions");
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // Where the postinst looks for user-sessions: this checkout's.
        let libexec = scratch.path().join("libexec/qrexec-connect");
        std::fs::create_dir_all(&libexec).unwrap();
        std::os::unix::fs::symlink(user_sessions(), libexec.join("user-sessions")).unwrap();
        let wrapper = scratch.path().join("setpriv-wrapper");
        std::fs::write(
            &wrapper,
            "#!/bin/sh\n\
             tr '\\000' '\\n' </proc/$$/environ >/run/setpriv-env.$$\n\
             unset PWD\n\
             exec /run/.setpriv-real \"$@\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let setpriv = if setup.without_setpriv {
            // An overlay whose upper layer holds a whiteout: no setpriv at all.
            "mkdir -p /run/.bin/upper /run/.bin/work
             mknod /run/.bin/upper/setpriv c 0 0
             mount -t overlay overlay -o lowerdir=/usr/bin,upperdir=/run/.bin/upper,workdir=/run/.bin/work /usr/bin"
                .to_owned()
        } else {
            // setpriv, wrapped: each run records the environment it was
            // given (as root, before it changes user), then runs the real one
            // (without the PWD that sh exports).
            format!(
                "cp /usr/bin/setpriv /run/.setpriv-real
                 mount --bind {} /usr/bin/setpriv",
                wrapper.display()
            )
        };
        let script = format!(
            "set -e
             mount -t tmpfs -o mode=0755 tmpfs /run
             mkdir -p /run/user
             {setpriv}
             mount --bind {fake} /usr/bin/systemctl
             mount -t overlay overlay -o lowerdir={libexec}:/usr/libexec /usr/libexec
             echo ready
             exec sleep infinity",
            fake = FAKE_SYSTEMCTL,
            libexec = scratch.path().join("libexec").display(),
        );
        let holder = hold_mount_namespace(&script);
        let sessions = Sessions {
            holder,
            _scratch: scratch,
        };
        for &(uid, mode) in users {
            let runtime = sessions.ns_path(&format!("/run/user/{uid}"));
            std::fs::create_dir_all(runtime.join("systemd")).unwrap();
            // A socket where the manager's would be; nobody listens on it.
            drop(std::os::unix::net::UnixListener::bind(runtime.join("systemd/private")).unwrap());
            std::fs::write(runtime.join("fake-mode"), mode).unwrap();
            for path in [
                runtime.clone(),
                runtime.join("systemd"),
                runtime.join("systemd/private"),
                runtime.join("fake-mode"),
            ] {
                std::os::unix::fs::chown(&path, Some(uid), Some(uid)).unwrap();
            }
            std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        sessions
    }

    fn ns_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.holder.id()))
    }

    /// A command in the namespace, with root's plain environment.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", "--", "env", "-i"])
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("SHELL=/bin/sh")
            .arg("LANG=C.UTF-8")
            .arg(program);
        command
    }

    /// Every call the fake systemctl of `uid` recorded, in order.
    fn calls(&self, uid: u32) -> Vec<Call> {
        let text = std::fs::read_to_string(self.ns_path(&format!("/run/user/{uid}/fake-record")))
            .unwrap_or_default();
        text.split_terminator("end\n")
            .map(|block| {
                Call(
                    block
                        .lines()
                        .map(|line| {
                            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
                            (key.to_owned(), value.to_owned())
                        })
                        .collect(),
                )
            })
            .collect()
    }
}

impl Drop for Sessions {
    fn drop(&mut self) {
        // Whatever still runs in the namespace (a call that was never
        // killed, a user's tracer), then the namespace itself.
        let ours = std::fs::read_link(format!("/proc/{}/ns/mnt", self.holder.id())).ok();
        let doomed: Vec<String> = all_pids()
            .into_iter()
            .filter(|&pid| pid != self.holder.id())
            .filter(|pid| {
                ours.is_some() && std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() == ours
            })
            .map(|pid| pid.to_string())
            .collect();
        if !doomed.is_empty() {
            let _ = Command::new("kill").arg("-KILL").args(&doomed).status();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Runs `command` to its end, at most `limit`; stdin stays open (an empty
/// pipe) until then. Returns the status, stdout and stderr.
fn run_to_end(command: &mut Command, limit: Duration) -> (ExitStatus, Vec<u8>, String) {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let _stdin = child.stdin.take();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let status = wait_for(&format!("{command:?} to end"), limit, || {
        child.try_wait().unwrap()
    });
    (status, out.join().unwrap(), err.join().unwrap())
}

/// Issue 17 §3: a user who can ptrace their own processes gets nothing of
/// root's from the call made as them: no terminal (none of its fds, no
/// controlling terminal, /dev/tty refuses), no other descriptor (root's
/// shell had fd 7 open), a session of its own, `/` as working directory,
/// two variables of environment; and what it writes reaches root's terminal
/// only escaped.
#[test]
fn a_users_systemctl_gets_no_terminal_no_root_descriptor_and_is_shown_escaped() {
    let sessions = Sessions::start(&[(2001, "plain")]);
    // Root at an interactive terminal: script(1) gives the shell a
    // pseudo-terminal as its controlling terminal and as fds 0, 1 and 2.
    let (status, terminal, stderr) = run_to_end(
        sessions.command("script").args([
            "-qec",
            &format!(
                "echo $$ > /run/root-session; exec 7</etc/hostname; \
                 export ROOT_SECRET=root-only; exec {} start",
                user_sessions()
            ),
            "/dev/null",
        ]),
        Duration::from_secs(120),
    );
    let shown = String::from_utf8_lossy(&terminal);
    assert!(status.success(), "user-sessions failed: {shown}{stderr}");
    let root_session = std::fs::read_to_string(sessions.ns_path("/run/root-session")).unwrap();

    let calls = sessions.calls(2001);
    assert!(
        calls.first().map(|c| c.get("call")) == Some("--user --quiet daemon-reload"),
        "{calls:#?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.get("call")
                == "--user --quiet --no-block start qrexec-connect-reconcile.path"),
        "{calls:#?}"
    );
    for call in &calls {
        let fds: Vec<&str> = call
            .all("fd")
            .iter()
            .map(|fd| fd.split_once(' ').unwrap().0)
            .collect();
        assert_eq!(fds, ["0", "1", "2"], "open descriptors: {call:#?}");
        assert_eq!(call.all("isatty"), ["0 no", "1 no", "2 no"], "{call:#?}");
        assert_eq!(call.all("fd")[0], "0 /dev/null", "{call:#?}");
        assert_eq!(call.get("tty_nr"), "0", "a controlling terminal: {call:#?}");
        assert_ne!(call.get("devtty"), "opened", "/dev/tty opened: {call:#?}");
        assert_ne!(
            call.get("sid"),
            root_session.trim(),
            "root's session: {call:#?}"
        );
        assert_eq!(call.get("cwd"), "/", "{call:#?}");
        assert_eq!(call.get("uid"), "2001 2001 2001", "{call:#?}");
        assert_eq!(call.get("gid"), "2001 2001 2001", "{call:#?}");
        assert_eq!(call.get("groups"), "", "{call:#?}");
        assert_eq!(
            call.all("env"),
            [
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "XDG_RUNTIME_DIR=/run/user/2001"
            ],
            "{call:#?}"
        );
        // Its output goes to a file only root can open by name.
        assert_eq!(call.get("stdout_owner"), "0 600", "{call:#?}");
        assert_ne!(call.get("stdout_reopen"), "opened", "{call:#?}");
    }

    // What setpriv was given, as root, is all the user's process starts
    // with: the two variables, none of root's (a process that runs as the
    // user with root's environment shows it in /proc/PID/environ).
    let given: Vec<String> = std::fs::read_dir(sessions.ns_path("/run"))
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("setpriv-env.")
        })
        .map(|entry| std::fs::read_to_string(entry.path()).unwrap())
        .collect();
    assert_eq!(given.len(), calls.len(), "one setpriv per call: {given:#?}");
    for environment in &given {
        let mut names: Vec<&str> = environment
            .lines()
            .map(|line| line.split_once('=').map_or(line, |(name, _)| name))
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["PATH", "XDG_RUNTIME_DIR"],
            "setpriv, and so the user's process, got root's environment: {environment}"
        );
    }

    // Root's terminal shows the call's output, every byte printable ASCII
    // (the pty adds \r before each \n).
    let raw: Vec<u8> = terminal
        .iter()
        .copied()
        .filter(|&b| !(b == b'\n' || b == b'\r' || (0x20..0x7f).contains(&b)))
        .collect();
    assert!(
        raw.is_empty(),
        "bytes that are not printable ASCII reached root's terminal: {raw:x?} in {shown:?}"
    );
    for escaped in [
        "^[]0;owned^G^[[2J^[[31mfrom-stdoutM-bM-^@M-.evilM-bM-^@M-^K^Mback",
        "from-stderr",
    ] {
        assert!(shown.contains(escaped), "{escaped:?} not shown: {shown:?}");
    }
}

/// Issue 17 §3: a call that does not end by itself costs a bounded time,
/// whether it ignores SIGTERM or a process of its user holds it in
/// ptrace-stop (where SIGTERM and SIGCONT do nothing and only SIGKILL
/// works); the users after it are still reached. The deadline is generous:
/// it only tells "ends" from "never ends".
#[test]
fn a_user_who_never_lets_systemctl_end_holds_the_install_only_for_a_while() {
    let sessions = Sessions::start(&[
        (2001, "ignore-term"),
        (2002, "ptrace-stop"),
        (2003, "plain"),
    ]);
    let (status, stdout, stderr) = run_to_end(
        sessions.command(&user_sessions()).arg("start"),
        Duration::from_secs(240),
    );
    let said = String::from_utf8_lossy(&stdout).into_owned() + &stderr;
    let stuck: Vec<u32> = [2001, 2002]
        .iter()
        .map(|uid| {
            let calls = sessions.calls(*uid);
            assert_eq!(calls.len(), if *uid == 2002 { 2 } else { 1 }, "{calls:#?}");
            assert!(
                said.contains(&format!(
                    "could not start the reload watcher in the user manager of uid {uid}"
                )),
                "{said}"
            );
            calls[0].get("pid").parse().unwrap()
        })
        .collect();
    // The tracer did hold the call (or this test proves nothing).
    let attached = &sessions.calls(2002)[1];
    assert!(attached.get("attached").starts_with("0 "), "{attached:#?}");
    for pid in stuck {
        assert!(
            matches!(state_of(pid), None | Some('Z')),
            "pid {pid} still runs after user-sessions ended"
        );
    }
    assert!(status.success(), "{said}");
    let reached = sessions.calls(2003);
    assert_eq!(
        reached[0].get("call"),
        "--user --quiet daemon-reload",
        "{reached:#?}"
    );
}

/// Issue 17 §6: with DPKG_ROOT set, dpkg is installing into another root
/// (a chroot being built): the sessions that run here are not that
/// system's, so neither the postinst nor the prerm reaches them. Without
/// it, the postinst does (the same run, so the test can see a call).
#[test]
fn the_maintainer_scripts_leave_running_sessions_alone_under_dpkg_root() {
    let sessions = Sessions::start(&[(2001, "plain")]);
    for (script, action) in [("postinst", "configure"), ("prerm", "remove")] {
        let output = run(sessions
            .command("env")
            .arg("DPKG_ROOT=/srv/another-root")
            .arg("sh")
            .arg(format!("{REPO}/debian/qrexec-connect.{script}"))
            .arg(action));
        assert!(output.status.success(), "{script}: {output:?}");
        let calls = sessions.calls(2001);
        assert!(
            calls.is_empty(),
            "{script} {action} with DPKG_ROOT: {calls:#?}"
        );
    }
    let output = run(sessions
        .command("sh")
        .arg(format!("{REPO}/debian/qrexec-connect.postinst"))
        .arg("configure"));
    assert!(output.status.success(), "{output:?}");
    assert!(
        !sessions.calls(2001).is_empty(),
        "the postinst reached no session"
    );
}

/// Issue 17 §6: without setpriv (a Fedora minimal template lacks
/// util-linux) no session can be reached; user-sessions says so, naming
/// the program, and fails.
#[test]
fn user_sessions_says_loudly_that_setpriv_is_missing() {
    let sessions = Sessions::start_with(
        &[(2001, "plain")],
        Setup {
            without_setpriv: true,
        },
    );
    let output = run(sessions.command(&user_sessions()).arg("start"));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit 0 without setpriv: {said}");
    assert!(said.contains("setpriv is missing"), "{said}");
    assert!(sessions.calls(2001).is_empty());
}

/// Issue 18: a removed package leaves no file in a running session. The
/// prerm's `stop` stops the watcher and the recovery before the sockets
/// and the daemon (a recovery that ends starts sockets.target again), waits
/// for each stop, and then, as the user, removes our runtime directory and
/// the units our generator wrote, and nothing else: not the user's other
/// generated units, not root's files behind a user's links.
#[test]
fn stop_removes_what_the_package_left_in_each_runtime_directory_as_the_user() {
    let sessions = Sessions::start(&[(2001, "plain"), (2002, "plain")]);
    let own =
        |path: &PathBuf, uid: u32| std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    // 2001: what a session with bindings holds.
    let runtime = sessions.ns_path("/run/user/2001");
    let state = runtime.join("qrexec-connect");
    let generator = runtime.join("systemd/generator");
    let wants = generator.join("sockets.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("applied"), "127.0.0.1:2222\n").unwrap();
    drop(std::os::unix::net::UnixListener::bind(state.join("agent")).unwrap());
    let unit = r"qrexec-connect-runtime-qrexec\x2dconnect-agent.socket";
    std::fs::write(generator.join(unit), "[Socket]\n").unwrap();
    std::os::unix::fs::symlink(format!("../{unit}"), wants.join(unit)).unwrap();
    std::fs::write(generator.join("other.service"), "[Service]\n").unwrap();
    for path in [
        state.clone(),
        state.join("applied"),
        state.join("agent"),
        generator.clone(),
        wants.clone(),
        generator.join(unit),
        generator.join("other.service"),
    ] {
        own(&path, 2001);
    }
    // 2002: links to root's directories where ours would be.
    let roots_state = sessions.ns_path("/run/roots-state");
    let roots_generator = sessions.ns_path("/run/roots-generator");
    for dir in [&roots_state, &roots_generator] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(roots_state.join("keep"), "root's\n").unwrap();
    std::fs::write(
        roots_generator.join("qrexec-connect-root.socket"),
        "[Socket]\n",
    )
    .unwrap();
    let runtime2 = sessions.ns_path("/run/user/2002");
    std::os::unix::fs::symlink("/run/roots-state", runtime2.join("qrexec-connect")).unwrap();
    std::os::unix::fs::symlink("/run/roots-generator", runtime2.join("systemd/generator")).unwrap();
    for link in [
        runtime2.join("qrexec-connect"),
        runtime2.join("systemd/generator"),
    ] {
        std::os::unix::fs::lchown(&link, Some(2002), Some(2002)).unwrap();
    }

    let output = run(sessions.command(&user_sessions()).arg("stop"));
    assert!(output.status.success(), "{output:?}");

    assert!(!state.exists(), "{} is left", state.display());
    assert!(!generator.join(unit).exists(), "the generated unit is left");
    assert!(
        std::fs::symlink_metadata(wants.join(unit)).is_err(),
        "its sockets.target.wants link is left"
    );
    assert!(
        generator.join("other.service").exists(),
        "the user's other unit was removed"
    );
    assert!(
        roots_state.join("keep").exists(),
        "root's file behind a link was removed"
    );
    assert!(
        roots_generator.join("qrexec-connect-root.socket").exists(),
        "root's unit behind a link was removed"
    );
    // The order: nothing can start the sockets once they are stopped; and
    // each stop waits for its jobs (no --no-block).
    let calls: Vec<String> = sessions
        .calls(2001)
        .iter()
        .map(|call| call.get("call").to_owned())
        .collect();
    assert_eq!(
        calls,
        [
            "--user --quiet stop qrexec-connect-reconcile.path qrexec-connect-reconcile.service \
             qrexec-connect-recover.service",
            "--user --quiet stop qrexec-connect-*.socket qrexec-connect.service \
             qrexec-connect-handover.service",
        ],
        "the stops, in order"
    );
}
