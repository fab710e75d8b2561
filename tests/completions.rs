//! The shell completions offer what the programs accept: every option and
//! command of `--help`, and completing a partial word gives the right one,
//! in bash and fish for real, in zsh as far as its parser checks.

mod common;

use std::path::Path;
use std::process::Command;

use common::program::Program;
use common::{run, DAEMON, GENERATOR};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../completions");

fn stdout(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What bash offers for `words`, the last one being completed.
fn bash(function: &str, words: &[&str]) -> Vec<String> {
    let script = format!(
        "source {DIR}/qrexec-connect.bash; COMP_WORDS=({}); COMP_CWORD={}; {function} 2>/dev/null; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
        words.len() - 1
    );
    stdout(Command::new("bash").arg("-c").arg(script))
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// What fish offers for a command line.
fn fish(line: &str) -> Vec<String> {
    let script = format!(
        "source {DIR}/qrexec-connect.fish; source {DIR}/qrexec-connect-generator.fish; \
         complete -C '{line}'"
    );
    stdout(Command::new("fish").arg("-c").arg(script))
        .lines()
        .map(|l| l.split('\t').next().unwrap_or("").to_owned())
        .collect()
}

/// The heading of the daemon's options in `qrexec-connect --help`: they
/// are not the users', so no completion offers them.
const DAEMON_HEADING: &str = "The daemon (no COMMAND; systemd starts it for the sockets):";

/// The options a help text names (first column of lines that start with a
/// dash), and the commands its sections list.
fn words_of_help(help: &str) -> Vec<String> {
    let mut words: Vec<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with('-'))
        .flat_map(|line| {
            let column = line.split("  ").next().unwrap_or("");
            column
                .split([' ', ',', '|'])
                .filter(|w| w.starts_with("--") && w.len() > 2)
                .map(|w| w.split('=').next().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    for command in [
        "add",
        "remove",
        "status",
        "policy",
        "help",
        "reconcile",
        "recover",
    ] {
        if help.contains(&format!("\n  {command}")) {
            words.push(command.to_owned());
        }
    }
    words.sort();
    words.dedup();
    words
}

/// The top help of a program without the daemon's section.
fn users_help(program: Program) -> String {
    let help = stdout(Command::new(program).arg("--help"));
    help.split(DAEMON_HEADING).next().unwrap().to_owned()
}

/// Each command of `qrexec-connect` and the options its own help names.
fn command_words() -> Vec<(&'static str, Vec<String>)> {
    [
        "add",
        "remove",
        "status",
        "policy",
        "help",
        "reconcile",
        "recover",
    ]
    .into_iter()
    .map(|command| {
        let help = stdout(Command::new(DAEMON).args([command, "--help"]));
        (command, words_of_help(&help))
    })
    .collect()
}

#[test]
fn every_option_and_command_of_help_is_completed_by_every_shell() {
    for (program, files) in [
        (
            DAEMON,
            [
                "qrexec-connect.bash",
                "_qrexec-connect",
                "qrexec-connect.fish",
            ],
        ),
        (
            GENERATOR,
            [
                "qrexec-connect.bash",
                "_qrexec-connect",
                "qrexec-connect-generator.fish",
            ],
        ),
    ] {
        let words = words_of_help(&users_help(program));
        assert!(words.len() >= 3, "{program}: {words:?}");
        for file in files {
            let text = std::fs::read_to_string(Path::new(DIR).join(file)).unwrap();
            for word in &words {
                let spelled = word.trim_start_matches("--");
                assert!(
                    text.contains(word.as_str()) || text.contains(&format!("-l {spelled}")),
                    "{file} does not complete {word} of {}",
                    program.name
                );
            }
        }
    }
}

#[test]
fn each_command_gets_its_own_options_and_help_in_bash_and_fish() {
    for (command, words) in command_words() {
        assert!(words.contains(&"--help".to_owned()), "{command}: {words:?}");
        let mut bash_words = bash("_qrexec_connect", &["qrexec-connect", command, "--"]);
        bash_words
            .iter_mut()
            .for_each(|w| *w = w.trim_end_matches('=').to_owned());
        bash_words.sort();
        let fish_words: Vec<String> = fish(&format!("qrexec-connect {command} --"))
            .into_iter()
            .map(|w| w.split('=').next().unwrap().to_owned())
            .collect();
        let mut fish_words = fish_words;
        fish_words.sort();
        fish_words.dedup();
        let options: Vec<String> = words.into_iter().filter(|w| w.starts_with('-')).collect();
        assert_eq!(bash_words, options, "bash, {command}");
        assert_eq!(fish_words, options, "fish, {command}");
    }
}

#[test]
fn the_top_level_offers_users_commands_first_and_no_daemon_option() {
    // bash: the users' commands for an empty word; systemd's once typed.
    assert_eq!(
        bash("_qrexec_connect", &["qrexec-connect", ""]),
        ["add", "remove", "status", "policy", "help"]
    );
    assert_eq!(
        bash("_qrexec_connect", &["qrexec-connect", "rec"]),
        ["reconcile", "recover"]
    );
    assert_eq!(
        bash("_qrexec_connect", &["qrexec-connect", "re"]),
        ["remove", "reconcile", "recover"]
    );
    assert_eq!(
        bash("_qrexec_connect", &["qrexec-connect", "--"]),
        ["--help", "--version"]
    );
    // fish: every command, the users' first (it keeps this order).
    assert_eq!(
        fish("qrexec-connect "),
        [
            "add",
            "remove",
            "status",
            "policy",
            "help",
            "reconcile",
            "recover"
        ]
    );
    let top = fish("qrexec-connect --");
    assert!(top.contains(&"--help".to_owned()), "{top:?}");
    // No daemon option anywhere, in any shell.
    for option in ["--qrexec-client-vm", "--max-connections", "--client-mode"] {
        assert!(!top.iter().any(|w| w.starts_with(option)), "fish: {top:?}");
        for file in [
            "qrexec-connect.bash",
            "_qrexec-connect",
            "qrexec-connect.fish",
        ] {
            let text = std::fs::read_to_string(Path::new(DIR).join(file)).unwrap();
            let spelled = option.trim_start_matches("--");
            assert!(
                !text.contains(option) && !text.contains(&format!("-l {spelled}")),
                "{file} offers the daemon's {option}"
            );
        }
    }
}

#[test]
fn a_command_after_debug_or_help_is_still_found() {
    assert_eq!(
        bash(
            "_qrexec_connect",
            &["qrexec-connect", "-d", "status", "--j"]
        ),
        ["--json"]
    );
    assert_eq!(
        bash("_qrexec_connect", &["qrexec-connect", "help", "po"]),
        ["policy"]
    );
    assert_eq!(
        bash(
            "_qrexec_connect",
            &["qrexec-connect", "policy", "--source", ""]
        ),
        Vec::<String>::new()
    );
    assert!(fish("qrexec-connect help ").contains(&"status".to_owned()));
}

#[test]
fn bash_completes_commands_options_and_values() {
    assert_eq!(
        bash("_qrexec_connect", &["qrexec-connect", "st"]),
        ["status"]
    );
    assert_eq!(
        bash("_qrexec_connect", &["qrexec-connect", "status", "--j"]),
        ["--json"]
    );
    assert_eq!(
        bash("_qrexec_connect", &["qrexec-connect", "reconcile", "--r"]),
        ["--runtime-dir="]
    );
    assert_eq!(
        bash(
            "_qrexec_connect_generator",
            &["qrexec-connect-generator", "--ch"]
        ),
        ["--check"]
    );
}

#[test]
fn fish_completes_commands_and_options() {
    assert!(fish("qrexec-connect po").contains(&"policy".to_owned()));
    assert!(fish("qrexec-connect status --").contains(&"--json".to_owned()));
    assert!(fish("qrexec-connect-generator --c").contains(&"--check".to_owned()));
}

#[test]
fn zsh_parses_the_completion() {
    let output = run(Command::new("zsh")
        .arg("-n")
        .arg(Path::new(DIR).join("_qrexec-connect")));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(Path::new(DIR).join("_qrexec-connect")).unwrap();
    assert!(text.starts_with("#compdef qrexec-connect qrexec-connect-generator"));
}
