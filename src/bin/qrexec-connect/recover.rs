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

use std::io;
use std::time::Duration;

use crate::manager::{self, systemctl};
use crate::reconcile::SERVICE;

/// The path unit that runs the reconcile step after each daemon-reload.
const WATCHER: &str = "qrexec-connect-reconcile.path";
/// The reconcile step it starts.
const RECONCILE: &str = "qrexec-connect-reconcile.service";
use crate::spawn::signal_name;
use qrexec_connect_binding::runtime_dir::RuntimeDir;

/// Our record of recent recoveries, in [`RuntimeDir`].
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

    pub fn format(&self) -> String {
        format!("{} {}\n", self.in_a_row, self.last.as_millis())
    }

    /// The history including a recovery starting `now`.
    pub fn next(&self, now: Duration) -> History {
        let quiet = self.in_a_row == 0 || now.saturating_sub(self.last) > QUIET || now < self.last;
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

/// The wait before recovery number `in_a_row` (1 is the first).
pub fn backoff(in_a_row: u32) -> Duration {
    let index = (in_a_row.max(1) - 1) as usize;
    BACKOFF[index.min(BACKOFF.len() - 1)]
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

/// One binding socket as the manager sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketState {
    pub name: String,
    pub active_state: String,
    pub result: String,
}

/// Parses `systemctl show` output (blocks separated by blank lines).
pub fn parse_sockets(text: &str) -> Vec<SocketState> {
    text.split("\n\n")
        .filter_map(|block| {
            let value = |key: &str| {
                block.lines().find_map(|line| {
                    line.strip_prefix(key)
                        .and_then(|rest| rest.strip_prefix('='))
                        .map(str::to_owned)
                })
            };
            Some(SocketState {
                name: value("Id").filter(|name| !name.is_empty())?,
                active_state: value("ActiveState").unwrap_or_default(),
                result: value("Result").unwrap_or_default(),
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

/// Runs one recovery: report, wait, clear the failed states. Messages go to
/// stdout with syslog priority prefixes.
pub fn run() -> io::Result<()> {
    let sockets = parse_sockets(&show_sockets()?);
    let failed: Vec<&SocketState> = sockets
        .iter()
        .filter(|s| s.active_state == "failed")
        .collect();
    let watcher = parse_sockets(&manager::show(
        &["Id", "ActiveState", "Result"],
        &[WATCHER],
    )?)
    .pop()
    .filter(|w| w.active_state == "failed");
    if let Some(watcher) = &watcher {
        // <4> warning: reloads are not applied.
        println!(
            "<4>qrexec-connect recover: the reload watcher {WATCHER} failed ({}); until it \
             runs again, daemon-reload does not apply binding changes",
            watcher.result
        );
    }
    if failed.is_empty() && watcher.is_none() {
        // Run by hand, or everything came back meanwhile.
        println!(
            "<6>qrexec-connect recover: no binding socket and not the reload watcher is in \
             the failed state"
        );
        return Ok(());
    }
    if !failed.is_empty() {
        report_daemon_failure(&failed)?;
    }
    let dir = RuntimeDir::from_env()?;
    let history = dir
        .read(STATE_FILE)?
        .map(|text| History::parse(&text))
        .unwrap_or_default()
        .next(boot_time());
    dir.write_atomically(STATE_FILE, &history.format())?;
    let wait = backoff(history.in_a_row);
    let persisting = if history.in_a_row as usize >= BACKOFF.len() {
        format!(
            " (recovery {} in a row: the cause persists; retrying at most every {} s until \
             it stops)",
            history.in_a_row,
            wait.as_secs()
        )
    } else if history.in_a_row > 1 {
        format!(" (recovery {} in a row)", history.in_a_row)
    } else {
        String::new()
    };
    let what = match (failed.is_empty(), watcher.is_some()) {
        (false, false) => "the binding sockets",
        (true, _) => "the reload watcher",
        (false, true) => "the binding sockets and the reload watcher",
    };
    // <5> notice: what we do about it.
    println!(
        "<5>qrexec-connect recover: restarting {what} in {} s{persisting}",
        wait.as_secs()
    );
    std::thread::sleep(wait);

    if !failed.is_empty() {
        // The start-limit counters go with the failed state, so the daemon
        // gets its full allowance again. The sockets are started by the
        // unit's OnSuccess=sockets.target once this run has ended.
        let mut args = vec!["reset-failed", "--", SERVICE];
        args.extend(failed.iter().map(|s| s.name.as_str()));
        systemctl(&args)?;
        println!(
            "<5>qrexec-connect recover: cleared the failed state of {SERVICE} and {} socket{}; \
             sockets.target starts them again",
            failed.len(),
            if failed.len() == 1 { "" } else { "s" }
        );
    }
    if watcher.is_some() {
        // A path unit pulls in nothing else: started by name. If its flag
        // is still raised, the reload it missed is applied at once.
        systemctl(&["reset-failed", "--", WATCHER, RECONCILE])?;
        systemctl(&["start", "--no-block", WATCHER])?;
        println!("<5>qrexec-connect recover: started {WATCHER} again");
    }
    Ok(())
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

fn show_sockets() -> io::Result<String> {
    let listed = manager::socket_units()?;
    let names: Vec<&str> = listed.iter().map(|u| u.name.as_str()).collect();
    manager::show(&["Id", "ActiveState", "Result"], &names)
}

/// Time since boot, suspend included.
fn boot_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

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
        assert_eq!(History::parse(&history.format()), history);
        assert_eq!(History::parse("garbage"), History::default());
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
    fn long_lists_are_shortened() {
        assert_eq!(name_some(&["a", "b"]), "a, b");
        assert_eq!(
            name_some(&["a", "b", "c", "d", "e", "f"]),
            "a, b, c, d and 2 more"
        );
    }
}
