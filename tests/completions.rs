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

/// The options and commands a program's `--help` names.
fn help_words(program: Program) -> Vec<String> {
    let help = stdout(Command::new(program).arg("--help"));
    // Options are the first column of lines that start with a dash.
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
    for command in ["status", "policy", "reconcile", "recover"] {
        if help.contains(&format!("qrexec-connect {command}")) {
            words.push(command.to_owned());
        }
    }
    words.sort();
    words.dedup();
    words
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
        let words = help_words(program);
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
        bash("_qrexec_connect", &["qrexec-connect", "--client-mode=p"]),
        ["pipe"]
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
