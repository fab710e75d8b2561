//! Command line of the double: `getopt_long` semantics with a leading `+` in
//! the option string (option parsing stops at the first positional argument
//! or after `--`), unambiguous prefixes of long options, `--opt=VALUE` and
//! `--opt VALUE`, clustered short options (`-tT`, `-pDATA`, `-p DATA`).
//!
//! Options are acted on in the order they are given, as the real client does:
//! `--help` exits at once, `--use-stdin-socket` checks fd 0 when it is seen.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;

use crate::Mode;

/// What the command line asks for.
#[derive(Debug, Default)]
pub struct Options {
    /// `--use-stdin-socket`: fd 0 carries both directions.
    pub use_stdin_socket: bool,
    /// `-p DATA`: sent to the service before anything read from the client.
    pub prefix: Option<Vec<u8>>,
    /// `-s QUBE`: the source qube the policy sees.
    pub source: Option<String>,
    /// TARGET as given (before `$` -> `@`).
    pub target: String,
    /// SERVICE[+ARG] as given.
    pub service: Vec<u8>,
    /// LOCAL_PROGRAM [ARGS...], unsupported by the double.
    pub local_program: Vec<OsString>,
}

/// Why parsing stopped without a runnable call.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// `-h`/`--help`: usage on stdout, exit 0.
    Help,
    /// Usage on stderr, exit 2; the message (if any) goes first.
    Usage(Option<String>),
    /// A message on stderr and this exit status, no usage.
    Fail(i32, String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opt {
    BufferSize,
    FilterStdout,
    FilterStderr,
    NoFilterStdout,
    NoFilterStderr,
    AgentSocket,
    PrefixData,
    UseStdinSocket,
    SourceQube,
    Help,
}

struct LongOpt {
    name: &'static str,
    takes_arg: bool,
    opt: Opt,
    new_only: bool,
}

const LONG_OPTS: &[LongOpt] = &[
    LongOpt {
        name: "buffer-size",
        takes_arg: true,
        opt: Opt::BufferSize,
        new_only: false,
    },
    LongOpt {
        name: "filter-escape-chars-stdout",
        takes_arg: false,
        opt: Opt::FilterStdout,
        new_only: false,
    },
    LongOpt {
        name: "filter-escape-chars-stderr",
        takes_arg: false,
        opt: Opt::FilterStderr,
        new_only: false,
    },
    LongOpt {
        name: "no-filter-escape-chars-stdout",
        takes_arg: false,
        opt: Opt::NoFilterStdout,
        new_only: false,
    },
    LongOpt {
        name: "no-filter-escape-chars-stderr",
        takes_arg: false,
        opt: Opt::NoFilterStderr,
        new_only: false,
    },
    LongOpt {
        name: "agent-socket",
        takes_arg: true,
        opt: Opt::AgentSocket,
        new_only: false,
    },
    LongOpt {
        name: "prefix-data",
        takes_arg: true,
        opt: Opt::PrefixData,
        new_only: false,
    },
    LongOpt {
        name: "help",
        takes_arg: false,
        opt: Opt::Help,
        new_only: false,
    },
    LongOpt {
        name: "use-stdin-socket",
        takes_arg: false,
        opt: Opt::UseStdinSocket,
        new_only: true,
    },
    LongOpt {
        name: "source-qube",
        takes_arg: true,
        opt: Opt::SourceQube,
        new_only: true,
    },
];

/// Short options: (letter, takes an argument, option, new mode only).
const SHORT_OPTS: &[(u8, bool, Opt, bool)] = &[
    (b't', false, Opt::FilterStdout, false),
    (b'T', false, Opt::FilterStderr, false),
    (b'a', true, Opt::AgentSocket, false),
    (b'h', false, Opt::Help, false),
    (b'p', true, Opt::PrefixData, false),
    (b's', true, Opt::SourceQube, true),
];

/// The path the real client connects to unless `--agent-socket` is given.
const AGENT_SOCKET: &str = "/var/run/qubes/qrexec-agent";

/// Usage text. The option `--use-stdin-socket` is listed only in new mode:
/// callers detect support by looking for that literal string.
pub fn usage_text(argv0: &str, mode: Mode) -> String {
    let mut s = format!(
        "usage: {argv0} [options] target_vmname program_ident [local_program [local program arguments]]\n\
         Options:\n  \
         -h, --help - show this help and exit\n  \
         --buffer-size=BUFFER_SIZE - minimum vchan buffer size (default: 64k)\n  \
         -t, --filter-escape-chars-stdout - replace non-printable characters on stdout (default when stdout is a terminal)\n  \
         -T, --filter-escape-chars-stderr - replace non-printable characters on stderr (default when stderr is a terminal)\n  \
         --no-filter-escape-chars-stdout - do not filter stdout\n  \
         --no-filter-escape-chars-stderr - do not filter stderr\n  \
         -a PATH, --agent-socket=PATH - qrexec-agent socket to use (default: {AGENT_SOCKET})\n  \
         -p PREFIX-DATA, --prefix-data=PREFIX-DATA - send PREFIX-DATA to the service before the data read from stdin (at most once)\n"
    );
    if mode == Mode::New {
        s.push_str(
            "  --use-stdin-socket - fd 0 is a socket and carries both directions (stdout is not used)\n  \
             -s QUBE, --source-qube=QUBE - make the call on behalf of QUBE\n",
        );
    }
    s
}

fn known_long(mode: Mode) -> impl Iterator<Item = &'static LongOpt> {
    LONG_OPTS
        .iter()
        .filter(move |o| mode == Mode::New || !o.new_only)
}

/// Parses `args` (without argv[0]). `stdin_is_stream_socket` is consulted
/// when `--use-stdin-socket` is seen and returns the error text if fd 0
/// cannot be used.
pub fn parse(
    args: &[OsString],
    mode: Mode,
    prog: &str,
    stdin_check: &dyn Fn() -> Result<(), String>,
) -> Result<Options, Stop> {
    let mut opts = Options::default();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_bytes();
        if arg == b"--" {
            i += 1;
            break;
        }
        if arg.len() > 2 && arg.starts_with(b"--") {
            let body = &arg[2..];
            let (name, inline) = match body.iter().position(|&b| b == b'=') {
                Some(eq) => (&body[..eq], Some(&body[eq + 1..])),
                None => (body, None),
            };
            let shown = String::from_utf8_lossy(name).into_owned();
            let exact = known_long(mode).find(|o| o.name.as_bytes() == name);
            let lo = match exact {
                Some(o) => o,
                None => {
                    let cands: Vec<&LongOpt> = known_long(mode)
                        .filter(|o| o.name.as_bytes().starts_with(name))
                        .collect();
                    match cands.len() {
                        0 => {
                            return Err(Stop::Usage(Some(format!(
                                "{prog}: unrecognized option '--{shown}'"
                            ))))
                        }
                        1 => cands[0],
                        _ => {
                            let list: Vec<String> =
                                cands.iter().map(|o| format!("'--{}'", o.name)).collect();
                            return Err(Stop::Usage(Some(format!(
                                "{prog}: option '--{shown}' is ambiguous; possibilities: {}",
                                list.join(" ")
                            ))));
                        }
                    }
                }
            };
            let value = if lo.takes_arg {
                match inline {
                    Some(v) => Some(v.to_vec()),
                    None if i + 1 < args.len() => {
                        i += 1;
                        Some(args[i].as_bytes().to_vec())
                    }
                    None => {
                        return Err(Stop::Usage(Some(format!(
                            "{prog}: option '--{}' requires an argument",
                            lo.name
                        ))))
                    }
                }
            } else {
                if inline.is_some() {
                    return Err(Stop::Usage(Some(format!(
                        "{prog}: option '--{}' doesn't allow an argument",
                        lo.name
                    ))));
                }
                None
            };
            apply(&mut opts, lo.opt, value, prog, stdin_check)?;
            i += 1;
            continue;
        }
        if arg.len() > 1 && arg[0] == b'-' {
            let mut j = 1;
            while j < arg.len() {
                let c = arg[j];
                let found = SHORT_OPTS
                    .iter()
                    .find(|(l, _, _, new_only)| *l == c && (mode == Mode::New || !new_only));
                let Some(&(_, takes_arg, opt, _)) = found else {
                    return Err(Stop::Usage(Some(format!(
                        "{prog}: invalid option -- '{}'",
                        char::from(c).escape_default()
                    ))));
                };
                if takes_arg {
                    let value = if j + 1 < arg.len() {
                        arg[j + 1..].to_vec()
                    } else if i + 1 < args.len() {
                        i += 1;
                        args[i].as_bytes().to_vec()
                    } else {
                        return Err(Stop::Usage(Some(format!(
                            "{prog}: option requires an argument -- '{}'",
                            char::from(c)
                        ))));
                    };
                    apply(&mut opts, opt, Some(value), prog, stdin_check)?;
                    break;
                }
                apply(&mut opts, opt, None, prog, stdin_check)?;
                j += 1;
            }
            i += 1;
            continue;
        }
        // First positional argument: '+' in the option string stops here.
        break;
    }

    let rest = &args[i..];
    if rest.len() < 2 {
        return Err(Stop::Usage(None));
    }
    if rest.len() > 2 && opts.use_stdin_socket {
        return Err(Stop::Usage(Some(format!(
            "{prog}: cannot spawn a local process with --use-stdin-socket"
        ))));
    }
    opts.target = rest[0].to_string_lossy().into_owned();
    opts.service = rest[1].as_bytes().to_vec();
    opts.local_program = rest[2..].to_vec();
    Ok(opts)
}

fn apply(
    opts: &mut Options,
    opt: Opt,
    value: Option<Vec<u8>>,
    prog: &str,
    stdin_check: &dyn Fn() -> Result<(), String>,
) -> Result<(), Stop> {
    match opt {
        Opt::Help => return Err(Stop::Help),
        Opt::BufferSize => {
            check_buffer_size(&value.unwrap_or_default())
                .map_err(|m| Stop::Fail(1, format!("{prog}: {m}")))?;
        }
        Opt::FilterStdout | Opt::FilterStderr | Opt::NoFilterStdout | Opt::NoFilterStderr => {}
        Opt::AgentSocket => {}
        Opt::PrefixData => {
            if opts.prefix.is_some() {
                return Err(Stop::Usage(Some(format!(
                    "{prog}: --prefix-data may be given only once"
                ))));
            }
            opts.prefix = value;
        }
        Opt::UseStdinSocket => {
            if opts.use_stdin_socket {
                return Err(Stop::Fail(
                    2,
                    format!("{prog}: --use-stdin-socket passed twice"),
                ));
            }
            stdin_check().map_err(|m| Stop::Fail(2, format!("{prog}: {m}")))?;
            opts.use_stdin_socket = true;
        }
        Opt::SourceQube => {
            opts.source = Some(String::from_utf8_lossy(&value.unwrap_or_default()).into_owned());
        }
    }
    Ok(())
}

/// `--buffer-size` is read like `strtoul(s, &end, 0)` with the checks of the
/// current client: must start with a digit, no trailing junk, at most
/// `INT_MAX`. The value itself is ignored (there is no vchan).
fn check_buffer_size(v: &[u8]) -> Result<u64, String> {
    if !v.first().is_some_and(u8::is_ascii_digit) {
        return Err("Bad buffer size: does not begin with a number".into());
    }
    let s = std::str::from_utf8(v).map_err(|_| "Bad buffer size: trailing junk".to_string())?;
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    if end != digits.len() {
        return Err("Bad buffer size: trailing junk".into());
    }
    let n = if digits.is_empty() {
        0
    } else {
        u64::from_str_radix(digits, radix).unwrap_or(u64::MAX)
    };
    if n > i32::MAX as u64 {
        return Err("Bad buffer size: Numerical result out of range".into());
    }
    Ok(n)
}

/// Prints what `stop` calls for and returns the exit status.
pub fn report(stop: &Stop, argv0: &str, mode: Mode) -> i32 {
    match stop {
        Stop::Help => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(usage_text(argv0, mode).as_bytes());
            let _ = out.flush();
            0
        }
        Stop::Usage(msg) => {
            let mut text = String::new();
            if let Some(m) = msg {
                text.push_str(m);
                text.push('\n');
            }
            text.push_str(&usage_text(argv0, mode));
            let _ = std::io::stderr().write_all(text.as_bytes());
            2
        }
        Stop::Fail(code, msg) => {
            let _ = std::io::stderr().write_all(format!("{msg}\n").as_bytes());
            *code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(mode: Mode, args: &[&str]) -> Result<Options, Stop> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse(&args, mode, "q", &|| Ok(()))
    }

    #[test]
    fn options_stop_at_first_positional() {
        let o = p(Mode::New, &["-t", "tgt", "svc", "-p", "x"]).unwrap();
        assert_eq!(o.target, "tgt");
        assert_eq!(o.service, b"svc");
        assert_eq!(o.local_program.len(), 2);
        assert!(o.prefix.is_none());
    }

    #[test]
    fn long_forms_and_prefixes() {
        let o = p(
            Mode::New,
            &[
                "--buffer-size",
                "0x10",
                "--prefix-data=ab",
                "--use-stdin",
                "--",
                "-t",
                "s",
            ],
        )
        .unwrap();
        assert!(o.use_stdin_socket);
        assert_eq!(o.prefix.as_deref(), Some(&b"ab"[..]));
        assert_eq!(o.target, "-t");
        assert!(matches!(
            p(Mode::New, &["--no-filter", "a", "b"]),
            Err(Stop::Usage(Some(_)))
        ));
        assert!(matches!(
            p(Mode::New, &["--help=x", "a", "b"]),
            Err(Stop::Usage(Some(_)))
        ));
    }

    #[test]
    fn short_clusters() {
        let o = p(Mode::New, &["-tTpDATA", "-sfoo", "a", "b"]).unwrap();
        assert_eq!(o.prefix.as_deref(), Some(&b"DATA"[..]));
        assert_eq!(o.source.as_deref(), Some("foo"));
        let o = p(Mode::New, &["-s", "foo", "a", "b"]).unwrap();
        assert_eq!(o.source.as_deref(), Some("foo"));
        assert!(matches!(p(Mode::New, &["-p"]), Err(Stop::Usage(Some(_)))));
        assert!(matches!(
            p(Mode::New, &["-x", "a", "b"]),
            Err(Stop::Usage(Some(_)))
        ));
    }

    #[test]
    fn old_mode_lacks_new_options() {
        assert!(matches!(
            p(Mode::Old, &["--use-stdin-socket", "a", "b"]),
            Err(Stop::Usage(Some(_)))
        ));
        assert!(matches!(
            p(Mode::Old, &["-s", "x", "a", "b"]),
            Err(Stop::Usage(Some(_)))
        ));
        assert!(matches!(
            p(Mode::Old, &["--source-qube=x", "a", "b"]),
            Err(Stop::Usage(Some(_)))
        ));
        assert!(p(Mode::Old, &["-p", "x", "a", "b"]).is_ok());
    }

    #[test]
    fn help_and_counts() {
        assert_eq!(p(Mode::New, &["-h"]).unwrap_err(), Stop::Help);
        assert_eq!(p(Mode::Old, &["--he"]).unwrap_err(), Stop::Help);
        assert_eq!(p(Mode::New, &["a"]).unwrap_err(), Stop::Usage(None));
        assert!(matches!(
            p(Mode::New, &["--use-stdin-socket", "a", "b", "/bin/cat"]),
            Err(Stop::Usage(Some(_)))
        ));
        assert!(matches!(
            p(Mode::New, &["-p", "x", "-p", "y", "a", "b"]),
            Err(Stop::Usage(Some(_)))
        ));
        assert!(usage_text("q", Mode::New).contains("--use-stdin-socket"));
        assert!(!usage_text("q", Mode::Old).contains("--use-stdin-socket"));
    }

    #[test]
    fn buffer_size() {
        assert_eq!(check_buffer_size(b"65536"), Ok(65536));
        assert_eq!(check_buffer_size(b"0x100"), Ok(256));
        assert_eq!(check_buffer_size(b"010"), Ok(8));
        assert!(check_buffer_size(b"").is_err());
        assert!(check_buffer_size(b"12k").is_err());
        assert!(check_buffer_size(b"x1").is_err());
        assert!(check_buffer_size(b"99999999999").is_err());
    }
}
