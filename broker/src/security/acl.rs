//! Access control lists: who may publish to, receive from and subscribe to which topics.
//!
//! An ACL file is a list of sections, each naming whom its rules apply to (a username, a
//! client id, or everyone), and rules `allow|deny PERMISSIONS FILTER`, where the filter may
//! use `%u` (username) and `%c` (client id). See the README for the format.
//!
//! Invariants:
//! - when the file has at least one rule, whatever no rule allows is denied; a matching
//!   `deny` rule wins over any `allow` rule;
//! - filters match the way subscriptions do: a wildcard at the first level never matches a
//!   topic beginning with `$`, so `$SYS/...` and `$queue/...` need rules of their own;
//! - a `%u` or `%c` is replaced literally; a rule using `%u` never applies to a client
//!   without a username, and a value containing `/`, `+` or `#` never applies at all, so
//!   a crafted client id cannot widen a rule.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use roost_core::topic;

pub use roost_engine::access::{Access, Authorizer};

/// The bit of an [`Access`] in a rule's permission set.
fn bit(access: Access) -> u8 {
    match access {
        Access::Read => 1,
        Access::Write => 2,
        Access::Subscribe => 4,
    }
}

/// Why an ACL file was refused; names the line.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file could not be read.
    #[error("cannot read ACL file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line that is not a section header, a rule or a comment.
    #[error("ACL line {line}: {why}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// Who a section's rules apply to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Section {
    Everyone,
    User(String),
    Client(String),
}

/// One `allow|deny PERMISSIONS FILTER` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    allow: bool,
    /// Bits of [`Access::bit`].
    perms: u8,
    filter: String,
    /// The filter contains `%u` or `%c`.
    templated: bool,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    everyone: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    clients: HashMap<String, Vec<Rule>>,
    rules: usize,
}

/// The client a decision is made for.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// Username from CONNECT, if any.
    pub username: Option<&'a str>,
    /// Client id in use (possibly assigned by the broker).
    pub client_id: &'a str,
}

impl Acl {
    /// Reads and parses an ACL file.
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Acl::parse(&text)
    }

    /// Parses ACL text.
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut section: Option<Section> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let syntax = |why: String| AclError::Syntax { line, why };
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let (word, rest) = split_word(content);
            match word {
                "everyone" => {
                    if !rest.is_empty() {
                        return Err(syntax("`everyone` takes nothing after it".into()));
                    }
                    section = Some(Section::Everyone);
                }
                "user" | "client" => {
                    let name = rest.trim();
                    if name.is_empty() {
                        return Err(syntax(format!("`{word}` needs a name")));
                    }
                    section = Some(if word == "user" {
                        Section::User(name.to_owned())
                    } else {
                        Section::Client(name.to_owned())
                    });
                }
                "allow" | "deny" => {
                    let Some(section) = &section else {
                        return Err(syntax(
                            "rule before any `user`, `client` or `everyone` line".into(),
                        ));
                    };
                    let (perms_text, filter) = split_word(rest);
                    let perms = parse_perms(perms_text).map_err(syntax)?;
                    let filter = filter.trim();
                    if filter.is_empty() {
                        return Err(syntax("rule needs a topic filter".into()));
                    }
                    if filter.contains(char::is_whitespace) {
                        return Err(syntax(format!(
                            "topic filter {filter:?} contains white space"
                        )));
                    }
                    if topic::validate_filter(filter).is_err() {
                        return Err(syntax(format!("{filter:?} is not a valid topic filter")));
                    }
                    let rule = Rule {
                        allow: word == "allow",
                        perms,
                        filter: filter.to_owned(),
                        templated: filter.contains("%u") || filter.contains("%c"),
                    };
                    acl.rules += 1;
                    match section {
                        Section::Everyone => acl.everyone.push(rule),
                        Section::User(u) => acl.users.entry(u.clone()).or_default().push(rule),
                        Section::Client(c) => acl.clients.entry(c.clone()).or_default().push(rule),
                    }
                }
                other => {
                    return Err(syntax(format!(
                        "unknown keyword {other:?} (expected user, client, everyone, allow or deny)"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// Number of rules in the file. With none, everything is allowed.
    pub fn rule_count(&self) -> usize {
        self.rules
    }

    /// Decides `access` on `topic` for `who`.
    pub fn allows(&self, who: Identity<'_>, access: Access, topic: &str) -> bool {
        if self.rules == 0 {
            return true;
        }
        let user_rules = who
            .username
            .and_then(|u| self.users.get(u))
            .map_or(&[][..], Vec::as_slice);
        let client_rules = self
            .clients
            .get(who.client_id)
            .map_or(&[][..], Vec::as_slice);
        let mut allowed = false;
        for rule in self.everyone.iter().chain(user_rules).chain(client_rules) {
            if rule.perms & bit(access) == 0 || (allowed && rule.allow) {
                continue;
            }
            if rule_applies(rule, who, access, topic) {
                if !rule.allow {
                    return false;
                }
                allowed = true;
            }
        }
        allowed
    }
}

fn rule_applies(rule: &Rule, who: Identity<'_>, access: Access, topic: &str) -> bool {
    let expanded;
    let filter = if rule.templated {
        match expand(&rule.filter, who) {
            Some(f) => {
                expanded = f;
                expanded.as_str()
            }
            None => return false,
        }
    } else {
        rule.filter.as_str()
    };
    match access {
        Access::Read | Access::Write => topic::matches(filter, topic),
        // A grant must cover all the subscription can receive; a denial applies as soon
        // as the subscription could receive anything it names.
        Access::Subscribe if rule.allow => covers(filter, topic),
        Access::Subscribe => overlaps(filter, topic),
    }
}

/// Replaces `%u` and `%c`; `None` when a value is missing or could act as a wildcard or
/// level separator.
pub fn expand(filter: &str, who: Identity<'_>) -> Option<String> {
    let safe = |v: &str| !v.is_empty() && !v.contains(['/', '+', '#']);
    let mut out = String::with_capacity(filter.len() + 16);
    let mut rest = filter;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        match after.chars().next() {
            Some('u') => {
                let u = who.username.filter(|u| safe(u))?;
                out.push_str(u);
                rest = &after[1..];
            }
            Some('c') => {
                if !safe(who.client_id) {
                    return None;
                }
                out.push_str(who.client_id);
                rest = &after[1..];
            }
            _ => {
                out.push('%');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Some(out)
}

fn first_level_is_dollar(f: &str) -> bool {
    f.starts_with('$')
}

fn first_level_is_wildcard(f: &str) -> bool {
    f.starts_with('+') || f.starts_with('#')
}

/// True when every topic that `inner` matches is also matched by `outer` (both valid
/// filters, without `$share/`).
pub fn covers(outer: &str, inner: &str) -> bool {
    if first_level_is_wildcard(outer) && first_level_is_dollar(inner) {
        return false;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b && b != "#" && b != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when some topic is matched by both filters.
pub fn overlaps(a: &str, b: &str) -> bool {
    if (first_level_is_wildcard(a) && first_level_is_dollar(b))
        || (first_level_is_wildcard(b) && first_level_is_dollar(a))
    {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(at) => (&s[..at], s[at..].trim_start()),
        None => (s, ""),
    }
}

fn parse_perms(text: &str) -> Result<u8, String> {
    if text.is_empty() {
        return Err("rule needs permissions (read, write, subscribe or all)".into());
    }
    let mut bits = 0;
    for p in text.split(',') {
        bits |= match p.trim() {
            "read" => bit(Access::Read),
            "write" => bit(Access::Write),
            "subscribe" => bit(Access::Subscribe),
            "all" => bit(Access::Read) | bit(Access::Write) | bit(Access::Subscribe),
            other => {
                return Err(format!(
                    "unknown permission {other:?} (expected read, write, subscribe or all)"
                ));
            }
        };
    }
    Ok(bits)
}

/// The ACL in force, replaceable at run time (SIGHUP) while connections use it.
#[derive(Debug)]
pub struct AclHandle {
    current: ArcSwap<Acl>,
}

impl AclHandle {
    /// A handle holding `acl`.
    pub fn new(acl: Acl) -> Arc<AclHandle> {
        Arc::new(AclHandle {
            current: ArcSwap::from_pointee(acl),
        })
    }

    /// Puts `acl` in force for every connection, present and future.
    pub fn replace(&self, acl: Acl) {
        self.current.store(Arc::new(acl));
    }

    /// The [`Authorizer`] of one client.
    pub fn for_client(
        self: &Arc<Self>,
        username: Option<&str>,
        client_id: &Arc<str>,
    ) -> Arc<dyn Authorizer> {
        Arc::new(ClientAccess {
            acl: self.clone(),
            username: username.map(str::to_owned),
            client_id: client_id.clone(),
        })
    }
}

/// One client's view of the ACL in force.
#[derive(Debug)]
struct ClientAccess {
    acl: Arc<AclHandle>,
    username: Option<String>,
    client_id: Arc<str>,
}

impl Authorizer for ClientAccess {
    fn allows(&self, access: Access, topic: &str) -> bool {
        let who = Identity {
            username: self.username.as_deref(),
            client_id: &self.client_id,
        };
        self.acl.current.load().allows(who, access, topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: Identity<'static> = Identity {
        username: Some("alice"),
        client_id: "dev-1",
    };
    const ANON: Identity<'static> = Identity {
        username: None,
        client_id: "anon-7",
    };

    fn acl(text: &str) -> Acl {
        Acl::parse(text).expect("valid ACL")
    }

    #[test]
    fn parses_sections_rules_and_comments() {
        let a = acl(
            "# comment\n\neveryone\nallow read,subscribe public/#\n\nuser alice\n  allow all  home/alice/#  \ndeny write home/alice/locked\nclient dev-1\nallow write devices/%c/state\n",
        );
        assert_eq!(a.rule_count(), 4);
        assert_eq!(a.everyone.len(), 1);
        assert_eq!(a.users["alice"].len(), 2);
        assert_eq!(a.clients["dev-1"].len(), 1);
        assert!(a.clients["dev-1"][0].templated);
    }

    #[test]
    fn syntax_errors_name_the_line() {
        for (text, line, word) in [
            ("allow read a\n", 1, "before any"),
            ("everyone\nallow fly a/b\n", 2, "fly"),
            (
                "everyone\n\nallow read a/#/b\n",
                3,
                "not a valid topic filter",
            ),
            ("everyone\nallow read\n", 2, "needs a topic filter"),
            ("everyone\nallow\n", 2, "needs permissions"),
            ("user\n", 1, "needs a name"),
            ("topic read a\n", 1, "unknown keyword"),
            ("everyone\nallow read a b\n", 2, "white space"),
        ] {
            let e = Acl::parse(text).expect_err(text).to_string();
            assert!(e.contains(&format!("line {line}")), "{text:?}: {e}");
            assert!(e.contains(word), "{text:?}: {e}");
        }
    }

    #[test]
    fn no_rules_allows_everything() {
        let a = acl("# nothing yet\neveryone\n");
        assert!(a.allows(ANON, Access::Write, "any/topic"));
        assert!(a.allows(ANON, Access::Subscribe, "#"));
    }

    #[test]
    fn default_deny_once_rules_exist() {
        let a = acl("user bob\nallow all #\n");
        assert!(!a.allows(ALICE, Access::Write, "x"));
        assert!(!a.allows(ALICE, Access::Read, "x"));
        assert!(!a.allows(ALICE, Access::Subscribe, "x"));
        assert!(!a.allows(ANON, Access::Write, "x"));
        let bob = Identity {
            username: Some("bob"),
            client_id: "c",
        };
        assert!(bob_allows(&a, bob));
    }

    fn bob_allows(a: &Acl, bob: Identity<'_>) -> bool {
        a.allows(bob, Access::Write, "x") && a.allows(bob, Access::Subscribe, "a/+/c")
    }

    #[test]
    fn permissions_are_separate() {
        let a = acl("everyone\nallow read r/#\nallow write w/#\nallow subscribe s/#\n");
        assert!(a.allows(ANON, Access::Read, "r/1"));
        assert!(!a.allows(ANON, Access::Write, "r/1"));
        assert!(!a.allows(ANON, Access::Subscribe, "r/1"));
        assert!(a.allows(ANON, Access::Write, "w/1"));
        assert!(!a.allows(ANON, Access::Read, "w/1"));
        assert!(a.allows(ANON, Access::Subscribe, "s/1"));
        assert!(!a.allows(ANON, Access::Read, "s/1"));
    }

    #[test]
    fn deny_wins_over_allow() {
        let a = acl("everyone\nallow all home/#\nuser alice\ndeny write home/locked\n");
        assert!(a.allows(ALICE, Access::Write, "home/open"));
        assert!(!a.allows(ALICE, Access::Write, "home/locked"));
        assert!(a.allows(ALICE, Access::Read, "home/locked"));
        // Others are not affected by alice's section.
        assert!(a.allows(ANON, Access::Write, "home/locked"));
        // A deny on part of a filter refuses the subscription that would receive it.
        let a = acl("everyone\nallow all #\ndeny subscribe secret/#\n");
        assert!(!a.allows(ANON, Access::Subscribe, "#"));
        assert!(!a.allows(ANON, Access::Subscribe, "+/x"));
        assert!(a.allows(ANON, Access::Subscribe, "public/#"));
    }

    #[test]
    fn username_and_client_id_substitution() {
        let a = acl(
            "everyone\nallow all users/%u/#\nallow write devices/%c/state\nallow read x/%u-%c/y\n",
        );
        assert!(a.allows(ALICE, Access::Write, "users/alice/a/b"));
        assert!(a.allows(ALICE, Access::Subscribe, "users/alice/+"));
        assert!(!a.allows(ALICE, Access::Write, "users/bob/a"));
        assert!(a.allows(ALICE, Access::Write, "devices/dev-1/state"));
        assert!(!a.allows(ALICE, Access::Write, "devices/dev-2/state"));
        assert!(a.allows(ALICE, Access::Read, "x/alice-dev-1/y"));
        // No username: a %u rule does not apply.
        assert!(!a.allows(ANON, Access::Write, "users//a"));
        assert!(a.allows(ANON, Access::Write, "devices/anon-7/state"));
        // Values that would act as wildcards or separators never match.
        for id in ["+", "#", "a/b"] {
            let sneaky = Identity {
                username: Some(id),
                client_id: id,
            };
            assert!(
                !a.allows(sneaky, Access::Write, "devices/a/b/state"),
                "{id}"
            );
            assert!(!a.allows(sneaky, Access::Subscribe, "users/+/x"), "{id}");
            assert!(
                !a.allows(sneaky, Access::Write, &format!("users/{id}/x")),
                "{id}"
            );
        }
    }

    #[test]
    fn client_sections() {
        let a = acl("client dev-1\nallow write telemetry/#\n");
        assert!(a.allows(ALICE, Access::Write, "telemetry/t"));
        assert!(!a.allows(ANON, Access::Write, "telemetry/t"));
    }

    #[test]
    fn wildcards_and_dollar_topics() {
        let a = acl("everyone\nallow all #\n");
        assert!(a.allows(ANON, Access::Write, "a/b/c"));
        // `#` is no key to $SYS or $queue: they are covered only by rules naming them.
        assert!(!a.allows(ANON, Access::Write, "$queue/jobs"));
        assert!(!a.allows(ANON, Access::Read, "$SYS/broker/uptime"));
        assert!(!a.allows(ANON, Access::Subscribe, "$SYS/#"));
        let a = acl(
            "everyone\nallow write,subscribe $queue/jobs/#\nallow read,subscribe $SYS/broker/+\nallow read +/+/x\n",
        );
        assert!(a.allows(ANON, Access::Write, "$queue/jobs"));
        assert!(a.allows(ANON, Access::Write, "$queue/jobs/eu/1"));
        assert!(!a.allows(ANON, Access::Write, "$queue/other"));
        assert!(a.allows(ANON, Access::Subscribe, "$queue/jobs"));
        assert!(a.allows(ANON, Access::Subscribe, "$queue/jobs/+"));
        assert!(!a.allows(ANON, Access::Subscribe, "$queue/#"));
        assert!(a.allows(ANON, Access::Read, "$SYS/broker/uptime"));
        assert!(!a.allows(ANON, Access::Read, "$SYS/broker/load/x"));
        assert!(!a.allows(ANON, Access::Subscribe, "$SYS/#"));
        assert!(a.allows(ANON, Access::Read, "a/b/x"));
        assert!(!a.allows(ANON, Access::Read, "$x/b/x"));
    }

    #[test]
    fn filter_cover_and_overlap() {
        for (outer, inner) in [
            ("#", "#"),
            ("#", "a/+/c"),
            ("a/#", "a"),
            ("a/#", "a/#"),
            ("a/+", "a/b"),
            ("a/+", "a/+"),
            ("+/+", "a/b"),
            ("a/b", "a/b"),
            ("$SYS/#", "$SYS/a/#"),
        ] {
            assert!(covers(outer, inner), "{outer} covers {inner}");
        }
        for (outer, inner) in [
            ("a/+", "a/#"),
            ("a/b", "a/+"),
            ("+", "a/b"),
            ("a", "a/#"),
            ("#", "$SYS/x"),
            ("+/x", "$q/x"),
            ("a/b/c", "a/b"),
        ] {
            assert!(!covers(outer, inner), "{outer} does not cover {inner}");
        }
        for (a, b) in [
            ("#", "a"),
            ("a/+", "+/b"),
            ("a/#", "a"),
            ("a/b", "a/b"),
            ("+/#", "x/y/z"),
        ] {
            assert!(overlaps(a, b) && overlaps(b, a), "{a} overlaps {b}");
        }
        for (a, b) in [
            ("a/b", "a/c"),
            ("#", "$SYS/x"),
            ("a/+", "a"),
            ("a/b", "a/b/c"),
        ] {
            assert!(
                !overlaps(a, b) && !overlaps(b, a),
                "{a} does not overlap {b}"
            );
        }
    }

    #[test]
    fn handle_replaces_rules_for_live_clients() {
        let handle = AclHandle::new(acl("everyone\nallow read a\n"));
        let client = handle.for_client(Some("alice"), &Arc::from("c1"));
        assert!(client.allows(Access::Read, "a"));
        assert!(!client.allows(Access::Read, "b"));
        handle.replace(acl("user alice\nallow read b\n"));
        assert!(!client.allows(Access::Read, "a"));
        assert!(client.allows(Access::Read, "b"));
    }
}
