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
//!
//! The socket calls go through socket2; only `SO_PEERCRED`, which it does
//! not cover, is a raw `getsockopt`.

use std::fmt;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use qrexec_connect_binding::address::ListenAddress;
use socket2::{SockAddr, SockRef, Socket, Type};

/// One socket inherited from systemd, with its `FileDescriptorName=`.
#[derive(Debug)]
pub struct InheritedSocket {
    pub socket: Socket,
    /// The name systemd gave it (`FileDescriptorName=`, or the unit name).
    pub fd_name: String,
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
            // SAFETY: systemd handed this fd to us, and listenfd gives each
            // index out only once, so nothing else owns it.
            let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(raw) });
            // Failure leaves the flag as it was; the fd is ours either way.
            let _ = socket.set_cloexec(true);
            let fd_name = names.get(index).map_or("unknown", |n| n).to_owned();
            Some(InheritedSocket { socket, fd_name })
        })
        .collect()
}

/// The local address of an inherited socket, as a binding names it.
pub fn local_address(socket: &Socket) -> io::Result<ListenAddress> {
    let address = socket.local_addr()?;
    listen_address(&address).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("socket family {} is not supported", address.family()),
        )
    })
}

/// A kernel socket address (from getsockname or accept) as a printable
/// address; `None` for families other than IPv4, IPv6 and Unix.
pub fn listen_address(address: &SockAddr) -> Option<ListenAddress> {
    if let Some(inet) = address.as_socket() {
        return Some(ListenAddress::Inet(inet));
    }
    if !address.is_unix() {
        return None;
    }
    if let Some(name) = address.as_abstract_namespace() {
        return Some(ListenAddress::Abstract(
            String::from_utf8_lossy(name).into_owned(),
        ));
    }
    // An unnamed socket (a client that never bound) reads as an empty path.
    let path = address
        .as_pathname()
        .map_or(&[][..], |p| p.as_os_str().as_bytes());
    let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
    Some(ListenAddress::Path(
        String::from_utf8_lossy(&path[..end]).into_owned(),
    ))
}

/// Why an inherited fd cannot serve connections.
#[derive(Debug)]
pub enum UnusableSocket {
    /// Its socket type cannot be read: not a socket at all.
    Unreadable(io::Error),
    NotStream,
    NotListening,
}

impl fmt::Display for UnusableSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnusableSocket::Unreadable(e) => write!(f, "not a socket ({e})"),
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
pub fn check_listening_stream(socket: &Socket) -> Result<(), UnusableSocket> {
    if socket.r#type().map_err(UnusableSocket::Unreadable)? != Type::STREAM {
        return Err(UnusableSocket::NotStream);
    }
    match socket.is_listener() {
        Ok(true) => Ok(()),
        _ => Err(UnusableSocket::NotListening),
    }
}

/// The other end of an accepted connection, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Inet(SocketAddr),
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
pub fn accept(listener: impl AsFd) -> io::Result<Connection> {
    // socket2's accept is accept4(SOCK_CLOEXEC) on Linux: no SOCK_NONBLOCK.
    let (socket, address) = SockRef::from(&listener).accept()?;
    let socket = OwnedFd::from(socket);
    let peer = match address.as_socket() {
        Some(inet) => Peer::Inet(inet),
        None if address.is_unix() => unix_peer(&socket),
        None => Peer::Unknown,
    };
    Ok(Connection { socket, peer })
}

/// The credentials of a Unix peer (`SO_PEERCRED`: neither std nor socket2
/// offers it on stable Rust).
fn unix_peer(socket: &OwnedFd) -> Peer {
    // SAFETY: ucred is plain data, for which all zeroes is a valid value.
    let mut cred: libc::ucred = unsafe { zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len describe a writable ucred; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use socket2::SockAddrStorage;

    proptest! {
        #[test]
        fn any_kernel_socket_address_is_read_without_panic(
            bytes in prop::collection::vec(any::<u8>(), 128),
            family in prop_oneof![
                Just(libc::AF_INET), Just(libc::AF_INET6), Just(libc::AF_UNIX), any::<i32>()
            ],
            len in 0u32..=128,
        ) {
            let mut storage = SockAddrStorage::zeroed();
            // SAFETY: sockaddr_storage is 128 bytes of plain data; any bytes
            // are a valid value of it.
            let raw: &mut libc::sockaddr_storage = unsafe { storage.view_as() };
            // SAFETY: the source and the destination are 128 bytes long.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    (raw as *mut libc::sockaddr_storage).cast::<u8>(),
                    size_of::<libc::sockaddr_storage>(),
                );
            }
            raw.ss_family = family as libc::sa_family_t;
            // SAFETY: len is at most the storage's size.
            let address = unsafe { SockAddr::new(storage, len) };
            if let Some(ListenAddress::Path(path) | ListenAddress::Abstract(path)) =
                listen_address(&address)
            {
                // Lossy UTF-8 may triple a byte; never more.
                prop_assert!(path.len() <= 3 * len as usize);
            }
        }
    }

    #[test]
    fn inherited_sockets_are_checked_and_named_by_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let socket = Socket::from(OwnedFd::from(listener));
        assert!(check_listening_stream(&socket).is_ok());
        assert_eq!(
            local_address(&socket).unwrap().to_string(),
            format!("127.0.0.1:{port}")
        );
        let datagram = Socket::from(OwnedFd::from(
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        ));
        assert!(matches!(
            check_listening_stream(&datagram),
            Err(UnusableSocket::NotStream)
        ));
    }
}
