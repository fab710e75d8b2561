//! What serving and managing both read, so that neither imports the other:
//! the counters file's format (the daemon writes it, `status` reads it), the
//! client's default path, and signal names (the daemon logs a client's end
//! with them, `recover` the daemon's own). std and libc (signal numbers)
//! only; nothing of `serving` or `managing`, no tokio, no systemctl.

pub mod counters;

/// Where qrexec-client-vm lives on a Qubes qube.
pub const DEFAULT_CLIENT: &str = "/usr/bin/qrexec-client-vm";

/// The conventional name of a signal number (`SIGTERM`), or `signal N`.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => return format!("signal {signal}"),
    };
    name.to_owned()
}
