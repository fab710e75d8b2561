//! Every man page builds from its scdoc source and renders without a
//! warning, and documents every message a user can meet.

mod common;

use std::process::Command;

const PAGES: [&str; 4] = [
    "qrexec-connect.8",
    "qrexec-connect-generator.8",
    "qrexec-connect.conf.5",
    "qubes.ConnectNFS.8",
];

fn render(page: &str) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let made = Command::new("make")
        .args(["-s", "-C", dir, &format!("man/{page}")])
        .output()
        .expect("make runs");
    assert!(
        made.status.success(),
        "{page}: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let shown = Command::new("man")
        .args(["--warnings", "-l", &format!("{dir}/man/{page}")])
        .env("MANWIDTH", "80")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .expect("man runs");
    let warnings = String::from_utf8_lossy(&shown.stderr);
    assert!(
        shown.status.success() && warnings.trim().is_empty(),
        "{page}: {warnings}"
    );
    String::from_utf8_lossy(&shown.stdout).into_owned()
}

#[test]
fn every_page_renders_without_warnings() {
    for page in PAGES {
        let text = render(page);
        assert!(
            text.contains("NAME") && text.contains("SEE ALSO"),
            "{page}:\n{text}"
        );
    }
}

#[test]
fn the_daemon_page_lists_the_messages_it_logs() {
    let text = render("qrexec-connect.8")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for message in [
        "refused by qrexec policy",
        "service not found",
        "qrexec could not start the call",
        "invalid FileDescriptorName=",
        "not a stream socket",
        "must be started by systemd socket activation",
        "--max-connections limit",
        "cannot accept a connection",
        "cannot start the splicer",
        "log messages were dropped",
        "restarting the binding sockets",
        "the reload watcher",
    ] {
        assert!(
            text.contains(message),
            "qrexec-connect(8) does not mention {message:?}"
        );
    }
}

/// scdoc's `_underline_` only works at word boundaries: elsewhere the
/// underscores are printed as they are (`_SECONDS_s`, `U+_XXXX_`). The
/// rendered text must show no such stray underscore, and every option must
/// be described.
#[test]
fn rendered_pages_show_no_markup_and_describe_every_option() {
    for page in PAGES {
        let text = render(page);
        let chars: Vec<char> = text.chars().collect();
        let name = |c: Option<&char>| c.is_some_and(|c| c.is_alphanumeric() || *c == '_');
        for i in 0..chars.len() {
            if chars[i] != '_' {
                continue;
            }
            let (before, after) = (
                i.checked_sub(1).and_then(|j| chars.get(j)),
                chars.get(i + 1),
            );
            // Half glued to a word (`RESULT_"`, `+_ADDRESS`); a lone `_`
            // between spaces or commas is the character itself.
            let half = name(before) != name(after);
            // An uppercase placeholder glued to lowercase (`SECONDS_s`).
            let glued =
                before.is_some_and(|c| c.is_uppercase()) && after.is_some_and(|c| c.is_lowercase());
            let stray = half || glued;
            if stray {
                let line = text[..text.char_indices().nth(i).unwrap().0]
                    .lines()
                    .count();
                panic!(
                    "{page}, line {line}: stray underscore in {:?}",
                    text.lines().nth(line.saturating_sub(1)).unwrap_or("")
                );
            }
        }
    }
    for page in ["qrexec-connect.8", "qrexec-connect-generator.8"] {
        let text = render(page);
        for option in ["-h, --help", "-V, --version"] {
            let at = text
                .find(option)
                .unwrap_or_else(|| panic!("{page} does not list {option}"));
            let next = text[at..].lines().nth(1).unwrap_or("");
            assert!(
                !next.trim().is_empty(),
                "{page}: {option} has no description"
            );
        }
    }
}

/// The lines of a rendered page between the heading `name` and the next
/// heading (a line that starts in column 0).
fn page_section<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|line| *line != name)
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with(' '))
        .collect()
}

/// Whether some line of `lines` starts with `word` (then a space or its end).
fn starts_a_line(lines: &[&str], word: &str) -> bool {
    lines.iter().any(|line| {
        line.trim_start()
            .strip_prefix(word)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
    })
}

/// Every command `qrexec-connect --help` lists (users' and systemd's) has
/// its entry in the COMMANDS section of qrexec-connect(8), so a command
/// added to the help cannot be missing from the page.
#[test]
fn the_daemon_page_describes_every_command_of_its_help() {
    let help = common::run(Command::new(common::DAEMON.path()).arg("--help"));
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    // A command's line: two spaces, then a lowercase word (options start
    // with '-'; descriptions are indented further).
    let commands: Vec<&str> = help
        .lines()
        .filter_map(|line| line.strip_prefix("  "))
        .filter(|rest| rest.starts_with(|c: char| c.is_ascii_lowercase()))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert!(
        commands.contains(&"status") && commands.contains(&"reconcile"),
        "no commands found in --help:\n{help}"
    );
    let text = render("qrexec-connect.8");
    let section = page_section(&text, "COMMANDS");
    for command in commands {
        assert!(
            starts_a_line(&section, command),
            "qrexec-connect(8) has no entry for the command {command:?} in COMMANDS:\n{}",
            section.join("\n")
        );
    }
}

/// Every state `status` can print, as the code names them (the words of
/// `State::word` in status.rs), is explained in qrexec-connect(8).
#[test]
fn the_daemon_page_explains_every_state_status_prints() {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../src/bin/qrexec-connect/managing/status.rs"
    ))
    .unwrap();
    let words = source
        .split_once("fn word(&self)")
        .expect("status.rs names its states in State::word")
        .1
        .split_once("\n    }\n")
        .unwrap()
        .0;
    let states: Vec<&str> = words
        .lines()
        .filter(|line| line.trim_start().starts_with("State::"))
        .filter_map(|line| line.split('"').nth(1))
        .collect();
    assert!(
        states.len() >= 8 && states.contains(&"listening"),
        "the states were not found in status.rs: {states:?}"
    );
    let text = render("qrexec-connect.8");
    let section = page_section(&text, "STATUS");
    for state in states {
        assert!(
            starts_a_line(&section, state),
            "qrexec-connect(8) does not explain the state {state:?} in STATUS:\n{}",
            section.join("\n")
        );
    }
}
