//! `$XDG_RUNTIME_DIR/qrexec-connect/`: where the generator raises the
//! reload flag and the reconcile step keeps what it last applied.
//!
//! One definition for both programs, so they cannot disagree on where the
//! directory is or what makes it trustworthy:
//! * the runtime dir must be an absolute path (systemd's `%t`);
//! * our directory is created 0700, and an existing one must be a real
//!   directory (not a symlink) owned by us; a wider mode is narrowed;
//! * files are created 0600, never through a symlink: a state file is
//!   written to a fresh temporary file (`O_CREAT|O_EXCL`, which refuses any
//!   existing name, symlinks included) and renamed over the old one.
//!
//! Nobody but the user can write in `/run/user/UID`, so these checks guard
//! against accidents and stale leftovers more than against other users; they
//! also keep a planted symlink from redirecting our writes elsewhere.

use std::ffi::OsString;
use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Our directory's name under the runtime dir (`%t/qrexec-connect`).
pub const SUBDIR: &str = "qrexec-connect";
/// The flag the generator raises on every run, outside its output directory
/// on purpose: a `.path` unit with `PathExists=` on it fires after every
/// daemon-reload, which a path in the output directory does not. The path
/// unit spells it `%t/qrexec-connect/reload-requested`.
pub const RELOAD_FLAG: &str = "reload-requested";
/// What the reconcile step last applied.
pub const STATE_FILE: &str = "applied";
/// What the generator's last run wrote, in the state file's format (one
/// INI section per socket unit, `listen=` and `fd_name=`): the reconcile
/// step reads the generated units' settings here instead of asking the
/// manager for each unit, which costs about 3 ms a unit. A unit that a
/// file or drop-in of the user's may change is left out, so the manager is
/// asked about it.
pub const GENERATED_FILE: &str = "generated";
/// The most [`RuntimeDir::read`] reads of a file: ours are a few hundred
/// bytes a binding, so anything bigger is not ours and counts as garbage
/// (a reader must not be made to hold an arbitrary file in memory).
pub const MAX_FILE: u64 = 1 << 20;

/// The one rule for a runtime dir value: an absolute path (systemd refuses
/// a relative one for `%t`, and ours would depend on the working directory).
/// Taken as set, without tidying, as systemd does.
pub fn usable(value: Option<OsString>) -> Option<PathBuf> {
    value.map(PathBuf::from).filter(|path| path.is_absolute())
}

/// Our directory, checked (and created if missing).
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Our directory under `$XDG_RUNTIME_DIR`.
    pub fn from_env() -> io::Result<RuntimeDir> {
        Self::under(None)
    }

    /// Our directory under `runtime_dir` (`%t`), or under `$XDG_RUNTIME_DIR`
    /// when `None`.
    pub fn under(runtime_dir: Option<OsString>) -> io::Result<RuntimeDir> {
        let runtime_dir = usable(runtime_dir.or_else(|| std::env::var_os("XDG_RUNTIME_DIR")))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "XDG_RUNTIME_DIR is not set to an absolute path",
                )
            })?;
        let path = runtime_dir.join(SUBDIR);
        match DirBuilder::new().mode(0o700).create(&path) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(at(&path, e));
            }
            _ => {}
        }
        let meta = std::fs::symlink_metadata(&path).map_err(|e| at(&path, e))?;
        if !meta.file_type().is_dir() {
            return Err(at(&path, io::Error::other("not a directory")));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(at(
                &path,
                io::Error::other(format!("owned by uid {}, not by us ({me})", meta.uid())),
            ));
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| at(&path, e))?;
        }
        Ok(RuntimeDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Raises the reload flag: an empty 0600 file. Anything already at its
    /// name counts as raised (the path unit only asks that it exists).
    pub fn raise_reload_flag(&self) -> io::Result<()> {
        let flag = self.path.join(RELOAD_FLAG);
        if std::fs::symlink_metadata(&flag).is_ok() {
            return Ok(());
        }
        match private_file(&flag) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(at(&flag, e)),
        }
    }

    /// Lowers the reload flag, whatever stands at its name: a file, a
    /// symlink (removed, not followed) or a whole directory tree. Anything
    /// left there would make the path unit start us again and again.
    pub fn clear_reload_flag(&self) -> io::Result<()> {
        let flag = self.path.join(RELOAD_FLAG);
        let result = match std::fs::symlink_metadata(&flag) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => Err(e),
            Ok(meta) if meta.file_type().is_dir() => std::fs::remove_dir_all(&flag),
            Ok(_) => std::fs::remove_file(&flag),
        };
        match result {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at(&flag, e)),
            _ => Ok(()),
        }
    }

    /// Removes one of our files, if it is there.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Reads one of our files; `None` if it is missing, is not a regular
    /// file (a symlink is not followed; a socket cannot be opened), is
    /// bigger than [`MAX_FILE`] or is not text (UTF-8). Each reader then goes on as without the file (nothing
    /// applied yet, no record, mode unknown) and its next write replaces it:
    /// garbage must never stop reloads or recovery (issue 17).
    pub fn read(&self, name: &str) -> io::Result<Option<String>> {
        let path = self.path.join(name);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path);
        let file = match file {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
            Err(e) => return Err(at(&path, e)),
        };
        if !file.metadata()?.file_type().is_file() {
            return Ok(None);
        }
        // One byte past the cap tells a file at the cap from a bigger one,
        // without reading (or holding) more.
        let mut bytes = Vec::new();
        file.take(MAX_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| at(&path, e))?;
        if bytes.len() as u64 > MAX_FILE {
            return Ok(None);
        }
        Ok(String::from_utf8(bytes).ok())
    }

    /// Replaces one of our files with `text`, atomically: readers see the old
    /// or the new content, never a mix, and nothing is written through a
    /// symlink.
    ///
    /// The temporary file's name is this writer's own (`.NAME.PID.N.tmp`):
    /// two writers at once (an old daemon still publishing while the next
    /// one starts, after a reload) each rename their own complete file; a
    /// shared name would let one rename the other's half-written file.
    pub fn write_atomically(&self, name: &str, text: &str) -> io::Result<()> {
        let path = self.path.join(name);
        let (temporary, mut file) = self.temporary_file(name)?;
        let written = file
            .write_all(text.as_bytes())
            .map_err(|e| at(&temporary, e));
        drop(file);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(e);
        }
        let renamed = match std::fs::rename(&temporary, &path) {
            // A directory at the name (left by hand): like the flag, it goes,
            // or every later write would fail the same way.
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                std::fs::remove_dir_all(&path).map_err(|e| at(&path, e))?;
                std::fs::rename(&temporary, &path)
            }
            other => other,
        };
        if renamed.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        renamed.map_err(|e| at(&path, e))
    }

    /// A new private file under a name no other writer uses: the pid and a
    /// count within the process. A name that exists (a leftover of a dead
    /// process whose pid came back, or something planted) is skipped, never
    /// opened or removed.
    fn temporary_file(&self, name: &str) -> io::Result<(PathBuf, std::fs::File)> {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        let mut last = None;
        for _ in 0..16 {
            let n = COUNT.fetch_add(1, Ordering::Relaxed);
            let temporary = self.path.join(format!(".{name}.{pid}.{n}.tmp"));
            match private_file(&temporary) {
                Ok(file) => return Ok((temporary, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(temporary),
                Err(e) => return Err(at(&temporary, e)),
            }
        }
        let temporary = last.unwrap_or_else(|| self.path.join(name));
        Err(at(
            &temporary,
            io::Error::new(io::ErrorKind::AlreadyExists, "16 temporary names taken"),
        ))
    }
}

/// A new file, 0600, that did not exist before (`O_EXCL` also refuses a
/// symlink at that name, dangling or not).
fn private_file(path: &Path) -> io::Result<std::fs::File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Prefixes an error with the path it is about.
fn at(path: &Path, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Scratch {
            let path = std::env::temp_dir().join(format!(
                "qrexec-connect-runtime-dir-{name}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Scratch(path)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_relative_or_missing_runtime_dir_is_refused() {
        let error = RuntimeDir::under(Some("relative/dir".into())).unwrap_err();
        assert!(error.to_string().contains("absolute"), "{error}");
    }

    #[test]
    fn the_directory_is_private_and_a_wide_one_is_narrowed() {
        let scratch = Scratch::new("mode");
        let dir = RuntimeDir::under(Some(scratch.0.clone().into())).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = RuntimeDir::under(Some(scratch.0.clone().into())).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_symlinked_directory_is_refused() {
        let scratch = Scratch::new("symlink");
        std::fs::create_dir(scratch.0.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink("elsewhere", scratch.0.join(SUBDIR)).unwrap();
        let error = RuntimeDir::under(Some(scratch.0.clone().into())).unwrap_err();
        assert!(error.to_string().contains("not a directory"), "{error}");
    }

    #[test]
    fn state_is_written_privately_and_never_through_a_symlink() {
        let scratch = Scratch::new("state");
        let dir = RuntimeDir::under(Some(scratch.0.clone().into())).unwrap();
        let victim = scratch.0.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("applied.tmp")).unwrap();
        dir.write_atomically(STATE_FILE, "new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(dir.read(STATE_FILE).unwrap().as_deref(), Some("new\n"));
        let mode = std::fs::metadata(dir.path().join(STATE_FILE))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A symlink at the state's own name is not read through.
        std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(dir.read(STATE_FILE).unwrap(), None);
    }

    #[test]
    fn garbage_reads_as_no_file_and_is_replaced_by_the_next_write() {
        let scratch = Scratch::new("garbage");
        let dir = RuntimeDir::under(Some(scratch.0.clone().into())).unwrap();
        let path = dir.path().join(STATE_FILE);
        std::fs::write(&path, b"\xff\xfe").unwrap();
        assert_eq!(dir.read(STATE_FILE).unwrap(), None);
        dir.write_atomically(STATE_FILE, "new\n").unwrap();
        assert_eq!(dir.read(STATE_FILE).unwrap().as_deref(), Some("new\n"));

        // Text that is UTF-8 up to a cut in the middle of a character.
        std::fs::write(&path, "caf\u{e9}".as_bytes().split_last().unwrap().1).unwrap();
        assert_eq!(dir.read(STATE_FILE).unwrap(), None);

        // A socket at the name cannot even be opened.
        std::fs::remove_file(&path).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(dir.read(STATE_FILE).unwrap(), None);
        dir.write_atomically(STATE_FILE, "after a socket\n")
            .unwrap();
        assert_eq!(
            dir.read(STATE_FILE).unwrap().as_deref(),
            Some("after a socket\n")
        );

        // A directory tree at the name is not a file, and is replaced.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(path.join("a/b")).unwrap();
        assert_eq!(dir.read(STATE_FILE).unwrap(), None);
        dir.write_atomically(STATE_FILE, "after a directory\n")
            .unwrap();
        assert_eq!(
            dir.read(STATE_FILE).unwrap().as_deref(),
            Some("after a directory\n")
        );
    }

    #[test]
    fn a_file_over_the_cap_reads_as_no_file() {
        let scratch = Scratch::new("cap");
        let dir = RuntimeDir::under(Some(scratch.0.clone().into())).unwrap();
        let path = dir.path().join(STATE_FILE);
        let at_cap = "x".repeat(MAX_FILE as usize);
        std::fs::write(&path, &at_cap).unwrap();
        assert_eq!(
            dir.read(STATE_FILE).unwrap().map(|t| t.len()),
            Some(at_cap.len())
        );
        std::fs::write(&path, at_cap + "x").unwrap();
        let read = dir.read(STATE_FILE).unwrap();
        assert!(read.is_none(), "{:?} bytes read", read.map(|t| t.len()));
    }

    #[test]
    fn writers_never_share_a_temporary_file() {
        let scratch = Scratch::new("writers");
        let dir = RuntimeDir::under(Some(scratch.0.clone().into())).unwrap();
        // What the old, shared name would have been, held half-written by
        // another writer: untouched, and not renamed over the file.
        let others = dir.path().join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&others, "half").unwrap();
        dir.write_atomically(STATE_FILE, "mine\n").unwrap();
        assert_eq!(dir.read(STATE_FILE).unwrap().as_deref(), Some("mine\n"));
        assert_eq!(std::fs::read_to_string(&others).unwrap(), "half");
        // Nothing of this writer's is left behind.
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        left.sort();
        assert_eq!(left, [dir.path().join(STATE_FILE), others]);
        // Two writes in one process get two names too.
        let (first, _file) = dir.temporary_file(STATE_FILE).unwrap();
        let (second, _file) = dir.temporary_file(STATE_FILE).unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn the_flag_is_cleared_whatever_stands_there() {
        let scratch = Scratch::new("flag");
        let dir = RuntimeDir::under(Some(scratch.0.clone().into())).unwrap();
        let flag = dir.path().join(RELOAD_FLAG);
        dir.raise_reload_flag().unwrap();
        assert_eq!(std::fs::metadata(&flag).unwrap().mode() & 0o777, 0o600);
        dir.clear_reload_flag().unwrap();
        assert!(!flag.exists());
        std::fs::create_dir_all(flag.join("a/b")).unwrap();
        dir.raise_reload_flag().unwrap();
        dir.clear_reload_flag().unwrap();
        assert!(std::fs::symlink_metadata(&flag).is_err());
        dir.clear_reload_flag().unwrap();
    }
}
