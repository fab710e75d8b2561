//! The daemon under `systemd-socket-activate` (real socket passing), with
//! the qrexec-client-vm double behind it: what a user of a binding sees.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(20);

fn tcp4() -> Endpoint {
    Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port())))
}

fn tcp6() -> Endpoint {
    let port = TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Endpoint::Tcp(format!("[::1]:{port}").parse().unwrap())
}

fn unix_path(dir: &TempDir, name: &str) -> Endpoint {
    Endpoint::Path(dir.path().join(name))
}

fn abstract_name(tag: &str) -> Endpoint {
    Endpoint::Abstract(format!("qrexec-connect-test-{tag}-{}", std::process::id()))
}

fn connect_tcp(port: u16) -> String {
    format!("'' qubes.ConnectTCP+{port}")
}

#[test]
fn every_listen_family_forwards_4_mib_each_way_intact() {
    let echo = EchoServer::start();
    for client in CLIENTS {
        let dir = TempDir::new("families");
        let endpoints = [
            tcp4(),
            tcp6(),
            unix_path(&dir, "agent.sock"),
            abstract_name(&format!("{client:?}")),
        ];
        let mut builder = activate(client);
        for endpoint in &endpoints {
            builder = builder.listen(endpoint, &connect_tcp(echo.port));
        }
        let daemon = builder.start();
        for (index, endpoint) in endpoints.iter().enumerate() {
            let data = random_bytes(4 << 20, index as u64 + 1);
            let received = round_trip(endpoint.connect().unwrap(), data.clone(), LIMIT)
                .unwrap_or_else(|e| panic!("{client:?} {endpoint:?}: {e}\n{}", daemon.log_text()));
            assert!(
                received == data,
                "{client:?} {endpoint:?}: {} bytes came back, not the 4 MiB sent",
                received.len()
            );
        }
        let log = daemon.wait_log("closed normally", LIMIT);
        match client {
            Client::Current => assert!(log.contains("supports --use-stdin-socket"), "{log}"),
            Client::Old => assert!(log.contains("a pipe and a splicer"), "{log}"),
        }
    }
}

#[test]
fn service_that_closes_first_gives_the_client_eof_promptly() {
    let service = EchoServer::start_replying(b"bye\n");
    for client in CLIENTS {
        let endpoint = tcp4();
        let daemon = activate(client)
            .listen(&endpoint, &connect_tcp(service.port))
            .start();
        let mut stream = endpoint.connect().unwrap();
        // The client keeps its own write side open: only the service's EOF
        // can end this read (qubes-issues #9169 hung here).
        stream.set_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reply = Vec::new();
        let result = stream.read_to_end(&mut reply);
        assert!(
            result.is_ok(),
            "{client:?}: no EOF after the service closed ({result:?}); got {reply:?}\n{}",
            daemon.log_text()
        );
        assert_eq!(reply, b"bye\n", "{client:?}");
    }
}

#[test]
fn client_half_close_still_gets_the_whole_reply() {
    let echo = EchoServer::start();
    for client in CLIENTS {
        let endpoint = tcp4();
        let _daemon = activate(client)
            .listen(&endpoint, &connect_tcp(echo.port))
            .start();
        let mut stream = endpoint.connect().unwrap();
        stream.write_all(b"first and last words").unwrap();
        stream.half_close().unwrap();
        stream.set_timeout(Some(LIMIT)).unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"first and last words", "{client:?}");
    }
}

#[test]
fn policy_refusal_closes_that_connection_and_others_keep_serving() {
    let echo = EchoServer::start();
    let dir = TempDir::new("policy");
    let policy = dir.path().join("policy");
    std::fs::write(
        &policy,
        format!(
            "qubes.ConnectTCP +{0} client secret-qube deny\n\
             qubes.ConnectTCP * @anyvm @anyvm allow\n",
            echo.port
        ),
    )
    .unwrap();
    let denied = tcp4();
    let allowed = tcp4();
    let daemon = Activate::builder()
        .listen(
            &denied,
            &format!("secret-qube qubes.ConnectTCP+{}", echo.port),
        )
        .listen(
            &allowed,
            &format!("open-qube qubes.ConnectTCP+{}", echo.port),
        )
        .env("QREXEC_DOUBLE_POLICY", policy.to_str().unwrap())
        .start();
    assert_closed_at_once(&denied, &|| daemon.log_text());
    let log = daemon.wait_log("refused by qrexec policy", LIMIT);
    assert!(
        log.contains("Request refused"),
        "the client's stderr reaches the log:\n{log}"
    );
    assert!(log.contains("secret-qube"), "{log}");
    let received = round_trip(allowed.connect().unwrap(), b"hello".to_vec(), LIMIT).unwrap();
    assert_eq!(received, b"hello");
}

/// Connects and reads without sending: the daemon must close at once (EOF,
/// or a reset if it closed before the handshake settled), never hang.
fn assert_closed_at_once(endpoint: &Endpoint, log: &dyn Fn() -> String) {
    let mut stream = endpoint.connect().unwrap();
    stream.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => assert!(reply.is_empty(), "{endpoint:?} answered {reply:?}"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "{endpoint:?}: expected an immediate close, got {e}\n{}",
            log()
        ),
    }
}

#[test]
fn invalid_bindings_are_closed_at_once_and_the_rest_serve() {
    use std::os::fd::OwnedFd;
    let echo = EchoServer::start();
    let listener = || TcpListener::bind("127.0.0.1:0").unwrap();
    let (good, one_word, three_words, bad_target) =
        (listener(), listener(), listener(), listener());
    let datagram = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let endpoint = |l: &TcpListener| Endpoint::Tcp(l.local_addr().unwrap());
    let (good_at, one_at, three_at, bad_at) = (
        endpoint(&good),
        endpoint(&one_word),
        endpoint(&three_words),
        endpoint(&bad_target),
    );
    let datagram_at = datagram.local_addr().unwrap();
    let good_name = connect_tcp(echo.port);
    let daemon = Activate::with_sockets(
        vec![
            (OwnedFd::from(one_word), "qubes.ConnectTCP+1"),
            (OwnedFd::from(good), &good_name),
            (OwnedFd::from(datagram), "'' qubes.ConnectTCP+1"),
            (OwnedFd::from(three_words), "a b c"),
            (OwnedFd::from(bad_target), "1bad-name qubes.ConnectTCP+1"),
        ],
        &[],
    );
    for bad in [&one_at, &three_at, &bad_at] {
        assert_closed_at_once(bad, &|| daemon.log_text());
    }
    let received = round_trip(good_at.connect().unwrap(), b"still here".to_vec(), LIMIT).unwrap();
    assert_eq!(received, b"still here");
    let log = daemon.wait_log("not a stream socket", LIMIT);
    for needle in [
        format!(
            "{}: invalid FileDescriptorName=\"qubes.ConnectTCP+1\"",
            one_at.listen_arg()
        ),
        format!(
            "{}: invalid FileDescriptorName=\"a b c\"",
            three_at.listen_arg()
        ),
        format!(
            "{}: invalid FileDescriptorName=\"1bad-name",
            bad_at.listen_arg()
        ),
        format!("{datagram_at} (socket named \"'' qubes.ConnectTCP+1\") cannot be served"),
    ] {
        assert!(
            log.contains(needle.as_str()),
            "missing {needle:?} in:\n{log}"
        );
    }
}

#[test]
fn missing_client_is_logged_and_recovers_when_it_appears() {
    let echo = EchoServer::start();
    let dir = TempDir::new("missing");
    let client = dir.path().join("qrexec-client-vm");
    let endpoint = tcp4();
    let daemon = Activate::builder()
        .listen(&endpoint, &connect_tcp(echo.port))
        .arg(&format!("--qrexec-client-vm={}", client.display()))
        .start();
    assert_closed_at_once(&endpoint, &|| daemon.log_text());
    daemon.wait_log("cannot run", LIMIT);
    assert!(std::path::Path::new(&format!("/proc/{}", daemon.pid())).exists());
    std::os::unix::fs::symlink(DOUBLE, &client).unwrap();
    let received = round_trip(endpoint.connect().unwrap(), b"back".to_vec(), LIMIT).unwrap();
    assert_eq!(received, b"back");
}

#[test]
fn a_client_inherits_only_its_stdio_and_no_listen_variables() {
    let echo = EchoServer::start();
    let dir = TempDir::new("fds");
    let log = dir.path().join("double.log");
    let first = tcp4();
    let second = tcp4();
    let daemon = Activate::builder()
        .listen(&first, &connect_tcp(echo.port))
        .listen(&second, &connect_tcp(echo.port))
        .env("QREXEC_DOUBLE_LOG", log.to_str().unwrap())
        .start();
    // Keep one connection open while the next client starts: it must not
    // inherit that connection either.
    let mut held = first.connect().unwrap();
    held.write_all(b"ping").unwrap();
    let mut buf = [0; 4];
    held.read_exact(&mut buf).unwrap();
    let received = round_trip(second.connect().unwrap(), b"pong".to_vec(), LIMIT).unwrap();
    assert_eq!(received, b"pong");
    let children = wait_for("one live client for the held connection", LIMIT, || {
        let live: Vec<u32> = children_of(daemon.pid())
            .into_iter()
            .filter(|&pid| state_of(pid) != Some('Z'))
            .collect();
        (live.len() == 1).then_some(live)
    });
    let environment = environment_of(children[0]);
    for variable in [
        "LISTEN_FDS=",
        "LISTEN_PID=",
        "LISTEN_FDNAMES=",
        "NOTIFY_SOCKET=",
    ] {
        assert!(
            !environment.iter().any(|e| e.starts_with(variable)),
            "client sees {variable}"
        );
    }
    drop(held);
    let text = wait_for("two finished calls in the double's log", LIMIT, || {
        let text = std::fs::read_to_string(&log).ok()?;
        let calls = text.lines().filter(|l| !l.contains("\"--help\"")).count();
        (calls >= 2).then_some(text)
    });
    for line in text.lines() {
        assert!(
            line.contains("fds=0,1,2 "),
            "a client inherited more than stdio: {line}"
        );
        if line.contains("\"--help\"") {
            continue; // the probe at start
        }
        assert!(
            line.contains("\"--use-stdin-socket\",\"--\",\"\",\"qubes.ConnectTCP+"),
            "unexpected client arguments: {line}"
        );
    }
}

/// The daemon blocks SIGCHLD, SIGTERM and SIGINT (it reads them from a
/// signalfd) and ignores SIGPIPE; a client must start with none of that:
/// an empty signal mask (or stopping its caller could not end it) and
/// SIGPIPE at its default action. The client here is a Perl script that
/// writes its own signal state (the double, a Rust program, ignores SIGPIPE
/// itself, and a shell clears its mask).
#[test]
fn a_client_starts_with_no_blocked_signals_and_sigpipe_at_its_default() {
    use std::os::unix::fs::PermissionsExt;
    let echo = EchoServer::start();
    let dir = TempDir::new("signals");
    let report = dir.path().join("signals");
    let client = dir.path().join("client");
    std::fs::write(
        &client,
        format!(
            "#!/usr/bin/perl\nopen(my $in, '<', '/proc/self/status') or die;\n\
             open(my $out, '>', '{0}.tmp') or die;\n\
             print $out grep {{ /^Sig(Blk|Ign):/ }} <$in>;\nclose($out);\n\
             rename('{0}.tmp', '{0}') or die;\n",
            report.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = tcp4();
    let _daemon = Activate::builder()
        .listen(&socket, &connect_tcp(echo.port))
        .arg(&format!("--qrexec-client-vm={}", client.display()))
        .arg("--client-mode=stdin-socket")
        .start();
    let _connection = socket.connect().unwrap();
    let status = wait_for("the client's signal state", LIMIT, || {
        std::fs::read_to_string(&report).ok()
    });
    let mask = |name: &str| {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"));
        u64::from_str_radix(value.trim(), 16).unwrap()
    };
    assert_eq!(mask("SigBlk:"), 0, "the client starts with blocked signals");
    let sigpipe = 1 << (13 - 1);
    assert_eq!(
        mask("SigIgn:") & sigpipe,
        0,
        "the client starts with SIGPIPE ignored"
    );
}

/// A client wrapper whose `--help` answers only once `release` exists (the
/// double otherwise): the probe's answer comes when the test says so.
fn client_with_held_help(dir: &TempDir, release: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let client = dir.path().join("client");
    std::fs::write(
        &client,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --help ]; then\n  \
             while [ ! -e '{}' ]; do sleep 0.02; done\nfi\nexec '{DOUBLE}' \"$@\"\n",
            release.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755)).unwrap();
    client
}

/// Without a runtime directory every start probes the client's `--help`;
/// the first connection must not wait for it. Here the probe cannot answer
/// until the test lets it, and the first connection is served meanwhile.
#[test]
fn the_first_connection_is_served_while_the_help_probe_still_runs() {
    let echo = EchoServer::start();
    let dir = TempDir::new("probe-new");
    let release = dir.path().join("release");
    let client = client_with_held_help(&dir, &release);
    let socket = tcp4();
    let daemon = Activate::builder()
        .listen(&socket, &connect_tcp(echo.port))
        .arg(&format!("--qrexec-client-vm={}", client.display()))
        .start();
    let received = round_trip(socket.connect().unwrap(), b"first".to_vec(), LIMIT).unwrap();
    assert_eq!(received, b"first");
    // Served while the probe is still waiting (it is the daemon's child
    // running `client --help`, and answers only once released below).
    let probing = children_of(daemon.pid()).into_iter().any(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == b"--help"))
    });
    assert!(probing, "the first connection waited for the probe to end");
    std::fs::write(&release, "").unwrap();
    daemon.wait_log("supports --use-stdin-socket", LIMIT);
    let received = round_trip(socket.connect().unwrap(), b"second".to_vec(), LIMIT).unwrap();
    assert_eq!(received, b"second");
}

/// The same with an old client: the first connection's tentative
/// `--use-stdin-socket` client refuses the option (exit 2, before it reads
/// anything), and once the probe says "old" the connection is served again
/// through a pipe: the caller sees the whole reply and the service's EOF,
/// and the journal has one end-of-connection entry for it, status 0.
#[test]
fn an_old_client_serves_the_first_connection_through_a_pipe_after_the_probe() {
    let echo = EchoServer::start();
    let dir = TempDir::new("probe-old");
    let release = dir.path().join("release");
    let client = client_with_held_help(&dir, &release);
    let socket = tcp4();
    let daemon = Activate::builder()
        .listen(&socket, &connect_tcp(echo.port))
        .arg(&format!("--qrexec-client-vm={}", client.display()))
        .env("QREXEC_DOUBLE_VERSION", "old")
        .start();
    let mut first = socket.connect().unwrap();
    first.write_all(b"tentative").unwrap();
    daemon.wait_log("unrecognized option '--use-stdin-socket'", LIMIT);
    std::fs::write(&release, "").unwrap();
    let mut reply = [0; 9];
    first.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"tentative");
    drop(first);
    let log = daemon.wait_log("closed normally", LIMIT);
    assert!(log.contains("has no --use-stdin-socket"), "{log}");
    assert_eq!(
        log.matches(" -> ").count(),
        1,
        "one entry per connection: {log}"
    );
    let received = round_trip(socket.connect().unwrap(), b"second".to_vec(), LIMIT).unwrap();
    assert_eq!(received, b"second");
}

#[test]
fn sigterm_exits_within_a_second_and_live_connections_go_on() {
    let echo = EchoServer::start();
    for client in CLIENTS {
        let endpoint = tcp4();
        let mut daemon = activate(client)
            .listen(&endpoint, &connect_tcp(echo.port))
            .arg("--max-connections=200")
            .start();
        let mut live: Vec<Box<dyn Stream>> = Vec::new();
        for i in 0..100u32 {
            let mut stream = endpoint.connect().unwrap();
            stream.set_timeout(Some(LIMIT)).unwrap();
            stream.write_all(&i.to_be_bytes()).unwrap();
            let mut buf = [0; 4];
            stream.read_exact(&mut buf).unwrap();
            assert_eq!(u32::from_be_bytes(buf), i, "{client:?}");
            live.push(stream);
        }
        let started = Instant::now();
        unsafe { libc::kill(daemon.pid() as i32, libc::SIGTERM) };
        let status = wait_for("the daemon to exit", Duration::from_secs(10), || {
            daemon.child.try_wait().unwrap()
        });
        let took = started.elapsed();
        assert!(status.success(), "{client:?}: exit status {status:?}");
        assert!(
            took < Duration::from_secs(1),
            "{client:?}: took {took:?} to exit"
        );
        // Nothing that outlives the daemon (clients, splicers) kept a copy of
        // the listening socket: with the daemon gone, the port refuses.
        let refused = endpoint.connect().err().map(|e| e.kind());
        assert_eq!(
            refused,
            Some(std::io::ErrorKind::ConnectionRefused),
            "{client:?}: something still holds the listening socket"
        );
        for (i, stream) in live.into_iter().enumerate() {
            let data = format!("still alive {i}").into_bytes();
            let received = round_trip(stream, data.clone(), LIMIT).unwrap();
            assert_eq!(received, data, "{client:?}");
        }
    }
}

#[test]
fn without_sockets_it_says_how_to_start_it_and_exits_6() {
    let output = run(std::process::Command::new(DAEMON).env_remove("LISTEN_FDS"));
    assert_eq!(output.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("must be started by systemd socket activation"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn options_work_in_any_order_and_take_their_value_as_the_next_argument() {
    for args in [
        &["--debug", "--help"][..],
        &["--help", "--debug"],
        &["-d", "--max-connections=3", "-h"],
        &["--max-connections", "3", "--help"],
    ] {
        let output = run(std::process::Command::new(DAEMON).args(args));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.starts_with("Usage: qrexec-connect"),
            "{args:?}: {:?}\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for (args, says) in [
        (
            &["--max-connections"][..],
            "--max-connections needs a value",
        ),
        (&["--debug=yes"], "--debug takes no value"),
        (&["--max-connections", "0"], "positive number"),
    ] {
        let output = run(std::process::Command::new(DAEMON).args(args));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }

    // `--max-connections 1` as two arguments sets the limit.
    let echo = EchoServer::start();
    let endpoint = tcp4();
    let daemon = Activate::builder()
        .listen(&endpoint, &connect_tcp(echo.port))
        .arg("--max-connections")
        .arg("1")
        .start();
    let mut held = endpoint.connect().unwrap();
    held.set_timeout(Some(LIMIT)).unwrap();
    held.write_all(b"held").unwrap();
    let mut buf = [0; 4];
    held.read_exact(&mut buf).unwrap();
    let _waiting = endpoint.connect().unwrap();
    daemon.wait_log("1 live connections, the --max-connections limit", LIMIT);
}

#[test]
fn dash_capital_v_prints_the_version_of_both_programs() {
    for program in [DAEMON, GENERATOR] {
        let out = std::process::Command::new(program)
            .arg("-V")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{program} -V: {text}");
        assert!(
            text.trim().ends_with(env!("CARGO_PKG_VERSION")),
            "{program} -V: {text}"
        );
    }
}
