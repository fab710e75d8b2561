//! A real `systemd --user` (with a real journald) in a private mount
//! namespace, following the recipe in docs/systemd-facts.md:
//! a tmpfs on /run holding /run/systemd/system (so the manager believes the
//! system was booted with systemd), and the project installed with
//! `make install-client DESTDIR=...` overlaid on /usr for that namespace
//! only. The qrexec-client-vm double is installed as
//! /usr/bin/qrexec-client-vm, so the daemon runs with its default path.
//!
//! Processes in the namespace are ordinary host processes; Drop kills the
//! manager's whole process tree, journald and the namespace holder.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{descendants_of, hold_mount_namespace, run, wait_for, TempDir, DOUBLE};

pub const RUNTIME_DIR: &str = "/run/user/0";

/// A running user manager in its own mount namespace.
pub struct UserManager {
    holder: Child,
    journald: Option<Child>,
    manager: Option<Child>,
    pub home: TempDir,
    /// Files for the test (double policy, services), visible on both sides.
    pub scratch: TempDir,
    /// Held while this manager lives (dropped last, after the cleanup).
    _one_at_a_time: ManagerLock,
}

/// One user manager at a time on the machine: on this cgroup-v1 machine
/// every manager runs in the host's cgroup and would create the same unit
/// cgroups as another manager running at the same moment. An flock(2) on a
/// fixed path, so it holds between threads of one test binary (each open is
/// its own lock) and between test runs of several checkouts.
struct ManagerLock(#[allow(dead_code)] std::fs::File);

impl ManagerLock {
    fn acquire() -> ManagerLock {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/qrexec-connect-test-user-manager.lock")
            .expect("open the user-manager lock file");
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return ManagerLock(file);
            }
            let error = std::io::Error::last_os_error();
            assert_eq!(
                error.kind(),
                std::io::ErrorKind::Interrupted,
                "flock: {error}"
            );
        }
    }
}

/// Installs the project once per test binary into a DESTDIR (debug build),
/// under cargo's scratch directory for tests (one tree per test binary,
/// replaced by the next run, gone with `cargo clean`; nothing left in /tmp).
fn installed_tree() -> &'static Path {
    static TREE: OnceLock<PathBuf> = OnceLock::new();
    TREE.get_or_init(|| {
        let binary = std::env::current_exe().unwrap();
        let stem = binary.file_stem().unwrap().to_string_lossy().into_owned();
        let dest = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("install-{stem}"));
        let _ = std::fs::remove_dir_all(&dest);
        let output = run(Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(super::workspace())
            .arg("install-client")
            .arg(format!("DESTDIR={}", dest.display()))
            .arg("PREFIX=/usr")
            .arg("PROFILE=debug")
            .arg(format!("TARGET_DIR={}", target_dir().display())));
        assert!(
            output.status.success(),
            "make install-client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // The double stands where Qubes puts the real client.
        std::fs::copy(DOUBLE, dest.join("usr/bin/qrexec-client-vm")).unwrap();
        dest
    })
}

/// Cargo's target directory (where the debug binaries under test are).
pub fn target_dir() -> PathBuf {
    super::program::out_dir().parent().unwrap().to_path_buf()
}

/// What the namespace holds of the project when the manager starts.
pub enum Product {
    /// `make install-client DESTDIR=` overlaid on /usr, read-only.
    Installed,
    /// Nothing: /usr, /etc and /var are writable overlays (changes stay in
    /// the test's scratch directory), and the double is already at
    /// /usr/bin/qrexec-client-vm. The test installs the product itself,
    /// after the manager runs, as a user's session would see it.
    NotYet,
}

impl UserManager {
    /// Starts the namespace, journald and the manager, with the files of
    /// `home` (relative paths under $HOME) written before the manager starts.
    pub fn start(home_files: &[(&str, &str)]) -> UserManager {
        Self::start_with(home_files, &[])
    }

    /// Like [`start`], plus unit files or drop-ins written under
    /// /run/systemd/user (e.g. Environment= for the double).
    pub fn start_with(home_files: &[(&str, &str)], run_units: &[(&str, &str)]) -> UserManager {
        Self::start_full(Product::Installed, home_files, run_units)
    }

    /// The general form of [`start`].
    pub fn start_full(
        product: Product,
        home_files: &[(&str, &str)],
        run_units: &[(&str, &str)],
    ) -> UserManager {
        let guard = ManagerLock::acquire();
        let home = TempDir::new("home");
        let scratch = TempDir::new("scratch");
        for (path, text) in home_files {
            let path = home.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let overlays = match product {
            Product::Installed => format!(
                "mount -t overlay overlay -o lowerdir={}/usr:/usr /usr",
                installed_tree().display()
            ),
            // Upper layers on the namespace's tmpfs: whatever the test
            // installs, dpkg's database included, vanishes with it.
            Product::NotYet => "for d in usr etc var; do
                     mkdir -p /run/.overlay/$d/upper /run/.overlay/$d/work
                     mount -t overlay overlay -o lowerdir=/$d,upperdir=/run/.overlay/$d/upper,workdir=/run/.overlay/$d/work /$d
                 done"
                .to_owned(),
        };
        let script = format!(
            "set -e
             mount -t tmpfs tmpfs /run
             mkdir -p /run/systemd/system {rt} /run/systemd/user
             chmod 700 {rt}
             {overlays}
             echo ready
             exec sleep infinity",
            rt = RUNTIME_DIR,
        );
        let holder = hold_mount_namespace(&script);
        let mut manager = UserManager {
            holder,
            journald: None,
            manager: None,
            home,
            scratch,
            _one_at_a_time: guard,
        };
        if let Product::NotYet = product {
            // The double stands where Qubes puts the real client.
            let client = manager.ns_path("/usr/bin/qrexec-client-vm");
            std::fs::copy(DOUBLE, client).unwrap();
        }
        for (name, text) in run_units {
            manager.write_file(&format!("/run/systemd/user/{name}"), text);
        }
        let journald = manager
            .command("/usr/lib/systemd/systemd-journald")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        manager.journald = Some(journald);
        let socket = manager.ns_path("/run/systemd/journal/socket");
        wait_for("journald's socket", Duration::from_secs(10), || {
            socket.exists().then_some(())
        });
        // As under user@.service, the manager's stdout and stderr (and so
        // its generators' messages) go to the journal.
        let user_manager = manager
            .command("systemd-cat")
            .args([
                "--identifier=systemd-user",
                "/usr/lib/systemd/systemd",
                "--user",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        manager.manager = Some(user_manager);
        wait_for("the user manager", Duration::from_secs(20), || {
            let out = manager.systemctl(&["is-system-running"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            matches!(state.as_str(), "running" | "degraded").then_some(())
        });
        manager
    }

    /// The pid of `systemd --user`.
    pub fn manager_pid(&self) -> u32 {
        self.manager.as_ref().map_or(0, |m| m.id())
    }

    /// The pid whose mount namespace the test uses.
    pub fn ns_pid(&self) -> u32 {
        self.holder.id()
    }

    /// A path inside the namespace, reachable from the host through /proc.
    pub fn ns_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.ns_pid()))
    }

    /// Writes a file inside the namespace (e.g. under /run).
    pub fn write_file(&self, path: &str, text: &str) {
        let path = self.ns_path(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
    }

    /// Writes an executable file on the host side (scratch dir).
    pub fn write_executable(&self, name: &str, text: &str) -> PathBuf {
        let path = self.scratch.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A command run inside the namespace with the user session's environment.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg("-t")
            .arg(self.ns_pid().to_string())
            .arg("-m")
            .arg("--")
            .arg("env")
            .arg("-i")
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg(format!("HOME={}", self.home.path().display()))
            .arg(format!("XDG_RUNTIME_DIR={RUNTIME_DIR}"))
            .arg("USER=root")
            .arg("LANG=C.UTF-8")
            .arg(program);
        command
    }

    /// `systemctl --user ARGS`.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        run(self
            .command("systemctl")
            .arg("--user")
            .arg("--no-pager")
            .args(args))
    }

    /// `systemctl --user ARGS`, which must succeed; returns stdout.
    pub fn systemctl_ok(&self, args: &[&str]) -> String {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl --user {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One property of a unit (`systemctl show -p NAME --value`).
    pub fn property(&self, unit: &str, name: &str) -> String {
        self.systemctl_ok(&["show", "-p", name, "--value", unit])
            .trim()
            .to_owned()
    }

    /// `journalctl` with the given match arguments, as JSON lines.
    pub fn journal(&self, matches: &[&str]) -> String {
        let out = run(self
            .command("journalctl")
            .args(["--no-pager", "-o", "json"])
            .args(matches));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The journal's messages as plain lines (for failure reports).
    pub fn messages(&self) -> String {
        let out = run(self
            .command("journalctl")
            .args(["--no-pager", "-o", "short-monotonic", "--no-hostname"])
            .arg("_TRANSPORT=stdout")
            .arg("+")
            .arg("_TRANSPORT=journal"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until journal entries matching `matches` contain `needle`.
    pub fn wait_journal(&self, matches: &[&str], needle: &str, limit: Duration) -> String {
        wait_for(
            &format!("{needle:?} in journal entries {matches:?}"),
            limit,
            || {
                let text = self.journal(matches);
                text.contains(needle).then_some(text)
            },
        )
    }

    /// The main pid of a unit, if it runs.
    pub fn main_pid(&self, unit: &str) -> Option<u32> {
        self.property(unit, "MainPID")
            .parse()
            .ok()
            .filter(|&pid| pid != 0)
    }

    /// Kills the running daemon with SIGKILL, as a crash would, and waits
    /// until the manager has seen it go; returns the pid it had.
    pub fn kill_daemon(&self, limit: Duration) -> u32 {
        let pid = self
            .main_pid("qrexec-connect.service")
            .expect("the daemon runs after a connection");
        // SAFETY: kill(2) on the daemon's pid, read from the manager just now.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        wait_for("the manager to notice the kill", limit, || {
            (self.main_pid("qrexec-connect.service") != Some(pid)).then_some(())
        });
        pid
    }

    /// Waits until the reconcile step triggered by the last reload has run:
    /// the flag is gone and the reconcile service is not running.
    pub fn settle(&self) {
        let flag = self.ns_path("/run/user/0/qrexec-connect/reload-requested");
        wait_for(
            "the reconcile step to finish",
            Duration::from_secs(20),
            || {
                let state = self.property("qrexec-connect-reconcile.service", "ActiveState");
                (!flag.exists() && matches!(state.as_str(), "inactive" | "failed")).then_some(())
            },
        );
    }

    /// Runs `systemctl --user daemon-reload`.
    pub fn daemon_reload(&self) {
        self.systemctl_ok(&["daemon-reload"]);
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        // A failed test shows what the manager, the units and the daemon
        // did (the CI log is all there is of a run on another machine).
        if std::thread::panicking() {
            let out = self
                .command("journalctl")
                .args(["--no-pager", "-o", "short-monotonic", "--no-hostname"])
                .args(["-n", "400"])
                // Not the kernel's ring buffer, which journald also reads.
                .args(["_TRANSPORT=journal", "+", "_TRANSPORT=stdout", "+"])
                .arg("_TRANSPORT=syslog")
                .output();
            if let Ok(out) = out {
                eprintln!(
                    "--- the test's journal (last 400 entries) ---\n{}--- end of journal ---",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
        if let Some(manager) = &mut self.manager {
            let pid = manager.id();
            let mut doomed = descendants_of(pid);
            doomed.push(pid);
            for pid in doomed {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let _ = manager.wait();
        }
        // Children re-parented away from the manager (e.g. live clients
        // after a daemon restart) carry our namespace: find them by it.
        let ours = std::fs::read_link(format!("/proc/{}/ns/mnt", self.ns_pid())).ok();
        if let Some(ours) = ours {
            for pid in super::all_pids() {
                if pid == self.ns_pid() {
                    continue;
                }
                if std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                    .ok()
                    .as_ref()
                    == Some(&ours)
                {
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        if let Some(journald) = &mut self.journald {
            let _ = journald.kill();
            let _ = journald.wait();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

impl UserManager {
    /// The pid of the namespace's journald (to stop and resume it).
    pub fn journald_pid(&self) -> u32 {
        self.journald.as_ref().map_or(0, |j| j.id())
    }
}
