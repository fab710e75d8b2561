//! Listening sockets handed over by systemd, and the connections accepted on
//! them.
//!
//! systemd passes sockets as fds 3.. with `LISTEN_FDS`, `LISTEN_PID` and
//! `LISTEN_FDNAMES` (the `FileDescriptorName=` of each socket, `:`
//! separated). [`take_from_systemd`] claims them and scrubs the environment
//! before any thread exists, so no child ever sees a `LISTEN_*` variable or a
//! listening socket: every inherited fd is made close-on-exec.
//!
//! [`accept`] uses `accept4(SOCK_CLOEXEC)` without `SOCK_NONBLOCK`: the
//! connection is born in blocking mode, which is what `qrexec-client-vm`
//! expects on its stdin (the O_NONBLOCK flag lives in the open file
//! description, which the child shares).

use std::fmt;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use qrexec_connect_binding::address::{self, ListenAddress};

/// One socket inherited from systemd, with its `FileDescriptorName=`.
#[derive(Debug)]
pub struct InheritedSocket {
    pub fd: OwnedFd,
    /// The name systemd gave it (`FileDescriptorName=`, or the unit name).
    pub name: String,
}

/// Takes the sockets systemd passed, then removes `LISTEN_FDS`, `LISTEN_PID`
/// and `LISTEN_FDNAMES` from the environment and marks every fd close-on-exec.
///
/// Must run before any other thread starts: it changes the environment.
pub fn take_from_systemd() -> Vec<InheritedSocket> {
    // Raw bytes, not `var()`: one name that is not UTF-8 must cost only its
    // own binding (it becomes an invalid name), not every name.
    let names = std::env::var_os("LISTEN_FDNAMES");
    // listenfd checks LISTEN_PID against our pid and removes LISTEN_FDS and
    // LISTEN_PID; it does not know about names, so we read those ourselves.
    let mut fds = listenfd::ListenFd::from_env();
    std::env::remove_var("LISTEN_FDNAMES");
    let names: Vec<std::borrow::Cow<str>> = names.as_ref().map_or(Vec::new(), |n| {
        n.as_encoded_bytes()
            .split(|&b| b == b':')
            .map(String::from_utf8_lossy)
            .collect()
    });
    (0..fds.len())
        .filter_map(|index| {
            let raw = fds.take_raw_fd(index).ok().flatten()?;
            set_cloexec(raw);
            // SAFETY: systemd handed this fd to us, and listenfd gives each
            // index out only once, so nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let name = names.get(index).map_or("unknown", |n| n).to_owned();
            Some(InheritedSocket { fd, name })
        })
        .collect()
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: fcntl on an fd we own; failure leaves it as it was.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// Puts a listening socket in non-blocking mode for the event loop.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd.
    let rc = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            -1
        } else {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn get_int_option(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len describe a c_int-sized buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// Why an inherited fd cannot serve connections.
#[derive(Debug)]
pub enum UnusableSocket {
    NotASocket(io::Error),
    NotStream,
    NotListening,
}

impl fmt::Display for UnusableSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnusableSocket::NotASocket(e) => write!(f, "not a socket ({e})"),
            UnusableSocket::NotStream => f.write_str(
                "not a stream socket: qrexec carries byte streams, use ListenStream= (not \
                 ListenDatagram= or ListenSequentialPacket=)",
            ),
            UnusableSocket::NotListening => f.write_str(
                "socket is not listening: the unit needs Accept=no (the default), \
                 qrexec-connect accepts connections itself",
            ),
        }
    }
}

/// Checks that an inherited fd is a listening stream socket.
pub fn check_listening_stream(fd: BorrowedFd<'_>) -> Result<(), UnusableSocket> {
    let kind = get_int_option(fd, libc::SO_TYPE).map_err(UnusableSocket::NotASocket)?;
    if kind != libc::SOCK_STREAM {
        return Err(UnusableSocket::NotStream);
    }
    match get_int_option(fd, libc::SO_ACCEPTCONN) {
        Ok(1) => Ok(()),
        _ => Err(UnusableSocket::NotListening),
    }
}

/// The other end of an accepted connection, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Inet(std::net::SocketAddr),
    /// A Unix peer, identified by its credentials at connect time.
    Unix {
        pid: i32,
        uid: u32,
    },
    Unknown,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Inet(addr) => write!(f, "{addr}"),
            Peer::Unix { pid, uid } => write!(f, "pid {pid} uid {uid}"),
            Peer::Unknown => f.write_str("unknown peer"),
        }
    }
}

/// A connection fresh from `accept4`: blocking, close-on-exec.
#[derive(Debug)]
pub struct Connection {
    pub socket: OwnedFd,
    pub peer: Peer,
}

/// Accepts one connection. `WouldBlock` means none is pending.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<Connection> {
    // SAFETY: sockaddr_storage is plain data, sized for any address.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage/len describe a writable buffer of that size.
    let raw = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new fd that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let peer = match address::from_sockaddr(&storage, len) {
        Some(ListenAddress::Inet(addr)) => Peer::Inet(addr),
        Some(_) => unix_peer(socket.as_raw_fd()),
        None => Peer::Unknown,
    };
    Ok(Connection { socket, peer })
}

fn unix_peer(fd: RawFd) -> Peer {
    // SAFETY: ucred is plain data; len describes it.
    let mut cred: libc::ucred = unsafe { zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Peer::Unix {
            pid: cred.pid,
            uid: cred.uid,
        }
    } else {
        Peer::Unknown
    }
}

/// accept() errors after which retrying at once would only spin: the
/// process or system is out of descriptors or memory.
pub fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// accept() errors that concern only the one connection (the peer went
/// away, or a signal interrupted us): accept the next one.
pub fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}
