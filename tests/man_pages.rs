//! Every man page builds from its scdoc source and renders without a
//! warning, and documents every message a user can meet.

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
