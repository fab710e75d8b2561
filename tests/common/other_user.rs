//! Another local user's process, as an attacker would run one: uid
//! [`OTHER_UID`] (no account is needed for a uid), started with `setpriv`,
//! holding an address with `systemd-socket-activate`, which binds and
//! listens at once and then waits for a first connection, or (perl, in
//! every Debian) binding a port without listening.
//!
//! Included with `#[path]` by the tests that need it.

#![allow(dead_code)] // each test binary uses some

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, Command, Stdio};

/// The other user's uid.
pub const OTHER_UID: u32 = 2001;

/// A process of uid [`OTHER_UID`] listening on an address; killed when
/// dropped (a path socket's file stays, as after any crash).
pub struct OtherUser {
    child: Child,
    /// Kept open: a closed pipe would kill it at its next message.
    _stderr: BufReader<ChildStderr>,
}

impl OtherUser {
    /// Listens on `address` (`127.0.0.1:PORT`, `/path`, `@name`); returns
    /// once the socket is bound and listening.
    pub fn listen(address: &str) -> OtherUser {
        let id = OTHER_UID.to_string();
        let mut child = Command::new("setpriv")
            .arg(format!("--reuid={id}"))
            .arg(format!("--regid={id}"))
            .args(["--clear-groups", "--", "systemd-socket-activate", "-l"])
            .arg(address)
            .arg("cat")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("setpriv (util-linux) and systemd-socket-activate run");
        // "Listening on ADDRESS as 3." once it listens.
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("Listening on "),
            "uid {OTHER_UID} could not listen on {address}: {line}"
        );
        OtherUser {
            child,
            _stderr: stderr,
        }
    }

    /// Binds `ip`:`port` (TCP, without `SO_REUSEADDR`) and never listens:
    /// no LISTEN row in `/proc/net/tcp`, yet systemd's bind there fails.
    /// Returns once the socket is bound.
    pub fn bind_only(ip: &str, port: u16) -> OtherUser {
        let id = OTHER_UID.to_string();
        let script = format!(
            "use Socket; socket(S, PF_INET, SOCK_STREAM, 0) or die \"socket: $!\\n\"; \
             bind(S, pack_sockaddr_in({port}, inet_aton(\"{ip}\"))) or die \"bind: $!\\n\"; \
             print STDERR \"Bound\\n\"; sleep"
        );
        let mut child = Command::new("setpriv")
            .arg(format!("--reuid={id}"))
            .arg(format!("--regid={id}"))
            .args(["--clear-groups", "--", "perl", "-e", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("setpriv (util-linux) and perl run");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert_eq!(
            line, "Bound\n",
            "uid {OTHER_UID} could not bind {ip}:{port}"
        );
        OtherUser {
            child,
            _stderr: stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for OtherUser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
