//! Qubes R4.1+ policy, evaluated the way the double needs it: first match
//! wins, `ask` is answered "allow", and only what a test can know without a
//! qube database matches.
//!
//! The grammar is not parsed here: the policy file is read with the tests'
//! one Qubes policy parser, `qubes_policy::check_policy_file`
//! (`tests/common/policy.rs`), which follows qrexec's own parser. As in dom0,
//! one bad line makes the whole policy unusable, and then every call is
//! refused; `!include` directives count as bad lines.
//!
//! Matching: a qube name matches itself (`dom0` is `@adminvm`, as dom0 reads
//! it); `@anyvm` anything but `@adminvm`; `@default`, `@adminvm`, `@dispvm`
//! and `@dispvm:NAME` only themselves. `@tag:`, `@type:` and `@dispvm:@tag:`
//! never match (the double knows no tags or types), and neither does
//! `@dispvm:NAME` a call to `@dispvm` (dom0 matches it when NAME is the
//! source's `default_dispvm`, which the double does not know).

use qubes_policy::{check_policy_file, Action, Argument};

/// What a call asks for, already normalised (`$` -> `@`, empty target ->
/// `@default`, source `dom0` -> `@adminvm`).
pub struct Request<'a> {
    pub service: &'a str,
    /// The argument without its `+`; empty when there is none.
    pub argument: &'a str,
    pub source: &'a str,
    pub target: &'a str,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed (`allow` or `ask`); `target` is the `target=` redirect (for
    /// `ask` without one, `default_target=`), if any.
    Allow { target: Option<String> },
    /// Refused; the reason goes to the double's log only.
    Deny(String),
}

/// Whether a rule's SOURCE or TARGET token matches a normalised qube or
/// keyword of the call.
fn token_matches(token: &str, call: &str) -> bool {
    match token {
        "@anyvm" => call != "@adminvm",
        "dom0" => call == "@adminvm",
        _ if token.starts_with("@tag:")
            || token.starts_with("@type:")
            || token.starts_with("@dispvm:@tag:") =>
        {
            false
        }
        _ => token == call,
    }
}

/// Evaluates `text` (the whole policy) for `req`.
pub fn evaluate(text: &str, req: &Request) -> Verdict {
    let rules = match check_policy_file(text) {
        Ok(rules) => rules,
        // "line N: ..." from the parser.
        Err(error) => return Verdict::Deny(format!("policy {error}")),
    };
    for (lineno, rule) in &rules {
        let hit = rule.service.as_deref().is_none_or(|s| s == req.service)
            && match &rule.argument {
                Argument::Any => true,
                Argument::Exactly(argument) => argument == req.argument,
            }
            && token_matches(&rule.source, req.source)
            && token_matches(&rule.target, req.target);
        if !hit {
            continue;
        }
        let redirect = match rule.action {
            Action::Deny => return Verdict::Deny(format!("denied by policy line {lineno}")),
            Action::Allow => rule.param("target"),
            // `ask` is answered at once with the preselected default (if any).
            Action::Ask => rule.param("target").or(rule.param("default_target")),
        };
        return Verdict::Allow {
            target: redirect.map(str::to_owned),
        };
    }
    Verdict::Deny("no matching policy line".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(policy: &str, service: &str, argument: &str, source: &str, target: &str) -> Verdict {
        evaluate(
            policy,
            &Request {
                service,
                argument,
                source,
                target,
            },
        )
    }

    const P: &str = "\
# comment
qubes.ConnectTCP +22 client ssh-server allow
qubes.ConnectTCP +2222 client @default allow target=ssh-server
qubes.ConnectTCP + client @anyvm ask default_target=vault
qubes.ConnectTCP +80 @anyvm @anyvm deny
qubes.Other * @anyvm @dispvm:tpl allow
* * client @anyvm allow
";

    #[test]
    fn first_match_wins() {
        let allow = |t: Option<&str>| Verdict::Allow {
            target: t.map(str::to_string),
        };
        assert_eq!(
            ev(P, "qubes.ConnectTCP", "22", "client", "ssh-server"),
            allow(None)
        );
        assert_eq!(
            ev(P, "qubes.ConnectTCP", "2222", "client", "@default"),
            allow(Some("ssh-server"))
        );
        assert_eq!(
            ev(P, "qubes.ConnectTCP", "", "client", "x"),
            allow(Some("vault"))
        );
        assert!(matches!(
            ev(P, "qubes.ConnectTCP", "80", "client", "x"),
            Verdict::Deny(_)
        ));
        assert_eq!(ev(P, "qubes.Other", "a", "zz", "@dispvm:tpl"), allow(None));
        assert!(matches!(
            ev(P, "qubes.Other", "a", "zz", "@dispvm"),
            Verdict::Deny(_)
        ));
        // the catch-all line for `client`
        assert_eq!(
            ev(P, "qubes.ConnectTCP", "22", "client", "other"),
            allow(None)
        );
        assert!(matches!(ev(P, "x.Y", "", "other", "b"), Verdict::Deny(_)));
        assert!(matches!(
            ev(P, "x.Y", "", "client", "@adminvm"),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn syntax_errors_refuse_everything() {
        for bad in [
            "* * @anyvm @anyvm allow\nfoo",
            "* +x @anyvm @anyvm allow",
            "a x @anyvm @anyvm allow",
            "a * @anyvm @anyvm permit",
            "a * @default @anyvm allow",
            "a * @bogus @anyvm allow",
            "a * @anyvm @anyvm allow target=@anyvm",
            "a * @anyvm @anyvm deny target=x",
            "a * @anyvm @anyvm allow user=a user=b",
            "!include foo",
            // Refused by dom0's parser, so by the shared one too:
            "a * s @default allow",
            "a * s not.a.qube allow",
            "a * s t allow notify=maybe",
        ] {
            assert!(
                matches!(ev(bad, "a", "", "s", "t"), Verdict::Deny(_)),
                "{bad}"
            );
        }
    }

    #[test]
    fn dom0_may_be_the_source_as_in_dom0() {
        for source in ["dom0", "@adminvm"] {
            let policy = format!("a * {source} t allow\n* * @anyvm @anyvm deny\n");
            assert_eq!(
                ev(&policy, "a", "", "@adminvm", "t"),
                Verdict::Allow { target: None },
                "{source}"
            );
            assert!(matches!(ev(&policy, "a", "", "s", "t"), Verdict::Deny(_)));
        }
    }
}
