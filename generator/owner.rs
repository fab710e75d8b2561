//! Whether another local user can take a binding's socket path.
//!
//! A binding's clients connect to a path and trust that this binding
//! answers. A user who can put their own socket at that path receives the
//! clients' connections instead (and whatever they send to the qube at the
//! other end). systemd binds the socket as the user, unlinking whatever is
//! at the path first when it may; in a sticky directory such as `/tmp` it
//! may not unlink another user's file, so the socket unit fails and the
//! clients reach the other user's socket. So, for a path as systemd will
//! bind it:
//!
//! * a socket already at the path that is not ours is refused, naming its
//!   owner: either it answers our clients, or systemd would take it from
//!   its owner (as root);
//! * a directory on the way that belongs to another user, or that others
//!   can write and is not sticky, is refused: they can rename or replace
//!   what is in it at any time;
//! * so is a symlink on the way that belongs to another user (also one a
//!   symlink leads through), or a file of theirs where systemd would make
//!   a directory: even in a sticky directory they may replace their own
//!   entry, and lead the path to a socket of theirs;
//! * the directory the socket is made in (or the first missing directory,
//!   which systemd creates with `DirectoryMode=0700`) gives a warning when
//!   others can create files in it and it is sticky (`/tmp`): they cannot
//!   touch our entries, but they can take the name first, before systemd
//!   binds it at login or after it removed the socket on stop
//!   (`RemoveOnStop=yes`). A warning, not an error: it needs another local
//!   user acting at the right moment, the refusal above catches it at the
//!   next reload, and many single-user qubes keep such paths working.
//!
//! "Others" are users other than us and root (root owns the system's
//! directories and can take any path anyway); a group write bit counts
//! unless the group is our own primary group and nobody else is in it
//! (as a listed member in /etc/group, or with it as their primary
//! group). Not considered: ACLs, and changes after the generator ran (it
//! runs at login and every reload).
//! Inside a user namespace (the test fixtures), owners that do not map
//! show as the overflow id and count as root.
//!
//! The ids come from `/proc/self/status` and names from `/etc/passwd` and
//! `/etc/group`, read as files: no `unsafe`, no NSS (an account only NSS
//! knows is shown by number).

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Our effective user and group, and the ids that stand for "unmapped" in
/// a user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    /// In a user namespace other than the first: the overflow uid and gid.
    unmapped: Option<(u32, u32)>,
    /// Other users are in our primary group (a `users` group for all):
    /// its write bit then lets them in too.
    shared_group: bool,
}

impl Ids {
    /// This process's ids; `None` without a readable `/proc`.
    pub fn current() -> Option<Ids> {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let effective = |key: &str| -> Option<u32> {
            let line = status.lines().find_map(|l| l.strip_prefix(key))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        let first_namespace = fs::read_to_string("/proc/self/uid_map")
            .map(|map| map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
            .unwrap_or(true);
        let overflow = |name: &str| -> u32 {
            fs::read_to_string(format!("/proc/sys/kernel/{name}"))
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(65534)
        };
        let (uid, gid) = (effective("Uid:")?, effective("Gid:")?);
        Some(Ids {
            uid,
            gid,
            unmapped: (!first_namespace)
                .then(|| (overflow("overflowuid"), overflow("overflowgid"))),
            shared_group: group_has_others(
                uid,
                gid,
                &fs::read_to_string("/etc/passwd").unwrap_or_default(),
                &fs::read_to_string("/etc/group").unwrap_or_default(),
            ),
        })
    }

    /// Ids for tests.
    pub fn new(uid: u32, gid: u32) -> Ids {
        Ids {
            uid,
            gid,
            unmapped: None,
            shared_group: false,
        }
    }

    /// An owner other than us and root.
    fn is_other_user(&self, uid: u32) -> bool {
        uid != self.uid && uid != 0 && self.unmapped.map(|(u, _)| u) != Some(uid)
    }

    /// A group other users are in: another than our primary group, or
    /// ours when others share it.
    fn is_other_group(&self, gid: u32) -> bool {
        (gid != self.gid || self.shared_group) && self.unmapped.map(|(_, g)| g) != Some(gid)
    }
}

/// Whether users besides `uid` are in group `gid`, as listed members in
/// `group` (the text of /etc/group) or with it as their primary group in
/// `passwd`. Accounts only NSS knows are not seen.
fn group_has_others(uid: u32, gid: u32, passwd: &str, group: &str) -> bool {
    let fields = |line: &str| -> Vec<String> { line.split(':').map(str::to_owned).collect() };
    let our_name = passwd
        .lines()
        .map(fields)
        .find_map(|f| (f.len() > 3 && f[2].parse() == Ok(uid)).then(|| f[0].clone()));
    let listed = group.lines().map(fields).any(|f| {
        f.len() > 3
            && f[2].parse() == Ok(gid)
            && f[3]
                .split(',')
                .any(|member| !member.is_empty() && Some(member) != our_name.as_deref())
    });
    let primary = passwd.lines().map(fields).any(|f| {
        f.len() > 3 && f[3].parse() == Ok(gid) && f[2].parse::<u32>().is_ok_and(|id| id != uid)
    });
    listed || primary
}

/// A user or group: its id, and its name when the account file has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: u32,
    pub name: Option<String>,
}

impl Account {
    pub fn user(uid: u32) -> Account {
        Account {
            id: uid,
            name: name_in(&fs::read_to_string("/etc/passwd").unwrap_or_default(), uid),
        }
    }

    pub fn group(gid: u32) -> Account {
        Account {
            id: gid,
            name: name_in(&fs::read_to_string("/etc/group").unwrap_or_default(), gid),
        }
    }
}

/// `2001 (mallory)`, or `2001` alone.
impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.id)?;
        match &self.name {
            Some(name) => write!(f, " ({name})"),
            None => Ok(()),
        }
    }
}

/// The name of `id` in a `passwd(5)` or `group(5)` text (`NAME:x:ID:...`).
/// A name that is not plain printable ASCII is not shown.
pub fn name_in(table: &str, id: u32) -> Option<String> {
    table.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        fields.next()?;
        let listed: u32 = fields.next()?.parse().ok()?;
        (listed == id && !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| name.to_owned())
    })
}

/// Who besides the owner can write a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writers {
    Everyone,
    Group(Account),
}

impl fmt::Display for Writers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Writers::Everyone => f.write_str("every user"),
            Writers::Group(group) => write!(f, "the members of group {group}"),
        }
    }
}

/// Why another user can take the path at any time (paths made printable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Takeover {
    /// A socket of another user is at the path.
    Socket { owner: Account },
    /// A directory on the way belongs to another user.
    OwnedDirectory { dir: String, owner: Account },
    /// Others can write a directory on the way, and it is not sticky.
    WritableDirectory { dir: String, writers: Writers },
    /// A symlink on the way (or a file where a directory must be made)
    /// belongs to another user: in a sticky directory they may replace it.
    OwnedLink { link: String, owner: Account },
}

impl fmt::Display for Takeover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Takeover::Socket { owner } => write!(
                f,
                "is a socket of uid {owner}, not yours: their program would answer this \
                 binding's clients, or systemd would take the path from them"
            ),
            Takeover::OwnedDirectory { dir, owner } => write!(
                f,
                "is under {dir:?}, which belongs to uid {owner}: they can replace the socket \
                 with their own"
            ),
            Takeover::WritableDirectory { dir, writers } => write!(
                f,
                "is under {dir:?}, which {writers} can write (and it is not sticky): they can \
                 replace the socket with their own"
            ),
            Takeover::OwnedLink { link, owner } => write!(
                f,
                "goes through {link:?}, which belongs to uid {owner}: they can make it lead to \
                 a socket of their own"
            ),
        }?;
        f.write_str("; choose a path of your own, such as one under %t/")
    }
}

/// The directory others can create names in (sticky, like `/tmp`) where
/// the socket, or the first directory systemd makes for it, is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDirectory {
    /// Made printable.
    pub dir: String,
}

/// The checks for the paths of one config, remembering each directory's
/// verdict: lines usually share their directories.
#[derive(Debug, Default)]
pub struct PathChecker {
    ids: Option<Ids>,
    verdicts: HashMap<PathBuf, Verdict>,
}

type Verdict = Result<Option<SharedDirectory>, Takeover>;

impl PathChecker {
    /// `ids`: whose paths these are; `None` checks nothing.
    pub fn new(ids: Option<Ids>) -> PathChecker {
        PathChecker {
            ids,
            verdicts: HashMap::new(),
        }
    }

    /// Checks a socket path as systemd will bind it; `existing` is what is
    /// at the path now, if anything (the caller refuses all but a socket).
    /// A path that cannot be looked at is left to systemd.
    pub fn check(
        &mut self,
        path: &Path,
        existing: Option<&Metadata>,
        printable: impl Fn(&[u8]) -> String,
    ) -> Verdict {
        let Some(ids) = self.ids else {
            return Ok(None);
        };
        if let Some(meta) = existing {
            if meta.uid() != ids.uid {
                return Err(Takeover::Socket {
                    owner: Account::user(meta.uid()),
                });
            }
        }
        let Some(parent) = path.parent() else {
            return Ok(None);
        };
        if let Some(verdict) = self.verdicts.get(parent) {
            return verdict.clone();
        }
        let verdict = directories_verdict(parent, &ids, &printable);
        self.verdicts.insert(parent.to_owned(), verdict.clone());
        verdict
    }
}

/// The verdict on the directories a socket in `parent` depends on: every
/// symlink on the way, and every directory the kernel walks through to
/// reach the deepest one that exists (symlinks resolved, and the
/// directories holding the symlinks too), and that deepest one, where
/// something is created.
fn directories_verdict(parent: &Path, ids: &Ids, printable: &impl Fn(&[u8]) -> String) -> Verdict {
    if let Some((link, owner)) = link_of_another_user(parent, ids) {
        return Err(Takeover::OwnedLink {
            link: printable(link.as_os_str().as_bytes()),
            owner: Account::user(owner),
        });
    }
    let Some(deepest) = parent.ancestors().find(|dir| dir.is_dir()) else {
        return Ok(None);
    };
    let Ok(created_in) = fs::canonicalize(deepest) else {
        return Ok(None);
    };
    let mut walked: Vec<PathBuf> = Vec::new();
    for spelled in deepest.ancestors() {
        let Ok(real) = fs::canonicalize(spelled) else {
            return Ok(None);
        };
        for dir in real.ancestors() {
            if !walked.iter().any(|seen| seen == dir) {
                walked.push(dir.to_owned());
            }
        }
    }
    // From the root down, so the message names the outermost problem.
    walked.sort_by_key(|dir| dir.as_os_str().len());
    let mut shared = None;
    for dir in &walked {
        let Ok(meta) = fs::metadata(dir) else {
            return Ok(None);
        };
        let shown = || printable(dir.as_os_str().as_bytes());
        if ids.is_other_user(meta.uid()) {
            return Err(Takeover::OwnedDirectory {
                dir: shown(),
                owner: Account::user(meta.uid()),
            });
        }
        let writers = if meta.mode() & 0o002 != 0 {
            Some(Writers::Everyone)
        } else if meta.mode() & 0o020 != 0 && ids.is_other_group(meta.gid()) {
            Some(Writers::Group(Account::group(meta.gid())))
        } else {
            None
        };
        let Some(writers) = writers else {
            continue;
        };
        if meta.mode() & 0o1000 == 0 {
            return Err(Takeover::WritableDirectory {
                dir: shown(),
                writers,
            });
        }
        if *dir == created_in {
            shared = Some(SharedDirectory { dir: shown() });
        }
    }
    Ok(shared)
}

/// The first entry on the way to `dir` that is not a directory (a symlink,
/// also those a symlink leads through, or a file where systemd would make
/// a directory) and belongs to another user. Only the owner of an entry
/// of a sticky directory may replace it, so such an entry is theirs to
/// point anywhere; the directories themselves are judged after this.
fn link_of_another_user(dir: &Path, ids: &Ids) -> Option<(PathBuf, u32)> {
    // Paths to look at, each with its ancestors; symlinks add their
    // targets. Bounded as the kernel bounds a lookup (40 links).
    let mut pending = vec![dir.to_owned()];
    let mut links = 0;
    while let Some(path) = pending.pop() {
        for entry in path.ancestors() {
            let Ok(meta) = fs::symlink_metadata(entry) else {
                continue;
            };
            if meta.is_dir() {
                continue;
            }
            if ids.is_other_user(meta.uid()) {
                return Some((entry.to_owned(), meta.uid()));
            }
            if meta.file_type().is_symlink() && links < 40 {
                links += 1;
                if let (Ok(target), Some(holder)) = (fs::read_link(entry), entry.parent()) {
                    pending.push(holder.join(target));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_shared_when_others_are_in_it() {
        let passwd = "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n\
                      pat:x:1001:100::/home/pat:/bin/sh\n";
        let group = "root:x:0:\nusers:x:100:user,pat\nuser:x:1000:\nqubes:x:98:user\n";
        // A private group: only us.
        assert!(!group_has_others(1000, 1000, passwd, group));
        // A group listing another member, or another user's primary group.
        assert!(group_has_others(1000, 100, passwd, group));
        let group = "users:x:100:user\n";
        assert!(
            group_has_others(1000, 100, passwd, group),
            "pat's primary group"
        );
        let passwd = "user:x:1000:100::/home/user:/bin/sh\n";
        assert!(
            !group_has_others(1000, 100, passwd, group),
            "only us, listed"
        );
        assert!(!group_has_others(1000, 100, "", ""));
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn account_names_come_from_the_account_files() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      # comment\n\
                      mallory:x:2001:2001::/home/mallory:/bin/sh\n\
                      bad\x1bname:x:2002:2002::/:/bin/sh\n";
        assert_eq!(name_in(passwd, 2001).as_deref(), Some("mallory"));
        assert_eq!(name_in(passwd, 0).as_deref(), Some("root"));
        assert_eq!(name_in(passwd, 2002), None);
        assert_eq!(name_in(passwd, 7), None);
        let shown = Account {
            id: 2001,
            name: Some("mallory".into()),
        };
        assert_eq!(shown.to_string(), "2001 (mallory)");
        assert_eq!(Account { id: 7, name: None }.to_string(), "7");
    }

    #[test]
    fn current_ids_are_read() {
        let ids = Ids::current().expect("/proc is mounted");
        let me = fs::metadata("/proc/self").unwrap();
        assert_eq!((ids.uid, ids.gid), (me.uid(), me.gid()));
    }

    /// Modes only (the owners are all us): a directory others can write
    /// is refused unless sticky; a sticky one is a warning only where the
    /// socket or its first missing directory is made.
    #[test]
    fn directories_others_can_write() {
        let base =
            std::env::temp_dir().join(format!("qrexec-connect-owner-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let make = |name: &str, mode: u32| {
            let dir = base.join(name);
            fs::create_dir_all(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
            dir
        };
        make("", 0o755);
        let sticky = make("sticky", 0o1777);
        let open = make("open", 0o777);
        let mine = make("sticky/mine", 0o700);
        let me = fs::metadata(&base).unwrap();
        let mut checker = PathChecker::new(Some(Ids::new(me.uid(), me.gid())));
        let shown = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let mut check = |path: PathBuf| checker.check(&path, None, shown);

        let shared = |dir: &Path| {
            Ok(Some(SharedDirectory {
                dir: dir.display().to_string(),
            }))
        };
        assert_eq!(check(sticky.join("sock")), shared(&sticky));
        assert_eq!(check(sticky.join("new/dirs/sock")), shared(&sticky));
        assert_eq!(check(mine.join("sock")), Ok(None));
        assert_eq!(
            check(open.join("sock")),
            Err(Takeover::WritableDirectory {
                dir: open.display().to_string(),
                writers: Writers::Everyone
            })
        );
        std::os::unix::fs::symlink(&open, mine.join("link")).unwrap();
        assert!(matches!(
            check(mine.join("link/sock")),
            Err(Takeover::WritableDirectory { .. })
        ));
        let _ = fs::remove_dir_all(&base);
    }
}
