//! A checker for Qubes qrexec policy in the R4.1+ format, the files of
//! `/etc/qubes/policy.d/`, for tests that must not ship a policy line Qubes
//! would refuse (the examples, and the README's code blocks).
//!
//! It is the library `qubes_policy` of the tests package: the tests call
//! [`check_policy_line`], [`check_policy_file`] or [`check_policy_file_name`],
//! and the qrexec-client-vm double reads its policy with [`check_policy_file`]
//! (one grammar for both; each evaluates in its own way).
//!
//! It follows the rules of qrexec's own parser (`qrexec/policy/parser.py`):
//!
//! * a rule is `SERVICE ARGUMENT SOURCE TARGET ACTION [KEY=VALUE ...]`,
//!   whitespace separated; comments are whole lines starting with `#`;
//! * SERVICE is `*` or a name of `[A-Za-z0-9_.-]`; ARGUMENT is `*`, or `+`
//!   followed by `[A-Za-z0-9_.+-]` (a bare `+` is the empty argument); a `*`
//!   service takes only a `*` argument;
//! * SOURCE is `@anyvm`, `@adminvm`, `@tag:T`, `@type:T`, `@dispvm:VM`,
//!   `@dispvm:@tag:T` or a qube name; TARGET may also be `@default` or
//!   `@dispvm`; `target=`/`default_target=` take `@adminvm`, `@dispvm`,
//!   `@dispvm:VM` or a qube name;
//! * ACTION is `allow`, `deny` or `ask`, with only the parameters qrexec
//!   accepts for it (deny: `notify`; allow: `target`, `user`, `notify`,
//!   `autostart`; ask: those and `default_target`), each at most once,
//!   `notify`/`autostart` being `yes` or `no`;
//! * an `allow` rule whose TARGET is `@default` must say `target=`.
//!
//! Stricter than qrexec on purpose: commas are refused (they only belong to
//! the old R4.0 per-service files), as are `!include` directives and the
//! `uuid:` tokens of newer releases, which the examples do not need. Qube
//! names follow qrexec-client-vm (`^[a-zA-Z][a-zA-Z0-9_-]*$`, at most 31):
//! the product's own rule, [`is_vm_name`] of the binding crate.
//!
//! [`evaluate`] answers "what does this policy do with this call?" for rules
//! that name qubes (or use `@anyvm`/`@default`); it refuses to guess for
//! tokens that need qube properties (tags, types, disposables).
//!
//! [`allowed`] answers "what does this file allow?": the set of
//! [`Grant`]s, each a (service, argument, source, target) pattern and where
//! the call then runs. Two files of allow rules with equal sets allow
//! exactly the same calls; a wildcard (`*` argument, `@anyvm`, `@tag:x`)
//! stays a wildcard in the set, so it can never equal a set of single
//! calls. [`Grant::for_call`] gives the one grant a binding's call needs,
//! so a test can compare what a policy allows with what a config asked.
//!
//! Arguments as qrexec reads them (`parse_service_and_argument` in
//! qrexec's parser): a call `SERVICE` without `+` is evaluated with the
//! empty argument, exactly like `SERVICE+`; a rule's `+` alone matches only
//! that, `+ARG` only `ARG`, and `*` every argument. The name `dom0` is read
//! as `@adminvm`, in a rule and in a call.

use std::fmt;

/// Longest qube name qrexec accepts.
pub use qrexec_connect_binding::destination::MAX_VM_NAME;
use qrexec_connect_binding::destination::{is_service_char, is_vm_name};

/// The qube classes `@type:` can name.
pub const VM_TYPES: [&str; 5] = ["AppVM", "TemplateVM", "DispVM", "StandaloneVM", "AdminVM"];

/// One rule of a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyLine {
    /// `None` for `*`.
    pub service: Option<String>,
    pub argument: Argument,
    pub source: String,
    pub target: String,
    pub action: Action,
    /// In the order written.
    pub params: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Argument {
    /// `*`: any argument, or none.
    Any,
    /// `+ARG`: exactly this argument (without the `+`; empty for a bare `+`,
    /// which is also what a call without argument has).
    Exactly(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Ask,
}

impl PolicyLine {
    /// The value of a `key=value` parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for PolicyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let service = self.service.as_deref().unwrap_or("*");
        let argument = match &self.argument {
            Argument::Any => "*".to_owned(),
            Argument::Exactly(arg) => format!("+{arg}"),
        };
        let action = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Ask => "ask",
        };
        write!(
            f,
            "{service} {argument} {} {} {action}",
            self.source, self.target
        )?;
        for (key, value) in &self.params {
            write!(f, " {key}={value}")?;
        }
        Ok(())
    }
}

/// Checks one rule (not a comment or blank line).
pub fn check_policy_line(line: &str) -> Result<PolicyLine, String> {
    if line.contains(',') {
        return Err(format!(
            "{line:?}: commas belong to the old (R4.0) format; separate fields and \
             parameters with spaces"
        ));
    }
    if line.trim_start().starts_with('!') {
        return Err(format!(
            "{line:?}: directives (!include...) are not supported here"
        ));
    }
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 5 {
        return Err(format!(
            "{line:?}: {} fields; a rule is SERVICE ARGUMENT SOURCE TARGET ACTION [KEY=VALUE...]",
            fields.len()
        ));
    }
    if let Some(hash) = fields.iter().find(|f| f.starts_with('#')) {
        return Err(format!(
            "{line:?}: {hash:?}: comments must be whole lines starting with #"
        ));
    }
    let service = check_service(fields[0])?;
    let argument = check_argument(fields[1])?;
    if service.is_none() && argument != Argument::Any {
        return Err(format!("{line:?}: a * service takes only a * argument"));
    }
    let source = check_token(fields[2], Place::Source)?;
    let target = check_token(fields[3], Place::Target)?;
    let action = match fields[4] {
        "allow" => Action::Allow,
        "deny" => Action::Deny,
        "ask" => Action::Ask,
        other => {
            return Err(format!(
                "{line:?}: unknown action {other:?}; use allow, deny or ask"
            ))
        }
    };
    let mut params: Vec<(String, String)> = Vec::new();
    for field in &fields[5..] {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| format!("{line:?}: parameter {field:?} is not KEY=VALUE"))?;
        let allowed: &[&str] = match action {
            Action::Deny => &["notify"],
            Action::Allow => &["target", "user", "notify", "autostart"],
            Action::Ask => &["target", "default_target", "user", "notify", "autostart"],
        };
        if !allowed.contains(&key) {
            return Err(format!(
                "{line:?}: {key:?} is not a parameter of {}; it takes {}",
                fields[4],
                allowed.join("=, ") + "="
            ));
        }
        if params.iter().any(|(k, _)| k == key) {
            return Err(format!("{line:?}: {key}= given twice"));
        }
        match key {
            "notify" | "autostart" if !matches!(value, "yes" | "no") => {
                return Err(format!("{line:?}: {key}= is yes or no, not {value:?}"));
            }
            "target" | "default_target" => {
                check_token(value, Place::Redirect)
                    .map_err(|e| format!("{line:?}: {key}=: {e}"))?;
            }
            "user" if value.is_empty() => {
                return Err(format!("{line:?}: user= needs a user name"));
            }
            _ => {}
        }
        params.push((key.to_owned(), value.to_owned()));
    }
    let rule = PolicyLine {
        service,
        argument,
        source,
        target,
        action,
        params,
    };
    if rule.action == Action::Allow && rule.target == "@default" && rule.param("target").is_none() {
        return Err(format!(
            "{line:?}: an allow rule for @default must name the qube with target="
        ));
    }
    Ok(rule)
}

/// Checks a whole file; returns the rules with their line numbers (from 1).
pub fn check_policy_file(text: &str) -> Result<Vec<(usize, PolicyLine)>, String> {
    let mut rules = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let rule = check_policy_line(trimmed).map_err(|e| format!("line {}: {e}", index + 1))?;
        rules.push((index + 1, rule));
    }
    Ok(rules)
}

/// Checks a file name for `/etc/qubes/policy.d/`: qrexec reads only
/// `*.policy`, and refuses the whole directory if a name has characters
/// other than `[0-9a-z_.-]`.
pub fn check_policy_file_name(name: &str) -> Result<(), String> {
    if !name.ends_with(".policy") || name.starts_with('.') {
        return Err(format!(
            "{name:?}: qrexec only reads files named NN-name.policy"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_digit() || c.is_ascii_lowercase() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{name:?}: {c:?} is not allowed in a policy file name (only 0-9 a-z _ . -)"
        ));
    }
    Ok(())
}

fn check_service(field: &str) -> Result<Option<String>, String> {
    if field == "*" {
        return Ok(None);
    }
    if field.contains('+') {
        return Err(format!(
            "service {field:?}: write the argument in its own field (SERVICE +ARG)"
        ));
    }
    if let Some(c) = field.chars().find(|c| !is_service_char(*c)) {
        return Err(format!("service {field:?}: {c:?} is not allowed"));
    }
    Ok(Some(field.to_owned()))
}

fn check_argument(field: &str) -> Result<Argument, String> {
    if field == "*" {
        return Ok(Argument::Any);
    }
    let Some(argument) = field.strip_prefix('+') else {
        return Err(format!(
            "argument {field:?}: write * or +ARG (a bare + for no argument)"
        ));
    };
    if let Some(c) = argument
        .chars()
        .find(|c| !(is_service_char(*c) || *c == '+'))
    {
        return Err(format!("argument {field:?}: {c:?} is not allowed"));
    }
    Ok(Argument::Exactly(argument.to_owned()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Source,
    Target,
    /// `target=` and `default_target=`.
    Redirect,
}

fn check_token(token: &str, place: Place) -> Result<String, String> {
    let place_name = match place {
        Place::Source => "source",
        Place::Target => "target",
        Place::Redirect => "redirect target",
    };
    let refuse = |why: &str| Err(format!("{place_name} {token:?}: {why}"));
    let valid_here = |ok_in: &[Place]| {
        if ok_in.contains(&place) {
            Ok(token.to_owned())
        } else {
            Err(format!(
                "{place_name} {token:?}: not allowed as a {place_name}"
            ))
        }
    };
    use Place::*;
    match token {
        // qrexec reads the name dom0 as @adminvm.
        "@adminvm" | "dom0" => return valid_here(&[Source, Target, Redirect]),
        "@anyvm" => return valid_here(&[Source, Target]),
        "@default" => return valid_here(&[Target]),
        "@dispvm" => return valid_here(&[Target, Redirect]),
        _ => {}
    }
    if let Some(tag) = token.strip_prefix("@dispvm:@tag:") {
        if !is_tag(tag) {
            return refuse("a tag is letters, digits, _ . -");
        }
        return valid_here(&[Source, Target]);
    }
    if let Some(vm) = token.strip_prefix("@dispvm:") {
        if !is_vm_name(vm) {
            return refuse("@dispvm: needs a qube name");
        }
        return valid_here(&[Source, Target, Redirect]);
    }
    if let Some(tag) = token.strip_prefix("@tag:") {
        if !is_tag(tag) {
            return refuse("a tag is letters, digits, _ . -");
        }
        return valid_here(&[Source, Target]);
    }
    if let Some(class) = token.strip_prefix("@type:") {
        if !VM_TYPES.contains(&class) {
            return refuse(&format!("the type is one of {}", VM_TYPES.join(", ")));
        }
        return valid_here(&[Source, Target]);
    }
    if token.starts_with('@') || token.starts_with('$') {
        return refuse("unknown keyword");
    }
    if !is_vm_name(token) {
        return refuse(&format!(
            "a qube name is a letter then letters, digits, _ or -, at most {MAX_VM_NAME} \
             characters"
        ));
    }
    Ok(token.to_owned())
}

fn is_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.chars().all(is_service_char)
}

// ---------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------

/// A call as qrexec-client-vm makes it: `TARGET SERVICE[+ARG]` from a qube.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub source: &'a str,
    /// As requested; `""` and `$default` mean `@default`.
    pub target: &'a str,
    /// `SERVICE` or `SERVICE+ARG`.
    pub service: &'a str,
}

/// What the first matching rule does with a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Runs in this qube (after `target=` redirection).
    Allow {
        qube: String,
    },
    Ask,
    Deny,
    /// No rule matched: qrexec refuses the call.
    NoMatch,
}

/// First-match evaluation, as qrexec does over its sorted policy files.
/// Fails, rather than guess, on a rule it cannot decide without qube
/// properties (`@tag:`, `@type:`, `@dispvm...`) before a match is found.
pub fn evaluate(rules: &[PolicyLine], call: Call<'_>) -> Result<Verdict, String> {
    let (service, argument) = match call.service.split_once('+') {
        Some((service, argument)) => (service, argument),
        None => (call.service, ""),
    };
    let requested = intended_target(call.target);
    for rule in rules {
        if rule.service.as_deref().is_some_and(|s| s != service) {
            continue;
        }
        if let Argument::Exactly(a) = &rule.argument {
            if a != argument {
                continue;
            }
        }
        let source_matches = match rule.source.as_str() {
            "@anyvm" => true,
            "@adminvm" | "dom0" => call.source == "dom0",
            s if s.starts_with('@') => {
                return Err(format!("cannot tell whether {s} matches {}", call.source))
            }
            s => s == call.source,
        };
        if !source_matches {
            continue;
        }
        let target_matches = match alias(&rule.target) {
            "@anyvm" => requested != "@adminvm",
            token @ ("@default" | "@adminvm" | "@dispvm") => token == requested,
            // A template matches a call asking for it by name, and a call
            // asking for `@dispvm` when it is the source's default_dispvm
            // (a qube property this checker does not know).
            t if t.starts_with("@dispvm:") && !t.starts_with("@dispvm:@") => {
                if requested == "@dispvm" {
                    return Err(format!("cannot tell whether {t} matches @dispvm"));
                }
                t == requested
            }
            t if t.starts_with('@') => {
                return Err(format!("cannot tell whether {t} matches {requested}"))
            }
            t => t == requested,
        };
        if !target_matches {
            continue;
        }
        return Ok(match rule.action {
            Action::Deny => Verdict::Deny,
            Action::Ask => Verdict::Ask,
            Action::Allow => {
                let qube = rule
                    .param("target")
                    .map_or(requested, |q| alias(q).to_owned());
                if qube == "@default" {
                    // qrexec: "no target is specified by caller or policy".
                    Verdict::Deny
                } else {
                    Verdict::Allow { qube }
                }
            }
        });
    }
    Ok(Verdict::NoMatch)
}

/// Whether two SOURCE tokens may match one qube (keywords other than
/// `@anyvm` are taken to match anything: the safe side).
fn overlap(a: &str, b: &str) -> bool {
    a == b || a.starts_with('@') || b.starts_with('@')
}

/// A token as qrexec reads it: `dom0` is `@adminvm`.
fn alias(token: &str) -> &str {
    if token == "dom0" {
        "@adminvm"
    } else {
        token
    }
}

/// The target of a call as dom0 receives it: qrexec-client-vm turns every
/// `$` into `@`, an empty target is `@default`, and `dom0` is `@adminvm`.
pub fn intended_target(asked: &str) -> String {
    match asked.replace('$', "@").as_str() {
        "" => "@default".to_owned(),
        other => alias(other).to_owned(),
    }
}

// ---------------------------------------------------------------------------
// What a file allows
// ---------------------------------------------------------------------------

/// One pattern of calls an allow rule lets through.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grant {
    /// `None` for `*`: every service.
    pub service: Option<String>,
    /// `Exactly("")` for a call without argument (or with an empty one).
    pub argument: Argument,
    /// A qube name, or a keyword that stands for several (`@anyvm`,
    /// `@tag:x`, ...).
    pub source: String,
    /// The target the call asks for: a qube name or a keyword.
    pub target: String,
    /// `target=`: the qube (or `@dispvm:VM`) the call runs in instead.
    pub redirect: Option<String>,
}

impl Grant {
    /// The grant that allows exactly `call` (as qrexec-client-vm makes it),
    /// run in `redirect` when given.
    pub fn for_call(call: Call<'_>, redirect: Option<&str>) -> Grant {
        let (service, argument) = match call.service.split_once('+') {
            Some((service, argument)) => (service, argument),
            None => (call.service, ""),
        };
        Grant {
            service: Some(service.to_owned()),
            argument: Argument::Exactly(argument.to_owned()),
            source: alias(call.source).to_owned(),
            target: intended_target(call.target),
            redirect: redirect.map(|qube| alias(qube).to_owned()),
        }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let argument = match &self.argument {
            Argument::Any => "*".to_owned(),
            Argument::Exactly(arg) => format!("+{arg}"),
        };
        write!(
            f,
            "{} {argument} from {} to {}",
            self.service.as_deref().unwrap_or("*"),
            self.source,
            self.target
        )?;
        if let Some(qube) = &self.redirect {
            write!(f, ", run in {qube}")?;
        }
        Ok(())
    }
}

/// The set of calls `rules` allow, for files of allow rules, optionally
/// followed by deny rules (which take nothing from the allow rules before
/// them: the first match wins). An allow rule after a deny, or an `ask`
/// rule, makes the set depend on more than the rules' patterns; that is an
/// error, not a guess. So does a `@dispvm` rule whose `target=` sends its
/// calls elsewhere than an earlier `@dispvm:T` rule for the same calls: a
/// call asking for `@dispvm` matches that earlier rule when the source's
/// default disposable template is T, and then runs there.
pub fn allowed(rules: &[PolicyLine]) -> Result<std::collections::BTreeSet<Grant>, String> {
    let mut grants = std::collections::BTreeSet::new();
    let mut denied = None;
    let mut templates: Vec<&PolicyLine> = Vec::new();
    for rule in rules {
        match rule.action {
            Action::Ask => return Err(format!("{rule}: ask allows on a person's answer")),
            Action::Deny => denied = Some(rule),
            Action::Allow => {
                if let Some(deny) = denied {
                    return Err(format!(
                        "{rule} follows {deny}: what it allows depends on the deny rule"
                    ));
                }
                let target = alias(&rule.target);
                if target.starts_with("@dispvm:") && !target.starts_with("@dispvm:@") {
                    templates.push(rule);
                }
                if target == "@dispvm" {
                    let runs_in = rule.param("target");
                    if let Some(earlier) = templates.iter().find(|earlier| {
                        // Without target=, the call runs in a disposable of
                        // the default template: T, when the earlier rule matched.
                        runs_in.is_some_and(|qube| qube != earlier.target)
                            && overlap(alias(&earlier.source), alias(&rule.source))
                            && (earlier.service.is_none()
                                || rule.service.is_none()
                                || earlier.service == rule.service)
                            && (earlier.argument == Argument::Any
                                || rule.argument == Argument::Any
                                || earlier.argument == rule.argument)
                    }) {
                        return Err(format!(
                            "{rule} follows {earlier}: a call asking for @dispvm matches that \
                             rule when the source's default disposable template is {}",
                            &earlier.target["@dispvm:".len()..]
                        ));
                    }
                }
                grants.insert(Grant {
                    service: rule.service.clone(),
                    argument: rule.argument.clone(),
                    source: alias(&rule.source).to_owned(),
                    target: alias(&rule.target).to_owned(),
                    redirect: rule.param("target").map(|qube| alias(qube).to_owned()),
                });
            }
        }
    }
    Ok(grants)
}
