//! The dom0 policy a client qube's bindings need (`qrexec-connect policy`).
//!
//! One rule per distinct call, in the R4.1+ format of
//! `/etc/qubes/policy.d/*.policy`:
//!
//! ```text
//! SERVICE +ARGUMENT SOURCE TARGET allow [target=QUBE]
//! ```
//!
//! The lines follow `docs/policy-lines.md`, shared with the Salt formula:
//! the argument is written exactly (`+22`); a service without one gets `*`
//! (qrexec runs `SERVICE` for any `SERVICE+ARG` call that has no file of
//! its own, so `+` alone would refuse nothing the service answers
//! differently).
//! A binding whose target is left to policy (`@default`, `''`) gets
//! `@default allow target=…` with a placeholder qube and a comment saying
//! to choose it: only the dom0 administrator knows which qube serves it.
//! A service that is not part of Qubes gets a comment on what its service
//! qube needs. Unlike the Salt formula's file, which holds every client's
//! rules, this one holds one qube's: it ends with no `qubes.ConnectNFS *
//! @anyvm @anyvm deny`, which would refuse the other clients' rules in
//! files that sort after it.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use qrexec_connect_binding::destination::Destination;

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

/// The file name the output is meant for, in dom0.
pub const POLICY_FILE: &str = "/etc/qubes/policy.d/30-qrexec-connect.policy";

/// Renders the policy for the qube named `source_qube`.
pub fn render(source_qube: &str, bindings: &[PolicyBinding]) -> String {
    let mut text = format!(
        "# qrexec-connect: what {source_qube} may call, one rule per binding.\n\
         # Install in dom0 as {POLICY_FILE}\n"
    );
    if bindings.is_empty() {
        text += "# (no bindings)\n";
        return text;
    }
    let mut written = BTreeSet::new();
    let mut notes = BTreeSet::new();
    for binding in bindings {
        let service = binding.destination.service.as_str();
        let (name, argument) = match service.split_once('+') {
            Some((name, argument)) => (name, format!("+{argument}")),
            None => (service, "*".to_owned()),
        };
        let (target, params) = match binding.destination.target.as_str() {
            "" | "@default" => ("@default", format!(" target={CHOOSE}")),
            other => (other, String::new()),
        };
        let rule = format!("{name} {argument} {source_qube} {target} allow{params}");
        if !written.insert(rule.clone()) {
            continue;
        }
        if !params.is_empty() {
            let _ = writeln!(
                text,
                "# {} ({}) leaves the qube to policy: replace {CHOOSE} with the qube that serves it.",
                binding.listen, binding.source
            );
        }
        text += &rule;
        text.push('\n');
        if let Some(note) = service_note(name) {
            notes.insert(note);
        }
    }
    for note in notes {
        text += &note;
    }
    text
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

    #[test]
    fn one_exact_rule_per_call() {
        let text = render(
            "work",
            &[
                binding("127.0.0.1:2222", "ssh-server qubes.ConnectTCP+22"),
                binding("[::1]:2222", "ssh-server qubes.ConnectTCP+22"),
                binding("%t/agent", "@default qubes.ConnectSSHAgent"),
                binding("127.0.0.1:2049", "nfs qubes.ConnectNFS+127.0.1.1"),
            ],
        );
        let rules: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            rules,
            [
                "qubes.ConnectTCP +22 work ssh-server allow",
                "qubes.ConnectSSHAgent * work @default allow target=CHOOSE-A-QUBE",
                "qubes.ConnectNFS +127.0.1.1 work nfs allow",
            ]
        );
        assert!(text.contains("# %t/agent (/home/user/.config/qrexec-connect/a.conf:1) leaves"));
        assert!(text.contains("/etc/qubes-rpc/qubes.ConnectSSHAgent as a symlink"));
        assert!(text.contains("install the qrexec-connect-nfs package"));
        assert!(!text.contains("qubes.ConnectTCP is not part"));
    }
}
