//! Bringing the bindings back after systemd gave up on them.
//!
//! When `qrexec-connect.service` fails to start, or dies, too often (five
//! times in ten seconds by default), systemd refuses to start it again and
//! puts every socket feeding it into the `failed` state: they stop
//! listening, and nothing starts them again until the next daemon-reload.
//! A start that fails every time (systemd cannot exec it, an `ExecStartPre=`
//! fails, too many sockets for `LimitNOFILE=`) gets there on the first
//! connection, because the pending connection triggers the start again at
//! once.
//!
//! Every `qrexec-connect-*.socket` has `OnFailure=qrexec-connect-recover.service`
//! (the socket drop-in), which runs [`run`]: it says in the journal what
//! happened and what it does, waits a backoff that grows while failures keep
//! coming ([`backoff`]), clears the failed state of the daemon and the
//! sockets, and exits. The unit's `OnSuccess=sockets.target` then starts the
//! sockets, after this run has ended, so a failure right after that starts a
//! fresh run instead of being merged into this one (see docs/design.md,
//! "Recovery").
//!
//! A socket systemd could not set up (`Result=resources`: typically its
//! address is held by another process, maybe another user's) is different:
//! the daemon is fine, and starting the socket again needs the daemon
//! stopped (a socket cannot start while its service runs), only to fail
//! again while the address stays taken. Such a socket is checked, not
//! retried: the run says who holds the address ([`holder_of`]), leaves the
//! daemon and the other bindings alone, and looks again on a schedule that
//! reaches minutes ([`CHECKS`]); when the address is free, it clears the
//! socket's failed state and exits, and the socket starts (stopping the
//! daemon once; its connections live on). Meanwhile the run stays, and
//! reads the failed units again every [`POLL`] (10 s): a failure while a run is
//! busy is merged into it by systemd, so a run that read them only once
//! would lose it.
//!
//! One holder is not a stranger: another of our own `qrexec-connect-*.socket`
//! units on the same address (a config line and the old hand-written unit it
//! replaces, issue 22). Checking cannot end that: the address stays taken
//! until the user retires one unit. Such a clash ([`Clash`]) is said once,
//! naming both units and the command, and neither checked nor retried; the
//! run stays, reading the failed units every [`POLL`] as for any held
//! address, and once the other unit no longer listens there, clears the
//! failed state at once.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use super::manager::{self, systemctl};
use super::reconcile::SERVICE;
use crate::shared::signal_name;
use qrexec_connect_binding::address::{ListenAddress, Specifiers};
use qrexec_connect_binding::collision::addresses_collide;
use qrexec_connect_binding::runtime_dir::{RuntimeDir, GENERATED_FILE};
use qrexec_connect_generator::config::printable;
use qrexec_connect_generator::owner::{Account, Ids};

/// The path unit that runs the reconcile step after each daemon-reload.
const WATCHER: &str = "qrexec-connect-reconcile.path";
/// The reconcile step it starts.
const RECONCILE: &str = "qrexec-connect-reconcile.service";

/// Our record of recent recoveries and checks ([`Record`]), in
/// [`RuntimeDir`].
pub const STATE_FILE: &str = "recovery";

/// Waits before the 1st, 2nd, 3rd and every later recovery in a row. The
/// cap keeps bindings back within 30 s of the cause going away, and bounds
/// a cause that never goes away to one attempt per 20 s.
pub const BACKOFF: [Duration; 4] = [
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(20),
];

/// A recovery starting this long after the previous one is a first one
/// again. Longer than the capped wait, so a cause that persists stays at
/// the cap.
pub const QUIET: Duration = Duration::from_secs(60);

/// How often a waiting run reads the failed units again. Failures that
/// come while a run is busy are merged into it by systemd, so this bounds
/// how late they are seen (the first recovery then still comes within
/// 30 s). Each read is a `list-units` and two `show`s: measured at a 5 s
/// interval with an address held, 0.3 s of CPU a minute (debug build, the
/// manager's and systemctl's share included), so about half that at 10 s.
pub const POLL: Duration = Duration::from_secs(10);

/// Waits before the 1st, 2nd, 3rd and every later check in a row of a
/// socket systemd could not set up (`Result=resources`). Two quick looks
/// for a holder that is about to go (a program restarting, an old instance
/// shutting down), then minutes: each time the address looks free the
/// binding is restarted, which stops the daemon once, so a holder that lets
/// go and takes the address again in turn (or a cause we cannot see) costs
/// at most one daemon restart per 5 minutes. A binding whose address was
/// freed is back within 5 minutes, or at once with `daemon-reload`.
pub const CHECKS: [Duration; 4] = [
    Duration::from_secs(5),
    Duration::from_secs(15),
    Duration::from_secs(60),
    Duration::from_secs(300),
];

/// A check this long after the previous one is a first one again: longer
/// than the longest wait, so checks of an address that stays taken stay at
/// the cap, across runs.
pub const CHECKS_QUIET: Duration = Duration::from_secs(900);

/// How many recoveries came in a row, and when the last one started
/// (`CLOCK_BOOTTIME`, which counts across suspend and is the same for every
/// process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct History {
    pub in_a_row: u32,
    pub last: Duration,
}

impl History {
    pub fn parse(text: &str) -> History {
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        match (fields.next(), fields.next()) {
            (Some(Ok(in_a_row)), Some(Ok(last_ms))) => History {
                in_a_row: in_a_row.min(u32::MAX as u64) as u32,
                last: Duration::from_millis(last_ms),
            },
            _ => History::default(),
        }
    }

    /// The history including a recovery starting `now`.
    pub fn next(&self, now: Duration) -> History {
        self.next_after(now, QUIET)
    }

    /// The history including one more event at `now`; one that comes more
    /// than `quiet` after the last starts a new series.
    pub fn next_after(&self, now: Duration, quiet: Duration) -> History {
        let quiet = self.in_a_row == 0 || now.saturating_sub(self.last) > quiet || now < self.last;
        History {
            in_a_row: if quiet {
                1
            } else {
                self.in_a_row.saturating_add(1)
            },
            last: now,
        }
    }
}

/// What [`STATE_FILE`] holds: `RECOVERIES LAST_MS CHECKS LAST_MS`. A
/// file that does not parse counts as empty; one from before checks
/// existed has only the first two fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Record {
    pub recoveries: History,
    pub checks: History,
}

impl Record {
    pub fn parse(text: &str) -> Record {
        let mut fields = text.split_whitespace();
        let recoveries = History::parse(&fields.by_ref().take(2).collect::<Vec<_>>().join(" "));
        let checks = History::parse(&fields.take(2).collect::<Vec<_>>().join(" "));
        Record { recoveries, checks }
    }

    pub fn format(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.recoveries.in_a_row,
            self.recoveries.last.as_millis(),
            self.checks.in_a_row,
            self.checks.last.as_millis()
        )
    }

    /// Reads the record, counts one more recovery or check with `count`,
    /// writes it back; returns the new count. An unreadable record counts
    /// as empty (and is replaced); one that cannot be written is said and
    /// the count used all the same.
    fn count(dir: &RuntimeDir, count: impl FnOnce(&mut Record) -> u32) -> u32 {
        let mut record = dir
            .read(STATE_FILE)
            .ok()
            .flatten()
            .map(|text| Record::parse(&text))
            .unwrap_or_default();
        let in_a_row = count(&mut record);
        if let Err(e) = dir.write_atomically(STATE_FILE, &record.format()) {
            println!("<4>qrexec-connect recover: cannot record the count of recoveries: {e}");
        }
        in_a_row
    }
}

/// The wait before recovery number `in_a_row` (1 is the first).
pub fn backoff(in_a_row: u32) -> Duration {
    let index = (in_a_row.max(1) - 1) as usize;
    BACKOFF[index.min(BACKOFF.len() - 1)]
}

/// The wait before check number `in_a_row` (1 is the first).
pub fn check_wait(in_a_row: u32) -> Duration {
    let index = (in_a_row.max(1) - 1) as usize;
    CHECKS[index.min(CHECKS.len() - 1)]
}

/// What the manager says about the daemon's last failure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonState {
    pub result: String,
    /// `ExecMainPID`: 0 when the main process never ran.
    pub main_pid: u32,
    /// `ExecMainCode`: 1 exited, 2 killed, 3 dumped core.
    pub main_code: i32,
    pub main_status: i32,
    /// `ExecStartPre=` as `systemctl show` prints it: one `{ ... }` per command.
    pub start_pre: String,
}

/// One binding socket (or the reload watcher) as the manager sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketState {
    pub name: String,
    pub active_state: String,
    pub result: String,
    /// Its addresses (`Listen=`, without the ` (Stream)` after each), when
    /// asked for.
    pub listen: Vec<String>,
}

/// Parses `systemctl show` output (blocks separated by blank lines).
pub fn parse_sockets(text: &str) -> Vec<SocketState> {
    text.split("\n\n")
        .filter_map(|block| {
            let values = |key: &'static str| {
                block.lines().filter_map(move |line| {
                    line.strip_prefix(key)
                        .and_then(|rest| rest.strip_prefix('='))
                        .map(str::to_owned)
                })
            };
            let value = |key| values(key).next();
            Some(SocketState {
                name: value("Id").filter(|name| !name.is_empty())?,
                active_state: value("ActiveState").unwrap_or_default(),
                result: value("Result").unwrap_or_default(),
                listen: values("Listen")
                    .map(|listen| match listen.rsplit_once(" (") {
                        Some((address, _kind)) => address.to_owned(),
                        None => listen,
                    })
                    .collect(),
            })
        })
        .collect()
}

pub fn parse_daemon(text: &str) -> DaemonState {
    let mut state = DaemonState::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "Result" => state.result = value.to_owned(),
            "ExecMainPID" => state.main_pid = value.parse().unwrap_or(0),
            "ExecMainCode" => state.main_code = value.parse().unwrap_or(0),
            "ExecMainStatus" => state.main_status = value.parse().unwrap_or(0),
            "ExecStartPre" => state.start_pre = value.to_owned(),
            _ => {}
        }
    }
    state
}

/// The first failed command in an `ExecStartPre=` property, as
/// `(command line, words for how it ended)`.
fn failed_start_pre(property: &str) -> Option<(String, String)> {
    property.split("{ ").find_map(|command| {
        let field = |name: &str| {
            command
                .split(" ; ")
                .find_map(|part| part.trim().strip_prefix(name))
                .map(|v| v.trim_end_matches(" }").trim().to_owned())
        };
        let argv = field("argv[]=")?;
        let code = field("code=")?;
        let status = field("status=")?;
        let status = status.split('/').next().unwrap_or("").to_owned();
        let how = match code.as_str() {
            "exited" if status != "0" => format!("exited with status {status}"),
            "killed" | "dumped" => format!(
                "was killed by signal {}",
                status
                    .parse()
                    .map(signal_name)
                    .unwrap_or_else(|_| status.clone())
            ),
            _ => return None,
        };
        Some((argv, how))
    })
}

/// Words for the statuses systemd uses when it fails to set up a process
/// before running it (systemd.exec(5), "Process exit codes"); the ones a
/// user of this service can meet.
fn setup_step(status: i32) -> Option<&'static str> {
    Some(match status {
        200 => "200/CHDIR: cannot change to the working directory",
        202 => "202/FDS: cannot pass the sockets (more sockets than LimitNOFILE= allows?)",
        203 => "203/EXEC: cannot run the program (is it installed at the ExecStart= path?)",
        204 => "204/MEMORY: out of memory",
        205 => "205/LIMITS: cannot apply a Limit*= setting",
        209 => "209/STDOUT: cannot set up standard output",
        214 => "214/SETSCHEDULER: cannot apply the scheduling settings",
        217 => "217/USER: cannot switch to the user",
        218 => "218/CAPABILITIES: cannot apply the capability settings",
        226 => "226/NAMESPACE: cannot set up the file system namespace",
        228 => "228/SECCOMP: cannot apply the system call filter",
        232 => "232/ADDRESS_FAMILIES: cannot apply RestrictAddressFamilies=",
        _ => return None,
    })
}

/// In words: how the daemon's last run ended.
pub fn describe_daemon(daemon: &DaemonState) -> String {
    if let Some((command, how)) = failed_start_pre(&daemon.start_pre) {
        return format!("could not start: its ExecStartPre= command ({command}) {how}");
    }
    match (daemon.main_code, daemon.main_status) {
        (1, status) if (200..=245).contains(&status) => match setup_step(status) {
            Some(words) => format!("could not start: systemd failed to set it up, status {words}"),
            None => format!(
                "could not start: systemd failed to set it up, status {status} \
                 (see \"Process exit codes\" in systemd.exec(5))"
            ),
        },
        (1, status) => format!(
            "exited with status {status} (its own message, if any, is just before this one)"
        ),
        (2, signal) => format!("was killed by signal {}", signal_name(signal)),
        (3, signal) => format!("crashed with signal {} (core dumped)", signal_name(signal)),
        _ => match daemon.result.as_str() {
            "timeout" => "did not report ready in time (TimeoutStartSec=)".to_owned(),
            "" | "success" => "stopped".to_owned(),
            other => format!("failed with result {other}"),
        },
    }
}

/// In words: why the manager stopped a socket (its `Result=`).
fn describe_socket_result(result: &str) -> String {
    match result {
        "service-start-limit-hit" => {
            format!("{SERVICE} failed to start too often in a short time (start limit hit)")
        }
        "trigger-limit-hit" => {
            "connections kept arriving while the daemon did not take them (trigger limit hit)"
                .to_owned()
        }
        "resources" => {
            "systemd could not set the socket up (address in use, or out of resources)".to_owned()
        }
        "start-limit-hit" => "the socket was started too often (start limit hit)".to_owned(),
        other => format!("result {other}"),
    }
}

/// Names a list, shortened after a few.
fn name_some(names: &[&str]) -> String {
    const SHOWN: usize = 4;
    if names.len() <= SHOWN {
        names.join(", ")
    } else {
        format!(
            "{} and {} more",
            names[..SHOWN].join(", "),
            names.len() - SHOWN
        )
    }
}

/// The warning: what failed, why, and which bindings are down.
pub fn describe_failure(daemon: &DaemonState, failed: &[&SocketState]) -> String {
    let names: Vec<&str> = failed.iter().map(|s| s.name.as_str()).collect();
    let mut results: Vec<&str> = failed.iter().map(|s| s.result.as_str()).collect();
    results.sort_unstable();
    results.dedup();
    let why: Vec<String> = results
        .iter()
        .map(|result| {
            if *result == "service-start-limit-hit" {
                format!(
                    "{SERVICE} failed to start too often in a short time, so systemd stopped \
                     its sockets (last failure: it {})",
                    describe_daemon(daemon)
                )
            } else {
                describe_socket_result(result)
            }
        })
        .collect();
    format!(
        "{}; {} binding socket{} stopped listening: {}",
        why.join("; "),
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        name_some(&names)
    )
}

/// Another process holding an address, as `/proc` tells: the uid from
/// `/proc/net/tcp{,6}` or the socket file's owner, the socket's inode, and
/// (after [`Holder::identify`]) the process, pid and name, when its fds can
/// be looked at (ours always, anyone's as root).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Holder {
    pub uid: Option<u32>,
    pub inode: Option<u64>,
    pub process: Option<(u32, String)>,
}

impl Holder {
    /// Finds the process holding the socket: a walk over every process's
    /// fds, so done only for what is said in the journal.
    pub fn identify(&mut self) {
        if self.process.is_some() {
            return;
        }
        self.process = self.inode.and_then(process_with_socket);
        if self.uid.is_none() {
            self.uid = self.process.as_ref().and_then(|(pid, _)| {
                std::fs::metadata(format!("/proc/{pid}"))
                    .ok()
                    .map(|m| m.uid())
            });
        }
    }
}

/// `uid 2001 (mallory), pid 1234 "nc"`: as much as is known.
impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(uid) = self.uid {
            parts.push(format!("uid {}", Account::user(uid)));
        }
        if let Some((pid, name)) = &self.process {
            parts.push(format!("pid {pid} {name:?}"));
        }
        if parts.is_empty() {
            parts.push("another user's: /proc does not say whose".to_owned());
        }
        f.write_str(&parts.join(", "))
    }
}

/// Who holds `address` (`127.0.0.1:22`, `[::1]:80`, `/path`, `@name`, as
/// `Listen=` shows it), so that binding it fails; `None` when it is free.
/// TCP: a listening socket on the port at the same address or a wildcard,
/// or else the address failing a trial bind as systemd binds it (a socket
/// bound without listening has no LISTEN row), with the uid of a row in
/// any other state on it when there is one. Path: a file of another user
/// there (systemd unlinks a file in its way and binds again; our own goes,
/// another user's in a sticky directory does not). Abstract: a listening
/// socket of that name, or else the name failing a trial bind.
pub fn holder_of(address: &str) -> Option<Holder> {
    if address.starts_with('/') {
        let meta = std::fs::symlink_metadata(address).ok()?;
        if meta.uid() == Ids::current()?.uid {
            return None;
        }
        return Some(Holder {
            uid: Some(meta.uid()),
            inode: unix_socket_inode(address),
            process: None,
        });
    }
    if let Some(name) = address.strip_prefix('@') {
        let inode = unix_socket_inode(address);
        let unix = SockAddr::unix(format!("\0{name}")).ok()?;
        return (inode.is_some() || bind_fails_in_use(Domain::UNIX, &unix)).then_some(Holder {
            uid: None,
            inode,
            process: None,
        });
    }
    let wanted: SocketAddr = address.parse().ok()?;
    let tables: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .collect();
    let row = |listening| {
        tables
            .iter()
            .find_map(|table| tcp_socket(table, wanted, listening))
    };
    if let Some((uid, inode)) = row(true) {
        return Some(Holder {
            uid: Some(uid),
            inode: Some(inode),
            process: None,
        });
    }
    if !bind_fails_in_use(Domain::for_address(wanted), &SockAddr::from(wanted)) {
        return None;
    }
    let (uid, inode) = row(false).unzip();
    Some(Holder {
        uid,
        inode,
        process: None,
    })
}

/// Whether binding a stream socket to `address` fails with `EADDRINUSE`,
/// tried as systemd binds (with `SO_REUSEADDR`, which lets a port in
/// `TIME_WAIT` be bound again). The socket never listens and is closed at
/// once. Any other error (no permission for a low port, say) is not taken
/// for a holder.
fn bind_fails_in_use(domain: Domain, address: &SockAddr) -> bool {
    let Ok(socket) = Socket::new(domain, Type::STREAM, None) else {
        return false;
    };
    if domain != Domain::UNIX && socket.set_reuse_address(true).is_err() {
        return false;
    }
    socket
        .bind(address)
        .is_err_and(|e| e.kind() == io::ErrorKind::AddrInUse)
}

/// In a `/proc/net/tcp` or `tcp6` table, the `(uid, inode)` of a socket
/// (a listening one, or one in any other state) on an address binding
/// `wanted` would collide with: the same port, and the same address or a
/// wildcard on either side (IPv4-mapped addresses compared as IPv4).
pub fn tcp_socket(table: &str, wanted: SocketAddr, listening: bool) -> Option<(u32, u64)> {
    const LISTEN: &str = "0A";
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let wanted_ip = plain(wanted.ip());
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, uid, inode) = (
            fields.get(1)?,
            fields.get(3)?,
            fields.get(7)?,
            fields.get(9)?,
        );
        if (*state == LISTEN) != listening {
            return None;
        }
        let (ip, port) = local.split_once(':')?;
        if u16::from_str_radix(port, 16).ok()? != wanted.port() {
            return None;
        }
        let ip = plain(kernel_ip(ip)?);
        let collides = ip == wanted_ip || ip.is_unspecified() || wanted_ip.is_unspecified();
        collides.then(|| Some((uid.parse().ok()?, inode.parse().ok()?)))?
    })
}

/// An address as `/proc/net/tcp*` prints it: the bytes in network order,
/// shown as native-endian 32-bit words in hex.
fn kernel_ip(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<[u8; 4]>> = (0..hex.len() / 8)
        .map(|i| {
            let word = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
            Some(word.to_ne_bytes())
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).ok()?,
        ))),
        _ => None,
    }
}

/// The inode of a listening Unix stream socket at `address` (a path, or
/// `@name`), from `/proc/net/unix`.
fn unix_socket_inode(address: &str) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    unix_listener(&table, address)
}

/// In a `/proc/net/unix` table, the inode of the listening socket at
/// `address`.
pub fn unix_listener(table: &str, address: &str) -> Option<u64> {
    const ACCEPTING: u32 = 1 << 16; // __SO_ACCEPTCON
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
        let inode = fields.get(6)?.parse().ok()?;
        (flags & ACCEPTING != 0 && fields.get(7) == Some(&address)).then_some(inode)
    })
}

/// The first process with the socket `inode` among its fds, and its name
/// (made printable); only processes whose fds we may read are seen.
fn process_with_socket(inode: u64) -> Option<(u32, String)> {
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
            fds.flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|link| link.as_os_str() == wanted.as_str())
                })
                .then(|| {
                    let name = std::fs::read(entry.path().join("comm")).unwrap_or_default();
                    (pid, printable(name.trim_ascii_end()))
                })
        })
}

/// A socket that systemd could not set up because another of our own
/// socket units listens on its address.
#[derive(Debug, Clone)]
struct Clash {
    socket: SocketState,
    address: String,
    /// Our unit that listens there.
    other: String,
    /// Which of the two the generator did not write (the one to retire);
    /// `None` when both or neither were written by hand.
    hand_written: Option<String>,
}

impl Clash {
    fn describe(&self) -> String {
        let then = format!(
            "; the other then starts within {} s (see the README, \"Coming from the Python \
             qrexec-connect\")",
            POLL.as_secs()
        );
        let what = match &self.hand_written {
            // `disable --now` leaves a failed unit failed: reset it too.
            Some(old) if *old == self.socket.name => format!(
                "retire this old hand-written unit with 'systemctl --user disable --now {old}' \
                 and 'systemctl --user reset-failed {old}'"
            ),
            Some(old) => format!(
                "retire the old hand-written unit with 'systemctl --user disable --now \
                 {old}'{then}"
            ),
            None => format!(
                "keep one of them ('systemctl --user disable --now {}', or remove its config \
                 line){then}",
                self.other
            ),
        };
        format!(
            "{} cannot listen: its address {} is taken by our own {}; two units cannot share \
             an address, so this is not retried: {what}",
            self.socket.name,
            printable(self.address.as_bytes()),
            self.other,
        )
    }
}

/// Our socket units that listen now: name, address, and whether written by
/// hand.
type Listening = Vec<(String, String, bool)>;

/// Our socket units that listen now, with their addresses: the generated
/// ones from the generator's record, the others (written by hand, few)
/// from the manager; and the names the generator wrote. Read only when a
/// socket could not be set up.
fn our_listening_units(
    listed: &[manager::ListedUnit],
) -> io::Result<(Listening, std::collections::BTreeSet<String>)> {
    let record = RuntimeDir::from_env()
        .ok()
        .and_then(|dir| dir.read(GENERATED_FILE).ok().flatten())
        .map(|text| super::reconcile::parse_state(&text))
        .unwrap_or_default();
    let specifiers = Specifiers::from_env();
    let mut ours = Vec::new();
    let mut ask = Vec::new();
    for unit in listed.iter().filter(|u| u.active_state == "active") {
        match record.get(&unit.name) {
            Some(written) => {
                let address = ListenAddress::parse(&written.listen)
                    .ok()
                    .and_then(|a| a.expanded_path(&specifiers))
                    .map(|path| String::from_utf8_lossy(&path).into_owned())
                    .unwrap_or_else(|| written.listen.clone());
                ours.push((unit.name.clone(), address, false));
            }
            None => ask.push(unit.name.as_str()),
        }
    }
    for socket in parse_sockets(&manager::show(&["Id", "Listen"], &ask)?) {
        for address in socket.listen {
            ours.push((socket.name.clone(), manager::unescape_value(&address), true));
        }
    }
    Ok((ours, record.into_keys().collect()))
}

/// A socket that systemd could not set up, and who holds each of its
/// addresses now (empty: nobody we can see).
#[derive(Debug, Clone)]
struct Unset {
    socket: SocketState,
    holders: Vec<(String, Holder)>,
}

impl Unset {
    fn is_held(&self) -> bool {
        !self.holders.is_empty()
    }

    /// `127.0.0.1:22 is in use by another process (uid 2001, pid 7 "nc")`.
    fn holders_in_words(&self) -> String {
        let held: Vec<String> = self
            .holders
            .iter()
            .map(|(address, holder)| {
                format!(
                    "its address {} is in use by another process ({holder})",
                    printable(address.as_bytes())
                )
            })
            .collect();
        held.join("; ")
    }

    /// Who holds what, to tell a change of holder: the addresses, uids
    /// and socket inodes.
    fn holders_key(&self) -> String {
        let key: Vec<String> = self
            .holders
            .iter()
            .map(|(address, holder)| format!("{address} {:?} {:?}", holder.uid, holder.inode))
            .collect();
        key.join(" ")
    }

    /// Finds the processes of the holders, for the journal.
    fn identify(&mut self) {
        for (_, holder) in &mut self.holders {
            holder.identify();
        }
    }

    fn describe(&self) -> String {
        if self.is_held() {
            format!(
                "{} cannot listen: {}",
                self.socket.name,
                self.holders_in_words()
            )
        } else {
            format!(
                "{} cannot listen: {}",
                self.socket.name,
                describe_socket_result("resources")
            )
        }
    }
}

/// The failed units recover acts on, read at one moment.
#[derive(Debug, Clone, Default)]
struct Failures {
    /// The daemon's sockets that failed for another reason than
    /// resources (start limit, trigger limit, ...).
    sockets: Vec<SocketState>,
    /// Sockets systemd could not set up (`Result=resources`).
    unset: Vec<Unset>,
    /// Of those, the ones whose address another of our units holds.
    clashes: Vec<Clash>,
    /// The reload watcher, when it failed.
    watcher: Option<SocketState>,
}

impl Failures {
    /// One `list-units`, a `show` of the failed sockets and one of the
    /// watcher.
    fn read() -> io::Result<Failures> {
        let listed = manager::socket_units()?;
        let failed: Vec<&str> = listed
            .iter()
            .filter(|unit| unit.active_state == "failed")
            .map(|unit| unit.name.as_str())
            .collect();
        let shown = manager::show(&["Id", "ActiveState", "Result", "Listen"], &failed)?;
        let mut failures = Failures::default();
        let mut ours = None;
        for socket in parse_sockets(&shown) {
            if socket.active_state != "failed" {
                continue;
            }
            if socket.result == "resources" {
                let (ours, generated) = match &ours {
                    Some(ours) => ours,
                    None => ours.insert(our_listening_units(&listed)?),
                };
                let clash = socket.listen.iter().find_map(|address| {
                    ours.iter()
                        .find(|(name, theirs, _)| {
                            *name != socket.name && addresses_collide(address, theirs)
                        })
                        .map(|(name, _, by_hand)| (address.clone(), name.clone(), *by_hand))
                });
                if let Some((address, other, other_by_hand)) = clash {
                    let this_by_hand = !generated.contains(&socket.name);
                    let hand_written = match (this_by_hand, other_by_hand) {
                        (true, false) => Some(socket.name.clone()),
                        (false, true) => Some(other.clone()),
                        _ => None,
                    };
                    failures.clashes.push(Clash {
                        socket,
                        address,
                        other,
                        hand_written,
                    });
                    continue;
                }
                let holders = socket
                    .listen
                    .iter()
                    .filter_map(|address| Some((address.clone(), holder_of(address)?)))
                    .collect();
                failures.unset.push(Unset { socket, holders });
            } else {
                failures.sockets.push(socket);
            }
        }
        failures.watcher = parse_sockets(&manager::show(
            &["Id", "ActiveState", "Result"],
            &[WATCHER],
        )?)
        .pop()
        .filter(|watcher| watcher.active_state == "failed");
        Ok(failures)
    }

    fn is_empty(&self) -> bool {
        self.sockets.is_empty()
            && self.unset.is_empty()
            && self.clashes.is_empty()
            && self.watcher.is_none()
    }

    /// What needs the recovery back-off: failed daemon sockets or watcher.
    fn need_recovery(&self) -> bool {
        !self.sockets.is_empty() || self.watcher.is_some()
    }
}

/// What this run has said, so that each failure is explained once (and
/// again when its holder changes).
#[derive(Default)]
struct Told {
    sockets: BTreeMap<String, String>,
    watcher: bool,
    /// Sockets said to clash with another of our units.
    clashes: std::collections::BTreeSet<String>,
}

impl Told {
    /// Warnings (`<4>`) for what failed since the last report.
    fn report(&mut self, failures: &mut Failures) {
        let new: Vec<&SocketState> = failures
            .sockets
            .iter()
            .filter(|s| self.sockets.get(&s.name) != Some(&s.result))
            .collect();
        if !new.is_empty() {
            if let Err(e) = report_daemon_failure(&new) {
                println!("<4>qrexec-connect recover: {e}");
            }
            for socket in new {
                self.sockets
                    .insert(socket.name.clone(), socket.result.clone());
            }
        }
        for unset in &mut failures.unset {
            let told = self.sockets.get(&unset.socket.name);
            // A holder that went away is for the next check to act on.
            if told.is_some() && !unset.is_held() {
                continue;
            }
            let key = unset.holders_key();
            if told != Some(&key) {
                unset.identify();
                println!("<4>qrexec-connect recover: {}", unset.describe());
                self.sockets.insert(unset.socket.name.clone(), key);
            }
        }
        for clash in &failures.clashes {
            if self.clashes.insert(clash.socket.name.clone()) {
                // <4> warning: a binding is down until the user acts.
                println!("<4>qrexec-connect recover: {}", clash.describe());
                self.sockets
                    .insert(clash.socket.name.clone(), "clash".to_owned());
            }
        }
        match &failures.watcher {
            Some(watcher) if !self.watcher => println!(
                "<4>qrexec-connect recover: the reload watcher {WATCHER} failed ({}); until it \
                 runs again, daemon-reload does not apply binding changes",
                watcher.result
            ),
            _ => {}
        }
        self.watcher = failures.watcher.is_some();
    }
}

/// Runs one recovery: report, wait, clear the failed states; for sockets
/// systemd could not set up, check until their address is free. Messages
/// go to stdout with syslog priority prefixes.
pub fn run() -> io::Result<()> {
    let mut failures = Failures::read()?;
    if failures.is_empty() {
        failures = read_when_starts_end(failures);
    }
    if failures.is_empty() {
        // Run by hand, or everything came back meanwhile.
        println!(
            "<6>qrexec-connect recover: no binding socket and not the reload watcher is in \
             the failed state"
        );
        return Ok(());
    }
    let dir = RuntimeDir::from_env()?;
    let mut told = Told::default();
    let mut schedule = Schedule::default();
    loop {
        told.report(&mut failures);
        if restart_ended_clashes(&failures, &told) {
            return Ok(());
        }
        if failures.unset.is_empty() {
            schedule.check_at = None;
        }
        if failures.is_empty() {
            failures = read_when_starts_end(failures);
        }
        if failures.is_empty() {
            // Back meanwhile (a daemon-reload starts wanted sockets).
            return Ok(());
        }
        let now = Instant::now();
        schedule.plan(&failures, &dir, now);
        if schedule.recovery_at.is_some_and(|at| now >= at) {
            // These failures were read after the wait: whatever failed
            // during it is handled too.
            schedule.recovery_at = None;
            if recover(&failures) {
                return Ok(());
            }
            failures = read_again(failures);
            continue;
        }
        if schedule.check_at.is_some_and(|at| now >= at) {
            match check_addresses(&failures, &dir) {
                Some(wait) => schedule.check_at = Some(now + wait),
                None => return Ok(()),
            }
        }
        std::thread::sleep(schedule.next_wait());
        failures = read_again(failures);
    }
}

/// When `run` next recovers (after announcing it) and next checks the
/// addresses of sockets systemd could not set up.
#[derive(Default)]
struct Schedule {
    recovery_at: Option<Instant>,
    check_at: Option<Instant>,
}

impl Schedule {
    /// Sets the times not set yet that `failures` need, and says so.
    fn plan(&mut self, failures: &Failures, dir: &RuntimeDir, now: Instant) {
        if failures.need_recovery() && self.recovery_at.is_none() {
            let in_a_row = Record::count(dir, |record| {
                record.recoveries = record.recoveries.next(boot_time());
                record.recoveries.in_a_row
            });
            self.recovery_at = Some(now + announce_recovery(failures, in_a_row));
        }
        if !failures.unset.is_empty() && self.check_at.is_none() {
            let wait = next_check(dir);
            let names: Vec<&str> = failures
                .unset
                .iter()
                .map(|u| u.socket.name.as_str())
                .collect();
            // <5> notice: what we do about it.
            println!(
                "<5>qrexec-connect recover: leaving {SERVICE} and the other bindings alone \
                 for {}; checking again in {} s",
                name_some(&names),
                wait.as_secs()
            );
            self.check_at = Some(now + wait);
        }
    }

    /// How long to sleep: until the next time due, at most [`POLL`].
    fn next_wait(&self) -> Duration {
        [self.recovery_at, self.check_at]
            .into_iter()
            .flatten()
            .min()
            .map_or(POLL, |at| {
                at.saturating_duration_since(Instant::now()).min(POLL)
            })
    }
}

/// A clash that ended (the other unit stopped): its address looks free, so
/// it starts again now, without the checks' schedule. True when one did.
fn restart_ended_clashes(failures: &Failures, told: &Told) -> bool {
    let ended: Vec<&str> = failures
        .unset
        .iter()
        .filter(|u| !u.is_held() && told.clashes.contains(&u.socket.name))
        .map(|u| u.socket.name.as_str())
        .collect();
    if ended.is_empty() {
        return false;
    }
    let cleared = reset_failed(&ended);
    if cleared.is_empty() {
        return false;
    }
    // <5> notice: the one daemon stop this costs.
    println!(
        "<5>qrexec-connect recover: no other unit of ours listens on the address of \
         {} now; sockets.target starts it again ({SERVICE} stops once for that, its \
         live connections continue)",
        name_some(&cleared)
    );
    true
}

/// The scheduled check of the sockets systemd could not set up: those whose
/// address is free now start again (`None`: done); for the others, who
/// still holds it, and the wait before the next check.
fn check_addresses(failures: &Failures, dir: &RuntimeDir) -> Option<Duration> {
    let (mut held, free): (Vec<Unset>, Vec<Unset>) =
        failures.unset.iter().cloned().partition(|u| u.is_held());
    if !free.is_empty() {
        let names: Vec<&str> = free.iter().map(|u| u.socket.name.as_str()).collect();
        let cleared = reset_failed(&names);
        if !cleared.is_empty() {
            // <5> notice: the one daemon stop this costs.
            println!(
                "<5>qrexec-connect recover: nothing we can see holds the address of {} \
                 now; sockets.target starts it again ({SERVICE} stops once for that, \
                 its live connections continue)",
                name_some(&cleared)
            );
            return None;
        }
    }
    let wait = next_check(dir);
    for unset in &mut held {
        unset.identify();
        println!(
            "<5>qrexec-connect recover: {}: {}; checking again in {} s",
            unset.socket.name,
            unset
                .holders_in_words()
                .replace(" is in use ", " is still in use "),
            wait.as_secs()
        );
    }
    Some(wait)
}

/// Counts one more check in the record; the wait before it.
fn next_check(dir: &RuntimeDir) -> Duration {
    let in_a_row = Record::count(dir, |record| {
        record.checks = record.checks.next_after(boot_time(), CHECKS_QUIET);
        record.checks.in_a_row
    });
    check_wait(in_a_row)
}

/// The failed units now; if the manager cannot be asked (busy with a
/// reload, say), what was read before, so that a run that may last long
/// does not end on a passing error.
/// How long a run that found nothing failed waits for starts of our
/// sockets under way, at most.
const STARTS_UNDER_WAY: Duration = Duration::from_secs(10);

/// Reads the failed units again once no job of one of our sockets is
/// pending (at most [`STARTS_UNDER_WAY`]). A run ends when it reads nothing
/// failed; a socket whose start is under way then (a reconcile's) may fail
/// a moment later, and its `OnFailure=` start of this unit is merged into
/// the ending run and lost: the socket stays failed with nobody checking.
/// Waiting for those jobs first means their failures are read here.
fn read_when_starts_end(before: Failures) -> Failures {
    let deadline = Instant::now() + STARTS_UNDER_WAY;
    while Instant::now() < deadline && sockets_have_jobs() {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Also when no job was pending: one may have begun and failed since
    // the first read.
    read_again(before)
}

/// Whether a job (a start, typically) of one of our sockets is pending.
fn sockets_have_jobs() -> bool {
    systemctl(&[
        "list-jobs",
        "--plain",
        "--no-legend",
        "qrexec-connect-*.socket",
    ])
    .is_ok_and(|jobs| !jobs.trim().is_empty())
}

fn read_again(before: Failures) -> Failures {
    match Failures::read() {
        Ok(now) => now,
        Err(e) => {
            println!(
                "<4>qrexec-connect recover: cannot read the failed units ({e}); trying again \
                 in {} s",
                POLL.as_secs()
            );
            before
        }
    }
}

/// Says what will be restarted and when; the wait.
fn announce_recovery(failures: &Failures, in_a_row: u32) -> Duration {
    let wait = backoff(in_a_row);
    let persisting = if in_a_row as usize >= BACKOFF.len() {
        format!(
            " (recovery {in_a_row} in a row: the cause persists; retrying at most every {} s \
             until it stops)",
            wait.as_secs()
        )
    } else if in_a_row > 1 {
        format!(" (recovery {in_a_row} in a row)")
    } else {
        String::new()
    };
    let what = match (failures.sockets.is_empty(), failures.watcher.is_some()) {
        (false, false) => "the binding sockets",
        (true, _) => "the reload watcher",
        (false, true) => "the binding sockets and the reload watcher",
    };
    // <5> notice: what we do about it.
    println!(
        "<5>qrexec-connect recover: restarting {what} in {} s{persisting}",
        wait.as_secs()
    );
    wait
}

/// Clears the failed states after the wait; true when sockets were
/// cleared, which the unit's `OnSuccess=sockets.target` starts once this
/// run has ended.
fn recover(failures: &Failures) -> bool {
    let mut cleared_sockets = false;
    if !failures.sockets.is_empty() {
        // The start-limit counters go with the failed state, so the daemon
        // gets its full allowance again. Sockets systemd could not set up
        // are tried again too: the daemon is down, so that costs nothing.
        let mut units = vec![SERVICE];
        units.extend(failures.sockets.iter().map(|s| s.name.as_str()));
        units.extend(failures.unset.iter().map(|u| u.socket.name.as_str()));
        let cleared = reset_failed(&units);
        let sockets = cleared.iter().filter(|unit| **unit != SERVICE).count();
        cleared_sockets = sockets > 0;
        println!(
            "<5>qrexec-connect recover: cleared the failed state of {SERVICE} and {sockets} \
             socket{}; sockets.target starts them again",
            if sockets == 1 { "" } else { "s" }
        );
    }
    if failures.watcher.is_some() {
        // A path unit pulls in nothing else: started by name. If its flag
        // is still raised, the reload it missed is applied at once.
        reset_failed(&[WATCHER, RECONCILE]);
        match systemctl(&["start", "--no-block", WATCHER]) {
            Ok(_) => println!("<5>qrexec-connect recover: started {WATCHER} again"),
            Err(e) => println!("<4>qrexec-connect recover: {e}"),
        }
    }
    cleared_sockets
}

/// `systemctl reset-failed` of `units`: in one call, and if that fails,
/// one unit at a time, so that a unit the manager has forgotten meanwhile
/// (its file removed, a reload, its failure cleared by hand: "not loaded")
/// is skipped and any other error is logged without stopping the rest.
/// Returns the units whose failed state is now cleared.
fn reset_failed<'a>(units: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["reset-failed", "--"];
    args.extend(units);
    if systemctl(&args).is_ok() {
        return units.to_vec();
    }
    units
        .iter()
        .copied()
        .filter(|unit| match systemctl(&["reset-failed", "--", unit]) {
            Ok(_) => true,
            Err(e) if e.to_string().contains("not loaded") => false,
            Err(e) => {
                println!("<4>qrexec-connect recover: {e}");
                false
            }
        })
        .collect()
}

/// Says why the daemon's sockets failed, from what systemd kept of its
/// last run.
fn report_daemon_failure(failed: &[&SocketState]) -> io::Result<()> {
    let daemon = parse_daemon(&systemctl(&[
        "show",
        "-p",
        "Result",
        "-p",
        "ExecMainPID",
        "-p",
        "ExecMainCode",
        "-p",
        "ExecMainStatus",
        "-p",
        "ExecStartPre",
        SERVICE,
    ])?);
    // <4> warning: bindings are down.
    println!(
        "<4>qrexec-connect recover: {}",
        describe_failure(&daemon, failed)
    );
    Ok(())
}

/// Time since boot, suspend included.
fn boot_time() -> Duration {
    use rustix::time::{clock_gettime_dynamic, ClockId, DynamicClockId};
    match clock_gettime_dynamic(DynamicClockId::Known(ClockId::Boottime)) {
        Ok(now) => Duration::new(now.tv_sec as u64, now.tv_nsec as u32),
        Err(_) => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_clash_names_both_units_and_the_unit_to_retire() {
        let socket = |name: &str| SocketState {
            name: name.into(),
            active_state: "failed".into(),
            result: "resources".into(),
            listen: vec!["127.0.0.1:22".into()],
        };
        let clash = Clash {
            socket: socket("qrexec-connect-127.0.0.1:22.socket"),
            address: "127.0.0.1:22".into(),
            other: "qrexec-connect-old.socket".into(),
            hand_written: Some("qrexec-connect-old.socket".into()),
        };
        let text = clash.describe();
        assert!(text.starts_with("qrexec-connect-127.0.0.1:22.socket cannot listen"));
        assert!(
            text.contains("taken by our own qrexec-connect-old.socket"),
            "{text}"
        );
        assert!(
            text.contains("disable --now qrexec-connect-old.socket"),
            "{text}"
        );
        let clash = Clash {
            socket: socket("qrexec-connect-old.socket"),
            other: "qrexec-connect-127.0.0.1:22.socket".into(),
            ..clash
        };
        let text = clash.describe();
        assert!(
            text.contains("reset-failed qrexec-connect-old.socket"),
            "{text}"
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets_after_a_quiet_period() {
        let mut history = History::default();
        let mut waits = Vec::new();
        for at in [100, 103, 110, 122, 144, 166] {
            history = history.next(S(at));
            waits.push(backoff(history.in_a_row).as_secs());
        }
        assert_eq!(waits, [2, 5, 10, 20, 20, 20]);
        assert_eq!(history.next(S(166) + QUIET + S(1)).in_a_row, 1);
        let record = Record {
            recoveries: history,
            checks: History::default().next_after(S(170), CHECKS_QUIET),
        };
        assert_eq!(Record::parse(&record.format()), record);
        assert_eq!(Record::parse("garbage"), Record::default());
        // A record written before checks were counted.
        assert_eq!(Record::parse("6 166000\n").recoveries, history);
    }

    #[test]
    fn the_cap_brings_bindings_back_within_30_s() {
        assert!(BACKOFF.iter().all(|wait| *wait < S(30)));
        assert!(QUIET > *BACKOFF.last().unwrap());
    }

    #[test]
    fn a_crash_loop_is_described_in_words() {
        let daemon = parse_daemon(
            "Result=signal\nExecMainPID=42\nExecMainCode=2\nExecMainStatus=9\nExecStartPre=\n",
        );
        let sockets = parse_sockets(
            "Id=qrexec-connect-a.socket\nActiveState=failed\nResult=service-start-limit-hit\n\n\
             Id=qrexec-connect-b.socket\nActiveState=active\nResult=success\n",
        );
        let failed: Vec<&SocketState> = sockets
            .iter()
            .filter(|s| s.active_state == "failed")
            .collect();
        let text = describe_failure(&daemon, &failed);
        assert!(text.contains("failed to start too often"), "{text}");
        assert!(text.contains("killed by signal SIGKILL"), "{text}");
        assert!(
            text.ends_with("1 binding socket stopped listening: qrexec-connect-a.socket"),
            "{text}"
        );
    }

    #[test]
    fn start_failures_name_their_cause() {
        let pre = "{ path=test ; argv[]=test -e /run/x ; ignore_errors=no ; \
                   start_time=[n/a] ; stop_time=[n/a] ; pid=7 ; code=exited ; status=1 }";
        let daemon = parse_daemon(&format!(
            "Result=exit-code\nExecMainPID=0\nExecMainCode=0\nExecMainStatus=0\nExecStartPre={pre}\n"
        ));
        assert_eq!(
            describe_daemon(&daemon),
            "could not start: its ExecStartPre= command (test -e /run/x) exited with status 1"
        );
        let exec =
            parse_daemon("Result=exit-code\nExecMainPID=5\nExecMainCode=1\nExecMainStatus=203\n");
        assert!(describe_daemon(&exec).contains("203/EXEC"));
        let fds =
            parse_daemon("Result=exit-code\nExecMainPID=5\nExecMainCode=1\nExecMainStatus=202\n");
        assert!(describe_daemon(&fds).contains("LimitNOFILE="));
        let own =
            parse_daemon("Result=exit-code\nExecMainPID=5\nExecMainCode=1\nExecMainStatus=6\n");
        assert!(describe_daemon(&own).starts_with("exited with status 6"));
    }

    #[test]
    fn checks_back_off_to_minutes_and_count_across_runs() {
        let mut checks = History::default();
        let mut waits = Vec::new();
        for at in [100, 105, 120, 180, 480, 780] {
            checks = checks.next_after(S(at), CHECKS_QUIET);
            waits.push(check_wait(checks.in_a_row).as_secs());
        }
        assert_eq!(waits, [5, 15, 60, 300, 300, 300]);
        assert!(CHECKS_QUIET > *CHECKS.last().unwrap());
        assert_eq!(
            checks
                .next_after(S(780) + CHECKS_QUIET + S(1), CHECKS_QUIET)
                .in_a_row,
            1
        );
    }

    /// The holders of real sockets of this process, as /proc shows them.
    #[test]
    fn holders_are_found_in_proc() {
        use std::os::linux::net::SocketAddrExt;
        let me = std::process::id();
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        let ours = |holder: Option<Holder>| {
            let mut holder = holder.expect("a holder");
            holder.identify();
            assert_eq!(holder.uid, Some(uid));
            assert_eq!(holder.process.map(|(pid, _)| pid), Some(me));
        };
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        ours(holder_of(&format!("127.0.0.1:{port}")));
        ours(holder_of(&format!("0.0.0.0:{port}")));
        assert_eq!(holder_of(&format!("127.0.0.2:{port}")), None);
        drop(v4);
        assert_eq!(holder_of(&format!("127.0.0.1:{port}")), None);

        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let port = v6.local_addr().unwrap().port();
        ours(holder_of(&format!("[::1]:{port}")));
        assert_eq!(holder_of(&format!("[::2]:{port}")), None);

        let name = format!("qrexec-connect-holder-test-{me}");
        let address = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let _abstract = std::os::unix::net::UnixListener::bind_addr(&address).unwrap();
        ours(holder_of(&format!("@{name}")));
        assert_eq!(holder_of(&format!("@{name}-other")), None);

        // Bound, never listening: no LISTEN row, no accepting flag, yet
        // binding fails.
        let bound = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        bound
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let port = bound.local_addr().unwrap().as_socket().unwrap().port();
        assert!(holder_of(&format!("127.0.0.1:{port}")).is_some());
        assert!(holder_of(&format!("0.0.0.0:{port}")).is_some());
        drop(bound);
        assert_eq!(holder_of(&format!("127.0.0.1:{port}")), None);
        let bound = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        bound
            .bind(&SockAddr::unix(format!("\0{name}-bound")).unwrap())
            .unwrap();
        assert!(holder_of(&format!("@{name}-bound")).is_some());
        drop(bound);
        assert_eq!(holder_of(&format!("@{name}-bound")), None);

        // A path socket of our own is no holder: systemd replaces it.
        let path = std::env::temp_dir().join(format!("qrexec-connect-holder-{me}"));
        let _ = std::fs::remove_file(&path);
        let _path = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(holder_of(path.to_str().unwrap()), None);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn holders_are_described_in_words() {
        let holder = Holder {
            uid: Some(4_000_000_000),
            inode: Some(7),
            process: Some((42, "nc".to_owned())),
        };
        assert_eq!(holder.to_string(), "uid 4000000000, pid 42 \"nc\"");
        let unset = Unset {
            socket: parse_sockets(
                "Id=qrexec-connect-127.0.0.1:22.socket\nActiveState=failed\nResult=resources\n\
                 Listen=127.0.0.1:22 (Stream)\n",
            )
            .pop()
            .unwrap(),
            holders: vec![("127.0.0.1:22".to_owned(), holder)],
        };
        assert_eq!(unset.socket.listen, ["127.0.0.1:22"]);
        assert_eq!(
            unset.describe(),
            "qrexec-connect-127.0.0.1:22.socket cannot listen: its address 127.0.0.1:22 is in \
             use by another process (uid 4000000000, pid 42 \"nc\")"
        );
        assert_eq!(
            Holder::default().to_string(),
            "another user's: /proc does not say whose"
        );
    }

    #[test]
    fn long_lists_are_shortened() {
        assert_eq!(name_some(&["a", "b"]), "a, b");
        assert_eq!(
            name_some(&["a", "b", "c", "d", "e", "f"]),
            "a, b, c, d and 2 more"
        );
    }
}
