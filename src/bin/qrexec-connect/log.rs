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
use std::mem::size_of;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

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
const JOURNAL_SOCKET: &[u8] = b"/run/systemd/journal/socket";

/// tracing-journald's layer, never waiting for the journal.
struct Journal {
    layer: tracing_journald::Layer,
    /// The layer's socket (it owns it; we only poll and reconnect it).
    socket: RawFd,
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
        // Never fd 0-2 (shared with children); only an AF_UNIX datagram
        // socket, which is what the layer creates.
        if expected <= 2 || !is_unix_datagram(expected) {
            return None;
        }
        // SAFETY: fcntl and setsockopt on the layer's socket, which lives
        // as long as the layer; nobody else has it (close-on-exec).
        unsafe {
            let flags = libc::fcntl(expected, libc::F_GETFL);
            if flags < 0 || libc::fcntl(expected, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return None;
            }
            // Room for bursts: the kernel caps this at net.core.wmem_max.
            let size: libc::c_int = 8 << 20;
            libc::setsockopt(
                expected,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        Some(Journal {
            layer,
            socket: expected,
            dropped: AtomicU64::new(0),
        })
    }

    /// Would the journal take one more entry now? The socket is connected
    /// to journald's (the layer still names the address on each send), so
    /// that poll(2) reports it writable only while our send buffer has room
    /// *and* journald's receive queue is not full: exactly when a send will
    /// not wait. Connecting again each time follows a restarted journald.
    fn takes_entries(&self) -> bool {
        // SAFETY: sockaddr_un is plain data; connect and poll only read it
        // and the descriptor, which the layer keeps open.
        unsafe {
            let mut address: libc::sockaddr_un = std::mem::zeroed();
            address.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (to, &from) in address.sun_path.iter_mut().zip(JOURNAL_SOCKET) {
                *to = from as libc::c_char;
            }
            let length = std::mem::offset_of!(libc::sockaddr_un, sun_path) + JOURNAL_SOCKET.len();
            if libc::connect(
                self.socket,
                (&address as *const libc::sockaddr_un).cast(),
                length as libc::socklen_t,
            ) != 0
            {
                return false;
            }
            let mut poll = libc::pollfd {
                fd: self.socket,
                events: libc::POLLOUT,
                revents: 0,
            };
            libc::poll(&mut poll, 1, 0) == 1 && poll.revents & libc::POLLOUT != 0
        }
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
        // SAFETY: send on the connected socket, from a live buffer.
        let sent = unsafe {
            libc::send(
                self.socket,
                entry.as_ptr().cast(),
                entry.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if sent < 0 {
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

/// The descriptor number the next socket(2) will get.
fn lowest_free_fd() -> Option<RawFd> {
    // SAFETY: duplicates fd 2 to the lowest free number, then closes that.
    unsafe {
        let fd = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        libc::close(fd);
        Some(fd)
    }
}

fn is_unix_datagram(fd: RawFd) -> bool {
    let option = |name| {
        let mut value: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len describe a c_int.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    option(libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && option(libc::SO_TYPE) == Some(libc::SOCK_DGRAM)
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
    // SAFETY: fstat fills a plain struct for fd 2.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(std::io::stderr().as_raw_fd(), &mut stat) } != 0 {
        return false;
    }
    dev.parse() == Ok(stat.st_dev) && ino.parse() == Ok(stat.st_ino)
}

/// Writes `qrexec-connect: LEVEL: message` lines to stderr.
struct StderrLines;

struct MessageOnly(String);

impl Visit for MessageOnly {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for StderrLines {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut message = MessageOnly(String::new());
        event.record(&mut message);
        let level = match *event.metadata().level() {
            Level::ERROR => "error: ",
            Level::WARN => "warning: ",
            _ => "",
        };
        let line = format!("qrexec-connect: {level}{}\n", message.0);
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}
