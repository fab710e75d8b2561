//! The format of `$XDG_RUNTIME_DIR/qrexec-connect/connections`: what the
//! daemon publishes (`serving::published` writes it) and `status` reads.
//!
//! The file is machine-written and read by [`parse`]: a `[daemon]` section,
//! then one `[binding]` section per listening socket, `key=value` lines,
//! values with `\`, and line breaks escaped. The key is the socket's address
//! as the daemon reads it from the socket, which is what systemd shows as the
//! socket unit's `Listen=` (without its ` (Stream)`). std only.

use std::collections::BTreeMap;

/// The file's name in the runtime directory.
pub const FILE: &str = "connections";

/// One binding's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub target: String,
    pub service: String,
    pub live: u64,
    pub total: u64,
    /// How the last connection ended, in the log's words.
    pub last_result: Option<String>,
    /// Its exit status as a shell reports it; -1 when no client ran.
    pub last_status: Option<i32>,
    /// When it ended, in seconds since the epoch.
    pub last_end: Option<u64>,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// What the file says of the daemon itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Daemon {
    pub pid: u32,
    pub started: u64,
    pub client: String,
    pub client_mode: Option<String>,
}

/// The file's text.
pub fn format(daemon: &Daemon, bindings: &BTreeMap<String, Counters>) -> String {
    let mut text = format!(
        "# Written by qrexec-connect (pid {pid}) for 'qrexec-connect status'.\n\
         [daemon]\npid={pid}\nstarted={started}\nclient={client}\n",
        pid = daemon.pid,
        started = daemon.started,
        client = escape(&daemon.client)
    );
    if let Some(mode) = &daemon.client_mode {
        text += &format!("client_mode={mode}\n");
    }
    for (listen, c) in bindings {
        text += &format!(
            "\n[binding]\nlisten={}\ntarget={}\nservice={}\nlive={}\ntotal={}\n",
            escape(listen),
            escape(&c.target),
            escape(&c.service),
            c.live,
            c.total
        );
        if let (Some(result), Some(status), Some(end)) = (&c.last_result, c.last_status, c.last_end)
        {
            text += &format!(
                "last_result={}\nlast_status={status}\nlast_end={end}\n",
                escape(result)
            );
        }
    }
    text
}

/// What a daemon published: its start time and the bindings by address.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub pid: Option<u32>,
    pub started: Option<u64>,
    pub client: Option<String>,
    pub client_mode: Option<String>,
    pub bindings: BTreeMap<String, Counters>,
}

/// Reads the file's text; unknown keys and broken lines are skipped.
pub fn parse(text: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let mut section = "";
    let mut current: Option<(String, Counters)> = None;
    fn finish(current: &mut Option<(String, Counters)>, snapshot: &mut Snapshot) {
        if let Some((listen, counters)) = current.take() {
            snapshot.bindings.insert(listen, counters);
        }
    }
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            finish(&mut current, &mut snapshot);
            section = if name == "binding" {
                "binding"
            } else {
                "daemon"
            };
            if section == "binding" {
                current = Some((String::new(), Counters::default()));
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = unescape(value);
        match (section, &mut current) {
            ("daemon", _) => match key {
                "pid" => snapshot.pid = value.parse().ok(),
                "started" => snapshot.started = value.parse().ok(),
                "client" => snapshot.client = Some(value),
                "client_mode" => snapshot.client_mode = Some(value),
                _ => {}
            },
            ("binding", Some((listen, c))) => match key {
                "listen" => *listen = value,
                "target" => c.target = value,
                "service" => c.service = value,
                "live" => c.live = value.parse().unwrap_or(0),
                "total" => c.total = value.parse().unwrap_or(0),
                "last_result" => c.last_result = Some(value),
                "last_status" => c.last_status = value.parse().ok(),
                "last_end" => c.last_end = value.parse().ok(),
                _ => {}
            },
            _ => {}
        }
    }
    finish(&mut current, &mut snapshot);
    snapshot
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_reads_back_as_written() {
        let mut bindings = BTreeMap::new();
        bindings.insert(
            "[::1]:8080".to_owned(),
            Counters {
                target: "@default".into(),
                service: "qubes.ConnectTCP+8080".into(),
                live: 2,
                total: 7,
                last_result: Some("refused by qrexec policy (status 126)".into()),
                last_status: Some(126),
                last_end: Some(1_764_650_000),
            },
        );
        bindings.insert(
            "/run/user/1000/odd\nname\\x".to_owned(),
            Counters {
                target: "vault".into(),
                service: "qubes.ConnectSSHAgent".into(),
                ..Counters::default()
            },
        );
        let daemon = Daemon {
            pid: 42,
            started: 1_764_600_000,
            client: "/usr/bin/qrexec-client-vm".into(),
            client_mode: Some("pipe".into()),
        };
        let snapshot = parse(&format(&daemon, &bindings));
        assert_eq!(snapshot.pid, Some(42));
        assert_eq!(snapshot.started, Some(1_764_600_000));
        assert_eq!(
            snapshot.client.as_deref(),
            Some("/usr/bin/qrexec-client-vm")
        );
        assert_eq!(snapshot.client_mode.as_deref(), Some("pipe"));
        assert_eq!(snapshot.bindings, bindings);
    }
}
