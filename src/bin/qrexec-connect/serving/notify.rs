//! The service manager's notification protocol (`sd_notify(3)`): one
//! datagram of `KEY=VALUE` lines to the socket named in `$NOTIFY_SOCKET`.
//!
//! Written out rather than pulled from a crate: it is a dozen lines, and the
//! variable must be taken out of the environment at start (children must not
//! see it), which a crate reading the environment on every call would not do.
//!
//! The socket is non-blocking: a manager that does not read its queue (busy,
//! stopped, or a full queue of 10 datagrams, Linux's default
//! `net.unix.max_dgram_qlen`) must never stop the daemon from accepting.
//! [`Notifier::notify`] then fails with `WouldBlock`; the caller decides
//! what to retry.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// A connection to the service manager, or nothing when not run by one.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Takes `$NOTIFY_SOCKET` out of the environment. Call before threads start.
    pub fn from_env() -> Notifier {
        let path = std::env::var_os("NOTIFY_SOCKET");
        std::env::remove_var("NOTIFY_SOCKET");
        let socket = path.and_then(|path| {
            let bytes = path.as_encoded_bytes();
            let address = match bytes.strip_prefix(b"@") {
                Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name).ok()?,
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            let socket = UnixDatagram::unbound().ok()?;
            // Our own socket, shared with no other process: O_NONBLOCK here
            // is the same as MSG_DONTWAIT on every send.
            socket.set_nonblocking(true).ok()?;
            Some((socket, address))
        });
        Notifier { socket }
    }

    /// Sends `state` (e.g. `READY=1\nSTATUS=...`) without waiting; a no-op
    /// without a manager. `WouldBlock` means the manager's queue is full.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        match &self.socket {
            Some((socket, address)) => socket.send_to_addr(state.as_bytes(), address).map(drop),
            None => Ok(()),
        }
    }
}
