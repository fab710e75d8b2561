//! The command line of `qrexec-connect` as a user meets it (issue 22):
//! `--help` and `-h` anywhere give help and exit 0, `help [COMMAND]`, a
//! typo gets "did you mean", `--debug` before a command, and every error is
//! three lines: `qrexec-connect: MESSAGE`, the usage line of that command,
//! and where to read more; never the whole help.
//!
//! Each run has an empty PATH, HOME and runtime directory: no `systemctl`,
//! no `qubesdb-read`, no config. So a command that runs instead of showing
//! its help fails at once rather than touching the machine, and `policy`
//! sees no bindings.

mod common;

use std::process::Command;

use common::{run, TempDir, DAEMON};

/// What one run of `qrexec-connect` printed and how it ended.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `qrexec-connect ARGS` with nothing around it (see the module doc).
fn cli(args: &[&str]) -> Ran {
    let home = TempDir::new("cli-home");
    let runtime = TempDir::new("cli-run");
    let empty_path = TempDir::new("cli-bin");
    let output = run(Command::new(DAEMON)
        .env_clear()
        .env("HOME", home.path())
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env("PATH", empty_path.path())
        .env("LANG", "C.UTF-8")
        .args(args));
    Ran {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The lines of `text` that are headings: not indented, ending with `:`.
fn headings(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.starts_with(' ') && l.ends_with(':'))
        .collect()
}

/// The section of `help` under `heading`, up to the next blank line.
fn section<'a>(help: &'a str, heading: &str) -> &'a str {
    let start = help
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no {heading:?} in\n{help}"));
    let rest = &help[start + heading.len() + 2..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

/// The first word of each entry of a help section (lines indented by two).
fn entries(section: &str) -> Vec<&str> {
    section
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect()
}

const ADD_USAGE: &str =
    "Usage: qrexec-connect add (LISTEN TARGET SERVICE | --tcp SPEC) [--file NAME]";
const REMOVE_USAGE: &str = "Usage: qrexec-connect remove LISTEN";
const STATUS_USAGE: &str = "Usage: qrexec-connect status [--json]";
const POLICY_USAGE: &str = "Usage: qrexec-connect policy [--source NAME]";
const RECONCILE_USAGE: &str = "Usage: qrexec-connect reconcile [--runtime-dir=DIR]";
const RECOVER_USAGE: &str = "Usage: qrexec-connect recover";
const HELP_USAGE: &str = "Usage: qrexec-connect help [COMMAND]";
const TOP_USAGE: &str = "Usage: qrexec-connect COMMAND [OPTIONS]";
const DAEMON_USAGE: &str = "Usage: qrexec-connect [--qrexec-client-vm=PATH] [--max-connections=N] \
                            [--client-mode=MODE] [--debug]";

#[test]
fn every_command_shows_its_help_with_h_anywhere_and_exits_0() {
    for (args, usage) in [
        (&["add", "--help"][..], ADD_USAGE),
        (&["add", "127.0.0.1:1", "a", "qubes.B", "-h"], ADD_USAGE),
        (&["help", "add"], ADD_USAGE),
        (&["remove", "--help"], REMOVE_USAGE),
        (&["remove", "2222", "-h"], REMOVE_USAGE),
        (&["status", "--help"], STATUS_USAGE),
        (&["status", "-h"], STATUS_USAGE),
        (&["status", "--json", "-h"], STATUS_USAGE),
        (&["policy", "--help"], POLICY_USAGE),
        (&["policy", "--source", "work", "-h"], POLICY_USAGE),
        (&["policy", "--bogus", "--help"], POLICY_USAGE),
        (&["reconcile", "-h"], RECONCILE_USAGE),
        (&["recover", "-h"], RECOVER_USAGE),
        (&["recover", "--help"], RECOVER_USAGE),
        (&["help", "status"], STATUS_USAGE),
        (&["help", "policy"], POLICY_USAGE),
        (&["help", "help"], HELP_USAGE),
        (&["-h", "status"], STATUS_USAGE),
        (&["--debug", "status", "--help"], STATUS_USAGE),
    ] {
        let ran = cli(args);
        assert_eq!(ran.code, Some(0), "{args:?}: {ran:?}");
        assert_eq!(ran.stdout.lines().next(), Some(usage), "{args:?}: {ran:?}");
        assert_eq!(ran.stderr, "", "{args:?}");
        assert_eq!(
            headings(&ran.stdout),
            ["Options:"],
            "{args:?}: a command's help has its options only\n{}",
            ran.stdout
        );
        let options = entries(section(&ran.stdout, "Options:"));
        assert!(options.contains(&"-h,"), "{args:?}: {options:?}");
    }
    let status = cli(&["status", "--help"]).stdout;
    assert_eq!(entries(section(&status, "Options:")), ["--json", "-h,"]);
    let policy = cli(&["policy", "--help"]).stdout;
    assert_eq!(entries(section(&policy, "Options:")), ["--source", "-h,"]);
    let add = cli(&["add", "--help"]).stdout;
    assert_eq!(
        entries(section(&add, "Options:")),
        ["--file", "--tcp", "-h,"]
    );
    let remove = cli(&["remove", "--help"]).stdout;
    assert_eq!(entries(section(&remove, "Options:")), ["-h,"]);
}

#[test]
fn help_lists_what_users_run_first_then_internal_commands_then_the_daemon() {
    let ran = cli(&["--help"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let help = ran.stdout;
    assert_eq!(help.lines().next(), Some(TOP_USAGE), "{help}");
    assert_eq!(
        headings(&help),
        [
            "Commands:",
            "Options:",
            "Run by systemd, not by hand:",
            "The daemon (no COMMAND; systemd starts it for the sockets):",
        ],
        "{help}"
    );
    assert_eq!(
        entries(section(&help, "Commands:")),
        ["add", "remove", "status", "policy", "help"]
    );
    assert_eq!(entries(section(&help, "Options:")), ["-h,", "-V,"]);
    assert_eq!(
        entries(section(&help, "Run by systemd, not by hand:")),
        ["reconcile", "recover"]
    );
    assert_eq!(
        entries(section(
            &help,
            "The daemon (no COMMAND; systemd starts it for the sockets):"
        )),
        [
            "--qrexec-client-vm=PATH",
            "--max-connections=N",
            "--client-mode=MODE",
            "-d,"
        ]
    );
    for args in [&["help"][..], &["-h"], &["--debug", "--help"]] {
        assert_eq!(cli(args).stdout, help, "{args:?}");
    }
}

/// Checks an error: exit 2, nothing on stdout, exactly `message`, the
/// usage line and the pointer to the help.
fn assert_usage_error(args: &[&str], message: &str, usage: &str, help: &str) {
    let ran = cli(args);
    assert_eq!(ran.code, Some(2), "{args:?}: {ran:?}");
    assert_eq!(ran.stdout, "", "{args:?}");
    assert_eq!(
        ran.stderr,
        format!("qrexec-connect: {message}\n{usage}\nTry '{help}'.\n"),
        "{args:?}"
    );
}

#[test]
fn a_typo_of_a_command_gets_did_you_mean() {
    let top = "qrexec-connect --help";
    for (typo, meant) in [
        ("stauts", "status"),
        ("stats", "status"),
        ("Status", "status"),
        ("polcy", "policy"),
        ("poilcy", "policy"),
        ("hlep", "help"),
        ("recnocile", "reconcile"),
        ("recovre", "recover"),
    ] {
        assert_usage_error(
            &[typo],
            &format!("unknown command \"{typo}\"; did you mean {meant}?"),
            TOP_USAGE,
            top,
        );
    }
    assert_usage_error(&["xyzzy"], "unknown command \"xyzzy\"", TOP_USAGE, top);
    assert_usage_error(
        &["help", "stauts"],
        "unknown command \"stauts\"; did you mean status?",
        HELP_USAGE,
        "qrexec-connect help --help",
    );
    assert_usage_error(
        &["--debug", "stauts"],
        "unknown command \"stauts\"; did you mean status?",
        TOP_USAGE,
        top,
    );
}

#[test]
fn errors_are_one_message_one_usage_line_and_a_pointer_to_the_help() {
    let status = "qrexec-connect status --help";
    let policy = "qrexec-connect policy --help";
    assert_usage_error(
        &["status", "--jsno"],
        "unknown option \"--jsno\" for status; did you mean --json?",
        STATUS_USAGE,
        status,
    );
    assert_usage_error(
        &["status", "extra"],
        "status takes no argument \"extra\"",
        STATUS_USAGE,
        status,
    );
    assert_usage_error(
        &["status", "--json=yes"],
        "--json takes no value",
        STATUS_USAGE,
        status,
    );
    assert_usage_error(
        &["policy", "--source"],
        "--source needs a value: --source NAME",
        POLICY_USAGE,
        policy,
    );
    assert_usage_error(
        &["policy", "--source", "a", "--source=b"],
        "--source is given twice",
        POLICY_USAGE,
        policy,
    );
    assert_usage_error(
        &["policy", "--source", "@anyvm"],
        "--source \"@anyvm\" is not a qube name: a qube name is a letter, then letters, \
         digits, '_' or '-', at most 31 characters (not a keyword such as @anyvm, not *, not \
         dom0)",
        POLICY_USAGE,
        policy,
    );
    assert_usage_error(
        &["reconcile", "--runtime-dir"],
        "--runtime-dir needs a value: --runtime-dir=DIR",
        RECONCILE_USAGE,
        "qrexec-connect reconcile --help",
    );
    assert_usage_error(
        &["help", "status", "policy"],
        "help takes one COMMAND, not \"policy\" too",
        HELP_USAGE,
        "qrexec-connect help --help",
    );
    // A daemon option is not a command's.
    assert_usage_error(
        &["--max-connections=3", "status"],
        "--max-connections is an option of the daemon, not of status",
        STATUS_USAGE,
        status,
    );
    // The daemon's own errors, with its usage line.
    let top = "qrexec-connect --help";
    assert_usage_error(
        &["--max-connections", "0"],
        "--max-connections needs a positive number, not \"0\"",
        DAEMON_USAGE,
        top,
    );
    assert_usage_error(
        &["--client-mode=fast"],
        "--client-mode is auto, stdin-socket or pipe, not \"fast\"",
        DAEMON_USAGE,
        top,
    );
    assert_usage_error(
        &["--debgu"],
        "unknown option \"--debgu\"; did you mean --debug?",
        DAEMON_USAGE,
        top,
    );
}

#[test]
fn user_values_are_quoted_with_invisible_and_control_characters_escaped() {
    assert_usage_error(
        &["status", "--x\u{202e}\u{a0}\u{1b}[2J"],
        "unknown option \"--x\\u{202e}\\u{a0}\\x1b[2J\" for status",
        STATUS_USAGE,
        "qrexec-connect status --help",
    );
    assert_usage_error(
        &["st\u{200b}atus"],
        "unknown command \"st\\u{200b}atus\"; did you mean status?",
        TOP_USAGE,
        "qrexec-connect --help",
    );
    assert_usage_error(
        &[
            "policy",
            "--source",
            "work\nqubes.ConnectTCP * @anyvm @anyvm allow",
        ],
        "--source \"work\\x0aqubes.ConnectTCP * @anyvm @anyvm allow\" is not a qube name: a \
         qube name is a letter, then letters, digits, '_' or '-', at most 31 characters (not a \
         keyword such as @anyvm, not *, not dom0)",
        POLICY_USAGE,
        "qrexec-connect policy --help",
    );
}

#[test]
fn debug_before_a_command_runs_the_command() {
    for args in [
        &["--debug", "policy", "--source", "work"][..],
        &["-d", "policy", "--source=work"],
        &["policy", "--source=work", "--debug"],
    ] {
        let ran = cli(args);
        assert_eq!(ran.code, Some(0), "{args:?}: {ran:?}");
        assert!(
            ran.stdout
                .starts_with("# qrexec-connect: what work may call"),
            "{args:?}: {ran:?}"
        );
    }
}

#[test]
fn version_is_the_same_before_a_command() {
    let version = format!("qrexec-connect {}\n", env!("CARGO_PKG_VERSION"));
    for args in [&["--version"][..], &["-V"], &["-d", "-V"]] {
        let ran = cli(args);
        assert_eq!((ran.code, ran.stdout.as_str()), (Some(0), version.as_str()));
    }
}
