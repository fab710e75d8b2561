//! Hostile input (issue 6): everything the daemon reads that someone else
//! wrote, fed with arbitrary text, and peers and launchers that misbehave.
//!
//! * Property tests of the parsers of untrusted text: `FileDescriptorName=`
//!   (`Destination::from_fd_name`, `split_words`) and listen addresses.
//!   None may panic, what they return is never larger than what they read,
//!   and valid values round-trip. The daemon's own readers of untrusted text
//!   (`systemctl show` output, the state file, the client's `--help`, kernel
//!   socket addresses) have the same properties tested next to them, in
//!   `src/bin/qrexec-connect/` (`managing/`, `serving/`).
//! * The one printable rule (`printable`, issue 17), which every message,
//!   `status` and `policy` show a user's text through: whatever the bytes,
//!   what it returns holds only characters that show as themselves and is
//!   bounded, whatever the length of the input.
//! * End to end: a peer that connects and never sends, fd names that are
//!   garbage, fewer fd names than sockets, a garbage `NOTIFY_SOCKET`.

mod common;

use std::ffi::OsStr;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc;
use std::time::Duration;

use proptest::prelude::*;
use qrexec_connect_binding::address::ListenAddress;
use qrexec_connect_binding::destination::{
    split_words, BindingError, Destination, Service, Target,
};
use qrexec_connect_generator::config::{is_invisible, printable, Config, SHOWN_CHARS};

use common::*;

const LIMIT: Duration = Duration::from_secs(20);
/// How long a "nothing happens" check watches.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// Strategies

/// Text rich in what a shell-like splitter treats specially.
fn shellish() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("'".to_owned()),
            Just("\"".to_owned()),
            Just("\\".to_owned()),
            Just(" ".to_owned()),
            Just("\t".to_owned()),
            Just("\n".to_owned()),
            Just("''".to_owned()),
            "[a-zA-Z0-9@$:+._-]{1,8}",
            "\\PC{1,3}",
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

/// Any text: arbitrary Unicode, systemd's fd-name alphabet (printable ASCII
/// without ':', up to 255 bytes), or shell-like text.
fn untrusted_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[ -9;-~]{0,255}", shellish()]
}

fn valid_target() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("@default".to_owned()),
        Just("$default".to_owned()),
        Just("@adminvm".to_owned()),
        Just("@dispvm".to_owned()),
        "[a-zA-Z][a-zA-Z0-9_-]{0,30}",
        "[@$]dispvm:[a-zA-Z][a-zA-Z0-9_-]{0,30}",
    ]
}

fn valid_service() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.-]{1,120}(\\+[a-zA-Z0-9_.+-]{0,130})?"
}

/// Quotes words so that a POSIX shell (and `split_words`) gives them back.
fn shell_quote(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bytes a terminal would act on or show unlike themselves: escape
/// sequences, C1 controls, bidirectional controls, zero-width and
/// non-ASCII spaces, line breaks, invalid UTF-8, mixed with plain text, up
/// to well past the printable rule's cut.
fn terminal_hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"\x1b[2J".to_vec()),
        Just(b"\x1b]0;title\x07".to_vec()),
        Just("\u{9b}31m".as_bytes().to_vec()),
        Just("\u{202e}".as_bytes().to_vec()),
        Just("\u{2066}".as_bytes().to_vec()),
        Just("\u{200b}".as_bytes().to_vec()),
        Just("\u{feff}".as_bytes().to_vec()),
        Just("\u{a0}".as_bytes().to_vec()),
        Just("\u{3000}".as_bytes().to_vec()),
        Just("\u{2028}".as_bytes().to_vec()),
        Just("\u{e0041}".as_bytes().to_vec()),
        Just(b"\n\r\t\x00\x7f".to_vec()),
        Just(b"\xff\xfe\xe2\x80".to_vec()),
        "[a-z/.:@ ]{1,40}".prop_map(String::into_bytes),
        "\\PC{1,8}".prop_map(String::into_bytes),
    ];
    prop_oneof![
        prop::collection::vec(piece, 0..400).prop_map(|pieces| pieces.concat()),
        prop::collection::vec(any::<u8>(), 0..3000),
    ]
}

// ---------------------------------------------------------------------------
// Property tests

proptest! {
    #[test]
    fn printable_shows_only_what_shows_as_itself_and_is_bounded(
        bytes in terminal_hostile_bytes()
    ) {
        let shown = printable(&bytes);
        let unlike: Vec<char> = shown
            .chars()
            .filter(|&c| (c.is_control() && c != '\t') || is_invisible(c))
            .collect();
        prop_assert!(unlike.is_empty(), "{unlike:?} in {shown:?}");
        // The longest escape is `\u{e0041}`, 9 characters for one.
        prop_assert!(
            shown.len() <= 9 * SHOWN_CHARS + 32,
            "{} bytes shown for {}", shown.len(), bytes.len()
        );
        let cut = shown.ends_with(&format!("…({} bytes)", bytes.len()));
        let units = bytes.utf8_chunks().map(|c| c.valid().chars().count() + c.invalid().len());
        prop_assert_eq!(cut, units.sum::<usize>() > SHOWN_CHARS, "{:?}", shown);
        // Shown again, printable text stays as it is (when short enough
        // not to be cut itself).
        if shown.chars().count() <= SHOWN_CHARS {
            let again = printable(shown.as_bytes());
            prop_assert_eq!(again, shown);
        }
    }

    #[test]
    fn split_words_never_panics_and_never_grows(text in untrusted_text()) {
        if let Ok(words) = split_words(&text) {
            let chars = text.chars().count();
            let out: usize = words.iter().map(|w| w.chars().count()).sum();
            prop_assert!(out <= chars, "{out} chars out of {chars}");
            // k words take at least k characters and k-1 separators.
            prop_assert!(2 * words.len() <= chars + 1, "{} words from {chars} chars", words.len());
        }
    }

    #[test]
    fn split_words_gives_back_any_shell_quoted_words(
        words in prop::collection::vec(any::<String>(), 0..6)
    ) {
        prop_assert_eq!(split_words(&shell_quote(&words)), Ok(words));
    }

    #[test]
    fn fd_names_never_panic_and_what_parses_round_trips(text in untrusted_text()) {
        if let Ok(destination) = Destination::from_fd_name(&text) {
            let parts = destination.target.as_str().len() + destination.service.as_str().len();
            prop_assert!(parts <= text.len());
            match destination.to_fd_name() {
                Ok(name) => prop_assert_eq!(Destination::from_fd_name(&name), Ok(destination)),
                Err(BindingError::ColonInTarget(_) | BindingError::FdNameTooLong(_)) => {}
                Err(e) => prop_assert!(false, "to_fd_name: {e}"),
            }
        }
    }

    #[test]
    fn valid_destinations_round_trip_through_their_fd_name(
        target in valid_target(),
        service in valid_service(),
    ) {
        let destination = Destination {
            target: Target::parse(&target).unwrap(),
            service: Service::parse(&service).unwrap(),
        };
        match destination.to_fd_name() {
            Ok(name) => {
                // What systemd accepts in FileDescriptorName=.
                prop_assert!(name.len() <= 255);
                prop_assert!(name.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b':'));
                prop_assert_eq!(Destination::from_fd_name(&name), Ok(destination));
            }
            Err(BindingError::ColonInTarget(_)) => prop_assert!(target.contains(':')),
            Err(BindingError::FdNameTooLong(n)) => prop_assert!(n > 255),
            Err(e) => prop_assert!(false, "{e}"),
        }
    }

    #[test]
    fn listen_addresses_never_panic_and_valid_ones_round_trip(text in prop_oneof![
        untrusted_text(),
        "(@|/|%t/|%h/|127\\.0\\.0\\.1:|\\[::1\\]:)[ -~]{0,120}",
    ]) {
        if let Ok(address) = ListenAddress::parse(&text) {
            prop_assert!(address.to_listen_stream().len() <= 2 * text.len());
            prop_assert_eq!(ListenAddress::parse(&address.to_string()), Ok(address));
        }
    }
}

// ---------------------------------------------------------------------------
// End to end

fn tcp4() -> Endpoint {
    Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port())))
}

fn connect_tcp(port: u16) -> String {
    format!("'' qubes.ConnectTCP+{port}")
}

fn listener() -> (TcpListener, Endpoint) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = Endpoint::Tcp(listener.local_addr().unwrap());
    (listener, endpoint)
}

fn assert_echoes(endpoint: &Endpoint, daemon: &Activate) {
    let data = b"still served".to_vec();
    let received = round_trip(endpoint.connect().unwrap(), data.clone(), LIMIT)
        .unwrap_or_else(|e| panic!("{endpoint:?}: {e}\n{}", daemon.log_text()));
    assert_eq!(received, data, "{endpoint:?}");
}

/// Connects and reads without sending: the daemon must close at once (EOF,
/// or a reset if it closed before the handshake settled), never hang.
fn assert_closed_at_once(endpoint: &Endpoint, daemon: &Activate) {
    let mut stream = endpoint.connect().unwrap();
    stream.set_timeout(Some(LIMIT)).unwrap();
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => assert!(reply.is_empty(), "{endpoint:?} answered {reply:?}"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{endpoint:?}: {e}\n{}", daemon.log_text()),
    }
}

fn warm_up(daemon: &Activate, endpoint: &Endpoint) -> usize {
    assert_echoes(endpoint, daemon);
    idle_fd_count(daemon, LIMIT)
}

#[test]
fn a_silent_peer_holds_its_own_client_and_nothing_else() {
    let echo = EchoServer::start();
    let endpoint = tcp4();
    let daemon = Activate::builder()
        .listen(&endpoint, &connect_tcp(echo.port))
        .start();
    let idle = warm_up(&daemon, &endpoint);
    let pid = daemon.pid();

    let silent = endpoint.connect().unwrap();
    wait_for("a client for the silent peer", LIMIT, || {
        (live_children_of(pid).len() == 1).then_some(())
    });
    for _ in 0..20 {
        assert_echoes(&endpoint, &daemon);
    }
    // The others are gone; the silent peer still has its client process,
    // and the daemon holds at most one fd for it (tokio's pidfd).
    wait_for(
        "only the silent peer's client and its fd left",
        LIMIT,
        || (children_of(pid).len() == 1 && open_fds(pid).len() <= idle + 1).then_some(()),
    );

    drop(silent);
    wait_until_idle(&daemon, idle, LIMIT);
}

#[test]
fn at_max_connections_1_a_silent_peer_blocks_its_binding_but_no_other() {
    let echo = EchoServer::start();
    let (blocked, other) = (tcp4(), tcp4());
    let daemon = Activate::builder()
        .listen(&blocked, &connect_tcp(echo.port))
        .listen(&other, &connect_tcp(echo.port))
        .arg("--max-connections=1")
        .start();
    let idle = warm_up(&daemon, &blocked);

    let silent = blocked.connect().unwrap();
    wait_for("a client for the silent peer", LIMIT, || {
        (live_children_of(daemon.pid()).len() == 1).then_some(())
    });
    // The next client of that binding connects (the backlog) but waits.
    let Endpoint::Tcp(addr) = blocked else {
        unreachable!()
    };
    let mut waiting = TcpStream::connect(addr).unwrap();
    waiting.write_all(b"my turn?").unwrap();
    let mut reader = waiting.try_clone().unwrap();
    reader.set_read_timeout(Some(LIMIT)).unwrap();
    let (done, echoed) = mpsc::channel();
    std::thread::spawn(move || {
        let mut echo = [0; 8];
        let _ = done.send(reader.read_exact(&mut echo).map(|()| echo));
    });
    // With a limit of 1 every connection reaches it: the warm-up did, and
    // now the silent peer.
    let at_limit = format!(
        "{}: 1 live connections, the --max-connections limit",
        blocked.listen_arg()
    );
    wait_for("the silent peer at the limit in the log", LIMIT, || {
        (daemon.log_text().matches(&at_limit).count() == 2).then_some(())
    });
    assert!(
        echoed.recv_timeout(QUIET).is_err(),
        "served beyond --max-connections=1"
    );
    // The limit is per binding: the other one serves as usual.
    assert_echoes(&other, &daemon);

    // The silent peer leaves: the waiting client gets its turn.
    drop(silent);
    let echo = echoed
        .recv_timeout(LIMIT)
        .expect("the waiting client served");
    assert_eq!(&echo.unwrap(), b"my turn?");
    drop(waiting);
    wait_until_idle(&daemon, idle, LIMIT);
}

/// 255 bytes of garbage in systemd's fd-name alphabet (printable ASCII
/// without ':'), deterministic.
fn printable_garbage() -> String {
    random_bytes(255, 66)
        .into_iter()
        .map(|b| {
            let c = b' ' + b % 95;
            char::from(if c == b':' { b'!' } else { c })
        })
        .collect()
}

/// Issue 22: every Unicode space but the ASCII one (and the tab, which
/// separates fields too) looks like a field separator and is not one: the
/// printable rule shows each escaped, as it shows zero-width characters,
/// and a config line holding one is refused naming it.
#[test]
fn every_unicode_space_but_ascii_is_escaped_and_named() {
    let spaces: Vec<char> = (0..=0x10_ffff_u32)
        .filter_map(char::from_u32)
        .filter(|&c| c.is_whitespace() && !matches!(c, ' ' | '\t'))
        .collect();
    assert!(spaces.contains(&'\u{a0}') && spaces.contains(&'\u{3000}'));
    for c in spaces {
        let shown = printable(format!("a{c}b").as_bytes());
        let escaped = if c.is_ascii_control() {
            format!("a\\x{:02x}b", u32::from(c))
        } else {
            format!("a\\u{{{:x}}}b", u32::from(c))
        };
        assert_eq!(shown, escaped, "U+{:04X}", u32::from(c));
        if c.is_control() {
            continue; // refused as a control character
        }
        let mut config = Config::default();
        config.add_text(
            "/a.conf",
            format!("127.0.0.1:2222{c}vm qubes.ConnectTCP+22").as_bytes(),
        );
        let message = config.problems[0].headline();
        assert!(
            message.starts_with(&format!(
                "/a.conf:1: U+{:04X} looks like a space but does not separate fields",
                u32::from(c)
            )),
            "{message}"
        );
    }
}

#[test]
fn a_binding_with_a_garbage_fd_name_is_refused_and_the_others_serve() {
    let echo = EchoServer::start();
    let good_name = connect_tcp(echo.port);
    let garbage = printable_garbage();
    assert!(Destination::from_fd_name(&garbage).is_err());
    let (bad, bad_at) = listener();
    let (good, good_at) = listener();
    let daemon = Activate::with_sockets(
        vec![
            (OwnedFd::from(bad), &garbage),
            (OwnedFd::from(good), &good_name),
        ],
        &[],
    );
    assert_echoes(&good_at, &daemon);
    assert_closed_at_once(&bad_at, &daemon);
    daemon.wait_log(
        &format!("{}: invalid FileDescriptorName=", bad_at.listen_arg()),
        LIMIT,
    );
}

#[test]
fn a_binding_with_a_non_utf8_fd_name_is_refused_and_the_others_serve() {
    // Not something systemd passes (it allows printable ASCII only), but a
    // launcher could: bytes 0x80-0xff, control characters, escape sequences.
    let echo = EchoServer::start();
    let mut names: Vec<u8> = random_bytes(255, 99)
        .into_iter()
        .map(|b| match b {
            0 | b':' => 0xff,
            b => b | 0x80,
        })
        .collect();
    names[..4].copy_from_slice(b"\x1b[2J");
    names.push(b':');
    names.extend_from_slice(connect_tcp(echo.port).as_bytes());
    let (bad, bad_at) = listener();
    let (good, good_at) = listener();
    let daemon = Activate::with_raw_fd_names(
        vec![OwnedFd::from(bad), OwnedFd::from(good)],
        OsStr::from_bytes(&names),
        &[],
    );
    assert_echoes(&good_at, &daemon);
    assert_closed_at_once(&bad_at, &daemon);
    let log = daemon.wait_log(
        &format!("{}: invalid FileDescriptorName=", bad_at.listen_arg()),
        LIMIT,
    );
    assert!(!log.contains('\x1b'), "an escape sequence reached the log");
}

#[test]
fn fewer_fd_names_than_sockets_refuses_the_unnamed_and_serves_the_named() {
    let echo = EchoServer::start();
    let (good, good_at) = listener();
    let (first_extra, first_extra_at) = listener();
    let (second_extra, second_extra_at) = listener();
    let daemon = Activate::with_raw_fd_names(
        vec![
            OwnedFd::from(good),
            OwnedFd::from(first_extra),
            OwnedFd::from(second_extra),
        ],
        OsStr::new(&connect_tcp(echo.port)),
        &[],
    );
    assert_echoes(&good_at, &daemon);
    for extra in [&first_extra_at, &second_extra_at] {
        assert_closed_at_once(extra, &daemon);
        daemon.wait_log(
            &format!("{}: invalid FileDescriptorName=", extra.listen_arg()),
            LIMIT,
        );
    }
}

#[test]
fn a_garbage_notify_socket_does_not_stop_the_daemon() {
    let echo = EchoServer::start();
    let garbage: String = printable_garbage().chars().filter(|c| *c != ' ').collect();
    for notify_socket in [
        format!("/{garbage}"),
        format!("@{garbage}"),
        garbage,
        // Well-formed, but nobody listens: every notification fails.
        format!("@qrexec-connect-test-nobody-{}", std::process::id()),
    ] {
        let endpoint = tcp4();
        let daemon = Activate::builder()
            .listen(&endpoint, &connect_tcp(echo.port))
            .env("NOTIFY_SOCKET", &notify_socket)
            .start();
        assert_echoes(&endpoint, &daemon);
    }
}
