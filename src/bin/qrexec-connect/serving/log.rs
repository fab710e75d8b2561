//! Logging: structured journal entries when stderr is the journal, plain
//! lines on stderr otherwise.
//!
//! Every event carries its message plus fields (`LISTEN`, `QREXEC_TARGET`,
//! `QREXEC_SERVICE`, `PEER`, `EXIT_STATUS`, ...), so
//! `journalctl QREXEC_TARGET=ssh-server` finds a binding's connections. On a
//! terminal only the message is printed: it already says everything the
//! fields say.
//!
//! Logging never blocks the daemon. tracing-journald sends each entry as a
//! datagram on a blocking socket; once journald's queue is full (journald
//! stopped or swamped) that send would wait, and with it every binding. So
//! [`Journal`] makes that socket non-blocking and, before each entry, asks
//! the kernel whether the journal takes one more: if not, the entry is
//! dropped and counted, and the count is logged as soon as it does again.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::event::{self, PollFd, PollFlags, Timespec};
use socket2::{Domain, SockAddr, SockRef, Type};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global logger.
pub fn init(debug: bool) {
    let level = if debug {
        LevelFilter::DEBUG
    } else {
        LevelFilter::INFO
    };
    if stderr_is_journal() {
        if let Some(journal) = Journal::new() {
            tracing_subscriber::registry()
                .with(journal.with_filter(level))
                .init();
            return;
        }
    }
    tracing_subscriber::registry()
        .with(StderrLines.with_filter(level))
        .init();
}

/// Where journald receives native-protocol entries (as tracing-journald
/// sends them).
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// tracing-journald's layer, never waiting for the journal.
struct Journal {
    layer: tracing_journald::Layer,
    /// The layer's socket (it owns it and keeps it open for as long as
    /// the layer lives; we only poll and reconnect it).
    socket: BorrowedFd<'static>,
    /// Entries dropped since the journal last took one.
    dropped: AtomicU64,
}

impl Journal {
    /// Creates the layer and takes hold of its socket. Must run while the
    /// process is single-threaded: the socket is found as the lowest free
    /// descriptor, which is the one `socket(2)` in the layer gets.
    fn new() -> Option<Journal> {
        let expected = lowest_free_fd()?;
        let layer = tracing_journald::layer()
            .ok()?
            .with_field_prefix(None)
            .with_syslog_identifier("qrexec-connect".to_owned());
        // SAFETY: `expected` is open from here on: it is either the layer's
        // socket, which lives as long as the layer (for the whole process,
        // once installed), or whatever else holds that number, which the
        // checks below only query. Kept, it lives in the `Journal` beside
        // the layer that owns it, and is used only through `&self`.
        let fd = unsafe { BorrowedFd::borrow_raw(expected) };
        let socket = SockRef::from(&fd);
        // Only an AF_UNIX datagram socket, which is what the layer creates.
        let is_unix_datagram =
            socket.domain().ok() == Some(Domain::UNIX) && socket.r#type().ok() == Some(Type::DGRAM);
        if !is_unix_datagram || socket.set_nonblocking(true).is_err() {
            return None;
        }
        // Room for bursts: the kernel caps this at net.core.wmem_max.
        let _ = socket.set_send_buffer_size(8 << 20);
        Some(Journal {
            layer,
            socket: fd,
            dropped: AtomicU64::new(0),
        })
    }

    /// Would the journal take one more entry now? The socket is connected
    /// to journald's (the layer still names the address on each send), so
    /// that poll(2) reports it writable only while our send buffer has room
    /// *and* journald's receive queue is not full: exactly when a send will
    /// not wait. Connecting again each time follows a restarted journald.
    fn takes_entries(&self) -> bool {
        let Ok(address) = SockAddr::unix(JOURNAL_SOCKET) else {
            return false;
        };
        if SockRef::from(&self.socket).connect(&address).is_err() {
            return false;
        }
        let mut poll = [PollFd::new(&self.socket, PollFlags::OUT)];
        matches!(event::poll(&mut poll, Some(&Timespec::default())), Ok(1))
            && poll[0].revents().contains(PollFlags::OUT)
    }

    /// Logs how many entries were dropped, if any. Written here in the
    /// journal's native format (four plain fields) because tracing offers
    /// no public way to hand the layer an event of our own; if even this
    /// cannot be sent, the count is kept for the next try.
    fn report_dropped(&self) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped == 0 {
            return;
        }
        let entry = format!(
            "PRIORITY=4\nSYSLOG_IDENTIFIER=qrexec-connect\nDROPPED_MESSAGES={dropped}\n\
             MESSAGE={dropped} log messages were dropped while the journal was not accepting \
             them\n"
        );
        let sent = SockRef::from(&self.socket)
            .send_with_flags(entry.as_bytes(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        if sent.is_err() {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }
}

impl<S> Layer<S> for Journal
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        self.layer.on_new_span(attrs, id, ctx)
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        self.layer.on_record(id, values, ctx)
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if !self.takes_entries() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.report_dropped();
        // Between the check and this send another process may fill the
        // queue: then the send fails at once (the socket is non-blocking)
        // and this one entry is lost uncounted. It never waits.
        self.layer.on_event(event, ctx)
    }
}

/// The descriptor number the next socket(2) will get, if it is above 2
/// (never fds 0-2, shared with children): a duplicate of stderr takes the
/// lowest free number from 3 up, and is closed again at once.
fn lowest_free_fd() -> Option<RawFd> {
    let probe = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    Some(probe.as_raw_fd())
}

/// True when systemd connected our stderr to the journal: `$JOURNAL_STREAM`
/// names the device and inode of that stream (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse() == Ok(stat.st_dev) && ino.parse() == Ok(stat.st_ino)
}

/// Writes `qrexec-connect: LEVEL: message` lines to stderr.
struct StderrLines;

/// Formats only the message, straight into the line being built.
struct MessageOnly<'a>(&'a mut String);

impl Visit for MessageOnly<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for StderrLines {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let level = match *event.metadata().level() {
            Level::ERROR => "error: ",
            Level::WARN => "warning: ",
            _ => "",
        };
        // One buffer, one write: the message's arguments are formatted here
        // and nowhere before.
        let mut line = String::with_capacity(160);
        line.push_str("qrexec-connect: ");
        line.push_str(level);
        event.record(&mut MessageOnly(&mut line));
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}
