//! The Salt formula (`salt/`): applied for real with `salt-call --local` (the
//! Salt of `make salt-venv`), as `qubesctl` would in dom0 and in each qube,
//! against a private root: `/etc` and `/home` are overlays whose upper
//! directories are the test's own, in a mount namespace of each run, so the
//! host never changes. Needs root (mounts), as the other system tests do.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TempDir, GENERATOR};
use qubes_policy::{check_policy_file, evaluate, Action, Call, PolicyLine, Verdict};

const POLICY: &str = "etc/qubes/policy.d/30-qrexec-connect-salt.policy";
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
                 done; exec \"$@\"",
            )
            .arg(root)
            .arg(salt_call())
            .args(["--local", "--retcode-passthrough", "--no-color"])
            .arg(format!("--config-dir={}", root.display()))
            .arg(format!("--id={id}"))
            .args(args)
            .env("PATH", path)
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

fn call<'a>(source: &'a str, line: &'a str) -> Call<'a> {
    let words: Vec<&str> = line.split(' ').collect();
    Call {
        source,
        target: words[1],
        service: words[2],
    }
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
        expected("30-qrexec-connect-salt.policy"),
        "dom0 policy"
    );
    let readme_rules: String = [
        "30-qrexec-connect-tcp.policy",
        "30-qrexec-connect-ssh-agent.policy",
        "30-qrexec-connect-nfs.policy",
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
        expected("30-qrexec-connect-salt.policy"),
        "README's pillar"
    );
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
    assert!(read(&salt.file(POLICY)).contains("qubes.ConnectNFS +127.0.1.1"));

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
            "entry 2 (client=work listen=127.0.0.1:2049): qubes.ConnectNFS needs its argument",
        ),
        (
            "{client: 'my qube', listen: 127.0.0.1:80, target: web, service: qubes.ConnectTCP+80}",
            "entry 2 (client=my qube listen=127.0.0.1:80): client my qube is not a qube name",
        ),
        (
            "{client: work, listen: 127.0.0.1:80, target: web, service: 'qubes.ConnectTCP 80'}",
            "entry 2 (client=work listen=127.0.0.1:80): service qubes.ConnectTCP 80 is not",
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
