//! Moving bytes. One thread per direction; each direction moves data with
//! splice(2) through its own pipe (zero copy between sockets and pipes) and
//! falls back to read/write with a 128 KiB buffer when splice cannot handle
//! an fd (ttys, O_APPEND files, ...). Non-blocking fds inherited from the
//! caller are waited on with poll(2); nothing spins.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const FALLBACK_BUF: usize = 128 * 1024;
const PIPE_SIZE: libc::c_int = 256 * 1024;

/// How a copy ended.
#[derive(Debug)]
pub enum End {
    /// The source reached EOF and everything read was written.
    Eof,
    /// Reading the source failed.
    ReadError(io::Error),
    /// Writing the destination failed; the data read so far is lost.
    WriteError(io::Error),
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Blocks until `fd` is ready for `events` (only needed for O_NONBLOCK fds).
fn wait_ready(fd: RawFd, events: libc::c_short) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// read(2) retrying EINTR and waiting out EAGAIN.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes.
        match cvt(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_ready(fd, libc::POLLIN),
            r => return r,
        }
    }
}

/// write(2) of the whole buffer, retrying EINTR and waiting out EAGAIN.
pub fn write_all_fd(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is valid for buf.len() bytes.
        match cvt(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_ready(fd, libc::POLLOUT),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets: both fds use (or have no) file positions.
    cvt(unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE,
        )
    })
}

fn splice_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// A pipe for splicing, sized up where the kernel lets us.
fn make_pipe() -> Option<(OwnedFd, OwnedFd, usize)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: pipe2 just returned these, nobody else owns them.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own pipe.
    let mut size = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    if size <= 0 {
        // SAFETY: as above.
        size = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
    }
    let size = if size > 0 { size as usize } else { 64 * 1024 };
    Some((r, w, size))
}

/// Copies `src` to `dst` until EOF or an error.
pub fn copy(src: RawFd, dst: RawFd) -> End {
    if let Some((pr, pw, size)) = make_pipe() {
        if let Some(end) = splice_loop(src, dst, pr.as_raw_fd(), pw.as_raw_fd(), size) {
            return end;
        }
        // splice is not usable for these fds; the pipe is empty again.
    }
    let mut buf = vec![0u8; FALLBACK_BUF];
    rw_loop(src, dst, &mut buf)
}

/// Returns `None` when splice is not supported for these fds and the pipe
/// holds no data any more.
fn splice_loop(src: RawFd, dst: RawFd, pr: RawFd, pw: RawFd, size: usize) -> Option<End> {
    loop {
        let n = match splice(src, pw, size) {
            Ok(0) => return Some(End::Eof),
            Ok(n) => n,
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    wait_ready(src, libc::POLLIN);
                    continue;
                }
                _ if splice_unsupported(&e) => return None,
                _ => return Some(End::ReadError(e)),
            },
        };
        let mut left = n;
        while left > 0 {
            match splice(pr, dst, left) {
                Ok(0) => return Some(End::WriteError(io::ErrorKind::WriteZero.into())),
                Ok(m) => left -= m,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => wait_ready(dst, libc::POLLOUT),
                    _ if splice_unsupported(&e) => {
                        // Move what is in the pipe by hand, then stop splicing.
                        let mut buf = vec![0u8; left];
                        if let Err(e) = read_exact_fd(pr, &mut buf) {
                            return Some(End::ReadError(e));
                        }
                        if let Err(e) = write_all_fd(dst, &buf) {
                            return Some(End::WriteError(e));
                        }
                        return None;
                    }
                    _ => return Some(End::WriteError(e)),
                },
            }
        }
    }
}

fn read_exact_fd(fd: RawFd, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = read_fd(fd, buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
    }
    Ok(())
}

fn rw_loop(src: RawFd, dst: RawFd, buf: &mut [u8]) -> End {
    loop {
        let n = match read_fd(src, buf) {
            Ok(0) => return End::Eof,
            Ok(n) => n,
            Err(e) => return End::ReadError(e),
        };
        if let Err(e) = write_all_fd(dst, &buf[..n]) {
            return End::WriteError(e);
        }
    }
}

/// Reads `src` until EOF or an error, dropping the data.
pub fn drain(src: RawFd) -> End {
    let mut buf = vec![0u8; FALLBACK_BUF];
    loop {
        match read_fd(src, &mut buf) {
            Ok(0) => return End::Eof,
            Ok(_) => {}
            Err(e) => return End::ReadError(e),
        }
    }
}

/// shutdown(fd, SHUT_WR), ignoring errors (the peer may be gone already).
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown on an fd we hold; failure is harmless.
    unsafe {
        libc::shutdown(fd, libc::SHUT_WR);
    }
}
