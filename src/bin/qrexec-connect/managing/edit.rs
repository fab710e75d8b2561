//! `qrexec-connect add` and `remove`: one command that lasts, for people who
//! type `qvm-connect-tcp 2222:ssh-server:22` today.
//!
//! Two halves. The editing of a config file's bytes is pure ([`add_line`],
//! [`remove_lines`], unit-tested): a line is found by its LISTEN as the
//! generator identifies it (the socket unit its parsed address names, so
//! `/run//a` and `/run/a`, or any spelling of one IP address, are one
//! LISTEN), and every other byte is kept: comments, blank lines, other
//! lines, CRLF or LF line ends, a missing final newline. A replaced line
//! keeps its own comment and line end.
//!
//! The commands around it ([`add`], [`remove`]):
//! * the line is checked with the generator's own library, as part of the
//!   whole config as it would be after the edit (so the socket path checks
//!   and duplicates are the generator's too); a problem on the new line is
//!   printed exactly as `qrexec-connect-generator --check` prints it, and
//!   nothing is written. Every argument must be one field: the joined line
//!   must split back into the three arguments, so no argument can carry a
//!   second line, a comment or a fourth field into the file.
//! * only files in the user's directory are edited. The directory may be a
//!   symlink (dotfile managers make it one) but must be ours and writable by
//!   nobody else; a config *file* that is a symlink, not a regular file, or
//!   not ours is refused, never followed or replaced (docs/design.md says
//!   why). A line of `/etc/qrexec-connect` is reported, not edited, and a
//!   new user file that would hide an `/etc` file of the same name (the
//!   generator's override rule) is refused.
//! * edits are serialised by an `flock` on the config directory itself (no
//!   lock file is left behind), read under the lock, written to a temporary
//!   file in the same directory (created exclusively, so a symlink planted at
//!   its name is never followed), fsynced, given the old file's mode, and
//!   renamed over the file; the directory is fsynced.
//! * then `systemctl --user daemon-reload`, and a wait of at most [`WAIT`]
//!   for the manager to say the socket listens with the new destination (or,
//!   for `remove`, no longer listens). A socket is not connected to: a
//!   connection would make a real qrexec call, which dom0 may refuse with a
//!   notification before its rule is installed. If it does not happen in
//!   time, `status`'s own view of the binding says why.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qrexec_connect_binding::address::{ListenAddress, Specifiers};
use qrexec_connect_generator::config::{
    config_files, is_invisible, parse_line, printable, printable_message, Binding, Config,
    ConfigDirs, LineError, Location, Problem, SUFFIX,
};
use qrexec_connect_generator::owner::Ids;
use qrexec_connect_generator::unit_name::socket_unit_name;
use rustix::fs::{FlockOperation, Mode, OFlags};

use super::manager;
use super::policy::{self, PolicyBinding};
use crate::cli::{self, Given, Usage, UsageError};

/// The file `add` writes to without `--file`.
pub const DEFAULT_FILE: &str = "qrexec-connect.conf";

/// How long `add` and `remove` wait for the manager to apply the change:
/// a reload and the reconcile step take well under a second on an idle
/// qube; this leaves room for a busy one.
pub const WAIT: Duration = Duration::from_secs(10);

/// One line of a file: its text (without `\n`, with a `\r` if it had one)
/// and its line end (`\n`, `\r\n` or nothing for a last line without one).
#[derive(Debug, PartialEq, Eq)]
struct Line<'a> {
    body: &'a [u8],
    end: &'a [u8],
}

fn lines(text: &[u8]) -> Vec<Line<'_>> {
    text.split_inclusive(|&b| b == b'\n')
        .map(|piece| {
            let body_len = match piece {
                [.., b'\r', b'\n'] => piece.len() - 2,
                [.., b'\n'] => piece.len() - 1,
                _ => piece.len(),
            };
            Line {
                body: &piece[..body_len],
                end: &piece[body_len..],
            }
        })
        .collect()
}

/// The line end the file uses (its first), `\n` for a file without one.
fn line_end(text: &[u8]) -> &'static [u8] {
    match text.iter().position(|&b| b == b'\n') {
        Some(at) if at > 0 && text[at - 1] == b'\r' => b"\r\n",
        _ => b"\n",
    }
}

/// The comment at the end of a line, with the blanks before it (empty when
/// there is none): `#` at the start of a field, as the generator reads it.
fn comment_tail(body: &[u8]) -> &[u8] {
    let Some(at) = body
        .iter()
        .enumerate()
        .position(|(i, &b)| b == b'#' && (i == 0 || matches!(body[i - 1], b' ' | b'\t')))
    else {
        return &[];
    };
    let start = body[..at]
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(0, |i| i + 1);
    &body[start..]
}

/// The binding a line gives, if it gives one.
fn binding_of(body: &[u8]) -> Option<Binding> {
    let at = Location {
        file: Arc::from("/"),
        line: 0,
    };
    parse_line(body, at).ok().flatten()
}

/// What [`add_line`] did, with the 1-based line number.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Added {
        line: usize,
    },
    /// `old` is the line that was there (its text, as it was).
    Replaced {
        line: usize,
        old: Vec<u8>,
    },
    /// The same LISTEN with the same TARGET and SERVICE was there.
    Unchanged {
        line: usize,
    },
}

/// `text` with `new` (a checked line, without line end) for `binding`: the
/// first line with the same LISTEN is replaced (its comment and line end
/// kept), or left alone when it already says the same; otherwise `new` is
/// appended with the file's line end, and a file that ended without a
/// newline still does.
pub fn add_line(text: &[u8], new: &str, binding: &Binding) -> (Vec<u8>, Change) {
    let lines = lines(text);
    let found = lines.iter().enumerate().find_map(|(i, line)| {
        binding_of(line.body)
            .filter(|b| b.unit_name() == binding.unit_name())
            .map(|b| (i, b))
    });
    if let Some((index, old)) = found {
        if old.destination() == binding.destination() {
            return (text.to_vec(), Change::Unchanged { line: index + 1 });
        }
        let mut out = Vec::with_capacity(text.len() + new.len());
        for (i, line) in lines.iter().enumerate() {
            if i == index {
                out.extend_from_slice(new.as_bytes());
                out.extend_from_slice(comment_tail(line.body));
            } else {
                out.extend_from_slice(line.body);
            }
            out.extend_from_slice(line.end);
        }
        let old = lines[index].body.to_vec();
        return (
            out,
            Change::Replaced {
                line: index + 1,
                old,
            },
        );
    }
    let end = line_end(text);
    let mut out = text.to_vec();
    if text.is_empty() || text.ends_with(b"\n") {
        out.extend_from_slice(new.as_bytes());
        out.extend_from_slice(end);
    } else {
        out.extend_from_slice(end);
        out.extend_from_slice(new.as_bytes());
    }
    (
        out,
        Change::Added {
            line: lines.len() + 1,
        },
    )
}

/// `text` without the lines whose LISTEN names socket unit `unit`, and the
/// removed lines (1-based number, text). A file that ended without a
/// newline still does.
pub fn remove_lines(text: &[u8], unit: &str) -> (Vec<u8>, Vec<(usize, Vec<u8>)>) {
    let lines = lines(text);
    let mut out = Vec::with_capacity(text.len());
    let mut removed = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if binding_of(line.body).is_some_and(|b| b.unit_name() == unit) {
            removed.push((i + 1, line.body.to_vec()));
        } else {
            out.extend_from_slice(line.body);
            out.extend_from_slice(line.end);
        }
    }
    let last_removed = removed.last().is_some_and(|(n, _)| *n == lines.len());
    if last_removed && !text.ends_with(b"\n") {
        for end in [&b"\r\n"[..], b"\n"] {
            if out.ends_with(end) {
                out.truncate(out.len() - end.len());
                break;
            }
        }
    }
    (out, removed)
}

/// The three fields of `--tcp LOCALPORT:TARGET:PORT`, with qvm-connect-tcp's
/// defaults: an empty LOCALPORT is PORT, an empty TARGET `@default`; a port
/// is a decimal number from 1 to 65535.
pub fn tcp_fields(spec: &str) -> Result<[String; 3], String> {
    let form = "--tcp takes LOCALPORT:TARGET:PORT (qvm-connect-tcp's form)";
    let parts: Vec<&str> = spec.split(':').collect();
    let [local, target, port] = parts[..] else {
        return Err(format!("{form}, not {}", cli::quoted(OsStr::new(spec))));
    };
    let number = |text: &str, what: &str| -> Result<u16, String> {
        text.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| text.parse::<u16>().ok())
            .flatten()
            .filter(|&p| p > 0)
            .ok_or_else(|| {
                format!(
                    "{form}: {what} is a port from 1 to 65535, not {}",
                    cli::quoted(OsStr::new(text))
                )
            })
    };
    let port = number(port, "PORT")?;
    let local = if local.is_empty() {
        port
    } else {
        number(local, "LOCALPORT")?
    };
    let target = if target.is_empty() {
        "@default"
    } else {
        target
    };
    Ok([
        format!("127.0.0.1:{local}"),
        target.to_owned(),
        format!("qubes.ConnectTCP+{port}"),
    ])
}

/// `--file NAME` as a file name of the user directory: one name (no `/`),
/// one the generator reads (not hidden, `.conf` added if missing, no
/// control or invisible character).
pub fn config_file_name(name: &OsStr) -> Result<String, String> {
    let shown = cli::quoted(name);
    let text = name
        .to_str()
        .ok_or_else(|| format!("--file {shown} is not UTF-8"))?;
    if text.is_empty() || text.contains('/') || text.starts_with('.') {
        return Err(format!(
            "--file takes a file name in ~/.config/qrexec-connect, without '/' and not \
             starting with '.', not {shown}"
        ));
    }
    if text
        .chars()
        .any(|c| c.is_control() || is_invisible(c) || c.is_whitespace())
    {
        return Err(format!(
            "--file {shown} holds a space, control or invisible character"
        ));
    }
    let name = if text.ends_with(SUFFIX) {
        text.to_owned()
    } else {
        format!("{text}{SUFFIX}")
    };
    // Room for the temporary file's name (`.NAME.PID.tmp`) in NAME_MAX.
    if name.len() > 200 {
        return Err(format!("--file {shown} is longer than a file name can be"));
    }
    Ok(name)
}

/// The line for `fields` as `add` writes it (an empty TARGET as `''`).
fn joined(fields: &[&[u8]; 3]) -> Vec<u8> {
    let target: &[u8] = if fields[1].is_empty() {
        b"''"
    } else {
        fields[1]
    };
    [fields[0], target, fields[2]].join(&b' ')
}

/// Why a line cannot be added: the message `--check` prints for it at
/// `at`, or, for an argument that is not one field, ours.
pub fn check_line(fields: &[&[u8]; 3], at: &Location) -> Result<(String, Binding), String> {
    let line = joined(fields);
    let generator = |error: LineError| {
        Problem::Line {
            at: at.clone(),
            error,
            text: printable(&line),
        }
        .to_string()
    };
    let binding = match parse_line(&line, at.clone()) {
        Ok(Some(binding)) => binding,
        Ok(None) => {
            return Err(format!(
                "{at}: {}: the line would be a comment",
                printable(&line)
            ))
        }
        Err(error) => return Err(generator(error)),
    };
    // The line must read back as exactly these three fields: no blank, no
    // comment, no trailing '\r' inside an argument.
    let written: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let one_field = |field: &[u8]| {
        !field.is_empty()
            && !field.starts_with(b"#")
            && !field.iter().any(|b| matches!(b, b' ' | b'\t' | b'\r'))
    };
    if written.len() != 3 || !written.iter().all(|f| one_field(f)) {
        let bad = fields
            .iter()
            .find(|f| !f.is_empty() && !one_field(f))
            .map_or_else(String::new, |f| printable(f));
        return Err(format!(
            "{at}: LISTEN, TARGET and SERVICE are one field each: \"{bad}\" holds a blank, a \
             '\\r' or starts a comment"
        ));
    }
    match String::from_utf8(line.clone()) {
        Ok(text) => Ok((text, binding)),
        Err(_) => Err(generator(LineError::NotUtf8)),
    }
}

// ---------------------------------------------------------------------------
// The files.

/// The user config directory, open and locked.
struct UserDir {
    path: PathBuf,
    fd: OwnedFd,
}

/// A message for the user, and the exit status.
struct Failure {
    message: String,
    code: u8,
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        code: 1,
    }
}

fn shown_path(path: &Path) -> String {
    printable(path.as_os_str().as_bytes())
}

fn our_uid() -> Result<u32, Failure> {
    Ids::current()
        .map(|ids| ids.uid)
        .ok_or_else(|| fail("cannot tell who you are (/proc/self/status is not readable)"))
}

/// Refuses `path` unless `owner` is us; `outcome` says what was not done.
fn must_be_ours(path: &Path, owner: u32, outcome: &str) -> Result<(), Failure> {
    let uid = our_uid()?;
    if owner == uid {
        return Ok(());
    }
    Err(fail(format!(
        "{} belongs to uid {owner}, not to you (uid {uid}): {outcome}",
        shown_path(path)
    )))
}

/// Opens (creating it when asked) and locks the user config directory. It
/// may be a symlink to a directory, which must be ours and writable by no
/// one else: a file written there is a binding of ours.
fn open_user_dir(dirs: &ConfigDirs, create: bool) -> Result<Option<UserDir>, Failure> {
    let Some(path) = dirs.user.clone() else {
        return Err(fail(
            "neither XDG_CONFIG_HOME nor HOME is an absolute path: no user config directory",
        ));
    };
    if create {
        use std::os::unix::fs::DirBuilderExt;
        // Run with another user's HOME (sudo keeps it), we would make a
        // directory of ours in their home: refused.
        let existing = path.ancestors().find(|dir| dir.exists());
        if let Some(owner) = existing.and_then(|dir| std::fs::metadata(dir).ok()) {
            use std::os::unix::fs::MetadataExt;
            must_be_ours(
                existing.unwrap_or(&path),
                owner.uid(),
                "nothing created there",
            )?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&path)
            .map_err(|e| fail(format!("cannot create {}: {e}", shown_path(&path))))?;
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(&path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) if !create => return Ok(None),
        Err(e) => {
            return Err(fail(format!(
                "cannot open {}: {}",
                shown_path(&path),
                io::Error::from(e)
            )))
        }
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| fail(io::Error::from(e).to_string()))?;
    must_be_ours(&path, stat.st_uid, "not edited")?;
    if stat.st_mode & 0o022 != 0 {
        return Err(fail(format!(
            "{} is writable by other users (mode {:o}): not edited; 'chmod go-w' it",
            shown_path(&path),
            stat.st_mode & 0o7777
        )));
    }
    rustix::fs::flock(&fd, FlockOperation::LockExclusive)
        .map_err(|e| fail(format!("cannot lock {}: {}", shown_path(&path), e)))?;
    Ok(Some(UserDir { path, fd }))
}

/// A config file's bytes and mode; `None` when it does not exist. A
/// symlink, anything but a regular file, or another user's file is refused.
fn read_file(dir: &UserDir, name: &str) -> Result<Option<(Vec<u8>, u32)>, Failure> {
    let path = dir.path.join(name);
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let fd = match rustix::fs::openat(&dir.fd, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(rustix::io::Errno::LOOP) => {
            let target = std::fs::read_link(&path)
                .map(|t| shown_path(&t))
                .unwrap_or_else(|_| "?".into());
            return Err(fail(format!(
                "{} is a symbolic link (to {target}): not edited, since replacing it would \
                 break the link and writing through it would change a file elsewhere; edit \
                 the file it points to yourself, or use --file with another name",
                shown_path(&path)
            )));
        }
        Err(e) => {
            return Err(fail(format!(
                "cannot read {}: {}",
                shown_path(&path),
                io::Error::from(e)
            )))
        }
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| fail(io::Error::from(e).to_string()))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(fail(format!(
            "{} is not a regular file: not edited",
            shown_path(&path)
        )));
    }
    must_be_ours(&path, stat.st_uid, "not edited")?;
    let mut text = Vec::new();
    File::from(fd)
        .read_to_end(&mut text)
        .map_err(|e| fail(format!("cannot read {}: {e}", shown_path(&path))))?;
    Ok(Some((text, stat.st_mode & 0o7777)))
}

/// Replaces `name` with `text` atomically: a temporary file created
/// exclusively (never through a symlink), `mode` (`None`: a new file,
/// 0644 less the umask), fsync, rename, fsync of the directory.
fn write_file(dir: &UserDir, name: &str, text: &[u8], mode: Option<u32>) -> io::Result<()> {
    // Hidden: the generator never reads a leftover.
    let temp = format!(".{name}.{}.tmp", std::process::id());
    // Only we can write the directory and we hold its lock: whatever is at
    // the name is a leftover of ours.
    let _ = rustix::fs::unlinkat(&dir.fd, temp.as_str(), rustix::fs::AtFlags::empty());
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(
        &dir.fd,
        temp.as_str(),
        flags,
        Mode::from_bits_truncate(0o644),
    )?;
    let result = (|| -> io::Result<()> {
        if let Some(mode) = mode {
            rustix::fs::fchmod(&fd, Mode::from_bits_truncate(mode))?;
        }
        let mut file = File::from(fd);
        file.write_all(text)?;
        file.sync_all()?;
        rustix::fs::renameat(&dir.fd, temp.as_str(), &dir.fd, name)?;
        rustix::fs::fsync(&dir.fd)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(&dir.fd, temp.as_str(), rustix::fs::AtFlags::empty());
    }
    result
}

/// The config as the generator would read it with `file` holding `text`.
fn config_with(dirs: &ConfigDirs, file: &Path, text: &[u8]) -> Config {
    let mut files = config_files(dirs, &mut Vec::new(), &mut Vec::new());
    files.retain(|f| f.file_name() != file.file_name());
    files.push(file.to_owned());
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    let mut config = Config::new(Specifiers::from_env());
    for path in files {
        if path == file {
            config.add_text(&path.to_string_lossy(), text);
        } else {
            config.add_file(&path);
        }
    }
    config
}

fn is_system_file(dirs: &ConfigDirs, file: &str) -> bool {
    Path::new(file).parent() == Some(dirs.system.as_path())
}

// ---------------------------------------------------------------------------
// The commands.

fn usage(command: &'static str, message: String) -> Failure {
    let _ = cli::usage_error(&UsageError {
        usage: Usage::Command(command),
        message,
    });
    Failure {
        message: String::new(),
        code: cli::EXIT_USAGE,
    }
}

fn finish(command: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // One message per line, each made printable (status's lines
            // follow the first).
            let mut lines = failure.message.lines();
            if let Some(first) = lines.next() {
                eprintln!("qrexec-connect {command}: {}", printable_message(first));
            }
            for line in lines {
                eprintln!("{}", printable_message(line));
            }
            ExitCode::from(failure.code)
        }
    }
}

/// `qrexec-connect add`.
pub fn add(given: &Given) -> ExitCode {
    finish("add", run_add(given))
}

/// `qrexec-connect remove`.
pub fn remove(given: &Given) -> ExitCode {
    finish("remove", run_remove(given))
}

fn run_add(given: &Given) -> Result<(), Failure> {
    let fields = add_fields(given)?;
    let fields: [&[u8]; 3] = [&fields[0], &fields[1], &fields[2]];
    let name = match given.value("--file") {
        Some(name) => config_file_name(name).map_err(|m| usage("add", m))?,
        None => DEFAULT_FILE.to_owned(),
    };
    let dirs = ConfigDirs::from_env();
    // The grammar first, before anything is created or locked, at the line
    // the new line would have at the end of the file.
    let dir = open_user_dir(&dirs, false)?;
    let mut name = name;
    let (line, wanted) = check_line(&fields, &end_of(&dirs, &dir, &name)).map_err(fail)?;
    let dir = match dir {
        Some(dir) => dir,
        None => open_user_dir(&dirs, true)?.ok_or_else(|| fail("no user config directory"))?,
    };
    // Where the LISTEN is bound now, if anywhere: that line is the one to
    // replace.
    let mut moved = None;
    match bound_now(&dirs, &dir, &wanted)? {
        BoundNow::Nowhere => {}
        BoundNow::AsWantedInSystemFile(message) => {
            drop(dir);
            println!("{message}");
            return wait_and_print_rule(&wanted, None);
        }
        BoundNow::InUserFile(holder) => {
            if holder != name {
                moved = Some(holder.clone());
                name = holder;
            }
        }
    }
    let path = dir.path.join(&name);
    let existing = read_file(&dir, &name)?;
    if existing.is_none() && dirs.system.join(&name).exists() {
        return Err(fail(format!(
            "a new {} would replace {} and all its bindings (a user file hides the {} file of \
             the same name): choose another --file, or copy that file there first",
            shown_path(&path),
            shown_path(&dirs.system.join(&name)),
            dirs.system.display()
        )));
    }
    let (text, mode) = existing.map_or((Vec::new(), None), |(t, m)| (t, Some(m)));
    let (new_text, change) = add_line(&text, &line, &wanted);
    let number = match &change {
        Change::Added { line } | Change::Replaced { line, .. } | Change::Unchanged { line } => {
            *line
        }
    };
    let at = Location {
        file: Arc::from(path.to_string_lossy().as_ref()),
        line: number,
    };
    if let Change::Unchanged { .. } = change {
        drop(dir);
        println!(
            "{at} already says {}: nothing changed",
            printable(line.as_bytes())
        );
        return wait_and_print_rule(&wanted, None);
    }
    // The whole config as the generator will read it.
    let after = config_with(&dirs, &path, &new_text);
    if report_problems(&after, &path, &at) {
        return Err(fail(format!("nothing written to {}", shown_path(&path))));
    }
    write_file(&dir, &name, &new_text, mode)
        .map_err(|e| fail(format!("cannot write {}: {e}", shown_path(&path))))?;
    drop(dir);
    print_added(moved.as_deref(), &wanted, &change, &at, &line);
    wait_and_print_rule(&wanted, Some(&at))
}

/// What `add` wrote, and where when the LISTEN was bound in another file
/// (`moved`) than the one asked for.
fn print_added(moved: Option<&str>, wanted: &Binding, change: &Change, at: &Location, line: &str) {
    if let Some(holder) = moved {
        println!(
            "{} is bound in {holder}, not in the file asked for: changed there",
            printable(wanted.listen().to_string().as_bytes())
        );
    }
    match change {
        Change::Replaced { old, .. } => println!(
            "{at}: replaced \"{}\" with \"{}\"",
            printable(old),
            printable(line.as_bytes())
        ),
        _ => println!("{at}: added \"{}\"", printable(line.as_bytes())),
    }
}

/// LISTEN, TARGET and SERVICE as `add` was given them: three operands, or
/// `--tcp LOCALPORT:TARGET:PORT`.
fn add_fields(given: &Given) -> Result<[Vec<u8>; 3], Failure> {
    match (given.value("--tcp"), &given.operands[..]) {
        (Some(spec), []) => {
            let spec = spec
                .to_str()
                .ok_or_else(|| usage("add", format!("--tcp {} is not UTF-8", cli::quoted(spec))))?;
            let tcp = tcp_fields(spec).map_err(|m| usage("add", m))?;
            Ok(tcp.map(String::into_bytes))
        }
        (None, [listen, target, service]) => Ok([
            listen.as_bytes().to_vec(),
            target.as_bytes().to_vec(),
            service.as_bytes().to_vec(),
        ]),
        (Some(_), _) => Err(usage(
            "add",
            "--tcp replaces LISTEN TARGET SERVICE: give one or the other".into(),
        )),
        (None, _) => Err(usage(
            "add",
            "add takes LISTEN TARGET SERVICE (or --tcp LOCALPORT:TARGET:PORT)".into(),
        )),
    }
}

/// The place a new line would have at the end of file `name`, for the
/// grammar's messages.
fn end_of(dirs: &ConfigDirs, dir: &Option<UserDir>, name: &str) -> Location {
    let path = match (dir, &dirs.user) {
        (Some(dir), _) => dir.path.join(name),
        (None, Some(user)) => user.join(name),
        (None, None) => PathBuf::from(name),
    };
    let text = match dir {
        // A file that cannot be edited is refused below, once it is
        // known to be the one to edit.
        Some(dir) => read_file(dir, name)
            .ok()
            .flatten()
            .map(|(text, _)| text)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    Location {
        file: Arc::from(path.to_string_lossy().as_ref()),
        line: lines(&text).len() + 1,
    }
}

/// Where the config binds the wanted LISTEN now.
enum BoundNow {
    Nowhere,
    /// In a system file, to the same destination: what to print.
    AsWantedInSystemFile(String),
    /// In this user file (its name), the one to edit.
    InUserFile(String),
}

/// Where the LISTEN is bound now, if anywhere: that line is the one to
/// replace. A system file's line is never edited: an error unless it
/// already says what is wanted.
fn bound_now(dirs: &ConfigDirs, dir: &UserDir, wanted: &Binding) -> Result<BoundNow, Failure> {
    let current = Config::load(dirs, Specifiers::from_env());
    let Some(bound) = current.binding_of_unit(wanted.unit_name()) else {
        return Ok(BoundNow::Nowhere);
    };
    let file = bound.source().file.to_string();
    if is_system_file(dirs, &file) {
        if bound.destination() == wanted.destination() {
            return Ok(BoundNow::AsWantedInSystemFile(format!(
                "{} is already bound so at {} (not one of your files): nothing changed",
                printable(wanted.listen().to_string().as_bytes()),
                bound.source()
            )));
        }
        return Err(fail(format!(
            "{} is bound at {}, a file of {} that is not edited here; to change it for \
             you, copy that file to {} (a file of the same name there replaces it) and \
             edit the copy",
            printable(wanted.listen().to_string().as_bytes()),
            bound.source(),
            dirs.system.display(),
            shown_path(&dir.path)
        )));
    }
    Ok(BoundNow::InUserFile(
        Path::new(&file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    ))
}

/// Prints the problems the config `after` the edit has in the edited file
/// (`path`) or at the new line (`at`); true when one refuses the edit.
fn report_problems(after: &Config, path: &Path, at: &Location) -> bool {
    let mut refused = false;
    let file_shown = shown_path(path);
    for problem in &after.problems {
        // A file the generator would skip (its path is not one a unit can
        // name) is refused like a bad line.
        let whole_file = matches!(problem, Problem::File { path, .. } if *path == file_shown);
        if whole_file || problem.location() == Some(at) {
            eprintln!("{}", problem.report());
            refused |= whole_file || !problem.is_warning();
        }
    }
    refused
}

/// Reloads (when the line was `written` there), waits for the socket, and prints the dom0
/// rule; an error when it does not listen in time.
fn wait_and_print_rule(binding: &Binding, written: Option<&Location>) -> Result<(), Failure> {
    if written.is_some() {
        daemon_reload()?;
    }
    let listen = printable(binding.listen().to_string().as_bytes());
    // Applied once the manager has the new destination; a socket systemd
    // could not bind is failed at once, no need to wait longer.
    let listening = wait_for_socket(binding.unit_name(), |state| {
        let applied = state.fd_name == binding.fd_name();
        match state.active.as_str() {
            "active" if applied => Some(true),
            "failed" if applied => Some(false),
            _ => None,
        }
    });
    if listening {
        println!("{listen} listens");
        print_rule(binding);
        Ok(())
    } else {
        print_rule(binding);
        Err(fail(format!(
            "{listen} does not listen (waited at most {}s){}; what status knows:\n{}",
            WAIT.as_secs(),
            written.map_or_else(String::new, |at| format!(
                "; the line stays at {at} ('qrexec-connect remove' takes it out)"
            )),
            status_of(&binding.listen().to_string())
        )))
    }
}

fn daemon_reload() -> Result<(), Failure> {
    manager::systemctl(&["daemon-reload"])
        .map(drop)
        .map_err(|e| fail(format!("the file is written, but {e}")))
}

/// What the manager says of a socket unit.
#[derive(Debug, Default)]
struct SocketState {
    active: String,
    fd_name: String,
}

/// Polls the manager until `done` says how it ended for `unit`, for at
/// most [`WAIT`]; `false` when it did not say.
fn wait_for_socket(unit: &str, done: impl Fn(&SocketState) -> Option<bool>) -> bool {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(text) = manager::show(&["ActiveState", "FileDescriptorName"], &[unit]) {
            let mut state = SocketState::default();
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("ActiveState=") {
                    state.active = v.to_owned();
                } else if let Some(v) = line.strip_prefix("FileDescriptorName=") {
                    state.fd_name = manager::unescape_value(v);
                }
            }
            if let Some(ended) = done(&state) {
                return ended;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `qrexec-connect status`'s rows for `listen` (its lines, as it prints
/// them), or all of its output when no row names it.
fn status_of(listen: &str) -> String {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("qrexec-connect"));
    let output = match Command::new(exe).arg("status").output() {
        Ok(output) => output,
        Err(e) => return format!("  (status could not run: {e})"),
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let shown = printable(listen.as_bytes());
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("problem: ") {
            let _ = writeln!(out, "  {line}");
            continue;
        }
        if !line.starts_with(' ') {
            inside = line.starts_with(&format!("{shown} "));
        }
        if inside {
            let _ = writeln!(out, "  {line}");
        }
    }
    if out.is_empty() {
        for line in text.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out.trim_end().to_owned()
}

/// The dom0 rule `binding` needs, for this qube (`THIS-QUBE` when
/// qubesdb does not say).
fn print_rule(binding: &Binding) {
    let qube = policy::own_name().ok();
    let name = qube.as_ref().map_or("THIS-QUBE", |q| q.as_str());
    let rules = policy::render(
        name,
        &[PolicyBinding {
            listen: binding.listen().to_string(),
            source: binding.source().to_string(),
            destination: binding.destination().clone(),
        }],
    );
    let file = qube.as_ref().map_or_else(
        || "30-qrexec-connect-THIS-QUBE.policy".to_owned(),
        policy::file_name,
    );
    println!(
        "dom0 must allow the call: in dom0's {}/{file} ('qrexec-connect policy' prints \
         every rule of this qube, and how to install them):",
        policy::POLICY_DIR
    );
    for line in rules.lines() {
        if !line.starts_with("# qrexec-connect:")
            && !line.starts_with("# Read it")
            && !line.starts_with("# Install it")
            && !line.starts_with("#   ")
        {
            println!("  {line}");
        }
    }
}

fn run_remove(given: &Given) -> Result<(), Failure> {
    let listen = remove_operand(given)?;
    let unit = socket_unit_name(&listen);
    let shown = printable(listen.to_string().as_bytes());
    let dirs = ConfigDirs::from_env();
    let dir = open_user_dir(&dirs, false)?;
    let current = Config::load(&dirs, Specifiers::from_env());
    let Some(bound) = current.binding_of_unit(&unit) else {
        return Err(fail(format!(
            "no line of your config binds {shown} ('qrexec-connect status' lists the bindings)"
        )));
    };
    let file = bound.source().file.to_string();
    if is_system_file(&dirs, &file) {
        return Err(fail(format!(
            "{shown} is bound at {}, a file of {} that is not edited here; to remove it for \
             you, copy that file to ~/.config/qrexec-connect/ (a file of the same name there \
             replaces it) and delete the line from the copy",
            bound.source(),
            dirs.system.display()
        )));
    }
    let Some(dir) = dir else {
        return Err(fail(format!("{shown} is bound at {}", bound.source())));
    };
    let name = Path::new(&file)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = dir.path.join(&name);
    let (text, mode) =
        read_file(&dir, &name)?.ok_or_else(|| fail(format!("{} is gone", shown_path(&path))))?;
    let (new_text, removed) = remove_lines(&text, &unit);
    if removed.is_empty() {
        return Err(fail(format!(
            "{shown} is bound at {}, but the file changed since: try again",
            bound.source()
        )));
    }
    // Another file may hold the same LISTEN (a duplicate until now): it
    // would take over.
    let after = config_with(&dirs, &path, &new_text);
    if let Some(next) = after.binding_of_unit(&unit) {
        return Err(fail(format!(
            "{} binds {shown} too and would take over: remove that line first; nothing \
             changed",
            next.source()
        )));
    }
    write_file(&dir, &name, &new_text, Some(mode))
        .map_err(|e| fail(format!("cannot write {}: {e}", shown_path(&path))))?;
    drop(dir);
    for (number, line) in &removed {
        println!(
            "{}:{number}: removed \"{}\"",
            shown_path(&path),
            printable(line)
        );
    }
    daemon_reload()?;
    wait_until_closed(&unit, &listen)
}

/// The LISTEN `remove` was given; a bare port is the address `add --tcp`
/// writes.
fn remove_operand(given: &Given) -> Result<ListenAddress, Failure> {
    let [operand] = &given.operands[..] else {
        return Err(usage("remove", "remove takes one LISTEN".into()));
    };
    let text = operand.as_bytes();
    let asked = if !text.is_empty() && text.iter().all(u8::is_ascii_digit) {
        let mut with_ip = b"127.0.0.1:".to_vec();
        with_ip.extend_from_slice(text);
        with_ip
    } else {
        text.to_vec()
    };
    std::str::from_utf8(&asked)
        .map_err(|_| LineError::NotUtf8.to_string())
        .and_then(|t| ListenAddress::parse(t).map_err(|e| LineError::Address(e).to_string()))
        .map_err(|m| usage("remove", m))
}

/// After the reload: waits until the removed binding's socket no longer
/// listens.
fn wait_until_closed(unit: &str, listen: &ListenAddress) -> Result<(), Failure> {
    let shown = printable(listen.to_string().as_bytes());
    let closed = wait_for_socket(unit, |state| (state.active != "active").then_some(true));
    if closed {
        println!(
            "{shown} no longer listens; its dom0 rule is no longer needed ('qrexec-connect \
             policy' prints the rules still needed)"
        );
        Ok(())
    } else {
        Err(fail(format!(
            "{shown} still listens {}s after the reload; what status knows:\n{}",
            WAIT.as_secs(),
            status_of(&listen.to_string())
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(line: &str) -> Binding {
        binding_of(line.as_bytes()).expect("a binding")
    }

    const NEW: &str = "127.0.0.1:2222 ssh qubes.ConnectTCP+22";

    #[test]
    fn appending_keeps_every_byte_and_the_line_end_style() {
        let new = binding(NEW);
        let cases: [(&str, &str, usize); 5] = [
            ("", "127.0.0.1:2222 ssh qubes.ConnectTCP+22\n", 1),
            (
                "# c\n\n",
                "# c\n\n127.0.0.1:2222 ssh qubes.ConnectTCP+22\n",
                3,
            ),
            (
                "# c\r\n",
                "# c\r\n127.0.0.1:2222 ssh qubes.ConnectTCP+22\r\n",
                2,
            ),
            // No final newline: there still is none.
            ("# c", "# c\n127.0.0.1:2222 ssh qubes.ConnectTCP+22", 2),
            (
                "# a\r\n# b",
                "# a\r\n# b\r\n127.0.0.1:2222 ssh qubes.ConnectTCP+22",
                3,
            ),
        ];
        for (before, after, line) in cases {
            let (out, change) = add_line(before.as_bytes(), NEW, &new);
            assert_eq!(String::from_utf8(out).unwrap(), after, "{before:?}");
            assert_eq!(change, Change::Added { line });
        }
    }

    #[test]
    fn the_same_listen_however_written_is_replaced_in_place() {
        let text = "# top\r\n127.0.0.1:22 a qubes.ConnectTCP+1\r\n\
                    127.0.0.1:2222  old   qubes.ConnectTCP+22\t# mine\r\n\
                    # end";
        let (out, change) = add_line(text.as_bytes(), NEW, &binding(NEW));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "# top\r\n127.0.0.1:22 a qubes.ConnectTCP+1\r\n\
             127.0.0.1:2222 ssh qubes.ConnectTCP+22\t# mine\r\n# end"
        );
        assert_eq!(
            change,
            Change::Replaced {
                line: 3,
                old: b"127.0.0.1:2222  old   qubes.ConnectTCP+22\t# mine".to_vec()
            }
        );
        // One path, two spellings: one LISTEN.
        let path = "/run//a b qubes.X";
        let (_, change) = add_line(b"/run/a b qubes.X\n", path, &binding(path));
        assert_eq!(change, Change::Unchanged { line: 1 });
    }

    #[test]
    fn the_same_line_again_changes_nothing() {
        let text = b"127.0.0.1:2222 ssh qubes.ConnectTCP+22 # x\n";
        let (out, change) = add_line(text, NEW, &binding(NEW));
        assert_eq!(out, text);
        assert_eq!(change, Change::Unchanged { line: 1 });
    }

    #[test]
    fn removing_keeps_every_other_byte() {
        let unit = binding(NEW).unit_name().to_owned();
        let cases = [
            (
                "# a\r\n127.0.0.1:2222 x qubes.Y\r\n\r\n# b",
                "# a\r\n\r\n# b",
            ),
            ("# a\n127.0.0.1:2222 x qubes.Y", "# a"),
            ("# a\r\n127.0.0.1:2222 x qubes.Y", "# a"),
            ("127.0.0.1:2222 x qubes.Y\n", ""),
            ("# a\n127.0.0.1:2222 x qubes.Y\n", "# a\n"),
            // Every line of that LISTEN (a later one was a duplicate).
            (
                "127.0.0.1:2222 x qubes.Y\n127.0.0.1:22 x qubes.Y\n127.0.0.1:2222 z qubes.Y\n",
                "127.0.0.1:22 x qubes.Y\n",
            ),
        ];
        for (before, after) in cases {
            let (out, removed) = remove_lines(before.as_bytes(), &unit);
            assert_eq!(String::from_utf8(out).unwrap(), after, "{before:?}");
            assert!(!removed.is_empty());
        }
        let (out, removed) = remove_lines(b"# 127.0.0.1:2222 x y\n", &unit);
        assert_eq!(out, b"# 127.0.0.1:2222 x y\n");
        assert!(removed.is_empty());
    }

    #[test]
    fn tcp_takes_qvm_connect_tcps_form_and_defaults() {
        let fields = |s: &str| tcp_fields(s).map(|f| f.join(" "));
        assert_eq!(
            fields("2222:ssh:22").unwrap(),
            "127.0.0.1:2222 ssh qubes.ConnectTCP+22"
        );
        assert_eq!(
            fields("::22").unwrap(),
            "127.0.0.1:22 @default qubes.ConnectTCP+22"
        );
        assert_eq!(
            fields("8080::80").unwrap(),
            "127.0.0.1:8080 @default qubes.ConnectTCP+80"
        );
        for bad in [
            "",
            "22",
            "1:a",
            "1:a:",
            "0:a:1",
            "1:a:65536",
            "1:a:+1",
            "1:a:2:3",
            "x:a:1",
        ] {
            assert!(tcp_fields(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_names_stay_in_the_directory_and_are_read() {
        let name = |s: &str| config_file_name(OsStr::new(s));
        assert_eq!(name("ssh").unwrap(), "ssh.conf");
        assert_eq!(name("ssh.conf").unwrap(), "ssh.conf");
        for bad in [
            "",
            "a/b",
            "../x",
            ".hidden",
            "a\nb",
            "a b",
            "a\u{202e}b",
            "/etc/x",
        ] {
            assert!(name(bad).is_err(), "{bad:?}");
        }
        assert!(name(&"a".repeat(300)).is_err());
    }

    #[test]
    fn no_argument_can_add_a_line_or_a_field() {
        let at = Location {
            file: Arc::from("/h/qrexec-connect.conf"),
            line: 4,
        };
        let check = |l: &str, t: &str, s: &str| {
            check_line(&[l.as_bytes(), t.as_bytes(), s.as_bytes()], &at)
        };
        assert_eq!(
            check("127.0.0.1:1", "a", "qubes.B").unwrap().0,
            "127.0.0.1:1 a qubes.B"
        );
        assert_eq!(
            check("127.0.0.1:1", "", "qubes.B").unwrap().0,
            "127.0.0.1:1 '' qubes.B"
        );
        for (l, t, s) in [
            ("127.0.0.1:1\n127.0.0.1:2", "a", "qubes.B"),
            ("127.0.0.1:1", "a\n127.0.0.1:2 b qubes.C", "qubes.B"),
            ("127.0.0.1:1", "a", "qubes.B\n127.0.0.1:2 b qubes.C"),
            ("127.0.0.1:1", "a", "qubes.B\r"),
            ("127.0.0.1:1", "a", "qubes.B #c"),
            ("127.0.0.1:1", "a b", "qubes.B"),
            ("127.0.0.1:1", "a\tb", "qubes.B"),
            ("127.0.0.1:1 a", "qubes.B", "#"),
            ("#127.0.0.1:1", "a", "qubes.B"),
            ("127.0.0.1:1", "\u{202e}a", "qubes.B"),
            ("2222", "a", "qubes.B"),
        ] {
            let error = check(l, t, s).unwrap_err();
            assert!(error.starts_with("/h/qrexec-connect.conf:4: "), "{error}");
            assert!(!error.contains('\n') && !error.contains('\r'), "{error:?}");
        }
        // A huge argument gives a short message.
        let huge = format!("/{}", "a".repeat(1 << 20));
        assert!(check(&huge, "a", "qubes.B").unwrap_err().len() < 1000);
    }
}
