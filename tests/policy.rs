//! `qrexec-connect policy` never widens dom0's policy (issue 17): for every
//! config, hostile ones included, the set of calls its output allows, as
//! the tests' Qubes policy parser reads it, equals the calls the bindings
//! make, from exactly this qube; and what cannot be allowed exactly (a
//! source that is not a qube name, an NFS binding without its address) is
//! refused with nothing on stdout.
//!
//! Most tests run the built `qrexec-connect` on a config directory with no
//! user manager to ask (so only the config counts; `policy` says on stderr
//! that hand-written units are left out); the hand-written units are tested
//! on a real user manager. `qubesdb-read` is a script in the test's PATH
//! that prints the name a test gives it.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use common::user_manager::UserManager;
use common::*;
use qrexec_connect_binding::destination::MAX_VM_NAME;
use qrexec_connect_generator::config::is_invisible;
use qubes_policy::{allowed, check_policy_line, intended_target, Call, Grant};

/// The placeholder `policy` writes for a qube only dom0 can choose.
const CHOOSE: &str = "CHOOSE-A-QUBE";

/// A client qube's home and runtime directory, without a user manager.
struct Client {
    home: TempDir,
    runtime: TempDir,
    /// First in PATH: the test's `qubesdb-read`, when it has one.
    bin: TempDir,
}

impl Client {
    /// A client whose `~/.config/qrexec-connect/` holds `files` (name, text).
    fn new(files: &[(&str, &str)]) -> Client {
        let client = Client {
            home: TempDir::new("policy-home"),
            runtime: TempDir::new("policy-run"),
            bin: TempDir::new("policy-bin"),
        };
        for (name, text) in files {
            client.write_config(OsStr::new(name), text);
        }
        client
    }

    fn config_dir(&self) -> std::path::PathBuf {
        self.home.path().join(".config/qrexec-connect")
    }

    /// Writes a config file; the name may hold any byte but `/`.
    fn write_config(&self, name: &OsStr, text: &str) {
        let dir = self.config_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    /// Makes `qubesdb-read /name` print `name` and a newline.
    fn qubesdb_says(&self, name: &[u8]) {
        let value = self.bin.path().join("name");
        std::fs::write(&value, [name, b"\n"].concat()).unwrap();
        let script = self.bin.path().join("qubesdb-read");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = /name ] || exit 1\nexec cat '{}'\n",
                value.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn command(&self) -> Command {
        let mut command = Command::new(DAEMON);
        command
            .env_clear()
            .env("HOME", self.home.path())
            .env("XDG_RUNTIME_DIR", self.runtime.path())
            .env(
                "PATH",
                format!("{}:/usr/local/bin:/usr/bin:/bin", self.bin.path().display()),
            )
            .env("LANG", "C.UTF-8")
            .arg("policy");
        command
    }

    fn policy(&self, args: &[&str]) -> Output {
        run(self.command().args(args))
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The grants that allow exactly `calls` (TARGET as the binding writes it,
/// SERVICE[+ARG]) from `source`: a call whose target is left to policy runs
/// in the placeholder qube.
fn grants(source: &str, calls: &[(&str, &str)]) -> BTreeSet<Grant> {
    calls
        .iter()
        .map(|&(target, service)| {
            let call = Call {
                source,
                target,
                service,
            };
            let redirect = (intended_target(target) == "@default").then_some(CHOOSE);
            Grant::for_call(call, redirect)
        })
        .collect()
}

/// Checks that `policy` succeeded with a file dom0 can install whose every
/// line is a whole comment or a rule, with no control (but the newlines),
/// bidi or invisible character anywhere; returns what it allows.
fn allowed_by(output: &Output) -> Result<BTreeSet<Grant>, String> {
    let stdout = text(&output.stdout);
    if !output.status.success() {
        return Err(format!("policy failed: {}{stdout}", text(&output.stderr)));
    }
    if String::from_utf8(output.stdout.clone()).is_err() {
        return Err(format!("stdout is not UTF-8:\n{stdout}"));
    }
    if let Some(c) = stdout
        .chars()
        .find(|&c| (c.is_control() && c != '\n') || is_invisible(c))
    {
        return Err(format!("raw {c:?} on stdout:\n{stdout}"));
    }
    let mut rules = Vec::new();
    for line in stdout.lines() {
        if !line.starts_with('#') {
            let rule = check_policy_line(line)
                .map_err(|e| format!("not a rule dom0 accepts: {e}\n{stdout}"))?;
            rules.push(rule);
        }
    }
    allowed(&rules).map_err(|e| format!("{e}\n{stdout}"))
}

/// Whether `policy` refused: status `code`, nothing on stdout, and stderr
/// naming each of `needles`, without raw controls.
fn refused(output: &Output, code: i32, needles: &[&str]) -> Result<(), String> {
    let stderr = text(&output.stderr);
    if !output.stdout.is_empty() {
        return Err(format!("printed on stdout:\n{}", text(&output.stdout)));
    }
    if output.status.code() != Some(code) {
        return Err(format!(
            "exit status {:?}, not {code}: {stderr}",
            output.status.code()
        ));
    }
    if let Some(needle) = needles.iter().find(|n| !stderr.contains(**n)) {
        return Err(format!("{needle:?} not in {stderr}"));
    }
    if stderr.contains(['\u{202e}', '\u{200b}', '\r']) {
        return Err(format!("raw characters on stderr: {stderr:?}"));
    }
    Ok(())
}

fn set_text(set: &BTreeSet<Grant>) -> String {
    set.iter().map(|g| format!("\n  {g}")).collect()
}

/// Whether `policy` allowed exactly `expected`.
fn exactly(output: &Output, expected: &BTreeSet<Grant>) -> Result<(), String> {
    let got = allowed_by(output)?;
    if &got != expected {
        return Err(format!(
            "the policy allows{}\nbut the config asked for{}\n{}",
            set_text(&got),
            set_text(expected),
            text(&output.stdout)
        ));
    }
    Ok(())
}

/// The failures of a table of cases, reported together.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, case: &str, result: Result<(), String>) {
        if let Err(why) = result {
            self.0.push(format!("{case}: {why}"));
        }
    }
}

impl Drop for Failures {
    fn drop(&mut self) {
        if !self.0.is_empty() && !std::thread::panicking() {
            panic!(
                "{} case(s) failed:\n\n{}",
                self.0.len(),
                self.0.join("\n\n")
            );
        }
    }
}

fn assert_ok(case: &str, result: Result<(), String>) {
    if let Err(why) = result {
        panic!("{case}: {why}");
    }
}

// ---------------------------------------------------------------------------
// Every binding gets exactly its call
// ---------------------------------------------------------------------------

/// One config line per case, the call its binding makes (TARGET as written,
/// SERVICE[+ARG]), and the allowed set compared with that call alone.
#[test]
fn each_binding_is_allowed_exactly_its_call_and_nothing_more() {
    let long_qube = "q".repeat(MAX_VM_NAME);
    let long_dispvm = format!("@dispvm:{long_qube}");
    let long_service = format!("org.{}+{}", "s".repeat(150), "a".repeat(60));
    let cases: Vec<(String, &str, String)> = vec![
        (
            "127.0.0.1:2222 ssh-server qubes.ConnectTCP+22".into(),
            "ssh-server",
            "qubes.ConnectTCP+22".into(),
        ),
        // No argument: the call has none, so the rule allows none (`+`).
        (
            "127.0.0.1:2223 ssh-server qubes.ConnectTCP".into(),
            "ssh-server",
            "qubes.ConnectTCP".into(),
        ),
        (
            "%t/agent @default qubes.ConnectSSHAgent".into(),
            "@default",
            "qubes.ConnectSSHAgent".into(),
        ),
        (
            "%t/agent '' qubes.ConnectSSHAgent".into(),
            "",
            "qubes.ConnectSSHAgent".into(),
        ),
        // The old spellings qrexec-client-vm turns into @ before dom0 sees them.
        (
            "%t/agent $default qubes.ConnectSSHAgent".into(),
            "$default",
            "qubes.ConnectSSHAgent".into(),
        ),
        (
            "127.0.0.1:8080 $dispvm qubes.ConnectTCP+80".into(),
            "$dispvm",
            "qubes.ConnectTCP+80".into(),
        ),
        (
            "127.0.0.1:8080 @dispvm qubes.ConnectTCP+80".into(),
            "@dispvm",
            "qubes.ConnectTCP+80".into(),
        ),
        // A new disposable of the template for each call (issue 20).
        (
            "127.0.0.1:8081 @dispvm:web-dvm qubes.ConnectTCP+80".into(),
            "@dispvm:web-dvm",
            "qubes.ConnectTCP+80".into(),
        ),
        (
            "127.0.0.1:8082 $dispvm:web-dvm qubes.ConnectTCP+80".into(),
            "$dispvm:web-dvm",
            "qubes.ConnectTCP+80".into(),
        ),
        (
            format!("%t/x @dispvm:{long_qube} my.Service"),
            &long_dispvm,
            "my.Service".into(),
        ),
        (
            "%t/admin $adminvm my.Service".into(),
            "$adminvm",
            "my.Service".into(),
        ),
        (
            "%t/admin @adminvm my.Service".into(),
            "@adminvm",
            "my.Service".into(),
        ),
        (
            "%t/admin dom0 my.Service".into(),
            "dom0",
            "my.Service".into(),
        ),
        // `+` with an empty argument is the same call as no argument.
        (
            "127.0.0.1:2224 ssh-server qubes.ConnectTCP+".into(),
            "ssh-server",
            "qubes.ConnectTCP+".into(),
        ),
        (
            "%t/x vault my.Service+a+b".into(),
            "vault",
            "my.Service+a+b".into(),
        ),
        (
            format!("%t/x {long_qube} {long_service}"),
            &long_qube,
            long_service.clone(),
        ),
        (
            "127.0.0.1:2049 nfs-server qubes.ConnectNFS+127.0.1.1".into(),
            "nfs-server",
            "qubes.ConnectNFS+127.0.1.1".into(),
        ),
        // (Paths beyond ASCII are refused lines since systemd loses their
        // sockets at a daemon-reload: `refused_lines_get_no_rule`.)
    ];
    let mut failures = Failures::default();
    let mut all_lines = String::new();
    let mut all_calls = Vec::new();
    for (line, target, service) in &cases {
        let client = Client::new(&[("a.conf", &format!("{line}\n"))]);
        let expected = grants("work", &[(target, service)]);
        failures.check(
            line,
            exactly(&client.policy(&["--source", "work"]), &expected),
        );
        all_lines += &format!("{line}\n");
        all_calls.push((*target, service.as_str()));
    }
    // All at once (the config refuses a LISTEN bound twice, so give each
    // line its own): the union, each rule once.
    let numbered: String = all_lines
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let (_, rest) = line.split_once(' ').unwrap();
            format!("127.0.0.1:{} {rest}\n", 3000 + i)
        })
        .collect();
    let client = Client::new(&[("all.conf", &numbered)]);
    let output = client.policy(&["--source", "work"]);
    failures.check("all lines", exactly(&output, &grants("work", &all_calls)));
    let stdout = text(&output.stdout);
    let rules: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#')).collect();
    let distinct: BTreeSet<&str> = rules.iter().copied().collect();
    if rules.len() != distinct.len() {
        failures.check("all lines", Err(format!("a rule written twice:\n{stdout}")));
    }
}

/// Lines the config refuses, however close to a rule they look, allow
/// nothing: only the good line's call is allowed.
#[test]
fn config_lines_that_are_not_bindings_allow_nothing() {
    let config = "127.0.0.1:2222 ssh-server qubes.ConnectTCP+22\n\
                  127.0.0.1:2300 @anyvm qubes.ConnectTCP+22\n\
                  127.0.0.1:2301 * qubes.ConnectTCP+22\n\
                  127.0.0.1:2302 @tag:work qubes.ConnectTCP+22\n\
                  127.0.0.1:2303 $anyvm qubes.ConnectTCP+22\n\
                  127.0.0.1:2304 ssh-server qubes.ConnectTCP+*\n\
                  127.0.0.1:2305 ssh-server * \n\
                  127.0.0.1:2306 ssh-server qubes.ConnectTCP+22 allow\n\
                  127.0.0.1:2307 ssh-server +22\n\
                  127.0.0.1:2308 @dispvm/fedora-dvm qubes.ConnectTCP+22\n\
                  127.0.0.1:2311 @dispvm: qubes.ConnectTCP+22\n\
                  127.0.0.1:2312 @dispvm:@anyvm qubes.ConnectTCP+22\n\
                  127.0.0.1:2313 @dispvm:@tag:work qubes.ConnectTCP+22\n\
                  127.0.0.1:2314 @dispvm:* qubes.ConnectTCP+22\n\
                  127.0.0.1:2315 @dispvm:9dvm qubes.ConnectTCP+22\n\
                  127.0.0.1:2316 @dispvm:@dispvm:dvm qubes.ConnectTCP+22\n\
                  127.0.0.1:2317 @dispvm:dvm:x qubes.ConnectTCP+22\n\
                  127.0.0.1:2318 @default:dvm qubes.ConnectTCP+22\n\
                  127.0.0.1:2309 ssh-server qubes.ConnectTCP+22\r\x0bqubes.ConnectTCP\n\
                  127.0.0.1:2310 ssh-server\u{202e} qubes.ConnectTCP+22\n";
    let client = Client::new(&[("a.conf", config)]);
    let output = client.policy(&["--source", "work"]);
    let expected = grants("work", &[("ssh-server", "qubes.ConnectTCP+22")]);
    assert_ok("hostile lines", exactly(&output, &expected));
    assert!(
        text(&output.stderr).contains("not bindings"),
        "{}",
        text(&output.stderr)
    );
}

/// The file name dom0 should give `source`'s policy (issue 22): one per
/// qube, and made of the characters qrexec reads (`[0-9a-z_.-]`, not
/// starting with `.`), since one file named otherwise in policy.d makes
/// qrexec refuse every call.
fn policy_file_of(source: &str) -> String {
    let client = Client::new(&[]);
    let output = client.policy(&["--source", source]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# Install it in dom0 as /etc/qubes/policy.d/"))
        .unwrap_or_else(|| panic!("no file name in\n{stdout}"));
    let name = line.strip_suffix("; in dom0:").unwrap().to_owned();
    assert!(
        name.ends_with(".policy")
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'z' | b'_' | b'.' | b'-')),
        "{source}: {name}"
    );
    name
}

#[test]
fn the_output_says_to_read_it_and_how_to_install_it_as_this_qubes_own_file() {
    let client = Client::new(&[(
        "ssh.conf",
        "127.0.0.1:2222 ssh-server qubes.ConnectTCP+22\n",
    )]);
    let output = client.policy(&["--source", "work"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let file = "30-qrexec-connect-work.policy";
    let steps = [
        format!("qvm-run --pass-io work 'qrexec-connect policy' > {file}"),
        format!("less {file}"),
        format!("sudo cp {file} /etc/qubes/policy.d/"),
    ];
    let mut header = "# qrexec-connect: what work may call, one rule per binding.\n\
                      # Read it before you install it: dom0's policy is the security boundary.\n\
                      # Install it in dom0 as /etc/qubes/policy.d/30-qrexec-connect-work.policy; \
                      in dom0:\n"
        .to_owned();
    for step in &steps {
        header += &format!("#   {step}\n");
    }
    assert_eq!(
        text(&output.stdout),
        format!("{header}qubes.ConnectTCP +22 work ssh-server allow\n")
    );
    let mut advice = "qrexec-connect policy: read this policy before you install it in dom0: it \
                      decides what work may call. In dom0, to copy it to \
                      /etc/qubes/policy.d/30-qrexec-connect-work.policy:\n"
        .to_owned();
    for step in &steps {
        advice += &format!("  {step}\n");
    }
    let stderr = text(&output.stderr);
    assert!(stderr.ends_with(&advice), "{stderr}");

    // Each qube its own file, in the characters qrexec reads, capitals too.
    let names: Vec<String> = ["work", "Work", "WORK", "w-ork", "w_ork", "a1", "A1"]
        .into_iter()
        .map(policy_file_of)
        .collect();
    assert_eq!(names[0], file);
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), names.len(), "{names:?}");
}

// ---------------------------------------------------------------------------
// The source: a qube name, or nothing printed
// ---------------------------------------------------------------------------

/// `--source` takes a qube name only; anything else names the rule, exits
/// 2 and prints nothing on stdout (the config has a binding, so a policy
/// would otherwise be printed).
#[test]
fn a_source_that_is_not_a_qube_name_prints_nothing() {
    let client = Client::new(&[("a.conf", "127.0.0.1:2222 ssh-server qubes.ConnectTCP+22\n")]);
    let mut failures = Failures::default();
    let too_long = "a".repeat(MAX_VM_NAME + 1);
    let hostile: Vec<&[u8]> = vec![
        b"@anyvm",
        b"*",
        b"@tag:x",
        b"@type:AppVM",
        b"@adminvm",
        b"$anyvm",
        b"dom0",
        b"",
        b"work srv allow\nqubes.ConnectTCP * @anyvm @anyvm",
        b"work\n",
        b"work\r",
        b" work",
        b"work x",
        b"wo\x1brk",
        "wo\u{202e}rk".as_bytes(),
        "wo\u{200b}rk".as_bytes(),
        "w\u{f6}rk".as_bytes(),
        b"1work",
        b"-work",
        b"work.x",
        too_long.as_bytes(),
        b"w\xffork",
    ];
    for name in hostile {
        let case = format!("--source {:?}", String::from_utf8_lossy(name));
        let output = run(client
            .command()
            .arg("--source")
            .arg(OsStr::from_bytes(name)));
        failures.check(&case, refused(&output, 2, &["a qube name is a letter"]));
        let joined = [b"--source=", name].concat();
        let output = run(client.command().arg(OsStr::from_bytes(&joined)));
        let case = format!("{case} (as --source=)");
        failures.check(&case, refused(&output, 2, &["a qube name is a letter"]));
    }
    // No value, or two.
    let output = client.policy(&["--source"]);
    failures.check("no value", refused(&output, 2, &["--source needs"]));
    let output = client.policy(&["--source", "work", "--source=other"]);
    failures.check("twice", refused(&output, 2, &["twice"]));
    // The longest name is a name.
    let longest = "a".repeat(MAX_VM_NAME);
    let expected = grants(&longest, &[("ssh-server", "qubes.ConnectTCP+22")]);
    failures.check(
        "longest",
        exactly(&client.policy(&["--source", &longest]), &expected),
    );
}

/// Without `--source` the name comes from `qubesdb-read /name`, and is
/// held to the same rule: a hostile or broken answer prints nothing.
#[test]
fn this_qubes_name_from_qubesdb_is_checked_like_source() {
    let client = Client::new(&[("a.conf", "%t/agent @default qubes.ConnectSSHAgent\n")]);
    let mut failures = Failures::default();
    // No qubesdb-read at all (not a qube, or not in PATH).
    failures.check(
        "no qubesdb-read",
        refused(&client.policy(&[]), 1, &["--source"]),
    );
    for name in [
        &b"@anyvm"[..],
        b"*",
        b"",
        b"dom0",
        b"work srv allow\nqubes.ConnectTCP * @anyvm @anyvm",
        "wo\u{202e}rk".as_bytes(),
        b"w\xffork",
    ] {
        client.qubesdb_says(name);
        let case = format!("qubesdb-read gives {:?}", String::from_utf8_lossy(name));
        let needles = ["qubesdb-read", "a qube name is a letter", "--source"];
        failures.check(&case, refused(&client.policy(&[]), 1, &needles));
    }
    client.qubesdb_says(b"work");
    let expected = grants("work", &[("@default", "qubes.ConnectSSHAgent")]);
    failures.check(
        "qubesdb-read gives work",
        exactly(&client.policy(&[]), &expected),
    );
}

// ---------------------------------------------------------------------------
// A service whose argument is a right
// ---------------------------------------------------------------------------

/// `qubes.ConnectNFS` without its address (or with an empty one) has no
/// exact rule: the policy is refused, naming the binding's FILE:LINE.
#[test]
fn nfs_without_its_address_is_refused_with_file_and_line() {
    for service in ["qubes.ConnectNFS", "qubes.ConnectNFS+"] {
        let config = format!(
            "127.0.0.1:2222 ssh-server qubes.ConnectTCP+22\n\
             # the NFS client\n\
             127.0.0.1:2049 nfs-server {service}\n"
        );
        let client = Client::new(&[("nfs.conf", &config)]);
        let place = format!("{}:3", client.config_dir().join("nfs.conf").display());
        let needles = [place.as_str(), "qubes.ConnectNFS needs its argument"];
        assert_ok(
            service,
            refused(&client.policy(&["--source", "work"]), 1, &needles),
        );
    }
}

// ---------------------------------------------------------------------------
// Comments carry no second line
// ---------------------------------------------------------------------------

/// Paths chosen to break a comment: a config file named with a newline and
/// a rule (the config refuses the file: no rule comes from it), a config
/// directory whose name holds a newline, bidi and zero-width characters in
/// a LISTEN. The output stays comments and exact rules.
#[test]
fn no_comment_carries_a_raw_control_or_a_rule() {
    let client = Client::new(&[(
        "a.conf",
        "%t/\u{202e}x\u{200b} @default my.Refused\n%t/agent @default my.Agent\n",
    )]);
    client.write_config(
        OsStr::new("b\nqubes.ConnectTCP * @anyvm @anyvm allow\n.conf"),
        "%t/other @default my.Other\n",
    );
    client.write_config(
        OsStr::from_bytes(b"c\r\xe2\x80\xaequbes.ConnectTCP * @anyvm @anyvm allow.conf"),
        "%t/third @default my.Third\n",
    );
    let output = client.policy(&["--source", "work"]);
    let expected = grants("work", &[("@default", "my.Agent")]);
    assert_ok("hostile file names", exactly(&output, &expected));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("%t/agent ("), "{stdout}");
    assert!(!stdout.contains("@anyvm"), "{stdout}");
    assert!(
        !stdout.contains(['\r', '\u{202e}', '\u{200b}']),
        "{stdout:?}"
    );
    // The two files and the refused line are counted (`--check` names them).
    let stderr = text(&output.stderr);
    assert!(stderr.contains("3 problem(s) in the config"), "{stderr}");
    assert!(
        !stderr.contains(['\r', '\u{202e}', '\u{200b}']),
        "{stderr:?}"
    );

    // The whole config directory under a name with a newline: every file
    // is refused, so no rule at all.
    let home = TempDir::new("policy-xdg");
    let dir = home
        .path()
        .join("x\nqubes.ConnectTCP * @anyvm @anyvm allow");
    std::fs::create_dir_all(dir.join("qrexec-connect")).unwrap();
    std::fs::write(
        dir.join("qrexec-connect/a.conf"),
        "%t/agent @default my.Agent\n",
    )
    .unwrap();
    let output = run(client
        .command()
        .env("XDG_CONFIG_HOME", &dir)
        .args(["--source", "work"]));
    assert_ok(
        "hostile XDG_CONFIG_HOME",
        exactly(&output, &BTreeSet::new()),
    );
}

/// A line whose socket systemd would lose at the first daemon-reload (a
/// path or abstract name beyond ASCII, or with a quote or a backslash) is
/// refused by the generator, so no rule allows its call; the others of the
/// same file get theirs.
#[test]
fn refused_lines_get_no_rule() {
    let client = Client::new(&[(
        "a.conf",
        "%t/\u{202e}gpj.exe @default my.Agent\n\
         %t/a\u{200b}b\u{feff} '' my.Agent2\n\
         %t/café vault my.Cafe\n\
         @back\\slash vault my.Back\n\
         %t/fine vault my.Fine\n",
    )]);
    let output = client.policy(&["--source", "work"]);
    assert_ok(
        "refused lines",
        exactly(&output, &grants("work", &[("vault", "my.Fine")])),
    );
    let stderr = text(&output.stderr);
    assert!(stderr.contains("4 problem(s) in the config"), "{stderr}");
}

// ---------------------------------------------------------------------------
// Hand-written units, on a real user manager
// ---------------------------------------------------------------------------

/// A hand-written socket unit is a binding too: its call is allowed
/// exactly (its `$default` written `@default`), and its LISTEN, with bidi
/// and zero-width characters that systemd accepts in a path, reaches the
/// comment only in printable form (`systemctl show` already writes them
/// as octal escapes, which stay as they are). A unit's path cannot hold a
/// newline here (unit names are ASCII, the unit directories fixed); the
/// unit test `hand_written_units_are_read_from_show_blocks` covers it.
#[test]
fn hand_written_units_are_allowed_exactly_with_printable_comments() {
    let manager = UserManager::start(&[
        (
            ".config/qrexec-connect/a.conf",
            "127.0.0.1:2222 ssh-server qubes.ConnectTCP+22\n",
        ),
        (
            ".config/systemd/user/qrexec-connect-hand.socket",
            "[Socket]\nListenStream=%t/hand\u{202e}x\u{200b}\n\
             FileDescriptorName=$default qubes.ConnectSSHAgent\n\
             Service=qrexec-connect.service\n",
        ),
    ]);
    manager.systemctl_ok(&["start", "qrexec-connect-hand.socket"]);
    let output = run(manager
        .command("qrexec-connect")
        .args(["policy", "--source", "work"]));
    let expected = grants(
        "work",
        &[
            ("ssh-server", "qubes.ConnectTCP+22"),
            ("$default", "qubes.ConnectSSHAgent"),
        ],
    );
    assert_ok("hand-written unit", exactly(&output, &expected));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("# /run/user/0/hand"), "{stdout}");
}
