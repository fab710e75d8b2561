//! The user manager, through `systemctl --user`: the interface systemd
//! documents for scripts, used by `reconcile`, `recover` and `status`.
//!
//! One `list-units` call is cheap (about 15 ms for 400 sockets); `show` asks
//! the manager about each unit in turn (about 3 ms a unit), so callers ask
//! it only about the units they need.

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
