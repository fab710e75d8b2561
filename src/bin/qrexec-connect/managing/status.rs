//! `qrexec-connect status`: what each binding is doing, without reading the
//! journal (`qrexec-connect policy` is in `policy.rs`).
//!
//! Three sources, each the truth for its part, and never the journal's text:
//! * the config files, read with the generator's own grammar: what should
//!   run, with `FILE:LINE`, and the lines that are wrong;
//! * the user manager: which socket units it has and their states (one
//!   `list-units`), and what each generated unit was written with (the
//!   generator's record, `$XDG_RUNTIME_DIR/qrexec-connect/generated`, as
//!   reconcile reads it). `systemctl show`, which costs about 1 ms a unit,
//!   is asked only about what neither tells: hand-written units, failed
//!   ones (systemd's result), generated ones whose line is gone, and the
//!   daemon and the reload watcher, all in one call. So status with
//!   thousands of bindings takes one list-units and one short show;
//! * the daemon's published counters (`shared::counters`, written by
//!   `serving::published`): live connections, connections since it
//!   started, and how the last one ended.
//!
//! Every field comes from someone else's text (config lines and file names,
//! unit files, the manager), so the plain view shows each one through the
//! generator's one printable rule ([`printable`]: escaped, and cut after
//! 256 characters), and `--json` escapes every character that does not show
//! as itself, keeping the exact value.
//!
//! A path socket systemd calls active is checked on disk: its file must be
//! there, be a socket, and be the file of a listening socket (the kernel's
//! sock_diag answer, [`listening_unix_files`]); else it is `unreachable`.
//! Stopping another unit bound to the same path removes the file, and
//! systemd does not notice.
//!
//! A socket systemd could not bind (`Result=resources`) is explained from
//! /proc: who holds its address, with the holder's uid when /proc tells
//! (TCP and abstract names as recover finds them, `recover::holder_of`, a
//! trial bind included; for path sockets the socket file's owner, or the
//! process holding it when we may look at its fds).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::{Command, ExitCode};

use super::manager;
use super::recover;
use std::time::{SystemTime, UNIX_EPOCH};

use super::policy::{self, PolicyBinding};
use super::reconcile;
use crate::shared::DEFAULT_CLIENT;
use qrexec_connect_binding::address::{ListenAddress, Specifiers};
use qrexec_connect_binding::collision::addresses_collide;
use qrexec_connect_binding::destination::{Destination, Service, Target, MAX_FD_NAME};
use qrexec_connect_binding::runtime_dir::{RuntimeDir, GENERATED_FILE};
use qrexec_connect_generator::config::{
    is_invisible, printable, printable_message, Binding, Config, ConfigDirs, Problem,
};

use crate::shared::counters::{self, Counters, Snapshot};

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
    /// In the generator's record: written by the generator at the last
    /// reload, with `fd_name` as the record has it.
    recorded: bool,
}

impl Unit {
    /// The address as the daemon publishes it: `Listen=` without the type.
    fn address(&self) -> &str {
        self.listen
            .rsplit_once(" (")
            .map_or(self.listen.as_str(), |(address, _)| address)
    }
    fn is_generated(&self) -> bool {
        self.recorded || self.fragment.contains("/systemd/generator")
    }
}

/// What the manager said: the socket units by name, the daemon's state and
/// result, and whether the reload watcher runs.
#[derive(Debug, Default)]
struct ManagerView {
    units: BTreeMap<String, Unit>,
    daemon: Unit,
    watcher_active: bool,
}

/// The properties `show` is asked for.
const PROPERTIES: [&str; 8] = [
    "Id",
    "LoadState",
    "ActiveState",
    "Result",
    "Listen",
    "FileDescriptorName",
    "FragmentPath",
    "SourcePath",
];

/// A binding's state, in the words `--json` uses. The man page lists them
/// (docs/design.md, "Issue 22: status", has the list and meanings).
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Listening,
    Failed(String),
    /// The config and what runs differ; the reason.
    NotApplied(String),
    /// Loaded but not listening (stopped by hand, or not started yet).
    Stopped,
    /// Masked (`systemctl --user mask`): it never starts until unmasked.
    Masked,
    /// Two of our units on one address; the other one, in words.
    Conflict(String),
    /// A config line that is not a binding (the `--check` message), or a
    /// unit whose `FileDescriptorName=` is not `TARGET SERVICE` (why).
    Invalid(String),
    /// Active for systemd, but its socket path does not reach its socket
    /// (the file is gone, or is not the socket's); why.
    Unreachable(String),
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
            State::Masked => "masked",
            State::Conflict(_) => "conflict",
            State::Invalid(_) => "invalid",
            State::Unreachable(_) => "unreachable",
            State::Unknown => "unknown",
        }
    }
}

/// One row of the report. The text fields hold the values as they are;
/// they are made printable when shown.
#[derive(Debug, Clone)]
struct Row {
    listen: String,
    /// The socket unit (`qrexec-connect-….socket`); empty for a line that
    /// is not a binding.
    unit: String,
    /// The address as the socket listens (a path expanded), to find two
    /// units on one address; empty when there is none.
    address: String,
    /// Written by hand (not by the generator), for the clash hint.
    hand_written: bool,
    target: String,
    service: String,
    source: String,
    state: State,
    counters: Option<Counters>,
    /// For a socket systemd could not bind: who holds its address.
    holder: Option<Holder>,
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

/// Parses `systemctl show` output (blocks separated by blank lines) into
/// units, by `Id`.
fn parse_show(text: &str) -> Vec<Unit> {
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
                    "Listen" => unit.listen = manager::unescape_value(&value),
                    "FileDescriptorName" => unit.fd_name = value,
                    "FragmentPath" => unit.fragment = value,
                    "SourcePath" => unit.source_path = value,
                    _ => {}
                }
            }
            (!unit.name.is_empty()).then_some(unit)
        })
        .collect()
}

/// Asks the manager about the socket units, the daemon and the watcher;
/// `None` when it cannot be asked. A generated unit that is not one of
/// `config`'s lines is a removed line, whose source file only `show` knows.
fn ask_manager(config: &Config) -> Option<ManagerView> {
    let listed = manager::socket_units().ok()?;
    // The record is absent when the generator could not write it: then
    // every unit is asked about, as before there was one.
    let record = RuntimeDir::from_env()
        .ok()
        .and_then(|dir| dir.read(GENERATED_FILE).ok().flatten())
        .map(|text| reconcile::parse_state(&text))
        .unwrap_or_default();
    let mut units = BTreeMap::new();
    let mut ask = Vec::new();
    for listed in listed {
        let mut unit = Unit {
            name: listed.name,
            load_state: listed.load_state,
            active_state: listed.active_state,
            ..Unit::default()
        };
        if unit.load_state == "loaded" {
            let running = unit.active_state != "inactive";
            match record.get(&unit.name) {
                Some(written) => {
                    unit.recorded = true;
                    unit.fd_name = written.fd_name.clone();
                    let line_gone = config.binding_of_unit(&unit.name).is_none();
                    if unit.active_state == "failed" || (line_gone && running) {
                        ask.push(unit.name.clone());
                    }
                }
                None => ask.push(unit.name.clone()),
            }
        }
        units.insert(unit.name.clone(), unit);
    }
    let mut names: Vec<&str> = ask.iter().map(String::as_str).collect();
    names.extend([DAEMON, WATCHER]);
    let mut view = ManagerView {
        units,
        ..ManagerView::default()
    };
    for shown in parse_show(&manager::show(&PROPERTIES, &names).ok()?) {
        match shown.name.as_str() {
            DAEMON => view.daemon = shown,
            WATCHER => view.watcher_active = shown.active_state == "active",
            _ => {
                let recorded = view.units.get(&shown.name).is_some_and(|u| u.recorded);
                view.units
                    .insert(shown.name.clone(), Unit { recorded, ..shown });
            }
        }
    }
    Some(view)
}

/// The state of a unit that is loaded.
fn unit_state(unit: &Unit) -> State {
    match unit.active_state.as_str() {
        "active" | "activating" | "reloading" => State::Listening,
        "failed" => State::Failed(unit.result.clone()),
        _ => State::Stopped,
    }
}

/// The first word of a line as a problem shows it (printable, cut): up to
/// the first space, or through the cut mark (`…(N bytes)`) when the line
/// was cut before its first space.
fn first_word(text: &str) -> &str {
    let text = text.trim_start();
    let space = text.find([' ', '\t']).unwrap_or(text.len());
    match text.find("…(") {
        Some(cut) if cut < space => text[cut..]
            .find(')')
            .map_or(text, |close| &text[..cut + close + 1]),
        _ => &text[..space],
    }
}

/// A problem line's text (printable, cut) as LISTEN, TARGET and the rest.
fn line_words(text: &str) -> (String, String, String) {
    let listen = first_word(text);
    let rest = text.trim_start()[listen.len()..].trim_start();
    let target = first_word(rest);
    let service = rest.trim_start()[target.len()..].trim();
    (listen.to_owned(), target.to_owned(), service.to_owned())
}

/// Where a problem is, for the source column.
fn problem_source(problem: &Problem) -> String {
    match problem {
        Problem::Line { at, .. } => at.to_string(),
        Problem::File { path, .. } => path.clone(),
        _ => String::new(),
    }
}

/// Everything status reports, in named steps: the config, what the user
/// manager and the daemon say of it, one row per binding, per invalid line
/// and per socket unit the config no longer names, then what the rows
/// learn from each other (clashes) and the hints.
fn inventory(qube: Option<&str>) -> Inventory {
    let config = Config::load(&ConfigDirs::from_env(), Specifiers::from_env());
    let view = ask_manager(&config);
    let manager = view.is_some();
    let ManagerView {
        units,
        daemon,
        watcher_active,
    } = view.unwrap_or_default();
    let published = LastPublished::read(manager, &daemon);
    let specifiers = Specifiers::from_env();

    let mut rows: Vec<Row> = config
        .bindings
        .iter()
        .map(|binding| {
            let unit = units.get(binding.unit_name());
            binding_row(binding, unit, manager, &specifiers, &published)
        })
        .collect();
    rows.extend(
        config
            .problems
            .iter()
            .filter(|p| !p.is_warning())
            .map(problem_row),
    );
    rows.extend(
        units
            .values()
            .filter(|u| config.binding_of_unit(&u.name).is_none())
            .filter_map(|unit| unit_row(unit, &published)),
    );
    let problems = problems_of_all(manager, watcher_active, &daemon, &published);
    mark_unreachable(&mut rows);
    mark_conflicts(&mut rows);
    for row in rows.iter_mut().filter(|row| row.hint.is_none()) {
        row.hint = hint(row, qube);
    }
    Inventory { rows, problems }
}

/// What the daemon published last, and whether it still runs.
struct LastPublished {
    snapshot: Snapshot,
    daemon_running: bool,
}

impl LastPublished {
    fn read(manager: bool, daemon: &Unit) -> LastPublished {
        let snapshot = RuntimeDir::from_env()
            .ok()
            .and_then(|dir| dir.read(counters::FILE).ok().flatten())
            .map(|text| counters::parse(&text))
            .unwrap_or_default();
        // Without a manager to ask, a daemon run by hand counts while it lives.
        let daemon_running = if manager {
            matches!(
                daemon.active_state.as_str(),
                "active" | "activating" | "reloading"
            )
        } else {
            snapshot
                .pid
                .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        };
        LastPublished {
            snapshot,
            daemon_running,
        }
    }

    /// An address's counters. While the daemon is stopped (after the
    /// handover of a reload, until the next connection) the counts stand,
    /// and the next daemon carries them on (`serving::published`); nothing
    /// is live.
    fn counters_at(&self, address: &str) -> Option<Counters> {
        let mut counters = self.snapshot.bindings.get(address).cloned()?;
        if !self.daemon_running {
            counters.live = 0;
        }
        Some(counters)
    }
}

/// The row of a binding of the config, with its unit as the manager has it.
fn binding_row(
    binding: &Binding,
    unit: Option<&Unit>,
    manager: bool,
    specifiers: &Specifiers,
    published: &LastPublished,
) -> Row {
    let destination = binding.destination();
    let state = match unit {
        None if !manager => State::Unknown,
        None => State::NotApplied("new line".into()),
        Some(u) if u.load_state == "masked" => State::Masked,
        Some(u) if u.load_state != "loaded" => State::NotApplied("new line".into()),
        Some(u) if u.fd_name != binding.fd_name() => {
            State::NotApplied(format!("runs as {:?}", u.fd_name))
        }
        Some(u) => unit_state(u),
    };
    // The address as the daemon reads it from its socket; a
    // hand-written unit of the same name says its own.
    let address = match unit.filter(|u| !u.listen.is_empty()) {
        Some(unit) => unit.address().to_owned(),
        None => binding
            .listen()
            .expanded_path(specifiers)
            .map(|path| String::from_utf8_lossy(&path).into_owned())
            .unwrap_or_else(|| binding.listen().to_string()),
    };
    Row {
        listen: binding.listen().to_string(),
        unit: binding.unit_name().to_owned(),
        hand_written: unit.is_some_and(|u| !u.is_generated() && u.load_state == "loaded"),
        address: address.clone(),
        target: destination.target.as_str().to_owned(),
        service: destination.service.as_str().to_owned(),
        source: binding.source().to_string(),
        counters: published.counters_at(&address),
        holder: holder_if_taken(&state, &address),
        state,
        hint: None,
    }
}

/// The row of a config line that is not a binding.
fn problem_row(problem: &Problem) -> Row {
    // The line's own words in the LISTEN, TARGET and SERVICE columns
    // (each shown once), and the message without the line and the
    // FILE:LINE the source column already shows.
    let ((listen, target, service), message) = match problem {
        Problem::Line { error, text, .. } => (line_words(text), error.to_string()),
        other => (Default::default(), other.to_string()),
    };
    Row {
        listen,
        unit: String::new(),
        address: String::new(),
        hand_written: false,
        target,
        service,
        source: problem_source(problem),
        state: State::Invalid(message),
        counters: None,
        holder: None,
        hint: None,
    }
}

/// The row of a socket unit no line of the config names: hand-written, or
/// generated from a line since removed. `None` for one that is gone.
fn unit_row(unit: &Unit, published: &LastPublished) -> Option<Row> {
    let destination = Destination::from_fd_name(&unit.fd_name).ok();
    let (target, service) = destination
        .as_ref()
        .map(|d| (d.target.as_str().to_owned(), d.service.as_str().to_owned()))
        .unwrap_or_default();
    let state = if unit.is_generated() || unit.load_state != "loaded" {
        // Its line is gone from the config, or its file from disk.
        match unit.active_state.as_str() {
            "inactive" | "failed" if unit.load_state != "loaded" => return None,
            "inactive" => return None,
            _ => State::NotApplied("removed from the config".into()),
        }
    } else if destination.is_none() {
        State::Invalid(fd_name_problem(unit))
    } else {
        unit_state(unit)
    };
    let source = if unit.is_generated() {
        unit.source_path.clone()
    } else {
        unit.fragment.clone()
    };
    Some(Row {
        listen: unit.address().to_owned(),
        unit: unit.name.clone(),
        address: unit.address().to_owned(),
        hand_written: !unit.is_generated(),
        target,
        service,
        source,
        counters: published.counters_at(unit.address()),
        holder: holder_if_taken(&state, unit.address()),
        state,
        hint: None,
    })
}

/// Problems that affect every binding: the manager, the reload watcher, the
/// daemon, the client.
fn problems_of_all(
    manager: bool,
    watcher_active: bool,
    daemon: &Unit,
    published: &LastPublished,
) -> Vec<String> {
    let mut problems = Vec::new();
    if !manager {
        problems.push(
            "the user manager cannot be asked (systemctl --user failed): states are unknown"
                .to_owned(),
        );
    }
    if manager && !watcher_active {
        problems.push(format!(
            "the reload watcher {WATCHER} is not running: daemon-reload does not apply \
             changes (systemctl --user start {WATCHER})"
        ));
    }
    if daemon.active_state == "failed" {
        problems.push(format!(
            "{DAEMON} failed ({}): see journalctl SYSLOG_IDENTIFIER=qrexec-connect",
            printable(daemon.result.as_bytes())
        ));
    }
    // The client the running daemon uses, else the default one.
    let running = published.daemon_running;
    let client = published
        .snapshot
        .client
        .clone()
        .filter(|c| running && !c.is_empty())
        .unwrap_or_else(|| DEFAULT_CLIENT.to_owned());
    let shown_client = printable(client.as_bytes());
    if !std::path::Path::new(&client).exists() {
        problems.push(format!(
            "{shown_client} is missing: install qubes-core-agent-qrexec (the qrexec client)"
        ));
    } else if running && published.snapshot.client_mode.as_deref() == Some("pipe") {
        problems.push(format!(
            "{shown_client} has no --use-stdin-socket (qrexec before 4.2.19): connections \
             work, each with a splicer process; update qubes-core-agent when you can"
        ));
    }
    problems
}

/// A path binding the manager reports listening whose socket file cannot
/// be reached is `Unreachable`. The kernel is asked once, and only when a
/// path binding listens.
fn mark_unreachable(rows: &mut [Row]) {
    let files = std::cell::OnceCell::new();
    let files = || files.get_or_init(listening_unix_files).as_deref();
    for row in rows.iter_mut().filter(|r| r.state == State::Listening) {
        if let Some(why) = unreachable_path(&row.address, files) {
            row.state = State::Unreachable(why);
        }
    }
}

/// Why a hand-written unit's `FileDescriptorName=` is not `TARGET SERVICE`.
/// systemd drops a value it refuses (a `:`, which separates the names in
/// `LISTEN_FDNAMES`; a character outside printable ASCII; more than 255
/// bytes), says so only in its own journal, and passes the unit's name:
/// so when the manager reports the unit's name, the unit file tells what
/// was written.
fn fd_name_problem(unit: &Unit) -> String {
    const CLOSED: &str = "the daemon closes every connection at once";
    if unit.fd_name == unit.name || unit.fd_name.is_empty() {
        match written_fd_name(&unit.fragment) {
            Some(written) => {
                let why = if written.contains(':') {
                    "':' (write @dispvm:TEMPLATE as @dispvm/TEMPLATE)".to_owned()
                } else if let Some(c) = written.chars().find(|c| !matches!(c, ' '..='~')) {
                    format!("{c:?}")
                } else if written.len() > MAX_FD_NAME {
                    format!("{} bytes", written.len())
                } else {
                    String::new()
                };
                if !why.is_empty() {
                    return format!(
                        "systemd dropped FileDescriptorName={written} because it holds {why} \
                        (systemd refuses ':', characters outside printable ASCII and more than \
                        {MAX_FD_NAME} bytes there) and passes the unit's name instead: {CLOSED}"
                    );
                }
            }
            None => {
                return format!(
                    "no FileDescriptorName= (it must be TARGET SERVICE), so systemd passes the \
                    unit's name: {CLOSED}"
                )
            }
        }
    }
    match Destination::from_fd_name(&unit.fd_name) {
        Err(why) => format!("FileDescriptorName={}: {why}: {CLOSED}", unit.fd_name),
        Ok(_) => String::new(),
    }
}

/// The last `FileDescriptorName=` value in a unit file, as written (the
/// first 1 MiB of the file is read).
fn written_fd_name(path: &str) -> Option<String> {
    use std::io::Read as _;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut text)
        .ok()?;
    String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|line| line.trim().strip_prefix("FileDescriptorName="))
        .map(|value| value.trim().to_owned())
        .next_back()
}

/// Two of our units on one address (typically a config line and the old
/// hand-written unit it replaces): only one can listen, the other fails
/// with `resources` at each start. Both rows say `conflict` and name each
/// other; the hint retires the hand-written one.
fn mark_conflicts(rows: &mut [Row]) {
    let counts = |row: &Row| {
        !row.address.is_empty()
            && !row.unit.is_empty()
            && matches!(
                row.state,
                State::Listening
                    | State::Failed(_)
                    | State::Stopped
                    | State::Conflict(_)
                    | State::Unreachable(_)
            )
    };
    let mut found = Vec::new();
    for (i, a) in rows.iter().enumerate() {
        if !counts(a) {
            continue;
        }
        let other = rows.iter().enumerate().find(|(j, b)| {
            *j != i && counts(b) && b.unit != a.unit && addresses_collide(&a.address, &b.address)
        });
        if let Some((_, b)) = other {
            let detail = format!(
                "{} is also the address of {} (from {})",
                a.address,
                b.unit,
                home_as_tilde(&b.source)
            );
            // `disable --now` leaves a failed unit failed: the one that
            // could not listen is reset too.
            // Two units on one path both listen (systemd removes a file in
            // its way and binds again), and stopping the old one removes the
            // file they share: the kept one is then restarted by hand. On a
            // TCP address or a name the kept one failed, and recovery
            // starts it once the old one is gone.
            let retire = |old: &Row, other: &Row| {
                let reset = match old.state {
                    State::Failed(_) => format!(" and systemctl --user reset-failed {}", old.unit),
                    _ if old.address.starts_with('/') => format!(
                        ", then systemctl --user restart {} (stopping the old unit removes \
                         the socket file both use)",
                        other.unit
                    ),
                    _ => format!(
                        " (the recovery step then starts {} within 10 s)",
                        other.unit
                    ),
                };
                format!(
                    "retire the old hand-written unit: systemctl --user disable --now {}{reset}; \
                     see the README, \"Coming from the Python qrexec-connect\"",
                    old.unit
                )
            };
            let hint = match (a.hand_written, b.hand_written) {
                (false, true) => retire(b, a),
                (true, false) => retire(a, b),
                (true, true) => format!(
                    "disable one of them: systemctl --user disable --now {} (or {})",
                    a.unit, b.unit
                ),
                (false, false) => format!(
                    "two config lines take one address: remove one ({} or {})",
                    a.source, b.source
                ),
            };
            found.push((i, detail, hint));
        }
    }
    for (i, detail, hint) in found {
        rows[i].state = State::Conflict(detail);
        rows[i].holder = None;
        rows[i].hint = Some(hint);
    }
}

/// What to do about a row, if anything. Each value from elsewhere in it is
/// made printable here (the hint is prose with values inside).
fn hint(row: &Row, qube: Option<&str>) -> Option<String> {
    match &row.state {
        State::Listening | State::Unknown => last_result_hint(row, qube),
        State::Conflict(_) => None,
        _ => state_hint(row),
    }
}

/// What to do about a row whose state is not listening.
fn state_hint(row: &Row) -> Option<String> {
    match &row.state {
        State::NotApplied(why) => Some(format!("{}: {RELOAD}", printable(why.as_bytes()))),
        State::Invalid(_) if row.unit.is_empty() => {
            Some("fix the line ('qrexec-connect-generator --check' checks)".into())
        }
        State::Invalid(_) => Some(format!(
            "write FileDescriptorName=TARGET SERVICE in {} (no ':': write \
            @dispvm:TEMPLATE as @dispvm/TEMPLATE there), \
            or replace the unit with a config line (qrexec-connect.conf(5))",
            printable(row.source.as_bytes())
        )),
        State::Failed(result) => Some(failed_hint(row, result)),
        State::Stopped => Some(format!(
            "not listening (stopped by hand?): systemctl --user start {}",
            printable(row.unit.as_bytes())
        )),
        State::Masked => Some(format!(
            "masked, so it never starts: systemctl --user unmask {unit}, then \
            systemctl --user start {unit}",
            unit = printable(row.unit.as_bytes())
        )),
        State::Unreachable(why) => Some(format!(
            "{}, so nothing can connect: systemctl --user restart {}",
            printable_message(why),
            printable(row.unit.as_bytes())
        )),
        State::Conflict(_) | State::Listening | State::Unknown => None,
    }
}

/// What to do about a socket systemd stopped (`result`, its `Result=`).
fn failed_hint(row: &Row, result: &str) -> String {
    let why = match (result, &row.holder) {
        ("resources", Some(holder)) => format!(
            " (it could not listen: {} is in use by another process{})",
            printable(row.listen.as_bytes()),
            match holder.uid {
                Some(uid) => format!(" (uid {uid})"),
                None => " (its uid is not visible to you)".to_owned(),
            }
        ),
        ("resources", None) => " (it could not listen: is the address in use?)".into(),
        ("service-start-limit-hit", _) => " (the daemon failed too often)".into(),
        _ => String::new(),
    };
    format!(
        "systemd stopped it: {}{why}; the recovery step retries with a backoff, \
         see journalctl SYSLOG_IDENTIFIER=qrexec-connect",
        printable(result.as_bytes())
    )
}

/// What to do about a listening row whose last connection did not end well.
fn last_result_hint(row: &Row, qube: Option<&str>) -> Option<String> {
    let status = row.counters.as_ref()?.last_status?;
    // The row holds the real target (`@dispvm:TEMPLATE`), not the fd name's.
    let destination = Destination {
        target: Target::parse(&row.target).ok()?,
        service: Service::parse(&row.service).ok()?,
    };
    match status {
        126 => {
            let binding = PolicyBinding {
                listen: row.listen.clone(),
                source: row.source.clone(),
                destination,
            };
            let text = policy::render(qube.unwrap_or("THIS-QUBE"), &[binding]);
            let rule = text.lines().find(|l| !l.starts_with('#'))?;
            Some(format!(
                "dom0 refused the call; a rule that allows it (qrexec-connect policy prints \
                 them all): {}",
                printable(rule.as_bytes())
            ))
        }
        127 => Some(format!(
            "the service qube has no {}: install or link it there",
            printable(row.service.split('+').next().unwrap_or("").as_bytes())
        )),
        // qrexec-client-vm's own status: the call was allowed, but the
        // service qube could not start it (docs/qrexec-facts.md).
        125 => Some(match row.service.strip_prefix("qubes.ConnectTCP+") {
            Some(port) => format!(
                "{} could not start the call (status 125): nothing listens on port {} \
                there, or qubes.ConnectTCP failed to start; see that qube",
                printable(row.target.as_bytes()),
                printable(port.as_bytes())
            ),
            None => format!(
                "{} could not start the call (status 125): {} exists there but failed to \
                start (a socket service with nothing listening?); see that qube's journal",
                printable(row.target.as_bytes()),
                printable(row.service.as_bytes())
            ),
        }),
        -1 => Some("the daemon could not start a client for it: see the journal".into()),
        0 => None,
        _ => Some("the service ended with an error: see the service qube's journal".into()),
    }
}

/// Who holds an address a socket could not be bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    /// `None` when /proc does not tell (another user's process holding a
    /// Unix socket).
    uid: Option<u32>,
}

/// For a socket systemd stopped because it could not bind
/// (`Result=resources`), who holds `address`, if anyone.
fn holder_if_taken(state: &State, address: &str) -> Option<Holder> {
    if *state != State::Failed("resources".into()) {
        return None;
    }
    match ListenAddress::parse(address).ok()? {
        // As recover finds them (one rule for both): a listening socket,
        // or the address failing a trial bind as systemd binds it.
        ListenAddress::Inet(address) => shared_holder(&address.to_string()),
        ListenAddress::Abstract(name) => shared_holder(&format!("@{name}")),
        ListenAddress::Path(path) => {
            // A socket file there that systemd could not replace: its
            // owner is the one who bound it.
            let meta = std::fs::symlink_metadata(&path).ok()?;
            let by_file = meta.file_type().is_socket().then_some(meta.uid());
            unix_holder(&path).map(|holder| Holder {
                uid: holder.uid.or(by_file),
            })
        }
    }
}

/// [`recover::holder_of`], with the uid of the process holding the socket
/// when /proc does not say it and we may look at its fds.
fn shared_holder(address: &str) -> Option<Holder> {
    let mut holder = recover::holder_of(address)?;
    holder.identify();
    Some(Holder { uid: holder.uid })
}

/// A Unix socket bound to `name` (a path, or `@` and an abstract name), from
/// `/proc/net/unix`, which has no owner column: the uid is that of the
/// process holding it, when its fds may be looked at (ours; all for root).
fn unix_holder(name: &str) -> Option<Holder> {
    let text = std::fs::read_to_string("/proc/net/unix").ok()?;
    let inode = text
        .lines()
        .skip(1)
        .filter_map(proc_unix_socket)
        .find_map(|(inode, path)| (path == name).then_some(inode))?;
    let wanted = format!("socket:[{inode}]");
    let uid = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|process| {
            process
                .file_name()
                .to_str()?
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then_some(())?;
            let holds = std::fs::read_dir(process.path().join("fd"))
                .ok()?
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == &*wanted)
                });
            holds.then(|| process.metadata().ok().map(|m| m.uid()))?
        });
    Some(Holder { uid })
}

/// The inode and path of one line of `/proc/net/unix` (`Num RefCount
/// Protocol Flags Type St Inode Path`); the path is the rest of the line,
/// spaces included, with an abstract name's leading NUL shown as `@`.
fn proc_unix_socket(line: &str) -> Option<(&str, &str)> {
    let mut rest = line;
    let mut field = "";
    for _ in 0..7 {
        rest = rest.trim_start_matches(' ');
        let end = rest.find(' ').unwrap_or(rest.len());
        (field, rest) = rest.split_at(end);
    }
    Some((field, rest.strip_prefix(' ')?))
}

/// Why a path socket the manager reports listening cannot be reached, if
/// it cannot: nothing connects to a socket whose file is gone (retiring a
/// unit that shared the path removed it), is not a socket, or belongs to no
/// listening socket (a leftover file, or another socket's that is closed).
/// systemd does not notice: the unit stays `active`. `None` for an address
/// that is not a path, or a path we may not look at.
fn unreachable_path<'a>(
    address: &str,
    listening_files: impl FnOnce() -> Option<&'a [(Vec<u8>, u32)]>,
) -> Option<String> {
    if !address.starts_with('/') {
        return None;
    }
    let shown = printable(address.as_bytes());
    let meta = match std::fs::symlink_metadata(address) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(format!("its socket file {shown} is gone"))
        }
        Err(_) => return None,
        Ok(meta) => meta,
    };
    if !meta.file_type().is_socket() {
        return Some(format!("{shown} is not a socket file any more"));
    }
    // The kernel names each listening socket's file (its inode); without
    // that answer, a socket file there is taken as the unit's.
    let bound = listening_files()?
        .iter()
        .any(|(path, inode)| path.as_slice() == address.as_bytes() && *inode == meta.ino() as u32);
    (!bound).then(|| format!("the socket file {shown} belongs to no listening socket"))
}

/// Every listening Unix socket bound to a path, with the inode of the file
/// its bind made, from the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`,
/// as `ss -xl` asks; no privilege needed). `/proc/net/unix` has the path
/// but only the socket's own inode, not its file's, so it cannot tell a
/// socket whose file was removed or replaced. `None` when the kernel does
/// not answer.
fn listening_unix_files() -> Option<Vec<(Vec<u8>, u32)>> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::io::Read as _;

    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )
    .ok()?;
    socket.send(&unix_diag_request()).ok()?;
    let mut files = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let received = (&socket).read(&mut buffer).ok()?;
        let mut messages = &buffer[..received];
        if messages.is_empty() {
            return None;
        }
        while messages.len() >= 16 {
            let length = u32_at(messages, 0)? as usize;
            let kind = u16_at(messages, 4)?;
            if length < 16 || length > messages.len() {
                return None;
            }
            match kind {
                NLMSG_DONE => return Some(files),
                NLMSG_ERROR => return None,
                SOCK_DIAG_BY_FAMILY => files.extend(unix_diag_file(&messages[..length])?),
                _ => {}
            }
            messages = messages.get(length.next_multiple_of(4)..).unwrap_or(&[]);
        }
    }
}

// The socket diagnostics' numbers (linux/sock_diag.h, unix_diag.h, netlink.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const UDIAG_SHOW_NAME: u32 = 1;
const UDIAG_SHOW_VFS: u32 = 2;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The dump request for every listening Unix socket, with its name and
/// its file's inode.
fn unix_diag_request() -> Vec<u8> {
    // nlmsghdr (length, type, flags, sequence, port), then unix_diag_req
    // (family, protocol, padding, states, inode, what to show, cookie).
    let mut request = Vec::with_capacity(40);
    request.extend(40u32.to_ne_bytes());
    request.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend((libc::NLM_F_REQUEST as u16 | libc::NLM_F_DUMP as u16).to_ne_bytes());
    request.extend(1u32.to_ne_bytes());
    request.extend(0u32.to_ne_bytes());
    request.extend([libc::AF_UNIX as u8, 0, 0, 0]);
    request.extend((1u32 << TCP_LISTEN).to_ne_bytes());
    request.extend(0u32.to_ne_bytes());
    request.extend((UDIAG_SHOW_NAME | UDIAG_SHOW_VFS).to_ne_bytes());
    request.extend([0; 8]);
    request
}

/// One answer (`message`, its header included): the socket's path and its
/// file's inode, `Some(None)` for an abstract or unnamed socket; `None` for
/// a broken answer.
fn unix_diag_file(message: &[u8]) -> Option<Option<(Vec<u8>, u32)>> {
    // After the header, unix_diag_msg (16 bytes), then
    // attributes (length, type, value), each 4-aligned.
    let mut attributes = message.get(32..)?;
    let (mut name, mut inode) = (None, None);
    while attributes.len() >= 4 {
        let size = usize::from(u16_at(attributes, 0)?);
        let value = attributes.get(4..size)?;
        match u16_at(attributes, 2)? {
            UNIX_DIAG_NAME => name = Some(value),
            UNIX_DIAG_VFS => inode = u32_at(value, 0),
            _ => {}
        }
        attributes = attributes.get(size.next_multiple_of(4)..).unwrap_or(&[]);
    }
    let (Some(name), Some(inode)) = (name, inode) else {
        return Some(None);
    };
    // A path (not an abstract name, which starts with
    // NUL), without the NUL a bind may count.
    if name.first().is_none_or(|&b| b == 0) {
        return Some(None);
    }
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(Some((name[..end].to_vec(), inode)))
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

/// A JSON string holding exactly `text`. Besides what JSON requires (`"`,
/// `\` and C0 controls), DEL, C1 controls and every [invisible](is_invisible)
/// character are written as `\uXXXX`, so the output is safe to print and a
/// JSON reader still gets the exact value.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            '\n' => out += "\\n",
            '\t' => out += "\\t",
            c if c.is_control() || is_invisible(c) => {
                let mut units = [0; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_opt(value: Option<&str>) -> String {
    value.map_or("null".to_owned(), json_string)
}

fn to_json(rows: &[Row]) -> String {
    let mut out = String::from("[");
    for (i, row) in rows.iter().enumerate() {
        let c = row.counters.clone().unwrap_or_default();
        let detail = match &row.state {
            State::Failed(d)
            | State::NotApplied(d)
            | State::Invalid(d)
            | State::Conflict(d)
            | State::Unreachable(d) => Some(d.as_str()),
            _ => None,
        };
        let _ = write!(
            out,
            "{}\n  {{\"listen\": {}, \"target\": {}, \"service\": {}, \"source\": {}, \
             \"unit\": {}, \"state\": {}, \"detail\": {}, \"live\": {}, \"total\": {}, \"last_result\": {}, \
             \"last_status\": {}, \"last_end\": {}, \"hint\": {}}}",
            if i == 0 { "" } else { "," },
            json_string(&row.listen),
            json_string(&row.target),
            json_string(&row.service),
            json_string(&row.source),
            json_string(&row.unit),
            json_string(row.state.word()),
            json_opt(detail),
            c.live,
            c.total,
            json_opt(c.last_result.as_deref()),
            c.last_status.map_or("null".to_owned(), |s| s.to_string()),
            json_opt(c.last_end.map(rfc3339).as_deref()),
            json_opt(row.hint.as_deref()),
        );
    }
    out += if rows.is_empty() { "]\n" } else { "\n]\n" };
    out
}

/// A row's columns as shown: every field printable and cut.
struct ShownRow {
    listen: String,
    target: String,
    service: String,
    last: Option<String>,
}

/// The width to fit: the terminal's when stdout is one, else `$COLUMNS`,
/// else 80; never below 40, where nothing reads well anyway.
fn output_width() -> usize {
    use std::io::IsTerminal;
    let stdout = std::io::stdout();
    let terminal = stdout
        .is_terminal()
        .then(|| rustix::termios::tcgetwinsize(&stdout).ok())
        .flatten()
        .map(|size| usize::from(size.ws_col))
        .filter(|&columns| columns > 0);
    let columns = terminal.or_else(|| std::env::var("COLUMNS").ok()?.trim().parse().ok());
    columns.unwrap_or(80).max(40)
}

/// `text` in lines of at most `width` characters: the first starts with
/// `first`, the others with `rest` (indents); broken at spaces, and a word
/// longer than a line (a path, a unit name) is broken where the line ends.
fn wrap(text: &str, width: usize, first: &str, rest: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = first.to_owned();
    let mut fresh = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let used = line.chars().count();
        let length = word.chars().count();
        if !fresh && used + 1 + length <= width {
            line.push(' ');
            line.push_str(word);
            continue;
        }
        if !fresh {
            lines.push(std::mem::replace(&mut line, rest.to_owned()));
        }
        let mut chars: Vec<char> = word.chars().collect();
        loop {
            let room = width.saturating_sub(line.chars().count()).max(1);
            if chars.len() <= room {
                line.extend(chars);
                break;
            }
            line.extend(chars.drain(..room));
            lines.push(std::mem::replace(&mut line, rest.to_owned()));
        }
        fresh = false;
    }
    lines.push(line);
    lines
}

/// A path under `$HOME` as `~/...`, as the user thinks of it (and short
/// enough to fit a line); anything else as it is.
fn home_as_tilde(path: &str) -> std::borrow::Cow<'_, str> {
    let home = std::env::var("HOME").unwrap_or_default();
    let home = home.trim_end_matches('/');
    match path.strip_prefix(home).filter(|_| !home.is_empty()) {
        Some(rest) if rest.starts_with('/') => format!("~{rest}").into(),
        _ => path.into(),
    }
}

/// The plain view, fitted to `width` columns: a table while LISTEN,
/// TARGET, SERVICE, STATE and the counters fit on a line (LAST too when
/// it fits, else on its own line under the row), else one block per
/// binding; the unit, source, messages and hints on their own lines
/// under each row, wrapped.
fn to_text(inventory: &Inventory, now: u64, width: usize) -> String {
    let mut out = String::new();
    for problem in &inventory.problems {
        for line in wrap(&printable_message(problem), width, "problem: ", "    ") {
            let _ = writeln!(out, "{line}");
        }
    }
    if !inventory.problems.is_empty() {
        out.push('\n');
    }
    if inventory.rows.is_empty() {
        out += "no bindings (see qrexec-connect.conf(5))\n";
        return out;
    }
    let shown: Vec<ShownRow> = inventory
        .rows
        .iter()
        .map(|row| shown_row(row, now))
        .collect();
    let columns = Columns::fit(&shown, width);
    if columns.is_table {
        let _ = writeln!(out, "{}", columns.header());
    }
    for (row, shown) in inventory.rows.iter().zip(&shown) {
        let c = row.counters.clone().unwrap_or_default();
        let last = shown.last.as_deref().unwrap_or("-");
        if columns.is_table {
            let _ = writeln!(out, "{}", columns.line(row, shown, &c, last));
        } else {
            for line in narrow_lines(row, shown, &c, width) {
                let _ = writeln!(out, "{line}");
            }
        }
        for note in notes(row, shown, columns.last_inline, last) {
            for line in wrap(&note, width, "    ", "      ") {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    out
}

/// A row's text fields made printable, and its LAST in words.
fn shown_row(row: &Row, now: u64) -> ShownRow {
    let c = row.counters.as_ref();
    let last = match c.map(|c| (&c.last_result, c.last_end)) {
        Some((Some(result), Some(end))) => Some(format!(
            "{}, {}",
            printable(result.as_bytes()),
            age(end, now)
        )),
        _ => None,
    };
    // A config line's words come printable and cut already.
    let is_line = row.unit.is_empty() && matches!(row.state, State::Invalid(_));
    let show = |text: &str| {
        if is_line {
            text.to_owned()
        } else {
            printable(text.as_bytes())
        }
    };
    ShownRow {
        listen: show(&row.listen),
        target: show(&row.target),
        service: show(&row.service),
        last,
    }
}

/// The table's column widths, and whether a table (and LAST in it) fits.
struct Columns {
    listen: usize,
    target: usize,
    service: usize,
    is_table: bool,
    last_inline: bool,
}

impl Columns {
    fn fit(shown: &[ShownRow], width: usize) -> Columns {
        let widest = |f: fn(&ShownRow) -> usize| shown.iter().map(f).max().unwrap_or(0);
        let (wl, wt, ws) = (
            widest(|r| r.listen.chars().count()).max(6),
            widest(|r| r.target.chars().count()).max(6),
            widest(|r| r.service.chars().count()).max(7),
        );
        let wlast = widest(|r| r.last.as_ref().map_or(1, |l| l.chars().count())).max(4);
        // LISTEN  TARGET  SERVICE  STATE(11)  LIVE  TOTAL
        let table = wl + wt + ws + 2 * 5 + 11 + 4 + 5;
        let is_table = table <= width;
        Columns {
            listen: wl,
            target: wt,
            service: ws,
            is_table,
            last_inline: is_table && table + 2 + wlast <= width,
        }
    }

    fn header(&self) -> String {
        let (wl, wt, ws) = (self.listen, self.target, self.service);
        format!(
            "{:wl$}  {:wt$}  {:ws$}  {:11}  LIVE  TOTAL{}",
            "LISTEN",
            "TARGET",
            "SERVICE",
            "STATE",
            if self.last_inline { "  LAST" } else { "" }
        )
        .trim_end()
        .to_owned()
    }

    fn line(&self, row: &Row, shown: &ShownRow, c: &Counters, last: &str) -> String {
        let (wl, wt, ws) = (self.listen, self.target, self.service);
        let line = format!(
            "{:wl$}  {:wt$}  {:ws$}  {:11}  {:>4}  {:>5}  {}",
            shown.listen,
            shown.target,
            shown.service,
            row.state.word(),
            c.live,
            c.total,
            if self.last_inline { last } else { "" },
        );
        line.trim_end().to_owned()
    }
}

/// A row where no table fits: LISTEN, state and counts, destination.
fn narrow_lines(row: &Row, shown: &ShownRow, c: &Counters, width: usize) -> Vec<String> {
    let mut lines = wrap(&shown.listen, width, "", "  ");
    lines.push(format!(
        "    {}  live {}  total {}",
        row.state.word(),
        c.live,
        c.total
    ));
    let destination = format!(
        "{} {}",
        if shown.target.is_empty() {
            "-"
        } else {
            &shown.target
        },
        if shown.service.is_empty() {
            "-"
        } else {
            &shown.service
        },
    );
    lines.extend(wrap(&destination, width, "    to ", "      "));
    lines
}

/// The notes under a row: LAST when not in the table, source, unit, the
/// message of an invalid or conflicting row, the hint.
fn notes(row: &Row, shown: &ShownRow, last_inline: bool, last: &str) -> Vec<String> {
    let mut notes = Vec::new();
    if !last_inline && shown.last.is_some() {
        notes.push(format!("last: {last}"));
    }
    notes.push(format!(
        "from {}",
        printable(home_as_tilde(&row.source).as_bytes())
    ));
    if !row.unit.is_empty() {
        notes.push(format!("unit {}", printable(row.unit.as_bytes())));
    }
    if let State::Invalid(message) | State::Conflict(message) = &row.state {
        notes.push(printable_message(message));
    }
    if let Some(hint) = &row.hint {
        notes.push(format!("hint: {}", printable_message(hint)));
    }
    notes
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
                    "qrexec-connect status: unknown argument {}\n\
                     Usage: qrexec-connect status [--json]",
                    printable(std::os::unix::ffi::OsStrExt::as_bytes(arg.as_os_str()))
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
            eprintln!("qrexec-connect status: {}", printable_message(problem));
        }
        print!("{}", to_json(&inventory.rows));
    } else {
        print!("{}", to_text(&inventory, now, output_width()));
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
    fn a_cut_line_keeps_its_cut_mark_in_the_first_word() {
        assert_eq!(first_word("127.0.0.1:1 vm"), "127.0.0.1:1");
        assert_eq!(first_word("@aaa…(20000008 bytes)"), "@aaa…(20000008 bytes)");
        assert_eq!(first_word("@a b…(9 bytes)"), "@a");
        let words = line_words("127.0.0.1:1 vm  svc x");
        assert_eq!(words, ("127.0.0.1:1".into(), "vm".into(), "svc x".into()));
        assert_eq!(line_words("@x").1, "");
    }

    #[test]
    fn text_wraps_within_the_width_and_long_words_break() {
        let lines = wrap("hint: run systemctl --user start x", 20, "    ", "      ");
        assert_eq!(
            lines,
            ["    hint: run", "      systemctl", "      --user start x"]
        );
        let lines = wrap(&"u".repeat(30), 20, "    ", "      ");
        assert!(lines.iter().all(|l| l.chars().count() <= 20), "{lines:?}");
        assert_eq!(lines.concat().matches('u').count(), 30);
    }

    #[test]
    fn dates_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_187_723), "2026-12-02T05:02:03Z");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
        // Valid JSON either way; escaped so that printing it is safe too.
        assert_eq!(
            json_string("\u{7f}\u{9b}\u{202e}\u{a0}é\u{e0041}"),
            "\"\\u007f\\u009b\\u202e\\u00a0é\\udb40\\udc41\""
        );
    }

    #[test]
    fn listen_values_are_unescaped_as_systemctl_escapes_them() {
        // As systemctl 252 prints them (checked on a real manager).
        assert_eq!(
            manager::unescape_value("@\\303\\251\\342\\200\\256 (Stream)"),
            "@é\u{202e} (Stream)"
        );
        assert_eq!(manager::unescape_value("@plain\\\\back"), "@plain\\back");
        assert_eq!(manager::unescape_value("@h\\\\\\\\x\\303\\251"), "@h\\\\xé");
        assert_eq!(manager::unescape_value("/run/a\\x2db\\n"), "/run/a-b\n");
        // What is not an escape stays; a lone byte that is not UTF-8 shows
        // as U+FFFD.
        assert_eq!(manager::unescape_value("a\\q\\9\\"), "a\\q\\9\\");
        assert_eq!(manager::unescape_value("\\377"), "\u{fffd}");
    }

    #[test]
    fn a_socket_file_that_no_listening_socket_has_is_unreachable() {
        let dir =
            std::env::temp_dir().join(format!("qrexec-connect-status-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let address = path.to_str().unwrap().to_owned();
        let check = || {
            let files = listening_unix_files();
            unreachable_path(&address, || files.as_deref())
        };
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(check(), None);
        // The listening socket's file moves away; a closed socket's file
        // takes its name: a socket file, but nobody listens on it.
        std::fs::rename(&path, dir.join("moved")).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let why = check().expect("a dead socket file");
        assert!(why.contains("belongs to no listening socket"), "{why}");
        std::fs::remove_file(&path).unwrap();
        assert!(check().expect("no file").contains("is gone"));
        std::fs::write(&path, "").unwrap();
        assert!(check().expect("a plain file").contains("not a socket"));
        assert_eq!(unreachable_path("@name", || None), None);
        assert_eq!(unreachable_path("127.0.0.1:22", || None), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn proc_net_unix_lines_keep_the_whole_path() {
        let line = "0000000000000000: 00000002 00000000 00010000 0001 01    42 /run/a b";
        assert_eq!(proc_unix_socket(line), Some(("42", "/run/a b")));
        let line = "0000000000000000: 00000002 00000000 00010000 0001 01 123456 @name";
        assert_eq!(proc_unix_socket(line), Some(("123456", "@name")));
        let unnamed = "0000000000000000: 00000003 00000000 00000000 0001 03 7";
        assert_eq!(proc_unix_socket(unnamed), None);
    }
}
