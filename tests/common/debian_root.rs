//! Whole Debian 12 systems for the tests that must start from one: the
//! README's commands on a fresh Debian 12 (tests/fresh_debian.rs) and the
//! package in a booted Debian 12 (tests/booted.rs).
//!
//! * [`cached_root`] builds a root with mmdebstrap from the apt sources this
//!   machine uses (Debian's registry), once, under
//!   `target/debian-roots/NAME/`, and again whenever its recipe (package
//!   list, hooks, sources) changes. The cached root is never run: every use
//!   is an overlay on it, so every run starts from the same pristine system.
//! * [`Chroot`] runs a script in such an overlay, chrooted, in private mount
//!   and PID namespaces: the mounts (proc, sys, dev, a tmpfs on /run) vanish
//!   with the namespace, and when its first process ends, the kernel ends
//!   every other process in it. That process is the chrooted shell, so
//!   `/proc/1/root` is the root the script sees and systemd's tools do not
//!   take the system for a chroot (they would ignore `systemctl --user
//!   start`).
//! * The run inside a fresh root runs `make test` again, which would build a
//!   root of its own, and so on: the outer run sets [`INSIDE_VAR`] to a
//!   nonce it also writes into the exchange directory, and the inner tests
//!   that would build roots call [`inside_fresh_root`] instead, which checks
//!   that nonce (a stray variable on another machine fails, never skips) and
//!   leaves a receipt that the outer test requires.
//!
//! Nothing here touches the host's processes or files outside `target/`,
//! except the user-manager lock file that inner runs share with the host's
//! (tests/common/user_manager.rs): one user manager at a time on the machine.

#![allow(dead_code)] // each test binary uses some

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::user_manager::target_dir;

/// Set by the outer fresh-Debian run for the inner `make test`.
pub const INSIDE_VAR: &str = "QREXEC_CONNECT_IN_FRESH_DEBIAN";

/// Where the exchange directory appears inside a [`Chroot`].
pub const EXCHANGE: &str = "/mnt/qrexec-connect-test";

/// The suite every root is built from.
const SUITE: &str = "bookworm";

/// How to build one cached root.
pub struct RootSpec {
    /// Its directory under `target/debian-roots/`.
    pub name: &'static str,
    /// mmdebstrap's variant (`standard`: what a Debian install with the
    /// "standard system utilities" holds).
    pub variant: &'static str,
    /// Packages added, as a user would with `apt install` (with their
    /// Recommends, as apt installs them by default).
    pub include: &'static [&'static str],
    /// Shell commands run after the install, with the root as `$1`.
    pub customize: &'static [&'static str],
}

/// The machine's apt sources: the roots come from the registry this machine
/// uses, with its security and updates suites (Debian 12's Rust 1.85+ is in
/// those).
fn host_sources() -> PathBuf {
    for path in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        let path = Path::new(path);
        if std::fs::read_to_string(path).is_ok_and(|text| text.contains(SUITE)) {
            return path.to_owned();
        }
    }
    panic!(
        "no apt sources for Debian 12 ({SUITE}) on this machine: the Debian roots are built \
         from /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
    );
}

/// An exclusive flock(2) on a file, released on drop.
struct FileLock(#[allow(dead_code)] std::fs::File);

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return FileLock(file);
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

/// `target/debian-roots`.
fn roots_dir() -> PathBuf {
    target_dir().join("debian-roots")
}

/// The root built from `spec`, built first if missing or built from another
/// recipe. Two test binaries building the same root wait for each other.
pub fn cached_root(spec: &RootSpec) -> PathBuf {
    let dir = roots_dir().join(spec.name);
    std::fs::create_dir_all(&dir).unwrap();
    let _building = FileLock::acquire(&roots_dir().join(format!("{}.lock", spec.name)));
    let sources = host_sources();
    let mut args: Vec<String> = vec![
        "--mode=root".into(),
        format!("--variant={}", spec.variant),
        // Recommends too, as `apt install` does.
        "--aptopt=APT::Install-Recommends \"true\"".into(),
    ];
    if !spec.include.is_empty() {
        args.push(format!("--include={}", spec.include.join(",")));
    }
    for hook in spec.customize {
        args.push(format!("--customize-hook={hook}"));
    }
    // The recipe: what changes it rebuilds the root.
    let recipe = format!(
        "mmdebstrap {args:?} {SUITE}\n{}:\n{}",
        sources.display(),
        std::fs::read_to_string(&sources).unwrap()
    );
    let root = dir.join("root");
    let recipe_file = dir.join("recipe");
    if root.is_dir() && std::fs::read_to_string(&recipe_file).ok().as_deref() == Some(&recipe) {
        return root;
    }
    let _ = std::fs::remove_file(&recipe_file);
    let building = dir.join("root.new");
    for old in [&root, &building] {
        if old.exists() {
            std::fs::remove_dir_all(old)
                .unwrap_or_else(|e| panic!("remove {}: {e}", old.display()));
        }
    }
    let log = dir.join("mmdebstrap.log");
    let started = Instant::now();
    let output = crate::common::run(
        Command::new("mmdebstrap")
            .args(&args)
            .arg(format!("--logfile={}", log.display()))
            .arg(SUITE)
            .arg(&building)
            .arg(&sources)
            .stdin(Stdio::null()),
    );
    assert!(
        output.status.success(),
        "mmdebstrap could not build the Debian 12 root {} ({}); its log, {}:\n{}{}",
        spec.name,
        output.status,
        log.display(),
        tail(&std::fs::read_to_string(&log).unwrap_or_default(), 40),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&building, &root).unwrap();
    std::fs::write(&recipe_file, &recipe).unwrap();
    eprintln!(
        "built the Debian 12 root {} in {:.0?}",
        spec.name,
        started.elapsed()
    );
    root
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// True in the inner run of the fresh-Debian test (after checking that it
/// really is that run, and leaving a receipt with `test`'s name for the
/// outer test); false everywhere else.
pub fn inside_fresh_root(test: &str) -> bool {
    let Ok(nonce) = std::env::var(INSIDE_VAR) else {
        return false;
    };
    let exchange = Path::new(EXCHANGE);
    let expected = std::fs::read_to_string(exchange.join("nonce")).unwrap_or_default();
    assert_eq!(
        nonce.trim(),
        expected.trim(),
        "{INSIDE_VAR} is set, but this is not the fresh Debian root of tests/fresh_debian.rs \
         (no matching {EXCHANGE}/nonce): unset it"
    );
    let mut receipts = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(exchange.join("inside"))
        .unwrap();
    writeln!(receipts, "{test}").unwrap();
    eprintln!("{test}: inside the fresh Debian 12 root; the outer run runs this test");
    true
}

/// An overlay on a cached root, to run scripts in (see the module doc).
pub struct Chroot {
    root: PathBuf,
    /// `upper/`, `work/`, `merged/` and `exchange/`: removed on drop.
    dir: PathBuf,
    binds: Vec<(PathBuf, String)>,
}

impl Chroot {
    /// An overlay on `root` under `target/debian-roots/runs/`.
    pub fn new(root: &Path, tag: &str) -> Chroot {
        let dir = roots_dir()
            .join("runs")
            .join(format!("{tag}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        for sub in ["upper", "work", "merged", "exchange"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        Chroot {
            root: root.to_owned(),
            dir,
            binds: Vec::new(),
        }
    }

    /// The exchange directory: [`EXCHANGE`] inside, writable both ways.
    pub fn exchange(&self) -> PathBuf {
        self.dir.join("exchange")
    }

    /// Binds the host's `source` (a file or directory, which must exist)
    /// at `inside`.
    pub fn bind(mut self, source: &Path, inside: &str) -> Chroot {
        self.binds.push((source.to_owned(), inside.to_owned()));
        self
    }

    /// Runs `script` with `sh -e` as the first process of the namespaces,
    /// chrooted, with only `env` in its environment, its output appended to
    /// `log`. Ends everything it started after `limit` (a hang guard, not a
    /// speed check) and fails the test then.
    pub fn run(
        &self,
        script: &str,
        env: &[(&str, &str)],
        log: &Path,
        limit: Duration,
    ) -> ExitStatus {
        let mut setup = String::from(
            "set -eu
             root=$1 dir=$2
             m=$dir/merged
             mount -t overlay overlay -o lowerdir=$root,upperdir=$dir/upper,workdir=$dir/work $m
             mount -t proc proc $m/proc
             mount --rbind /sys $m/sys
             mount --rbind /dev $m/dev
             mount -t tmpfs -o mode=0755 tmpfs $m/run
             cp /etc/resolv.conf $m/etc/resolv.conf
             mkdir -p $m/mnt/qrexec-connect-test
             mount --bind $dir/exchange $m/mnt/qrexec-connect-test
            ",
        );
        for (index, _) in self.binds.iter().enumerate() {
            // Sources and targets by position: $3, $4, ... pairs.
            let (source, target) = (index * 2 + 3, index * 2 + 4);
            setup.push_str(&format!(
                "if [ -d \"${{{source}}}\" ]; then mkdir -p \"$m${{{target}}}\";
                 else mkdir -p \"$(dirname \"$m${{{target}}}\")\"; touch \"$m${{{target}}}\"; fi
                 mount --bind \"${{{source}}}\" \"$m${{{target}}}\"
                "
            ));
        }
        // The chrooted shell replaces this one as the namespaces' first
        // process, with nothing but `env` in its environment.
        let mut chrooted: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        chrooted.extend(["/bin/sh".to_owned(), "-ec".to_owned(), script.to_owned()]);
        let chrooted: Vec<String> = chrooted.iter().map(|a| shell_quote(a)).collect();
        setup.push_str(&format!(
            "exec chroot \"$m\" /usr/bin/env -i {}\n",
            chrooted.join(" ")
        ));
        // The namespaces end with the test: the kernel kills unshare when
        // the thread that started it ends, and unshare's child with it.
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "unshare", "--mount", "--propagation"])
            .args(["private", "--pid", "--fork", "--kill-child", "sh", "-c"]);
        command
            .arg(setup)
            .arg("namespace-setup")
            .arg(&self.root)
            .arg(&self.dir);
        for (source, target) in &self.binds {
            command.arg(source).arg(target);
        }
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        let mut child = command
            .spawn()
            .expect("setpriv and unshare run (util-linux; tests need root)");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the run in the Debian root did not end within {limit:?}; its log, {}:\n{}",
                    log.display(),
                    tail(&std::fs::read_to_string(log).unwrap_or_default(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        // The overlay was mounted in the run's namespace only, gone with it.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `text` as one word for sh.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
