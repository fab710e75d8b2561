//! `qrexec-client-vm-double`: a test double of Qubes' `qrexec-client-vm`.
//!
//! Real Qubes is not available to the tests, so this program plays both the
//! client and everything behind it (dom0 policy, the target qube's agent and
//! services), on one machine, following `docs/qrexec-facts.md`.
//!
//! # Command line
//!
//! `qrexec-client-vm-double [options] TARGET SERVICE[+ARG] [LOCAL_PROGRAM [ARGS...]]`
//! with `getopt_long` semantics: options stop at the first positional
//! argument or after `--`; long options may be abbreviated; `-tTpDATA`
//! clusters work. Options: `--buffer-size=N` (checked like the real client:
//! a number up to INT_MAX, else a message and exit 1; otherwise ignored),
//! `-t`/`--filter-escape-chars-stdout`, `-T`/`--filter-escape-chars-stderr`,
//! `--no-filter-escape-chars-stdout`, `--no-filter-escape-chars-stderr`,
//! `-a PATH`/`--agent-socket=PATH` (all accepted and ignored),
//! `-p DATA`/`--prefix-data=DATA` (sent to the service first; at most once),
//! `--use-stdin-socket`, `-s QUBE`/`--source-qube=QUBE`, `-h`/`--help`
//! (usage on stdout, exit 0). An unknown option, a missing argument or fewer
//! than two positionals: usage on stderr, exit 2. `--use-stdin-socket` with a
//! LOCAL_PROGRAM, or when fd 0 is not a SOCK_STREAM socket: exit 2.
//! LOCAL_PROGRAM itself is not supported: once the call is allowed the
//! double says so on stderr and exits 2.
//!
//! # Versions
//!
//! New (default): qrexec 4.3, `--use-stdin-socket` and `-s` exist and the
//! usage text lists `--use-stdin-socket`. Old (R4.2 before qrexec 4.2.19),
//! selected by `QREXEC_DOUBLE_VERSION=old` or by a program name (argv[0]
//! basename) ending in `-old` (either one is enough): `--use-stdin-socket`
//! and `-s`/`--source-qube` are unknown options, the usage does not mention
//! them, and the rpc-config `exit-on-service-eof`/`exit-on-client-eof` flags
//! are ignored. Any other value of `QREXEC_DOUBLE_VERSION` than `old`/`new`
//! is an error (exit 2).
//!
//! # Policy
//!
//! `QREXEC_DOUBLE_POLICY=FILE`: Qubes R4.1+ policy lines, read with the
//! tests' Qubes policy parser (`qubes_policy`), first match wins (see
//! `policy.rs`). The source qube is `-s`, else `QREXEC_DOUBLE_SOURCE`,
//! else `client`. TARGET `$x` means `@x`; an empty TARGET means `@default`.
//! `ask` is answered "allow" at once (with `default_target=` if there is no
//! `target=`). Without `QREXEC_DOUBLE_POLICY` every call is allowed. A
//! refused call (no match, `deny`, a policy syntax error, an unreadable
//! policy file, a malformed TARGET or SERVICE) writes exactly
//! `Request refused\n` to stderr, nothing to stdout, and exits 126 at once.
//! The effective target is the `target=` redirect, else TARGET; `@default`
//! without a redirect becomes the qube named `default` (real dom0 would
//! refuse it instead), `dom0` stays `dom0`, `@dispvm` stays as written, and
//! `@dispvm:T` (asked for, or as `target=`) is served by what the qube `T`
//! has: qrexec starts a new disposable from the template `T` for the call
//! and destroys it when the call ends. A rule's `@dispvm:T` matches a call
//! asking for `@dispvm:T` only (real dom0 also matches a call asking for
//! `@dispvm` when `T` is the source's `default_dispvm`, a property the
//! double does not know). `@dispvm/T`, the fd name's spelling in
//! qrexec-connect's units, is no target: refused like any malformed one.
//!
//! # Services
//!
//! `QREXEC_DOUBLE_SERVICES=DIR` is the service directory of every qube;
//! `DIR/<effective target>/` (if it is a directory) is searched first. In
//! each: `NAME+ARG`, then `NAME`. An entry is one of:
//! - a symlink to `/dev/tcp/HOST[/PORT]` (port from ARG when absent;
//!   `[v6]` allowed): connect TCP;
//! - a Unix socket or a symlink to one: connect, then send
//!   `"NAME+ARG SOURCE\0"` unless rpc-config `skip-service-descriptor=true`;
//! - an executable: run with stdin/stdout as the call, stderr to /dev/null,
//!   `QREXEC_SERVICE_ARGUMENT`, `QREXEC_REMOTE_DOMAIN` and
//!   `QREXEC_SERVICE_FULL_NAME` set, ARG as argv[1] when found as `NAME`
//!   and ARG is not empty, and no fd beyond 0-2 inherited.
//!
//! `qubes.ConnectTCP` without an entry is built in: `/dev/tcp/127.0.0.1`.
//! rpc-config: the first of `rpc-config/NAME+ARG`, `rpc-config/NAME` under
//! `DIR/<qube>/` then `DIR/`; lines `skip-service-descriptor=true`,
//! `exit-on-service-eof=true`, `exit-on-client-eof=true`. `qubes.ConnectTCP`
//! without a file has `exit-on-service-eof=true`, as Qubes ships it. The
//! exit-on flags apply to socket services (TCP, Unix) as in qrexec; an
//! executable's call ends when the process has exited and its stdout is
//! closed. No such service: exit 127; found but unusable (connection
//! refused, bad port, not executable, ...): exit 125; no stderr text.
//!
//! # Data
//!
//! With `--use-stdin-socket`, fd 0 carries both directions and fd 1 is not
//! touched. Client EOF (read 0 on fd 0) -> shutdown(SHUT_WR) towards the
//! service (executable: close its stdin). Service EOF -> shutdown(0,
//! SHUT_WR). Without it, data is read from fd 0 and written to fd 1, and
//! service EOF closes fd 1 only (fd 0 stays open until the call ends): when
//! fd 0 and fd 1 are the same socket the local peer does not see that EOF
//! (qubes-issues #9169). In new mode `exit-on-service-eof` /
//! `exit-on-client-eof` end the whole call at that EOF (exit 0); otherwise
//! the call ends when both directions are done. Exit status: 0 for socket
//! services, the executable's status (128+N for signal N). An I/O error on
//! the caller's side or a read error from the service ends the call with
//! status 1; a write error towards the service makes the double discard the
//! rest of the client's data. SIGPIPE is ignored; non-blocking fds are fine.
//!
//! # Log
//!
//! `QREXEC_DOUBLE_LOG=FILE`: one line appended per invocation, in one
//! O_APPEND write, when the double exits (refusals and usage errors too):
//! `pid=123 fds=0,1,2 argv=["--use-stdin-socket","--","vm","qubes.ConnectTCP+22"] exit=0`
//! (`fds`: the descriptors open when the double started, i.e. what it
//! inherited; argv without argv[0], as JSON strings). A failed call (exit status not
//! 0) may get ` note="..."` after `exit=N`, saying why (the policy line that
//! refused it, the connect error, ...): the double's only diagnostics, since
//! the real client prints nothing (or exactly `Request refused`).

mod cli;
mod policy;
mod relay;
mod service;

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::thread;

use policy::Verdict;
use qrexec_connect_binding::destination::{is_service_char, is_vm_name};
use relay::End;
use service::{Call, Lookup, Open};

/// Which qrexec the double imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// R4.2 before qrexec 4.2.19.
    Old,
    /// qrexec 4.3 (has `--use-stdin-socket`, `-s`).
    New,
}

/// Exit status of a refused call.
const EXIT_REFUSED: i32 = 126;

static ARGS: OnceLock<Vec<OsString>> = OnceLock::new();
/// The fds open when the double started (what its parent let it inherit).
static INHERITED_FDS: OnceLock<String> = OnceLock::new();

/// Lists the open fds from /proc/self/fd, leaving out the one used to read it.
fn open_fds() -> String {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return "unknown".to_owned();
    };
    // The directory handle itself is listed, as a link to /proc/PID/fd.
    let own_listing = PathBuf::from(format!("/proc/{}/fd", std::process::id()));
    let mut fds: Vec<i32> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            (std::fs::read_link(e.path()).ok()? != own_listing).then_some(fd)
        })
        .collect();
    fds.sort_unstable();
    let list: Vec<String> = fds.iter().map(i32::to_string).collect();
    list.join(",")
}
static FINISHING: AtomicBool = AtomicBool::new(false);

/// Ends the process: writes the log line, then exits with `code`. The first
/// caller wins; any later caller (another thread) just waits for the end.
fn finish(code: i32, note: Option<String>) -> ! {
    if FINISHING.swap(true, Ordering::SeqCst) {
        loop {
            thread::park();
        }
    }
    if let Some(path) = std::env::var_os("QREXEC_DOUBLE_LOG") {
        let args = ARGS.get().map(Vec::as_slice).unwrap_or_default();
        let argv: Vec<String> = args
            .iter()
            .map(|a| json_string(&a.to_string_lossy()))
            .collect();
        let fds = INHERITED_FDS.get().map_or("unknown", String::as_str);
        let mut line = format!(
            "pid={} fds={fds} argv=[{}] exit={code}",
            std::process::id(),
            argv.join(",")
        );
        if let Some(n) = note.filter(|_| code != 0) {
            line.push_str(&format!(" note={}", json_string(&n)));
        }
        line.push('\n');
        if let Ok(mut f) = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
        {
            let _ = f.write(line.as_bytes());
        }
    }
    std::process::exit(code)
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes the refusal exactly as the real client does, then exits 126.
fn refuse(note: String) -> ! {
    let _ = std::io::stderr().write_all(b"Request refused\n");
    finish(EXIT_REFUSED, Some(note))
}

fn mode(argv0: &str) -> Result<Mode, String> {
    let by_name = std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with("-old"));
    match std::env::var("QREXEC_DOUBLE_VERSION").as_deref() {
        Ok("old") => Ok(Mode::Old),
        Ok("new") | Ok("") | Err(std::env::VarError::NotPresent) => {
            Ok(if by_name { Mode::Old } else { Mode::New })
        }
        Ok(v) => Err(format!(
            "QREXEC_DOUBLE_VERSION must be old or new, not {v:?}"
        )),
        Err(e) => Err(format!("QREXEC_DOUBLE_VERSION: {e}")),
    }
}

/// `--use-stdin-socket` needs fd 0 to be a SOCK_STREAM socket.
fn check_stdin_socket() -> Result<(), String> {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: ty/len point to a c_int and its size.
    let r = unsafe {
        libc::getsockopt(
            0,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            return Err("--use-stdin-socket passed, but stdin not a socket".into());
        }
        return Err(format!("getsockopt(0, SOL_SOCKET, SO_TYPE): {e}"));
    }
    if ty != libc::SOCK_STREAM {
        return Err(format!(
            "stdin is a socket of type {ty}, not SOCK_STREAM ({})",
            libc::SOCK_STREAM
        ));
    }
    Ok(())
}

fn main() {
    INHERITED_FDS.get_or_init(open_fds);
    // SAFETY: setting a signal disposition before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut all: Vec<OsString> = std::env::args_os().collect();
    let argv0 = if all.is_empty() {
        "qrexec-client-vm".to_string()
    } else {
        all.remove(0).to_string_lossy().into_owned()
    };
    let args = ARGS.get_or_init(|| all);
    let prog = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| argv0.clone());

    let mode = match mode(&argv0) {
        Ok(m) => m,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{prog}: {e}");
            finish(2, Some(e));
        }
    };
    let opts = match cli::parse(args, mode, &prog, &check_stdin_socket) {
        Ok(o) => o,
        Err(stop) => {
            let code = cli::report(&stop, &argv0, mode);
            finish(code, None);
        }
    };
    run(opts, mode, &prog)
}

/// TARGET after `$` -> `@` and empty -> `@default`, or `None` if dom0 would
/// not know it.
fn normalize_target(raw: &str) -> Option<String> {
    let t = raw.replace('$', "@");
    let t = if t.is_empty() { "@default".into() } else { t };
    let ok = match t.as_str() {
        "@default" | "@adminvm" | "@dispvm" | "dom0" => true,
        s => match s.strip_prefix("@dispvm:") {
            Some(tpl) => is_vm_name(tpl),
            None => is_vm_name(s),
        },
    };
    ok.then_some(t)
}

fn run(opts: cli::Options, mode: Mode, prog: &str) -> ! {
    let Some(target) = normalize_target(&opts.target) else {
        refuse(format!("invalid target {:?}", opts.target));
    };
    // dom0 replaces what it does not allow in a service name.
    let service: String = opts
        .service
        .iter()
        .map(|&b| {
            let c = char::from(b);
            if is_service_char(c) || c == '+' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if service.is_empty() || service.starts_with('+') {
        refuse(format!("invalid service name {service:?}"));
    }
    let (name, argument) = service.split_once('+').unwrap_or((service.as_str(), ""));

    let source = opts
        .source
        .clone()
        .or_else(|| std::env::var("QREXEC_DOUBLE_SOURCE").ok())
        .unwrap_or_else(|| "client".into());
    let policy_source = if source == "dom0" {
        "@adminvm"
    } else {
        &source
    };
    let policy_target = if target == "dom0" {
        "@adminvm"
    } else {
        &target
    };

    let verdict = match std::env::var_os("QREXEC_DOUBLE_POLICY") {
        None => Verdict::Allow { target: None },
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(text) => policy::evaluate(
                &text,
                &policy::Request {
                    service: name,
                    argument,
                    source: policy_source,
                    target: policy_target,
                },
            ),
            Err(e) => Verdict::Deny(format!(
                "policy file {}: {e}",
                PathBuf::from(path).display()
            )),
        },
    };
    let redirect = match verdict {
        Verdict::Deny(why) => refuse(why),
        Verdict::Allow { target } => target,
    };
    let qube = match redirect.unwrap_or(target) {
        t if t == "@default" => "default".to_string(),
        t if t == "@adminvm" => "dom0".to_string(),
        // A new disposable made from TEMPLATE for this call alone (qrexec
        // destroys it when the call ends): it serves what TEMPLATE has.
        t => match t.strip_prefix("@dispvm:") {
            Some(template) => template.to_owned(),
            None => t,
        },
    };

    if !opts.local_program.is_empty() {
        let _ = writeln!(
            std::io::stderr(),
            "{prog}: LOCAL_PROGRAM is not supported by this qrexec-client-vm test double"
        );
        finish(2, Some("LOCAL_PROGRAM unsupported".into()));
    }

    let dir = std::env::var_os("QREXEC_DOUBLE_SERVICES").map(PathBuf::from);
    let call = Call {
        dir: dir.as_deref(),
        qube: &qube,
        name,
        argument,
        source: &source,
    };
    let (kind, config) = match call.lookup() {
        Lookup::Found(k, c) => (k, c),
        Lookup::NotFound => finish(
            service::EXIT_NOT_FOUND,
            Some(format!("no service {name}+{argument} in {qube}")),
        ),
        Lookup::Broken(why) => finish(service::EXIT_FAILED, Some(why)),
    };
    let open = match service::open(&call, &kind, &config) {
        Ok(o) => o,
        Err((code, why)) => finish(code, Some(why)),
    };
    let socket_service = matches!(open, Open::Socket(_));
    let flags = Flags {
        use_stdin_socket: opts.use_stdin_socket,
        exit_on_service_eof: mode == Mode::New && socket_service && config.exit_on_service_eof,
        exit_on_client_eof: mode == Mode::New && socket_service && config.exit_on_client_eof,
    };
    transfer(open, opts.prefix, flags)
}

#[derive(Clone, Copy)]
struct Flags {
    use_stdin_socket: bool,
    exit_on_service_eof: bool,
    exit_on_client_eof: bool,
}

/// What the client -> service thread closes at client EOF.
enum Upstream {
    /// shutdown(SHUT_WR) on the service socket (owned by the main thread).
    Socket(std::os::fd::RawFd),
    /// The executable's stdin: dropped.
    Pipe(OwnedFd),
}

impl Upstream {
    fn fd(&self) -> std::os::fd::RawFd {
        match self {
            Upstream::Socket(fd) => *fd,
            Upstream::Pipe(p) => p.as_raw_fd(),
        }
    }
}

/// Client -> service: prefix data, then fd 0 until EOF.
fn upstream(to: Upstream, prefix: Option<Vec<u8>>, flags: Flags) {
    let mut broken = false;
    if let Some(p) = prefix {
        broken = relay::write_all_fd(to.fd(), &p).is_err();
    }
    let end = if broken {
        relay::drain(0)
    } else {
        match relay::copy(0, to.fd()) {
            // The service stopped reading: keep consuming the client.
            End::WriteError(_) => relay::drain(0),
            end => end,
        }
    };
    if let End::ReadError(e) = end {
        finish(1, Some(format!("reading fd 0: {e}")));
    }
    match to {
        Upstream::Socket(fd) => relay::shutdown_write(fd),
        Upstream::Pipe(p) => drop(p),
    }
    if flags.exit_on_client_eof {
        finish(0, None);
    }
}

/// Service -> client, then EOF to the client.
fn downstream(from: std::os::fd::RawFd, flags: Flags) {
    let out = if flags.use_stdin_socket { 0 } else { 1 };
    match relay::copy(from, out) {
        End::Eof => {}
        End::ReadError(e) => finish(1, Some(format!("reading from the service: {e}"))),
        End::WriteError(e) => finish(1, Some(format!("writing fd {out}: {e}"))),
    }
    if flags.use_stdin_socket {
        relay::shutdown_write(0);
    } else {
        // Only fd 1 goes: if it shares its socket with fd 0, the peer sees
        // no EOF (qubes-issues #9169).
        // SAFETY: fd 1 is ours and nothing else uses it from now on.
        unsafe {
            libc::close(1);
        }
    }
}

fn transfer(open: Open, prefix: Option<Vec<u8>>, flags: Flags) -> ! {
    match open {
        Open::Socket(sock) => {
            let fd = sock.as_raw_fd();
            let up = thread::spawn(move || upstream(Upstream::Socket(fd), prefix, flags));
            downstream(fd, flags);
            if flags.exit_on_service_eof {
                finish(0, None);
            }
            let _ = up.join();
            drop(sock);
            finish(0, None)
        }
        Open::Exec {
            stdin,
            stdout,
            mut child,
        } => {
            let _up = thread::spawn(move || upstream(Upstream::Pipe(stdin), prefix, flags));
            downstream(stdout.as_raw_fd(), flags);
            drop(stdout);
            match child.wait() {
                Ok(status) => finish(service::exit_code(status), None),
                Err(e) => finish(1, Some(format!("waiting for the service: {e}"))),
            }
        }
    }
}
