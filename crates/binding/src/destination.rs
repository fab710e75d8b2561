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

use std::fmt;

/// Longest VM name qrexec accepts.
pub const MAX_VM_NAME: usize = 31;
/// Longest service name (with argument) the qrexec agent will run.
pub const MAX_SERVICE: usize = 255;
/// Longest `FileDescriptorName=` systemd accepts.
pub const MAX_FD_NAME: usize = 255;

/// Where a call goes: left to policy, or a named qube or keyword.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target(String);

impl Target {
    /// Parses a target as qrexec-client-vm would accept it.
    pub fn parse(text: &str) -> Result<Target, BindingError> {
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
    /// Parses `TARGET SERVICE` as found in `LISTEN_FDNAMES`.
    pub fn from_fd_name(fd_name: &str) -> Result<Destination, BindingError> {
        let words = split_words(fd_name)?;
        match <[String; 2]>::try_from(words) {
            Ok([target, service]) => Ok(Destination {
                target: Target::parse(&target)?,
                service: Service::parse(&service)?,
            }),
            Err(words) => Err(BindingError::WordCount(words.len())),
        }
    }

    /// The `FileDescriptorName=` value for this destination; refuses what
    /// systemd would reject (a `:` from `@dispvm:VM`, or an overlong name).
    pub fn to_fd_name(&self) -> Result<String, BindingError> {
        if self.target.as_str().contains(':') {
            return Err(BindingError::ColonInTarget(self.target.0.clone()));
        }
        let name = format!("{} {}", self.target, self.service);
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
    FdNameTooLong(usize),
}

impl fmt::Display for BindingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
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
                 value as invalid (systemd refuses ':', so no @dispvm:TEMPLATE, characters \
                 outside printable ASCII and more than {MAX_FD_NAME} bytes, and says so only \
                 in the user manager's journal)"
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
                 use @dispvm and choose the template in the policy with target=@dispvm:TEMPLATE"
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
    fn fd_name_round_trips_and_refuses_colon() {
        let d = Destination::from_fd_name("\"\" svc+1").unwrap();
        assert_eq!(d.to_fd_name().unwrap(), "'' svc+1");
        let d = Destination {
            target: Target::parse("@dispvm:tpl").unwrap(),
            service: Service::parse("svc").unwrap(),
        };
        assert!(matches!(
            d.to_fd_name(),
            Err(BindingError::ColonInTarget(_))
        ));
    }
}
