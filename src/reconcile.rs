//! Making `systemctl --user daemon-reload` apply binding changes.
//!
//! systemd reloads unit files but, by itself, starts no new socket, stops
//! no socket whose unit is gone, and never changes the fds a running
//! service holds (shared/reference/systemd-facts.md, items 1-4). So:
//!
//! 1. the generator raises a flag file on each run, outside its output dir;
//! 2. `qrexec-connect-reconcile.path` (`PathExists=` on the flag) starts
//!    `qrexec-connect-reconcile.service` after every reload (item 6);
//! 3. that runs [`run`]: compare what the units say now with what was
//!    applied last time (a small state file in `$XDG_RUNTIME_DIR`), and
//!    only if something differs: stop the daemon (its connections are
//!    separate processes and live on, `KillMode=process`), stop sockets
//!    whose unit is gone, restart sockets whose address changed, start new
//!    ones. The next connection starts the daemon again with the current
//!    set of sockets and names.
//!
//! A reload that changes nothing touches nothing and logs nothing.
//!
//! This talks to the manager through `systemctl`, the interface systemd
//! documents for scripts; the calls are few (one `list-units`, one `show`,
//! and only for a change, one per action).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The daemon every binding socket feeds.
pub const SERVICE: &str = "qrexec-connect.service";
/// Our directory under `$XDG_RUNTIME_DIR` (`%t`).
pub const RUNTIME_SUBDIR: &str = "qrexec-connect";
/// Flag file the generator creates in [`RUNTIME_SUBDIR`], outside its output
/// directory on purpose: a `.path` unit with `PathExists=` on it fires after
/// every daemon-reload, which a path in the output directory does not. The
/// path unit spells it `%t/qrexec-connect/reload-requested`.
pub const FLAG_FILE: &str = "reload-requested";
/// What the last run applied, in [`RUNTIME_SUBDIR`].
pub const STATE_FILE: &str = "applied";

/// What matters of one socket unit for the daemon: its addresses and name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SocketConfig {
    pub listen: String,
    pub fd_name: String,
}

/// One `qrexec-connect-*.socket` unit as the manager sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketUnit {
    pub name: String,
    pub load_state: String,
    pub active_state: String,
    pub config: SocketConfig,
}

impl SocketUnit {
    fn is_active(&self) -> bool {
        matches!(
            self.active_state.as_str(),
            "active" | "reloading" | "activating"
        )
    }
    fn is_loaded(&self) -> bool {
        self.load_state == "loaded"
    }
}

/// What to do, decided from the current units, the wanted set and the last
/// applied state. Pure, so it can be tested without a manager.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub stop_daemon: bool,
    pub stop: Vec<String>,
    pub restart: Vec<String>,
    pub start: Vec<String>,
    /// Sockets whose only change is `FileDescriptorName=` (a daemon restart
    /// is enough).
    pub renamed: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        !self.stop_daemon
            && self.stop.is_empty()
            && self.restart.is_empty()
            && self.start.is_empty()
            && self.renamed.is_empty()
    }
}

/// Decides the actions. `wanted` lists the units `sockets.target` wants;
/// `applied` is the config each active socket had when last applied (a
/// socket missing there is taken as applied as it is now: a first run
/// after login changes nothing).
pub fn plan(
    units: &[SocketUnit],
    wanted: &[String],
    applied: &BTreeMap<String, SocketConfig>,
    daemon_active: bool,
) -> Plan {
    let mut plan = Plan::default();
    for unit in units {
        if unit.is_active() {
            if !unit.is_loaded() {
                plan.stop.push(unit.name.clone()); // its file is gone or masked
                continue;
            }
            let Some(before) = applied.get(&unit.name) else {
                continue;
            };
            if before.listen != unit.config.listen {
                plan.restart.push(unit.name.clone());
            } else if before.fd_name != unit.config.fd_name {
                plan.renamed.push(unit.name.clone());
            }
        } else if unit.is_loaded() && wanted.contains(&unit.name) {
            plan.start.push(unit.name.clone());
        }
    }
    // A new socket cannot start while the daemon runs, a removed one keeps
    // accepting through the daemon's copy, a changed one keeps its old fd or
    // name there: in every case the daemon must let go of its fds.
    plan.stop_daemon = daemon_active
        && !(plan.stop.is_empty()
            && plan.restart.is_empty()
            && plan.start.is_empty()
            && plan.renamed.is_empty());
    plan
}

/// Parses `systemctl show` output for several units (blocks separated by
/// blank lines) into socket units.
pub fn parse_show(text: &str) -> Vec<SocketUnit> {
    let mut units = Vec::new();
    for block in text.split("\n\n") {
        let mut unit = SocketUnit {
            name: String::new(),
            load_state: String::new(),
            active_state: String::new(),
            config: SocketConfig::default(),
        };
        let mut listens = Vec::new();
        for line in block.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "Id" => unit.name = value.to_owned(),
                "LoadState" => unit.load_state = value.to_owned(),
                "ActiveState" => unit.active_state = value.to_owned(),
                "Listen" => listens.push(value.to_owned()),
                "FileDescriptorName" => unit.config.fd_name = value.to_owned(),
                _ => {}
            }
        }
        unit.config.listen = listens.join(" ");
        if !unit.name.is_empty() {
            units.push(unit);
        }
    }
    units
}

/// Reads the state file: `UNIT<TAB>LISTEN<TAB>FDNAME` lines.
pub fn parse_state(text: &str) -> BTreeMap<String, SocketConfig> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, '\t');
            let name = fields.next()?.to_owned();
            let listen = fields.next()?.to_owned();
            let fd_name = fields.next()?.to_owned();
            Some((name, SocketConfig { listen, fd_name }))
        })
        .collect()
}

/// Writes the state of every active (or just started) socket.
pub fn format_state(units: &[SocketUnit], started: &[String]) -> String {
    let mut text = String::new();
    for unit in units {
        if unit.is_loaded() && (unit.is_active() || started.contains(&unit.name)) {
            let _ = writeln!(
                text,
                "{}\t{}\t{}",
                unit.name, unit.config.listen, unit.config.fd_name
            );
        }
    }
    text
}

/// Runs one reconcile pass against the user manager. Messages go to
/// stdout with syslog priority prefixes (the unit sets LogLevelMax=notice,
/// so only what we print at notice or above reaches the journal).
pub fn run() -> io::Result<()> {
    let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .ok_or_else(|| io::Error::other("XDG_RUNTIME_DIR is not set"))?;
    // Lower the flag first: a reload while we work raises it again and the
    // path unit runs us once more.
    let dir = runtime_dir.join(RUNTIME_SUBDIR);
    match std::fs::remove_file(dir.join(FLAG_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let names = list_socket_units()?;
    let units = if names.is_empty() {
        Vec::new()
    } else {
        let mut args = vec![
            "show",
            "-p",
            "Id",
            "-p",
            "LoadState",
            "-p",
            "ActiveState",
            "-p",
            "Listen",
            "-p",
            "FileDescriptorName",
            "--",
        ];
        args.extend(names.iter().map(String::as_str));
        parse_show(&systemctl(&args)?)
    };
    let wanted: Vec<String> = systemctl(&["show", "-p", "Wants", "--value", "sockets.target"])?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let daemon_active =
        systemctl(&["show", "-p", "ActiveState", "--value", SERVICE])?.trim() == "active";
    let state_path = dir.join(STATE_FILE);
    let applied = match std::fs::read_to_string(&state_path) {
        Ok(text) => parse_state(&text),
        Err(_) => BTreeMap::new(),
    };
    let plan = plan(&units, &wanted, &applied, daemon_active);
    if !plan.is_empty() {
        apply(&plan)?;
    }
    write_atomically(&state_path, &format_state(&units, &plan.start))
}

fn apply(plan: &Plan) -> io::Result<()> {
    let mut done = Vec::new();
    if plan.stop_daemon {
        systemctl(&["--quiet", "stop", SERVICE])?;
        done.push(format!(
            "stopped {SERVICE} so it picks up the change (live connections continue)"
        ));
    }
    if !plan.stop.is_empty() {
        let mut args = vec!["--quiet", "stop", "--"];
        args.extend(plan.stop.iter().map(String::as_str));
        systemctl(&args)?;
        done.push(format!("stopped {}", plan.stop.join(", ")));
    }
    if !plan.restart.is_empty() {
        let mut args = vec!["restart", "--"];
        args.extend(plan.restart.iter().map(String::as_str));
        systemctl(&args)?;
        done.push(format!("restarted {}", plan.restart.join(", ")));
    }
    if !plan.renamed.is_empty() {
        done.push(format!(
            "new target/service for {}",
            plan.renamed.join(", ")
        ));
    }
    if !plan.start.is_empty() {
        let mut args = vec!["reset-failed", "--"];
        args.extend(plan.start.iter().map(String::as_str));
        let _ = systemctl(&args); // only clears a failed state, if any
                                  // Through the target rather than by name: a socket the user started
                                  // in the meantime (enable --now) is then left alone, whereas a start
                                  // job on it would pull in the handover oneshot and stop the daemon
                                  // again (systemd-facts.md, items 2 and 11).
        systemctl(&["start", "sockets.target"])?;
        done.push(format!("started {}", plan.start.join(", ")));
    }
    // <5> is syslog "notice": above the unit's LogLevelMax= filter.
    println!("<5>qrexec-connect reconcile: {}", done.join("; "));
    Ok(())
}

fn list_socket_units() -> io::Result<Vec<String>> {
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
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn systemctl(args: &[&str]) -> io::Result<String> {
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

fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, load: &str, active: &str, listen: &str, fd: &str) -> SocketUnit {
        SocketUnit {
            name: name.into(),
            load_state: load.into(),
            active_state: active.into(),
            config: SocketConfig {
                listen: listen.into(),
                fd_name: fd.into(),
            },
        }
    }

    fn applied(entries: &[(&str, &str, &str)]) -> BTreeMap<String, SocketConfig> {
        entries
            .iter()
            .map(|(n, l, f)| {
                (
                    n.to_string(),
                    SocketConfig {
                        listen: l.to_string(),
                        fd_name: f.to_string(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn no_change_means_no_action() {
        let units = [unit(
            "qrexec-connect-a.socket",
            "loaded",
            "active",
            "1:1 (Stream)",
            "x s",
        )];
        let plan = plan(
            &units,
            &["qrexec-connect-a.socket".into()],
            &applied(&[("qrexec-connect-a.socket", "1:1 (Stream)", "x s")]),
            true,
        );
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn each_kind_of_change_is_planned() {
        let units = [
            unit("qrexec-connect-gone.socket", "not-found", "active", "", ""),
            unit(
                "qrexec-connect-moved.socket",
                "loaded",
                "active",
                "new (Stream)",
                "x s",
            ),
            unit(
                "qrexec-connect-renamed.socket",
                "loaded",
                "active",
                "r (Stream)",
                "y s",
            ),
            unit(
                "qrexec-connect-new.socket",
                "loaded",
                "inactive",
                "n (Stream)",
                "x s",
            ),
            unit(
                "qrexec-connect-disabled.socket",
                "loaded",
                "inactive",
                "d (Stream)",
                "x s",
            ),
        ];
        let wanted: Vec<String> = ["moved", "renamed", "new"]
            .iter()
            .map(|n| format!("qrexec-connect-{n}.socket"))
            .collect();
        let before = applied(&[
            ("qrexec-connect-moved.socket", "old (Stream)", "x s"),
            ("qrexec-connect-renamed.socket", "r (Stream)", "x s"),
        ]);
        let plan = plan(&units, &wanted, &before, true);
        assert!(plan.stop_daemon);
        assert_eq!(plan.stop, ["qrexec-connect-gone.socket"]);
        assert_eq!(plan.restart, ["qrexec-connect-moved.socket"]);
        assert_eq!(plan.renamed, ["qrexec-connect-renamed.socket"]);
        assert_eq!(plan.start, ["qrexec-connect-new.socket"]);
    }

    #[test]
    fn show_output_and_state_round_trip() {
        let text = "Id=qrexec-connect-a.socket\nLoadState=loaded\nActiveState=active\n\
                    Listen=127.0.0.1:1 (Stream)\nFileDescriptorName=x s\n\n\
                    Id=qrexec-connect-b.socket\nLoadState=not-found\nActiveState=inactive\n\
                    FileDescriptorName=qrexec-connect-b.socket\n";
        let units = parse_show(text);
        assert_eq!(units.len(), 2);
        assert_eq!(units[0].config.listen, "127.0.0.1:1 (Stream)");
        let state = parse_state(&format_state(&units, &[]));
        assert_eq!(state.len(), 1);
        assert_eq!(state["qrexec-connect-a.socket"], units[0].config);
    }
}
