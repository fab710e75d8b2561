//! What a binding is: a listen address tied to a qrexec TARGET and SERVICE.
//!
//! This is the one definition shared by the generator (which writes
//! `FileDescriptorName=TARGET SERVICE` into socket units) and the daemon
//! (which reads it back from `LISTEN_FDNAMES`), so the two can never disagree
//! about what is valid. The rules follow qrexec itself (see
//! `docs/design.md` and qrexec-client-vm's sources):
//!
//! * TARGET: empty, `@default`, `@adminvm`, `@dispvm`, `@dispvm:VM`, or a VM
//!   name (`^[a-zA-Z][a-zA-Z0-9_-]*$`, at most 31 bytes); `$` may stand for
//!   `@` as qrexec-client-vm accepts it.
//! * SERVICE: `NAME[+ARG]`, not empty, not starting with `+`, at most 255
//!   bytes, made of the characters dom0 passes through unchanged.
//! * fd name: the two words, split the way a shell would (so `'' svc` gives
//!   an empty target); printable ASCII without `:`, at most 255 bytes.
//!
//! # `@dispvm:TEMPLATE` in an fd name
//!
//! systemd refuses `:` in `FileDescriptorName=` (it separates the names in
//! `LISTEN_FDNAMES`), and drops such a value with a warning in its own
//! journal only. So the fd name writes a disposable's template after a `/`
//! instead: `@dispvm/web-dvm` (and `$dispvm/web-dvm` for `$dispvm:web-dvm`),
//! which [`Target::from_fd_word`] turns back into the real target. Why `/`:
//! it is printable ASCII and no specifier (`%` would be), no fd name that was
//! valid before means anything else with it (a qube name holds no `/`, and
//! no other keyword takes a suffix), a shell does not split or quote it, and
//! qrexec and dom0 refuse `@dispvm/...` as a target, so an encoded word that
//! reached them undecoded would fail closed instead of going elsewhere.
//!
//! Each spelling has one place: a config line (and everything shown to a
//! user: `status`, `policy`, the journal, the client's command line) has the
//! real `@dispvm:web-dvm`, and [`Target::parse`] refuses the encoded form
//! there; an fd name (a generated unit, or a hand-written one) has
//! `@dispvm/web-dvm`, and [`Target::from_fd_word`] refuses a `:` there.

use std::fmt;

/// Longest VM name qrexec accepts.
pub const MAX_VM_NAME: usize = 31;
/// Longest service name (with argument) the qrexec agent will run.
pub const MAX_SERVICE: usize = 255;
/// Longest `FileDescriptorName=` systemd accepts.
pub const MAX_FD_NAME: usize = 255;
/// What stands for the `:` of `@dispvm:TEMPLATE` in an fd name (see the
/// module documentation).
pub const FD_TEMPLATE_SEPARATOR: char = '/';

/// Where a call goes: left to policy, or a named qube or keyword.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target(String);

impl Target {
    /// Parses a target as qrexec-client-vm would accept it (the real
    /// spelling, `@dispvm:TEMPLATE`; the fd name's `@dispvm/TEMPLATE` is
    /// refused, with a message naming the real one).
    pub fn parse(text: &str) -> Result<Target, BindingError> {
        if let Some((keyword, template)) = split_encoded(text).filter(|(_, t)| is_vm_name(t)) {
            return Err(BindingError::EncodedTarget {
                written: text.to_owned(),
                real: format!("{keyword}:{template}"),
            });
        }
        let normal: String = match text.strip_prefix('$') {
            Some(rest) => format!("@{rest}"),
            None => text.to_owned(),
        };
        let valid = match normal.as_str() {
            "" | "@default" | "@adminvm" | "@dispvm" => true,
            other => match other.strip_prefix("@dispvm:") {
                Some(template) => is_vm_name(template),
                None => !other.starts_with('@') && is_vm_name(other),
            },
        };
        if valid {
            Ok(Target(text.to_owned()))
        } else {
            Err(BindingError::InvalidTarget(text.to_owned()))
        }
    }

    /// Parses the TARGET word of an fd name: `@dispvm/TEMPLATE` (or
    /// `$dispvm/TEMPLATE`) is decoded to `@dispvm:TEMPLATE`; a `:` is refused
    /// (systemd never passes one, so it was not written for systemd).
    pub fn from_fd_word(word: &str) -> Result<Target, BindingError> {
        match split_encoded(word) {
            Some((keyword, template)) if is_vm_name(template) => {
                Ok(Target(format!("{keyword}:{template}")))
            }
            Some(_) => Err(BindingError::InvalidTarget(word.to_owned())),
            None if word.contains(':') => Err(BindingError::ColonInTarget(word.to_owned())),
            None => Target::parse(word),
        }
    }

    /// The TARGET word of an fd name: the target, with a disposable's
    /// template after [`FD_TEMPLATE_SEPARATOR`] instead of `:`, and `''`
    /// for the empty target.
    pub fn fd_word(&self) -> String {
        match self.template() {
            Some(template) => {
                let keyword = &self.0[..self.0.len() - template.len() - 1];
                format!("{keyword}{FD_TEMPLATE_SEPARATOR}{template}")
            }
            None => self.to_string(),
        }
    }

    /// The template of `@dispvm:TEMPLATE` (or `$dispvm:TEMPLATE`): each
    /// call to it runs in a new disposable made from that template.
    pub fn template(&self) -> Option<&str> {
        self.0
            .strip_prefix("@dispvm:")
            .or_else(|| self.0.strip_prefix("$dispvm:"))
    }

    /// The target as written (an empty string means "let policy decide").
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when policy chooses the qube (`''`, `@default`, `$default`).
    pub fn is_default(&self) -> bool {
        matches!(self.0.as_str(), "" | "@default" | "$default")
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("''")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// `(KEYWORD, TEMPLATE)` when `text` is a target in its fd-name spelling,
/// `@dispvm/TEMPLATE` or `$dispvm/TEMPLATE` (TEMPLATE not yet checked).
fn split_encoded(text: &str) -> Option<(&str, &str)> {
    let (keyword, template) = text.split_once(FD_TEMPLATE_SEPARATOR)?;
    matches!(keyword, "@dispvm" | "$dispvm").then_some((keyword, template))
}

/// Whether a refused target was meant as a disposable template (either
/// spelling), so that its message says what a template must be.
fn is_disposable_form(text: &str) -> bool {
    ["@dispvm:", "$dispvm:", "@dispvm/", "$dispvm/"]
        .iter()
        .any(|prefix| text.starts_with(prefix))
}

/// A qube name as qrexec accepts it: a letter, then letters, digits, `_`
/// or `-`, at most [`MAX_VM_NAME`] bytes. The one copy of the rule: the
/// tests' Qubes policy checker and the qrexec-client-vm double use it too.
pub fn is_vm_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_VM_NAME
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A character dom0 passes through unchanged in a service name (`+` is
/// also allowed in the argument); dom0 turns any other into `_`. Shared
/// with the tests' policy checker and the qrexec-client-vm double.
pub fn is_service_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// An RPC name with its optional argument, e.g. `qubes.ConnectTCP+22`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service(String);

impl Service {
    /// Parses a service; refuses characters dom0 would silently rewrite.
    pub fn parse(text: &str) -> Result<Service, BindingError> {
        let invalid = || BindingError::InvalidService(text.to_owned());
        if text.is_empty() || text.starts_with('+') || text.len() > MAX_SERVICE {
            return Err(invalid());
        }
        let (name, argument) = match text.split_once('+') {
            Some((name, argument)) => (name, Some(argument)),
            None => (text, None),
        };
        let name_ok = name.chars().all(is_service_char);
        let argument_ok =
            argument.is_none_or(|a| a.chars().all(|c| is_service_char(c) || c == '+'));
        if name_ok && argument_ok {
            Ok(Service(text.to_owned()))
        } else {
            Err(invalid())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The pair carried in a socket's `FileDescriptorName=`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    pub target: Target,
    pub service: Service,
}

impl Destination {
    /// Parses `TARGET SERVICE` as found in `LISTEN_FDNAMES` (TARGET in its
    /// fd-name spelling, [`Target::from_fd_word`]).
    pub fn from_fd_name(fd_name: &str) -> Result<Destination, BindingError> {
        let words = split_words(fd_name)?;
        match <[String; 2]>::try_from(words) {
            Ok([target, service]) => Ok(Destination {
                target: Target::from_fd_word(&target)?,
                service: Service::parse(&service)?,
            }),
            Err(words) => Err(BindingError::WordCount(words.len())),
        }
    }

    /// The `FileDescriptorName=` value for this destination (a disposable's
    /// template encoded, [`Target::fd_word`]); refuses an overlong name,
    /// which systemd would drop.
    pub fn to_fd_name(&self) -> Result<String, BindingError> {
        let name = format!("{} {}", self.target.fd_word(), self.service);
        if name.len() > MAX_FD_NAME {
            return Err(BindingError::FdNameTooLong(name.len()));
        }
        Ok(name)
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.target, self.service)
    }
}

/// Splits like a POSIX shell without expansions: whitespace separates words,
/// `'...'` quotes literally, `"..."` quotes with `\"` and `\\` escapes, and a
/// backslash outside quotes escapes the next character.
pub fn split_words(text: &str) -> Result<Vec<String>, BindingError> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_ascii_whitespace() => {
                if let Some(done) = word.take() {
                    words.push(done);
                }
            }
            '\'' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => current.push(c),
                        None => return Err(BindingError::UnclosedQuote),
                    }
                }
            }
            '"' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => current.push(c),
                            Some(c) => {
                                current.push('\\');
                                current.push(c);
                            }
                            None => return Err(BindingError::UnclosedQuote),
                        },
                        Some(c) => current.push(c),
                        None => return Err(BindingError::UnclosedQuote),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err(BindingError::TrailingBackslash),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// Why a target, service or fd name was refused. The texts say what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingError {
    InvalidTarget(String),
    InvalidService(String),
    WordCount(usize),
    UnclosedQuote,
    TrailingBackslash,
    ColonInTarget(String),
    /// `@dispvm/TEMPLATE` where the real spelling belongs (a config line).
    EncodedTarget {
        written: String,
        real: String,
    },
    FdNameTooLong(usize),
}

impl fmt::Display for BindingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindingError::InvalidTarget(t) if is_disposable_form(t) => write!(
                f,
                "invalid qrexec target {t:?}: @dispvm:TEMPLATE needs a disposable template's \
                 qube name (a letter, then letters, digits, '_' or '-', at most {MAX_VM_NAME})"
            ),
            BindingError::InvalidTarget(t) => write!(
                f,
                "invalid qrexec target {t:?}: use a qube name (a letter, then letters, digits, \
                 '_' or '-', at most {MAX_VM_NAME}), @default, @dispvm or @adminvm"
            ),
            BindingError::InvalidService(s) => write!(
                f,
                "invalid qrexec service {s:?}: use NAME or NAME+ARGUMENT with letters, digits, \
                 '.', '_', '-' (and '+' in the argument), at most {MAX_SERVICE} bytes"
            ),
            // One word is what systemd passes when the unit has no
            // FileDescriptorName=, or when it dropped the value as invalid:
            // the unit's own name.
            BindingError::WordCount(1) => write!(
                f,
                "expected two words, TARGET and SERVICE, found one; systemd passes the \
                 unit's own name when FileDescriptorName= is missing or when it dropped the \
                 value as invalid (systemd refuses ':', so write @dispvm:TEMPLATE as \
                 @dispvm/TEMPLATE there, characters outside printable ASCII and more than \
                 {MAX_FD_NAME} bytes, and says so only in the user manager's journal)"
            ),
            BindingError::WordCount(n) => write!(
                f,
                "expected exactly two words, TARGET and SERVICE, found {n} \
                 (write '' or @default for the default target)"
            ),
            BindingError::UnclosedQuote => f.write_str("unclosed quote"),
            BindingError::TrailingBackslash => f.write_str("trailing backslash"),
            BindingError::ColonInTarget(t) => write!(
                f,
                "target {t:?} contains ':', which systemd forbids in FileDescriptorName=: \
                 write @dispvm:TEMPLATE as @dispvm/TEMPLATE there"
            ),
            BindingError::EncodedTarget { written, real } => write!(
                f,
                "target {written:?} is how FileDescriptorName= writes {real}: write {real} here"
            ),
            BindingError::FdNameTooLong(n) => write!(
                f,
                "TARGET SERVICE is {n} bytes long; systemd accepts at most {MAX_FD_NAME}"
            ),
        }
    }
}

impl std::error::Error for BindingError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_qrexec_rules() {
        for ok in [
            "",
            "@default",
            "$default",
            "@dispvm",
            "@dispvm:fedora-dvm",
            "$dispvm:x",
            "@adminvm",
            "ssh-server",
            "a",
            "work_2",
        ] {
            assert!(Target::parse(ok).is_ok(), "{ok:?} should be valid");
        }
        for bad in [
            "1abc",
            "-x",
            "@anyvm",
            "@dispvm:",
            "a b",
            "vm.name",
            "x:y",
            &"a".repeat(32),
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn services_follow_qrexec_rules() {
        for ok in [
            "qubes.ConnectTCP+22",
            "qubes.ConnectNFS+127.0.1.1",
            "a",
            "x+",
            "a+b+c",
        ] {
            assert!(Service::parse(ok).is_ok(), "{ok:?} should be valid");
        }
        for bad in [
            "",
            "+22",
            "a b",
            "qubes/Connect",
            "svc+a:b",
            &"s".repeat(256),
        ] {
            assert!(Service::parse(bad).is_err(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn fd_names_split_like_a_shell() {
        let d = Destination::from_fd_name("'' qubes.ConnectTCP+22").unwrap();
        assert_eq!(d.target.as_str(), "");
        assert!(d.target.is_default());
        assert_eq!(d.service.as_str(), "qubes.ConnectTCP+22");
        let d = Destination::from_fd_name("  ssh-server   qubes.ConnectTCP+2222 ").unwrap();
        assert_eq!(d.target.as_str(), "ssh-server");
        assert_eq!(
            Destination::from_fd_name("one"),
            Err(BindingError::WordCount(1))
        );
        assert_eq!(
            Destination::from_fd_name("a b c"),
            Err(BindingError::WordCount(3))
        );
        assert_eq!(
            Destination::from_fd_name("'a b"),
            Err(BindingError::UnclosedQuote)
        );
    }

    #[test]
    fn a_disposable_template_is_written_with_a_slash_in_the_fd_name() {
        for (real, word) in [
            ("@dispvm:web-dvm", "@dispvm/web-dvm"),
            ("$dispvm:web-dvm", "$dispvm/web-dvm"),
        ] {
            let d = Destination {
                target: Target::parse(real).unwrap(),
                service: Service::parse("qubes.ConnectTCP+80").unwrap(),
            };
            let fd_name = d.to_fd_name().unwrap();
            assert_eq!(fd_name, format!("{word} qubes.ConnectTCP+80"));
            let back = Destination::from_fd_name(&fd_name).unwrap();
            assert_eq!(
                back.target.as_str(),
                real,
                "the daemon gets the real target"
            );
            assert_eq!(back, d);
        }
        let d = Destination::from_fd_name("\"\" svc+1").unwrap();
        assert_eq!(d.to_fd_name().unwrap(), "'' svc+1");
    }

    #[test]
    fn each_spelling_is_refused_where_the_other_belongs() {
        // systemd never passes a ':'; a config line takes the real spelling.
        assert!(matches!(
            Destination::from_fd_name("@dispvm:tpl svc"),
            Err(BindingError::ColonInTarget(_))
        ));
        let refused = Target::parse("@dispvm:9tpl").unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("needs a disposable template's qube name"),
            "{refused}"
        );
        let refused = Target::parse("@dispvm/tpl").unwrap_err();
        assert!(
            refused.to_string().contains("write @dispvm:tpl here"),
            "{refused}"
        );
        for bad in [
            "@dispvm/ svc",
            "@dispvm/9tpl svc",
            "@dispvm/@dispvm/tpl svc",
            "@dispvm/a/b svc",
            "@default/tpl svc",
            "@adminvm/tpl svc",
            "vm/tpl svc",
            "@dispvm// svc",
        ] {
            assert!(
                Destination::from_fd_name(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
