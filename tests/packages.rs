//! Installing qrexec-connect as a Qubes user does: the Debian and RPM
//! packages built from the offline source tarball (`make deb`, `make rpm`),
//! lint-clean and holding the same files; the .deb installed with a real
//! dpkg and `make install-client` run by hand, each into a user session
//! that was already running, where `systemctl --user daemon-reload` alone
//! must bring the bindings up; an upgrade that restarts the daemon there
//! without cutting a live connection; and removal that leaves nothing
//! behind.
//!
//! Everything happens in private mount namespaces whose /usr, /etc and /var
//! are overlays: the host is never touched.

mod common;
#[path = "common/other_user.rs"]
mod other_user;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::user_manager::{target_dir, Product, UserManager};
use common::*;

const SETTLE: Duration = Duration::from_secs(20);
const CONFIG: &str = ".config/qrexec-connect/test.conf";
/// The workspace root (this package is its tests/ directory).
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn version() -> String {
    std::fs::read_to_string(Path::new(REPO).join("version"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The packages, built once per test run.
struct Packages {
    debs: Vec<PathBuf>,
    rpms: Vec<PathBuf>,
}

fn packages() -> &'static Packages {
    static PACKAGES: OnceLock<Packages> = OnceLock::new();
    PACKAGES.get_or_init(|| {
        for target in ["deb", "rpm"] {
            let output = run(Command::new("make").args(["-s", "-C", REPO, target]));
            assert!(
                output.status.success(),
                "make {target} failed:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let dist = Path::new(REPO).join("target/dist");
        let list = |dir: PathBuf, ext: &str| -> Vec<PathBuf> {
            let mut found: Vec<PathBuf> = walk(&dir)
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == ext))
                .collect();
            found.sort();
            found
        };
        let packages = Packages {
            debs: list(dist.join("deb"), "deb"),
            rpms: list(dist.join("rpm/RPMS"), "rpm"),
        };
        assert_eq!(packages.debs.len(), 2, "{:?}", packages.debs);
        assert_eq!(packages.rpms.len(), 2, "{:?}", packages.rpms);
        packages
    })
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

fn deb(name: &str) -> &'static Path {
    packages()
        .debs
        .iter()
        .find(|p| {
            let file = p.file_name().unwrap().to_string_lossy();
            file.starts_with(&format!("{name}_"))
        })
        .unwrap_or_else(|| panic!("no {name} .deb"))
}

fn stdout(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn one_version_everywhere() {
    let version = version();
    let manifest = std::fs::read_to_string(Path::new(REPO).join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(&format!("\nversion = \"{version}\"\n")),
        "Cargo.toml's version is not {version}"
    );
    for program in [DAEMON, GENERATOR] {
        let out = stdout(Command::new(program).arg("--version"));
        assert!(
            out.trim().ends_with(&format!(" {version}")),
            "{}: {out}",
            program.name
        );
    }
    let changelog = std::fs::read_to_string(Path::new(REPO).join("debian/changelog")).unwrap();
    assert!(
        changelog.starts_with(&format!("qrexec-connect ({version})")),
        "debian/changelog does not start with {version}"
    );
    let spec =
        std::fs::read_to_string(Path::new(REPO).join("rpm_spec/qrexec-connect.spec.in")).unwrap();
    assert!(spec.contains("Version:        @VERSION@"));
    assert!(
        spec.contains(&format!("> - {version}-1\n")),
        "the spec's changelog"
    );
    let output = run(Command::new("make").args(["-s", "-C", REPO, "man"]));
    assert!(output.status.success());
    for page in [
        "qrexec-connect.8",
        "qrexec-connect-generator.8",
        "qrexec-connect.conf.5",
        "qubes.ConnectNFS.8",
    ] {
        let text = stdout(
            Command::new("man")
                .args(["-l", "-P", "cat"])
                .arg(Path::new(REPO).join("man").join(page))
                .env("MANWIDTH", "80"),
        );
        assert!(
            text.contains(&format!("qrexec-connect {version}")),
            "{page} does not show the version"
        );
    }
    for deb in &packages().debs {
        let field = stdout(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Version"));
        assert_eq!(field.trim(), version, "{}", deb.display());
    }
    for rpm in &packages().rpms {
        let field = stdout(
            Command::new("rpm")
                .args(["-qp", "--queryformat", "%{VERSION}"])
                .arg(rpm),
        );
        assert_eq!(field.trim(), version, "{}", rpm.display());
    }
}

#[test]
fn lintian_and_rpmlint_find_nothing() {
    let packages = packages();
    let lintian = run(Command::new("lintian")
        .args([
            "--fail-on",
            "error,warning",
            "--suppress-tags",
            "bad-distribution-in-changes-file",
        ])
        .args(&packages.debs));
    let report = String::from_utf8_lossy(&lintian.stdout).into_owned()
        + &String::from_utf8_lossy(&lintian.stderr);
    let findings: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(
        lintian.status.success() && findings.is_empty(),
        "lintian:\n{report}"
    );
    let rpmlint = run(Command::new("rpmlint")
        .arg("-r")
        .arg(Path::new(REPO).join("rpm_spec/qrexec-connect.rpmlintrc"))
        .args(&packages.rpms));
    let report = String::from_utf8_lossy(&rpmlint.stdout).into_owned()
        + &String::from_utf8_lossy(&rpmlint.stderr);
    assert!(
        report.contains(" 0 errors"),
        "rpmlint reports errors:\n{report}"
    );
}

/// The installed paths of a package, man pages without their compression
/// suffix, zsh completions in one directory (Fedora's zsh reads
/// site-functions, Debian's vendor-completions), without the distribution's own documentation directories
/// (/usr/share/doc on Debian, /usr/share/licenses on Fedora), RPM's
/// build-id links (RPM metadata, not our files) and the RPM preset (Debian
/// enables the same unit through deb-systemd-helper).
fn file_list(listing: &str) -> BTreeSet<String> {
    listing
        .lines()
        .map(|line| line.trim().trim_start_matches('.').to_owned())
        .map(|path| path.trim_end_matches(".gz").to_owned())
        // Where each distribution's zsh looks for completions.
        .map(|path| path.replace("/zsh/site-functions/", "/zsh/vendor-completions/"))
        .filter(|path| {
            !path.is_empty()
                && path != "/"
                && !path.starts_with("/usr/share/doc")
                && !path.starts_with("/usr/share/licenses")
                && !path.starts_with("/usr/lib/.build-id")
                && !path.contains("/user-preset")
        })
        .collect()
}

#[test]
fn the_rpms_hold_the_same_files_as_the_debs() {
    let packages = packages();
    let mut from_debs = BTreeSet::new();
    for deb in &packages.debs {
        // Files and symlinks; directories are implied by them.
        let tar = stdout(Command::new("sh").arg("-c").arg(format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -tvf - | grep -v '^d' | awk '{{print $6}}'",
            deb.display()
        )));
        from_debs.extend(file_list(&tar));
    }
    let mut from_rpms = BTreeSet::new();
    for rpm in &packages.rpms {
        let listing = stdout(
            Command::new("rpm")
                .args([
                    "-qp",
                    "--queryformat",
                    "[%{FILEMODES:perms} %{FILENAMES}\\n]",
                ])
                .arg(rpm),
        );
        let files: String = listing
            .lines()
            .filter(|l| !l.starts_with('d'))
            .filter_map(|l| l.split_once(' ').map(|(_, path)| format!("{path}\n")))
            .collect();
        from_rpms.extend(file_list(&files));
    }
    assert!(
        from_debs.contains("/usr/bin/qrexec-connect"),
        "{from_debs:#?}"
    );
    assert_eq!(
        from_debs,
        from_rpms,
        "only in .deb: {:#?}\nonly in .rpm: {:#?}",
        from_debs.difference(&from_rpms).collect::<Vec<_>>(),
        from_rpms.difference(&from_debs).collect::<Vec<_>>()
    );
}

fn exchange(port: u16, data: &[u8]) -> Option<Vec<u8>> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    round_trip(Box::new(stream), data.to_vec(), Duration::from_secs(5)).ok()
}

fn wait_forwarding(manager: &UserManager, port: u16, what: &str) {
    let deadline = std::time::Instant::now() + SETTLE;
    while exchange(port, b"ping").as_deref() != Some(b"ping") {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: 127.0.0.1:{port} does not forward\n{}\n{}",
            manager.systemctl_ok(&["list-units", "--all", "--no-pager", "qrexec-connect*"]),
            manager.messages()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_refused(port: u16, what: &str) {
    common::wait_refused(what, port, SETTLE);
}

/// The session's first steps after an install: one config line, one
/// daemon-reload, and it forwards; a second line, another reload.
fn a_user_configures_two_bindings(manager: &UserManager) -> (u16, u16) {
    let echo = Box::leak(Box::new(EchoServer::start()));
    let (first, second) = (free_port(), free_port());
    let line = |port: u16| format!("127.0.0.1:{port} @default qubes.ConnectTCP+{}\n", echo.port);
    let config = manager.home.path().join(CONFIG);
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, line(first)).unwrap();
    manager.daemon_reload();
    wait_forwarding(manager, first, "after install and one daemon-reload");
    std::fs::write(&config, line(first) + &line(second)).unwrap();
    manager.daemon_reload();
    wait_forwarding(manager, second, "a line added later");
    (first, second)
}

/// What exists of `paths` inside the namespace.
fn still_there(manager: &UserManager, paths: &[String]) -> Vec<String> {
    paths
        .iter()
        .filter(|p| std::fs::symlink_metadata(manager.ns_path(p)).is_ok())
        .cloned()
        .collect()
}

#[test]
fn the_deb_installs_into_a_running_session_serves_and_purges_clean() {
    let client = deb("qrexec-connect");
    let nfs = deb("qrexec-connect-nfs");
    let manager = UserManager::start_full(Product::NotYet, &[], &[]);
    // Into the namespace's overlays, by path through /proc (dpkg -i runs in
    // the namespace; the files it reads are on the host).
    let install = run(manager
        .command("dpkg")
        .args(["-i", "--force-depends"])
        .arg(client)
        .arg(nfs));
    assert!(
        install.status.success(),
        "dpkg -i failed:\n{}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    // Quiet: nothing from our maintainer scripts (deb-systemd-helper's
    // "Created symlink" line is every Debian package's).
    let noise: Vec<String> = String::from_utf8_lossy(&install.stderr)
        .lines()
        .filter(|line| !line.starts_with("Created symlink /etc/systemd/user/"))
        .map(str::to_owned)
        .collect();
    assert!(noise.is_empty(), "the install printed: {noise:#?}");

    let (first, second) = a_user_configures_two_bindings(&manager);

    let files: Vec<String> = ["qrexec-connect", "qrexec-connect-nfs"]
        .iter()
        .flat_map(|package| {
            stdout(manager.command("dpkg").args(["-L", package]))
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|path| !std::path::Path::new(path).is_dir() || path.contains("qrexec"))
        .collect();
    assert!(
        files.iter().any(|f| f == "/usr/bin/qrexec-connect"),
        "{files:#?}"
    );
    let enabled = "/etc/systemd/user/paths.target.wants/qrexec-connect-reconcile.path".to_owned();
    // (Not followed: its absolute target would be read on the host.)
    assert!(
        std::fs::symlink_metadata(manager.ns_path(&enabled)).is_ok(),
        "{enabled} is not there after install"
    );

    let purge =
        run(manager
            .command("dpkg")
            .args(["--purge", "qrexec-connect", "qrexec-connect-nfs"]));
    assert!(
        purge.status.success(),
        "dpkg --purge failed: {}",
        String::from_utf8_lossy(&purge.stderr)
    );
    wait_refused(first, "after purge");
    wait_refused(second, "after purge");
    let mut leftovers = still_there(&manager, &files);
    leftovers.extend(still_there(&manager, &[enabled]));
    // Directories the system owns (/usr/bin, ...) stay, of course.
    leftovers.retain(|p| p.contains("qrexec") || p.contains("ConnectNFS"));
    assert!(leftovers.is_empty(), "left after purge: {leftovers:#?}");
}

/// `dpkg -i` into the namespace; must succeed.
fn dpkg_install(manager: &UserManager, debs: &[&Path]) {
    let install = run(manager
        .command("dpkg")
        .args(["-i", "--force-depends"])
        .args(debs));
    assert!(
        install.status.success(),
        "dpkg -i failed:\n{}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
}

/// The same package with a higher version (`VERSION+upgrade1`), repacked
/// from `deb` into `dir`: what an upgrade installs, new files and the new
/// maintainer scripts, without a second build.
fn newer_deb(deb: &Path, dir: &Path) -> PathBuf {
    let tree = dir.join("newer");
    stdout(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let version = version();
    let newer = text.replace(
        &format!("\nVersion: {version}\n"),
        &format!("\nVersion: {version}+upgrade1\n"),
    );
    assert_ne!(newer, text, "no Version: {version} in {text}");
    std::fs::write(&control, newer).unwrap();
    let built = dir.join("newer.deb");
    stdout(
        Command::new("dpkg-deb")
            .args(["-Zgzip", "-b"])
            .arg(&tree)
            .arg(&built),
    );
    built
}

/// Issue 17 §6: an upgrade leaves no old daemon serving in a session that
/// runs. The new package's postinst restarts it (try-restart: only where it
/// runs), so the new binary answers the next connection, and a connection
/// held across the upgrade goes on (KillMode=process).
#[test]
fn an_upgrade_restarts_the_daemon_in_a_running_session_and_keeps_live_connections() {
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    let client = deb("qrexec-connect");
    let manager = UserManager::start_full(Product::NotYet, &[], &[]);
    dpkg_install(&manager, &[client]);
    let echo = EchoServer::start();
    let port = free_port();
    let config = manager.home.path().join(CONFIG);
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        format!("127.0.0.1:{port} @default qubes.ConnectTCP+{}\n", echo.port),
    )
    .unwrap();
    manager.daemon_reload();
    wait_forwarding(&manager, port, "after install");

    let mut held = TcpStream::connect(("127.0.0.1", port)).unwrap();
    held.set_read_timeout(Some(SETTLE)).unwrap();
    let echoed = |stream: &mut TcpStream, data: &[u8]| {
        stream.write_all(data).unwrap();
        let mut back = vec![0; data.len()];
        stream.read_exact(&mut back).unwrap();
        back
    };
    assert_eq!(echoed(&mut held, b"before"), b"before");
    let old = manager
        .main_pid("qrexec-connect.service")
        .expect("the daemon runs after a connection");

    let newer = newer_deb(client, manager.scratch.path());
    dpkg_install(&manager, &[&newer]);
    let new = wait_for("the upgrade to restart the daemon", SETTLE, || {
        manager
            .main_pid("qrexec-connect.service")
            .filter(|&pid| pid != old)
    });
    // The daemon that runs now is the installed file, not the one the
    // upgrade replaced.
    let running = std::fs::metadata(format!("/proc/{new}/exe")).unwrap();
    let installed = std::fs::metadata(manager.ns_path("/usr/bin/qrexec-connect")).unwrap();
    assert_eq!(
        (running.dev(), running.ino()),
        (installed.dev(), installed.ino()),
        "the daemon does not run the installed binary"
    );
    assert_eq!(echoed(&mut held, b"after"), b"after", "the held connection");
    wait_forwarding(&manager, port, "after the upgrade");
}

/// An upgrade while a recovery waits for an address another user holds
/// (it may wait for minutes): the new package's postinst restarts the
/// recovery too (try-restart), so it runs the installed binary, not the
/// one the upgrade replaced. (Found by the audit of issue 17.)
#[test]
fn an_upgrade_restarts_a_waiting_recovery() {
    use std::os::unix::fs::MetadataExt;

    let client = deb("qrexec-connect");
    let manager = UserManager::start_full(Product::NotYet, &[], &[]);
    dpkg_install(&manager, &[client]);
    let echo = EchoServer::start();
    let taken = free_port();
    let _squatter = other_user::OtherUser::listen(&format!("127.0.0.1:{taken}"));
    let config = manager.home.path().join(CONFIG);
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        format!(
            "127.0.0.1:{taken} @default qubes.ConnectTCP+{}\n",
            echo.port
        ),
    )
    .unwrap();
    manager.daemon_reload();
    let recover = "qrexec-connect-recover.service";
    let old = wait_for("the recovery to wait for the taken port", SETTLE, || {
        manager.main_pid(recover)
    });
    let newer = newer_deb(client, manager.scratch.path());
    dpkg_install(&manager, &[&newer]);
    let runs_installed = |pid: u32| {
        let installed = std::fs::metadata(manager.ns_path("/usr/bin/qrexec-connect")).unwrap();
        std::fs::metadata(format!("/proc/{pid}/exe")).is_ok_and(|running| {
            (running.dev(), running.ino()) == (installed.dev(), installed.ino())
        })
    };
    wait_for("the recovery to run the installed binary", SETTLE, || {
        manager
            .main_pid(recover)
            .filter(|&pid| pid != old && runs_installed(pid))
    });
}

/// Issue 17 §6: the RPM needs what user-sessions runs as root (setpriv is
/// not in Fedora's minimal templates).
#[test]
fn the_rpm_requires_setpriv_setsid_and_find() {
    let client = packages()
        .rpms
        .iter()
        .find(|p| {
            let file = p.file_name().unwrap().to_string_lossy();
            file.starts_with("qrexec-connect-") && !file.starts_with("qrexec-connect-nfs")
        })
        .expect("no qrexec-connect .rpm");
    let requires = stdout(Command::new("rpm").args(["-qp", "--requires"]).arg(client));
    for path in ["/usr/bin/setpriv", "/usr/bin/setsid", "/usr/bin/find"] {
        assert!(
            requires.lines().any(|line| line.trim() == path),
            "{} does not require {path}:\n{requires}",
            client.display()
        );
    }
}

#[test]
fn make_install_reaches_a_running_session_and_uninstall_removes_it() {
    let manager = UserManager::start_full(Product::NotYet, &[], &[]);
    let make = |target: &str| {
        let output = run(manager
            .command("make")
            .args([
                "-s",
                "-C",
                REPO,
                target,
                "PREFIX=/usr/local",
                "PROFILE=debug",
            ])
            .arg(format!("TARGET_DIR={}", target_dir().display())));
        assert!(
            output.status.success(),
            "make {target} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    };
    let said = make("install-client");
    assert!(said.trim().is_empty(), "install-client printed: {said}");
    let (first, second) = a_user_configures_two_bindings(&manager);
    make("uninstall");
    wait_refused(first, "after uninstall");
    wait_refused(second, "after uninstall");
    let left = stdout(
        manager
            .command("sh")
            .arg("-c")
            .arg("find /usr/local -name '*qrexec-connect*' -o -name 'qubes.ConnectNFS*' | sort"),
    );
    assert!(left.trim().is_empty(), "left after uninstall:\n{left}");
}

/// Issue 10's first-time-run findings: an install never builds (as root)
/// and never installs what was not built, and a man page whose rendering
/// failed is not left behind empty for the next make to ship.
#[test]
fn make_refuses_to_install_unbuilt_binaries_and_never_keeps_a_failed_man_page() {
    let scratch = TempDir::new("make-checks");
    let empty_target = scratch.path().join("target");
    let output = run(Command::new("make")
        .args(["-s", "-C", REPO, "install-client", "PROFILE=debug"])
        .arg(format!("DESTDIR={}", scratch.path().join("root").display()))
        .arg(format!("TARGET_DIR={}", empty_target.display())));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "installed without binaries");
    assert!(said.contains("run 'make build' first"), "{said}");
    assert!(!empty_target.exists(), "make built something: {said}");
    assert!(!scratch.path().join("root/usr/bin").exists());

    // A copy of the man sources, so the repository's pages are untouched.
    let man = scratch.path().join("man");
    std::fs::create_dir_all(&man).unwrap();
    std::fs::copy(
        Path::new(REPO).join("man/qrexec-connect.8.scd"),
        man.join("qrexec-connect.8.scd"),
    )
    .unwrap();
    std::fs::copy(
        Path::new(REPO).join("version"),
        scratch.path().join("version"),
    )
    .unwrap();
    let output = run(Command::new("make")
        .args(["-s", "-C"])
        .arg(scratch.path())
        .args([
            "-f",
            &format!("{REPO}/Makefile"),
            "man/qrexec-connect.8",
            "SCDOC=false",
        ]));
    assert!(!output.status.success());
    assert!(
        !man.join("qrexec-connect.8").exists(),
        "a failed rendering left man/qrexec-connect.8 behind"
    );
}
