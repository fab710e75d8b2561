//! Whole Debian 12 systems for the tests that must start from one: the
//! README's commands on a fresh Debian 12 (tests/fresh_debian.rs) and the
//! package in a booted Debian 12 (tests/booted.rs).
//!
//! * [`cached_root`] builds a root with mmdebstrap from the apt sources this
//!   machine uses (Debian's registry), once, under
//!   `target/debian-roots/NAME/`, and again whenever its recipe (package
//!   list, hooks, sources) changes. The cached root is never run: every use
//!   is an overlay on it, so every run starts from the same pristine system.
//! * [`RootRun`] runs a script in such an overlay, made the root of private
//!   mount and PID namespaces (pivot_root): the mounts (proc, sys, dev, a
//!   tmpfs on /run) vanish with the namespace, and when its first process
//!   ends, the kernel ends every other process in it. That process is the
//!   script's shell, so `/proc/1/root` is the root the script sees and
//!   systemd's tools do not take the system for a chroot (they would ignore
//!   `systemctl --user start`). A mere chroot is not enough: a process that
//!   enters a mount namespace made inside (`nsenter -m`) gets that
//!   namespace's root, which would be the host's, and wrote to the host's
//!   /run on a first try. The root gets this machine's resolver and local
//!   certificate authorities, as a machine on this network would have
//!   them, and a /tmp on disk; nothing else of the host but the binds its
//!   caller asks for.
//! * The run inside a fresh root runs `make test` again, which would build a
//!   root of its own, and so on: the outer run sets [`INSIDE_VAR`] to a
//!   nonce it also writes into the exchange directory, and the inner tests
//!   that would build roots call [`inside_fresh_root`] instead, which checks
//!   that nonce (a stray variable on another machine fails, never skips) and
//!   leaves a receipt that the outer test requires.
//!
//! Nothing here touches the host's processes or files outside `target/`,
//! except the user-manager lock file that inner runs share with the host's
//! (tests/common/user_manager.rs: one user manager at a time on the
//! machine) and the cgroups [`Booted`] makes for its containers.

#![allow(dead_code)] // each test binary uses some

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::user_manager::target_dir;

/// Set by the outer fresh-Debian run for the inner `make test`.
pub const INSIDE_VAR: &str = "QREXEC_CONNECT_IN_FRESH_DEBIAN";

/// Where the exchange directory appears inside a [`RootRun`].
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

/// `target/debian-roots`.
fn roots_dir() -> PathBuf {
    target_dir().join("debian-roots")
}

/// The root built from `spec`, built first if missing or built from another
/// recipe. The check and the build run under `flock(1)` on
/// `target/debian-roots/NAME.lock`, so that test binaries (and the threads
/// of one) building the same root wait for each other.
pub fn cached_root(spec: &RootSpec) -> PathBuf {
    let dir = roots_dir().join(spec.name);
    std::fs::create_dir_all(&dir).unwrap();
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
    // The recipe: a change to any of it rebuilds the root.
    let recipe = format!(
        "mmdebstrap {args:?} {SUITE}\n{}:\n{}",
        sources.display(),
        std::fs::read_to_string(&sources).unwrap()
    );
    let wanted = dir.join(format!("recipe.{}", std::process::id()));
    std::fs::write(&wanted, &recipe).unwrap();
    let log = dir.join("mmdebstrap.log");
    let script = format!(
        "dir=$1 wanted=$2; shift 2
         if [ -d \"$dir/root\" ] && cmp -s \"$wanted\" \"$dir/recipe\"; then
             rm -f \"$wanted\"; exit 0
         fi
         rm -rf \"$dir/recipe\" \"$dir/root\" \"$dir/root.new\"
         echo building >&2
         \"$@\" {SUITE} \"$dir/root.new\" {sources} > \"$dir/mmdebstrap.log\" 2>&1 || exit
         mv \"$dir/root.new\" \"$dir/root\" && mv \"$wanted\" \"$dir/recipe\"",
        sources = shell_quote(&sources.display().to_string())
    );
    let started = Instant::now();
    let output = crate::common::run(
        Command::new("flock")
            .arg(roots_dir().join(format!("{}.lock", spec.name)))
            .args(["sh", "-c", &script, "build-root"])
            .arg(&dir)
            .arg(&wanted)
            .arg("mmdebstrap")
            .args(&args)
            .stdin(Stdio::null()),
    );
    let _ = std::fs::remove_file(&wanted);
    assert!(
        output.status.success(),
        "mmdebstrap could not build the Debian 12 root {} ({}); its log, {}:\n{}{}",
        spec.name,
        output.status,
        log.display(),
        tail(&std::fs::read_to_string(&log).unwrap_or_default(), 40),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.stderr.is_empty() {
        eprintln!(
            "built the Debian 12 root {} in {:.0?}",
            spec.name,
            started.elapsed()
        );
    }
    dir.join("root")
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
pub struct RootRun {
    root: PathBuf,
    /// `upper/`, `work/`, `merged/` and `exchange/`: removed on drop.
    dir: PathBuf,
    binds: Vec<(PathBuf, String)>,
}

impl RootRun {
    /// An overlay on `root` under `target/debian-roots/runs/`.
    pub fn new(root: &Path, tag: &str) -> RootRun {
        let dir = roots_dir()
            .join("runs")
            .join(format!("{tag}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        for sub in ["upper", "work", "merged", "exchange", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        RootRun {
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
    pub fn bind(mut self, source: &Path, inside: &str) -> RootRun {
        self.binds.push((source.to_owned(), inside.to_owned()));
        self
    }

    /// Runs `script` with `sh -e` as the first process of the namespaces,
    /// in the overlay as their root, with only `env` in its environment, its output appended to
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
             # /tmp on this machine's disk, as a Debian 12's /tmp is on its
             # root file system: tests make overlays with their upper layer
             # in /tmp, and an overlay's upper layer cannot be on an overlay.
             mount --bind $dir/tmp $m/tmp
             # This machine's network as the root's: its resolver, and the
             # local certificate authorities it trusts (copied as sources too,
             # so that an update-ca-certificates inside keeps them).
             cp /etc/resolv.conf $m/etc/resolv.conf
             if [ -d /usr/local/share/ca-certificates ]; then
                 mkdir -p $m/usr/local/share/ca-certificates
                 cp -r /usr/local/share/ca-certificates/. $m/usr/local/share/ca-certificates/
             fi
             if [ -f /etc/ssl/certs/ca-certificates.crt ] && [ -d $m/etc/ssl/certs ]; then
                 cp /etc/ssl/certs/ca-certificates.crt $m/etc/ssl/certs/ca-certificates.crt
             fi
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
        // The root becomes the mount namespace's own root (pivot_root, not
        // chroot): a process that enters a mount namespace made inside
        // (`nsenter -m`, as tests/common/user_manager.rs does) gets that
        // namespace's root, and after a mere chroot that would be the
        // host's. The host's tree is then unmounted: only the binds above
        // stay visible. The script's shell replaces this one as the
        // namespaces' first process, with nothing but `env` in its
        // environment.
        let mut inner: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        inner.extend(["/bin/sh".to_owned(), "-ec".to_owned(), script.to_owned()]);
        let inner: Vec<String> = inner.iter().map(|a| shell_quote(a)).collect();
        setup.push_str(&format!(
            "cd \"$m\"
             mkdir .host-root
             pivot_root . .host-root
             export PATH=/usr/sbin:/usr/bin:/sbin:/bin
             cd /
             umount -l /.host-root
             rmdir /.host-root
             exec /usr/bin/env -i {}\n",
            inner.join(" ")
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

impl Drop for RootRun {
    fn drop(&mut self) {
        // The overlay was mounted in the run's namespace only, gone with it.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `text` as one word for sh.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The cgroup hierarchies that name a process's cgroup for systemd: on a
/// cgroup v1 machine (this kind: PID 1 is not systemd) `name=systemd` and,
/// if mounted, the cgroup2 tree beside it; on a cgroup v2 machine, the one
/// tree.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_owned()];
    }
    let found: Vec<PathBuf> = ["systemd", "unified"]
        .iter()
        .map(|name| base.join(name))
        .filter(|dir| dir.join("cgroup.procs").exists())
        .collect();
    assert!(
        found.iter().any(|dir| dir.ends_with("systemd")),
        "no name=systemd cgroup hierarchy at /sys/fs/cgroup/systemd and no cgroup2 at \
         /sys/fs/cgroup: systemd-nspawn cannot boot a system here"
    );
    found
}

/// The prefix of the cgroups [`Booted`] makes, directly under each
/// hierarchy's root: `PREFIX-PID-N`, PID the test process's.
const CGROUP_PREFIX: &str = "qrexec-connect-test-booted-";

/// Every process in a cgroup and the cgroups below it.
fn processes_in(cgroup: &Path) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![cgroup.to_owned()];
    while let Some(dir) = queue.pop() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            found.extend(text.lines().filter_map(|l| l.parse::<u32>().ok()));
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push(entry.path());
            }
        }
    }
    found
}

/// Removes a cgroup and those below it, deepest first (a cgroup goes only
/// when it holds no process and no cgroup). Returns whether it is gone.
fn remove_cgroup(cgroup: &Path) -> bool {
    for entry in std::fs::read_dir(cgroup).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(cgroup);
    !cgroup.exists()
}

/// Kills every process of our own cgroup tree (the container's, never
/// another) and removes the tree, waiting a little for the dead to leave it.
fn end_cgroup(cgroups: &[PathBuf]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let doomed: Vec<String> = cgroups
            .iter()
            .flat_map(|cgroup| processes_in(cgroup))
            .map(|pid| pid.to_string())
            .collect();
        if !doomed.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&doomed)
                .stderr(Stdio::null())
                .status();
        }
        let mut gone = true;
        for cgroup in cgroups {
            gone &= remove_cgroup(cgroup);
        }
        if gone || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes what a test process that died left of its containers (its
/// cgroups are named after its pid): only cgroups with our prefix, only of
/// processes that are gone.
fn end_orphaned_cgroups() {
    for hierarchy in cgroup_hierarchies() {
        for entry in std::fs::read_dir(&hierarchy)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(CGROUP_PREFIX) else {
                continue;
            };
            let owner = rest.split('-').next().unwrap_or_default();
            if !Path::new("/proc").join(owner).exists() {
                end_cgroup(&[entry.path()]);
            }
        }
    }
}

/// A Debian root booted with systemd-nspawn: systemd as PID 1, on an
/// overlay (the cached root stays pristine; the overlay's upper layer
/// lives until drop, across [`Booted::reboot`]).
///
/// On this kind of machine (PID 1 is not systemd, cgroup v1 with cgroup2 at
/// /sys/fs/cgroup/unified) `systemd-nspawn --boot --register=no
/// --keep-unit` boots in its own cgroup: nspawn's process is first put into
/// a new cgroup of its own in each hierarchy. Without that the container's
/// systemd would take the host's root cgroup for its own and move every
/// process of the machine into its `init.scope`. nspawn runs in a private
/// mount namespace with a tmpfs on /run, so that its own state (and the
/// overlay mount) stay out of the host's; `--link-journal=no`,
/// `--resolv-conf=off` and `--timezone=off` keep it from touching the
/// host's files. The network is the host's: the container's sockets are
/// reached from the test as 127.0.0.1, and its qrexec-client-vm double
/// reaches the test's servers the same way.
///
/// Commands reach the system through `nsenter` into the namespaces of its
/// PID 1 (the leader); as the user, through `runuser -u user` with
/// XDG_RUNTIME_DIR and DBUS_SESSION_BUS_ADDRESS set. Drop powers it off,
/// kills what is left in its cgroups, removes them and the overlay.
pub struct Booted {
    root: PathBuf,
    dir: PathBuf,
    machine: String,
    cgroups: Vec<PathBuf>,
    nspawn: Option<std::process::Child>,
    /// Cleans up after this test process if it is killed (see
    /// [`Booted::spawn_reaper`]).
    reaper: Option<std::process::Child>,
    leader: u32,
    boots: u32,
}

/// The user of a Qubes qube, and the runtime directory of its manager.
pub const USER: &str = "user";
pub const USER_RUNTIME_DIR: &str = "/run/user/1000";

impl Booted {
    /// An overlay on `root`, not booted yet: files can be put first.
    pub fn new(root: &Path, tag: &str) -> Booted {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = roots_dir()
            .join("runs")
            .join(format!("booted-{tag}-{}-{n}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        for sub in ["upper", "work", "merged"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        Booted {
            root: root.to_owned(),
            dir,
            machine: format!("qc-test-{}-{n}", std::process::id()),
            cgroups: Vec::new(),
            nspawn: None,
            reaper: None,
            leader: 0,
            boots: 0,
        }
    }

    /// The cgroups of this system's boots are named `STEM` + the boot's
    /// number.
    fn cgroup_stem(&self) -> String {
        format!(
            "{CGROUP_PREFIX}{}-{}-",
            std::process::id(),
            self.machine.rsplit('-').next().unwrap()
        )
    }

    /// A process of its own session that outlives this test process on
    /// purpose: when this process ends without its Drop (killed by a
    /// signal, a CI timeout), it does what Drop would. nspawn dies with us
    /// (`--pdeathsig`), but the container's systemd, its user manager and
    /// the bindings on the host's network would live on, reparented.
    /// It kills what is left in this system's cgroups, removes them and the
    /// overlay. Drop ends it first.
    fn spawn_reaper(&mut self) {
        let script = "test=$1 dir=$2 stem=$3
            shift 3
            while kill -0 \"$test\" 2>/dev/null; do sleep 1; done
            for round in 1 2 3 4 5 6 7 8 9 10; do
                pids=
                for h in \"$@\"; do
                    for cg in \"$h/$stem\"*; do
                        [ -d \"$cg\" ] || continue
                        pids=\"$pids $(find \"$cg\" -name cgroup.procs -exec cat {} +)\"
                    done
                done
                pids=$(echo $pids)
                [ -z \"$pids\" ] && break
                kill -KILL $pids 2>/dev/null
                sleep 0.2
            done
            # A cgroup goes once its last process is reaped: try again.
            for round in 1 2 3 4 5 6 7 8 9 10; do
                left=
                for h in \"$@\"; do
                    for cg in \"$h/$stem\"*; do
                        [ -d \"$cg\" ] || continue
                        find \"$cg\" -depth -type d -exec rmdir {} + 2>/dev/null
                        [ -d \"$cg\" ] && left=yes
                    done
                done
                [ -z \"$left\" ] && break
                sleep 0.5
            done
            rm -rf \"$dir\"";
        let reaper = Command::new("setsid")
            .args(["sh", "-c", script, "reaper"])
            .arg(std::process::id().to_string())
            .arg(&self.dir)
            .arg(self.cgroup_stem())
            .args(cgroup_hierarchies())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("setsid runs (util-linux)");
        self.reaper = Some(reaper);
    }

    /// Puts a file into the system before it boots (root-owned).
    pub fn put(&self, path: &str, contents: &[u8], mode: u32) {
        let target = self.dir.join("upper").join(path.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, contents).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// The boot log (the container's console) so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// Boots the system and waits until it and the user's manager run.
    /// Fails, saying why, if systemd-nspawn cannot boot it here.
    pub fn boot(&mut self) {
        assert!(self.nspawn.is_none(), "already booted");
        end_orphaned_cgroups();
        if self.reaper.is_none() {
            self.spawn_reaper();
        }
        self.boots += 1;
        let name = format!("{}{}", self.cgroup_stem(), self.boots);
        self.cgroups = cgroup_hierarchies()
            .into_iter()
            .map(|hierarchy| hierarchy.join(&name))
            .collect();
        for cgroup in &self.cgroups {
            std::fs::create_dir(cgroup)
                .unwrap_or_else(|e| panic!("cannot create the cgroup {}: {e}", cgroup.display()));
        }
        let script = "set -eu
            dir=$1 root=$2 machine=$3
            shift 3
            # Into the new cgroups first (their cgroup.procs files follow).
            for procs in \"$@\"; do echo $$ > \"$procs\"; done
            mount -t tmpfs -o mode=0755 tmpfs /run
            mount -t overlay overlay -o lowerdir=$root,upperdir=$dir/upper,workdir=$dir/work $dir/merged
            exec systemd-nspawn --quiet --boot --register=no --keep-unit --link-journal=no \\
                --resolv-conf=off --timezone=off --console=passive \\
                --machine=$machine --directory=$dir/merged";
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("console.log"))
            .unwrap();
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "unshare", "--mount", "--propagation"])
            .args(["private", "sh", "-c", script, "boot"])
            .arg(&self.dir)
            .arg(&self.root)
            .arg(&self.machine)
            .args(self.cgroups.iter().map(|c| c.join("cgroup.procs")))
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console);
        self.nspawn = Some(
            command
                .spawn()
                .expect("setpriv and unshare run (util-linux)"),
        );
        // The leader: the process of our cgroups that is PID 1 of its own
        // PID namespace (NSpid ends in 1).
        let deadline = Instant::now() + Duration::from_secs(60);
        self.leader = loop {
            if let Some(status) = self.nspawn.as_mut().unwrap().try_wait().unwrap() {
                self.nspawn = None;
                panic!(
                    "systemd-nspawn could not boot Debian 12 here: it ended ({status}) before \
                     the system's PID 1 started; its output:\n{}",
                    tail(&self.console(), 40)
                );
            }
            let leader = processes_in(&self.cgroups[0]).into_iter().find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
                    status
                        .lines()
                        .find_map(|line| line.strip_prefix("NSpid:"))
                        .is_some_and(|ids| {
                            let ids: Vec<&str> = ids.split_whitespace().collect();
                            ids.len() > 1 && ids.last() == Some(&"1")
                        })
                })
            });
            if let Some(leader) = leader {
                break leader;
            }
            assert!(
                Instant::now() < deadline,
                "systemd-nspawn did not start the system's PID 1 within a minute; its output:\n{}",
                tail(&self.console(), 40)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let state = self.wait_state("the system", &["is-system-running"], None);
        if state == "degraded" {
            eprintln!(
                "{}: booted degraded:\n{}",
                self.machine,
                self.stdout(self.command("systemctl").args(["--failed", "--no-pager"]))
            );
        }
    }

    /// Waits (a minute at most) until `systemctl ARGS` (as `user` when
    /// given) says running or degraded; returns which.
    fn wait_state(&self, what: &str, args: &[&str], user: Option<&str>) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut command = match user {
                Some(_) => self.user_command("systemctl"),
                None => self.command("systemctl"),
            };
            if user.is_some() {
                command.arg("--user");
            }
            let output = crate::common::run(command.args(args));
            let state = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            if state == "running" || state == "degraded" {
                return state;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what} in the booted Debian 12 is not running after a minute \
                     (systemctl {args:?}: {state:?}); failed units:\n{}\nconsole:\n{}",
                    self.stdout(self.command("systemctl").args(["--failed", "--no-pager"])),
                    tail(&self.console(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid (on the host) of the system's PID 1.
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// The directory of this system's overlay (and console log) on the host.
    pub fn run_dir(&self) -> &Path {
        &self.dir
    }

    /// A path of the running system, reachable from the host.
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.leader))
    }

    /// A command run as root inside the system (all its namespaces, its
    /// root), with a plain environment.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["--target", &self.leader.to_string()])
            .args(["--all", "--root", "--wd", "--", "env", "-i"])
            .args(["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"])
            .arg(program);
        command
    }

    /// A command run as `user` inside the system, with the environment of
    /// the user's session (its manager's runtime directory and bus).
    pub fn user_command(&self, program: &str) -> Command {
        let mut command = self.command("runuser");
        command
            .args(["-u", USER, "--", "env"])
            .arg(format!("XDG_RUNTIME_DIR={USER_RUNTIME_DIR}"))
            .arg(format!(
                "DBUS_SESSION_BUS_ADDRESS=unix:path={USER_RUNTIME_DIR}/bus"
            ))
            .arg(program);
        command
    }

    /// Runs `command`; it must succeed. Returns its standard output.
    pub fn stdout(&self, command: &mut Command) -> String {
        let output = crate::common::run(command);
        assert!(
            output.status.success(),
            "{command:?} failed in the booted system ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits until the user's manager runs (lingering starts it at boot).
    pub fn wait_user_manager(&self) {
        self.wait_state("user@1000's manager", &["is-system-running"], Some(USER));
    }

    /// Powers the system off (as `systemctl poweroff` would, through
    /// nspawn's SIGTERM) and waits for nspawn to end, then removes its
    /// cgroups. The overlay stays for the next [`Booted::boot`].
    pub fn shutdown(&mut self) {
        let Some(mut nspawn) = self.nspawn.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &nspawn.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while nspawn.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nspawn.kill();
        let _ = nspawn.wait();
        end_cgroup(&self.cgroups);
        self.leader = 0;
    }

    /// Powers off and boots again on the same overlay.
    pub fn reboot(&mut self) {
        self.shutdown();
        self.boot();
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if let Some(mut reaper) = self.reaper.take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
        self.shutdown();
        end_cgroup(&self.cgroups);
        // The overlay was mounted in nspawn's namespace only, gone with it.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
