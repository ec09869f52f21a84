//! Topic names and topic filters: what is valid, and what matches what.
//!
//! Rules (MQTT 3.1.1 §4.7, 5.0 §4.7):
//! - names and filters are at least one character and never contain NUL (the codec
//!   already rejects NUL in every UTF-8 string);
//! - a topic name contains no wildcard;
//! - in a filter, `#` stands alone as the last level and `+` stands alone in its level;
//! - a filter beginning with a wildcard does not match a topic name beginning with `$`;
//! - `$share/<group>/<filter>` is a shared subscription: the group is non-empty and has
//!   no wildcard or `/`, and the filter after it is itself a valid filter.

use thiserror::Error;

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TopicError {
    /// Zero-length name or filter.
    #[error("empty topic")]
    Empty,
    /// A topic name containing `+` or `#`.
    #[error("wildcard in topic name")]
    WildcardInName,
    /// `#` not alone as last level, or `+` not alone in its level.
    #[error("misplaced wildcard in topic filter")]
    BadWildcard,
    /// `$share/` with an empty or invalid group name, or no filter after it.
    #[error("invalid shared subscription")]
    BadShare,
    /// More levels than the configured maximum.
    #[error("too many topic levels")]
    TooManyLevels,
}

/// Checks a topic name (PUBLISH, will topic).
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a plain (non-shared) topic filter.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::BadWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::BadWildcard);
        }
    }
    Ok(())
}

/// Number of levels in a name or filter (`a/b` has 2, `/` has 2).
pub fn level_count(topic: &str) -> usize {
    topic.bytes().filter(|&b| b == b'/').count() + 1
}

/// A subscription filter split into its share group (if any) and the filter proper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterRef<'a> {
    /// The `<group>` of `$share/<group>/<filter>`, or `None` for a plain filter.
    pub share_group: Option<&'a str>,
    /// The filter that is matched against topic names.
    pub filter: &'a str,
}

/// Splits and validates a SUBSCRIBE/UNSUBSCRIBE filter, handling `$share/`.
pub fn parse_filter(raw: &str) -> Result<FilterRef<'_>, TopicError> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#']) {
            return Err(TopicError::BadShare);
        }
        validate_filter(filter).map_err(|e| match e {
            TopicError::Empty => TopicError::BadShare,
            other => other,
        })?;
        return Ok(FilterRef {
            share_group: Some(group),
            filter,
        });
    }
    if raw == "$share" {
        return Err(TopicError::BadShare);
    }
    validate_filter(raw)?;
    Ok(FilterRef {
        share_group: None,
        filter: raw,
    })
}

/// True when `filter` (already valid, not `$share/`) matches topic `name`.
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when the filter has a `+` or `#`.
pub fn has_wildcard(filter: &str) -> bool {
    filter.bytes().any(|b| b == b'+' || b == b'#')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("a/b").is_ok());
        assert!(validate_name("/").is_ok());
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a#"), Err(TopicError::WildcardInName));
    }

    #[test]
    fn filters() {
        for ok in ["#", "+", "a/#", "+/+", "/+", "a/+/c", "sport/tennis/#"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["a#", "a/#/b", "a+", "+a/b", "a/b#", ""] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shared() {
        let f = parse_filter("$share/g/a/+").expect("valid");
        assert_eq!(f.share_group, Some("g"));
        assert_eq!(f.filter, "a/+");
        assert!(parse_filter("$share//a").is_err());
        assert!(parse_filter("$share/g").is_err());
        assert!(parse_filter("$share/g/").is_err());
        assert!(parse_filter("$share/g+/a").is_err());
        assert_eq!(parse_filter("$SYS/#").expect("valid").share_group, None);
    }

    #[test]
    fn matching() {
        assert!(matches("sport/tennis/#", "sport/tennis"));
        assert!(matches("sport/tennis/#", "sport/tennis/player1/ranking"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("#", "a/b/c"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
    }
}
