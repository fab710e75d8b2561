//! Qubes R4.1+ policy, the subset a test can use without a qube database.
//!
//! Line format: `SERVICE +ARG|* SOURCE TARGET ACTION [key=value ...]`,
//! whitespace separated; blank lines and lines starting with `#` are
//! skipped; the first matching line decides. As in dom0, one bad line makes
//! the whole policy unusable, and then every call is refused.
//!
//! Tokens: a qube name; `@anyvm` (anything but `@adminvm`); `@default`;
//! `@adminvm`; `@dispvm`; `@dispvm:NAME`. `@tag:`, `@type:` and
//! `@dispvm:@tag:` are accepted but never match (the double knows no tags or
//! types). `!include` directives are not supported (syntax error).

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
    /// Allowed (`allow` or `ask`); `target` is the `target=` redirect, if any.
    Allow { target: Option<String> },
    /// Refused; the reason goes to the double's log only.
    Deny(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Name(String),
    AnyVm,
    Default,
    AdminVm,
    DispVm,
    DispVmTemplate(String),
    /// `@tag:`, `@type:`, `@dispvm:@tag:`: valid, never matches.
    Unknowable,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Column {
    Source,
    Target,
    Redirect,
}

fn parse_token(s: &str, col: Column) -> Result<Token, String> {
    let s = if s == "dom0" { "@adminvm" } else { s };
    let tok = if !s.starts_with('@') {
        Token::Name(s.to_string())
    } else if s == "@anyvm" {
        Token::AnyVm
    } else if s == "@default" {
        Token::Default
    } else if s == "@adminvm" {
        Token::AdminVm
    } else if s == "@dispvm" {
        Token::DispVm
    } else if let Some(rest) = s.strip_prefix("@dispvm:@tag:") {
        nonempty(rest, s)?;
        Token::Unknowable
    } else if let Some(rest) = s.strip_prefix("@dispvm:") {
        nonempty(rest, s)?;
        if rest.starts_with('@') {
            return Err(format!("invalid token {s:?}"));
        }
        Token::DispVmTemplate(rest.to_string())
    } else if let Some(rest) = s.strip_prefix("@tag:").or_else(|| s.strip_prefix("@type:")) {
        nonempty(rest, s)?;
        Token::Unknowable
    } else {
        return Err(format!("invalid token {s:?}"));
    };
    let allowed = match col {
        Column::Source => !matches!(tok, Token::Default | Token::AdminVm | Token::DispVm),
        Column::Target => true,
        Column::Redirect => matches!(
            tok,
            Token::Name(_) | Token::AdminVm | Token::DispVm | Token::DispVmTemplate(_)
        ),
    };
    if !allowed {
        return Err(format!("token {s:?} not allowed in this column"));
    }
    Ok(tok)
}

fn nonempty(rest: &str, whole: &str) -> Result<(), String> {
    if rest.is_empty() {
        Err(format!("invalid empty token {whole:?}"))
    } else {
        Ok(())
    }
}

impl Token {
    fn matches(&self, other: &str) -> bool {
        match self {
            Token::Name(n) => n == other,
            Token::AnyVm => other != "@adminvm",
            Token::Default => other == "@default",
            Token::AdminVm => other == "@adminvm",
            Token::DispVm => other == "@dispvm",
            Token::DispVmTemplate(t) => other.strip_prefix("@dispvm:") == Some(t.as_str()),
            Token::Unknowable => false,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
    Ask,
}

struct Rule {
    lineno: usize,
    service: Option<String>,
    /// With its leading `+`; `None` for `*`.
    argument: Option<String>,
    source: Token,
    target: Token,
    action: Action,
    redirect: Option<String>,
}

fn parse_rule(line: &str, lineno: usize) -> Result<Rule, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 5 {
        return Err("wrong number of fields".into());
    }
    let service = match fields[0] {
        "*" => None,
        s if s.contains('+') || !s.bytes().all(rpc_char) => {
            return Err(format!("invalid service {s:?}"))
        }
        s => Some(s.to_string()),
    };
    let argument = match fields[1] {
        "*" => None,
        a if !a.starts_with('+') => return Err(format!("argument {a:?} does not start with +")),
        a if !a.bytes().all(|b| rpc_char(b) || b == b'+') => {
            return Err(format!("invalid argument {a:?}"))
        }
        a => Some(a.to_string()),
    };
    if service.is_none() && argument.is_some() {
        return Err("only * argument allowed for * service".into());
    }
    let source = parse_token(fields[2], Column::Source)?;
    let target = parse_token(fields[3], Column::Target)?;
    let action = match fields[4] {
        "allow" => Action::Allow,
        "deny" => Action::Deny,
        "ask" => Action::Ask,
        a => return Err(format!("invalid action {a:?}")),
    };
    let allowed_keys: &[&str] = match action {
        Action::Allow => &["target", "user", "notify", "autostart"],
        Action::Ask => &["target", "default_target", "user", "notify", "autostart"],
        Action::Deny => &["notify"],
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut redirect = None;
    let mut default_target = None;
    for param in &fields[5..] {
        let Some((key, value)) = param.split_once('=') else {
            return Err(format!("invalid action parameter syntax: {param:?}"));
        };
        if seen.contains(&key) {
            return Err(format!("parameter given twice: {key:?}"));
        }
        seen.push(key);
        if !allowed_keys.contains(&key) {
            return Err(format!(
                "invalid parameter {key:?} for action {}",
                fields[4]
            ));
        }
        match key {
            "target" => {
                parse_token(value, Column::Redirect)?;
                redirect = Some(value.to_string());
            }
            "default_target" => {
                parse_token(value, Column::Redirect)?;
                default_target = Some(value.to_string());
            }
            _ => {}
        }
    }
    if action == Action::Ask && redirect.is_none() {
        // `ask` is answered at once with the preselected default (if any).
        redirect = default_target;
    }
    Ok(Rule {
        lineno,
        service,
        argument,
        source,
        target,
        action,
        redirect,
    })
}

/// Characters dom0 allows in a service name.
pub fn rpc_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-'
}

/// Evaluates `text` (the whole policy) for `req`.
pub fn evaluate(text: &str, req: &Request) -> Verdict {
    let mut rules = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('!') {
            return Verdict::Deny(format!(
                "policy line {}: directives are not supported by the double",
                idx + 1
            ));
        }
        match parse_rule(line, idx + 1) {
            Ok(r) => rules.push(r),
            Err(e) => return Verdict::Deny(format!("policy line {}: {e}", idx + 1)),
        }
    }
    let argument = format!("+{}", req.argument);
    for r in &rules {
        let hit = r.service.as_deref().is_none_or(|s| s == req.service)
            && r.argument.as_deref().is_none_or(|a| a == argument)
            && r.source.matches(req.source)
            && r.target.matches(req.target);
        if !hit {
            continue;
        }
        return match r.action {
            Action::Deny => Verdict::Deny(format!("denied by policy line {}", r.lineno)),
            Action::Allow | Action::Ask => Verdict::Allow {
                target: r.redirect.clone(),
            },
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
        ] {
            assert!(
                matches!(ev(bad, "a", "", "s", "t"), Verdict::Deny(_)),
                "{bad}"
            );
        }
    }
}
