//! `qubes.ConnectNFS`: the service side of an NFS binding.
//!
//! Installed as the executable qrexec service `/etc/qubes-rpc/qubes.ConnectNFS`
//! in the qube that runs the NFS server. A call `qubes.ConnectNFS+127.0.1.1`
//! connects to the server at 127.0.0.1:2049 *from* 127.0.1.1, so the server's
//! per-client export rules (`/etc/exports`) can tell client qubes apart by the
//! loopback address dom0 policy lets each of them use. Then it moves bytes
//! between qrexec (stdin/stdout) and that TCP connection until both directions
//! have ended.
//!
//! The flow, top to bottom: read the argument (`QREXEC_SERVICE_ARGUMENT`),
//! check it is a loopback host address, bind it, connect, forward.
//!
//! Exit status (qrexec itself uses 125-127, so these never collide):
//!
//! * 0: both directions ended (EOF, or the peer went away with EPIPE or
//!   ECONNRESET: a connection that ends is not an error here);
//! * 1: could not connect to the NFS server (bind or connect failed);
//! * 2: bad argument, or (debug builds) a bad `QREXEC_CONNECT_NFS_PORT`;
//! * 3: an unexpected I/O error while forwarding.
//!
//! It takes no command-line options: qrexec passes the argument in argv too,
//! but the environment is the one place it is read from, so an argument can
//! never be mistaken for an option.

use std::env;
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::thread;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Where qrexec puts the `+ARG` part of the service name.
const ARGUMENT_ENV: &str = "QREXEC_SERVICE_ARGUMENT";
/// Set by qrexec to the calling qube; only used to make messages clearer.
const CALLER_ENV: &str = "QREXEC_REMOTE_DOMAIN";
/// Overrides the destination port, so the test suite can run a stand-in
/// server. Debug builds only: a release build has no such variable and
/// always connects to 2049, so nothing in a service qube's environment can
/// send NFS clients elsewhere.
#[cfg(debug_assertions)]
const PORT_ENV: &str = "QREXEC_CONNECT_NFS_PORT";
/// The NFSv4 port; v4 needs no other port (no rpcbind, no mountd).
const NFS_PORT: u16 = 2049;
/// The server is always reached on the service qube's own loopback.
const NFS_HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

const EXIT_CONNECT_FAILED: u8 = 1;
const EXIT_BAD_ARGUMENT: u8 = 2;
const EXIT_FORWARD_FAILED: u8 = 3;

/// Bytes moved per read. NFS sends records of up to 1 MiB; 64 KiB keeps
/// the syscall count low without holding much memory per connection.
const BUFFER_SIZE: usize = 64 * 1024;

const STDOUT: RawFd = 1;

/// Prefix of every message; the journal also tags them with the service.
const NAME: &str = "qubes.ConnectNFS";

fn main() -> ExitCode {
    // A write to a closed pipe or socket must come back as EPIPE, which ends
    // that direction cleanly, instead of killing the process. (Rust already
    // does this at startup; qrexec resets it to the default before exec.)
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };

    let source = match SourceAddress::from_env(env::var_os(ARGUMENT_ENV)) {
        Ok(source) => source,
        Err(error) => {
            report_bad_argument(&error);
            return ExitCode::from(EXIT_BAD_ARGUMENT);
        }
    };
    let port = match nfs_port() {
        Ok(port) => port,
        Err(message) => {
            eprintln!("{NAME}: {message}");
            return ExitCode::from(EXIT_BAD_ARGUMENT);
        }
    };
    let stream = match connect(source, port) {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!("{NAME}: {error}");
            return ExitCode::from(EXIT_CONNECT_FAILED);
        }
    };
    forward(stream)
}

// ---------------------------------------------------------------------------
// The argument
// ---------------------------------------------------------------------------

/// A loopback host address to connect from: four decimal numbers, the first
/// 127, no leading zeros, not the network (127.0.0.0) or broadcast
/// (127.255.255.255) address, and not 127.0.0.1.
///
/// Leading zeros are refused because tools disagree on them: `inet_aton`
/// reads `127.0.1.010` as octal (127.0.1.8) while exports files and humans
/// read decimal, so the address policy allowed might not be the one bound.
/// Short forms (`127.1`) are refused for the same reason. The broadcast
/// address is refused because Linux accepts binding it for TCP but the
/// connection then comes from 127.0.0.1, so the server would see another
/// client's address. 127.0.0.1 is refused because it is where the server
/// sees the service qube's own processes (and every `qubes.ConnectTCP`
/// caller): exports meant for those must not be granted to a client qube.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SourceAddress(Ipv4Addr);

impl SourceAddress {
    fn from_env(value: Option<OsString>) -> Result<SourceAddress, ArgumentError> {
        let value = value.ok_or(ArgumentError::Unset)?;
        let text = value.into_string().map_err(|raw| {
            ArgumentError::Invalid(raw.to_string_lossy().into_owned(), Why::NotText)
        })?;
        SourceAddress::parse(&text)
    }

    fn parse(text: &str) -> Result<SourceAddress, ArgumentError> {
        let bad = |why| Err(ArgumentError::Invalid(text.to_owned(), why));
        if text.is_empty() {
            return Err(ArgumentError::Empty);
        }
        match text.matches(':').count() {
            0 => {}
            1 => return bad(Why::HasPort),
            _ => return bad(Why::Ipv6),
        }
        let parts: Vec<&str> = text.split('.').collect();
        if parts.len() != 4 {
            return bad(Why::NotFourNumbers(parts.len()));
        }
        let mut octets = [0u8; 4];
        for (octet, part) in octets.iter_mut().zip(&parts) {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return bad(Why::NotANumber(part.to_string()));
            }
            if part.len() > 1 && part.starts_with('0') {
                return bad(Why::LeadingZero(part.to_string()));
            }
            *octet = match part.parse() {
                Ok(value) => value,
                Err(_) => return bad(Why::TooLarge(part.to_string())),
            };
        }
        let address = Ipv4Addr::from(octets);
        if octets[0] != 127 {
            return bad(Why::NotLoopback);
        }
        if octets[1..] == [0, 0, 0] {
            return bad(Why::NetworkAddress);
        }
        if octets[1..] == [255, 255, 255] {
            return bad(Why::BroadcastAddress);
        }
        if address == NFS_HOST {
            return bad(Why::ServerAddress);
        }
        Ok(SourceAddress(address))
    }
}

impl fmt::Display for SourceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ArgumentError {
    /// Called as plain `qubes.ConnectNFS`: qrexec then unsets the variable.
    Unset,
    /// Called as `qubes.ConnectNFS+` (an empty argument).
    Empty,
    Invalid(String, Why),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Why {
    NotText,
    HasPort,
    Ipv6,
    NotFourNumbers(usize),
    NotANumber(String),
    LeadingZero(String),
    TooLarge(String),
    NotLoopback,
    NetworkAddress,
    BroadcastAddress,
    ServerAddress,
}

impl fmt::Display for ArgumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgumentError::Unset => write!(
                f,
                "no source address: {ARGUMENT_ENV} is not set (the service was called \
                 without an argument)"
            ),
            ArgumentError::Empty => write!(
                f,
                "no source address: {ARGUMENT_ENV} is empty (the service was called as \
                 \"{NAME}+\")"
            ),
            ArgumentError::Invalid(text, why) => {
                write!(f, "bad source address {text:?} in {ARGUMENT_ENV}: ")?;
                match why {
                    Why::NotText => f.write_str("it is not valid UTF-8"),
                    Why::HasPort => {
                        f.write_str("give only the address; the port is always the NFS port, 2049")
                    }
                    Why::Ipv6 => f.write_str(
                        "IPv6 is not supported; the NFS server is reached over IPv4 loopback",
                    ),
                    Why::NotFourNumbers(n) => write!(
                        f,
                        "it has {n} dot-separated part{}, not the four of 127.X.Y.Z \
                         (short forms like 127.1 are not accepted)",
                        if *n == 1 { "" } else { "s" }
                    ),
                    Why::NotANumber(part) => write!(f, "{part:?} is not a decimal number"),
                    Why::LeadingZero(part) => write!(
                        f,
                        "{part:?} has a leading zero, which some tools read as octal; \
                         write it without leading zeros"
                    ),
                    Why::TooLarge(part) => write!(f, "{part} is larger than 255"),
                    Why::NotLoopback => f.write_str(
                        "it is not a loopback address (127.0.0.0/8); the NFS server must \
                         see the client as a local address",
                    ),
                    Why::NetworkAddress => {
                        f.write_str("127.0.0.0 is the network address, not a host address")
                    }
                    Why::BroadcastAddress => f.write_str(
                        "127.255.255.255 is the broadcast address; connections bound to it \
                         come from 127.0.0.1",
                    ),
                    Why::ServerAddress => f.write_str(
                        "127.0.0.1 is the NFS server's own address, from which the server sees \
                         this qube's own processes; give each client qube an address of its own, \
                         such as 127.0.1.1",
                    ),
                }
            }
        }
    }
}

/// Prints what is wrong, who asked, and how a correct call and policy look.
fn report_bad_argument(error: &ArgumentError) {
    let caller = env::var(CALLER_ENV).ok().filter(|c| !c.is_empty());
    match &caller {
        Some(caller) => eprintln!("{NAME}: call from {caller}: {error}"),
        None => eprintln!("{NAME}: {error}"),
    }
    let client = caller.as_deref().unwrap_or("nfs-client");
    eprintln!(
        "{NAME}: the argument is the loopback address to connect from, 127.X.Y.Z with four \
         decimal numbers and no leading zeros. Call the service as \
         \"{NAME}+127.0.1.1\" (client config line: \"127.0.0.1:2049 nfs-server \
         {NAME}+127.0.1.1\") and allow exactly that argument in dom0 policy: \
         \"{NAME} +127.0.1.1 {client} nfs-server allow\""
    );
}

/// The destination port: 2049 in release builds.
#[cfg(not(debug_assertions))]
fn nfs_port() -> Result<u16, String> {
    Ok(NFS_PORT)
}

/// The destination port: 2049, or `QREXEC_CONNECT_NFS_PORT` (debug builds,
/// for tests).
#[cfg(debug_assertions)]
fn nfs_port() -> Result<u16, String> {
    port_from(env::var_os(PORT_ENV))
}

#[cfg(debug_assertions)]
fn port_from(value: Option<OsString>) -> Result<u16, String> {
    let Some(value) = value else {
        return Ok(NFS_PORT);
    };
    match value.to_str().and_then(|text| text.parse::<u16>().ok()) {
        Some(port) if port != 0 => Ok(port),
        _ => Err(format!(
            "bad {PORT_ENV} {value:?}: expected a port number from 1 to 65535 (this variable \
             exists in debug builds for tests only; unset it to use the NFS port, {NFS_PORT})"
        )),
    }
}

// ---------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------

/// Why no connection to the NFS server could be made.
#[derive(Debug)]
enum ConnectError {
    Socket(io::Error),
    Bind(SourceAddress, io::Error),
    Connect(SourceAddress, u16, io::Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Socket(e) => write!(f, "cannot create a TCP socket: {e}"),
            ConnectError::Bind(source, e) => {
                write!(f, "cannot use {source} as the source address: {e}")?;
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                    write!(
                        f,
                        "; the address is not local on this qube: check that \
                         `ip route show table local` lists 127.0.0.0/8 on lo, or add \
                         {source} to lo"
                    )?;
                }
                Ok(())
            }
            ConnectError::Connect(source, port, e) => {
                write!(
                    f,
                    "cannot connect from {source} to the NFS server at {NFS_HOST}:{port}: {e}"
                )?;
                if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                    write!(
                        f,
                        "; nothing listens there: is the NFS server running on this qube \
                         (e.g. `systemctl status nfs-server`) with NFSv4 on TCP port {port}?"
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// Opens a TCP connection to the NFS server from `source` (port chosen by
/// the kernel). std's `TcpStream::connect` cannot bind first, socket2 can.
fn connect(source: SourceAddress, port: u16) -> Result<TcpStream, ConnectError> {
    // Close-on-exec, as socket2 makes every socket.
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(ConnectError::Socket)?;

    // Let the kernel pick the source port at connect time rather than at
    // bind time, so ports are shared across destinations instead of being
    // reserved by bind(2). Only an optimisation: failure is ignored.
    // socket2 has no call for this option, hence the raw setsockopt.
    let _ = set_option(
        socket.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        1,
    );

    let from = SocketAddr::from((source.0, 0));
    socket
        .bind(&from.into())
        .map_err(|e| ConnectError::Bind(source, e))?;

    // One attempt: this program installs no signal handler, so connect(2)
    // cannot fail with EINTR (and retrying an interrupted connect would be
    // wrong anyway: the first attempt carries on in the kernel).
    let to = SocketAddr::from((NFS_HOST, port));
    socket
        .connect(&to.into())
        .map_err(|e| ConnectError::Connect(source, port, e))?;
    let stream = TcpStream::from(socket);
    // NFS is request/response: a record split across two reads must not wait
    // for an ACK (Nagle) before its tail goes out. Loopback, so no cost.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Sets an integer socket option socket2 has no call for.
fn set_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a c_int and its size is passed alongside it.
    let done = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------

/// How one direction ended.
enum End {
    /// EOF on the reading side, or the far side went away (EPIPE,
    /// ECONNRESET): the normal ways a connection ends.
    Done,
    /// Anything else; the message says which side failed.
    Failed(String),
}

/// Moves bytes both ways until both directions have ended, one thread per
/// direction (blocking I/O, no polling). Each direction passes its end on:
///
/// * qrexec client to NFS server: stdin EOF becomes `shutdown(SHUT_WR)` on
///   the TCP socket, so the server sees EOF while its replies still flow;
/// * NFS server to qrexec client: TCP EOF ends stdout (see [`end_stdout`]).
fn forward(stream: TcpStream) -> ExitCode {
    // fd 0 through a duplicate; fd 1 taken over, so that it can be closed
    // when the server's side ends (see `end_stdout`).
    let stdin = match io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => File::from(fd),
        Err(e) => {
            eprintln!("{NAME}: cannot use stdin: {e}");
            return ExitCode::from(EXIT_FORWARD_FAILED);
        }
    };
    // SAFETY: qrexec starts a service with fd 1 open, and nothing else in
    // this program uses it (no print to stdout), so this is its only owner.
    let stdout = File::from(unsafe { OwnedFd::from_raw_fd(STDOUT) });
    let (upstream, downstream) = thread::scope(|scope| {
        let upstream = scope.spawn(|| {
            let end = pump(
                stdin,
                &stream,
                "reading from qrexec (stdin)",
                "writing to the NFS server",
            );
            // Whatever ended this direction, the server gets no more data.
            let _ = stream.shutdown(Shutdown::Write);
            end
        });
        let downstream = scope.spawn(|| {
            let end = pump(
                &stream,
                &stdout,
                "reading from the NFS server",
                "writing to qrexec (stdout)",
            );
            end_stdout(stdout);
            end
        });
        // A direction thread never panics (no unwrap in it); if it did, the
        // release profile aborts, so join can only fail in debug builds.
        (
            upstream
                .join()
                .unwrap_or(End::Failed("upstream thread panicked".into())),
            downstream
                .join()
                .unwrap_or(End::Failed("downstream thread panicked".into())),
        )
    });
    let mut status = ExitCode::SUCCESS;
    for end in [upstream, downstream] {
        if let End::Failed(message) = end {
            eprintln!("{NAME}: {message}");
            status = ExitCode::from(EXIT_FORWARD_FAILED);
        }
    }
    status
}

/// Copies until EOF or an error; never returns early on EINTR.
fn pump(mut from: impl Read, mut to: impl Write, reading: &str, writing: &str) -> End {
    let mut buffer = vec![0u8; BUFFER_SIZE];
    loop {
        let count = match from.read(&mut buffer) {
            Ok(0) => return End::Done,
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if peer_gone(&e) => return End::Done,
            Err(e) => return End::Failed(format!("{reading} failed: {e}")),
        };
        match to.write_all(&buffer[..count]) {
            Ok(()) => {}
            Err(e) if peer_gone(&e) => return End::Done,
            Err(e) => return End::Failed(format!("{writing} failed: {e}")),
        }
    }
}

/// The other side closed or reset the connection: the end of a direction,
/// not a failure of this program.
fn peer_gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// Tells the qrexec client that no more data comes from the server.
///
/// Closing fd 1 is enough when stdout is its own pipe or socket. When stdin
/// and stdout are the same socket, the description stays open through fd 0
/// and a close would send nothing (the hang of qubes-issues #9169), so a
/// socket gets `shutdown(SHUT_WR)` first; that ends only our sending side,
/// and data from the client keeps arriving on fd 0.
fn end_stdout(stdout: File) {
    // ENOTSOCK for a pipe is expected and ignored; the close is the drop.
    let _ = SockRef::from(&stdout).shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(text: &str) -> Why {
        match SourceAddress::parse(text) {
            Err(ArgumentError::Invalid(_, why)) => why,
            other => panic!("{text:?}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn accepts_loopback_host_addresses() {
        for text in [
            "127.0.0.2",
            "127.0.1.1",
            "127.0.1.2",
            "127.1.2.3",
            "127.255.255.254",
            "127.0.0.255",
        ] {
            let parsed = SourceAddress::parse(text).unwrap();
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn refuses_what_is_not_a_loopback_host() {
        assert_eq!(why("10.0.0.1"), Why::NotLoopback);
        assert_eq!(why("0.0.0.0"), Why::NotLoopback);
        assert_eq!(why("127.0.0.0"), Why::NetworkAddress);
        assert_eq!(why("127.255.255.255"), Why::BroadcastAddress);
        assert_eq!(why("127.0.0.1"), Why::ServerAddress);
    }

    #[test]
    fn refuses_ambiguous_spellings() {
        assert_eq!(why("127.1"), Why::NotFourNumbers(2));
        assert_eq!(why("127.0.0.1.5"), Why::NotFourNumbers(5));
        assert_eq!(why("garbage"), Why::NotFourNumbers(1));
        assert_eq!(why("127.0.1.01"), Why::LeadingZero("01".into()));
        assert_eq!(why("127.0.1.010"), Why::LeadingZero("010".into()));
        assert_eq!(why("127.0.1.256"), Why::TooLarge("256".into()));
        assert_eq!(why("127.0.1.1000"), Why::TooLarge("1000".into()));
        assert_eq!(why("127.0.1."), Why::NotANumber("".into()));
        assert_eq!(why("127.0.1.+1"), Why::NotANumber("+1".into()));
        assert_eq!(why(" 127.0.1.1"), Why::NotANumber(" 127".into()));
        assert_eq!(why("127.0.0.1_5"), Why::NotANumber("1_5".into()));
        assert_eq!(why("127.0.0.1:5"), Why::HasPort);
        assert_eq!(why("::1"), Why::Ipv6);
        assert_eq!(SourceAddress::parse(""), Err(ArgumentError::Empty));
        assert_eq!(SourceAddress::from_env(None), Err(ArgumentError::Unset));
    }

    #[test]
    #[cfg(debug_assertions)]
    fn port_override_is_checked() {
        assert_eq!(port_from(None), Ok(2049));
        assert_eq!(port_from(Some("12049".into())), Ok(12049));
        for bad in ["0", "65536", "", "x", "-1"] {
            assert!(port_from(Some(bad.into())).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_name_the_argument_and_the_problem() {
        let text = SourceAddress::parse("10.0.0.1").unwrap_err().to_string();
        assert!(
            text.contains("\"10.0.0.1\"") && text.contains("127.0.0.0/8"),
            "{text}"
        );
        let text = SourceAddress::parse("127.0.0.1:5").unwrap_err().to_string();
        assert!(text.contains("2049"), "{text}");
    }
}
