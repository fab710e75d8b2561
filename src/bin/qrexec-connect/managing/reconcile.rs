//! Making `systemctl --user daemon-reload` apply binding changes.
//!
//! systemd reloads unit files but, by itself, starts no new socket, stops
//! no socket whose unit is gone, and never changes the fds a running
//! service holds (docs/systemd-facts.md). So:
//!
//! 1. the generator raises a flag file on each run, outside its output dir
//!    (in [`RuntimeDir`], shared with the generator);
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
//! A reload that changes nothing touches nothing and logs nothing. The state
//! file only ever records what the manager reports after the actions, so a
//! change that was not applied is tried again by the next run.
//!
//! This talks to the manager through `systemctl`, the interface systemd
//! documents for scripts. A reload that changes nothing costs one
//! `list-units`: the generated units' settings come from the generator's
//! record of what it wrote, and `systemctl show` (about 3 ms a unit, 1.3 s
//! for 400) is only run for hand-written units. A change adds one call per
//! action.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;

use serde::{Deserialize, Serialize};

use super::manager::{self, systemctl};

use qrexec_connect_binding::runtime_dir::{RuntimeDir, GENERATED_FILE, STATE_FILE};

/// The daemon every binding socket feeds.
pub const SERVICE: &str = "qrexec-connect.service";

/// What matters of one socket unit for the daemon: its addresses and name.
/// One section of the state file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
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
/// after login changes nothing). `daemon_state` is the daemon's
/// `ActiveState`.
pub fn plan(
    units: &[SocketUnit],
    wanted: &[String],
    applied: &BTreeMap<String, SocketConfig>,
    daemon_state: &str,
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
    // name there: in every case the daemon must let go of its fds. It holds
    // them from the moment it is started, not from when it reports ready,
    // so every state but inactive and failed counts as running
    // ("activating" while it probes its client, "deactivating", ...).
    plan.stop_daemon = daemon_holds_sockets(daemon_state)
        && !(plan.stop.is_empty()
            && plan.restart.is_empty()
            && plan.start.is_empty()
            && plan.renamed.is_empty());
    plan
}

/// Whether a daemon in this `ActiveState` may hold socket fds.
pub fn daemon_holds_sockets(active_state: &str) -> bool {
    !matches!(active_state, "inactive" | "failed" | "")
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
            // Space around a value means nothing to systemd or to us (an fd
            // name is split into words), and the INI state file trims it.
            let value = value.trim();
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

/// Reads the state file. One INI section per socket unit:
///
/// ```ini
/// [qrexec-connect-127.0.0.1:2222.socket]
/// listen=127.0.0.1:2222 (Stream)
/// fd_name=ssh-server qubes.ConnectTCP+22
/// ```
///
/// A file that does not parse (edited by hand, cut short) counts as empty:
/// like a first run, that changes nothing, and the next write replaces it.
pub fn parse_state(text: &str) -> BTreeMap<String, SocketConfig> {
    serde_ini::from_str(text).unwrap_or_default()
}

/// Writes the state of every socket that is loaded and active, with LF line
/// ends (serde_ini's default is CRLF; its writer takes the choice).
pub fn format_state(units: &[SocketUnit]) -> String {
    let state: BTreeMap<&str, &SocketConfig> = units
        .iter()
        .filter(|unit| unit.is_loaded() && unit.is_active())
        .map(|unit| (unit.name.as_str(), &unit.config))
        .collect();
    let mut text = Vec::new();
    let writer = serde_ini::Writer::new(&mut text, serde_ini::LineEnding::Linefeed);
    // Strings into a Vec: serialization cannot fail.
    let _ = state.serialize(&mut serde_ini::Serializer::new(writer));
    String::from_utf8(text).unwrap_or_default()
}

/// Runs one reconcile pass against the user manager. Messages go to
/// stdout with syslog priority prefixes (the unit sets LogLevelMax=notice,
/// so only what we print at notice or above reaches the journal).
///
/// `runtime_dir` is `%t` as the unit passes it (`--runtime-dir=%t`), so the
/// flag is found even where `$XDG_RUNTIME_DIR` is missing from our
/// environment; without it, the variable is used.
pub fn run(runtime_dir: Option<OsString>) -> io::Result<()> {
    // Lower the flag before anything else can fail: a flag left raised
    // makes the path unit start us again at once, and a few failures in a
    // row would trip its start limit and switch reload handling off. A
    // reload while we work raises it again and we run once more.
    let dir = RuntimeDir::under(runtime_dir)?;
    dir.clear_reload_flag()?;

    let units = socket_units(&dir)?;
    let applied = match dir.read(STATE_FILE)? {
        Some(text) => parse_state(&text),
        None => BTreeMap::new(),
    };
    // Only what the plan needs is asked: which sockets sockets.target wants
    // matters for loaded sockets that do not listen, and the daemon's state
    // only when something changed (a no-op reload is one list-units call).
    // systemctl quotes a wanted unit whose name has an escape (`\x2d`, from
    // a `-` in a path or abstract name, as in every `%t/qrexec-connect/...`
    // line): the list is read as systemctl writes it, never split by hand.
    let wanted: Vec<String> = if units.iter().any(|u| u.is_loaded() && !u.is_active()) {
        manager::list_property("sockets.target", "Wants")?
    } else {
        Vec::new()
    };
    let mut plan = plan(&units, &wanted, &applied, "inactive");
    if plan.is_empty() {
        return dir.write_atomically(STATE_FILE, &format_state(&units));
    }
    let daemon_state = systemctl(&["show", "-p", "ActiveState", "--value", SERVICE])?;
    plan.stop_daemon = daemon_holds_sockets(daemon_state.trim());
    // On an error, return before the state is written: the next run then
    // sees the same difference and tries again. After the actions, record
    // what the manager reports, not what was meant to happen.
    apply(&plan)?;
    dir.write_atomically(STATE_FILE, &format_state(&socket_units(&dir)?))
}

/// Every `qrexec-connect-*.socket` unit the manager knows, with its state
/// and settings. The settings of a generated unit come from the
/// generator's record of what it wrote ([`GENERATED_FILE`]); the manager is
/// asked (`systemctl show`, about 3 ms a unit) only about the others:
/// hand-written units, and generated ones a file of the user's may change.
fn socket_units(dir: &RuntimeDir) -> io::Result<Vec<SocketUnit>> {
    let generated = match dir.read(GENERATED_FILE)? {
        Some(text) => parse_state(&text),
        None => BTreeMap::new(),
    };
    let mut units = Vec::new();
    let mut ask = Vec::new();
    for manager::ListedUnit {
        name,
        load_state,
        active_state,
    } in manager::socket_units()?
    {
        match generated.get(&name) {
            _ if load_state != "loaded" => units.push(SocketUnit {
                name,
                load_state,
                active_state,
                config: SocketConfig::default(),
            }),
            Some(config) => units.push(SocketUnit {
                name,
                load_state,
                active_state,
                config: config.clone(),
            }),
            None => ask.push(name),
        }
    }
    let ask: Vec<&str> = ask.iter().map(String::as_str).collect();
    units.extend(parse_show(&manager::show(
        &manager::SOCKET_PROPERTIES,
        &ask,
    )?));
    Ok(units)
}

/// Carries out a plan, in an order that leaves no window for a daemon with
/// stale fds: removed sockets go first (a daemon started from now on cannot
/// get them), then the daemon that may hold them, then moved and new
/// sockets (each start also stops a daemon started meanwhile, through the
/// handover oneshot in the sockets' drop-in).
fn apply(plan: &Plan) -> io::Result<()> {
    let mut done = Vec::new();
    if !plan.stop.is_empty() {
        let mut args = vec!["--quiet", "stop", "--"];
        args.extend(plan.stop.iter().map(String::as_str));
        systemctl(&args)?;
        done.push(format!("stopped {}", plan.stop.join(", ")));
    }
    if plan.stop_daemon {
        systemctl(&["--quiet", "stop", SERVICE])?;
        done.insert(
            0,
            format!("stopped {SERVICE} so it picks up the change (live connections continue)"),
        );
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
                                  // again (docs/design.md, "Applying a reload").
        systemctl(&["start", "sockets.target"])?;
        done.push(format!("started {}", plan.start.join(", ")));
    }
    // <5> is syslog "notice": above the unit's LogLevelMax= filter.
    println!("<5>qrexec-connect reconcile: {}", done.join("; "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Untrusted text (arbitrary Unicode, or systemd's fd-name alphabet).
    fn untrusted_text() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[ -9;-~]{0,255}"]
    }

    fn socket_unit() -> impl Strategy<Value = (String, String, String, Vec<String>, String)> {
        (
            "qrexec-connect-[a-zA-Z0-9:@._\\\\-]{1,40}\\.socket",
            prop::sample::select(vec!["loaded", "not-found", "masked", "error"]),
            prop::sample::select(vec!["active", "inactive", "failed", "activating"]),
            // systemctl prints one Listen= line per address: no newline inside.
            prop::collection::vec("[^\n\r]{0,60}", 0..3),
            "[^\n\r]{0,255}",
        )
            .prop_map(|(name, load, active, listens, fd_name)| {
                (name, load.to_owned(), active.to_owned(), listens, fd_name)
            })
    }

    // The manager's output and our own state file are read back after any
    // edit by hand: no text may make the reader panic or grow.
    proptest! {
    #[test]
    fn systemctl_show_output_never_panics_and_never_grows(text in untrusted_text()) {
        let units = parse_show(&text);
        prop_assert!(units.len() <= text.split("\n\n").count());
        for unit in &units {
            for field in [&unit.name, &unit.load_state, &unit.active_state,
                          &unit.config.listen, &unit.config.fd_name] {
                prop_assert!(field.len() <= text.len());
            }
        }
    }

    #[test]
    fn systemctl_show_output_is_read_back_as_written(
        units in prop::collection::vec(socket_unit(), 0..5)
    ) {
        let mut text = String::new();
        for (name, load, active, listens, fd_name) in &units {
            text += &format!("Id={name}\nLoadState={load}\nActiveState={active}\n");
            for listen in listens {
                text += &format!("Listen={listen}\n");
            }
            text += &format!("FileDescriptorName={fd_name}\n\n");
        }
        let parsed = parse_show(&text);
        prop_assert_eq!(parsed.len(), units.len());
        for (unit, (name, load, active, listens, fd_name)) in parsed.iter().zip(&units) {
            prop_assert_eq!(&unit.name, name);
            prop_assert_eq!(&unit.load_state, load);
            prop_assert_eq!(&unit.active_state, active);
            let listens: Vec<&str> = listens.iter().map(|l| l.trim()).collect();
            prop_assert_eq!(&unit.config.listen, &listens.join(" "));
            prop_assert_eq!(unit.config.fd_name.as_str(), fd_name.trim());
        }
    }

    #[test]
    fn the_state_file_never_panics_and_never_grows(text in untrusted_text()) {
        let state = parse_state(&text);
        prop_assert!(state.len() <= text.lines().count());
        for (name, config) in &state {
            prop_assert!(name.len() + config.listen.len() + config.fd_name.len() <= text.len());
        }
    }

    #[test]
    fn the_state_file_is_read_back_as_written(
        entries in prop::collection::btree_map(
            "qrexec-connect-[a-zA-Z0-9:@._\\\\-]{1,40}\\.socket",
            ("[^\n\r]{0,60}", "[^\n\r]{0,255}")
                .prop_map(|(l, f): (String, String)| (l.trim().to_owned(), f.trim().to_owned())),
            0..6)
    ) {
        let units: Vec<SocketUnit> = entries
            .iter()
            .map(|(name, (listen, fd_name))| SocketUnit {
                name: name.clone(),
                load_state: "loaded".into(),
                active_state: "active".into(),
                config: SocketConfig { listen: listen.clone(), fd_name: fd_name.clone() },
            })
            .collect();
        let expected: BTreeMap<String, SocketConfig> =
            units.iter().map(|u| (u.name.clone(), u.config.clone())).collect();
        prop_assert_eq!(parse_state(&format_state(&units)), expected);
    }
    }

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
            "active",
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
        let plan = plan(&units, &wanted, &before, "active");
        assert!(plan.stop_daemon);
        assert_eq!(plan.stop, ["qrexec-connect-gone.socket"]);
        assert_eq!(plan.restart, ["qrexec-connect-moved.socket"]);
        assert_eq!(plan.renamed, ["qrexec-connect-renamed.socket"]);
        assert_eq!(plan.start, ["qrexec-connect-new.socket"]);
    }

    #[test]
    fn a_daemon_that_is_still_starting_is_stopped_too() {
        let units = [unit(
            "qrexec-connect-gone.socket",
            "not-found",
            "active",
            "",
            "",
        )];
        for state in ["activating", "active", "reloading", "deactivating"] {
            let plan = plan(&units, &[], &BTreeMap::new(), state);
            assert!(plan.stop_daemon, "{state}");
        }
        for state in ["inactive", "failed"] {
            let plan = plan(&units, &[], &BTreeMap::new(), state);
            assert!(!plan.stop_daemon, "{state}");
        }
    }

    #[test]
    fn the_state_file_is_ini_with_one_section_per_unit_and_lf_line_ends() {
        let units = [
            unit(
                "qrexec-connect-a.socket",
                "loaded",
                "active",
                "127.0.0.1:1 (Stream)",
                "x s",
            ),
            unit(
                "qrexec-connect-b.socket",
                "loaded",
                "inactive",
                "b (Stream)",
                "y s",
            ),
        ];
        assert_eq!(
            format_state(&units),
            "[qrexec-connect-a.socket]\nlisten=127.0.0.1:1 (Stream)\nfd_name=x s\n"
        );
        assert!(parse_state("garbage without equals\n").is_empty());
    }

    #[test]
    fn the_generators_record_reads_as_state_with_escaped_unit_names() {
        let text = "[qrexec-connect-runtime-qrexec\\x2dconnect-agent.socket]\n\
                    listen=%t/qrexec-connect/agent\nfd_name=vault qubes.ConnectSSHAgent\n\
                    [qrexec-connect-::1:8080.socket]\nlisten=[::1]:8080\n\
                    fd_name=@default qubes.ConnectTCP+8080\n";
        let state = parse_state(text);
        assert_eq!(
            state["qrexec-connect-runtime-qrexec\\x2dconnect-agent.socket"].listen,
            "%t/qrexec-connect/agent"
        );
        assert_eq!(
            state["qrexec-connect-::1:8080.socket"].fd_name,
            "@default qubes.ConnectTCP+8080"
        );
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
        let state = parse_state(&format_state(&units));
        assert_eq!(state.len(), 1);
        assert_eq!(state["qrexec-connect-a.socket"], units[0].config);
    }
}
