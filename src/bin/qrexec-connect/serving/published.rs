//! What the daemon publishes for `qrexec-connect status`: per binding, the
//! live connections, the connections since the daemon started, and how the
//! last one ended, in `$XDG_RUNTIME_DIR/qrexec-connect/connections`.
//!
//! Never on a connection's path: accept and spawn only bump counters in
//! memory and wake the publisher task, which waits [`COALESCE`] and then
//! writes the whole file at once (a fresh 0600 file renamed into place, see
//! `RuntimeDir`), so a burst of a thousand connections is a handful of
//! writes. A write that fails is dropped: the next change writes again.
//!
//! The file's format, which `status` reads too, is `shared::counters`; this
//! module is the writer only (tokio: the publisher task).
//!
//! A daemon-reload that changes the bindings restarts the daemon (the
//! handover stops it; the next connection starts it). So that a binding the
//! reload did not touch keeps its TOTAL and LAST, a new daemon starts each
//! binding from what the previous one published for the same address and
//! the same TARGET and SERVICE ([`Published::new`]); LIVE starts at 0, as
//! connections of the old daemon that go on are no longer its to count.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qrexec_connect_binding::runtime_dir::RuntimeDir;
use tokio::sync::Notify;

use crate::shared::counters::{format, parse, Counters, Daemon, FILE};

/// How long the publisher waits after a change, gathering more.
const COALESCE: Duration = Duration::from_millis(200);

/// The daemon's published state.
pub struct Published {
    dir: Option<RuntimeDir>,
    started: u64,
    pid: u32,
    bindings: RefCell<BTreeMap<String, Counters>>,
    /// What the previous daemon published, by address: where [`serve`]
    /// takes up its counts.
    ///
    /// [`serve`]: Published::serve
    previous: BTreeMap<String, Counters>,
    /// The client it runs and how (`stdin-socket`, `pipe`), once known.
    client: RefCell<(String, Option<&'static str>)>,
    changed: Notify,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Published {
    /// Publishes into our runtime directory, or nowhere when there is none
    /// (e.g. run by hand with systemd-socket-activate and no XDG_RUNTIME_DIR).
    /// Reads what the previous daemon published, if anything, to carry its
    /// counts on.
    pub fn new() -> Rc<Published> {
        let dir = RuntimeDir::from_env().ok();
        let previous = dir
            .as_ref()
            .and_then(|dir| dir.read(FILE).ok().flatten())
            .map(|text| parse(&text).bindings)
            .unwrap_or_default();
        Rc::new(Published {
            dir,
            previous,
            started: now(),
            pid: std::process::id(),
            bindings: RefCell::new(BTreeMap::new()),
            client: RefCell::new((String::new(), None)),
            changed: Notify::new(),
        })
    }

    /// The client the daemon runs, and its mode once probed.
    pub fn client(&self, path: &str, mode: Option<&'static str>) {
        *self.client.borrow_mut() = (path.to_owned(), mode);
        self.changed.notify_one();
    }

    /// A binding the daemon serves, with the previous daemon's TOTAL and
    /// LAST when it served the same address for the same destination.
    pub fn serve(&self, listen: &str, target: &str, service: &str) {
        let counters = carried_on(self.previous.get(listen), target, service);
        self.bindings
            .borrow_mut()
            .insert(listen.to_owned(), counters);
        self.changed.notify_one();
    }

    fn update(&self, listen: &str, change: impl FnOnce(&mut Counters)) {
        if let Some(counters) = self.bindings.borrow_mut().get_mut(listen) {
            change(counters);
        }
        self.changed.notify_one();
    }

    /// A client started for a connection.
    pub fn connected(&self, listen: &str) {
        self.update(listen, |c| {
            c.live += 1;
            // A count carried on from the file may be anything.
            c.total = c.total.saturating_add(1);
        });
    }

    /// A connection's client ended.
    pub fn ended(&self, listen: &str, status: i32, words: &str) {
        self.update(listen, |c| {
            c.live = c.live.saturating_sub(1);
            c.last_result = Some(words.to_owned());
            c.last_status = Some(status);
            c.last_end = Some(now());
        });
    }

    /// A connection closed because no client could be started for it.
    pub fn not_started(&self, listen: &str, words: &str) {
        self.update(listen, |c| {
            c.total = c.total.saturating_add(1);
            c.last_result = Some(words.to_owned());
            c.last_status = Some(-1);
            c.last_end = Some(now());
        });
    }

    /// Writes the file after every change, coalesced; runs forever.
    pub async fn publish(self: Rc<Self>) {
        let Some(dir) = &self.dir else { return };
        loop {
            self.changed.notified().await;
            tokio::time::sleep(COALESCE).await;
            let (client, mode) = self.client.borrow().clone();
            let daemon = Daemon {
                pid: self.pid,
                started: self.started,
                client,
                client_mode: mode.map(str::to_owned),
            };
            let text = format(&daemon, &self.bindings.borrow());
            let _ = dir.write_atomically(FILE, &text);
        }
    }
}

/// A binding's counters at the start of a daemon: the previous daemon's
/// TOTAL and LAST for the same destination, else zero. LIVE is always 0.
fn carried_on(previous: Option<&Counters>, target: &str, service: &str) -> Counters {
    match previous {
        Some(before) if before.target == target && before.service == service => Counters {
            live: 0,
            ..before.clone()
        },
        _ => Counters {
            target: target.to_owned(),
            service: service.to_owned(),
            ..Counters::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carried_count_at_its_limit_stays_there() {
        // The file is anyone's text: `total=18446744073709551615` parses.
        let text = "[binding]\nlisten=@a\ntarget=vm\nservice=s\ntotal=18446744073709551615\n";
        let published = Published {
            dir: None,
            started: 0,
            pid: 0,
            bindings: RefCell::new(BTreeMap::new()),
            previous: parse(text).bindings,
            client: RefCell::new((String::new(), None)),
            changed: Notify::new(),
        };
        published.serve("@a", "vm", "s");
        published.connected("@a");
        published.not_started("@a", "no client");
        let bindings = published.bindings.borrow();
        assert_eq!((bindings["@a"].live, bindings["@a"].total), (1, u64::MAX));
    }

    #[test]
    fn counts_carry_on_for_the_same_destination_only() {
        let before = Counters {
            target: "vm".into(),
            service: "qubes.ConnectTCP+22".into(),
            live: 3,
            total: 9,
            last_result: Some("closed normally".into()),
            last_status: Some(0),
            last_end: Some(1_764_650_000),
        };
        let kept = carried_on(Some(&before), "vm", "qubes.ConnectTCP+22");
        assert_eq!((kept.live, kept.total), (0, 9));
        assert_eq!(kept.last_end, before.last_end);
        let moved = carried_on(Some(&before), "other", "qubes.ConnectTCP+22");
        assert_eq!((moved.total, moved.last_end), (0, None));
        assert_eq!(moved.target, "other");
        assert_eq!(carried_on(None, "vm", "s").total, 0);
    }
}
