//! Fixture tests for `qrexec-connect-generator`, one folder per case under
//! `tests/generator/NN-name/`; adding a case means adding a folder.
//!
//! A case holds its input and the exact expected result:
//!
//! * `home/`: the user's home, mounted read-only at `/run/fixture/home`
//!   (so paths in units and messages do not depend on the checkout);
//! * `etc/qrexec-connect/`: mounted read-only at `/etc/qrexec-connect`
//!   (when absent, `/etc/qrexec-connect` does not exist for the run);
//! * `env` (optional): `NAME=VALUE` lines to add to the environment, `-NAME`
//!   lines to remove a default (`HOME`, `XDG_RUNTIME_DIR`, `PATH`);
//! * `args` (optional): the arguments, split at whitespace; by default the
//!   three output dirs `/run/fixture/out/{normal,early,late}`;
//! * `uid` (optional): run the generator as this uid (and gid), without
//!   root's capabilities, as a user's manager runs it (`setpriv`);
//! * `expected/units/`: the tree the generator must leave in the normal dir
//!   (files byte for byte, symlink targets); absent means empty; the early
//!   and late dirs must always stay empty;
//! * `expected/runtime/`: the tree it must leave in `$XDG_RUNTIME_DIR`
//!   (`/run/user/0`), i.e. the reload flag; absent means empty;
//! * `expected/stdout`, `expected/stderr` (absent means empty) and
//!   `expected/status` (absent means 0).
//!
//! Every case also finds `/run/fixture/tmp` (mode 1777, like `/tmp`) and
//! `/run/fixture/shared` (mode 0777, not sticky), for socket paths that
//! other users could take.
//!
//! Each run happens in a private mount namespace (`unshare -m`; as a user
//! other than root, inside a user namespace with `unshare -U -r`, and the
//! test fails if neither is possible): a tmpfs over `/run` holds the fixed paths, and `/etc` gets a
//! read-only overlay whose only change is `qrexec-connect/`. Nothing outside
//! the namespace is touched except a scratch dir under the system temp dir.
//!
//! Afterwards every unit produced by any case is checked with
//! `systemd-analyze --user verify`, which must print nothing at all.
//!
//! `QREXEC_CONNECT_BLESS=1 cargo test --test generator` rewrites the
//! `expected/` trees from the actual results (review the diff!).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use walkdir::WalkDir;

#[path = "common/program.rs"]
#[allow(dead_code)]
mod program;

use program::{workspace, GENERATOR};

/// Mounts, then runs "$@" with the environment the runner chose.
const RUN_IN_NAMESPACE: &str = r#"
set -e
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/fixture/home /run/fixture/out /run/fixture/etc /run/user/0
chmod 700 /run/user/0
mkdir -m 1777 /run/fixture/tmp       # like /tmp: others create names, sticky
mkdir -m 0777 /run/fixture/shared    # others may replace anything in it
mount --bind "$FIXTURE_OUT" /run/fixture/out
mount --bind "$FIXTURE_RUNTIME" /run/user/0
if [ -d "$FIXTURE/home" ]; then
    mount --bind "$FIXTURE/home" /run/fixture/home
    mount -o remount,bind,ro /run/fixture/home
fi
if [ -d "$FIXTURE/etc/qrexec-connect" ]; then
    mkdir /run/fixture/etc/qrexec-connect
else
    mknod /run/fixture/etc/qrexec-connect c 0 0   # an overlayfs whiteout
fi
mount -t overlay overlay -o lowerdir=/run/fixture/etc:/etc /etc
if [ -d "$FIXTURE/etc/qrexec-connect" ]; then
    mount --bind "$FIXTURE/etc/qrexec-connect" /etc/qrexec-connect
    mount -o remount,bind,ro /etc/qrexec-connect
fi
unset FIXTURE FIXTURE_OUT FIXTURE_RUNTIME
if [ -n "$FIXTURE_UID" ]; then
    uid=$FIXTURE_UID; unset FIXTURE_UID
    exec setpriv --reuid="$uid" --regid="$uid" --clear-groups "$@"
fi
unset FIXTURE_UID
exec "$@"
"#;

/// Loads units the way a user manager would (with the fixtures' `%t` and
/// `%h`, so a path at the length limit is checked as it was generated), with a stand-in for the
/// shipped `qrexec-connect-.socket.d/` drop-in (it supplies `Service=`), the
/// service, and the man page named by `Documentation=` (verify runs `man`
/// unless given `--man=no`).
const VERIFY_IN_NAMESPACE: &str = r#"
set -e
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/systemd/system /run/user/0 /run/fixture/home /run/man/man5 \
    /run/systemd/user/qrexec-connect-.socket.d
chmod 700 /run/user/0
printf '[Socket]\nService=qrexec-connect.service\n' \
    > /run/systemd/user/qrexec-connect-.socket.d/service.conf
printf '[Unit]\nDescription=test stand-in\n[Service]\nExecStart=/bin/true\n' \
    > /run/systemd/user/qrexec-connect.service
printf '.TH QREXEC-CONNECT.CONF 5\n.SH NAME\nqrexec-connect.conf \\- test stand-in\n' \
    > /run/man/man5/qrexec-connect.conf.5
export XDG_RUNTIME_DIR=/run/user/0 HOME=/run/fixture/home MANPATH=/run/man
systemd-analyze --user verify "$@" 2>&1
"#;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File(Vec<u8>),
    Link(PathBuf),
}

/// Everything under `root`, by relative path; an absent root is empty.
fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut nodes = BTreeMap::new();
    if !root.exists() {
        return nodes;
    }
    for entry in WalkDir::new(root).min_depth(1) {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(root).unwrap().to_owned();
        let node = if entry.path_is_symlink() {
            Node::Link(fs::read_link(entry.path()).unwrap())
        } else if entry.file_type().is_dir() {
            Node::Dir
        } else {
            Node::File(fs::read(entry.path()).unwrap())
        };
        nodes.insert(rel, node);
    }
    nodes
}

fn show(node: Option<&Node>) -> String {
    match node {
        None => "(absent)".into(),
        Some(Node::Dir) => "(directory)".into(),
        Some(Node::Link(target)) => format!("(symlink to {})", target.display()),
        Some(Node::File(bytes)) => format!("\n{}", String::from_utf8_lossy(bytes)),
    }
}

fn diff_trees(what: &str, expected: &Path, actual: &Path, failures: &mut Vec<String>) {
    let (want, got) = (tree(expected), tree(actual));
    for path in want
        .keys()
        .chain(got.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (w, g) = (want.get(path), got.get(path));
        if w != g {
            failures.push(format!(
                "{what}/{}:\n  expected {}\n  actual {}",
                path.display(),
                show(w),
                show(g)
            ));
        }
    }
}

fn diff_text(what: &str, expected: &[u8], actual: &[u8], failures: &mut Vec<String>) {
    if expected != actual {
        failures.push(format!(
            "{what}:\n--- expected\n{}--- actual\n{}---",
            String::from_utf8_lossy(expected),
            String::from_utf8_lossy(actual)
        ));
    }
}

fn read_or_empty(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_default()
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("qrexec-connect-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `unshare` with a private mount namespace; as another user, inside a
/// new user namespace where that user is root (as zram-generator's tests
/// do), which is all the mounts need.
fn unshare() -> Command {
    let mut command = Command::new("unshare");
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        command.args(["--user", "--map-root-user"]);
    }
    command.args(["--mount", "--propagation", "private"]);
    command
}

/// Output of a namespace run, or a failure that says what is missing.
fn in_namespace(command: &mut Command) -> Output {
    let output = command.output().expect("run unshare");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.starts_with("unshare:"),
        "the generator fixtures need root, or unprivileged user namespaces \
         (unshare --user --map-root-user): {stderr}"
    );
    output
}

/// Runs one case; returns its failures and the units it produced.
fn run_case(case: &Path, scratch: &Path) -> (Vec<String>, BTreeSet<(String, Vec<u8>)>) {
    let out = scratch.join("out");
    let runtime = scratch.join("runtime");
    for dir in ["normal", "early", "late"] {
        fs::create_dir_all(out.join(dir)).unwrap();
    }
    fs::create_dir_all(&runtime).unwrap();

    let mut env: BTreeMap<String, String> = [
        ("HOME", "/run/fixture/home"),
        ("XDG_RUNTIME_DIR", "/run/user/0"),
        ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for line in fs::read_to_string(case.join("env"))
        .unwrap_or_default()
        .lines()
    {
        if let Some(name) = line.strip_prefix('-') {
            env.remove(name);
        } else if let Some((name, value)) = line.split_once('=') {
            env.insert(name.to_owned(), value.to_owned());
        }
    }
    let args: Vec<String> = match fs::read_to_string(case.join("args")) {
        Ok(text) => text.split_whitespace().map(str::to_owned).collect(),
        Err(_) => ["normal", "early", "late"]
            .iter()
            .map(|d| format!("/run/fixture/out/{d}"))
            .collect(),
    };

    let Output {
        status,
        stdout,
        stderr,
    } = in_namespace(
        unshare()
            .args(["sh", "-c", RUN_IN_NAMESPACE, "sh"])
            .arg(GENERATOR)
            .args(&args)
            .env_clear()
            .envs(&env)
            .env("FIXTURE", case)
            .env("FIXTURE_OUT", &out)
            .env("FIXTURE_RUNTIME", &runtime)
            .env(
                "FIXTURE_UID",
                fs::read_to_string(case.join("uid"))
                    .unwrap_or_default()
                    .trim(),
            ),
    );
    let status = status.code().map_or("killed".to_owned(), |c| c.to_string());

    let expected = case.join("expected");
    if std::env::var_os("QREXEC_CONNECT_BLESS").is_some() {
        bless(
            &expected,
            &out.join("normal"),
            &runtime,
            &stdout,
            &stderr,
            &status,
        );
    }

    let mut failures = Vec::new();
    diff_trees(
        "units",
        &expected.join("units"),
        &out.join("normal"),
        &mut failures,
    );
    diff_trees(
        "early",
        Path::new("/nonexistent"),
        &out.join("early"),
        &mut failures,
    );
    diff_trees(
        "late",
        Path::new("/nonexistent"),
        &out.join("late"),
        &mut failures,
    );
    diff_trees(
        "runtime",
        &expected.join("runtime"),
        &runtime,
        &mut failures,
    );
    let flag_dir = runtime.join("qrexec-connect");
    if let Ok(meta) = fs::metadata(&flag_dir) {
        let mode = meta.permissions().mode() & 0o7777;
        if mode != 0o700 {
            failures.push(format!("runtime/qrexec-connect has mode {mode:o}, not 700"));
        }
    }
    diff_text(
        "stdout",
        &read_or_empty(&expected.join("stdout")),
        &stdout,
        &mut failures,
    );
    diff_text(
        "stderr",
        &read_or_empty(&expected.join("stderr")),
        &stderr,
        &mut failures,
    );
    let want_status = fs::read_to_string(expected.join("status")).unwrap_or("0".into());
    if want_status.trim() != status {
        failures.push(format!(
            "status: expected {}, got {status}",
            want_status.trim()
        ));
    }

    let units = tree(&out.join("normal"))
        .into_iter()
        .filter_map(|(path, node)| match node {
            Node::File(bytes) if path.parent() == Some(Path::new("")) => {
                Some((path.to_str().unwrap().to_owned(), bytes))
            }
            _ => None,
        })
        .collect();
    (failures, units)
}

/// Replaces `expected/` with the actual results.
fn bless(
    expected: &Path,
    units: &Path,
    runtime: &Path,
    stdout: &[u8],
    stderr: &[u8],
    status: &str,
) {
    let _ = fs::remove_dir_all(expected);
    fs::create_dir_all(expected).unwrap();
    for (from, to) in [(units, "units"), (runtime, "runtime")] {
        for (rel, node) in tree(from) {
            let dest = expected.join(to).join(rel);
            match node {
                Node::Dir => fs::create_dir_all(&dest).unwrap(),
                Node::File(bytes) => {
                    fs::create_dir_all(dest.parent().unwrap()).unwrap();
                    fs::write(&dest, bytes).unwrap();
                }
                Node::Link(target) => {
                    fs::create_dir_all(dest.parent().unwrap()).unwrap();
                    symlink(target, &dest).unwrap();
                }
            }
        }
    }
    for (name, bytes) in [("stdout", stdout), ("stderr", stderr)] {
        if !bytes.is_empty() {
            fs::write(expected.join(name), bytes).unwrap();
        }
    }
    if status != "0" {
        fs::write(expected.join("status"), format!("{status}\n")).unwrap();
    }
}

/// Runs `systemd-analyze --user verify` on units whose names are distinct
/// (verify copies each to a temp dir under its name: a repeated name would
/// overwrite the first copy in place); returns everything it printed.
fn verify(units: &[(String, Vec<u8>)], check_man: bool, dir: &Path) -> String {
    fs::create_dir_all(dir).unwrap();
    let mut args = vec![format!("--man={}", if check_man { "yes" } else { "no" })];
    for (i, (name, bytes)) in units.iter().enumerate() {
        // verify reads FILE[:NAME]; the real names may hold ':', the copies not.
        let copy = dir.join(format!("unit{i}.socket"));
        fs::write(&copy, bytes).unwrap();
        args.push(format!("{}:{name}", copy.display()));
    }
    let output = in_namespace(
        unshare()
            .args(["sh", "-c", VERIFY_IN_NAMESPACE, "sh"])
            .args(&args),
    );
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text
}

/// Verifies every distinct unit, in as few calls as the names allow. verify
/// runs `man` once per unit for `Documentation=` (slow: ~70 ms each), and
/// that value is the same in every unit, so only the first call checks it,
/// on a single unit.
fn verify_all(units: &BTreeSet<(String, Vec<u8>)>, scratch: &Path) -> String {
    let mut rounds: Vec<Vec<(String, Vec<u8>)>> = Vec::new();
    for unit in units {
        match rounds
            .iter_mut()
            .find(|r| r.iter().all(|(n, _)| *n != unit.0))
        {
            Some(round) => round.push(unit.clone()),
            None => rounds.push(vec![unit.clone()]),
        }
    }
    let mut complaints = String::new();
    if let Some(first) = units.iter().next() {
        complaints += &verify(
            std::slice::from_ref(first),
            true,
            &scratch.join("verify-man"),
        );
    }
    for (i, round) in rounds.iter().enumerate() {
        complaints += &verify(round, false, &scratch.join(format!("verify{i}")));
    }
    complaints
}

#[test]
fn fixtures() {
    let root = workspace().join("tests/generator");
    let mut cases: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases in {}", root.display());

    let scratch = Scratch::new("generator");
    let mut report = String::new();
    let mut all_units = BTreeSet::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_str().unwrap();
        let (failures, units) = run_case(case, &scratch.0.join(name));
        for failure in failures {
            report.push_str(&format!("\n[{name}] {failure}\n"));
        }
        all_units.extend(units);
    }
    assert!(report.is_empty(), "{report}");

    assert!(
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok(),
        "systemd-analyze is needed to verify the units (package systemd)"
    );
    assert!(
        all_units.len() > 50,
        "too few units to verify: {}",
        all_units.len()
    );
    let complaints = verify_all(&all_units, &scratch.0);
    assert!(
        complaints.is_empty(),
        "systemd-analyze --user verify complained:\n{complaints}"
    );
}

#[test]
fn help_version_and_usage() {
    let run = |args: &[&str]| Command::new(GENERATOR).args(args).output().unwrap();
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("qrexec-connect-generator {}\n", env!("CARGO_PKG_VERSION"))
    );
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().contains("--check"));
    for (bad, why) in [
        (&[][..], "no output directory given"),
        (&["--bogus"], "unknown option \"--bogus\""),
        (&["/a", "--bogus", "/c"], "unknown option \"--bogus\""),
        (&["--check", "--bogus"], "unknown option \"--bogus\""),
        (
            &["--help", "x"],
            "\"--help\" takes no other argument (got 1)",
        ),
        (&["--verbose"], "\"--verbose\" works only with --check"),
        (
            &["/a", "/b"],
            "expected 1 output directory, or 3 as systemd passes them (normal, early, late); got 2",
        ),
        (
            &["/a", "/b", "/c", "/d"],
            "expected 1 output directory, or 3 as systemd passes them (normal, early, late); got 4",
        ),
    ] {
        let out = run(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8(out.stderr).unwrap();
        // The reason, one usage line, where the help is: not the whole help.
        assert_eq!(
            stderr,
            format!(
                "qrexec-connect-generator: {why}\n\
                 Usage: qrexec-connect-generator NORMAL-DIR [EARLY-DIR LATE-DIR] | --check \
                 [--verbose] [FILE...]\n\
                 Try 'qrexec-connect-generator --help'.\n"
            ),
            "{bad:?}"
        );
    }
    // The help says what the exit status of --check means.
    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains("Exit status 1 if there is an error; warnings alone exit 0"),
        "{help}"
    );
    // An argument is echoed through the printable rule: escaped and cut.
    let hostile = format!("--x\u{202e}\u{3164}\u{1b}[2J{}", "y".repeat(100_000));
    let out = run(&[&hostile]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(
            "qrexec-connect-generator: unknown option \"--x\\u{202e}\\u{3164}\\x1b[2Jyyy"
        ) && first.ends_with("…(100013 bytes)\""),
        "{}",
        &first[..first.len().min(300)]
    );
}

/// The text of a document between `heading` and the next `next` (the
/// next heading of the same level); `what` says what was expected.
fn section<'a>(text: &'a str, heading: &str, next: &str, what: &str) -> &'a str {
    text.split(heading)
        .nth(1)
        .and_then(|rest| rest.split(next).next())
        .expect(what)
}

/// An abstract socket has no file and so no permissions: the docs that list
/// the LISTEN forms must say who can connect to one.
#[test]
fn abstract_sockets_are_documented_as_open_to_the_whole_qube() {
    let root = workspace();
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let config_section = section(
        &readme,
        "\n## Config\n",
        "\n## ",
        "README has a Config section",
    );
    let man = fs::read_to_string(root.join("man/qrexec-connect.conf.5.scd")).unwrap();
    let listen_section = section(
        &man,
        "\n# LISTEN\n",
        "\n# ",
        "qrexec-connect.conf(5) has a LISTEN section",
    );
    for (what, text) in [
        ("README.md, Config", config_section),
        ("qrexec-connect.conf(5), LISTEN", listen_section),
    ] {
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            text.contains("no file permissions")
                && text.contains("any process in the qube's network namespace can connect"),
            "{what} does not say who can connect to an @name socket:\n{text}"
        );
    }
}

/// Issue 17: a line in /etc is bound by every user's manager; the docs
/// that describe the files must say that /etc lines should use per-user
/// `%t/` paths.
#[test]
fn etc_lines_are_documented_as_bound_by_every_user() {
    let root = workspace();
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let config_section = section(
        &readme,
        "\n## Config\n",
        "\n## ",
        "README has a Config section",
    );
    let man = fs::read_to_string(root.join("man/qrexec-connect.conf.5.scd")).unwrap();
    let description = section(
        &man,
        "\n# DESCRIPTION\n",
        "\n# ",
        "qrexec-connect.conf(5) has a DESCRIPTION section",
    );
    for (what, text) in [
        ("README.md, Config", config_section),
        ("qrexec-connect.conf(5), DESCRIPTION", description),
    ] {
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            text.contains("one address for all users") && text.contains("per-user paths under"),
            "{what} does not say that /etc lines should use per-user paths:\n{text}"
        );
    }
}
