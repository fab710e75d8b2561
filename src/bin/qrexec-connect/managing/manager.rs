//! The user manager, through `systemctl --user`: the interface systemd
//! documents for scripts, used by `reconcile`, `recover` and `status`.
//!
//! One `list-units` call is cheap (about 15 ms for 400 sockets); `show` asks
//! the manager about each unit in turn (about 3 ms a unit), so callers ask
//! it only about the units they need.
//!
//! How systemctl prints what we read (systemd 252, docs/systemd-facts.md
//! item 16): `list-units --plain` and single-valued `show` properties (`Id=`,
//! `Listen=`, `FileDescriptorName=`, paths) are raw text, but a list property
//! (`Wants=`, `Names=`, `Triggers=`) quotes each word that needs it for a
//! shell, and every unit name with an escape (`\x2d`) needs it. Such values
//! are read with [`list_property`] / [`split_list`], never split by hand.
//! Today only reconcile reads one (`sockets.target`'s `Wants=`); recover and
//! status read `list-units` and single-valued properties only.

use std::io;
use std::process::Command;

/// Runs `systemctl --user ARGS`; its output, or an error with its stderr.
pub fn systemctl(args: &[&str]) -> io::Result<String> {
    let output = Command::new("systemctl")
        .arg("--user")
        .arg("--no-pager")
        .args(args)
        .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "systemctl --user {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One `qrexec-connect-*.socket` unit as `list-units` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedUnit {
    pub name: String,
    pub load_state: String,
    pub active_state: String,
}

/// Every `qrexec-connect-*.socket` unit the manager knows, loaded or not.
pub fn socket_units() -> io::Result<Vec<ListedUnit>> {
    let text = systemctl(&[
        "list-units",
        "--all",
        "--plain",
        "--no-legend",
        "--full",
        "--type=socket",
        "qrexec-connect-*.socket",
    ])?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut columns = line.split_whitespace();
            Some(ListedUnit {
                name: columns.next()?.to_owned(),
                load_state: columns.next()?.to_owned(),
                active_state: columns.next()?.to_owned(),
            })
        })
        .collect())
}

/// What reconcile and `policy` ask `show` about a socket unit: its state,
/// addresses and fd name (`policy` adds `FragmentPath`).
pub const SOCKET_PROPERTIES: [&str; 5] = [
    "Id",
    "LoadState",
    "ActiveState",
    "Listen",
    "FileDescriptorName",
];

/// `systemctl show -p P... -- UNITS`: one block of `KEY=VALUE` lines per
/// unit, separated by blank lines (nothing for no units).
pub fn show(properties: &[&str], units: &[&str]) -> io::Result<String> {
    if units.is_empty() {
        return Ok(String::new());
    }
    let mut args = vec!["show"];
    for property in properties {
        args.extend(["-p", property]);
    }
    args.push("--");
    args.extend(units);
    systemctl(&args)
}

/// A list property of one unit (`Wants`, `Names`, ...), each word as the
/// manager holds it: systemctl's quoting undone ([`split_list`]).
pub fn list_property(unit: &str, name: &str) -> io::Result<Vec<String>> {
    Ok(split_list(&systemctl(&[
        "show", "-p", name, "--value", "--", unit,
    ])?))
}

/// Splits a list property's value as `systemctl show` prints it: words
/// separated by spaces; a word holding a space, a `\`, a quote or another
/// character special to a shell (or a control character) is printed between
/// double quotes, where `\`, `"`, `` ` `` and `$` have a `\` before them and
/// control characters are C escapes (`\t`, `\001` in 252, `\x01` in later
/// versions). Text outside quotes is taken as it is.
pub fn split_list(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut bytes = text.bytes().peekable();
    loop {
        while bytes.next_if(u8::is_ascii_whitespace).is_some() {}
        if bytes.peek().is_none() {
            return words;
        }
        let mut word = Vec::new();
        let mut quoted = false;
        while let Some(byte) = bytes.next() {
            match byte {
                b'"' => quoted = !quoted,
                b'\\' if quoted => word.extend(unescape(&mut bytes)),
                byte if !quoted && byte.is_ascii_whitespace() => break,
                byte => word.push(byte),
            }
        }
        words.push(String::from_utf8_lossy(&word).into_owned());
    }
}

/// A single value as `systemctl show` C-escapes it (`Listen=` always is:
/// `\\` for a backslash, `\ooo` for each byte outside printable ASCII),
/// back to the exact text; an escape systemd does not write stays as it is.
pub fn unescape_value(text: &str) -> String {
    let mut bytes = text.bytes().peekable();
    let mut out = Vec::with_capacity(text.len());
    while let Some(byte) = bytes.next() {
        match byte {
            b'\\' => out.extend(unescape(&mut bytes)),
            byte => out.push(byte),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The bytes one escape inside double quotes stands for, its `\` already
/// taken; an escape systemd does not write is kept as it is.
fn unescape(bytes: &mut std::iter::Peekable<impl Iterator<Item = u8>>) -> Vec<u8> {
    let Some(byte) = bytes.next() else {
        return vec![b'\\'];
    };
    let (radix, mut value) = match byte {
        b'a' => return vec![0x07],
        b'b' => return vec![0x08],
        b'f' => return vec![0x0c],
        b'n' => return vec![b'\n'],
        b'r' => return vec![b'\r'],
        b't' => return vec![b'\t'],
        b'v' => return vec![0x0b],
        b'\\' | b'"' | b'`' | b'$' | b'\'' => return vec![byte],
        b'x' => (16, 0),
        // Three octal digits, the first at most 3: at most 0o377.
        b'0'..=b'3' => (8, u32::from(byte - b'0')),
        other => return vec![b'\\', other],
    };
    let mut taken = vec![b'\\', byte];
    for _ in 0..2 {
        let Some(digit) = bytes.next_if(|b| char::from(*b).is_digit(radix)) else {
            return taken;
        };
        taken.push(digit);
        value = value * radix + char::from(digit).to_digit(radix).unwrap_or(0);
    }
    vec![value as u8]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wanted_units_with_escapes_are_unquoted() {
        // As systemd 252 printed `show -p Wants --value sockets.target`.
        let text = "gpg-agent.socket \"qrexec-connect-abs-a\\\\x2db.socket\" \
                    qrexec-connect-127.0.0.1:2222.socket \
                    \"qrexec-connect-runtime-qrexec\\\\x2dconnect-my\\\\x2dagent.socket\"\n";
        assert_eq!(
            split_list(text),
            [
                "gpg-agent.socket",
                "qrexec-connect-abs-a\\x2db.socket",
                "qrexec-connect-127.0.0.1:2222.socket",
                "qrexec-connect-runtime-qrexec\\x2dconnect-my\\x2dagent.socket",
            ]
        );
        assert!(split_list("\n").is_empty());
    }

    #[test]
    fn every_escape_systemctl_writes_is_undone() {
        // As systemd 252 printed an `Environment=` list holding a space, the
        // characters it escapes, a tab, control characters (octal),
        // non-ASCII text, and shell characters it only quotes.
        let text = "\"A=a b\" \"B=q\\\"d\\$e\\`f\\\\g'h\" \"C=tab\\there\" \
                    \"D=ctl\\001x\\177y\" E=\u{e9}\u{20ac} F=plain \"G=semi;<>|&!()*?[]#~=\"\n";
        assert_eq!(
            split_list(text),
            [
                "A=a b",
                "B=q\"d$e`f\\g'h",
                "C=tab\there",
                "D=ctl\u{1}x\u{7f}y",
                "E=\u{e9}\u{20ac}",
                "F=plain",
                "G=semi;<>|&!()*?[]#~=",
            ]
        );
        // Later versions write control characters in hex.
        assert_eq!(split_list("\"a\\x01\\x7F b\""), ["a\u{1}\u{7f} b"]);
        // Escapes systemd never writes stay as they are.
        assert_eq!(split_list("\"\\q \\x4 \\08 \\"), ["\\q \\x4 \\08 \\"]);
    }

    /// Quotes one word the way systemd's `shell_maybe_quote` does for
    /// `systemctl show` (octal for control characters, as in 252).
    fn quote_like_systemctl(word: &str) -> String {
        let needs_quotes = word
            .chars()
            .any(|c| c.is_ascii_control() || " \t\n\r\"\\`$*?[]'()<>|&;!".contains(c));
        if !needs_quotes {
            return word.to_owned();
        }
        let mut out = String::from("\"");
        for c in word.chars() {
            match c {
                '\\' | '"' | '`' | '$' => {
                    out.push('\\');
                    out.push(c);
                }
                '\u{7}' => out += "\\a",
                '\u{8}' => out += "\\b",
                '\u{c}' => out += "\\f",
                '\n' => out += "\\n",
                '\r' => out += "\\r",
                '\t' => out += "\\t",
                '\u{b}' => out += "\\v",
                c if c.is_ascii_control() => out += &format!("\\{:03o}", c as u32),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    proptest! {
        #[test]
        fn a_quoted_list_splits_back_into_its_words(
            words in prop::collection::vec("[^\u{0}]{1,20}", 0..6)
        ) {
            let text: Vec<String> = words.iter().map(|w| quote_like_systemctl(w)).collect();
            prop_assert_eq!(split_list(&(text.join(" ") + "\n")), words);
        }

        #[test]
        fn any_text_splits_without_panic_or_growth(text in any::<String>()) {
            let words = split_list(&text);
            prop_assert!(words.iter().map(String::len).sum::<usize>() <= text.len() * 3);
        }
    }
}
