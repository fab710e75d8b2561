//! The binding config (`qrexec-connect.conf(5)`): which files are read, and
//! the line grammar, turned once into typed [`Binding`]s and [`Problem`]s.
//!
//! Files: every `*.conf` in `/etc/qrexec-connect/` and in
//! `$XDG_CONFIG_HOME/qrexec-connect/` (default `$HOME/.config/...`), merged by
//! file name and read in byte order of the names. A user file replaces the
//! `/etc` file of the same name; an empty one, or a symlink to `/dev/null`,
//! just disables it (the systemd convention). Names starting with `.` are
//! ignored (editor lock and backup files). To change one binding of an
//! `/etc` file, copy the whole file to the user directory and edit it there:
//! a user line with a LISTEN already bound in `/etc` is a duplicate.
//!
//! A LISTEN may be bound once: a later line (in name, then line order) that
//! maps to the same socket unit is refused and names the earlier `FILE:LINE`.
//!
//! Lines: `LISTEN TARGET SERVICE[+ARG]`, fields separated by spaces or tabs;
//! a `#` at the start of a field starts a comment that runs to the end of the
//! line. None of the valid values contains whitespace or quotes, so there is
//! no quoting: the only special field is `''` (or `""`) as TARGET, meaning the
//! empty target (policy decides). A trailing `\r` is ignored.
//!
//! Every bad line becomes one [`Problem`] and is skipped; the good lines are
//! all kept. Nothing here panics, whatever the bytes.
//!
//! Besides the grammar, a socket path is checked against the file system as
//! systemd will use it (after `%t`/`%h` expansion): systemd refuses a path
//! longer than [`MAX_SOCKET_PATH`], and it replaces whatever file is at the
//! path with its socket (and removes it on stop), so a path that exists and
//! is not a socket is refused. A socket there is fine when it is ours: a
//! stale one from an earlier run, which systemd rebinds. Whether another
//! local user can take the path (their socket is there, or they control a
//! directory on the way) is [`crate::owner`]'s question: refused, or a
//! warning for a sticky directory such as `/tmp`.
//!
//! A line in [`SYSTEM_DIR`] is bound by every user's manager. A TCP port, an
//! abstract name or an absolute path is one address for all of them: the
//! first manager gets it and the others' sockets fail. Such lines get a
//! warning; `%t/` and `%h/` paths are per user.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use walkdir::WalkDir;

use crate::owner::{Ids, PathChecker, SharedDirectory, Takeover};
use crate::unit_name::socket_unit_name;
use qrexec_connect_binding::address::{
    AddressError, Exposure, ListenAddress, Specifiers, MAX_SOCKET_PATH,
};
use qrexec_connect_binding::destination::{BindingError, Destination, Service, Target};

/// Template-wide config directory.
pub const SYSTEM_DIR: &str = "/etc/qrexec-connect";
/// Directory name under `$XDG_CONFIG_HOME`.
pub const USER_SUBDIR: &str = "qrexec-connect";
/// Only files with this suffix are read.
pub const SUFFIX: &str = ".conf";

/// The directories config files are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigDirs {
    pub system: PathBuf,
    /// `None` when neither `XDG_CONFIG_HOME` nor `HOME` is usable.
    pub user: Option<PathBuf>,
}

impl ConfigDirs {
    /// The directories for this process's environment.
    pub fn from_env() -> ConfigDirs {
        ConfigDirs::from_vars(
            std::env::var_os("XDG_CONFIG_HOME"),
            std::env::var_os("HOME"),
        )
    }

    /// `$XDG_CONFIG_HOME/qrexec-connect`, else `$HOME/.config/qrexec-connect`.
    /// Relative or empty values are ignored, as the XDG base directory spec
    /// asks (a generator's working directory means nothing).
    pub fn from_vars(xdg_config_home: Option<OsString>, home: Option<OsString>) -> ConfigDirs {
        let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
        let base = absolute(xdg_config_home).or_else(|| absolute(home).map(|h| h.join(".config")));
        ConfigDirs {
            system: PathBuf::from(SYSTEM_DIR),
            user: base.map(|b| b.join(USER_SUBDIR)),
        }
    }
}

/// A line of a config file, printed `FILE:LINE`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// The file's path; valid UTF-8 without control characters, so it can
    /// go into a unit. Shared by all the lines of a file.
    pub file: Arc<str>,
    /// 1-based.
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A binding: a listen address tied to a destination (TARGET SERVICE), as
/// one config line asks for it, checked, with where it came from and the
/// unit it becomes. The one binding type of the generator, and what
/// `qrexec-connect status` and `policy` read the config as. Only this module
/// makes them (from a line, [`parse_line`]), so every one is safe to write
/// into a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub(crate) listen: ListenAddress,
    pub(crate) destination: Destination,
    /// `destination` as `FileDescriptorName=` carries it.
    pub(crate) fd_name: String,
    pub(crate) unit_name: String,
    pub(crate) source: Location,
}

impl Binding {
    pub fn listen(&self) -> &ListenAddress {
        &self.listen
    }
    pub fn destination(&self) -> &Destination {
        &self.destination
    }
    pub fn fd_name(&self) -> &str {
        &self.fd_name
    }
    /// `qrexec-connect-KEY.socket`, see [`crate::unit_name`].
    pub fn unit_name(&self) -> &str {
        &self.unit_name
    }
    pub fn source(&self) -> &Location {
        &self.source
    }
}

/// Why a line was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    NotUtf8,
    ControlCharacter(char),
    /// A space other than U+0020 or a tab (U+00A0 and the like): it looks
    /// like the blank between fields but is not one.
    OddSpace(char),
    /// Fewer than three fields: the ones missing (`TARGET`, `SERVICE`,
    /// `TARGET and SERVICE`).
    Missing(&'static str),
    /// More than three fields; the ones after SERVICE, made printable.
    TooMany(String),
    /// One field in qvm-connect-tcp's `LOCALPORT:TARGET:REMOTEPORT` form;
    /// the line that means the same.
    QvmConnectTcp(String),
    Address(AddressError),
    Binding(BindingError),
    /// Maps to the unit of an earlier line: the same LISTEN.
    Duplicate {
        earlier: Location,
        unit: String,
    },
    /// Longer than systemd accepts once `%t`/`%h` is expanded (the
    /// expanded path made printable, its length in bytes).
    ExpandedTooLong {
        expanded: String,
        len: usize,
    },
    /// Something that is not a socket is at the path; systemd would delete
    /// it. `what` says what it is.
    PathExists {
        expanded: String,
        what: &'static str,
    },
    /// Another local user can take the path (see [`crate::owner`]).
    NotYours {
        expanded: String,
        takeover: Takeover,
    },
    /// A path or abstract name with a character systemd escapes when it
    /// keeps the socket across a daemon-reload, and then loses (see
    /// [`lost_on_reload`]); both made printable.
    LostOnReload {
        name: String,
        character: String,
    },
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineError::NotUtf8 => f.write_str("not valid UTF-8"),
            LineError::ControlCharacter(c) => {
                write!(
                    f,
                    "control character U+{:04X} is not allowed",
                    u32::from(*c)
                )
            }
            LineError::OddSpace(c) => write!(
                f,
                "U+{:04X} looks like a space but does not separate fields (only a space or \
                 a tab does): write a plain space",
                u32::from(*c)
            ),
            LineError::Missing(what) => {
                let verb = if what.contains(" and ") { "are" } else { "is" };
                write!(f, "{what} {verb} missing (a line is LISTEN TARGET SERVICE")?;
                if *what == "TARGET" {
                    f.write_str("; write '' or @default for the target the policy chooses")?;
                }
                f.write_str(")")
            }
            LineError::TooMany(extra) => write!(
                f,
                "too many fields: \"{extra}\" follows SERVICE (a line is LISTEN TARGET \
                 SERVICE; a comment starts with ' #')"
            ),
            LineError::QvmConnectTcp(means) => write!(
                f,
                "qvm-connect-tcp's LOCALPORT:TARGET:REMOTEPORT is not a line; the line that \
                 means the same is: {means}"
            ),
            // They quote the field with Rust's escaping, which leaves some
            // invisible characters as they are.
            LineError::Address(e) => f.write_str(&printable_message(&e.to_string())),
            LineError::Binding(e) => f.write_str(&printable_message(&e.to_string())),
            LineError::Duplicate { earlier, unit } => write!(
                f,
                "the same LISTEN is already bound at {earlier} (unit {unit})"
            ),
            LineError::ExpandedTooLong { expanded, len } => write!(
                f,
                "socket path {expanded:?} is {len} bytes long once expanded; systemd \
                 accepts at most {MAX_SOCKET_PATH}"
            ),
            LineError::PathExists { expanded, what } => {
                write!(f, "{expanded:?} exists and is {what}, not a socket: ")?;
                if *what == "a directory" {
                    f.write_str("systemd cannot bind a socket there; choose another path")
                } else {
                    f.write_str(
                        "systemd would replace it with the socket and delete it when the \
                         socket stops; choose another path or move it away",
                    )
                }
            }
            LineError::NotYours { expanded, takeover } => write!(f, "{expanded:?} {takeover}"),
            LineError::LostOnReload { name, character } => write!(
                f,
                "{name:?} holds {character}: systemd (252) loses such a socket at every \
                 daemon-reload, while its unit still says it listens; use a name of plain \
                 ASCII without quotes or backslashes"
            ),
        }
    }
}

impl std::error::Error for LineError {}

/// Something that was skipped, with where and why, or (a warning) a
/// binding that is written but may not be what its author meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A line; `text` is the line without its comment, made printable.
    Line {
        at: Location,
        error: LineError,
        text: String,
    },
    /// A line that became a binding other VMs can reach.
    Exposed {
        at: Location,
        listen: String,
        exposure: Exposure,
        text: String,
    },
    /// A line whose socket is made in a directory where other users can
    /// create names too (sticky, like `/tmp`): they can take the name
    /// before systemd binds it. `path` and `dir` made printable.
    SharedDirectory {
        at: Location,
        path: String,
        dir: String,
        text: String,
    },
    /// A line of [`SYSTEM_DIR`] whose address is the same for every user
    /// (TCP, abstract, or a path without `%t/` or `%h/`): every user's
    /// manager binds it, only the first gets it. `listen` made printable.
    SameForEveryUser {
        at: Location,
        listen: String,
        text: String,
    },
    /// A binding that is written but is likely not what its author meant
    /// (a SERVICE that is a number or has no dot, a port the user's
    /// manager cannot bind); `what` says why, and what was likely meant.
    Likely {
        at: Location,
        what: String,
        text: String,
    },
    /// A file or directory (path made printable).
    File { path: String, what: String },
    /// No user config directory could be worked out.
    NoUserDir,
}

/// One line: [`Problem::headline`], then `: ` and the line's text if it
/// has one (what `status` shows in a row). `--check` and the journal show
/// the text on a line of its own instead, see [`Problem::report`].
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.headline())?;
        match self.text() {
            Some(text) => write!(f, ": {text}"),
            None => Ok(()),
        }
    }
}

/// How far the text of the line a problem is about is indented under it.
pub const TEXT_INDENT: &str = "    ";

impl Problem {
    /// The problem as `--check` and the journal show it (and `add`, which
    /// refuses a line with the generator's own words): the headline, then
    /// the line's text on a line of its own, indented; both escaped, so no
    /// report holds a control or bidirectional character.
    pub fn report(&self) -> String {
        let mut out = printable_message(&self.headline());
        if let Some(text) = self.text() {
            out += &format!("\n{TEXT_INDENT}{}", printable_message(text));
        }
        out
    }

    /// The config line the problem is about, without its comment, made
    /// printable; `None` for a file or directory.
    pub fn text(&self) -> Option<&str> {
        match self {
            Problem::Line { text, .. }
            | Problem::Exposed { text, .. }
            | Problem::SharedDirectory { text, .. }
            | Problem::SameForEveryUser { text, .. }
            | Problem::Likely { text, .. } => Some(text),
            Problem::File { .. } | Problem::NoUserDir => None,
        }
    }

    /// Where the problem is (`FILE:LINE`), if it is about a line.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Problem::Line { at, .. }
            | Problem::Exposed { at, .. }
            | Problem::SharedDirectory { at, .. }
            | Problem::SameForEveryUser { at, .. }
            | Problem::Likely { at, .. } => Some(at),
            Problem::File { .. } | Problem::NoUserDir => None,
        }
    }

    /// The message without the line's text.
    pub fn headline(&self) -> String {
        let mut f = String::new();
        let _ = self.write_headline(&mut f);
        f
    }

    fn write_headline(&self, f: &mut String) -> fmt::Result {
        match self {
            Problem::Line { at, error, .. } => write!(f, "{at}: {error}"),
            Problem::Likely { at, what, .. } => write!(f, "{at}: warning: {what}"),
            Problem::Exposed {
                at,
                listen,
                exposure,
                ..
            } => {
                let reach = match exposure {
                    Exposure::EveryInterface => "listens on every interface of the qube",
                    Exposure::ThisAddress => "is not a loopback address",
                };
                write!(
                    f,
                    "{at}: warning: {listen} {reach}: other VMs on the qube's network \
                     can connect"
                )
            }
            Problem::SharedDirectory { at, path, dir, .. } => write!(
                f,
                "{at}: warning: other users can create files in {dir:?}: one of them can take \
                 {path:?} before systemd binds it (at login, or after the socket stopped) and \
                 receive this binding's connections; a path under %t/ is yours alone"
            ),
            Problem::SameForEveryUser { at, listen, .. } => write!(
                f,
                "{at}: warning: {listen} is one address for all users: every user's manager \
                 binds the lines of {SYSTEM_DIR}, the first one gets it and the others' sockets \
                 fail; use a per-user path such as %t/NAME in {SYSTEM_DIR}"
            ),
            Problem::File { path, what } => write!(f, "{path}: {what}"),
            Problem::NoUserDir => write!(
                f,
                "neither XDG_CONFIG_HOME nor HOME is an absolute path: \
                 reading only {SYSTEM_DIR}"
            ),
        }
    }

    /// A warning: the line still became a binding.
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            Problem::Exposed { .. }
                | Problem::SharedDirectory { .. }
                | Problem::SameForEveryUser { .. }
                | Problem::Likely { .. }
        )
    }
}

const BAD_FILE_NAME: &str = "file name is not an absolute path in UTF-8 without control, \
     invisible or non-ASCII space characters, skipped";

/// A directory or file the config was looked for in, and what became of it:
/// what `--check` lists so that a file that was not read is never a mystery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A config directory; `exists` is false when it is absent (not an
    /// error). Directories that cannot be read are [`Problem`]s.
    Directory { path: String, exists: bool },
    /// A file that was read, and how many bindings it gave.
    Read { path: String, bindings: usize },
    /// A directory entry that was not read, and why.
    Skipped { path: String, why: String },
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seen::Directory { path, exists: true } => write!(f, "reading {path}/*{SUFFIX}"),
            Seen::Directory {
                path,
                exists: false,
            } => write!(f, "{path}: no such directory"),
            Seen::Read { path, bindings } => write!(
                f,
                "read {path}: {bindings} binding{}",
                if *bindings == 1 { "" } else { "s" }
            ),
            Seen::Skipped { path, why } => write!(f, "skipped {path}: {why}"),
        }
    }
}

/// All bindings and problems, in file-name then line order.
#[derive(Debug, Default)]
pub struct Config {
    pub bindings: Vec<Binding>,
    /// Errors (the line or file was skipped) and warnings, in order.
    pub problems: Vec<Problem>,
    /// The directories and files looked at, in order.
    pub seen: Vec<Seen>,
    /// How `%t` and `%h` expand, to check socket paths as systemd will
    /// bind them; an unknown value leaves those paths unchecked.
    specifiers: Specifiers,
    /// Whether another user can take a socket path; checks nothing in a
    /// [`Config::default`].
    paths: PathChecker,
    /// Lines of files in this directory are bound by every user's manager.
    system_dir: Option<PathBuf>,
    /// Unit name to index in `bindings`, to find duplicates.
    by_unit: HashMap<String, usize>,
    /// TCP ports below this need a privilege this user's manager lacks
    /// (`net.ipv4.ip_unprivileged_port_start`); `None`: not checked.
    unprivileged_port_start: Option<u16>,
}

impl Config {
    /// An empty config whose socket paths are checked with `specifiers`,
    /// as this process's user's paths.
    pub fn new(specifiers: Specifiers) -> Config {
        Config {
            specifiers,
            paths: PathChecker::new(Ids::current()),
            unprivileged_port_start: unprivileged_port_start(),
            ..Config::default()
        }
    }

    /// Reads every config file of `dirs`.
    pub fn load(dirs: &ConfigDirs, specifiers: Specifiers) -> Config {
        let mut config = Config::new(specifiers);
        config.system_dir = Some(dirs.system.clone());
        if dirs.user.is_none() {
            config.problems.push(Problem::NoUserDir);
        }
        for path in config_files(dirs, &mut config.problems, &mut config.seen) {
            config.add_file(&path);
        }
        config
    }

    /// Reads just `files`, in the order given, as `--check FILE...` does:
    /// no directory is listed and no user file replaces an `/etc` one, but
    /// a file in [`SYSTEM_DIR`] is still read as every user's. A relative
    /// path is taken from the working directory.
    pub fn load_files(files: &[PathBuf], specifiers: Specifiers) -> Config {
        let mut config = Config::new(specifiers);
        config.system_dir = Some(PathBuf::from(SYSTEM_DIR));
        for file in files {
            let file = std::path::absolute(file).unwrap_or_else(|_| file.clone());
            config.add_file(&file);
        }
        config
    }

    /// Reads one file; a problem with the file is recorded, not returned.
    pub fn add_file(&mut self, path: &Path) {
        let file_problem = |what: String| Problem::File {
            path: printable(path.as_os_str().as_bytes()),
            what,
        };
        let Some(file) = path.to_str() else {
            self.problems.push(file_problem(BAD_FILE_NAME.into()));
            return;
        };
        match read_config_file(path) {
            Ok(text) => {
                let before = self.bindings.len();
                self.add_text(file, &text);
                self.seen.push(Seen::Read {
                    path: printable(file.as_bytes()),
                    bindings: self.bindings.len() - before,
                });
            }
            Err(what) => self.problems.push(file_problem(what)),
        }
    }

    /// Parses the text of one file; `file`, its absolute path, names it in
    /// locations and in `SourcePath=`. A leading UTF-8 byte order mark is
    /// ignored.
    pub fn add_text(&mut self, file: &str, text: &[u8]) {
        // The path goes into a comment and SourcePath=: it must be a clean
        // line, and SourcePath= takes only absolute paths.
        if file.chars().any(|c| c.is_control() || is_invisible(c)) || !file.starts_with('/') {
            self.problems.push(Problem::File {
                path: printable(file.as_bytes()),
                what: BAD_FILE_NAME.into(),
            });
            return;
        }
        let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
        let for_every_user = self
            .system_dir
            .as_deref()
            .is_some_and(|dir| Path::new(file).parent() == Some(dir));
        let file: Arc<str> = Arc::from(file);
        for (index, line) in text.split(|&b| b == b'\n').enumerate() {
            let at = || Location {
                file: Arc::clone(&file),
                line: index + 1,
            };
            let problem = |error| Problem::Line {
                at: at(),
                error,
                text: printable(content(line)),
            };
            let checked = parse_line(line, at()).and_then(|binding| match binding {
                Some(binding) => {
                    check_socket_path(&binding.listen, &self.specifiers, &mut self.paths)
                        .map(|shared| Some((binding, shared)))
                }
                None => Ok(None),
            });
            match checked {
                Ok(None) => {}
                Ok(Some((binding, shared))) => {
                    if let Some(&earlier) = self.by_unit.get(&binding.unit_name) {
                        self.problems.push(problem(LineError::Duplicate {
                            earlier: self.bindings[earlier].source.clone(),
                            unit: binding.unit_name,
                        }));
                        continue;
                    }
                    if let Some(exposure) = binding.listen.exposure() {
                        self.problems.push(Problem::Exposed {
                            at: at(),
                            listen: binding.listen.to_string(),
                            exposure,
                            text: printable(content(line)),
                        });
                    }
                    if let Some((path, SharedDirectory { dir })) = shared {
                        self.problems.push(Problem::SharedDirectory {
                            at: at(),
                            path,
                            dir,
                            text: printable(content(line)),
                        });
                    }
                    for what in self.likely_mistakes(&binding) {
                        self.problems.push(Problem::Likely {
                            at: at(),
                            what,
                            text: printable(content(line)),
                        });
                    }
                    if for_every_user && is_one_address_for_all_users(&binding.listen) {
                        self.problems.push(Problem::SameForEveryUser {
                            at: at(),
                            listen: printable(binding.listen.to_string().as_bytes()),
                            text: printable(content(line)),
                        });
                    }
                    self.by_unit
                        .insert(binding.unit_name.clone(), self.bindings.len());
                    self.bindings.push(binding);
                }
                Err(error) => self.problems.push(problem(error)),
            }
        }
    }
}

impl Config {
    /// Warnings for a binding that is valid but likely not what was meant.
    fn likely_mistakes(&self, binding: &Binding) -> Vec<String> {
        let mut found = Vec::new();
        let service = binding.destination.service.as_str();
        let (name, argument) = match service.split_once('+') {
            Some((name, argument)) => (name, Some(argument)),
            None => (service, None),
        };
        if name.bytes().all(|b| b.is_ascii_digit()) && argument.is_none() {
            found.push(format!(
                "SERVICE \"{service}\" is a port number, not a qrexec service: did you mean \
                 qubes.ConnectTCP+{service}?"
            ));
        } else if !name.contains('.') && name.starts_with(|c: char| c.is_ascii_uppercase()) {
            // Every Qubes service is NAMESPACE.Name; a name without a dot
            // that looks like the part after it (CamelCase, as ConnectTCP)
            // likely lost its `qubes.`. Lower-case names such as a local
            // `svc` are left alone.
            found.push(format!(
                "SERVICE \"{service}\" has no '.': qrexec services are named like \
                 qubes.ConnectTCP; did you mean qubes.{service}?"
            ));
        }
        if let (ListenAddress::Inet(address), Some(start)) =
            (&binding.listen, self.unprivileged_port_start)
        {
            if address.port() < start {
                found.push(format!(
                    "port {} is below {start}: your user manager cannot bind it \
                     (net.ipv4.ip_unprivileged_port_start is {start}); choose a port from \
                     {start} up",
                    address.port()
                ));
            }
        }
        found
    }
}

/// The lowest TCP port this user's manager can bind, when that is a
/// limit: `None` with `CAP_NET_BIND_SERVICE` (root's manager may bind any
/// port; the generator and `--check` have the capabilities of the manager
/// or user that runs them). Read from
/// `/proc/sys/net/ipv4/ip_unprivileged_port_start` (1024 if unreadable,
/// the kernel's default).
fn unprivileged_port_start() -> Option<u16> {
    const CAP_NET_BIND_SERVICE: u32 = 10;
    let may_bind_any = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_BIND_SERVICE) != 0);
    if may_bind_any {
        return None;
    }
    let start = fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    (start > 0).then_some(start)
}

/// Parses one line (without its `\n`), found `at` a file's line; `Ok(None)`
/// for a blank or comment line. The socket path and duplicates are checked
/// by [`Config`], which knows the environment and the lines before.
pub fn parse_line(line: &[u8], at: Location) -> Result<Option<Binding>, LineError> {
    let content = content(line);
    if content.is_empty() {
        return Ok(None);
    }
    let content = std::str::from_utf8(content).map_err(|_| LineError::NotUtf8)?;
    if let Some(c) = content.chars().find(|&c| c.is_control() && c != '\t') {
        return Err(LineError::ControlCharacter(c));
    }
    // No valid field holds a space: one that is not ' ' is a look-alike.
    if let Some(c) = content
        .chars()
        .find(|&c| c.is_whitespace() && c != ' ' && c != '\t')
    {
        return Err(LineError::OddSpace(c));
    }
    let fields: Vec<&str> = content
        .split([' ', '\t'])
        .filter(|f| !f.is_empty())
        .collect();
    let [listen, target, service] = fields[..] else {
        return Err(field_count_error(&fields));
    };
    let listen = ListenAddress::parse(listen).map_err(|mut e| {
        e.text = cut(&e.text);
        LineError::Address(e)
    })?;
    let target = match target {
        "''" | "\"\"" => "",
        other => other,
    };
    let destination = Destination {
        target: Target::parse(target).map_err(binding_error)?,
        service: Service::parse(service).map_err(binding_error)?,
    };
    let fd_name = destination.to_fd_name().map_err(binding_error)?;
    Ok(Some(Binding {
        unit_name: socket_unit_name(&listen),
        listen,
        destination,
        fd_name,
        source: at,
    }))
}

/// Why `fields` (not three) are not a line: which field is missing, what
/// is too much, or the line a qvm-connect-tcp argument means.
fn field_count_error(fields: &[&str]) -> LineError {
    match fields {
        [only] => match qvm_connect_tcp_line(only) {
            Some(means) => LineError::QvmConnectTcp(means),
            None => LineError::Missing("TARGET and SERVICE"),
        },
        // A qube name holds no '.' or '+'; a service usually does.
        [_, second] if Target::parse(second).is_ok() || *second == "''" || *second == "\"\"" => {
            LineError::Missing("SERVICE")
        }
        [_, _] => LineError::Missing("TARGET"),
        [_, _, _, extra @ ..] => LineError::TooMany(printable(extra.join(" ").as_bytes())),
        [] => LineError::Missing("LISTEN, TARGET and SERVICE"),
    }
}

/// The config line for a `qvm-connect-tcp` argument
/// `[LOCALPORT]:[TARGET]:REMOTEPORT` (an empty LOCALPORT is REMOTEPORT, an
/// empty TARGET is `@default`), if `field` is one and its parts are valid.
/// qvm-connect-tcp listens on 127.0.0.1 and calls `qubes.ConnectTCP+PORT`.
pub fn qvm_connect_tcp_line(field: &str) -> Option<String> {
    let mut parts = field.split(':');
    let (local, target, remote) = (parts.next()?, parts.next()?, parts.next()?);
    let is_port = |p: &str| !p.is_empty() && p.parse::<u16>().is_ok_and(|n| n > 0);
    if parts.next().is_some() || !is_port(remote) || !(local.is_empty() || is_port(local)) {
        return None;
    }
    let local = if local.is_empty() { remote } else { local };
    let target = if target.is_empty() {
        "@default"
    } else {
        target
    };
    Target::parse(target).ok()?;
    Some(format!(
        "127.0.0.1:{local} {target} qubes.ConnectTCP+{remote}"
    ))
}

/// Whether every user's manager would bind the same address for this
/// LISTEN: anything but a `%t/` or `%h/` path.
fn is_one_address_for_all_users(listen: &ListenAddress) -> bool {
    match listen {
        ListenAddress::Path(path) => !(path.starts_with("%t/") || path.starts_with("%h/")),
        ListenAddress::Inet(_) | ListenAddress::Abstract(_) => true,
    }
}

/// Refuses a socket path systemd would refuse (too long once expanded),
/// that would cost the user a file (anything but a socket at the path,
/// checked with lstat, so a symlink is refused, not followed), or that
/// another user can take ([`crate::owner`]). `Ok(Some(..))`: the printable
/// path and the directory others can create names in, for a warning. A
/// missing path, or one that cannot be looked at, is left to systemd. A
/// path whose specifier has no known value is not checked.
fn check_socket_path(
    listen: &ListenAddress,
    specifiers: &Specifiers,
    paths: &mut PathChecker,
) -> Result<Option<(String, SharedDirectory)>, LineError> {
    let name = match listen {
        ListenAddress::Inet(_) => None,
        ListenAddress::Abstract(_) => Some(listen.to_string().into_bytes()),
        ListenAddress::Path(path) => Some(
            listen
                .expanded_path(specifiers)
                .unwrap_or_else(|| path.as_bytes().to_vec()),
        ),
    };
    if let Some(name) = name {
        if let Some(character) = lost_on_reload(&name) {
            return Err(LineError::LostOnReload {
                name: printable(&name),
                character,
            });
        }
    }
    let Some(expanded) = listen.expanded_path(specifiers) else {
        return Ok(None);
    };
    if expanded.len() > MAX_SOCKET_PATH {
        return Err(LineError::ExpandedTooLong {
            expanded: printable(&expanded),
            len: expanded.len(),
        });
    }
    let path = Path::new(std::ffi::OsStr::from_bytes(&expanded));
    let meta = fs::symlink_metadata(path).ok();
    let what = match &meta {
        None => None,
        Some(meta) => file_kind(meta),
    };
    if let Some(what) = what {
        return Err(LineError::PathExists {
            expanded: printable(&expanded),
            what,
        });
    }
    match paths.check(path, meta.as_ref(), printable) {
        Ok(shared) => Ok(shared.map(|shared| (printable(&expanded), shared))),
        Err(takeover) => Err(LineError::NotYours {
            expanded: printable(&expanded),
            takeover,
        }),
    }
}

/// The first character of a socket path or abstract name that systemd
/// loses the socket over, in words. systemd 252 writes each socket's
/// address with C escapes when it keeps the socket across a daemon-reload
/// (`\"`, `\'`, `\\`, and octal for every byte outside printable ASCII)
/// and then finds no socket of that name: it closes the socket, and the
/// unit still says it listens (tested in `tests/systemd.rs`). Checked on
/// the path as systemd binds it (`%h` expanded: a home with such a name
/// counts too).
pub fn lost_on_reload(name: &[u8]) -> Option<String> {
    let at = name
        .iter()
        .position(|&b| matches!(b, b'"' | b'\'' | b'\\') || !(0x20..0x7f).contains(&b))?;
    Some(match name[at] {
        b'"' => "a double quote".to_owned(),
        b'\'' => "a single quote".to_owned(),
        b'\\' => "a backslash".to_owned(),
        _ => {
            // The character the byte starts (or the byte, if it is not UTF-8).
            let rest = &name[at..name.len().min(at + 4)];
            let shown = match std::str::from_utf8(rest) {
                Ok(text) => text.chars().next().map(|c| c.to_string()),
                Err(e) if e.valid_up_to() > 0 => std::str::from_utf8(&rest[..e.valid_up_to()])
                    .ok()
                    .and_then(|t| t.chars().next())
                    .map(|c| c.to_string()),
                Err(_) => None,
            };
            match shown {
                Some(c) => format!("\"{}\", a character beyond ASCII", printable(c.as_bytes())),
                None => format!("the byte \\x{:02x}, beyond ASCII", name[at]),
            }
        }
    })
}

/// What a file that is not a socket is, in words; `None` for a socket.
fn file_kind(meta: &fs::Metadata) -> Option<&'static str> {
    let file_type = meta.file_type();
    Some(if file_type.is_socket() {
        return None;
    } else if file_type.is_file() {
        "a regular file"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        "a file"
    })
}

/// The part of a line before its comment, without surrounding blanks.
fn content(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let end = line
        .iter()
        .enumerate()
        .position(|(i, &b)| b == b'#' && (i == 0 || matches!(line[i - 1], b' ' | b'\t')))
        .unwrap_or(line.len());
    let blank = |b: &u8| matches!(b, b' ' | b'\t');
    let line = &line[..end];
    let start = line.iter().position(|b| !blank(b)).unwrap_or(line.len());
    let end = line
        .iter()
        .rposition(|b| !blank(b))
        .map_or(start, |i| i + 1);
    &line[start..end]
}

/// The config files to read, in order, after user files replaced system
/// files of the same name. Unreadable directories become problems; every
/// directory, and every entry that will not be read, goes into `seen`.
pub fn config_files(
    dirs: &ConfigDirs,
    problems: &mut Vec<Problem>,
    seen: &mut Vec<Seen>,
) -> Vec<PathBuf> {
    let mut files: BTreeMap<OsString, PathBuf> = BTreeMap::new();
    for dir in std::iter::once(&dirs.system).chain(dirs.user.as_ref()) {
        let dir_problem = |what: String| Problem::File {
            path: printable(dir.as_os_str().as_bytes()),
            what,
        };
        let shown = || printable(dir.as_os_str().as_bytes());
        match fs::metadata(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                seen.push(Seen::Directory {
                    path: shown(),
                    exists: false,
                });
                continue;
            }
            Err(e) => {
                problems.push(dir_problem(format!("cannot read directory: {e}")));
                continue;
            }
            Ok(meta) if !meta.is_dir() => {
                problems.push(dir_problem("not a directory, skipped".into()));
                continue;
            }
            Ok(_) => seen.push(Seen::Directory {
                path: shown(),
                exists: true,
            }),
        }
        let walk = WalkDir::new(dir)
            .min_depth(1)
            .max_depth(1)
            .sort_by_file_name();
        for entry in walk {
            match entry {
                Ok(entry) => {
                    let name = entry.file_name().as_bytes();
                    let path = printable(entry.path().as_os_str().as_bytes());
                    let why = if name.starts_with(b".") {
                        "the name starts with '.' (hidden and backup files are ignored)".to_owned()
                    } else if !name.ends_with(SUFFIX.as_bytes()) {
                        format!("only files named *{SUFFIX} are read")
                    } else {
                        let replaced =
                            files.insert(entry.file_name().to_owned(), entry.into_path());
                        if let Some(replaced) = replaced {
                            seen.push(Seen::Skipped {
                                path: printable(replaced.as_os_str().as_bytes()),
                                why: format!("replaced by {path}"),
                            });
                        }
                        continue;
                    };
                    seen.push(Seen::Skipped { path, why });
                }
                Err(e) => {
                    let what = match e.io_error() {
                        Some(io) => format!("cannot read directory: {io}"),
                        None => format!("cannot read directory: {e}"),
                    };
                    problems.push(dir_problem(what));
                }
            }
        }
    }
    files.into_values().collect()
}

/// A config file's bytes; `/dev/null` (a masked file) reads as empty, and
/// anything but a regular file is refused (a FIFO would hang the boot).
fn read_config_file(path: &Path) -> Result<Vec<u8>, String> {
    let meta = fs::metadata(path).map_err(|e| match fs::read_link(path) {
        // A link whose target is gone: name both, or "No such file" reads
        // as if the link itself were missing.
        Ok(target) if e.kind() == io::ErrorKind::NotFound => format!(
            "a symbolic link to {}, which does not exist; skipped",
            printable(target.as_os_str().as_bytes())
        ),
        _ if e.kind() == io::ErrorKind::NotFound => "no such file".to_owned(),
        _ => format!("cannot read: {e}"),
    })?;
    let file_type = meta.file_type();
    if file_type.is_char_device() && meta.rdev() == libc::makedev(1, 3) {
        return Ok(Vec::new());
    }
    if !file_type.is_file() {
        return Err("not a regular file, skipped".into());
    }
    fs::read(path).map_err(|e| format!("cannot read: {e}"))
}

impl Config {
    /// The binding whose socket unit is `unit`, if a line gives one.
    pub fn binding_of_unit(&self, unit: &str) -> Option<&Binding> {
        self.by_unit.get(unit).map(|&index| &self.bindings[index])
    }
}

/// A TARGET or SERVICE error, with the field it quotes [cut](cut).
fn binding_error(error: BindingError) -> LineError {
    LineError::Binding(match error {
        BindingError::InvalidTarget(t) => BindingError::InvalidTarget(cut(&t)),
        BindingError::InvalidService(s) => BindingError::InvalidService(cut(&s)),
        BindingError::ColonInTarget(t) => BindingError::ColonInTarget(cut(&t)),
        other => other,
    })
}

/// How much of a user's text a message shows: this many characters (a byte
/// that is not UTF-8 counts as one), then `…(N bytes)` with the whole
/// length. More than any valid field holds (an fd name is at most 255 bytes,
/// a socket path 107), so only a whole line, a file path or garbage is cut.
pub const SHOWN_CHARS: usize = 256;

/// The one rule for showing a user's text, in a one-line message, a unit's
/// `Description=`, `status` or `policy`: control characters,
/// [invisible](is_invisible) ones and bytes that are not UTF-8 are written as
/// `\xNN` (or `\u{N}`), tabs stay, and text longer than [`SHOWN_CHARS`] is
/// cut (a 20 MB line must not become a 20 MB message). The result holds
/// only characters that show as themselves.
pub fn printable(bytes: &[u8]) -> String {
    // Most text is short printable ASCII: copied as it is.
    if bytes.len() <= SHOWN_CHARS && bytes.iter().all(|&b| matches!(b, b' '..=b'~' | b'\t')) {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut out = String::new();
    let mut shown = 0;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if shown == SHOWN_CHARS {
                return cut_here(out, bytes.len());
            }
            push_printable(&mut out, c);
            shown += 1;
        }
        for b in chunk.invalid() {
            if shown == SHOWN_CHARS {
                return cut_here(out, bytes.len());
            }
            let _ = write!(out, "\\x{b:02x}");
            shown += 1;
        }
    }
    out
}

/// [`printable`] without the cut, for a message whose parts are already
/// bounded but may hold characters that do not show as themselves (an
/// error's own quoting of a field, a path from the environment).
pub fn printable_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        push_printable(&mut out, c);
    }
    out
}

/// `text` as an error may quote it: at most [`SHOWN_CHARS`] characters,
/// with the same length note as [`printable`]; not escaped (the quoting
/// does that, and the message then goes through [`printable_message`]).
fn cut(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((end, _)) => cut_here(text[..end].to_owned(), text.len()),
        None => text.to_owned(),
    }
}

fn cut_here(mut shown: String, len: usize) -> String {
    let _ = write!(shown, "…({len} bytes)");
    shown
}

fn push_printable(out: &mut String, c: char) {
    match c {
        '\t' => out.push(c),
        c if c.is_ascii_control() => {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        }
        c if c.is_control() || is_invisible(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// Characters that make printed text look unlike what it is: those that
/// show nothing or reorder what is shown around them (Unicode's
/// Default_Ignorable_Code_Point set: zero-width spaces and joiners, the byte
/// order mark, the bidirectional embeddings, overrides and isolates such as
/// U+202E, variation selectors, tags, fillers), the other format characters
/// (Arabic number signs, interlinear annotation marks, Egyptian hieroglyph
/// controls), the line and paragraph separators, and the spaces other than
/// U+0020 (U+00A0 and the like), which look like the space that separates
/// fields but are not one. C0 and C1 controls are `char::is_control`.
pub fn is_invisible(c: char) -> bool {
    if u32::from(c) < 0xA0 {
        return false;
    }
    matches!(
        u32::from(c),
        0x00A0
            | 0x00AD
            | 0x034F
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x115F..=0x1160
            | 0x1680
            | 0x17B4..=0x17B5
            | 0x180B..=0x180F
            | 0x2000..=0x200F
            | 0x2028..=0x202F
            | 0x205F..=0x206F
            | 0x3000
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFEFF
            | 0xFFA0
            | 0xFFF0..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> Location {
        Location {
            file: Arc::from("/a.conf"),
            line: 1,
        }
    }

    fn binding(line: &str) -> Binding {
        parse_line(line.as_bytes(), at()).unwrap().unwrap()
    }

    #[test]
    fn grammar() {
        let e = binding("127.0.0.1:2222  ssh-server\tqubes.ConnectTCP+22 # ssh");
        assert_eq!(e.listen.to_string(), "127.0.0.1:2222");
        assert_eq!(e.fd_name, "ssh-server qubes.ConnectTCP+22");
        assert_eq!(binding("@c '' svc").fd_name, "'' svc");
        assert_eq!(binding("@c \"\" svc\r").fd_name, "'' svc");
        assert_eq!(
            binding("/run/a#b @default svc").listen.to_string(),
            "/run/a#b"
        );
        for blank in ["", "  ", "# x", "   # 1 2 3", "\r", "#"] {
            assert_eq!(parse_line(blank.as_bytes(), at()), Ok(None), "{blank:?}");
        }
    }

    #[test]
    fn rejections() {
        let err = |line: &[u8]| parse_line(line, at()).unwrap_err();
        assert_eq!(err(b"a b"), LineError::Missing("SERVICE"));
        assert_eq!(err(b"a ''"), LineError::Missing("SERVICE"));
        assert_eq!(err(b"a b.c"), LineError::Missing("TARGET"));
        assert_eq!(err(b"a"), LineError::Missing("TARGET and SERVICE"));
        assert_eq!(err(b"a b c d"), LineError::TooMany("d".into()));
        assert_eq!(
            err(b"2222:ssh-server:22"),
            LineError::QvmConnectTcp("127.0.0.1:2222 ssh-server qubes.ConnectTCP+22".into())
        );
        assert_eq!(
            err(b"::22"),
            LineError::QvmConnectTcp("127.0.0.1:22 @default qubes.ConnectTCP+22".into())
        );
        assert_eq!(err("a\u{a0}b c".as_bytes()), LineError::OddSpace('\u{a0}'));
        assert_eq!(err(b"@x vm svc\x1b"), LineError::ControlCharacter('\x1b'));
        assert_eq!(err(b"@x vm\x0bsvc"), LineError::ControlCharacter('\x0b'));
        assert_eq!(err(b"@x\xff vm svc"), LineError::NotUtf8);
        assert!(matches!(err(b"22 vm svc"), LineError::Address(_)));
        assert!(matches!(err(b"@x 1vm svc"), LineError::Binding(_)));
        // A config line takes @dispvm:TEMPLATE; the fd name's spelling is refused.
        assert!(parse_line(b"@x @dispvm:t svc", at()).is_ok());
        assert!(matches!(
            err(b"@x @dispvm/t svc"),
            LineError::Binding(BindingError::EncodedTarget { .. })
        ));
        // A control character in a comment is harmless; bad UTF-8 too.
        assert_eq!(
            parse_line(b"@x vm svc # \x1b\xff", at())
                .unwrap()
                .unwrap()
                .fd_name,
            "vm svc"
        );
    }

    #[test]
    fn duplicates_name_the_first_line() {
        let mut config = Config::default();
        config.add_text("/a.conf", b"/run/a vm my.s\n\n/run//a vm2 my.s2\n");
        assert_eq!(config.bindings.len(), 1);
        assert_eq!(
            config.problems[0].to_string(),
            "/a.conf:3: the same LISTEN is already bound at /a.conf:1 \
             (unit qrexec-connect-path-run-a.socket): /run//a vm2 my.s2"
        );
    }

    #[test]
    fn odd_files_are_refused_not_read() {
        let dir =
            std::env::temp_dir().join(format!("qrexec-connect-config-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo.conf");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let bad_name = dir.join(std::ffi::OsStr::from_bytes(b"\xff.conf"));
        fs::write(&bad_name, "127.0.0.1:1 vm svc\n").unwrap();
        let mut config = Config::default();
        config.add_file(&fifo); // would block forever if it were opened
        config.add_file(&bad_name);
        config.add_text("/new\nline.conf", b"127.0.0.1:2 vm svc\n");
        let _ = fs::remove_dir_all(&dir);
        assert!(config.bindings.is_empty());
        let messages: Vec<String> = config.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            messages,
            [
                format!("{}: not a regular file, skipped", fifo.display()),
                format!("{}/\\xff.conf: {BAD_FILE_NAME}", dir.display()),
                format!("/new\\x0aline.conf: {BAD_FILE_NAME}"),
            ]
        );
    }

    #[test]
    fn socket_paths_must_not_name_a_file_other_than_a_socket() {
        let dir = std::env::temp_dir().join(format!("qrexec-connect-paths-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("run/dir")).unwrap();
        fs::create_dir_all(dir.join("home")).unwrap();
        fs::write(dir.join("home/file"), "precious").unwrap();
        std::os::unix::fs::symlink("file", dir.join("home/link")).unwrap();
        let fifo = std::ffi::CString::new(dir.join("run/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let _socket = std::os::unix::net::UnixListener::bind(dir.join("run/stale")).unwrap();

        let specifiers = Specifiers::from_vars(
            Some(dir.join("run").into_os_string()),
            Some(dir.join("home").into_os_string()),
        );
        let mut config = Config::new(specifiers);
        config.add_text(
            "/a.conf",
            b"%h/file vm my.s\n%h/link vm my.s\n%t/fifo vm my.s\n%t/dir vm my.s\n/dev/null vm my.s\n\
              %t/stale vm my.s\n%t/missing vm my.s\n%h/no/such/dir vm my.s\n%h/file/below vm my.s\n",
        );
        let kinds: Vec<(usize, &str)> = config
            .problems
            .iter()
            .map(|p| match p {
                Problem::Line {
                    at,
                    error: LineError::PathExists { what, .. },
                    ..
                } => (at.line, *what),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (1, "a regular file"),
                (2, "a symbolic link"),
                (3, "a FIFO"),
                (4, "a directory"),
                (5, "a character device")
            ]
        );
        let bound: Vec<usize> = config.bindings.iter().map(|b| b.source.line).collect();
        assert_eq!(bound, [6, 7, 8, 9]);
        assert_eq!(fs::read(dir.join("home/file")).unwrap(), b"precious");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn invisible_characters_are_escaped_and_refused_in_file_names() {
        assert_eq!(
            printable("a\u{202e}b\u{200b}c\u{feff}d\u{2066}e\u{2028}f\u{ad}g\u{e0041}".as_bytes()),
            "a\\u{202e}b\\u{200b}c\\u{feff}d\\u{2066}e\\u{2028}f\\u{ad}g\\u{e0041}"
        );
        assert_eq!(printable("é ü 中 \u{a0}".as_bytes()), "é ü 中 \\u{a0}");
        let mut config = Config::default();
        config.add_text(
            "/etc/qrexec-connect/a\u{202e}fnoc.conf",
            b"127.0.0.1:1 vm svc\n",
        );
        assert!(config.bindings.is_empty());
        assert_eq!(
            config.problems[0].to_string(),
            format!("/etc/qrexec-connect/a\\u{{202e}}fnoc.conf: {BAD_FILE_NAME}")
        );
    }

    /// Characters that reorder, hide or fake what is shown around them.
    #[test]
    fn format_characters_c1_controls_and_odd_spaces_are_escaped() {
        for c in [
            '\u{202a}',
            '\u{202b}',
            '\u{202c}',
            '\u{202d}',
            '\u{202e}', // bidi embeddings
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}', // bidi isolates
            '\u{200b}',
            '\u{200c}',
            '\u{200d}',
            '\u{200e}',
            '\u{200f}',
            '\u{feff}',
            '\u{2028}',
            '\u{2029}', // line and paragraph separators
            '\u{80}',
            '\u{85}',
            '\u{9b}',
            '\u{9f}', // C1 controls (U+009B is CSI)
            '\u{a0}',
            '\u{1680}',
            '\u{2000}',
            '\u{2007}',
            '\u{200a}',
            '\u{202f}',
            '\u{205f}',
            '\u{3000}', // spaces that look like ' ' and are not
            '\u{600}',
            '\u{6dd}',
            '\u{fff9}',
            '\u{fffb}',
            '\u{110bd}',
            '\u{13430}',
            '\u{e0001}', // other format characters
        ] {
            let shown = printable(format!("a{c}b").as_bytes());
            assert_eq!(
                shown,
                format!("a\\u{{{:x}}}b", u32::from(c)),
                "U+{:04X}",
                u32::from(c)
            );
        }
        for kept in ["é ü 中 ﬁ", "a\tb", "Ω≈ç√", "🙂"] {
            assert_eq!(printable(kept.as_bytes()), kept);
        }
    }

    #[test]
    fn printable_cuts_long_text_and_says_how_long_it_was() {
        let shown = printable(&vec![b'a'; 20_000_000]);
        assert!(shown.len() < 1000, "{} bytes shown", shown.len());
        assert!(shown.starts_with(&"a".repeat(200)), "{shown}");
        assert!(shown.ends_with("…(20000000 bytes)"), "{shown}");
        // The cut counts what was read: an escape is one character.
        let shown = printable("\u{202e}".repeat(100_000).as_bytes());
        assert!(shown.len() < 4000, "{} bytes shown", shown.len());
        assert!(shown.ends_with("…(300000 bytes)"), "{shown}");
        // Bytes that are not UTF-8 count one each.
        let shown = printable(&vec![0xff; 100_000]);
        assert!(shown.starts_with("\\xff\\xff") && shown.ends_with("…(100000 bytes)"));
        // Nothing a valid field can hold is cut: an fd name is at most 255 bytes.
        let field = "s".repeat(255);
        assert_eq!(printable(field.as_bytes()), field);
    }

    /// What a problem echoes of its line (the text, and the field an error
    /// quotes) is cut and printable, however long the line.
    #[test]
    fn problems_echo_long_and_hostile_lines_cut_and_escaped() {
        let huge = "x".repeat(1_000_000);
        let mut config = Config::default();
        for line in [
            format!("@{huge} vm svc"),
            format!("/run/{huge} vm svc"),
            format!("127.0.0.1:{huge} vm svc"),
            format!("@a v{huge} svc"),
            format!("@a vm s{huge}"),
            format!("@a vm svc {huge}"),
            "@a v\u{3164}m svc".to_owned(),
            "@a vm s\u{115f}vc".to_owned(),
            "@a\u{3164} vm svc\u{1b}[2J".to_owned(),
        ] {
            config.add_text("/a.conf", line.as_bytes());
        }
        assert_eq!(config.problems.len(), 9, "{:?}", config.problems.len());
        for problem in &config.problems {
            let message = problem.to_string();
            assert!(
                message.len() < 2000,
                "{} bytes: {}",
                message.len(),
                &message[..300]
            );
            assert!(
                !message.chars().any(|c| c.is_control() || is_invisible(c)),
                "{message}"
            );
        }
    }

    #[test]
    fn printable_escapes() {
        assert_eq!(printable(b"a\tb\x1b\\\xff\xc3\xbc"), "a\tb\\x1b\\\\xffü");
        assert_eq!(printable("\u{85}x".as_bytes()), "\\u{85}x");
        assert_eq!(printable(b"\xe2\x82"), "\\xe2\\x82");
    }

    #[test]
    fn user_dir_from_environment() {
        let dirs = ConfigDirs::from_vars(Some("/x".into()), Some("/h".into()));
        assert_eq!(dirs.user, Some(PathBuf::from("/x/qrexec-connect")));
        let dirs = ConfigDirs::from_vars(Some("rel".into()), Some("/h".into()));
        assert_eq!(dirs.user, Some(PathBuf::from("/h/.config/qrexec-connect")));
        let dirs = ConfigDirs::from_vars(Some("".into()), Some("h".into()));
        assert_eq!(dirs.user, None);
        assert_eq!(dirs.system, PathBuf::from("/etc/qrexec-connect"));
    }
}
