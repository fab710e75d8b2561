//! The dom0 policy examples (`policy-examples/`) are valid R4.1+ policy, and
//! each allows exactly the call its paired client config (`examples/`)
//! makes, to the qube the README says.

use std::fs;
use std::path::{Path, PathBuf};

#[path = "../src/bin/qrexec-connect/managing/policy/fixed_files.rs"]
mod fixed_files;

use qrexec_connect_binding::address::Specifiers;
use qrexec_connect_generator::config::{Binding, Config};
use qubes_policy::{
    allowed, check_policy_file, check_policy_file_name, check_policy_line, evaluate,
    intended_target, Action, Argument, Call, Grant, PolicyLine, Verdict,
};

/// One README example: a client config, the policy that allows it, the
/// qube that makes the call and the qube that must answer it.
struct Example {
    config: &'static str,
    policy: &'static str,
    client: &'static str,
    service_qube: &'static str,
}

const EXAMPLES: [Example; 3] = [
    Example {
        config: "ssh.conf",
        policy: "30-qrexec-connect.tcp.policy",
        client: "ssh-client",
        service_qube: "ssh-server",
    },
    Example {
        config: "ssh-agent.conf",
        policy: "30-qrexec-connect.ssh-agent.policy",
        client: "ssh-client",
        service_qube: "vault",
    },
    Example {
        config: "nfs.conf",
        policy: "30-qrexec-connect.nfs.policy",
        client: "nfs-client",
        service_qube: "nfs-server",
    },
];

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn policy_rules(name: &str) -> Vec<PolicyLine> {
    let text = read(&root().join("policy-examples").join(name));
    check_policy_file(&text)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .into_iter()
        .map(|(_, rule)| rule)
        .collect()
}

/// A binding of a client config and its line as written.
struct ConfigLine {
    line: String,
    binding: Binding,
}

/// The bindings of `examples/NAME`, read with the generator's own grammar;
/// a line it would refuse or warn about fails the test.
fn config_bindings(name: &str) -> Vec<ConfigLine> {
    let path = root().join("examples").join(name);
    let text = read(&path);
    let mut config = Config::new(Specifiers::default());
    config.add_text(path.to_str().unwrap(), text.as_bytes());
    let problems: Vec<String> = config.problems.iter().map(ToString::to_string).collect();
    assert!(problems.is_empty(), "{name}: {problems:#?}");
    let lines: Vec<&str> = text.lines().collect();
    config
        .bindings
        .into_iter()
        .map(|binding| ConfigLine {
            line: lines[binding.source().line - 1].trim().to_owned(),
            binding,
        })
        .collect()
}

fn files_in(dir: &str, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root().join(dir))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(suffix))
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------------------
// The shipped examples
// ---------------------------------------------------------------------------

/// The README shows every example's config lines and policy rules verbatim,
/// so a user copying from it gets exactly what the tests check.
#[test]
fn the_readme_shows_each_example_exactly() {
    let readme = read(&root().join("README.md"));
    let readme_lines: Vec<&str> = readme.lines().map(str::trim).collect();
    for example in &EXAMPLES {
        for binding in config_bindings(example.config) {
            assert!(
                readme_lines.contains(&binding.line.as_str()),
                "README.md does not show the config line {:?} of examples/{}",
                binding.line,
                example.config
            );
        }
        let text = read(&root().join("policy-examples").join(example.policy));
        for rule in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            assert!(
                readme_lines.contains(&rule),
                "README.md does not show the rule {rule:?} of policy-examples/{}",
                example.policy
            );
        }
        assert!(
            readme.contains(example.client) && readme.contains(example.service_qube),
            "README.md does not name {} and {}",
            example.client,
            example.service_qube
        );
    }
}

#[test]
fn every_policy_example_is_valid_policy() {
    let names = files_in("policy-examples", "");
    assert!(!names.is_empty());
    for name in names {
        check_policy_file_name(&name).unwrap();
        let rules = policy_rules(&name);
        assert!(!rules.is_empty(), "{name} has no rule");
    }
}

#[test]
fn every_example_is_paired() {
    let mut policies: Vec<&str> = EXAMPLES.iter().map(|e| e.policy).collect();
    let mut configs: Vec<&str> = EXAMPLES.iter().map(|e| e.config).collect();
    policies.sort();
    configs.sort();
    assert_eq!(
        files_in("policy-examples", ""),
        policies,
        "policy-examples/ vs EXAMPLES"
    );
    assert_eq!(
        files_in("examples", ".conf"),
        configs,
        "examples/*.conf vs EXAMPLES"
    );
}

/// Each example is one of the project's fixed names, which no client
/// qube's `30-qrexec-connect-SOURCE.policy` can be: copying a qube's
/// suggested file never replaces an example installed as it says (for a
/// qube named `nfs`, the shared NFS file of every client).
#[test]
fn example_names_are_never_a_qubes_file() {
    for name in files_in("policy-examples", "") {
        assert!(
            fixed_files::FIXED_POLICY_FILES.contains(&name.as_str()),
            "policy-examples/{name} is not in FIXED_POLICY_FILES"
        );
        let installed_as = format!("# Install in dom0 as /etc/qubes/policy.d/{name}\n");
        assert!(
            read(&root().join("policy-examples").join(&name)).contains(&installed_as),
            "policy-examples/{name} does not say to install it under its own name"
        );
    }
    for fixed in fixed_files::FIXED_POLICY_FILES {
        assert!(
            fixed.starts_with("30-qrexec-connect") && !fixed.starts_with("30-qrexec-connect-"),
            "{fixed} is in the name space of the qubes' files"
        );
    }
}

/// qrexec reads `policy.d` in the C-locale order of the names and takes
/// the first rule that matches: a qube's `30-qrexec-connect-QUBE.policy`
/// sorts before `30-user.policy`, so an administrator's deny there does not
/// override the qube's allow. The README says so, and names a file for a
/// deny that must win: with it, the deny wins.
#[test]
fn an_administrators_deny_wins_only_from_the_file_the_readme_names() {
    let readme = read(&root().join("README.md"));
    let deny_file = readme
        .split("/etc/qubes/policy.d/")
        .skip(1)
        .map(|rest| {
            rest.split(|c: char| c == '`' || c.is_whitespace())
                .next()
                .unwrap()
        })
        .find(|name| name.ends_with(".policy") && !name.starts_with("30-"))
        .expect("the README names no policy file for a deny that must win");
    check_policy_file_name(deny_file).unwrap();
    let allow = "qubes.ConnectTCP +22 ssh-client ssh-server allow\n";
    let deny = "qubes.ConnectTCP +22 ssh-client ssh-server deny\n";
    let verdict = |files: &[(&str, &str)]| {
        let mut files = files.to_vec();
        files.sort_by_key(|(name, _)| name.as_bytes());
        let rules: Vec<PolicyLine> = files
            .iter()
            .flat_map(|(name, text)| {
                check_policy_file(text)
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
                    .into_iter()
                    .map(|(_, rule)| rule)
            })
            .collect();
        evaluate(
            &rules,
            Call {
                source: "ssh-client",
                target: "ssh-server",
                service: "qubes.ConnectTCP+22",
            },
        )
    };
    let qubes_file = ("30-qrexec-connect-ssh-client.policy", allow);
    assert_eq!(
        verdict(&[qubes_file, ("30-user.policy", deny)]),
        Ok(Verdict::Allow {
            qube: "ssh-server".into()
        }),
        "a deny in 30-user.policy is not overridden by the qube's file, as the README says"
    );
    assert_eq!(
        verdict(&[qubes_file, (deny_file, deny)]),
        Ok(Verdict::Deny),
        "the deny in the README's {deny_file} does not win"
    );
    assert!(
        readme.contains("30-user.policy"),
        "the README does not say that a deny in 30-user.policy does not win"
    );
}

#[test]
fn each_policy_allows_its_client_config_to_the_right_qube() {
    for example in &EXAMPLES {
        let rules = policy_rules(example.policy);
        let bindings = config_bindings(example.config);
        assert!(!bindings.is_empty(), "{} has no binding", example.config);
        for ConfigLine { line, binding } in &bindings {
            let destination = binding.destination();
            let call = Call {
                source: example.client,
                target: destination.target.as_str(),
                service: destination.service.as_str(),
            };
            assert_eq!(
                evaluate(&rules, call),
                Ok(Verdict::Allow {
                    qube: example.service_qube.to_owned()
                }),
                "{} with {}",
                example.policy,
                line
            );
        }
    }
}

/// Each example allows exactly its config's calls, from its client, to its
/// service qube (a call left to policy redirected there), and nothing else:
/// no argument, source or target wider than the config asks.
#[test]
fn each_policy_allows_exactly_its_client_config() {
    for example in &EXAMPLES {
        let rules = policy_rules(example.policy);
        let expected: std::collections::BTreeSet<Grant> = config_bindings(example.config)
            .iter()
            .map(|ConfigLine { binding, .. }| {
                let destination = binding.destination();
                let call = Call {
                    source: example.client,
                    target: destination.target.as_str(),
                    service: destination.service.as_str(),
                };
                let redirect =
                    (intended_target(call.target) == "@default").then_some(example.service_qube);
                Grant::for_call(call, redirect)
            })
            .collect();
        assert_eq!(allowed(&rules), Ok(expected), "{}", example.policy);
    }
}

#[test]
fn each_file_names_its_partner() {
    for example in &EXAMPLES {
        let policy_text = read(&root().join("policy-examples").join(example.policy));
        let config_text = read(&root().join("examples").join(example.config));
        for binding in config_bindings(example.config) {
            let quoted = policy_text
                .lines()
                .any(|l| l.starts_with('#') && l.trim_start_matches('#').trim() == binding.line);
            assert!(
                quoted,
                "{} does not quote {:?}",
                example.policy, binding.line
            );
        }
        assert!(
            policy_text.contains(&format!("examples/{}", example.config)),
            "{} does not name examples/{}",
            example.policy,
            example.config
        );
        assert!(
            config_text.contains(&format!("policy-examples/{}", example.policy)),
            "{} does not name policy-examples/{}",
            example.config,
            example.policy
        );
    }
}

#[test]
fn the_nfs_policy_pins_each_client_to_its_address() {
    let rules = policy_rules("30-qrexec-connect.nfs.policy");
    let call = |source, service| Call {
        source,
        target: "nfs-server",
        service,
    };
    let verdict = |source, service| evaluate(&rules, call(source, service)).unwrap();
    assert_eq!(
        verdict("nfs-client", "qubes.ConnectNFS+127.0.1.1"),
        Verdict::Allow {
            qube: "nfs-server".into()
        }
    );
    // Another address (another client's rights), or none at all.
    assert_eq!(
        verdict("nfs-client", "qubes.ConnectNFS+127.0.1.2"),
        Verdict::Deny
    );
    assert_eq!(verdict("nfs-client", "qubes.ConnectNFS"), Verdict::Deny);
    // Another qube asking for nfs-client's address.
    assert_eq!(
        verdict("untrusted", "qubes.ConnectNFS+127.0.1.1"),
        Verdict::Deny
    );
    // No rule here allows it anywhere else.
    let elsewhere = Call {
        source: "nfs-client",
        target: "@default",
        service: "qubes.ConnectNFS+127.0.1.1",
    };
    assert_eq!(evaluate(&rules, elsewhere), Ok(Verdict::Deny));
}

#[test]
fn the_tcp_policy_allows_only_port_22() {
    let rules = policy_rules("30-qrexec-connect.tcp.policy");
    let call = Call {
        source: "ssh-client",
        target: "ssh-server",
        service: "qubes.ConnectTCP+23",
    };
    // Left to the deny rule of Qubes' own 90-default.policy.
    assert_eq!(evaluate(&rules, call), Ok(Verdict::NoMatch));
}

// ---------------------------------------------------------------------------
// The checker itself
// ---------------------------------------------------------------------------

#[test]
fn the_checker_accepts_valid_rules() {
    let valid = [
        "qubes.ConnectTCP +22 ssh-client ssh-server allow",
        "qubes.ConnectTCP +2222 ssh-client @default allow target=ssh-server",
        "qubes.ConnectSSHAgent * ssh-client @default allow target=vault",
        "qubes.ConnectSSHAgent + ssh-client @default ask default_target=vault",
        "qubes.ConnectSSHAgent + ssh-client @default allow target=vault",
        "my.Service + work dom0 allow",
        "qubes.ConnectTCP * @anyvm @anyvm deny",
        "qubes.ConnectTCP * @anyvm @anyvm deny notify=no",
        "* * @anyvm @adminvm deny",
        "qubes.Filecopy * @tag:work @type:AppVM ask user=user notify=yes autostart=no",
        "qubes.OpenInVM * @dispvm:fedora-dvm @dispvm allow target=@dispvm:fedora-dvm",
        "qubes.OpenURL * @dispvm:@tag:disp @dispvm:@tag:disp deny",
        "qubes.VMShell * @adminvm work allow user=root",
        "qubes.ConnectNFS +127.0.1.1 nfs-client nfs-server allow",
        "my-org.Service_2 +a.b+c_d-e source target ask target=@adminvm",
        "\tqubes.ConnectTCP  +22\tssh-client   ssh-server allow ",
    ];
    for line in valid {
        check_policy_line(line).unwrap_or_else(|e| panic!("{e}"));
    }
    let rule = check_policy_line("qubes.ConnectSSHAgent * ssh-client @default allow target=vault")
        .unwrap();
    assert_eq!(rule.service.as_deref(), Some("qubes.ConnectSSHAgent"));
    assert_eq!(rule.argument, Argument::Any);
    assert_eq!(rule.action, Action::Allow);
    assert_eq!(rule.param("target"), Some("vault"));
    assert_eq!(
        rule.to_string(),
        "qubes.ConnectSSHAgent * ssh-client @default allow target=vault"
    );
    let rule =
        check_policy_line("qubes.ConnectNFS +127.0.1.1 nfs-client nfs-server allow").unwrap();
    assert_eq!(rule.argument, Argument::Exactly("127.0.1.1".into()));
    // A bare `+` is the empty argument, not "any".
    let rule = check_policy_line("qubes.ConnectSSHAgent + ssh-client @default allow target=vault")
        .unwrap();
    assert_eq!(rule.argument, Argument::Exactly(String::new()));
}

#[test]
fn the_checker_refuses_invalid_rules() {
    let invalid = [
        // The old (R4.0) format: commas, and no service/argument columns.
        ("ssh-client ssh-server allow,target=x", "commas"),
        (
            "qubes.ConnectTCP +22 ssh-client ssh-server allow,notify=yes",
            "commas",
        ),
        ("ssh-client ssh-server allow", "3 fields"),
        ("qubes.ConnectTCP +22 ssh-client ssh-server", "4 fields"),
        (
            "qubes.ConnectTCP+22 * ssh-client ssh-server allow",
            "own field",
        ),
        ("qubes.ConnectTCP 22 ssh-client ssh-server allow", "+ARG"),
        ("qubes.Connect/TCP +22 a b allow", "'/' is not allowed"),
        ("qubes.ConnectTCP +2:2 a b allow", "':' is not allowed"),
        ("* +22 a b allow", "a * service takes only a * argument"),
        ("qubes.ConnectTCP +22 a b permit", "unknown action"),
        ("qubes.ConnectTCP +22 a b Allow", "unknown action"),
        ("qubes.ConnectTCP +22 a b allow target", "not KEY=VALUE"),
        (
            "qubes.ConnectTCP +22 a b allow default_target=c",
            "not a parameter of allow",
        ),
        (
            "qubes.ConnectTCP +22 a b deny target=c",
            "not a parameter of deny",
        ),
        (
            "qubes.ConnectTCP +22 a b allow colour=red",
            "not a parameter",
        ),
        ("qubes.ConnectTCP +22 a b allow notify=true", "yes or no"),
        ("qubes.ConnectTCP +22 a b allow autostart=1", "yes or no"),
        ("qubes.ConnectTCP +22 a b allow user=", "user name"),
        (
            "qubes.ConnectTCP +22 a b allow target=c target=d",
            "given twice",
        ),
        (
            "qubes.ConnectTCP +22 a @default allow",
            "must name the qube with target=",
        ),
        (
            "qubes.ConnectTCP +22 @default b allow",
            "not allowed as a source",
        ),
        (
            "qubes.ConnectTCP +22 @dispvm b allow",
            "not allowed as a source",
        ),
        (
            "qubes.ConnectTCP +22 a b allow target=@anyvm",
            "not allowed as a redirect",
        ),
        (
            "qubes.ConnectTCP +22 a b allow target=@tag:x",
            "not allowed as a redirect",
        ),
        ("qubes.ConnectTCP +22 a @everyone allow", "unknown keyword"),
        (
            "qubes.ConnectTCP +22 a $default allow target=b",
            "unknown keyword",
        ),
        (
            "qubes.ConnectTCP +22 a @type:Appvm allow",
            "the type is one of",
        ),
        ("qubes.ConnectTCP +22 a @tag: allow", "a tag is"),
        (
            "qubes.ConnectTCP +22 a @dispvm:9x allow",
            "@dispvm: needs a qube name",
        ),
        ("qubes.ConnectTCP +22 1client b allow", "a qube name is"),
        ("qubes.ConnectTCP +22 a b.c allow", "a qube name is"),
        (
            "qubes.ConnectTCP +22 a-very-long-qube-name-over-31-chars b allow",
            "at most 31",
        ),
        ("qubes.ConnectTCP +22 a b allow # ok?", "whole lines"),
        ("!include /etc/qubes/policy.d/include/x", "directives"),
    ];
    for (line, why) in invalid {
        match check_policy_line(line) {
            Ok(rule) => panic!("{line:?} accepted as {rule:?}"),
            Err(error) => assert!(error.contains(why), "{line:?}: {error:?} lacks {why:?}"),
        }
    }
}

#[test]
fn the_checker_reports_line_numbers_and_file_names() {
    let text = "# comment\n\nqubes.ConnectTCP +22 a b allow\nqubes.ConnectTCP +22 a b maybe\n";
    let error = check_policy_file(text).unwrap_err();
    assert!(error.starts_with("line 4: "), "{error}");
    assert_eq!(check_policy_file("# only comments\n\n"), Ok(vec![]));
    check_policy_file_name("30-qrexec-connect.nfs.policy").unwrap();
    for bad in [
        "30-NFS.policy",
        "30-nfs.conf",
        ".30-nfs.policy",
        "30 nfs.policy",
    ] {
        assert!(check_policy_file_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn evaluation_is_first_match_and_honours_redirects() {
    let rules: Vec<PolicyLine> = [
        "qubes.ConnectTCP +22 work @default allow target=ssh-server",
        "qubes.ConnectTCP +22 work @anyvm deny",
        "qubes.ConnectTCP * @anyvm ssh-server ask",
        "qubes.ConnectTCP * @tag:x @anyvm deny",
    ]
    .iter()
    .map(|l| check_policy_line(l).unwrap())
    .collect();
    let call = |source, target, service| Call {
        source,
        target,
        service,
    };
    let allow = |qube: &str| Ok(Verdict::Allow { qube: qube.into() });
    assert_eq!(
        evaluate(&rules, call("work", "", "qubes.ConnectTCP+22")),
        allow("ssh-server")
    );
    assert_eq!(
        evaluate(&rules, call("work", "$default", "qubes.ConnectTCP+22")),
        allow("ssh-server")
    );
    assert_eq!(
        evaluate(&rules, call("work", "ssh-server", "qubes.ConnectTCP+22")),
        Ok(Verdict::Deny)
    );
    assert_eq!(
        evaluate(&rules, call("other", "ssh-server", "qubes.ConnectTCP+80")),
        Ok(Verdict::Ask)
    );
    assert!(
        evaluate(&rules, call("other", "web", "qubes.ConnectTCP+80")).is_err(),
        "@tag needs qube properties"
    );
    assert_eq!(
        evaluate(&rules, call("work", "web", "qubes.Other")),
        Ok(Verdict::NoMatch)
    );
}

/// qrexec evaluates a call without argument as the empty argument: a rule's
/// `+` matches it (and `SERVICE+`) and nothing else, `*` every argument.
#[test]
fn a_bare_plus_matches_only_the_call_without_argument() {
    let rules: Vec<PolicyLine> = [
        "qubes.ConnectTCP + work ssh-server allow",
        "my.Service * work vault allow",
    ]
    .iter()
    .map(|l| check_policy_line(l).unwrap())
    .collect();
    let verdict = |target, service| {
        evaluate(
            &rules,
            Call {
                source: "work",
                target,
                service,
            },
        )
        .unwrap()
    };
    let allow = |qube: &str| Verdict::Allow { qube: qube.into() };
    assert_eq!(
        verdict("ssh-server", "qubes.ConnectTCP"),
        allow("ssh-server")
    );
    assert_eq!(
        verdict("ssh-server", "qubes.ConnectTCP+"),
        allow("ssh-server")
    );
    assert_eq!(
        verdict("ssh-server", "qubes.ConnectTCP+22"),
        Verdict::NoMatch
    );
    assert_eq!(verdict("vault", "my.Service"), allow("vault"));
    assert_eq!(verdict("vault", "my.Service+anything"), allow("vault"));
}

/// `allowed` keeps wildcards as wildcards, reads `dom0` as `@adminvm` and
/// `$`-targets as qrexec-client-vm sends them, and refuses to compute a set
/// that depends on first match or on a person.
#[test]
fn the_allowed_set_keeps_wildcards_and_refuses_to_guess() {
    let rules = |lines: &[&str]| -> Vec<PolicyLine> {
        lines
            .iter()
            .map(|l| check_policy_line(l).unwrap())
            .collect()
    };
    let call = |target, service| Call {
        source: "work",
        target,
        service,
    };
    let set = allowed(&rules(&[
        "qubes.ConnectTCP * work ssh-server allow",
        "qubes.ConnectTCP + work ssh-server allow",
        "my.Service + work dom0 allow",
        "my.Agent +x work @default allow target=vault",
        "qubes.ConnectTCP * @anyvm @anyvm deny",
    ]))
    .unwrap();
    let wildcard = Grant {
        argument: Argument::Any,
        ..Grant::for_call(call("ssh-server", "qubes.ConnectTCP"), None)
    };
    let expected = [
        wildcard,
        Grant::for_call(call("ssh-server", "qubes.ConnectTCP"), None),
        Grant::for_call(call("$adminvm", "my.Service+"), None),
        Grant::for_call(call("$default", "my.Agent+x"), Some("vault")),
    ];
    assert_eq!(set, expected.into_iter().collect());
    assert!(allowed(&rules(&[
        "qubes.ConnectTCP +22 work b deny",
        "qubes.ConnectTCP +22 work b allow"
    ]))
    .is_err());
    assert!(allowed(&rules(&["qubes.ConnectTCP +22 work b ask"])).is_err());
}
