//! Listen addresses: the LISTEN column of a config line, and what the daemon
//! reads back from an inherited socket (in the daemon's `listener.rs`).
//!
//! Both sides print an address the same way (`127.0.0.1:2222`, `[::1]:8080`,
//! `/run/user/1000/agent`, `@name`), so a journal line names a binding exactly
//! as the user wrote it in the config (after `%t`/`%h` expansion).

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::ffi::OsStringExt;

/// Longest `ListenStream=` socket address systemd 252 accepts, in bytes after
/// specifier expansion: a path of 107 bytes, or `@` and a name of 106
/// (`sun_path` is 108 bytes; systemd keeps one for the NUL). Checked with
/// `systemd-analyze --user verify`, see docs/design.md.
pub const MAX_SOCKET_PATH: usize = 107;

/// Where a binding listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddress {
    /// A TCP address; IPv6 is written in brackets.
    Inet(SocketAddr),
    /// A Unix socket path: absolute, or starting with the systemd specifier
    /// `%t/` (runtime dir) or `%h/` (home), kept unexpanded.
    Path(String),
    /// An abstract Unix socket, written `@name`.
    Abstract(String),
}

impl ListenAddress {
    /// Parses the LISTEN column of a config line.
    pub fn parse(text: &str) -> Result<ListenAddress, AddressError> {
        let bad = |why| Err(AddressError::new(text, why));
        if text.is_empty() {
            return bad(Why::Empty);
        }
        if let Some(c) = text.chars().find(|c| c.is_control() || c.is_whitespace()) {
            return bad(Why::ControlCharacter(c));
        }
        if text.ends_with('\\') {
            // A unit file line ending in a backslash continues on the next
            // line, so `ListenStream=` would swallow the line after it.
            return bad(Why::TrailingBackslash);
        }
        if let Some(name) = text.strip_prefix('@') {
            if name.is_empty() {
                return bad(Why::EmptyAbstract);
            }
            if text.len() > MAX_SOCKET_PATH {
                return bad(Why::PathTooLong);
            }
            return Ok(ListenAddress::Abstract(name.to_owned()));
        }
        if text.starts_with('/') || text.starts_with("%t/") || text.starts_with("%h/") {
            if text.len() > MAX_SOCKET_PATH {
                return bad(Why::PathTooLong);
            }
            if text.split('/').any(|part| part == "..") {
                return bad(Why::DotDot);
            }
            if text.ends_with('/') {
                return bad(Why::DirectoryPath);
            }
            return Ok(ListenAddress::Path(text.to_owned()));
        }
        if text.starts_with('%') {
            return bad(Why::Specifier);
        }
        if let Some(port) = out_of_range_port(text) {
            return bad(Why::PortOutOfRange(port));
        }
        if text.parse::<u16>().is_ok() {
            return bad(Why::BarePort);
        }
        match text.parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => bad(Why::PortZero),
            Ok(SocketAddr::V6(v6)) if v6.scope_id() != 0 || v6.flowinfo() != 0 => bad(Why::ScopeId),
            Ok(addr) => Ok(ListenAddress::Inet(addr)),
            Err(_) => bad(Why::Unrecognised),
        }
    }

    /// For an IP address other VMs on the qube's network can reach (not a
    /// loopback address), how far it is open; `None` for loopback and Unix
    /// sockets.
    pub fn exposure(&self) -> Option<Exposure> {
        let ListenAddress::Inet(addr) = self else {
            return None;
        };
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if ip.is_loopback() {
            None
        } else if ip.is_unspecified() {
            Some(Exposure::EveryInterface)
        } else {
            Some(Exposure::ThisAddress)
        }
    }

    /// The socket file systemd will bind, with a leading `%t` or `%h`
    /// replaced as systemd replaces it; `None` for IP and abstract sockets,
    /// and when the specifier's value is unknown.
    pub fn expanded_path(&self, specifiers: &Specifiers) -> Option<Vec<u8>> {
        let ListenAddress::Path(path) = self else {
            return None;
        };
        let base = match path.get(..3) {
            Some("%t/") => specifiers.runtime_dir.as_ref()?,
            Some("%h/") => specifiers.home.as_ref()?,
            _ => return Some(path.as_bytes().to_vec()),
        };
        // The `/` after the specifier stays: systemd pastes the value in.
        let mut expanded = base.clone();
        expanded.extend_from_slice(&path.as_bytes()[2..]);
        Some(expanded)
    }

    /// The value for `ListenStream=`: a leading `%t/` or `%h/` stays a
    /// specifier, every other `%` is escaped so it stays literal.
    pub fn to_listen_stream(&self) -> String {
        match self {
            ListenAddress::Inet(addr) => addr.to_string(),
            ListenAddress::Path(path) => {
                let (specifier, rest) = match path.get(..3) {
                    Some(p @ ("%t/" | "%h/")) => (p, &path[3..]),
                    _ => ("", path.as_str()),
                };
                format!("{specifier}{}", rest.replace('%', "%%"))
            }
            ListenAddress::Abstract(name) => format!("@{}", name.replace('%', "%%")),
        }
    }
}

/// How far a non-loopback IP listen address is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// `0.0.0.0` or `::`: every interface of the qube.
    EveryInterface,
    /// One non-loopback address, e.g. the qube's own on its network.
    ThisAddress,
}

/// What systemd puts in place of `%t` and `%h` in a user unit, as bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Specifiers {
    /// `%t`: `$XDG_RUNTIME_DIR` exactly as set (systemd does not tidy it).
    pub runtime_dir: Option<Vec<u8>>,
    /// `%h`: `$HOME` with duplicate slashes, `.` components and a trailing
    /// slash removed, as systemd's `path_simplify()` does.
    pub home: Option<Vec<u8>>,
}

impl Specifiers {
    /// The values for this process's environment (a generator gets the
    /// user manager's).
    pub fn from_env() -> Specifiers {
        Specifiers::from_vars(
            std::env::var_os("XDG_RUNTIME_DIR"),
            std::env::var_os("HOME"),
        )
    }

    /// Values that are not absolute paths are unknown: systemd refuses them.
    pub fn from_vars(runtime_dir: Option<OsString>, home: Option<OsString>) -> Specifiers {
        let absolute = |v: Option<OsString>| {
            v.map(OsString::into_vec)
                .filter(|v| v.first() == Some(&b'/'))
        };
        Specifiers {
            runtime_dir: crate::runtime_dir::usable(runtime_dir)
                .map(|path| path.into_os_string().into_vec()),
            home: absolute(home).map(|h| simplify_path(&h)),
        }
    }
}

/// `path_simplify()` for an absolute path: `//a/./b/` is `/a/b`.
fn simplify_path(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for part in path.split(|&b| b == b'/') {
        if !part.is_empty() && part != b"." {
            out.push(b'/');
            out.extend_from_slice(part);
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

/// The port of `HOST:PORT` or of a bare port when it is all digits but
/// above 65535, so the message can say so instead of "unrecognised".
fn out_of_range_port(text: &str) -> Option<u64> {
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (Some(host), port),
        None => (None, text),
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let host_ok = match host {
        None => true,
        Some(host) => match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
            None => host.parse::<Ipv4Addr>().is_ok(),
        },
    };
    // Digits beyond u64 are out of range too.
    let value = port.parse::<u64>().unwrap_or(u64::MAX);
    (host_ok && value > u64::from(u16::MAX)).then_some(value)
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddress::Inet(addr) => write!(f, "{addr}"),
            ListenAddress::Path(path) => f.write_str(path),
            ListenAddress::Abstract(name) => write!(f, "@{name}"),
        }
    }
}

/// A LISTEN value that was refused, with the reason and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressError {
    pub text: String,
    why: Why,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Empty,
    ControlCharacter(char),
    TrailingBackslash,
    EmptyAbstract,
    PathTooLong,
    Specifier,
    DotDot,
    DirectoryPath,
    BarePort,
    PortOutOfRange(u64),
    PortZero,
    ScopeId,
    Unrecognised,
}

impl AddressError {
    fn new(text: &str, why: Why) -> AddressError {
        AddressError {
            text: text.to_owned(),
            why,
        }
    }
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = &self.text;
        match self.why {
            Why::Empty => f.write_str("empty listen address"),
            Why::ControlCharacter(c) => {
                write!(
                    f,
                    "listen address {text:?} contains the control or space character {c:?}"
                )
            }
            Why::TrailingBackslash => write!(
                f,
                "listen address {text:?} ends with a backslash, which systemd reads as a \
                 line continuation"
            ),
            Why::EmptyAbstract => f.write_str("abstract socket '@' needs a name after the '@'"),
            Why::PathTooLong => write!(
                f,
                "socket path {text:?} is longer than {MAX_SOCKET_PATH} bytes, the kernel's limit"
            ),
            Why::Specifier => write!(
                f,
                "listen address {text:?} uses '%' where only a leading %t/ or %h/ is allowed"
            ),
            Why::DotDot => write!(f, "socket path {text:?} contains '..'"),
            Why::DirectoryPath => write!(f, "socket path {text:?} ends with '/'"),
            Why::BarePort => write!(
                f,
                "a bare port does not say which interface to listen on: write \
                 127.0.0.1:{text} (or [::1]:{text}) for this qube only, or 0.0.0.0:{text} \
                 if other VMs on the qube's network may connect"
            ),
            Why::PortOutOfRange(port) if port == u64::MAX => write!(
                f,
                "listen address {text:?}: the port is out of range (1 to 65535)"
            ),
            Why::PortOutOfRange(port) => write!(
                f,
                "listen address {text:?}: port {port} is out of range (1 to 65535)"
            ),
            Why::PortZero => write!(f, "listen address {text:?} has port 0"),
            Why::ScopeId => write!(
                f,
                "listen address {text:?}: IPv6 scope ids are not supported"
            ),
            Why::Unrecognised => write!(
                f,
                "unrecognised listen address {text:?}: expected IPv4:PORT, [IPv6]:PORT, \
                 an absolute path, %t/PATH, %h/PATH or @abstract-name"
            ),
        }
    }
}

impl std::error::Error for AddressError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_form() {
        for (text, shown) in [
            ("127.0.0.1:2222", "127.0.0.1:2222"),
            ("[::1]:8080", "[::1]:8080"),
            ("/run/x/agent", "/run/x/agent"),
            ("%t/qrexec-connect/agent", "%t/qrexec-connect/agent"),
            ("%h/.agent", "%h/.agent"),
            ("@container", "@container"),
        ] {
            let addr = ListenAddress::parse(text).unwrap();
            assert_eq!(addr.to_string(), shown);
        }
    }

    #[test]
    fn only_a_leading_specifier_survives() {
        let unit = |t: &str| ListenAddress::parse(t).unwrap().to_listen_stream();
        assert_eq!(unit("%t/a%tb"), "%t/a%%tb");
        assert_eq!(unit("/run/50%"), "/run/50%%");
        assert_eq!(unit("@x%h"), "@x%%h");
        assert_eq!(unit("[::1]:1"), "[::1]:1");
    }

    #[test]
    fn refuses_what_would_surprise() {
        for bad in [
            "",
            "22",
            "localhost:22",
            "127.0.0.1:0",
            "%t",
            "%x/a",
            "%t",
            "/a/../b",
            "/a/",
            "@",
            "a b",
            "/tab\there",
            "1.2.3.4",
            "[::1]",
            "/run/a\\",
            "@x\\",
        ] {
            assert!(
                ListenAddress::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        let err = ListenAddress::parse("2222").unwrap_err().to_string();
        assert!(err.contains("127.0.0.1:2222"), "{err}");
    }

    #[test]
    fn ports_out_of_range_say_so() {
        for (text, port) in [
            ("127.0.0.1:99999", "port 99999"),
            ("[::1]:65536", "port 65536"),
            ("0.0.0.0:70000", "port 70000"),
            ("99999", "port 99999"),
            ("127.0.0.1:99999999999999999999999", "the port"),
        ] {
            let err = ListenAddress::parse(text).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{port} is out of range (1 to 65535)")),
                "{text}: {err}"
            );
        }
        let err = ListenAddress::parse("localhost:99999")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("unrecognised"), "{err}");
    }

    #[test]
    fn exposure_of_ip_addresses() {
        let exposure = |t: &str| ListenAddress::parse(t).unwrap().exposure();
        assert_eq!(exposure("0.0.0.0:1"), Some(Exposure::EveryInterface));
        assert_eq!(exposure("[::]:1"), Some(Exposure::EveryInterface));
        assert_eq!(
            exposure("[::ffff:0.0.0.0]:1"),
            Some(Exposure::EveryInterface)
        );
        assert_eq!(exposure("10.137.0.5:1"), Some(Exposure::ThisAddress));
        assert_eq!(exposure("[fd00::a]:1"), Some(Exposure::ThisAddress));
        for private in [
            "127.0.0.1:1",
            "127.0.1.1:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
            "/a",
            "@a",
        ] {
            assert_eq!(exposure(private), None, "{private}");
        }
    }

    #[test]
    fn paths_expand_like_systemd() {
        let specifiers =
            Specifiers::from_vars(Some("/run//user/1/".into()), Some("//home/./u/".into()));
        let expand = |t: &str| {
            ListenAddress::parse(t)
                .unwrap()
                .expanded_path(&specifiers)
                .map(|p| String::from_utf8(p).unwrap())
        };
        // %t is pasted as it is, %h is tidied first (both seen with
        // systemd-analyze verify on systemd 252).
        assert_eq!(expand("%t/a").as_deref(), Some("/run//user/1//a"));
        assert_eq!(expand("%h/a//b").as_deref(), Some("/home/u/a//b"));
        assert_eq!(expand("/x/%t/y").as_deref(), Some("/x/%t/y"));
        assert_eq!(expand("@a"), None);
        let unknown = Specifiers::from_vars(Some("relative".into()), None);
        assert_eq!(unknown, Specifiers::default());
        let root = Specifiers::from_vars(None, Some("///".into()));
        assert_eq!(root.home.as_deref(), Some(&b"/"[..]));
    }
}
