//! `qrexec-connect status`: what each binding is doing, without reading the
//! journal (`qrexec-connect policy` is in `policy.rs`).
//!
//! Three sources, each the truth for its part, and never the journal's text:
//! * the config files, read with the generator's own grammar: what should
//!   run, with `FILE:LINE`, and the lines that are wrong;
//! * the user manager (`systemctl --user show`): what runs, each socket
//!   unit's state and systemd's result for a failed one, hand-written units,
//!   the reload watcher and the daemon;
//! * the daemon's published counters (`published.rs`): live connections,
//!   connections since it started, and how the last one ended.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::process::{Command, ExitCode};

use crate::manager::{self, property};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::policy::{self, PolicyBinding};
use crate::spawn::DEFAULT_CLIENT;
use qrexec_connect_binding::address::Specifiers;
use qrexec_connect_binding::destination::Destination;
use qrexec_connect_binding::runtime_dir::RuntimeDir;
use qrexec_connect_generator::config::{Config, ConfigDirs};

use crate::published::{self, Counters};

/// The daemon, the reload watcher and its step.
const DAEMON: &str = "qrexec-connect.service";
const WATCHER: &str = "qrexec-connect-reconcile.path";
const RELOAD: &str = "run 'systemctl --user daemon-reload'";

/// One socket unit as the manager sees it.
#[derive(Debug, Default, Clone)]
struct Unit {
    name: String,
    load_state: String,
    active_state: String,
    result: String,
    listen: String,
    fd_name: String,
    fragment: String,
    source_path: String,
}

impl Unit {
    /// The address as the daemon publishes it: `Listen=` without the type.
    fn address(&self) -> &str {
        self.listen
            .rsplit_once(" (")
            .map_or(self.listen.as_str(), |(address, _)| address)
    }
    fn is_generated(&self) -> bool {
        self.fragment.contains("/systemd/generator")
    }
}

/// A binding's state, in the words `--json` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Listening,
    Failed(String),
    /// The config and what runs differ; the reason.
    NotApplied(String),
    /// Loaded but not listening.
    Stopped,
    /// A config line that is not a binding; the `--check` message.
    Invalid(String),
    /// No user manager to ask (e.g. the daemon run by hand).
    Unknown,
}

impl State {
    fn word(&self) -> &'static str {
        match self {
            State::Listening => "listening",
            State::Failed(_) => "failed",
            State::NotApplied(_) => "not-applied",
            State::Stopped => "stopped",
            State::Invalid(_) => "invalid",
            State::Unknown => "unknown",
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone)]
struct Row {
    listen: String,
    target: String,
    service: String,
    source: String,
    state: State,
    counters: Option<Counters>,
    hint: Option<String>,
}

impl Row {
    /// Healthy: listening, applied, and its last connection went well.
    fn is_healthy(&self) -> bool {
        self.state == State::Listening
            && self
                .counters
                .as_ref()
                .and_then(|c| c.last_status)
                .is_none_or(|status| status == 0)
    }
}

/// Everything status knows about the bindings.
struct Inventory {
    rows: Vec<Row>,
    /// Problems that affect every binding.
    problems: Vec<String>,
}

fn socket_units() -> Option<Vec<Unit>> {
    let listed = manager::socket_units().ok()?;
    let names: Vec<&str> = listed.iter().map(|u| u.name.as_str()).collect();
    let properties = [
        "Id",
        "LoadState",
        "ActiveState",
        "Result",
        "Listen",
        "FileDescriptorName",
        "FragmentPath",
        "SourcePath",
    ];
    let text = manager::show(&properties, &names).ok()?;
    Some(
        text.split("\n\n")
            .filter_map(|block| {
                let mut unit = Unit::default();
                for line in block.lines() {
                    let Some((key, value)) = line.split_once('=') else {
                        continue;
                    };
                    let value = value.to_owned();
                    match key {
                        "Id" => unit.name = value,
                        "LoadState" => unit.load_state = value,
                        "ActiveState" => unit.active_state = value,
                        "Result" => unit.result = value,
                        "Listen" => unit.listen = value,
                        "FileDescriptorName" => unit.fd_name = value,
                        "FragmentPath" => unit.fragment = value,
                        "SourcePath" => unit.source_path = value,
                        _ => {}
                    }
                }
                (!unit.name.is_empty()).then_some(unit)
            })
            .collect(),
    )
}

/// The state of a unit that is loaded.
fn unit_state(unit: &Unit) -> State {
    match unit.active_state.as_str() {
        "active" | "activating" | "reloading" => State::Listening,
        "failed" => State::Failed(unit.result.clone()),
        _ => State::Stopped,
    }
}

fn inventory(qube: Option<&str>) -> Inventory {
    let config = Config::load(&ConfigDirs::from_env(), Specifiers::from_env());
    let units = socket_units();
    let manager = units.is_some();
    let mut problems = Vec::new();
    if !manager {
        problems.push(
            "the user manager cannot be asked (systemctl --user failed): states are unknown"
                .to_owned(),
        );
    }
    let units: BTreeMap<String, Unit> = units
        .unwrap_or_default()
        .into_iter()
        .map(|u| (u.name.clone(), u))
        .collect();
    let published = RuntimeDir::from_env()
        .ok()
        .and_then(|dir| dir.read(published::FILE).ok().flatten())
        .map(|text| published::parse(&text))
        .unwrap_or_default();
    let daemon_state = property(DAEMON, "ActiveState");
    // Without a manager to ask, a daemon run by hand counts while it lives.
    let daemon_running = if manager {
        matches!(daemon_state.as_str(), "active" | "activating" | "reloading")
    } else {
        published
            .pid
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let counters_at = |address: &str| -> Option<Counters> {
        if !daemon_running {
            return None;
        }
        published.bindings.get(address).cloned()
    };
    let counters_of = |unit: &Unit| counters_at(unit.address());
    let specifiers = Specifiers::from_env();

    let mut rows = Vec::new();
    let mut seen = BTreeSet::new();
    for binding in &config.bindings {
        let destination = binding.destination();
        let unit = units.get(binding.unit_name());
        seen.insert(binding.unit_name().to_owned());
        let state = match unit {
            None if !manager => State::Unknown,
            None => State::NotApplied("new line".into()),
            Some(u) if u.load_state != "loaded" => State::NotApplied("new line".into()),
            Some(u) if u.fd_name != binding.fd_name() => {
                State::NotApplied(format!("runs as {:?}", u.fd_name))
            }
            Some(u) => unit_state(u),
        };
        rows.push(Row {
            listen: binding.listen().to_string(),
            target: destination.target.as_str().to_owned(),
            service: destination.service.as_str().to_owned(),
            source: binding.source().to_string(),
            counters: match unit {
                Some(unit) => counters_of(unit),
                // The address as the daemon reads it from its socket.
                None => counters_at(
                    &binding
                        .listen()
                        .expanded_path(&specifiers)
                        .map(|path| String::from_utf8_lossy(&path).into_owned())
                        .unwrap_or_else(|| binding.listen().to_string()),
                ),
            },
            state,
            hint: None,
        });
    }
    for problem in config.problems.iter().filter(|p| !p.is_warning()) {
        let text = problem.to_string();
        rows.push(Row {
            listen: String::new(),
            target: String::new(),
            service: String::new(),
            source: text.split(": ").next().unwrap_or("").to_owned(),
            state: State::Invalid(text),
            counters: None,
            hint: None,
        });
    }
    for unit in units.values().filter(|u| !seen.contains(&u.name)) {
        let destination = Destination::from_fd_name(&unit.fd_name).ok();
        let (target, service) = destination
            .as_ref()
            .map(|d| (d.target.as_str().to_owned(), d.service.as_str().to_owned()))
            .unwrap_or_default();
        let state = if unit.is_generated() || unit.load_state != "loaded" {
            // Its line is gone from the config, or its file from disk.
            match unit.active_state.as_str() {
                "inactive" | "failed" if unit.load_state != "loaded" => continue,
                "inactive" => continue,
                _ => State::NotApplied("removed from the config".into()),
            }
        } else {
            unit_state(unit)
        };
        let source = if unit.is_generated() {
            unit.source_path.clone()
        } else {
            unit.fragment.clone()
        };
        rows.push(Row {
            listen: unit.address().to_owned(),
            target,
            service,
            source,
            counters: counters_of(unit),
            state,
            hint: None,
        });
    }

    if manager && property(WATCHER, "ActiveState") != "active" {
        problems.push(format!(
            "the reload watcher {WATCHER} is not running: daemon-reload does not apply \
             changes (systemctl --user start {WATCHER})"
        ));
    }
    if daemon_state == "failed" {
        problems.push(format!(
            "{DAEMON} failed ({}): see journalctl SYSLOG_IDENTIFIER=qrexec-connect",
            property(DAEMON, "Result")
        ));
    }
    // The client the running daemon uses, else the default one.
    let client = published
        .client
        .clone()
        .filter(|c| daemon_running && !c.is_empty())
        .unwrap_or_else(|| DEFAULT_CLIENT.to_owned());
    if !std::path::Path::new(&client).exists() {
        problems.push(format!(
            "{client} is missing: install qubes-core-agent-qrexec (the qrexec client)"
        ));
    } else if daemon_running && published.client_mode.as_deref() == Some("pipe") {
        problems.push(format!(
            "{client} has no --use-stdin-socket (qrexec before 4.2.19): connections work, \
             each with a splicer process; update qubes-core-agent when you can"
        ));
    }
    for row in &mut rows {
        row.hint = hint(row, qube);
    }
    Inventory { rows, problems }
}

/// What to do about a row, if anything.
fn hint(row: &Row, qube: Option<&str>) -> Option<String> {
    match &row.state {
        State::NotApplied(why) => return Some(format!("{why}: {RELOAD}")),
        State::Invalid(_) => {
            return Some("fix the line ('qrexec-connect-generator --check' checks)".into())
        }
        State::Failed(result) => {
            let why = match result.as_str() {
                "resources" => " (it could not listen: is the address in use?)",
                "service-start-limit-hit" => " (the daemon failed too often)",
                _ => "",
            };
            return Some(format!(
                "systemd stopped it: {result}{why}; the recovery step retries with a backoff, \
                 see journalctl SYSLOG_IDENTIFIER=qrexec-connect"
            ));
        }
        State::Stopped => return Some(format!("not listening: {RELOAD}")),
        State::Listening | State::Unknown => {}
    }
    let status = row.counters.as_ref()?.last_status?;
    let destination = Destination::from_fd_name(&format!("{} {}", row.target, row.service)).ok()?;
    match status {
        126 => {
            let binding = PolicyBinding {
                listen: row.listen.clone(),
                source: row.source.clone(),
                destination,
            };
            let text = policy::render(qube.unwrap_or("THIS-QUBE"), &[binding]);
            let rule = text.lines().find(|l| !l.starts_with('#'))?.to_owned();
            Some(format!(
                "dom0 refused the call; a rule that allows it (qrexec-connect policy prints \
                 them all): {rule}"
            ))
        }
        127 => Some(format!(
            "the service qube has no {}: install or link it there",
            row.service.split('+').next().unwrap_or("")
        )),
        -1 => Some("the daemon could not start a client for it: see the journal".into()),
        0 => None,
        _ => Some("the service ended with an error: see the service qube's journal".into()),
    }
}

/// This qube's name, from `qubesdb-read /name`.
fn own_name() -> Option<String> {
    let output = Command::new("qubesdb-read").arg("/name").output().ok()?;
    let name = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !name.is_empty()).then_some(name)
}

/// "2 min ago".
fn age(end: u64, now: u64) -> String {
    let seconds = now.saturating_sub(end);
    match seconds {
        0..=59 => format!("{seconds} s ago"),
        60..=3599 => format!("{} min ago", seconds / 60),
        3600..=86_399 => format!("{} h ago", seconds / 3600),
        _ => format!("{} days ago", seconds / 86_400),
    }
}

/// RFC 3339 in UTC, from seconds since the epoch.
fn rfc3339(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    // Days to civil date (proleptic Gregorian), after Howard Hinnant's
    // published algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            '\n' => out += "\\n",
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_opt(value: Option<String>) -> String {
    value.map_or("null".to_owned(), |v| json_string(&v))
}

fn to_json(rows: &[Row]) -> String {
    let mut out = String::from("[");
    for (i, row) in rows.iter().enumerate() {
        let c = row.counters.clone().unwrap_or_default();
        let detail = match &row.state {
            State::Failed(d) | State::NotApplied(d) | State::Invalid(d) => Some(d.clone()),
            _ => None,
        };
        let _ = write!(
            out,
            "{}\n  {{\"listen\": {}, \"target\": {}, \"service\": {}, \"source\": {}, \
             \"state\": {}, \"detail\": {}, \"live\": {}, \"total\": {}, \"last_result\": {}, \
             \"last_status\": {}, \"last_end\": {}, \"hint\": {}}}",
            if i == 0 { "" } else { "," },
            json_string(&row.listen),
            json_string(&row.target),
            json_string(&row.service),
            json_string(&row.source),
            json_string(row.state.word()),
            json_opt(detail),
            c.live,
            c.total,
            json_opt(c.last_result.clone()),
            c.last_status.map_or("null".to_owned(), |s| s.to_string()),
            json_opt(c.last_end.map(rfc3339)),
            json_opt(row.hint.clone()),
        );
    }
    out += if rows.is_empty() { "]\n" } else { "\n]\n" };
    out
}

fn to_text(inventory: &Inventory, now: u64) -> String {
    let mut out = String::new();
    for problem in &inventory.problems {
        let _ = writeln!(out, "problem: {problem}");
    }
    if !inventory.problems.is_empty() {
        out.push('\n');
    }
    if inventory.rows.is_empty() {
        out += "no bindings (see qrexec-connect.conf(5))\n";
        return out;
    }
    let width = |f: fn(&Row) -> &str| inventory.rows.iter().map(|r| f(r).len()).max().unwrap_or(0);
    let (wl, wt, ws) = (
        width(|r| &r.listen).max(6),
        width(|r| &r.target).max(6),
        width(|r| &r.service).max(7),
    );
    let _ = writeln!(
        out,
        "{:wl$}  {:wt$}  {:ws$}  {:11}  LIVE  TOTAL  LAST",
        "LISTEN", "TARGET", "SERVICE", "STATE"
    );
    for row in &inventory.rows {
        let c = row.counters.clone().unwrap_or_default();
        let last = match (&c.last_result, c.last_end) {
            (Some(result), Some(end)) => format!("{result}, {}", age(end, now)),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:wl$}  {:wt$}  {:ws$}  {:11}  {:>4}  {:>5}  {last}",
            row.listen,
            row.target,
            row.service,
            row.state.word(),
            c.live,
            c.total
        );
        let _ = writeln!(out, "    from {}", row.source);
        if let State::Invalid(message) = &row.state {
            let _ = writeln!(out, "    {message}");
        }
        if let Some(hint) = &row.hint {
            let _ = writeln!(out, "    hint: {hint}");
        }
    }
    out
}

/// `qrexec-connect status [--json]`: 0 when every binding is listening and
/// applied and none's last connection was refused or failed, 1 otherwise.
pub fn status(args: &[OsString]) -> ExitCode {
    let mut json = false;
    for arg in args {
        match arg.to_str() {
            Some("--json") => json = true,
            _ => {
                eprintln!(
                    "qrexec-connect status: unknown argument {arg:?}\n\
                     Usage: qrexec-connect status [--json]"
                );
                return ExitCode::from(2);
            }
        }
    }
    let name = own_name();
    let inventory = inventory(name.as_deref());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if json {
        for problem in &inventory.problems {
            eprintln!("qrexec-connect status: {problem}");
        }
        print!("{}", to_json(&inventory.rows));
    } else {
        print!("{}", to_text(&inventory, now));
    }
    let healthy = inventory.problems.is_empty() && inventory.rows.iter().all(Row::is_healthy);
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_187_723), "2026-12-02T05:02:03Z");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
