//! The service side: where a service lives in the (pretend) target qube,
//! its rpc-config, and opening the connection to it.

use std::fs;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// Exit status: the call could not be started in the target qube.
pub const EXIT_FAILED: i32 = 125;
/// Exit status: no such service in the target qube.
pub const EXIT_NOT_FOUND: i32 = 127;

/// The rpc-config flags the double understands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RpcConfig {
    pub skip_service_descriptor: bool,
    pub exit_on_service_eof: bool,
    pub exit_on_client_eof: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/dev/tcp/HOST[/PORT]`; the port comes from the argument when absent.
    Tcp { host: String, port: Option<String> },
    /// A Unix socket (or a symlink to one).
    Unix(PathBuf),
    /// An executable; `generic` when found as `NAME` rather than `NAME+ARG`.
    Exec { path: PathBuf, generic: bool },
}

#[derive(Debug)]
pub enum Lookup {
    Found(Kind, RpcConfig),
    NotFound,
    /// Present but unusable (exit 125); the text goes to the log.
    Broken(String),
}

/// What the call asks the target qube for.
pub struct Call<'a> {
    /// `QREXEC_DOUBLE_SERVICES`, if set.
    pub dir: Option<&'a Path>,
    /// The effective target qube.
    pub qube: &'a str,
    pub name: &'a str,
    pub argument: &'a str,
    pub source: &'a str,
}

impl Call<'_> {
    fn full_name(&self) -> String {
        format!("{}+{}", self.name, self.argument)
    }

    /// Directories searched, most specific first: `DIR/<qube>`, then `DIR`.
    fn bases(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        if let Some(dir) = self.dir {
            let per_qube = !self.qube.is_empty()
                && !self.qube.contains('/')
                && self.qube != "."
                && self.qube != ".."
                && self.qube != "rpc-config";
            if per_qube {
                let q = dir.join(self.qube);
                if q.is_dir() {
                    v.push(q);
                }
            }
            v.push(dir.to_path_buf());
        }
        v
    }

    fn candidates(&self) -> [String; 2] {
        [self.full_name(), self.name.to_string()]
    }

    /// Finds the service and its rpc-config.
    pub fn lookup(&self) -> Lookup {
        let config = self.config();
        for base in self.bases() {
            for (i, cand) in self.candidates().iter().enumerate() {
                let path = base.join(cand);
                match classify(&path, i == 1) {
                    Entry::Absent => continue,
                    Entry::Found(kind) => return Lookup::Found(kind, config),
                    Entry::Broken(why) => return Lookup::Broken(why),
                }
            }
        }
        if self.name == "qubes.ConnectTCP" {
            let kind = Kind::Tcp {
                host: "127.0.0.1".into(),
                port: None,
            };
            return Lookup::Found(kind, config);
        }
        Lookup::NotFound
    }

    /// The first of `rpc-config/NAME+ARG`, `rpc-config/NAME` found under
    /// `DIR/<qube>` then `DIR`. `qubes.ConnectTCP` without a file gets
    /// `exit-on-service-eof=true`, as shipped in Qubes.
    fn config(&self) -> RpcConfig {
        for base in self.bases() {
            for cand in self.candidates() {
                if let Ok(text) = fs::read_to_string(base.join("rpc-config").join(cand)) {
                    return parse_config(&text);
                }
            }
        }
        RpcConfig {
            exit_on_service_eof: self.name == "qubes.ConnectTCP",
            ..RpcConfig::default()
        }
    }
}

enum Entry {
    Absent,
    Found(Kind),
    Broken(String),
}

fn classify(path: &Path, generic: bool) -> Entry {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Entry::Absent;
    };
    if meta.file_type().is_symlink() {
        if let Ok(dest) = fs::read_link(path) {
            if let Some(rest) = dest.to_str().and_then(|d| d.strip_prefix("/dev/tcp/")) {
                return match parse_dev_tcp(rest) {
                    Some(kind) => Entry::Found(kind),
                    None => Entry::Broken(format!("bad /dev/tcp link {}", dest.display())),
                };
            }
        }
    }
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Entry::Broken(format!("{}: {e}", path.display())),
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        Entry::Absent
    } else if ft.is_socket() {
        Entry::Found(Kind::Unix(path.to_path_buf()))
    } else if ft.is_file() && meta.permissions().mode() & 0o111 != 0 {
        Entry::Found(Kind::Exec {
            path: path.to_path_buf(),
            generic,
        })
    } else {
        Entry::Broken(format!("{}: not executable", path.display()))
    }
}

/// `HOST` or `HOST/PORT` (after `/dev/tcp/`); HOST may be `[v6]`.
fn parse_dev_tcp(rest: &str) -> Option<Kind> {
    let (host, port) = match rest.split_once('/') {
        Some((h, p)) => (h, Some(p.to_string())),
        None => (rest, None),
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || port.as_deref() == Some("") {
        return None;
    }
    Some(Kind::Tcp {
        host: host.to_string(),
        port,
    })
}

/// `key=value` lines (spaces around `=` allowed, `#` comments, values
/// `true`/`false`/`1`/`0`, optionally quoted). Unknown keys are ignored.
pub fn parse_config(text: &str) -> RpcConfig {
    let mut c = RpcConfig::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').trim_matches('\'');
        let on = matches!(v, "true" | "1" | "yes");
        match k.trim() {
            "skip-service-descriptor" => c.skip_service_descriptor = on,
            "exit-on-service-eof" => c.exit_on_service_eof = on,
            "exit-on-client-eof" => c.exit_on_client_eof = on,
            _ => {}
        }
    }
    c
}

/// An open service.
pub enum Open {
    /// TCP or Unix socket: one fd, both directions.
    Socket(OwnedFd),
    /// An executable: its stdin and stdout, and the process.
    Exec {
        stdin: OwnedFd,
        stdout: OwnedFd,
        child: Child,
    },
}

/// Opens the service, or returns the exit status and a note for the log.
pub fn open(call: &Call, kind: &Kind, config: &RpcConfig) -> Result<Open, (i32, String)> {
    match kind {
        Kind::Tcp { host, port } => {
            let port = port.as_deref().unwrap_or(call.argument);
            let port: u16 = match port.parse() {
                Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
                _ => return Err((EXIT_FAILED, format!("invalid port {port:?}"))),
            };
            let addrs = (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| (EXIT_FAILED, format!("resolve {host}: {e}")))?;
            let mut last = format!("{host}: no address");
            for a in addrs {
                match TcpStream::connect(a) {
                    Ok(s) => return Ok(Open::Socket(s.into())),
                    Err(e) => last = format!("connect {a}: {e}"),
                }
            }
            Err((EXIT_FAILED, last))
        }
        Kind::Unix(path) => {
            let mut s = UnixStream::connect(path)
                .map_err(|e| (EXIT_FAILED, format!("connect {}: {e}", path.display())))?;
            if !config.skip_service_descriptor {
                let d = format!("{} {}\0", call.full_name(), call.source);
                s.write_all(d.as_bytes())
                    .map_err(|e| (EXIT_FAILED, format!("service descriptor: {e}")))?;
            }
            Ok(Open::Socket(s.into()))
        }
        Kind::Exec { path, generic } => {
            let mut cmd = Command::new(path);
            if *generic && !call.argument.is_empty() {
                cmd.arg(call.argument);
            }
            cmd.env("QREXEC_SERVICE_ARGUMENT", call.argument)
                .env("QREXEC_REMOTE_DOMAIN", call.source)
                .env("QREXEC_SERVICE_FULL_NAME", call.full_name())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                // The service's stderr belongs to the target qube's journal,
                // never to the caller.
                .stderr(Stdio::null());
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    mark_cloexec_from(3);
                    Ok(())
                });
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| (EXIT_FAILED, format!("spawn {}: {e}", path.display())))?;
            let stdin = child.stdin.take().expect("piped stdin").into();
            let stdout = child.stdout.take().expect("piped stdout").into();
            Ok(Open::Exec {
                stdin,
                stdout,
                child,
            })
        }
    }
}

/// A service runs in another qube: it must not inherit whatever the caller
/// of the double leaked to it. Marks every fd >= `from` close-on-exec.
fn mark_cloexec_from(from: libc::c_int) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 4;
    // SAFETY: plain syscalls on integers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            from as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return;
    }
    // Older kernels: walk the table.
    // SAFETY: as above.
    let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
    let max = if max <= 0 {
        1024
    } else {
        max.min(65536) as libc::c_int
    };
    for fd in from..max {
        // SAFETY: fcntl on a possibly closed fd only fails with EBADF.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// The remote status an executable's end maps to.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_tcp_paths() {
        assert_eq!(
            parse_dev_tcp("127.0.0.1"),
            Some(Kind::Tcp {
                host: "127.0.0.1".into(),
                port: None
            })
        );
        assert_eq!(
            parse_dev_tcp("[::1]/22"),
            Some(Kind::Tcp {
                host: "::1".into(),
                port: Some("22".into())
            })
        );
        assert_eq!(parse_dev_tcp("/22"), None);
        assert_eq!(parse_dev_tcp("h/"), None);
    }

    #[test]
    fn config_lines() {
        let c = parse_config("# x\nskip-service-descriptor = true\nexit-on-client-eof=1\n");
        assert!(c.skip_service_descriptor && c.exit_on_client_eof && !c.exit_on_service_eof);
        assert_eq!(
            parse_config("exit-on-service-eof=false"),
            RpcConfig::default()
        );
    }
}
