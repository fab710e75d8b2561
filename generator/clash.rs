//! `--check` asks the user manager whether another `qrexec-connect-*.socket`
//! unit (a hand-written one, as the Python qrexec-connect had users write,
//! or a generated one whose line is gone) listens on the address of a
//! config line, by the binding crate's one rule of when two addresses are
//! one ([`addresses_collide`]: `[::]:2222`, which systemd shows for a bare
//! `ListenStream=2222`, takes `127.0.0.1:2222` too). Only one of the two
//! sockets can bind it: whichever starts
//! second fails, and `enable --now` of the generated one fails with an
//! error that names neither. Only `--check` asks, never the generator run:
//! a generator must not talk to the manager that runs it.
//!
//! The manager's answer is parsed here with the little this needs
//! (`Id=`, `Listen=`, `FragmentPath=` blocks);
//! `src/bin/qrexec-connect/managing/manager.rs` has the full parsing for the
//! daemon's side. It is duplicated
//! rather than shared so that the generator keeps its small dependency
//! set. systemctl C-escapes `Listen=` (`\\`, `\ooo`, `\xNN`), undone by
//! [`unescape`]; `Id=` and `FragmentPath=` it prints as they are, and a
//! unit name's own `\x2d` must stay as it is.

use std::fmt;
use std::process::{Command, Stdio};

use qrexec_connect_binding::address::{ListenAddress, Specifiers};
use qrexec_connect_binding::collision::addresses_collide;
use qrexec_connect_generator::config::{printable, Binding, Location};

/// A config line and another unit listening on the same address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clash {
    pub at: Location,
    pub address: String,
    pub unit: String,
    /// The unit's file, or empty when the manager did not say.
    pub fragment: String,
    /// Generated (from a line that is gone): daemon-reload removes it.
    pub generated: bool,
    /// The line as a binding, `LISTEN TARGET SERVICE`, made printable.
    pub text: String,
}

impl fmt::Display for Clash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Clash {
            at, address, unit, ..
        } = self;
        let file = if self.fragment.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.fragment)
        };
        write!(
            f,
            "{at}: {unit}{file} already listens on {address}: only one socket can have it, \
             and this line's fails while that one listens; "
        )?;
        if self.generated {
            write!(
                f,
                "it was generated from a line that is gone: run 'systemctl --user daemon-reload'"
            )
        } else {
            write!(
                f,
                "if this line replaces it, run 'systemctl --user disable --now {unit}'"
            )
        }
    }
}

/// The clashes of `bindings` with the socket units the user manager has
/// loaded; `Err` says why the manager could not be asked.
pub fn clashes(bindings: &[Binding], specifiers: &Specifiers) -> Result<Vec<Clash>, String> {
    let output = Command::new("systemctl")
        .args([
            "--user",
            "--no-pager",
            "show",
            "-p",
            "Id,Listen,FragmentPath,ActiveState,UnitFileState",
            "--",
            "qrexec-connect-*.socket",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    if !output.status.success() {
        return Err("the user manager cannot be asked (systemctl --user failed)".into());
    }
    let units = parse_show(&String::from_utf8_lossy(&output.stdout));
    let mut found = Vec::new();
    for binding in bindings {
        let address = systemd_address(binding.listen(), specifiers);
        for unit in &units {
            // The unit's own address, as the user should look for it:
            // `[::]:2222` for its `ListenStream=2222`.
            let Some(theirs) = unit.listens.iter().find(|l| addresses_collide(l, &address)) else {
                continue;
            };
            // The line's own unit, or another line's, is not a clash.
            if unit.id == binding.unit_name() || !unit.holds_or_will_hold() {
                continue;
            }
            let address = if *theirs == address {
                address.clone()
            } else {
                format!("{theirs} (which takes {address} too)")
            };
            found.push(Clash {
                at: binding.source().clone(),
                address: printable(address.as_bytes()),
                unit: printable(unit.id.as_bytes()),
                fragment: printable(unit.fragment.as_bytes()),
                generated: unit.fragment.contains("/systemd/generator"),
                text: printable(format!("{} {}", binding.listen(), binding.fd_name()).as_bytes()),
            });
        }
    }
    // Another line's unit: that line is in the config, and the generator
    // already refuses two lines with one LISTEN.
    let ours: Vec<&str> = bindings.iter().map(Binding::unit_name).collect();
    found.retain(|clash| !ours.contains(&clash.unit.as_str()));
    Ok(found)
}

/// The address as `systemctl show -p Listen` writes it, without the
/// ` (Stream)`: a path expanded, a TCP address as written.
fn systemd_address(listen: &ListenAddress, specifiers: &Specifiers) -> String {
    match listen.expanded_path(specifiers) {
        Some(path) => String::from_utf8_lossy(&path).into_owned(),
        None => listen.to_string(),
    }
}

/// One unit of `systemctl show`'s answer.
#[derive(Debug, Default, PartialEq, Eq)]
struct ShownUnit {
    id: String,
    /// Addresses, without the ` (Stream)` that follows each.
    listens: Vec<String>,
    fragment: String,
    active_state: String,
    unit_file_state: String,
}

impl ShownUnit {
    /// Listening now, or enabled (it will listen at the next login): a
    /// unit stopped and disabled but still loaded takes nothing.
    fn holds_or_will_hold(&self) -> bool {
        matches!(
            self.active_state.as_str(),
            "active" | "activating" | "reloading"
        ) || self.unit_file_state.starts_with("enabled")
            || self.fragment.contains("/systemd/generator")
    }
}

/// `systemctl show` output: blocks of `NAME=VALUE` lines, one per unit,
/// separated by blank lines; `Listen=` once per address.
fn parse_show(text: &str) -> Vec<ShownUnit> {
    let mut units = Vec::new();
    let mut unit = ShownUnit::default();
    for line in text.lines().chain([""]) {
        if line.is_empty() {
            if !unit.id.is_empty() {
                units.push(std::mem::take(&mut unit));
            }
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        // Only `Listen=` is C-escaped; the other properties are printed as
        // they are, and a unit name's own `\x2d` must stay (issue 17).
        let value = value.to_owned();
        match name {
            "Id" => unit.id = value,
            "FragmentPath" => unit.fragment = value,
            "ActiveState" => unit.active_state = value,
            "UnitFileState" => unit.unit_file_state = value,
            "Listen" => {
                let value = unescape(&value);
                let address = value
                    .rsplit_once(" (")
                    .map_or(value.as_str(), |(address, _)| address);
                unit.listens.push(address.to_owned());
            }
            _ => {}
        }
    }
    units
}

/// A value as systemctl C-escapes it, back to its text: `\\`, `\ooo`
/// (252) and `\xNN` (later); other escapes stay as they are.
fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let octal = rest.len() >= 4
            && rest[0] == b'\\'
            && (b'0'..=b'3').contains(&rest[1])
            && rest[2..4].iter().all(|b| (b'0'..=b'7').contains(b));
        let hex = rest.len() >= 4
            && rest.starts_with(b"\\x")
            && rest[2..4].iter().all(u8::is_ascii_hexdigit);
        if octal {
            out.push((rest[1] - b'0') * 64 + (rest[2] - b'0') * 8 + (rest[3] - b'0'));
            i += 4;
        } else if hex {
            let digits = std::str::from_utf8(&rest[2..4]).unwrap_or("0");
            out.push(u8::from_str_radix(digits, 16).unwrap_or(0));
            i += 4;
        } else if rest.starts_with(b"\\\\") {
            out.push(b'\\');
            i += 2;
        } else {
            out.push(rest[0]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_output_is_parsed_per_unit() {
        // As systemd 252 prints `show -p Id,Listen,FragmentPath` for two units.
        let text = "Id=qrexec-connect-old.socket\n\
                    Listen=127.0.0.1:2222 (Stream)\n\
                    Listen=/run/user/1000/a\\\\b\\303\\251 (Stream)\n\
                    FragmentPath=/home/user/.config/systemd/user/qrexec-connect-old.socket\n\
                    \n\
                    Id=qrexec-connect-x.socket\n\
                    FragmentPath=\n";
        assert_eq!(
            parse_show(text),
            [
                ShownUnit {
                    id: "qrexec-connect-old.socket".into(),
                    listens: vec!["127.0.0.1:2222".into(), "/run/user/1000/a\\b\u{e9}".into()],
                    fragment: "/home/user/.config/systemd/user/qrexec-connect-old.socket".into(),
                    ..ShownUnit::default()
                },
                ShownUnit {
                    id: "qrexec-connect-x.socket".into(),
                    listens: vec![],
                    fragment: String::new(),
                    ..ShownUnit::default()
                },
            ]
        );
        assert_eq!(unescape("a\\x41\\q\\"), "aA\\q\\");
    }
}
