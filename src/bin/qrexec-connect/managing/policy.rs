//! The dom0 policy a client qube's bindings need (`qrexec-connect policy`).
//!
//! dom0's policy is the Qubes security boundary, so the one promise here is
//! that the rules never allow more than the bindings ask for: every rule
//! allows exactly one call a binding makes, from exactly this qube. The
//! format is the R4.1+ one of `/etc/qubes/policy.d/*.policy`, and the lines
//! follow `docs/policy-lines.md`, shared with the Salt formula:
//!
//! ```text
//! SERVICE +ARGUMENT SOURCE TARGET allow [target=QUBE]
//! ```
//!
//! * ARGUMENT is the binding's argument, exactly; a binding without one
//!   calls the service without one, and qrexec reads the rule's bare `+`
//!   as exactly that call (`*` would allow every argument: any port of
//!   `qubes.ConnectTCP`, any client's address of `qubes.ConnectNFS`). A
//!   service whose argument is a right ([`PINNED_SERVICES`]) must have one:
//!   the policy is refused, naming the binding's `FILE:LINE`.
//! * SOURCE is a qube name by the project's one rule ([`is_vm_name`]), from
//!   `--source` or `qubesdb-read /name`; anything else (`@anyvm`, `*`,
//!   `@tag:x`, an empty name, a newline) is refused before anything is
//!   printed, since it would widen the rule to other qubes or break the
//!   line. `dom0` is refused too: qrexec reads that name as `@adminvm`.
//! * TARGET is the token that means the qube the binding asks for, as
//!   qrexec-client-vm passes it to dom0: `$` becomes `@` (so `$default` is
//!   written `@default`, not as a qube named `$default`), `dom0` is written
//!   `@adminvm`, and a target left to policy (`''`, `@default`) gets
//!   `@default allow target=CHOOSE-A-QUBE` with a comment saying to choose
//!   it: only the dom0 administrator knows which qube serves it.
//!
//! Every text from outside that goes into a comment (a LISTEN, a config
//! file's `FILE:LINE`, a unit file's path) passes through the project's one
//! [`printable`] rule, so no control, bidi or invisible character reaches
//! the file and no comment can carry a second line.
//!
//! The output is meant for `/etc/qubes/policy.d/30-qrexec-connect-SOURCE.policy`
//! ([`file_name`]): a file per client qube, so that installing one qube's
//! policy never replaces another's. Its first comment and stderr say to read
//! it before installing it, and give the dom0 commands that fetch it into a
//! file, show it and copy it there ([`install_steps`]): what a client qube
//! prints is only a proposal until dom0's administrator has read it.
//!
//! A service that is not part of Qubes gets a comment on what its service
//! qube needs. Unlike the Salt formula's file, which holds every client's
//! rules, this one holds one qube's: it ends with no `qubes.ConnectNFS *
//! @anyvm @anyvm deny`, which would refuse the other clients' rules in files
//! that sort after it.
//!
//! The bindings are the config's (read with the generator's own grammar)
//! plus hand-written `qrexec-connect-*.socket` units, which only the user
//! manager knows of: one `list-units`, then `systemctl show` only for the
//! units the config does not name (`show` costs milliseconds per unit, so
//! asking it about every generated unit made 2,000 bindings take seconds).

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsStr;
use std::fmt::{self, Write as _};
use std::process::{Command, ExitCode};

use qrexec_connect_binding::address::Specifiers;
use qrexec_connect_binding::destination::{is_vm_name, Destination, MAX_VM_NAME};
use qrexec_connect_generator::config::{printable, Config, ConfigDirs};

use super::manager;
use crate::cli::{self, Usage, UsageError};

/// What the policy needs of one binding.
#[derive(Debug, Clone)]
pub struct PolicyBinding {
    /// The LISTEN as written, for the comments.
    pub listen: String,
    /// Where it comes from: `FILE:LINE`, or a unit file's path.
    pub source: String,
    pub destination: Destination,
}

/// The placeholder for a target that policy must choose.
pub const CHOOSE: &str = "CHOOSE-A-QUBE";

/// The directory of dom0's policy files (R4.1 and later).
pub const POLICY_DIR: &str = "/etc/qubes/policy.d";

/// Services whose argument is a right of its own: `qubes.ConnectNFS`'s is
/// the address the NFS server sees the client as, which decides the
/// exports it gets. A binding of one without an argument is refused, as
/// the Salt formula refuses it.
pub const PINNED_SERVICES: [&str; 1] = ["qubes.ConnectNFS"];

/// The rule a `--source` name or this qube's name must follow.
fn qube_name_rule() -> String {
    format!(
        "a qube name is a letter, then letters, digits, '_' or '-', at most {MAX_VM_NAME} \
         characters (not a keyword such as @anyvm, not *, not dom0)"
    )
}

/// The SOURCE of every rule: a qube name, checked once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QubeName(String);

impl QubeName {
    /// Accepts only a qube name ([`is_vm_name`]), and not `dom0`, which
    /// qrexec reads as the keyword `@adminvm` (and which runs no bindings).
    pub fn parse(text: &str) -> Result<QubeName, PolicyError> {
        if is_vm_name(text) && text != "dom0" {
            Ok(QubeName(text.to_owned()))
        } else {
            Err(PolicyError::NotAQubeName {
                given: printable(text.as_bytes()),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why no policy is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// The source is not a qube name (shown printable).
    NotAQubeName { given: String },
    /// A binding of a [pinned](PINNED_SERVICES) service without argument.
    MissingArgument { service: String, source: String },
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::NotAQubeName { given } => {
                write!(f, "\"{given}\" is not a qube name: {}", qube_name_rule())
            }
            PolicyError::MissingArgument { service, source } => write!(
                f,
                "{source}: {service} needs its argument, the address the NFS server sees this \
                 client as ({service}+ADDRESS): without one it is no binding dom0 should allow"
            ),
        }
    }
}

/// The TARGET column for a binding, and the `target=` it needs: the token
/// that means exactly the qube the call asks for, as dom0 receives it.
fn target_tokens(destination: &Destination) -> (String, Option<&'static str>) {
    // qrexec-client-vm turns every `$` into `@` before asking dom0.
    let asked = destination.target.as_str().replace('$', "@");
    match asked.as_str() {
        "" | "@default" => ("@default".to_owned(), Some(CHOOSE)),
        // qrexec reads the name dom0 as @adminvm, in a call and in a rule.
        "dom0" => ("@adminvm".to_owned(), None),
        _ => (asked, None),
    }
}

/// The SERVICE and ARGUMENT columns: the argument exactly, `+` alone for
/// none (qrexec evaluates a call without argument as the empty argument).
fn service_columns(destination: &Destination) -> (&str, &str) {
    let service = destination.service.as_str();
    match service.split_once('+') {
        Some((name, _)) => (name, &service[name.len()..]),
        None => (service, "+"),
    }
}

/// The policy for `source`'s `bindings`: one rule per distinct call, in
/// the order of the bindings, rules for `@dispvm` first; refused if any
/// binding cannot be allowed exactly. (A rule for `@dispvm:T` also takes
/// a call asking for `@dispvm` when T is the qube's default disposable
/// template. Here that sends it where its own rule would, but the Salt
/// formula can redirect `@dispvm`, and both write one format.)
pub fn rules(source: &QubeName, bindings: &[PolicyBinding]) -> Result<String, PolicyError> {
    let mut text = header(source);
    let source = source.as_str();
    if bindings.is_empty() {
        text += "# (no bindings)\n";
        return Ok(text);
    }
    let (dispvm, others): (Vec<&PolicyBinding>, Vec<&PolicyBinding>) = bindings
        .iter()
        .partition(|binding| target_tokens(&binding.destination).0 == "@dispvm");
    let mut written = HashSet::new();
    let mut services = BTreeSet::new();
    for binding in dispvm.into_iter().chain(others) {
        let (name, argument) = service_columns(&binding.destination);
        if argument == "+" && PINNED_SERVICES.contains(&name) {
            return Err(PolicyError::MissingArgument {
                service: name.to_owned(),
                source: printable(binding.source.as_bytes()),
            });
        }
        let (target, redirect) = target_tokens(&binding.destination);
        let mut rule = format!("{name} {argument} {source} {target} allow");
        if let Some(qube) = redirect {
            let _ = write!(rule, " target={qube}");
        }
        if written.contains(&rule) {
            continue;
        }
        if redirect.is_some() {
            let _ = writeln!(
                text,
                "# {} ({}) leaves the qube to policy: replace {CHOOSE} with the qube that serves it.",
                printable(binding.listen.as_bytes()),
                printable(binding.source.as_bytes())
            );
        }
        text += &rule;
        text.push('\n');
        written.insert(rule);
        services.insert(name);
    }
    for note in services.into_iter().filter_map(service_note) {
        text += &note;
    }
    Ok(text)
}

/// The comment that opens the policy: whose it is, to read it, and how to
/// install it (the file name and the commands of [`install_steps`]).
fn header(source: &QubeName) -> String {
    let mut text = format!(
        "# qrexec-connect: what {} may call, one rule per binding.\n\
         # Read it before you install it: dom0's policy is the security boundary.\n\
         # Install it in dom0 as {POLICY_DIR}/{}; in dom0:\n",
        source.as_str(),
        file_name(source)
    );
    for step in install_steps(source) {
        let _ = writeln!(text, "#   {step}");
    }
    text
}

/// The dom0 policy files the project names itself (the shared NFS file, the
/// examples, the Salt formula's file): none is ever a qube's [`file_name`].
/// Only the tests read the list here; `tests/salt.rs` and
/// `tests/policy_examples.rs` include the same file.
#[cfg(test)]
mod fixed_files;

/// The name of `source`'s file in [`POLICY_DIR`]:
/// `30-qrexec-connect-SOURCE.policy`, one per client qube, so installing one
/// qube's policy never replaces another's. qrexec reads the files in C
/// order and takes the first matching rule, and this name sorts before
/// `30-user.policy`: an administrator's deny there does not override the
/// allows here; one that must win goes in a file that sorts earlier
/// (`20-...`), as the README says.
///
/// qrexec reads only names made of `[0-9a-z_.-]`, and refuses every call
/// while `policy.d` holds a `*.policy` file named otherwise; a qube name may
/// hold capitals (`Work`), so each capital is written as `.` and its lower
/// case (`30-qrexec-connect-.work.policy`): a qube name holds no `.`, so two
/// qubes never get the same name. The project's own files
/// (`fixed_files.rs`) have a `.` where this name has the `-` after
/// `30-qrexec-connect`, so no qube's file is ever one of them: a qube
/// named `nfs` or `salt` gets a file of its own, not the shared NFS file or
/// the Salt formula's.
pub fn file_name(source: &QubeName) -> String {
    let mut name = String::from("30-qrexec-connect-");
    for c in source.as_str().chars() {
        if c.is_ascii_uppercase() {
            name.push('.');
        }
        name.push(c.to_ascii_lowercase());
    }
    name + ".policy"
}

/// The dom0 commands that fetch `source`'s policy into dom0, show it, and
/// copy it into [`POLICY_DIR`]. Fetched to a file first, not straight into
/// `policy.d`: what the client qube prints is only a proposal until dom0's
/// administrator has read it (a compromised qube could print any rule), and
/// `less` shows control characters escaped.
pub fn install_steps(source: &QubeName) -> [String; 3] {
    let file = file_name(source);
    [
        format!(
            "qvm-run --pass-io {} 'qrexec-connect policy' > {file}",
            source.as_str()
        ),
        format!("less {file}"),
        format!("sudo cp {file} {POLICY_DIR}/"),
    ]
}

/// [`rules`] for one-line uses (`status`'s hints): the policy, or, when it
/// cannot be written, a comment saying why (never a rule).
pub fn render(source_qube: &str, bindings: &[PolicyBinding]) -> String {
    match QubeName::parse(source_qube).and_then(|source| rules(&source, bindings)) {
        Ok(text) => text,
        Err(error) => format!("# {}\n", printable(error.to_string().as_bytes())),
    }
}

/// What the service qube needs for a service that Qubes does not ship.
fn service_note(name: &str) -> Option<String> {
    match name {
        "qubes.ConnectTCP" => None,
        "qubes.ConnectNFS" => Some(format!(
            "# {name}: install the qrexec-connect-nfs package (or run \
             'make install-connectnfs') in the service qube's template.\n"
        )),
        _ => Some(format!(
            "# {name} is not part of Qubes. For a socket service, the service qube needs\n\
             # /etc/qubes-rpc/{name} as a symlink to the service's socket, and\n\
             # /etc/qubes/rpc-config/{name} with the line skip-service-descriptor=true.\n"
        )),
    }
}

/// `qrexec-connect policy [--source NAME]`: the dom0 policy for this qube's
/// bindings on stdout and how to install it on stderr, or nothing on stdout
/// and why on stderr. 0; 1 when the name of this qube or a binding is
/// wrong; 2 for a `--source` that is not a qube name (`cli.rs` checked the
/// rest of the command line).
pub fn run(given: Option<&OsStr>) -> ExitCode {
    let source = match given {
        Some(given) => match given.to_str().map(QubeName::parse) {
            Some(Ok(source)) => source,
            Some(Err(error)) => return source_error(error),
            None => {
                return source_error(PolicyError::NotAQubeName {
                    given: printable(given.as_encoded_bytes()),
                })
            }
        },
        None => match own_name() {
            Ok(source) => source,
            Err(message) => {
                eprintln!("qrexec-connect policy: {message}");
                return ExitCode::FAILURE;
            }
        },
    };
    let bindings = bindings();
    match rules(&source, &bindings) {
        Ok(text) => {
            print!("{text}");
            eprint!("{}", install_advice(&source));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("qrexec-connect policy: {error}; no policy written");
            ExitCode::FAILURE
        }
    }
}

/// A `--source` that is not a qube name: a usage error.
fn source_error(error: PolicyError) -> ExitCode {
    cli::usage_error(&UsageError {
        usage: Usage::Command("policy"),
        message: format!("--source {error}"),
    })
}

/// What stderr says after the policy: read it, and how to install it.
fn install_advice(source: &QubeName) -> String {
    let mut text = format!(
        "qrexec-connect policy: read this policy before you install it in dom0: it decides \
         what {} may call. In dom0, to copy it to {POLICY_DIR}/{}:\n",
        source.as_str(),
        file_name(source)
    );
    for step in install_steps(source) {
        let _ = writeln!(text, "  {step}");
    }
    text
}

/// This qube's name, from `qubesdb-read /name`, checked like `--source`.
pub fn own_name() -> Result<QubeName, String> {
    let unknown = "cannot tell this qube's name ('qubesdb-read /name' failed): give it with \
                   --source NAME";
    let output = Command::new("qubesdb-read")
        .arg("/name")
        .output()
        .map_err(|_| unknown.to_owned())?;
    if !output.status.success() {
        return Err(unknown.to_owned());
    }
    // qubesdb-read ends the value with one newline.
    let name = output.stdout.strip_suffix(b"\n").unwrap_or(&output.stdout);
    let parsed = match std::str::from_utf8(name) {
        Ok(name) => QubeName::parse(name),
        Err(_) => Err(PolicyError::NotAQubeName {
            given: printable(name),
        }),
    };
    parsed.map_err(|error| {
        format!("'qubesdb-read /name' gave {error}; give the name with --source NAME")
    })
}

/// The bindings the policy allows: the config's, then hand-written units'.
/// Config lines that are not bindings get no rule; stderr says how many.
fn bindings() -> Vec<PolicyBinding> {
    let config = Config::load(&ConfigDirs::from_env(), Specifiers::from_env());
    let skipped = config
        .problems
        .iter()
        .filter(|problem| !problem.is_warning())
        .count();
    if skipped > 0 {
        eprintln!(
            "qrexec-connect policy: {skipped} problem(s) in the config: lines or files that are \
             not bindings get no rule ('qrexec-connect-generator --check' lists them)"
        );
    }
    let mut bindings: Vec<PolicyBinding> = config
        .bindings
        .iter()
        .map(|binding| PolicyBinding {
            listen: binding.listen().to_string(),
            source: binding.source().to_string(),
            destination: binding.destination().clone(),
        })
        .collect();
    let config_units: HashSet<&str> = config.bindings.iter().map(|b| b.unit_name()).collect();
    match hand_written(&config_units) {
        Ok(units) => bindings.extend(units),
        Err(error) => eprintln!(
            "qrexec-connect policy: hand-written units are left out: {}",
            printable(error.to_string().as_bytes())
        ),
    }
    bindings
}

/// The `qrexec-connect-*.socket` units that are not the config's and not
/// generated, and that are loaded or still listening: socket units written
/// by hand, with a `FileDescriptorName=` the daemon accepts.
fn hand_written(config_units: &HashSet<&str>) -> std::io::Result<Vec<PolicyBinding>> {
    let listed = manager::socket_units()?;
    let others: Vec<&str> = listed
        .iter()
        .map(|unit| unit.name.as_str())
        .filter(|name| !config_units.contains(name))
        .collect();
    let mut properties = manager::SOCKET_PROPERTIES.to_vec();
    properties.push("FragmentPath");
    let text = manager::show(&properties, &others)?;
    Ok(text.split("\n\n").filter_map(hand_written_unit).collect())
}

/// One block of `systemctl show`, if it is a hand-written binding.
fn hand_written_unit(block: &str) -> Option<PolicyBinding> {
    let (mut load, mut active, mut fd_name, mut fragment) = ("", "", None, "");
    let mut listen = Vec::new();
    for line in block.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "LoadState" => load = value,
            "ActiveState" => active = value,
            // Unit files cannot hold a second one; two mean a garbled block.
            "FileDescriptorName" if fd_name.is_some() => return None,
            "FileDescriptorName" => fd_name = Some(value),
            "FragmentPath" => fragment = value,
            // `ADDRESS (TYPE)`, one line per address.
            "Listen" => listen.push(value.rsplit_once(" (").map_or(value, |(a, _)| a)),
            _ => {}
        }
    }
    let generated = fragment.contains("/systemd/generator");
    let gone = load != "loaded" && matches!(active, "inactive" | "failed" | "");
    if generated || gone {
        return None;
    }
    Some(PolicyBinding {
        listen: listen.join(" "),
        source: fragment.to_owned(),
        destination: Destination::from_fd_name(fd_name?).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(listen: &str, fd_name: &str) -> PolicyBinding {
        PolicyBinding {
            listen: listen.into(),
            source: "/home/user/.config/qrexec-connect/a.conf:1".into(),
            destination: Destination::from_fd_name(fd_name).unwrap(),
        }
    }

    fn rule_lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    fn work() -> QubeName {
        QubeName::parse("work").unwrap()
    }

    /// The format the Salt formula writes too: there, a `@dispvm` rule may
    /// send its calls to another template than an earlier `@dispvm:T` rule,
    /// which would otherwise take them when T is the default.
    #[test]
    fn rules_for_dispvm_come_first() {
        let text = rules(
            &work(),
            &[
                binding("127.0.0.1:8080", "@dispvm/web-dvm my.Svc"),
                binding("127.0.0.1:8081", "ssh-server qubes.ConnectTCP+22"),
                binding("127.0.0.1:8082", "$dispvm my.Svc"),
            ],
        )
        .unwrap();
        assert_eq!(
            rule_lines(&text),
            [
                "my.Svc + work @dispvm allow",
                "my.Svc + work @dispvm:web-dvm allow",
                "qubes.ConnectTCP +22 work ssh-server allow",
            ]
        );
    }

    #[test]
    fn one_exact_rule_per_call() {
        let text = rules(
            &work(),
            &[
                binding("127.0.0.1:2222", "ssh-server qubes.ConnectTCP+22"),
                binding("[::1]:2222", "ssh-server qubes.ConnectTCP+22"),
                binding("%t/agent", "@default qubes.ConnectSSHAgent"),
                binding("127.0.0.1:2049", "nfs qubes.ConnectNFS+127.0.1.1"),
            ],
        )
        .unwrap();
        assert_eq!(
            rule_lines(&text),
            [
                "qubes.ConnectTCP +22 work ssh-server allow",
                "qubes.ConnectSSHAgent + work @default allow target=CHOOSE-A-QUBE",
                "qubes.ConnectNFS +127.0.1.1 work nfs allow",
            ]
        );
        assert!(text.contains("# %t/agent (/home/user/.config/qrexec-connect/a.conf:1) leaves"));
        assert!(text.contains("/etc/qubes-rpc/qubes.ConnectSSHAgent as a symlink"));
        assert!(text.contains("install the qrexec-connect-nfs package"));
        assert!(!text.contains("qubes.ConnectTCP is not part"));
    }

    #[test]
    fn every_target_spelling_gets_the_token_that_means_it() {
        for (fd_name, rule) in [
            ("'' s", "s + work @default allow target=CHOOSE-A-QUBE"),
            ("@default s", "s + work @default allow target=CHOOSE-A-QUBE"),
            ("$default s", "s + work @default allow target=CHOOSE-A-QUBE"),
            ("@dispvm s", "s + work @dispvm allow"),
            ("$dispvm s", "s + work @dispvm allow"),
            ("@dispvm/tpl s", "s + work @dispvm:tpl allow"),
            ("$dispvm/tpl s", "s + work @dispvm:tpl allow"),
            ("@adminvm s", "s + work @adminvm allow"),
            ("$adminvm s", "s + work @adminvm allow"),
            ("dom0 s", "s + work @adminvm allow"),
            ("vault s", "s + work vault allow"),
            ("vault s+", "s + work vault allow"),
            ("vault s+a+b", "s +a+b work vault allow"),
        ] {
            let text = rules(&work(), &[binding("%t/x", fd_name)]).unwrap();
            assert_eq!(rule_lines(&text), [rule], "{fd_name}");
        }
    }

    #[test]
    fn a_source_must_be_a_qube_name() {
        for bad in [
            "",
            "@anyvm",
            "*",
            "@tag:x",
            "$anyvm",
            "dom0",
            "@adminvm",
            "work srv allow\nqubes.ConnectTCP * @anyvm @anyvm",
            "work\n",
            " work",
            "1work",
            "wörk",
            &"a".repeat(MAX_VM_NAME + 1),
        ] {
            let error = QubeName::parse(bad).unwrap_err().to_string();
            assert!(
                error.contains("a qube name is a letter"),
                "{bad:?}: {error}"
            );
            assert!(!error.contains('\n'), "{bad:?}: {error}");
        }
        QubeName::parse(&"a".repeat(MAX_VM_NAME)).unwrap();
    }

    #[test]
    fn a_pinned_service_without_argument_is_refused() {
        for fd_name in ["nfs qubes.ConnectNFS", "nfs qubes.ConnectNFS+"] {
            let error = rules(&work(), &[binding("127.0.0.1:2049", fd_name)]).unwrap_err();
            assert!(error
                .to_string()
                .starts_with("/home/user/.config/qrexec-connect/a.conf:1: "));
        }
    }

    #[test]
    fn comments_show_outside_text_printable() {
        let mut hostile = binding("%t/\u{202e}x\u{200b}", "'' s");
        hostile.source = "/tmp/a\nqubes.ConnectTCP * @anyvm @anyvm allow\r.socket".into();
        let text = rules(&work(), &[hostile]).unwrap();
        assert!(
            text.contains("%t/\\u{202e}x\\u{200b} (/tmp/a\\x0aqubes"),
            "{text}"
        );
        assert_eq!(
            rule_lines(&text),
            ["s + work @default allow target=CHOOSE-A-QUBE"]
        );
        assert!(!text.contains(['\r', '\u{202e}', '\u{200b}']));
    }

    #[test]
    fn a_hint_never_shows_a_rule_it_cannot_write() {
        let text = render("@anyvm", &[binding("%t/x", "vault s")]);
        assert_eq!(rule_lines(&text), Vec::<&str>::new(), "{text}");
        assert!(
            text.starts_with("# \"@anyvm\" is not a qube name"),
            "{text}"
        );
    }

    #[test]
    fn each_qube_gets_its_own_file_in_the_characters_qrexec_reads() {
        let name = |qube: &str| file_name(&QubeName::parse(qube).unwrap());
        assert_eq!(name("work"), "30-qrexec-connect-work.policy");
        assert_eq!(name("Work"), "30-qrexec-connect-.work.policy");
        assert_eq!(name("a_B-c9"), "30-qrexec-connect-a_.b-c9.policy");
        let qubes = ["ab", "aB", "Ab", "AB", "a_b", "a-b", "a.b"];
        let names: HashSet<String> = qubes
            .iter()
            .filter(|q| QubeName::parse(q).is_ok())
            .map(|q| name(q))
            .collect();
        assert_eq!(names.len(), 6);
        for file in &names {
            assert!(
                file.bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'z' | b'_' | b'.' | b'-')),
                "{file}"
            );
        }
    }

    /// The qubes whose names are in the project's own file names, and any
    /// other qube name, get a file that is none of the project's.
    #[test]
    fn no_qube_gets_a_file_the_project_names_itself() {
        use super::fixed_files::FIXED_POLICY_FILES;
        let name = |qube: &str| file_name(&QubeName::parse(qube).unwrap());
        for fixed in FIXED_POLICY_FILES {
            assert!(
                !fixed.starts_with("30-qrexec-connect-"),
                "{fixed} is in the name space of the qubes' files"
            );
        }
        for qube in [
            "nfs",
            "Nfs",
            "NFS",
            "salt",
            "Salt",
            "tcp",
            "ssh-agent",
            "policy",
        ] {
            let file = name(qube);
            assert!(
                !FIXED_POLICY_FILES.contains(&file.as_str()),
                "qube {qube} gets {file}, a file the project names itself"
            );
        }
        proptest::proptest!(|(qube in "[a-zA-Z][a-zA-Z0-9_-]{0,30}")| {
            proptest::prop_assume!(qube != "dom0");
            let file = name(&qube);
            proptest::prop_assert!(
                !FIXED_POLICY_FILES.contains(&file.as_str()),
                "qube {} gets {}, a file the project names itself", qube, file
            );
            // What file_name's doc says: before the administrator's file.
            proptest::prop_assert!(file.as_str() < "30-user.policy", "{}", file);
        });
    }

    #[test]
    fn hand_written_units_are_read_from_show_blocks() {
        let block = "Id=qrexec-connect-hand.socket\nLoadState=loaded\nActiveState=active\n\
                     Listen=/run/user/1000/hand (Stream)\nFileDescriptorName=vault svc+1\n\
                     FragmentPath=/home/u/.config/systemd/user/qrexec-connect-hand.socket";
        let binding = hand_written_unit(block).unwrap();
        assert_eq!(binding.listen, "/run/user/1000/hand");
        assert_eq!(binding.destination.to_string(), "vault svc+1");
        let generated = block.replace(
            "/home/u/.config/systemd/user",
            "/run/user/1000/systemd/generator",
        );
        assert!(hand_written_unit(&generated).is_none());
        let twice = format!("{block}\nFileDescriptorName=@anyvm svc");
        assert!(hand_written_unit(&twice).is_none());
        let gone = block
            .replace("LoadState=loaded", "LoadState=not-found")
            .replace("=active", "=inactive");
        assert!(hand_written_unit(&gone).is_none());
    }
}
