//! The Salt formula (`salt/`): applied for real with `salt-call --local` (the
//! Salt of `make salt-venv`), as `qubesctl` would in dom0 and in each qube,
//! against a private root: `/etc` and `/home` are overlays whose upper
//! directories are the test's own, in a mount namespace of each run, so the
//! host never changes. Needs root (mounts), as the other system tests do.

mod common;
#[path = "../src/bin/qrexec-connect/managing/policy/fixed_files.rs"]
mod fixed_files;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TempDir, GENERATOR};
use qrexec_connect_binding::destination::is_vm_name;
use qrexec_connect_generator::config::is_invisible;
use qubes_policy::{check_policy_file, evaluate, Action, Argument, Call, PolicyLine, Verdict};

const POLICY: &str = "etc/qubes/policy.d/30-qrexec-connect.salt.policy";
const SALT_CONF: &str = "home/user/.config/qrexec-connect/salt.conf";

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `salt-call` from `make salt-venv`, or `$QREXEC_CONNECT_SALT_CALL`.
/// Missing, it fails the test: these tests never pass by not running.
fn salt_call() -> PathBuf {
    let path = std::env::var_os("QREXEC_CONNECT_SALT_CALL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/salt-venv/bin/salt-call"));
    assert!(
        path.is_file(),
        "{} not found: run make salt-venv (or make test, which runs it)",
        path.display()
    );
    path
}

/// What `salt-call state.apply` did.
struct Run {
    success: bool,
    changed: usize,
    output: String,
}

/// A private root for Salt: the overlays' upper directories, where every
/// file the states write lands, with `user` (a free uid) and the `qubes`
/// group added to private copies of /etc/passwd and /etc/group.
struct SaltRoot {
    dir: TempDir,
    uid: u32,
    qubes_gid: u32,
}

impl SaltRoot {
    fn new() -> SaltRoot {
        let dir = TempDir::new("salt");
        let root = dir.path().to_owned();
        for sub in ["etc/upper", "etc/work", "home/upper", "home/work", "pillar"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        let passwd = read(Path::new("/etc/passwd"));
        let group = read(Path::new("/etc/group"));
        let ids_in = |text: &str, field: usize| -> Vec<u32> {
            text.lines()
                .filter_map(|l| l.split(':').nth(field)?.parse().ok())
                .collect()
        };
        let (uids, gids) = (ids_in(&passwd, 2), ids_in(&group, 2));
        let uid = (1000..60000)
            .find(|n| !uids.contains(n) && !gids.contains(n))
            .unwrap();
        let qubes_gid = (uid + 1..60000).find(|n| !gids.contains(n)).unwrap();
        let without = |text: &str, names: &[&str]| -> String {
            text.lines()
                .filter(|l| !names.iter().any(|n| l.starts_with(&format!("{n}:"))))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        let upper = root.join("etc/upper");
        fs::write(
            upper.join("passwd"),
            without(&passwd, &["user"]) + &format!("user:x:{uid}:{uid}::/home/user:/bin/sh\n"),
        )
        .unwrap();
        fs::write(
            upper.join("group"),
            without(&group, &["user", "qubes"]) + &format!("user:x:{uid}:\nqubes:x:{qubes_gid}:\n"),
        )
        .unwrap();
        // dom0 has this directory; a client qube's home has the user's.
        fs::create_dir_all(upper.join("qubes/policy.d")).unwrap();
        let home = root.join("home/upper/user");
        fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(uid), Some(uid)).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();

        fs::write(
            root.join("pillar/top.sls"),
            "base:\n  '*':\n    - qrexec-connect\n",
        )
        .unwrap();
        fs::write(
            root.join("minion"),
            format!(
                "file_client: local\nroot_dir: {root}/salt\nfile_roots: {{base: [{formula}]}}\n\
                 pillar_roots: {{base: [{root}/pillar]}}\nenable_fqdns_grains: False\n",
                root = root.display(),
                formula = repo().join("salt").display()
            ),
        )
        .unwrap();
        let salt_root = SaltRoot {
            dir,
            uid,
            qubes_gid,
        };
        salt_root.set_pillar(&read(&repo().join("salt/pillar.example")));
        salt_root
    }

    /// From now on `user` is logged in: the runs see a private
    /// `/run/user/UID` owned by `user`, mode 0700, as systemd-logind makes it.
    fn log_in(&self) {
        fs::write(self.dir.path().join("logged-in"), "").unwrap();
    }

    /// The user's home as the states left it (`.config` and below).
    fn home(&self) -> PathBuf {
        self.file("home/user")
    }

    fn set_pillar(&self, yaml: &str) {
        fs::write(self.dir.path().join("pillar/qrexec-connect.sls"), yaml).unwrap();
    }

    /// A file as the states left it (in the overlay's upper directory).
    fn file(&self, path: &str) -> PathBuf {
        let (top, rest) = path.split_once('/').unwrap();
        self.dir.path().join(top).join("upper").join(rest)
    }

    fn exists(&self, path: &str) -> bool {
        fs::symlink_metadata(self.file(path)).is_ok_and(|m| m.is_file())
    }

    /// `salt-call --local` as minion `id`, in its own mount namespace with
    /// the private /etc and /home, and the generator of this build on PATH
    /// (as the package puts it in a client qube).
    fn salt(&self, id: &str, args: &[&str]) -> (bool, String) {
        let root = self.dir.path();
        let generator = GENERATOR.path();
        let generator_dir = generator.parent().unwrap();
        let path = format!(
            "{}:{}",
            generator_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let output = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "for d in etc home; do \
                   mount -t overlay overlay \
                     -o lowerdir=/$d,upperdir=$0/$d/upper,workdir=$0/$d/work /$d || exit 99; \
                 done; \
                 if [ -e \"$0/logged-in\" ]; then \
                   { [ -d /run/user ] || mkdir -m 0755 /run/user; } \
                   && mount -t tmpfs -o mode=0755 tmpfs /run/user \
                   && install -d -m 0700 -o \"$UID_OF_USER\" -g \"$UID_OF_USER\" \
                        /run/user/\"$UID_OF_USER\" || exit 99; \
                 fi; exec \"$@\"",
            )
            .arg(root)
            .arg(salt_call())
            .args(["--local", "--retcode-passthrough", "--no-color"])
            .arg(format!("--config-dir={}", root.display()))
            .arg(format!("--id={id}"))
            .args(args)
            .env("PATH", path)
            .env("UID_OF_USER", self.uid.to_string())
            .output()
            .expect("unshare runs (this test needs root)");
        assert_ne!(
            output.status.code(),
            Some(99),
            "could not mount the private root: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    fn apply(&self, id: &str, sls: &str) -> Run {
        let (success, output) = self.salt(id, &["state.apply", sls]);
        Run {
            success,
            changed: changed_count(&output),
            output,
        }
    }

    /// Applies and insists on success.
    fn apply_ok(&self, id: &str, sls: &str) -> Run {
        let run = self.apply(id, sls);
        assert!(run.success, "{sls} as {id} failed:\n{}", run.output);
        run
    }
}

/// The `(changed=N)` of Salt's summary; none written means 0.
fn changed_count(output: &str) -> usize {
    output
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("Succeeded:")?;
            Some(
                rest.split_once("(changed=")
                    .and_then(|(_, n)| n.trim_end_matches(')').parse().ok())
                    .unwrap_or(0),
            )
        })
        .unwrap_or_else(|| panic!("no summary in Salt's output:\n{output}"))
}

/// The lines that are not comments, each with its newline: what the
/// generator and qrexec read.
fn rule_lines(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn expected(name: &str) -> String {
    read(&repo().join("tests/salt/expected").join(name))
}

fn policy_rules(text: &str) -> Vec<PolicyLine> {
    check_policy_file(text)
        .unwrap_or_else(|e| panic!("the policy the formula wrote is refused: {e}\n{text}"))
        .into_iter()
        .map(|(_, rule)| rule)
        .collect()
}

/// The `yaml` block of the README's Salt section.
fn readme_pillar() -> String {
    let readme = read(&repo().join("README.md"));
    let section = readme
        .split_once("## Many qubes from dom0 (Salt)")
        .expect("README has its Salt section")
        .1;
    let block = section.split_once("```yaml\n").expect("a yaml block").1;
    block.split_once("```").unwrap().0.to_owned()
}

/// The README's examples: (client, config line, qube the call must reach).
const EXAMPLE_CALLS: [(&str, &str, &str); 3] = [
    (
        "ssh-client",
        "127.0.0.1:2222 ssh-server qubes.ConnectTCP+22",
        "ssh-server",
    ),
    (
        "ssh-client",
        "%t/qrexec-connect/ssh-agent @default qubes.ConnectSSHAgent",
        "vault",
    ),
    (
        "nfs-client",
        "127.0.0.1:2049 nfs-server qubes.ConnectNFS+127.0.1.1",
        "nfs-server",
    ),
];

/// The README's examples as pillar bindings.
fn example_bindings() -> Vec<Binding<'static>> {
    EXAMPLE_CALLS
        .iter()
        .map(|&(client, line, qube)| {
            let words: Vec<&str> = line.split(' ').collect();
            let binding = Binding::new(client, words[0], words[1], words[2]);
            if words[1] == qube {
                binding
            } else {
                binding.to(qube)
            }
        })
        .collect()
}

fn call<'a>(source: &'a str, line: &'a str) -> Call<'a> {
    let words: Vec<&str> = line.split(' ').collect();
    Call {
        source,
        target: words[1],
        service: words[2],
    }
}

/// A binding as a test writes it into the pillar.
#[derive(Debug, Clone, Copy)]
struct Binding<'a> {
    client: &'a str,
    listen: &'a str,
    target: &'a str,
    service: &'a str,
    policy_target: Option<&'a str>,
}

impl<'a> Binding<'a> {
    const fn new(client: &'a str, listen: &'a str, target: &'a str, service: &'a str) -> Self {
        Binding {
            client,
            listen,
            target,
            service,
            policy_target: None,
        }
    }

    const fn to(self, policy_target: &'a str) -> Self {
        Binding {
            policy_target: Some(policy_target),
            ..self
        }
    }

    /// The entry as a YAML flow mapping.
    fn yaml(&self) -> String {
        let mut fields = vec![
            ("client", yaml_str(self.client)),
            ("listen", yaml_str(self.listen)),
            ("target", yaml_str(self.target)),
            ("service", yaml_str(self.service)),
        ];
        if let Some(policy_target) = self.policy_target {
            fields.push(("policy_target", yaml_str(policy_target)));
        }
        flow(&fields)
    }

    /// The config line the client gets.
    fn line(&self) -> String {
        format!("{} {} {}", self.listen, self.target, self.service)
    }
}

/// A YAML double-quoted scalar holding exactly `text`: everything outside
/// printable ASCII escaped, as PyYAML refuses raw control characters in a
/// file but reads their escapes.
fn yaml_str(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if u32::from(c) <= 0xFFFF => write!(out, "\\u{:04x}", u32::from(c)).unwrap(),
            c => write!(out, "\\U{:08x}", u32::from(c)).unwrap(),
        }
    }
    out.push('"');
    out
}

/// `{key: value, ...}` from keys and YAML values.
fn flow(fields: &[(&str, String)]) -> String {
    let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", fields.join(", "))
}

/// A pillar whose `qrexec-connect:bindings` are these YAML entries.
fn bindings_pillar(entries: &[String]) -> String {
    let mut text = String::from("qrexec-connect:\n  bindings:\n");
    for entry in entries {
        writeln!(text, "    - {entry}").unwrap();
    }
    text
}

/// What an allow rule lets through: a call from `source` that asks for
/// `target` and `service` with `argument` (`+ARG`; `+` alone for none, `*`
/// for any), run in `reaches`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    source: String,
    target: String,
    service: String,
    argument: String,
    reaches: String,
}

/// The services whose every other call the formula denies (each argument
/// is one client's own right).
const PINNED: [&str; 1] = ["qubes.ConnectNFS"];

/// What the pillar asks for: one grant per binding, exactly its call.
fn asked(bindings: &[Binding<'_>]) -> BTreeSet<Grant> {
    bindings
        .iter()
        .map(|b| {
            let (service, argument) = b.service.split_once('+').unwrap_or((b.service, ""));
            Grant {
                source: b.client.into(),
                target: b.target.into(),
                service: service.into(),
                argument: format!("+{argument}"),
                reaches: b.policy_target.unwrap_or(b.target).into(),
            }
        })
        .collect()
}

/// Reads `text` with the Qubes policy parser (a rule qrexec would refuse
/// fails here) and checks that it grants exactly what `bindings` ask: the
/// set of its allow rules' grants is the pillar's, each binding's call is
/// allowed to its qube (no deny before it), and the only other rules are
/// one `SERVICE * @anyvm @anyvm deny` per pinned service in use, after every
/// allow.
fn assert_grants_exactly(text: &str, bindings: &[Binding<'_>]) {
    let rules = policy_rules(text);
    let mut grants = BTreeSet::new();
    let mut denies = BTreeSet::new();
    let mut last_allow = 0;
    let mut first_deny = rules.len();
    for (index, rule) in rules.iter().enumerate() {
        match rule.action {
            Action::Allow => {
                last_allow = index;
                grants.insert(Grant {
                    source: rule.source.clone(),
                    target: rule.target.clone(),
                    service: rule.service.clone().unwrap_or_else(|| "*".into()),
                    argument: match &rule.argument {
                        Argument::Any => "*".into(),
                        Argument::Exactly(a) => format!("+{a}"),
                    },
                    reaches: rule.param("target").unwrap_or(&rule.target).into(),
                });
            }
            Action::Deny => {
                first_deny = first_deny.min(index);
                denies.insert(rule.to_string());
            }
            Action::Ask => panic!("the formula wrote an ask rule: {rule}\n{text}"),
        }
    }
    assert_eq!(grants, asked(bindings), "what the policy allows\n{text}");
    let pinned_denies: BTreeSet<String> = PINNED
        .iter()
        .filter(|s| {
            bindings
                .iter()
                .any(|b| b.service.split('+').next() == Some(s))
        })
        .map(|s| format!("{s} * @anyvm @anyvm deny"))
        .collect();
    assert_eq!(denies, pinned_denies, "deny rules\n{text}");
    assert!(
        denies.is_empty() || last_allow < first_deny,
        "a deny rule before an allow rule\n{text}"
    );
    for b in bindings {
        let reaches = b.policy_target.unwrap_or(b.target);
        assert_eq!(
            evaluate(
                &rules,
                Call {
                    source: b.client,
                    target: b.target,
                    service: b.service,
                }
            ),
            Ok(Verdict::Allow {
                qube: reaches.into()
            }),
            "{b:?}\n{text}"
        );
    }
}

/// An entry a hostile or careless pillar may hold, and what the error that
/// names it must say: `key` (the field it starts with) and `why`.
struct Refused {
    yaml: String,
    key: &'static str,
    why: &'static str,
}

/// The entry `base` with `key` set to the YAML `value`.
fn with_field(base: Binding<'_>, key: &str, value: String) -> String {
    let mut fields = vec![
        ("client", yaml_str(base.client)),
        ("listen", yaml_str(base.listen)),
        ("target", yaml_str(base.target)),
        ("service", yaml_str(base.service)),
    ];
    if let Some(policy_target) = base.policy_target {
        fields.push(("policy_target", yaml_str(policy_target)));
    }
    match fields.iter_mut().find(|(k, _)| *k == key) {
        Some(field) => field.1 = value,
        None => fields.push((key, value)),
    }
    flow(&fields)
}

/// Applies `sls` as `id` with a pillar whose entry 1 is a good binding and
/// whose entries from 2 on are `refused`; the state must fail, name every
/// refused entry with its reason on one line, show no character a terminal
/// would act on or hide, and write nothing at `path`. Returns the output.
fn assert_each_refused(
    salt: &SaltRoot,
    id: &str,
    sls: &str,
    path: &str,
    refused: &[Refused],
) -> String {
    let good = Binding::new(
        "ssh-client",
        "127.0.0.1:2222",
        "ssh-server",
        "qubes.ConnectTCP+22",
    );
    let entries: Vec<String> = std::iter::once(good.yaml())
        .chain(refused.iter().map(|r| r.yaml.clone()))
        .collect();
    salt.set_pillar(&bindings_pillar(&entries));
    let run = salt.apply(id, sls);
    assert!(!run.success, "{sls} accepted the pillar:\n{}", run.output);
    assert!(!salt.exists(path), "{sls} wrote {path} from a bad pillar");
    for (i, r) in refused.iter().enumerate() {
        let number = i + 2;
        let named = run.output.lines().any(|line| {
            (line.contains(&format!("bindings entry {number} ("))
                || line.contains(&format!("bindings entry {number}: ")))
                && line.contains(&format!(": {} ", r.key))
                && line.contains(r.why)
        });
        assert!(
            named,
            "{sls}: entry {number} {} is not refused with \"{} ... {}\":\n{}",
            r.yaml, r.key, r.why, run.output
        );
    }
    assert!(
        !run.output.contains("bindings entry 1 "),
        "the good entry was refused:\n{}",
        run.output
    );
    if let Some(c) = run
        .output
        .chars()
        .find(|&c| (c.is_control() && c != '\n') || is_invisible(c))
    {
        panic!(
            "{sls}: the messages show {:?} raw:\n{}",
            c,
            run.output.escape_debug()
        );
    }
    run.output
}

// ---------------------------------------------------------------------------

/// The example pillar gives each client the README's config lines, and dom0
/// the README's policy rules, byte for byte; the files are the fixtures
/// (headers included), owned and moded as qrexec and the user need; a
/// second run changes nothing.
#[test]
fn the_example_pillar_writes_the_readme_examples() {
    let salt = SaltRoot::new();
    // Client qubes first, as in Qubes (any order works).
    for (qube, fixture, examples) in [
        (
            "ssh-client",
            "ssh-client.conf",
            &["ssh.conf", "ssh-agent.conf"][..],
        ),
        ("nfs-client", "nfs-client.conf", &["nfs.conf"][..]),
    ] {
        let first = salt.apply_ok(qube, "qrexec-connect.client");
        assert!(
            first.changed > 0,
            "{qube}: nothing written:\n{}",
            first.output
        );
        let written = read(&salt.file(SALT_CONF));
        assert_eq!(written, expected(fixture), "{qube}'s salt.conf");
        let readme_lines: String = examples
            .iter()
            .map(|name| rule_lines(&read(&repo().join("examples").join(name))))
            .collect();
        assert_eq!(
            rule_lines(&written),
            readme_lines,
            "{qube}'s binding lines vs examples/{examples:?}"
        );
        let meta = fs::metadata(salt.file(SALT_CONF)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (salt.uid, salt.uid),
            "salt.conf owner"
        );
        assert_eq!(meta.mode() & 0o7777, 0o644, "salt.conf mode");
        for dir in ["home/user/.config", "home/user/.config/qrexec-connect"] {
            let meta = fs::metadata(salt.file(dir)).unwrap();
            assert_eq!(meta.uid(), salt.uid, "{dir} must belong to the user");
        }
        let again = salt.apply_ok(qube, "qrexec-connect.client");
        assert_eq!(
            again.changed, 0,
            "{qube}: second run changed:\n{}",
            again.output
        );
        // Each qube is its own home: start the next from none.
        fs::remove_dir_all(salt.file("home/user/.config")).unwrap();
    }

    let other = salt.apply_ok("work", "qrexec-connect.client");
    assert!(
        !salt.exists(SALT_CONF),
        "a qube without bindings got salt.conf"
    );
    assert_eq!(other.changed, 0, "{}", other.output);

    let first = salt.apply_ok("dom0", "qrexec-connect.policy");
    assert_eq!(first.changed, 1, "{}", first.output);
    let written = read(&salt.file(POLICY));
    assert_eq!(
        written,
        expected("30-qrexec-connect.salt.policy"),
        "dom0 policy"
    );
    assert_grants_exactly(&written, &example_bindings());
    let readme_rules: String = [
        "30-qrexec-connect.tcp.policy",
        "30-qrexec-connect.ssh-agent.policy",
        "30-qrexec-connect.nfs.policy",
    ]
    .iter()
    .map(|name| rule_lines(&read(&repo().join("policy-examples").join(name))))
    .collect();
    assert_eq!(
        rule_lines(&written),
        readme_rules,
        "policy rules vs policy-examples/"
    );
    let meta = fs::metadata(salt.file(POLICY)).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (0, salt.qubes_gid),
        "owner root:qubes"
    );
    assert_eq!(meta.mode() & 0o7777, 0o664, "policy mode");
    let again = salt.apply_ok("dom0", "qrexec-connect.policy");
    assert_eq!(
        again.changed, 0,
        "dom0: second run changed:\n{}",
        again.output
    );
}

/// The formula's dom0 file is one of the project's fixed names, never a
/// qube's `30-qrexec-connect-SOURCE.policy` (a highstate would erase the
/// file of a qube named `salt`). The file of earlier versions,
/// `30-qrexec-connect-salt.policy`, is removed when Salt wrote it (it may
/// allow bindings the pillar no longer has), and kept when it is the file
/// `qrexec-connect policy` suggested for a qube named `salt`.
#[test]
fn the_policy_state_writes_a_fixed_name_and_removes_its_old_file() {
    let sls = read(&repo().join("salt/qrexec-connect/policy.sls"));
    let written = sls
        .split_once("{%- set path = '/etc/qubes/policy.d/")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(name, _)| name)
        .expect("policy.sls sets its path");
    assert!(
        fixed_files::FIXED_POLICY_FILES.contains(&written),
        "policy.sls writes {written}, not in FIXED_POLICY_FILES"
    );
    assert_eq!(POLICY, format!("etc/qubes/policy.d/{written}"));

    const OLD: &str = "etc/qubes/policy.d/30-qrexec-connect-salt.policy";
    let salt = SaltRoot::new();
    fs::write(
        salt.file(OLD),
        "# Written by Salt (qrexec-connect formula) from the pillar qrexec-connect:bindings;\n\
         # edits here are overwritten. Each client qube has the matching lines in\n\
         # ~/.config/qrexec-connect/salt.conf.\n\
         qubes.ConnectTCP +3306 ssh-client db allow\n",
    )
    .unwrap();
    salt.apply_ok("dom0", "qrexec-connect.policy");
    assert!(
        !salt.exists(OLD),
        "the old Salt file stays, with its removed binding"
    );
    assert_eq!(
        read(&salt.file(POLICY)),
        expected("30-qrexec-connect.salt.policy")
    );

    let qubes_own = "# qrexec-connect: what salt may call, one rule per binding.\n\
                     qubes.ConnectTCP +22 salt ssh-server allow\n";
    fs::write(salt.file(OLD), qubes_own).unwrap();
    let again = salt.apply_ok("dom0", "qrexec-connect.policy");
    assert_eq!(again.changed, 0, "{}", again.output);
    assert_eq!(
        read(&salt.file(OLD)),
        qubes_own,
        "the file of a qube named salt was removed"
    );
}

/// The policy is valid R4.1+ policy and allows exactly the pillar's
/// bindings: each call to its qube, and neither another client, another
/// argument nor another target.
#[test]
fn the_policy_allows_exactly_the_configured_bindings() {
    let salt = SaltRoot::new();
    // The README's pillar block says the same as salt/pillar.example.
    salt.set_pillar(&readme_pillar());
    salt.apply_ok("dom0", "qrexec-connect.policy");
    let text = read(&salt.file(POLICY));
    assert_eq!(
        text,
        expected("30-qrexec-connect.salt.policy"),
        "README's pillar"
    );
    assert_grants_exactly(&text, &example_bindings());
    let rules = policy_rules(&text);
    let allowed = |c: Call<'_>| matches!(evaluate(&rules, c), Ok(Verdict::Allow { .. }));
    for (client, line, qube) in EXAMPLE_CALLS {
        assert_eq!(
            evaluate(&rules, call(client, line)),
            Ok(Verdict::Allow { qube: qube.into() }),
            "{client}: {line}"
        );
        let other_client = if client == "ssh-client" {
            "nfs-client"
        } else {
            "ssh-client"
        };
        assert!(
            !allowed(call(other_client, line)),
            "{other_client} may use {line}"
        );
        assert!(
            !allowed(call("untrusted", line)),
            "untrusted may use {line}"
        );
        let words: Vec<&str> = line.split(' ').collect();
        let other_argument = format!("{}+9", words[2].split('+').next().unwrap());
        if words[2].contains('+') {
            let c = Call {
                service: &other_argument,
                ..call(client, line)
            };
            assert!(!allowed(c), "{client} may call {other_argument}");
        }
        let c = Call {
            target: "sys-firewall",
            ..call(client, line)
        };
        assert!(!allowed(c), "{client} may send {line} to sys-firewall");
    }
    // Every allow rule is some binding's: nothing extra.
    for rule in rules.iter().filter(|r| r.action == Action::Allow) {
        let used = EXAMPLE_CALLS.iter().any(|(client, line, _)| {
            evaluate(std::slice::from_ref(rule), call(client, line))
                .is_ok_and(|v| v != Verdict::NoMatch)
        });
        assert!(used, "rule {rule} allows no configured binding");
    }
}

/// Removing a binding from the pillar removes it from both sides: the
/// client's line (or its whole file, with its last binding) and dom0's rule.
#[test]
fn a_binding_removed_from_the_pillar_disappears_from_both_sides() {
    let salt = SaltRoot::new();
    for qube in ["ssh-client", "nfs-client"] {
        // Separate homes would be separate roots; one home is enough here
        // as each check reads it right after its qube's run.
        salt.apply_ok(qube, "qrexec-connect.client");
    }
    salt.apply_ok("dom0", "qrexec-connect.policy");
    assert_grants_exactly(&read(&salt.file(POLICY)), &example_bindings());

    // Drop the SSH agent and NFS bindings.
    let example = read(&repo().join("salt/pillar.example"));
    let kept: String = example
        .split("\n    - client:")
        .enumerate()
        .filter(|(i, _)| *i == 0 || *i == 1)
        .map(|(i, part)| {
            if i == 0 {
                part.to_owned()
            } else {
                format!("\n    - client:{part}")
            }
        })
        .collect::<String>()
        + "\n";
    assert!(
        kept.contains("qubes.ConnectTCP+22") && !kept.contains("ConnectNFS"),
        "{kept}"
    );
    salt.set_pillar(&kept);

    let run = salt.apply_ok("ssh-client", "qrexec-connect.client");
    assert_eq!(run.changed, 1, "{}", run.output);
    assert_eq!(
        rule_lines(&read(&salt.file(SALT_CONF))),
        "127.0.0.1:2222 ssh-server qubes.ConnectTCP+22\n"
    );
    let run = salt.apply_ok("nfs-client", "qrexec-connect.client");
    assert_eq!(run.changed, 1, "{}", run.output);
    assert!(
        !salt.exists(SALT_CONF),
        "nfs-client kept salt.conf without bindings"
    );

    salt.apply_ok("dom0", "qrexec-connect.policy");
    assert_eq!(
        rule_lines(&read(&salt.file(POLICY))),
        "qubes.ConnectTCP +22 ssh-client ssh-server allow\n",
        "dom0 still allows removed bindings"
    );
    assert_grants_exactly(&read(&salt.file(POLICY)), &example_bindings()[..1]);

    salt.set_pillar("qrexec-connect:\n  bindings: []\n");
    let run = salt.apply_ok("dom0", "qrexec-connect.policy");
    assert_eq!(run.changed, 1, "{}", run.output);
    assert!(
        !salt.exists(POLICY),
        "the policy file outlived every binding"
    );
}

/// A bad entry fails the state with a message that names it, and nothing
/// is written: not in dom0, not in the client.
#[test]
fn a_bad_pillar_entry_fails_the_state_and_is_named() {
    let salt = SaltRoot::new();
    let entry = |fields: &str| {
        format!(
            "qrexec-connect:\n  bindings:\n\
             \x20   - {{client: ssh-client, listen: 127.0.0.1:2222, target: ssh-server, service: qubes.ConnectTCP+22}}\n\
             \x20   - {fields}\n"
        )
    };
    let cases = [
        (
            "{client: work, listen: 127.0.0.1:80, target: web}",
            "entry 2 (client=work listen=127.0.0.1:80): service is missing",
        ),
        (
            "{client: work, listen: 127.0.0.1:80, target: '@default', service: qubes.ConnectTCP+80}",
            "entry 2 (client=work listen=127.0.0.1:80): target @default needs policy_target",
        ),
        (
            "{client: work, listen: 127.0.0.1:2049, target: nfs-server, service: qubes.ConnectNFS}",
            "entry 2 (client=work listen=127.0.0.1:2049): service qubes.ConnectNFS needs its argument",
        ),
        (
            "{client: 'my qube', listen: 127.0.0.1:80, target: web, service: qubes.ConnectTCP+80}",
            "entry 2 (client=\"my qube\" listen=127.0.0.1:80): client \"my qube\" holds whitespace",
        ),
        (
            "{client: work, listen: 127.0.0.1:80, target: web, service: 'qubes.ConnectTCP 80'}",
            "entry 2 (client=work listen=127.0.0.1:80): service \"qubes.ConnectTCP 80\" holds whitespace",
        ),
        (
            "{client: work, listen: 127.0.0.1:80, target: web, sevice: qubes.ConnectTCP+80}",
            "entry 2 (client=work listen=127.0.0.1:80): unknown key sevice",
        ),
    ];
    for (i, (fields, message)) in cases.into_iter().enumerate() {
        salt.set_pillar(&entry(fields));
        let sides = [
            ("dom0", "qrexec-connect.policy", POLICY),
            ("ssh-client", "qrexec-connect.client", SALT_CONF),
        ];
        // Both states read the pillar through bindings.jinja: the client
        // side once is enough to show it refuses too (each run costs seconds).
        for (id, sls, path) in &sides[..if i == 0 { 2 } else { 1 }] {
            let run = salt.apply(id, sls);
            assert!(!run.success, "{sls} accepted {fields}:\n{}", run.output);
            assert!(
                run.output
                    .contains(&format!("qrexec-connect:bindings {message}")),
                "{sls} with {fields}: the message does not name the entry:\n{}",
                run.output
            );
            assert!(!salt.exists(path), "{sls} wrote {path} from a bad pillar");
        }
    }
}

/// A LISTEN only the project's grammar refuses (a bare port) fails the
/// client state with the generator's own message, and no file is written.
#[test]
fn the_client_state_checks_its_lines_with_the_generator() {
    let salt = SaltRoot::new();
    salt.set_pillar(
        "qrexec-connect:\n  bindings:\n\
         \x20   - {client: work, listen: '2222', target: ssh-server, service: qubes.ConnectTCP+22}\n",
    );
    let run = salt.apply("work", "qrexec-connect.client");
    assert!(!run.success, "a bare port was accepted:\n{}", run.output);
    assert!(
        run.output
            .contains("/home/user/.config/qrexec-connect/salt.conf:3:")
            && run.output.contains("2222 ssh-server qubes.ConnectTCP+22"),
        "the generator's message does not name the line:\n{}",
        run.output
    );
    assert!(
        !salt.exists(SALT_CONF),
        "salt.conf written with a refused line"
    );
}

/// The client state checks only the file it writes: an error and a warning
/// in the qube's own /etc/qrexec-connect (a TCP line there always warns
/// that it is one address for all users) do not fail a good pillar, and a
/// warning of the state's own line does not either. The bad line of the
/// pillar still fails it, named, without the /etc file's lines.
#[test]
fn the_client_state_checks_only_its_own_file() {
    let salt = SaltRoot::new();
    let system = salt.file("etc/qrexec-connect/system.conf");
    fs::create_dir_all(system.parent().unwrap()).unwrap();
    fs::write(
        &system,
        "127.0.0.1:2301 sys-net qubes.ConnectTCP+80
not-an-address sys-net qubes.ConnectTCP+81
",
    )
    .unwrap();
    let good = "qrexec-connect:\n  bindings:\n\
         \x20   - {client: work, listen: '0.0.0.0:2222', target: ssh-server, service: qubes.ConnectTCP+22}\n";
    salt.set_pillar(good);
    let run = salt.apply("work", "qrexec-connect.client");
    assert!(
        run.success,
        "a good pillar failed for /etc/qrexec-connect or a warning:\n{}",
        run.output
    );
    assert_eq!(
        rule_lines(&read(&salt.file(SALT_CONF))),
        "0.0.0.0:2222 ssh-server qubes.ConnectTCP+22\n"
    );

    salt.set_pillar(
        "qrexec-connect:\n  bindings:\n\
         \x20   - {client: work, listen: '2223', target: ssh-server, service: qubes.ConnectTCP+22}\n",
    );
    let run = salt.apply("work", "qrexec-connect.client");
    assert!(!run.success, "a bare port was accepted:\n{}", run.output);
    assert!(
        run.output
            .contains("/home/user/.config/qrexec-connect/salt.conf:3:")
            && run.output.contains("2223 ssh-server qubes.ConnectTCP+22"),
        "the generator's message does not name the line:\n{}",
        run.output
    );
    assert!(
        !run.output.contains("sys-net") && !run.output.contains(": warning:"),
        "the failure shows lines of another file, or a warning:\n{}",
        run.output
    );
}

/// The package states: what they would install, rendered by Salt. They are
/// not applied here: installing a package changes the host's package
/// database, which no overlay of /etc and /home keeps private
/// (tests/packages.rs installs the built packages themselves).
#[test]
fn the_template_states_install_the_packages() {
    let salt = SaltRoot::new();
    println!(
        "not applying pkg.installed (template.sls, service.sls): it would install into this \
         machine's package database; checking what Salt renders instead"
    );
    for (sls, package) in [
        ("qrexec-connect.template", "qrexec-connect"),
        ("qrexec-connect.service", "qrexec-connect-nfs"),
    ] {
        let (ok, output) = salt.salt("debian-12", &["state.show_sls", sls, "--out=json"]);
        assert!(ok, "{sls} does not render:\n{output}");
        let compact: String = output.split_whitespace().collect();
        assert!(
            compact.contains(&format!("\"name\":\"{package}\""))
                && compact.contains("\"installed\""),
            "{sls} does not install {package}:\n{output}"
        );
        assert!(
            !compact.contains("\"sources\""),
            "{sls}: sources without a package file"
        );

        salt.set_pillar(&format!(
            "qrexec-connect:\n  packages:\n    {package}: /tmp/{package}_0.1.0_amd64.deb\n"
        ));
        let (ok, output) = salt.salt("debian-12", &["state.show_sls", sls, "--out=json"]);
        assert!(ok, "{sls} does not render:\n{output}");
        let compact: String = output.split_whitespace().collect();
        assert!(
            compact.contains(&format!(
                "\"sources\":[{{\"{package}\":\"/tmp/{package}_0.1.0_amd64.deb\"}}]"
            )),
            "{sls} ignores the package file:\n{output}"
        );
        salt.set_pillar(&read(&repo().join("salt/pillar.example")));
    }
}

/// Every shape of binding the formula accepts (no argument, an empty one,
/// `@default` and `@dispvm` with the qube dom0 picks, `@adminvm`, the
/// longest names, one NFS address at two servers): each allow rule dom0
/// gets grants exactly one binding's call, `SERVICE +` when it has no
/// argument (never `*`, which would allow any), and the client gets its
/// lines as written.
#[test]
fn every_rule_grants_exactly_what_the_pillar_asks() {
    let longest_client = "A23456789012345678901234567890b";
    // `TARGET SERVICE` fills the 255 bytes of FileDescriptorName=.
    let longest_service = format!("qubes.ConnectTCP+{}", "9".repeat(255 - 5 - 17));
    assert!(is_vm_name(longest_client) && longest_client.len() == 31);
    assert_eq!(format!("z_-9 {longest_service}").len(), 255);
    let bindings = [
        Binding::new(
            "ssh-client",
            "127.0.0.1:2222",
            "ssh-server",
            "qubes.ConnectTCP+22",
        ),
        Binding::new(
            "ssh-client",
            "%t/qrexec-connect/ssh-agent",
            "@default",
            "qubes.ConnectSSHAgent",
        )
        .to("vault"),
        // The same call from a second socket: the same rule, written once.
        Binding::new(
            "ssh-client",
            "%t/qrexec-connect/ssh-agent-2",
            "@default",
            "qubes.ConnectSSHAgent",
        )
        .to("vault"),
        Binding::new("ssh-client", "127.0.0.1:8080", "web", "qubes.ConnectTCP"),
        // `+` with nothing after it is the call without argument.
        Binding::new("ssh-client", "127.0.0.1:8081", "web", "qubes.ConnectTCP+"),
        Binding::new(
            "work",
            "@qrexec-connect-split",
            "@dispvm",
            "qubes.Split+a+b",
        )
        .to("@dispvm:split-dvm"),
        Binding::new("work", "%h/.gnupg-split", "@dispvm", "qubes.Gpg"),
        // A new disposable of web-dvm for each call (issue 20): the rule
        // names that target, and the config line has it as is.
        Binding::new(
            "work",
            "127.0.0.1:8090",
            "@dispvm:web-dvm",
            "qubes.ConnectTCP+80",
        ),
        Binding::new(
            "work",
            "127.0.0.1:8091",
            "@dispvm:A23456789012345678901234567890b",
            "qubes.ConnectTCP+80",
        ),
        Binding::new("work", "127.0.0.1:9000", "@adminvm", "my.Service+x.y_z-1"),
        // A `@dispvm:T` rule also takes a call asking for `@dispvm` when T
        // is the client's default disposable template: the `@dispvm` rule
        // that sends such calls to another template must come first.
        Binding::new("work", "127.0.0.1:9010", "@dispvm:web-dvm", "my.Svc"),
        Binding::new("work", "127.0.0.1:9011", "@dispvm", "my.Svc").to("@dispvm:other-dvm"),
        Binding::new(
            "nfs-a",
            "127.0.0.1:2049",
            "nfs-server",
            "qubes.ConnectNFS+127.0.1.1",
        ),
        Binding::new(
            "nfs-b",
            "127.0.0.1:2049",
            "@default",
            "qubes.ConnectNFS+127.0.1.2",
        )
        .to("nfs-server"),
        // The same address at another server is another right.
        Binding::new(
            "nfs-b",
            "127.0.0.1:2050",
            "other-nfs",
            "qubes.ConnectNFS+127.0.1.1",
        ),
        Binding::new(
            longest_client,
            "%t/qrexec-connect/longest-client",
            "z_-9",
            &longest_service,
        ),
    ];
    let salt = SaltRoot::new();
    salt.set_pillar(&bindings_pillar(
        &bindings.iter().map(Binding::yaml).collect::<Vec<_>>(),
    ));
    salt.apply_ok("dom0", "qrexec-connect.policy");
    assert_grants_exactly(&read(&salt.file(POLICY)), &bindings);

    salt.apply_ok(longest_client, "qrexec-connect.client");
    let lines: String = bindings
        .iter()
        .filter(|b| b.client == longest_client)
        .map(|b| b.line() + "\n")
        .collect();
    assert_eq!(rule_lines(&read(&salt.file(SALT_CONF))), lines);

    salt.apply_ok("work", "qrexec-connect.client");
    let written = read(&salt.file(SALT_CONF));
    assert!(
        written.contains("127.0.0.1:8090 @dispvm:web-dvm qubes.ConnectTCP+80\n"),
        "{written}"
    );
}

/// The issue's pillar: `target: |` (YAML adds a newline) passed every check
/// and split the rule over two lines, which makes qrexec refuse the whole
/// policy directory (every call in the system denied) while the state
/// reported success. It must fail, name the entry, and write nothing.
#[test]
fn a_value_ending_in_a_newline_fails_the_state() {
    let salt = SaltRoot::new();
    salt.set_pillar(
        "qrexec-connect:\n  bindings:\n\
         \x20   - client: work\n\
         \x20     listen: 127.0.0.1:2222\n\
         \x20     target: |\n\
         \x20       ssh-server\n\
         \x20     service: qubes.ConnectTCP+22\n",
    );
    for (id, sls, path) in [
        ("dom0", "qrexec-connect.policy", POLICY),
        ("work", "qrexec-connect.client", SALT_CONF),
    ] {
        let run = salt.apply(id, sls);
        let written = fs::read_to_string(salt.file(path)).unwrap_or_default();
        assert!(
            !run.success,
            "{sls} accepted target \"ssh-server\\n\" and wrote:\n{written}"
        );
        assert!(
            run.output.contains(
                "qrexec-connect:bindings entry 1 (client=work listen=127.0.0.1:2222): \
                 target \"ssh-server\\n\" holds whitespace"
            ),
            "{sls}: the message does not name the entry:\n{}",
            run.output
        );
        assert!(!salt.exists(path), "{sls} wrote {path}");
    }
}

/// Each field refuses every character the project's printable rule refuses
/// (whitespace, control characters and the invisible ones of
/// `is_invisible`, which reorder or hide text): at the end, in the middle,
/// alone; and everything that is not what the field names (a qube name
/// only for `client`, which rules out `@anyvm`, `*` and tags; keywords; the
/// old `$` spellings; other types than strings; values too long to be
/// valid). One pillar holds them all, each entry with its own message, on
/// both sides; the state fails and writes nothing.
#[test]
fn hostile_values_fail_the_state_and_each_entry_is_named() {
    let base = Binding::new("work", "127.0.0.1:80", "web", "qubes.ConnectTCP+80");
    let chosen = Binding::new("work", "127.0.0.1:81", "@default", "qubes.Svc").to("vault");
    let disposable = Binding::new("work", "127.0.0.1:82", "@dispvm", "qubes.Svc").to("@dispvm:dvm");
    let mut refused = Vec::new();
    let mut refuse = |entry: Binding<'_>, key: &'static str, value: String, why: &'static str| {
        refused.push(Refused {
            yaml: with_field(entry, key, value),
            key,
            why,
        });
    };
    const BAD_CHARACTER: &str = "holds whitespace, a control or an invisible character";

    // Characters, in each of the five fields.
    let corruptions: [fn(&str) -> String; 18] = [
        |v| format!("{v}\n"),
        |v| format!("{v} allow\nqubes.ConnectTCP * @anyvm @anyvm"),
        |v| format!("{v} "),
        |v| format!(" {v}"),
        |v| format!("{v}\ta"),
        |v| format!("{v}\r"),
        |v| format!("{v}\0"),
        |v| format!("\u{1b}[2J{v}"),
        |v| format!("{v}\u{7f}"),
        |v| format!("{v}\u{85}"),
        |v| format!("{v}\u{a0}"),
        |v| format!("{v}\u{2028}"),
        |v| format!("{v}\u{202e}"),
        |v| format!("{v}\u{200b}"),
        |v| format!("\u{feff}{v}"),
        |v| format!("{v}\u{e0041}"),
        |v| format!("{v}\u{3000}"),
        |v| format!("{v}\u{b}"),
    ];
    for corrupt in corruptions {
        for key in ["client", "listen", "target", "service"] {
            let value = match key {
                "client" => base.client,
                "listen" => base.listen,
                "target" => base.target,
                _ => base.service,
            };
            refuse(base, key, yaml_str(&corrupt(value)), BAD_CHARACTER);
        }
        refuse(
            chosen,
            "policy_target",
            yaml_str(&corrupt("vault")),
            BAD_CHARACTER,
        );
    }
    // The boundaries of every run of characters the generator refuses to
    // show raw (control, whitespace, invisible), in a LISTEN path, where
    // any other character is allowed.
    let mut runs: Vec<(char, char)> = Vec::new();
    for c in (0..=0x10FFFF).filter_map(char::from_u32) {
        if c.is_control() || c.is_whitespace() || is_invisible(c) {
            match runs.last_mut() {
                Some((_, end)) if u32::from(*end) + 1 == u32::from(c) => *end = c,
                _ => runs.push((c, c)),
            }
        }
    }
    for c in runs.iter().flat_map(|&(start, end)| [start, end]) {
        refuse(
            base,
            "listen",
            yaml_str(&format!("%t/a{c}b")),
            BAD_CHARACTER,
        );
    }

    // Names that are not one qube (each also refused by the binding
    // crate's rule, the one qube-name rule).
    let not_qube_names = [
        "@anyvm",
        "*",
        "@tag:work",
        "@type:AppVM",
        "@adminvm",
        "@default",
        "@dispvm",
        "@dispvm:dvm",
        "$default",
        "9work",
        "_work",
        "-work",
        "wörk",
        "a.b",
        "A23456789012345678901234567890bc",
    ];
    for name in not_qube_names {
        assert!(!is_vm_name(name), "{name}");
        refuse(base, "client", yaml_str(name), "is not a qube name");
    }
    for name in [
        "@anyvm",
        "*",
        "@tag:work",
        "@type:AppVM",
        "@default",
        "@dispvm",
        "$default",
        "9work",
        "wörk",
        "A23456789012345678901234567890bc",
    ] {
        refuse(
            chosen,
            "policy_target",
            yaml_str(name),
            "is not a qube name or @dispvm:NAME",
        );
    }
    for name in [
        "@dispvm:@tag:work",
        "@dispvm:",
        "@dispvm:9dvm",
        "@dispvm:@anyvm",
        "$dispvm:dvm",
    ] {
        refuse(
            disposable,
            "policy_target",
            yaml_str(name),
            "is not a qube name or @dispvm:NAME",
        );
    }
    refuse(
        disposable,
        "policy_target",
        yaml_str("dvm"),
        "is not @dispvm:NAME, which target @dispvm needs",
    );
    refuse(
        chosen,
        "policy_target",
        yaml_str("@dispvm:dvm"),
        "needs target @dispvm",
    );
    for name in [
        "@anyvm",
        "*",
        "@tag:work",
        "9web",
        "A23456789012345678901234567890bc",
        // Disposable templates that are not one qube name, and the fd
        // name's spelling (issue 20).
        "@dispvm:",
        "@dispvm:9dvm",
        "@dispvm:@tag:work",
        "@dispvm:@anyvm",
        "@dispvm:@dispvm:dvm",
        "@dispvm:dvm:x",
        "@dispvm:A23456789012345678901234567890bc",
        "@dispvm/dvm",
        "$dispvm/dvm",
    ] {
        refuse(
            base,
            "target",
            yaml_str(name),
            "is not a qube name, @default, @dispvm, @dispvm:TEMPLATE or @adminvm",
        );
    }
    refuse(
        Binding::new("work", "127.0.0.1:83", "@dispvm:dvm", "qubes.Svc"),
        "policy_target",
        yaml_str("@dispvm:other-dvm"),
        "is only for target @default or @dispvm",
    );
    for name in ["$default", "$dispvm", "$adminvm", "$dispvm:dvm"] {
        refuse(base, "target", yaml_str(name), "is the old spelling");
    }
    for service in [
        "*",
        "qubes.ConnectTCP+*",
        "+22",
        "qubes/ConnectTCP",
        "qubes.ConnectTCP+2:2",
        "qubes.ConnectTCP+22$",
        "qubes.Connect*",
    ] {
        refuse(
            base,
            "service",
            yaml_str(service),
            "is not SERVICE or SERVICE+ARGUMENT",
        );
    }
    let too_long = format!("qubes.ConnectTCP+{}", "9".repeat(256 - 4 - 17));
    assert_eq!(format!("{} {too_long}", base.target).len(), 256);
    refuse(base, "service", yaml_str(&too_long), "longer than 255");
    for service in ["qubes.ConnectNFS", "qubes.ConnectNFS+"] {
        refuse(base, "service", yaml_str(service), "needs its argument");
    }
    refuse(base, "listen", yaml_str("127.0.0.1:80#x"), "holds a #");
    refuse(
        base,
        "listen",
        yaml_str(&format!("%t/{}", "a".repeat(105))),
        "longer than 107",
    );
    refuse(
        base,
        "listen",
        yaml_str(&"a".repeat(100_000)),
        "longer than 107",
    );
    refuse(base, "client", yaml_str(""), "is empty");
    refuse(chosen, "policy_target", yaml_str(""), "is empty");
    refuse(
        base,
        "policy_target",
        yaml_str("vault"),
        "is only for target @default or @dispvm",
    );

    // Other types than strings: YAML reads numbers, `off`, `null`, lists
    // and mappings as such.
    for (key, value) in [
        ("client", "5"),
        ("client", "off"),
        ("client", "null"),
        ("client", "[work, web]"),
        ("listen", "8080"),
        ("target", "{web: 1}"),
        ("service", "3.5"),
        ("policy_target", "null"),
        ("policy_target", "7"),
    ] {
        let entry = if key == "policy_target" { chosen } else { base };
        refuse(entry, key, value.into(), "is not a string");
    }
    // Salt's YAML keeps dates as text: refused as no qube name.
    refuse(base, "client", "2024-01-01".into(), "is not a qube name");
    refused.push(Refused {
        yaml: "just-a-string".into(),
        key: "not a mapping",
        why: "just-a-string",
    });
    refused.push(Refused {
        yaml: "[work, web]".into(),
        key: "not a mapping",
        why: "",
    });
    refused.push(Refused {
        yaml: with_field(base, "sevice", yaml_str("qubes.ConnectTCP+80")),
        key: "unknown key",
        why: "sevice (known: ",
    });

    let salt = SaltRoot::new();
    for (id, sls, path) in [
        ("dom0", "qrexec-connect.policy", POLICY),
        ("work", "qrexec-connect.client", SALT_CONF),
    ] {
        let output = assert_each_refused(&salt, id, sls, path, &refused);
        assert!(
            !output.contains(&"a".repeat(65)),
            "{sls}: a 100,000-character value is echoed whole"
        );
    }

    // The user whose home gets salt.conf: a name, shown escaped if not.
    let good = Binding::new("work", "127.0.0.1:80", "web", "qubes.ConnectTCP+80");
    salt.set_pillar(&format!(
        "qrexec-connect:\n  user: \"user\\nroot\"\n  bindings:\n    - {}\n",
        good.yaml()
    ));
    let run = salt.apply("work", "qrexec-connect.client");
    assert!(
        !run.success,
        "user \"user\\nroot\" accepted:\n{}",
        run.output
    );
    assert!(
        run.output
            .contains("qrexec-connect:user \"user\\nroot\" is not a user name"),
        "{}",
        run.output
    );
    assert!(!salt.exists(SALT_CONF), "salt.conf written");
}

/// One NFS address belongs to one client per server, whatever way the
/// binding names the server: as its target, or as the `policy_target` of
/// `@default` (else two clients share one address, and each other's
/// exports). The same for the disposables of one template.
#[test]
fn one_nfs_address_per_server_whatever_the_target_spelling() {
    let salt = SaltRoot::new();
    let nfs = "qubes.ConnectNFS+127.0.1.1";
    let cases = [
        (
            [
                Binding::new("nfs-a", "127.0.0.1:2049", "nfs-server", nfs),
                Binding::new("nfs-b", "127.0.0.1:2049", "@default", nfs).to("nfs-server"),
            ],
            "entry 2 (client=nfs-b listen=127.0.0.1:2049): service qubes.ConnectNFS+127.0.1.1 to \
             nfs-server is already given to nfs-a (entry 1)",
        ),
        (
            // dom0 is @adminvm, in a rule as in a call.
            [
                Binding::new("nfs-e", "127.0.0.1:2049", "@adminvm", nfs),
                Binding::new("nfs-f", "127.0.0.1:2049", "@default", nfs).to("dom0"),
            ],
            "entry 2 (client=nfs-f listen=127.0.0.1:2049): service qubes.ConnectNFS+127.0.1.1 to \
             @adminvm is already given to nfs-e (entry 1)",
        ),
        (
            [
                Binding::new("nfs-c", "127.0.0.1:2049", "@dispvm", nfs).to("@dispvm:nfs-dvm"),
                Binding::new("nfs-d", "127.0.0.1:2049", "@dispvm", nfs).to("@dispvm:nfs-dvm"),
            ],
            "entry 2 (client=nfs-d listen=127.0.0.1:2049): service qubes.ConnectNFS+127.0.1.1 to \
             @dispvm:nfs-dvm is already given to nfs-c (entry 1)",
        ),
    ];
    for (i, (pair, message)) in cases.into_iter().enumerate() {
        salt.set_pillar(&bindings_pillar(&pair.map(|b| b.yaml())));
        let sides = [
            ("dom0", "qrexec-connect.policy", POLICY),
            (pair[1].client, "qrexec-connect.client", SALT_CONF),
        ];
        // The client side reads the same bindings.jinja: once is enough.
        for (id, sls, path) in &sides[..if i == 0 { 2 } else { 1 }] {
            let run = salt.apply(id, sls);
            let written = fs::read_to_string(salt.file(path)).unwrap_or_default();
            assert!(
                !run.success,
                "{sls} gave one address to two clients:\n{written}"
            );
            assert!(
                run.output.contains(message),
                "{sls}: no {message:?}:\n{}",
                run.output
            );
            assert!(!salt.exists(path), "{sls} wrote {path}");
        }
    }
}

/// One client's call (its target, service and argument) is one policy
/// decision: two bindings that send the same call to two qubes cannot both
/// be written (the first rule would take every call), so the second is
/// refused rather than silently sent to the first's qube.
#[test]
fn one_call_goes_to_one_qube() {
    let salt = SaltRoot::new();
    salt.set_pillar(&bindings_pillar(&[
        Binding::new("work", "%t/agent", "@default", "qubes.ConnectSSHAgent")
            .to("vault")
            .yaml(),
        Binding::new("work", "%t/agent-2", "@default", "qubes.ConnectSSHAgent")
            .to("vault-2")
            .yaml(),
        Binding::new("work", "%t/split", "@dispvm", "qubes.Gpg").yaml(),
        Binding::new("work", "%t/split-2", "@dispvm", "qubes.Gpg")
            .to("@dispvm:gpg-dvm")
            .yaml(),
    ]));
    let run = salt.apply("dom0", "qrexec-connect.policy");
    let written = fs::read_to_string(salt.file(POLICY)).unwrap_or_default();
    assert!(!run.success, "one call sent to two qubes:\n{written}");
    for message in [
        "entry 2 (client=work listen=%t/agent-2): service qubes.ConnectSSHAgent to @default already \
         goes to vault (entry 1)",
        "entry 4 (client=work listen=%t/split-2): service qubes.Gpg to @dispvm already goes to \
         @dispvm (entry 3)",
    ] {
        assert!(
            run.output.contains(message),
            "no {message:?}:\n{}",
            run.output
        );
    }
    assert!(!salt.exists(POLICY), "wrote {POLICY}");
}

/// A file outside the user's reach, for the user to aim a link at: it must
/// come out of every run as it went in, root's and unchanged.
fn assert_untouched(path: &Path, contents: &str) {
    let meta = fs::symlink_metadata(path).unwrap();
    assert_eq!(meta.uid(), 0, "{} was given away", path.display());
    assert_eq!(read(path), contents, "{} was overwritten", path.display());
}

/// The client state runs as root in the user's home, which the user owns:
/// a link there must never carry root's write (and the chown to the user)
/// to a file of root's. A symlinked salt.conf, a symlinked
/// ~/.config/qrexec-connect or ~/.config, or a qrexec-connect directory the
/// user does not own fails the state naming the path, and nothing outside
/// the home changes.
#[test]
fn a_link_in_the_users_home_fails_the_client_state_and_root_files_stay_roots() {
    let salt = SaltRoot::new();
    salt.set_pillar(&bindings_pillar(&[Binding::new(
        "work",
        "127.0.0.1:2222",
        "ssh-server",
        "qubes.ConnectTCP+22",
    )
    .yaml()]));
    let uid = salt.uid;
    let home = salt.home();
    let config = home.join(".config");
    let own_dir = config.join("qrexec-connect");
    let roots = salt.dir.path().join("roots");
    fs::create_dir_all(&roots).unwrap();
    let secret = roots.join("passwd");
    let secret_text = "root:x:0:0:root:/root:/bin/sh\n";
    fs::write(&secret, secret_text).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
    let user_dir = |path: &Path| {
        fs::create_dir_all(path).unwrap();
        std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    };
    let link = |target: &Path, at: &Path| {
        std::os::unix::fs::symlink(target, at).unwrap();
        std::os::unix::fs::lchown(at, Some(uid), Some(uid)).unwrap();
    };
    let cases: [(&str, &dyn Fn()); 4] = [
        ("/home/user/.config/qrexec-connect/salt.conf", &|| {
            user_dir(&config);
            user_dir(&own_dir);
            link(&secret, &own_dir.join("salt.conf"));
        }),
        ("/home/user/.config/qrexec-connect", &|| {
            user_dir(&config);
            link(&roots, &own_dir);
        }),
        ("/home/user/.config", &|| link(&roots, &config)),
        ("/home/user/.config/qrexec-connect", &|| {
            user_dir(&config);
            fs::create_dir_all(&own_dir).unwrap();
        }),
    ];
    for (path, set_up) in cases {
        let _ = fs::remove_file(&config);
        let _ = fs::remove_dir_all(&config);
        set_up();
        let run = salt.apply("work", "qrexec-connect.client");
        assert!(
            !run.success,
            "the client state wrote through {path}:\n{}",
            run.output
        );
        assert!(
            run.output.lines().any(|l| l.contains(&format!("{path} "))
                && (l.contains("symbolic link") || l.contains("not owned by user"))),
            "the failure does not name {path}:\n{}",
            run.output
        );
        assert_untouched(&secret, secret_text);
        assert!(
            !roots.join("salt.conf").exists(),
            "salt.conf written into root's directory through {path}"
        );
        let roots_meta = fs::metadata(&roots).unwrap();
        assert_eq!(
            roots_meta.uid(),
            0,
            "root's directory given away via {path}"
        );
    }
}

/// `client: dom0` is no client qube: qrexec reads `dom0` as `@adminvm`,
/// which the strictest policy parser refuses as a source, and one refused
/// rule makes qrexec refuse the whole policy directory (every call denied).
/// Both states refuse the entry and name it; nothing is written.
#[test]
fn dom0_as_client_fails_both_states() {
    let salt = SaltRoot::new();
    let refused = [Refused {
        yaml: Binding::new(
            "dom0",
            "127.0.0.1:2222",
            "ssh-server",
            "qubes.ConnectTCP+22",
        )
        .yaml(),
        key: "client",
        why: "dom0 is not a client qube",
    }];
    for (id, sls, path) in [
        ("dom0", "qrexec-connect.policy", POLICY),
        ("dom0", "qrexec-connect.client", SALT_CONF),
    ] {
        assert_each_refused(&salt, id, sls, path, &refused);
    }
}

/// The README's ssh-agent example while the user is logged in: the client
/// state checks `%t/` with the generator as the user would run it, so the
/// user's own `/run/user/UID` is theirs, not another user's directory.
#[test]
fn a_runtime_dir_line_passes_the_check_while_the_user_is_logged_in() {
    let salt = SaltRoot::new();
    salt.log_in();
    salt.set_pillar(&bindings_pillar(&[
        Binding::new(
            "work",
            "%t/qrexec-connect/ssh-agent",
            "@default",
            "qubes.ConnectSSHAgent",
        )
        .to("vault")
        .yaml(),
        Binding::new("work", "%h/.gnupg-split", "@dispvm", "qubes.Gpg").yaml(),
    ]));
    let run = salt.apply("work", "qrexec-connect.client");
    assert!(
        run.success,
        "%t/ and %h/ refused with the user logged in:\n{}",
        run.output
    );
    assert_eq!(
        rule_lines(&read(&salt.file(SALT_CONF))),
        "%t/qrexec-connect/ssh-agent @default qubes.ConnectSSHAgent\n\
         %h/.gnupg-split @dispvm qubes.Gpg\n"
    );
}

/// A LISTEN whose socket systemd (252) loses at every daemon-reload (a
/// quote, a backslash or a character beyond ASCII; the generator refuses
/// such a line in the client) fails the state, naming the entry: dom0 must
/// not allow a call for a binding no client can keep.
#[test]
fn a_listen_systemd_would_lose_fails_the_state() {
    let salt = SaltRoot::new();
    let listens = ["%t/café", "%t/it's", "@back\\slash", "/tmp/q\"x", "%t/fine"];
    let bindings: Vec<String> = listens
        .iter()
        .map(|listen| Binding::new("work", listen, "vault", "my.Agent").yaml())
        .collect();
    salt.set_pillar(&bindings_pillar(&bindings));
    for (id, sls, path) in [
        ("dom0", "qrexec-connect.policy", POLICY),
        ("work", "qrexec-connect.client", SALT_CONF),
    ] {
        let run = salt.apply(id, sls);
        assert!(!run.success, "{sls} succeeded:\n{}", run.output);
        for entry in 1..=4 {
            let said = format!(
                "entry {entry} (client=work listen={}): listen",
                listens[entry - 1]
            );
            assert!(
                run.output
                    .lines()
                    .any(|line| line.contains(&format!("entry {entry} (client=work"))
                        && line.contains("loses such a socket at every daemon-reload")),
                "{sls}: no {said:?}:\n{}",
                run.output
            );
        }
        assert!(!run.output.contains("entry 5 "), "{sls}:\n{}", run.output);
        assert!(!salt.exists(path), "{sls} wrote {path}");
    }
}
