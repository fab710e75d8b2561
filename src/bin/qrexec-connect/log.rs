//! Logging: structured journal entries when stderr is the journal, plain
//! lines on stderr otherwise.
//!
//! Every event carries its message plus fields (`LISTEN`, `QREXEC_TARGET`,
//! `QREXEC_SERVICE`, `PEER`, `EXIT_STATUS`, ...), so
//! `journalctl QREXEC_TARGET=ssh-server` finds a binding's connections. On a
//! terminal only the message is printed: it already says everything the
//! fields say.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::AsRawFd;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global logger.
pub fn init(debug: bool) {
    let level = if debug {
        LevelFilter::DEBUG
    } else {
        LevelFilter::INFO
    };
    if stderr_is_journal() {
        if let Ok(journal) = tracing_journald::layer() {
            let journal = journal
                .with_field_prefix(None)
                .with_syslog_identifier("qrexec-connect".to_owned());
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
