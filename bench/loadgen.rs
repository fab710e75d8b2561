//! `loadgen`: the load tool of `make bench` (see bench/README.md).
//!
//! One compiled program plays every part that is not a contender, so that
//! the same code drives every contender and never dominates the figures:
//!
//! * `serve`: the echo/sink/source server behind every contender (the
//!   qrexec-client-vm double connects to it through `qubes.ConnectTCP+PORT`).
//! * `rtt`, `up`, `down`, `hold`, `rate`, `burst`: the measurements.
//! * `rss`, `drain`, `wait-listen`: helpers the script needs between them.
//! * `report`: turns the raw results into the markdown tables.
//!
//! Wire protocol (first byte of a connection):
//! * `U` + u64 (big endian) length: the server answers `R`, reads `length`
//!   bytes into a sink, answers the count as a u64, then waits for EOF.
//! * `D` + u64 length: the server answers `R`, waits for one byte `G`, sends
//!   `length` bytes, then waits for EOF.
//! * any other byte: echo, starting with that byte, until EOF.
//!
//! The `R`/`G` handshakes let the measurement start only once the whole
//! chain (forwarder, double, server) is up, and the closing EOF lets the
//! forwarder's processes be read from /proc while they are still alive.
//!
//! Forwarder accounting (`--fwd PID --exclude PATH [--also-comm NAME]`): the
//! forwarder is the process PID and all its descendants, except any process
//! whose executable is PATH (the qrexec-client-vm double) and the
//! descendants of such a process, plus any process named NAME (qrexec-connect
//! forks its pipe-mode splicers away from the daemon). CPU is utime+stime from /proc/PID/stat (all threads, including
//! ended ones; a process that starts during a measurement counts in full),
//! memory is VmRSS from /proc/PID/status and Pss from smaps_rollup. `up` and
//! `down` also report the doubles' CPU, so that the whole chain's cost can be
//! compared between designs that split the work differently.
//!
//! Every socket has a 30 s send/receive timeout (10 s for connect), every
//! loop is bounded, `serve` exits by itself after `--lifetime` seconds.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// A connect waiting in a full backlog is retried by the kernel after 1, 3
/// and 7 s; past this it counts as a failed connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const BULK_BUF: usize = 256 * 1024;
const SERVER_STACK: usize = 128 * 1024;
const CLIENT_STACK: usize = 256 * 1024;

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let opts = match Opts::parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match command.as_str() {
        "serve" => serve(&opts),
        "wait-listen" => wait_listen(&opts),
        "wait-answer" => wait_answer(&opts),
        "rtt" => rtt(&opts),
        "up" => bulk(&opts, true),
        "down" => bulk(&opts, false),
        "rss" => rss(&opts),
        "hold" => hold(&opts),
        "drain" => drain_cmd(&opts),
        "rate" => rate(&opts),
        "burst" => burst(&opts),
        "percentiles" => percentiles(&opts),
        "report" => report(&opts),
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen {command}: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "\
usage: loadgen COMMAND [--key=value ...]
  serve --port=P [--lifetime=SECS]        echo/sink/source server
  wait-listen --port=P [--timeout=SECS]   wait until 127.0.0.1:P listens (without connecting)
  wait-answer --port=P [--timeout=SECS]   wait until a connection to 127.0.0.1:P echoes a byte
  rtt --port=P --count=N [--out=FILE] [--cpu-of=PID]
                                          N sequential connect + 1-byte round trips
                                          (--out: append each latency in µs to FILE;
                                          --cpu-of: CPU time of PID per connection)
  percentiles --file=FILE                 p50/p99 of the latencies in FILE
  up|down --port=P --bytes=N [--fwd=PID --exclude=PATH]   one bulk transfer
  rss --fwd=PID --exclude=PATH            the forwarder's memory now
  hold --port=P --count=N [--fwd=PID --exclude=PATH]      N live connections, memory
  drain --fwd=PID --exclude=PATH [--timeout=SECS]         wait until no PATH process is left
  rate --port=P --concurrency=C --seconds=S               sustained connections per second
  burst --port=P --count=N                N simultaneous connections
  report --raw=FILE --floor=NAME --order=A,B,...  markdown tables from raw results
Measurements print key=value lines on stdout.";

#[derive(Default)]
struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Res<Opts> {
        let mut map = HashMap::new();
        for a in args {
            let Some(kv) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}"));
            };
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            map.insert(k.to_owned(), v.to_owned());
        }
        Ok(Opts(map))
    }
    fn str(&self, key: &str) -> Res<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| format!("--{key}= is required"))
    }
    fn opt(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn num<T: std::str::FromStr>(&self, key: &str, default: Option<T>) -> Res<T> {
        match self.0.get(key) {
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{key}: not a number: {v:?}")),
            None => default.ok_or_else(|| format!("--{key}= is required")),
        }
    }
    fn forwarder(&self) -> Res<Option<Forwarder>> {
        match (self.opt("fwd"), self.opt("exclude")) {
            (None, _) => Ok(None),
            (Some(pid), Some(exclude)) => Ok(Some(Forwarder {
                root: pid.parse().map_err(|_| format!("--fwd: bad pid {pid:?}"))?,
                exclude: std::fs::canonicalize(exclude)
                    .map_err(|e| format!("--exclude {exclude}: {e}"))?,
                also_comm: self.opt("also-comm").map(str::to_owned),
            })),
            (Some(_), None) => Err("--fwd needs --exclude".into()),
        }
    }
}

// ---------------------------------------------------------------- sockets

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn loopback(port: u16) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    sa
}

fn set_timeout(fd: RawFd, option: libc::c_int, limit: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: limit.as_secs() as libc::time_t,
        tv_usec: limit.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: tv is a valid timeval of the given size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A blocking connect to 127.0.0.1:port, bounded by SO_SNDTIMEO (which
/// bounds connect(2) too), then 30 s send/receive timeouts.
fn connect(port: u16) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2).
    let fd =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just created and is owned by nobody else.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    set_timeout(fd, libc::SO_SNDTIMEO, CONNECT_TIMEOUT)?;
    let sa = loopback(port);
    loop {
        // SAFETY: sa is a valid sockaddr_in of the given size.
        let r = unsafe {
            libc::connect(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r == 0 {
            set_timeout(fd, libc::SO_SNDTIMEO, IO_TIMEOUT)?;
            set_timeout(fd, libc::SO_RCVTIMEO, IO_TIMEOUT)?;
            return Ok(stream);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Connect, send one byte, wait for its echo. Returns the stream (open).
fn round_trip(port: u16) -> io::Result<TcpStream> {
    let mut s = connect(port)?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    if b[0] != b'x' {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "wrong echo"));
    }
    Ok(s)
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// The p-th percentile (nearest rank) of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ----------------------------------------------------------------- server

fn serve(opts: &Opts) -> Res<()> {
    let port: u16 = opts.num("port", None)?;
    let lifetime: u64 = opts.num("lifetime", Some(3600))?;
    // SAFETY: plain socket(2).
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })
        .map_err(|e| format!("socket: {e}"))?;
    // SAFETY: fd is ours.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let sa = loopback(port);
    // SAFETY: valid option value and address of the given sizes.
    unsafe {
        cvt(libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ))
        .map_err(|e| format!("SO_REUSEADDR: {e}"))?;
        cvt(libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ))
        .map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))?;
        // A deep backlog: bursts of connections from the doubles must not
        // be limited by the server.
        cvt(libc::listen(fd, 4096)).map_err(|e| format!("listen: {e}"))?;
    }
    thread::spawn(move || {
        thread::sleep(Duration::from_secs(lifetime));
        eprintln!("loadgen serve: lifetime of {lifetime} s is over, exiting");
        std::process::exit(0);
    });
    let mut failures = 0u32;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                failures = 0;
                let spawned = thread::Builder::new()
                    .stack_size(SERVER_STACK)
                    .spawn(move || {
                        let _ = handle(stream);
                    });
                if let Err(e) = spawned {
                    eprintln!("loadgen serve: cannot start a thread: {e}");
                }
            }
            Err(e) => {
                failures += 1;
                eprintln!("loadgen serve: accept: {e}");
                if failures > 1000 {
                    return Err("accept keeps failing".into());
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn read_u64(s: &mut TcpStream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_to_eof(s: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

fn handle(mut s: TcpStream) -> io::Result<()> {
    // Connections of the `hold` test stay idle while memory is read.
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut first = [0u8; 1];
    if s.read(&mut first)? == 0 {
        return Ok(());
    }
    match first[0] {
        b'U' => {
            let len = read_u64(&mut s)?;
            s.write_all(b"R")?;
            let mut buf = vec![0u8; BULK_BUF];
            let mut got = 0u64;
            while got < len {
                let want = (len - got).min(BULK_BUF as u64) as usize;
                let n = s.read(&mut buf[..want])?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            s.write_all(&got.to_be_bytes())?;
            read_to_eof(&mut s)
        }
        b'D' => {
            let len = read_u64(&mut s)?;
            s.write_all(b"R")?;
            let mut go = [0u8; 1];
            s.read_exact(&mut go)?;
            let buf = vec![0x5au8; BULK_BUF];
            let mut sent = 0u64;
            while sent < len {
                let n = (len - sent).min(BULK_BUF as u64) as usize;
                s.write_all(&buf[..n])?;
                sent += n as u64;
            }
            read_to_eof(&mut s)
        }
        b => {
            s.write_all(&[b])?;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n])?;
            }
        }
    }
}

// ------------------------------------------------------------ wait-listen

/// Is 127.0.0.1:port (or 0.0.0.0:port) in LISTEN state? Read from
/// /proc/net/tcp so that no connection is made (one would activate the
/// forwarder).
fn listening(port: u16) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let want = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    text.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace();
        let (local, state) = (f.nth(1), f.nth(1));
        state == Some("0A") && local.is_some_and(|l| want.iter().any(|w| w == l))
    })
}

fn wait_listen(opts: &Opts) -> Res<()> {
    let port: u16 = opts.num("port", None)?;
    let timeout: f64 = opts.num("timeout", Some(10.0))?;
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    while !listening(port) {
        if Instant::now() > deadline {
            return Err(format!(
                "nothing listens on 127.0.0.1:{port} after {timeout} s"
            ));
        }
        thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Polls every 2 ms: a binding that is not there yet refuses at once (the
/// namespace's loopback), one that is answers through the whole chain.
fn wait_answer(opts: &Opts) -> Res<()> {
    let port: u16 = opts.num("port", None)?;
    let timeout: f64 = opts.num("timeout", Some(10.0))?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(timeout);
    let mut last_error = String::new();
    while Instant::now() < deadline {
        match round_trip(port) {
            Ok(_) => {
                println!("waited_ms={:.1}", t0.elapsed().as_secs_f64() * 1e3);
                return Ok(());
            }
            Err(e) => last_error = e.to_string(),
        }
        thread::sleep(Duration::from_millis(2));
    }
    Err(format!(
        "127.0.0.1:{port} did not answer within {timeout} s (last: {last_error})"
    ))
}

// -------------------------------------------------------------------- rtt

fn rtt(opts: &Opts) -> Res<()> {
    let port: u16 = opts.num("port", None)?;
    let count: usize = opts.num("count", None)?;
    let cpu_of: Option<i32> = match opts.opt("cpu-of") {
        Some(_) => Some(opts.num("cpu-of", None)?),
        None => None,
    };
    let mut lat = Vec::with_capacity(count);
    let mut errors = 0usize;
    let mut first_error = None;
    let cpu_before = cpu_of.map(on_cpu_ns).transpose()?;
    let started = Instant::now();
    for _ in 0..count {
        let t0 = Instant::now();
        match round_trip(port) {
            Ok(s) => {
                lat.push(micros(t0.elapsed()));
                drop(s);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let total = started.elapsed();
    if let (Some(pid), Some(before)) = (cpu_of, cpu_before) {
        let used = on_cpu_ns(pid)?.saturating_sub(before);
        let served = lat.len().max(1) as f64;
        println!("cpu_us_per_conn={:.1}", used as f64 / 1e3 / served);
    }
    if let Some(path) = opts.opt("out") {
        let mut text = String::new();
        for v in &lat {
            text += &format!("{v}\n");
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| format!("{path}: {e}"))?;
    }
    lat.sort_unstable();
    println!("n={}", lat.len());
    println!("errors={errors}");
    if let Some(e) = first_error {
        eprintln!("loadgen rtt: first error: {e}");
    }
    if lat.is_empty() {
        return Err("no round trip succeeded".into());
    }
    println!("p50_us={}", percentile(&lat, 50.0));
    println!("p99_us={}", percentile(&lat, 99.0));
    println!("min_us={}", lat[0]);
    println!("max_us={}", lat[lat.len() - 1]);
    println!("total_s={:.3}", total.as_secs_f64());
    Ok(())
}

fn percentiles(opts: &Opts) -> Res<()> {
    let path = opts.str("file")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut lat: Vec<u64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    if lat.is_empty() {
        return Err(format!("{path}: no latencies"));
    }
    lat.sort_unstable();
    println!("n={}", lat.len());
    println!("p50_us={}", percentile(&lat, 50.0));
    println!("p99_us={}", percentile(&lat, 99.0));
    Ok(())
}

// ------------------------------------------------------- process accounting

/// Nanoseconds on a CPU of every live thread of PID, from
/// /proc/PID/task/*/schedstat: nanosecond resolution where /proc/PID/stat
/// counts 10 ms ticks, which a per-connection cost of ~100 µs needs. The
/// forwarders measured with it are single-threaded (or keep their threads).
fn on_cpu_ns(pid: i32) -> Res<u64> {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let path = task.path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(&path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

struct Forwarder {
    root: i32,
    exclude: PathBuf,
    /// Processes of the forwarder that are not its descendants, by name:
    /// qrexec-connect's pipe mode forks its splicers away from the daemon.
    also_comm: Option<String>,
}

/// Parent of every process, from /proc/PID/stat.
fn parents() -> HashMap<i32, Vec<i32>> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return children;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(fields) = stat_fields(pid) {
            if let Some(ppid) = fields.get(1).and_then(|p| p.parse::<i32>().ok()) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    children
}

/// Fields of /proc/PID/stat after the command name: [state, ppid, ...].
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

fn is_excluded(pid: i32, exclude: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == exclude)
}

impl Forwarder {
    /// (forwarder processes, excluded processes (doubles) directly under them).
    fn processes(&self) -> (Vec<i32>, Vec<i32>) {
        let children = parents();
        let mut mine = vec![self.root];
        let mut excluded = Vec::new();
        let mut todo = vec![self.root];
        while let Some(pid) = todo.pop() {
            for &child in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
                if is_excluded(child, &self.exclude) {
                    excluded.push(child);
                } else {
                    mine.push(child);
                    todo.push(child);
                }
            }
        }
        if let Some(name) = &self.also_comm {
            for pid in children.values().flatten() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim_end() == name && !mine.contains(pid) {
                    mine.push(*pid);
                }
            }
        }
        (mine, excluded)
    }

    /// utime+stime in clock ticks of each forwarder process, and of each
    /// double under it.
    fn cpu(&self) -> (HashMap<i32, u64>, HashMap<i32, u64>) {
        let (mine, doubles) = self.processes();
        (ticks_of(mine), ticks_of(doubles))
    }

    fn memory(&self) -> Memory {
        let (pids, excluded) = self.processes();
        let mut m = Memory {
            procs: pids.len(),
            excluded: excluded.len(),
            ..Memory::default()
        };
        for pid in pids {
            let rss = status_kib(pid, "VmRSS:").unwrap_or(0);
            let pss = rollup_kib(pid, "Pss:").unwrap_or(0);
            if pid == self.root {
                m.root_rss_kib = rss;
                m.root_pss_kib = pss;
            }
            m.rss_kib += rss;
            m.pss_kib += pss;
        }
        m
    }
}

fn ticks_of(pids: Vec<i32>) -> HashMap<i32, u64> {
    pids.into_iter()
        .filter_map(|pid| {
            let f = stat_fields(pid)?;
            // After the name: state=0, ppid=1, ... utime=11, stime=12.
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some((pid, ticks))
        })
        .collect()
}

#[derive(Default)]
struct Memory {
    procs: usize,
    excluded: usize,
    root_rss_kib: u64,
    root_pss_kib: u64,
    rss_kib: u64,
    pss_kib: u64,
}

impl Memory {
    fn print(&self, prefix: &str) {
        println!("{prefix}procs={}", self.procs);
        println!("{prefix}live_doubles={}", self.excluded);
        println!("{prefix}root_rss_kib={}", self.root_rss_kib);
        println!("{prefix}root_pss_kib={}", self.root_pss_kib);
        println!("{prefix}rss_kib={}", self.rss_kib);
        println!("{prefix}pss_kib={}", self.pss_kib);
    }
}

fn kib_line(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn status_kib(pid: i32, key: &str) -> Option<u64> {
    kib_line(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        key,
    )
}

fn rollup_kib(pid: i32, key: &str) -> Option<u64> {
    kib_line(
        &std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?,
        key,
    )
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn cpu_seconds(before: &HashMap<i32, u64>, after: &HashMap<i32, u64>) -> f64 {
    let ticks: u64 = after
        .iter()
        .map(|(pid, &t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum();
    ticks as f64 / clock_ticks()
}

/// Waits until no excluded process (double) is left under the forwarder.
fn drain(fwd: &Forwarder, timeout: Duration) -> Res<Duration> {
    let t0 = Instant::now();
    loop {
        let left = fwd.processes().1.len();
        if left == 0 {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return Err(format!("{left} double(s) still running after {timeout:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn drain_cmd(opts: &Opts) -> Res<()> {
    let fwd = opts.forwarder()?.ok_or("--fwd= is required")?;
    let timeout: f64 = opts.num("timeout", Some(60.0))?;
    let took = drain(&fwd, Duration::from_secs_f64(timeout))?;
    println!("drain_s={:.3}", took.as_secs_f64());
    Ok(())
}

fn rss(opts: &Opts) -> Res<()> {
    let fwd = opts.forwarder()?.ok_or("--fwd= is required")?;
    fwd.memory().print("");
    Ok(())
}

// ------------------------------------------------------------------- bulk

fn io_err(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// One bulk transfer of `--bytes` through the contender: upload to the
/// sink (`up`) or download from the source (`down`).
fn bulk(opts: &Opts, upload: bool) -> Res<()> {
    let port: u16 = opts.num("port", None)?;
    let bytes: u64 = opts.num("bytes", None)?;
    let fwd = opts.forwarder()?;
    let mut s = connect(port).map_err(io_err("connect"))?;
    let mut header = vec![if upload { b'U' } else { b'D' }];
    header.extend_from_slice(&bytes.to_be_bytes());
    s.write_all(&header).map_err(io_err("header"))?;
    let mut ready = [0u8; 1];
    s.read_exact(&mut ready)
        .map_err(io_err("waiting for the server"))?;
    // The whole chain is up: take the forwarder's CPU now.
    let before = fwd.as_ref().map(Forwarder::cpu).unwrap_or_default();
    let t0 = Instant::now();
    if upload {
        let buf = vec![0xa5u8; BULK_BUF];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(BULK_BUF as u64) as usize;
            s.write_all(&buf[..n]).map_err(io_err("sending"))?;
            sent += n as u64;
        }
        let got = read_u64(&mut s).map_err(io_err("reading the sink's count"))?;
        if got != bytes {
            return Err(format!("the sink got {got} bytes of {bytes}"));
        }
    } else {
        s.write_all(b"G").map_err(io_err("go"))?;
        let mut buf = vec![0u8; BULK_BUF];
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).map_err(io_err("receiving"))?;
            if n == 0 {
                return Err(format!("EOF after {got} bytes of {bytes}"));
            }
            got += n as u64;
        }
    }
    let took = t0.elapsed();
    // Still connected: every process of the chain is alive and counted.
    let after = fwd.as_ref().map(Forwarder::cpu).unwrap_or_default();
    let _ = s.shutdown(Shutdown::Write);
    let _ = read_to_eof(&mut s);
    drop(s);
    let secs = took.as_secs_f64();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!("secs={secs:.4}");
    println!("mib_s={:.1}", bytes as f64 / (1u64 << 20) as f64 / secs);
    if fwd.is_some() {
        let cpu = cpu_seconds(&before.0, &after.0);
        let double = cpu_seconds(&before.1, &after.1);
        println!("fwd_cpu_s={cpu:.3}");
        println!("fwd_cpu_s_per_gib={:.4}", cpu / gib);
        println!("fwd_procs={}", after.0.len());
        println!("double_cpu_s_per_gib={:.4}", double / gib);
        println!("chain_cpu_s_per_gib={:.4}", (cpu + double) / gib);
    }
    Ok(())
}

// ------------------------------------------------------------------- hold

fn hold(opts: &Opts) -> Res<()> {
    let port: u16 = opts.num("port", None)?;
    let count: usize = opts.num("count", None)?;
    let fwd = opts.forwarder()?;
    let t0 = Instant::now();
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        match round_trip(port) {
            Ok(s) => streams.push(s),
            Err(e) => return Err(format!("connection {i} of {count}: {e}")),
        }
    }
    println!("open_s={:.3}", t0.elapsed().as_secs_f64());
    println!("held={}", streams.len());
    if let Some(fwd) = &fwd {
        // Every connection has answered, so every process exists; give the
        // forwarders a moment to settle, then read their memory.
        thread::sleep(Duration::from_millis(500));
        fwd.memory().print("");
    }
    drop(streams);
    if let Some(fwd) = &fwd {
        let took = drain(fwd, Duration::from_secs(120))?;
        println!("drain_s={:.3}", took.as_secs_f64());
    }
    Ok(())
}

// ------------------------------------------------------------ rate, burst

fn rate(opts: &Opts) -> Res<()> {
    let port: u16 = opts.num("port", None)?;
    let concurrency: usize = opts.num("concurrency", Some(50))?;
    let seconds: f64 = opts.num("seconds", Some(10.0))?;
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let start = Arc::new(Barrier::new(concurrency + 1));
    let mut threads = Vec::new();
    for _ in 0..concurrency {
        let (errors, start) = (errors.clone(), start.clone());
        let first_error = first_error.clone();
        let t = thread::Builder::new()
            .stack_size(CLIENT_STACK)
            .spawn(move || {
                start.wait();
                let deadline = Instant::now() + Duration::from_secs_f64(seconds);
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    match round_trip(port) {
                        Ok(s) => {
                            lat.push(micros(t0.elapsed()));
                            drop(s);
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut first) = first_error.lock() {
                                first.get_or_insert_with(|| e.to_string());
                            }
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                lat
            })
            .map_err(|e| format!("thread: {e}"))?;
        threads.push(t);
    }
    start.wait();
    let t0 = Instant::now();
    let mut lat: Vec<u64> = Vec::new();
    for t in threads {
        lat.extend(t.join().map_err(|_| "a client thread panicked")?);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    if let Some(e) = first_error.lock().ok().and_then(|mut f| f.take()) {
        eprintln!("loadgen rate: first error: {e}");
    }
    println!("conns={}", lat.len());
    println!("errors={}", errors.load(Ordering::Relaxed));
    println!("elapsed_s={elapsed:.3}");
    println!("per_s={:.1}", lat.len() as f64 / elapsed);
    println!("p50_us={}", percentile(&lat, 50.0));
    println!("p99_us={}", percentile(&lat, 99.0));
    Ok(())
}

fn burst(opts: &Opts) -> Res<()> {
    let port: u16 = opts.num("port", None)?;
    let count: usize = opts.num("count", Some(200))?;
    let start = Arc::new(Barrier::new(count + 1));
    let mut threads = Vec::new();
    for _ in 0..count {
        let start = start.clone();
        let t = thread::Builder::new()
            .stack_size(CLIENT_STACK)
            .spawn(move || {
                start.wait();
                let r = round_trip(port).map(|s| (Instant::now(), s));
                // Keep the connection until every thread is done, so that
                // the burst really is `count` live connections.
                r.map(|(t, s)| (t, Some(s)))
            })
            .map_err(|e| format!("thread: {e}"))?;
        threads.push(t);
    }
    // Let every thread reach the barrier before the clock starts.
    thread::sleep(Duration::from_millis(200));
    start.wait();
    let t0 = Instant::now();
    let mut last = t0;
    let mut errors = 0;
    let mut first_error = None;
    let mut lat = Vec::new();
    let mut streams = Vec::new();
    for t in threads {
        match t.join().map_err(|_| "a client thread panicked")? {
            Ok((done, s)) => {
                last = last.max(done);
                lat.push(micros(done.duration_since(t0)));
                streams.extend(s);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    drop(streams);
    lat.sort_unstable();
    if let Some(e) = first_error {
        eprintln!("loadgen burst: first error: {e}");
    }
    println!("served={}", lat.len());
    println!("errors={errors}");
    println!(
        "all_ms={:.2}",
        last.duration_since(t0).as_secs_f64() * 1000.0
    );
    println!("p50_ms={:.2}", percentile(&lat, 50.0) as f64 / 1000.0);
    Ok(())
}

// ----------------------------------------------------------------- report

/// One column of the report: the raw metric, its heading, a scale applied
/// to the raw values, the number of decimals, and whether a cell compares
/// with the floor as a difference (`+X`, for start-up costs) rather than a
/// ratio.
struct Column {
    metric: &'static str,
    heading: &'static str,
    scale: f64,
    decimals: usize,
    difference: bool,
}

const LATENCY: &[Column] = &[
    Column {
        metric: "warm_p50_us",
        heading: "warm p50 ms",
        scale: 1e-3,
        decimals: 2,
        difference: false,
    },
    Column {
        metric: "warm_p99_us",
        heading: "warm p99 ms",
        scale: 1e-3,
        decimals: 2,
        difference: false,
    },
    Column {
        metric: "cold_us",
        heading: "cold first conn ms",
        scale: 1e-3,
        decimals: 1,
        difference: true,
    },
    Column {
        metric: "cpu_us_per_conn",
        heading: "daemon CPU µs/conn",
        scale: 1.0,
        decimals: 0,
        difference: false,
    },
    Column {
        metric: "rate_per_s",
        heading: "conn/s, 50 concurrent",
        scale: 1.0,
        decimals: 0,
        difference: false,
    },
    Column {
        metric: "burst_ms",
        heading: "burst: all served ms",
        scale: 1.0,
        decimals: 0,
        difference: false,
    },
];

const RESOURCES: &[Column] = &[
    Column {
        metric: "up_mib_s",
        heading: "upload MiB/s",
        scale: 1.0,
        decimals: 0,
        difference: false,
    },
    Column {
        metric: "down_mib_s",
        heading: "download MiB/s",
        scale: 1.0,
        decimals: 0,
        difference: false,
    },
    Column {
        metric: "idle_rss_kib",
        heading: "fwd RSS idle MiB",
        scale: 1.0 / 1024.0,
        decimals: 2,
        difference: false,
    },
    Column {
        metric: "root_rss1000_kib",
        heading: "main process RSS @{HOLD} live MiB",
        scale: 1.0 / 1024.0,
        decimals: 2,
        difference: false,
    },
    Column {
        metric: "rss1000_kib",
        heading: "fwd RSS @{HOLD} live MiB (sum)",
        scale: 1.0 / 1024.0,
        decimals: 1,
        difference: false,
    },
    Column {
        metric: "pss1000_kib",
        heading: "fwd PSS @{HOLD} live MiB",
        scale: 1.0 / 1024.0,
        decimals: 1,
        difference: false,
    },
    Column {
        metric: "child_pss_per_conn_kib",
        heading: "PSS per conn besides the main process KiB",
        scale: 1.0,
        decimals: 1,
        difference: false,
    },
];

const CPU: &[Column] = &[
    Column {
        metric: "up_cpu_s_per_gib",
        heading: "forwarder s/GiB up",
        scale: 1.0,
        decimals: 3,
        difference: false,
    },
    Column {
        metric: "down_cpu_s_per_gib",
        heading: "forwarder s/GiB down",
        scale: 1.0,
        decimals: 3,
        difference: false,
    },
    Column {
        metric: "up_chain_cpu_s_per_gib",
        heading: "forwarder + double s/GiB up",
        scale: 1.0,
        decimals: 3,
        difference: false,
    },
    Column {
        metric: "down_chain_cpu_s_per_gib",
        heading: "forwarder + double s/GiB down",
        scale: 1.0,
        decimals: 3,
        difference: false,
    },
];

struct Stats {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

type Raw = BTreeMap<(String, String), Vec<f64>>;

fn read_raw(path: &str) -> Res<Raw> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut raw: Raw = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 4 || line.starts_with('#') {
            continue;
        }
        if let Ok(v) = f[3].parse::<f64>() {
            raw.entry((f[1].to_owned(), f[2].to_owned()))
                .or_default()
                .push(v);
        }
    }
    Ok(raw)
}

fn get<'a>(raw: &'a Raw, contender: &str, metric: &str) -> &'a [f64] {
    raw.get(&(contender.to_owned(), metric.to_owned()))
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn fmt(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

fn table(raw: &Raw, order: &[&str], floor: &str, columns: &[Column], hold: &str) -> String {
    let mut out = String::from("| contender |");
    for c in columns {
        out += &format!(" {} |", c.heading.replace("{HOLD}", hold));
    }
    out += "\n|---|";
    for _ in columns {
        out += "---|";
    }
    out += "\n";
    for contender in order {
        out += &format!("| {contender} |");
        for c in columns {
            let cell = match stats(get(raw, contender, c.metric)) {
                None => "n/a".to_owned(),
                Some(s) => {
                    let mut cell = fmt(s.median * c.scale, c.decimals);
                    if s.n > 1 {
                        cell += &format!(
                            " ({}–{})",
                            fmt(s.min * c.scale, c.decimals),
                            fmt(s.max * c.scale, c.decimals)
                        );
                    }
                    let floor_median = stats(get(raw, floor, c.metric)).map(|f| f.median);
                    match floor_median {
                        Some(f) if c.difference && *contender != floor => {
                            cell += &format!(" {:+.1}", (s.median - f) * c.scale)
                        }
                        Some(f) if f > 0.0 && *contender != floor => {
                            cell += &format!(" ×{:.2}", s.median / f)
                        }
                        _ => {}
                    }
                    cell
                }
            };
            out += &format!(" {cell} |");
        }
        out += "\n";
    }
    out
}

fn median_of(raw: &Raw, contender: &str, metric: &str) -> Option<f64> {
    stats(get(raw, contender, metric)).map(|s| s.median)
}

/// Issue 19's targets, checked on the medians. A ratio whose two ranges
/// (min–max) overlap is marked: on this machine such a verdict is noise.
/// The pipe mode (clients older than qrexec 4.2.19, end of life) has no
/// cost target: its figures are listed as information.
fn targets(raw: &Raw, floor: &str, daemons: &[(&str, bool)], hold: &str) -> String {
    let mut out = String::from("| contender | target | figure | met |\n|---|---|---|---|\n");
    let mut row = |who: &str, target: &str, figure: String, met: Option<bool>, overlap: bool| {
        let verdict = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let note = if overlap && met.is_some() {
            " (ranges overlap: within noise)"
        } else {
            ""
        };
        out += &format!("| {who} | {target} | {figure} | {verdict}{note} |\n");
    };
    let hold_n: f64 = hold.parse().unwrap_or(1000.0);
    for &(d, pipe) in daemons {
        if get(raw, d, "warm_p50_us").is_empty() {
            continue;
        }
        // A verdict for the stdin-socket mode; information for the pipe mode.
        let judge = |met: bool| (!pipe).then_some(met);
        let info = |label: &str| {
            if pipe {
                format!("(info) {label}")
            } else {
                label.to_owned()
            }
        };
        // (median, floor median, ratio, do the min–max ranges overlap?)
        let ratio_of = |who: &str, metric: &str| -> Option<(f64, f64, f64, bool)> {
            let v = stats(get(raw, who, metric))?;
            let f = stats(get(raw, floor, metric))?;
            let overlap = v.min <= f.max && f.min <= v.max;
            (f.median > 0.0).then_some((v.median, f.median, v.median / f.median, overlap))
        };
        let ratio = |metric: &str| ratio_of(d, metric);
        for (metric, label) in [("up_mib_s", "upload"), ("down_mib_s", "download")] {
            if let Some((v, f, r, o)) = ratio(metric) {
                row(
                    d,
                    &info(&format!("{label} throughput ≥ 0.97× floor")),
                    format!("{v:.0} vs {f:.0} MiB/s = ×{r:.3}"),
                    judge(r >= 0.97),
                    o,
                );
            }
        }
        let cpu = ["up_cpu_s_per_gib", "down_cpu_s_per_gib"]
            .iter()
            .filter_map(|m| median_of(raw, d, m))
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
        if let Some(c) = cpu {
            let what = if pipe {
                "(info) CPU s/GiB (daemon + splicers, worse direction)"
            } else {
                "CPU ~0 s/GiB (≤ 0.01 = one clock tick, worse direction)"
            };
            row(d, what, format!("{c:.3} s/GiB"), judge(c <= 0.01), false);
        }
        for (metric, label) in [("warm_p50_us", "warm p50"), ("warm_p99_us", "warm p99")] {
            if let Some((v, f, r, o)) = ratio(metric) {
                row(
                    d,
                    &info(&format!("{label} ≤ 1.05× floor")),
                    format!("{:.2} vs {:.2} ms = ×{r:.2}", v / 1e3, f / 1e3),
                    judge(r <= 1.05),
                    o,
                );
            }
        }
        // Cold: with a runtime directory (the mode remembered after the
        // first start) and, as `D-nodir`, without one (every start probes).
        let nodir = format!("{d}-nodir");
        for (who, label) in [
            (d, "cold first connection"),
            (nodir.as_str(), "cold, no runtime dir"),
        ] {
            if let Some((v, f, _, o)) = ratio_of(who, "cold_us") {
                let diff = (v - f) / 1e3;
                row(
                    d,
                    &info(&format!("{label} ≤ floor + 0.5 ms")),
                    format!("{:.1} vs {:.1} ms = {diff:+.1} ms", v / 1e3, f / 1e3),
                    judge(diff <= 0.5),
                    o,
                );
            }
        }
        if let Some((v, f, r, o)) = ratio("cpu_us_per_conn") {
            row(
                d,
                &info("daemon CPU per connection ≤ 1.2× floor"),
                format!("{v:.0} vs {f:.0} µs = ×{r:.2}"),
                judge(r <= 1.2),
                o,
            );
        }
        if let Some((v, f, r, o)) = ratio("burst_ms") {
            row(
                d,
                &info("200-burst ≤ 1.05× floor"),
                format!("{v:.0} vs {f:.0} ms = ×{r:.3}"),
                judge(r <= 1.05),
                o,
            );
        }
        if let Some((v, f, r, _)) = ratio("idle_rss_kib") {
            row(
                d,
                &info("daemon RSS idle ≤ 2.0 MiB"),
                format!(
                    "{:.2} MiB (floor {:.2} MiB, ×{r:.2})",
                    v / 1024.0,
                    f / 1024.0
                ),
                judge(v <= 2048.0),
                false,
            );
        }
        if let Some((v, f, r, _)) = ratio("root_rss1000_kib") {
            row(
                d,
                &info(&format!(
                    "daemon RSS @{hold} live ≤ 2.5 MiB (daemon process)"
                )),
                format!(
                    "{:.2} MiB (floor {:.2} MiB, ×{r:.2})",
                    v / 1024.0,
                    f / 1024.0
                ),
                judge(v <= 2560.0),
                false,
            );
            if let Some(idle) = median_of(raw, d, "idle_rss_kib") {
                let per = (v - idle) / hold_n;
                row(
                    d,
                    &info("state per live connection ≤ 0.5 KiB (RSS @live − idle, per connection)"),
                    format!("{per:.2} KiB"),
                    judge(per <= 0.5),
                    false,
                );
            }
        }
        if pipe {
            if let Some(v) = median_of(raw, d, "child_pss_per_conn_kib") {
                row(
                    d,
                    "(info) splicer PSS per connection",
                    format!("{v:.1} KiB"),
                    None,
                    false,
                );
            }
            if let (Some(v), Some(p)) = (
                median_of(raw, d, "rss1000_kib"),
                median_of(raw, d, "pss1000_kib"),
            ) {
                row(
                    d,
                    &format!("(info) daemon + {hold} splicers @{hold} live"),
                    format!("VmRSS sum {:.1} MiB, PSS {:.1} MiB", v / 1024.0, p / 1024.0),
                    None,
                    false,
                );
            }
        }
    }
    out
}

fn report(opts: &Opts) -> Res<()> {
    let raw = read_raw(opts.str("raw")?)?;
    let floor = opts.str("floor")?;
    let order: Vec<&str> = opts.str("order")?.split(',').collect();
    let daemons: Vec<(&str, bool)> = opts
        .opt("daemons")
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| match s.strip_suffix(":pipe") {
            Some(d) => (d, true),
            None => (s, false),
        })
        .collect();
    println!("### Connections\n");
    let hold = opts.opt("hold").unwrap_or("1000");
    println!("{}", table(&raw, &order, floor, LATENCY, hold));
    println!("### Throughput and memory\n");
    println!("{}", table(&raw, &order, floor, RESOURCES, hold));
    println!("### CPU seconds per GiB moved (during the bulk transfers)\n");
    println!("{}", table(&raw, &order, floor, CPU, hold));
    println!("### Targets (medians; reported, not asserted)\n");
    println!("{}", targets(&raw, floor, &daemons, hold));
    let errors: Vec<String> = order
        .iter()
        .filter_map(|c| {
            let tests: Vec<String> = raw
                .iter()
                .filter(|((who, metric), _)| who == c && metric.starts_with("errors_"))
                .filter_map(|((_, metric), v)| {
                    let n: f64 = v.iter().sum();
                    (n > 0.0).then(|| format!("{} {n}", &metric["errors_".len()..]))
                })
                .collect();
            (!tests.is_empty()).then(|| format!("{c} ({})", tests.join(", ")))
        })
        .collect();
    if errors.is_empty() {
        println!("Failed connections: none.");
    } else {
        println!(
            "Failed connections, summed over rounds: {}.",
            errors.join("; ")
        );
    }
    Ok(())
}
