//! The name of a binding's socket unit, derived from its LISTEN alone: the
//! config uses it to find two lines for one socket, the unit writer to name
//! the file. Its own module so that both can use it and neither depends on
//! the other's work (it needs nothing but the listen address).
//!
//! A unit is named after its LISTEN address, never after its line number or
//! destination, so reordering lines or changing a target keeps the name (and
//! the socket's state in the manager). The name is `qrexec-connect-KEY.socket`:
//!
//! | LISTEN | KEY |
//! | --- | --- |
//! | `127.0.0.1:2222` | `127.0.0.1:2222` |
//! | `[::1]:8080` | `::1:8080` (brackets dropped, so no escapes) |
//! | `/run/user/1000/agent` | `path-run-user-1000-agent` |
//! | `%t/qrexec-connect/agent` | `runtime-qrexec\x2dconnect-agent` |
//! | `%h/.gnupg/S.agent` | `home-\x2egnupg-S.agent` |
//! | `@container` | `abstract-container` |
//!
//! After the kind word, a path is escaped exactly like `systemd-escape --path`
//! does with the path below `/`, `%t` or `%h`, and an abstract name like
//! `systemd-escape` does. Two distinct LISTENs never share a KEY: IP keys
//! contain no `-` (IPv4 has one `:`, IPv6 at least three), every other KEY is
//! a kind word without `-` followed by `-`, and both escapes are injective
//! (paths are compared after the same simplification systemd applies, so
//! `/run//a` and `/run/a`, the same socket, get the same name).
//!
//! A KEY that would make the name longer than 255 bytes is cut (never inside
//! a `\xNN`) and ends in `-` and the 16 hex digits of the FNV-1a 64 hash of
//! the full KEY. Such a name could in theory equal the plain name of another
//! LISTEN; [`crate::config`] refuses the later line of any two lines that map
//! to one unit name, so a collision is reported, never silently merged.

use std::net::SocketAddr;

use qrexec_connect_binding::address::ListenAddress;

/// Every generated unit name starts with this, so the shipped drop-in
/// `qrexec-connect-.socket.d/` applies to all of them.
pub const UNIT_PREFIX: &str = "qrexec-connect-";
/// The unit type suffix.
pub const UNIT_SUFFIX: &str = ".socket";
/// Longest unit name systemd accepts, suffix included.
pub const MAX_UNIT_NAME: usize = 255;

/// Longest KEY that still fits in [`MAX_UNIT_NAME`].
const MAX_KEY: usize = MAX_UNIT_NAME - UNIT_PREFIX.len() - UNIT_SUFFIX.len();
/// `-` plus 16 hex digits.
const HASH_TAIL: usize = 17;

/// The unit name for a listen address (see the module documentation).
pub fn socket_unit_name(listen: &ListenAddress) -> String {
    let key = match listen {
        ListenAddress::Inet(SocketAddr::V4(addr)) => addr.to_string(),
        ListenAddress::Inet(SocketAddr::V6(addr)) => format!("{}:{}", addr.ip(), addr.port()),
        ListenAddress::Path(path) => match path.get(..3) {
            Some("%t/") => format!("runtime-{}", escape_path(&path[3..])),
            Some("%h/") => format!("home-{}", escape_path(&path[3..])),
            _ => format!("path-{}", escape_path(path)),
        },
        ListenAddress::Abstract(name) => format!("abstract-{}", escape(name)),
    };
    format!("{UNIT_PREFIX}{}{UNIT_SUFFIX}", shorten(key))
}

/// Escapes like `systemd-escape`: keeps `[A-Za-z0-9:_.]`, turns `/` into `-`
/// and every other byte, and a leading `.`, into `\xNN`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, &byte) in text.as_bytes().iter().enumerate() {
        match byte {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b':' | b'_' | b'.' => out.push(byte as char),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push('\\');
                out.push('x');
                out.push(HEX[usize::from(byte >> 4)] as char);
                out.push(HEX[usize::from(byte & 0xf)] as char);
            }
        }
    }
    out
}

/// Escapes like `systemd-escape --path`: empty and `.` components are
/// dropped (they name the same file), then the rest is [`escape`]d; the root
/// becomes `-`.
pub fn escape_path(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        escape(&parts.join("/"))
    }
}

/// FNV-1a, 64 bits: tiny, stable across Rust releases and platforms (unlike
/// std's `DefaultHasher`), good enough to tell long names apart.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Cuts an overlong KEY and appends its hash; never splits a `\xNN` escape.
fn shorten(key: String) -> String {
    if key.len() <= MAX_KEY {
        return key;
    }
    let hash = fnv1a64(key.as_bytes());
    // KEY is ASCII (escape output), so any byte index is a char boundary.
    let mut cut = MAX_KEY - HASH_TAIL;
    if let Some(i) = key[cut - 3..cut].rfind('\\') {
        cut = cut - 3 + i;
    }
    format!("{}-{hash:016x}", &key[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(listen: &str) -> String {
        socket_unit_name(&ListenAddress::parse(listen).unwrap())
    }

    #[test]
    fn names_are_readable() {
        for (listen, unit) in [
            ("127.0.0.1:2222", "qrexec-connect-127.0.0.1:2222.socket"),
            ("127.0.0.1:022", "qrexec-connect-127.0.0.1:22.socket"),
            ("[::1]:8080", "qrexec-connect-::1:8080.socket"),
            ("[0:0::1]:8080", "qrexec-connect-::1:8080.socket"),
            (
                "/run/user/1000/agent",
                "qrexec-connect-path-run-user-1000-agent.socket",
            ),
            ("/run//a/./b", "qrexec-connect-path-run-a-b.socket"),
            (
                "%t/qrexec-connect/agent",
                "qrexec-connect-runtime-qrexec\\x2dconnect-agent.socket",
            ),
            (
                "%h/.gnupg/S.agent",
                "qrexec-connect-home-\\x2egnupg-S.agent.socket",
            ),
            ("@container", "qrexec-connect-abstract-container.socket"),
            ("@a/b", "qrexec-connect-abstract-a-b.socket"),
            ("@a-b", "qrexec-connect-abstract-a\\x2db.socket"),
            ("@.x", "qrexec-connect-abstract-\\x2ex.socket"),
            ("/run/ü", "qrexec-connect-path-run-\\xc3\\xbc.socket"),
        ] {
            assert_eq!(name(listen), unit, "{listen}");
        }
    }

    #[test]
    fn kinds_never_collide() {
        let listens = [
            "1.2.3.4:80",
            "/1.2.3.4:80",
            "%t/1.2.3.4:80",
            "%h/1.2.3.4:80",
            "@1.2.3.4:80",
            "/path-x",
            "/path/x",
            "%t/x",
            "/runtime-x",
            "@runtime-x",
            "/abstract/x",
            "@abstract-x",
            "[::1]:80",
            "/::1:80",
        ];
        let mut names: Vec<String> = listens.iter().map(|l| name(l)).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), listens.len());
    }

    #[test]
    fn long_names_are_hashed_within_limits() {
        let long = format!("/{}", "é".repeat(50)); // 101 bytes, 400 escaped
        let unit = name(&long);
        // The cut backs off to the escape boundary: 15 + 213 + 17 + 7.
        assert_eq!(unit.len(), 252, "{unit}");
        assert!(unit.starts_with("qrexec-connect-path-\\xc3\\xa9"));
        let hash = format!("-{:016x}.socket", fnv1a64(&unit_key_of(&long)));
        assert!(unit.ends_with(&hash), "{unit}");
        // The cut never leaves half an escape behind.
        let kept = &unit[..unit.len() - hash.len()];
        assert!(kept.ends_with("\\xa9") || kept.ends_with("\\xc3"), "{kept}");

        let other = format!("/{}è", "é".repeat(49));
        assert_ne!(name(&other), unit);
        let fits = format!("/{}", "a".repeat(106));
        assert_eq!(name(&fits).len(), UNIT_PREFIX.len() + 5 + 106 + 7);
    }

    fn unit_key_of(listen: &str) -> Vec<u8> {
        match ListenAddress::parse(listen).unwrap() {
            ListenAddress::Path(p) => format!("path-{}", escape_path(&p)).into_bytes(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn fnv1a64_matches_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    /// Our escaping must agree with systemd's own tool where it exists.
    #[test]
    fn escaping_matches_systemd_escape() {
        let samples = [
            "run/user/1000/agent",
            "qrexec-connect/agent",
            ".gnupg/S.gpg-agent.ssh",
            "a b/c%d/e\\f",
            "ü/@x:y_z.w",
            "a//b/./c/",
        ];
        let run = |args: &[&str]| {
            std::process::Command::new("systemd-escape")
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8(o.stdout).unwrap().trim_end().to_owned())
        };
        // The comparison is the point of this test: without the real tool
        // it fails rather than passing by not running.
        assert!(
            run(&["x"]).is_some(),
            "systemd-escape (package systemd) is needed to compare with"
        );
        for sample in samples {
            assert_eq!(
                Some(escape_path(sample)),
                run(&["--path", "--", &format!("/{sample}")]),
                "--path {sample}"
            );
            assert_eq!(Some(escape(sample)), run(&["--", sample]), "{sample}");
        }
    }
}
