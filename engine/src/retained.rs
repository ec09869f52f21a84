//! Retained messages: one per topic, bounded in number and bytes, read by new
//! subscriptions a chunk at a time.
//!
//! Invariants: `bytes` is the sum of [`weight`] over the messages held; a message is
//! only added while the result stays within both bounds (replacing a topic's message
//! counts the difference). Messages loaded at startup are kept even past the bounds
//! (which may have been lowered since they were stored); nothing new is added then
//! until enough are cleared.
//!
//! Topics are kept in order, so a wildcard subscription reads them as a range
//! starting at the filter's literal prefix, resumes after the last topic it saw, and
//! never holds the lock for more than [`SCAN_STEP`] topics: a `SUBSCRIBE #` over a
//! million retained messages neither blocks publishers for the whole scan nor makes
//! the broker buffer every match at once.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

use roost_core::{Message, topic};

/// Most topics looked at while the lock is held once.
pub const SCAN_STEP: usize = 4096;

/// What a retained message is counted as against `max_retained_bytes`.
pub fn weight(msg: &Message) -> u64 {
    msg.weight() as u64
}

/// The bounds, 0 meaning none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bounds {
    /// `max_retained_messages`.
    pub messages: usize,
    /// `max_retained_bytes`.
    pub bytes: u64,
}

/// Which bound refused a retained message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max_retained_messages`.
    Messages,
    /// `max_retained_bytes`.
    Bytes,
    /// The session store is short of disk space (nothing changed, not even a clear).
    Store,
}

/// What a retained publish did to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The topic now holds the message.
    Stored,
    /// The topic's message was cleared (an empty payload).
    Cleared,
    /// Nothing changed (an empty payload for a topic that held nothing).
    None,
}

/// The retained messages by topic.
#[derive(Debug, Default)]
pub struct Retained {
    by_topic: BTreeMap<String, Arc<Message>>,
    bytes: u64,
    bounds: Bounds,
}

impl Retained {
    /// An empty store with `bounds`.
    pub fn new(bounds: Bounds) -> Retained {
        Retained {
            bounds,
            ..Retained::default()
        }
    }

    /// Keeps a message loaded at startup, whatever the bounds.
    pub fn load(&mut self, msg: Message) {
        self.put(Arc::new(msg));
    }

    /// Applies a retained publish: an empty payload clears the topic, any other is
    /// kept if it fits the bounds.
    pub fn apply(&mut self, msg: &Arc<Message>) -> Result<Change, Full> {
        if msg.payload.is_empty() {
            return Ok(match self.by_topic.remove(&msg.topic) {
                Some(old) => {
                    self.bytes -= weight(&old);
                    Change::Cleared
                }
                None => Change::None,
            });
        }
        let old = self.by_topic.get(&msg.topic);
        let old_weight = old.map_or(0, |m| weight(m));
        if self.bounds.messages > 0 && old.is_none() && self.by_topic.len() >= self.bounds.messages
        {
            return Err(Full::Messages);
        }
        if self.bounds.bytes > 0 && self.bytes - old_weight + weight(msg) > self.bounds.bytes {
            return Err(Full::Bytes);
        }
        self.put(msg.clone());
        Ok(Change::Stored)
    }

    fn put(&mut self, msg: Arc<Message>) {
        self.bytes += weight(&msg);
        if let Some(old) = self.by_topic.insert(msg.topic.clone(), msg) {
            self.bytes -= weight(&old);
        }
    }

    /// Every retained message (shared, not copied).
    pub fn all(&self) -> Vec<Arc<Message>> {
        self.by_topic.values().cloned().collect()
    }

    /// The message retained on `topic`, if any.
    pub fn get(&self, topic: &str) -> Option<&Arc<Message>> {
        self.by_topic.get(topic)
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    /// True when no message is retained.
    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }

    /// Their bytes, as [`weight`] counts them.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Moves `scan` on: up to `max` messages that match its filter and have not
    /// expired by `now` are appended to `found`, looking at no more than
    /// [`SCAN_STEP`] topics. Returns true when the scan is over.
    pub fn scan(
        &self,
        scan: &mut Scan,
        max: usize,
        now: Instant,
        found: &mut Vec<Arc<Message>>,
    ) -> bool {
        let filter = scan.filter.as_str();
        if !topic::has_wildcard(filter) {
            if let Some(msg) = self.by_topic.get(filter)
                && !msg.is_expired(now)
                && max > 0
            {
                found.push(msg.clone());
            }
            return true;
        }
        let prefix = literal_prefix(filter);
        let range = match &scan.after {
            None => self
                .by_topic
                .range::<str, _>((Bound::Included(prefix), Bound::Unbounded)),
            Some(after) => self
                .by_topic
                .range::<str, _>((Bound::Excluded(after.as_str()), Bound::Unbounded)),
        };
        let mut taken = 0;
        for (looked, (name, msg)) in range.enumerate() {
            if !name.starts_with(prefix) {
                return true;
            }
            if looked == SCAN_STEP || taken == max {
                return false;
            }
            scan.after = Some(name.clone());
            if topic::matches(filter, name) && !msg.is_expired(now) {
                found.push(msg.clone());
                taken += 1;
            }
        }
        true
    }
}

/// Where a new subscription's reading of the retained messages stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The filter, without any `$share/` prefix (shared subscriptions read nothing).
    pub filter: String,
    /// The last topic looked at; `None` before the first step.
    pub after: Option<String>,
}

impl Scan {
    /// A scan from the start of `filter`'s range.
    pub fn new(filter: &str) -> Scan {
        Scan {
            filter: filter.to_owned(),
            after: None,
        }
    }
}

/// The part of `filter` before its first wildcard level: every topic it matches
/// starts with this. (`a/#` also matches `a`, so its prefix ends before the `/`.)
fn literal_prefix(filter: &str) -> &str {
    let mut end = 0;
    for level in filter.split('/') {
        match level {
            "+" => return &filter[..end],
            "#" => return &filter[..end.saturating_sub(1)],
            _ => end = (end + level.len() + 1).min(filter.len()),
        }
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(topic: &str, payload: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: roost_core::QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            publisher: None,
            received_at: Instant::now(),
        })
    }

    fn scan_all(r: &Retained, filter: &str, max: usize) -> (Vec<String>, usize) {
        let mut scan = Scan::new(filter);
        let mut found = Vec::new();
        let mut steps = 1;
        while !r.scan(&mut scan, max, Instant::now(), &mut found) {
            steps += 1;
        }
        (found.iter().map(|m| m.topic.clone()).collect(), steps)
    }

    #[test]
    fn prefixes_stop_at_the_first_wildcard() {
        assert_eq!(literal_prefix("a/b/#"), "a/b");
        assert_eq!(literal_prefix("a/+/c"), "a/");
        assert_eq!(literal_prefix("#"), "");
        assert_eq!(literal_prefix("+/x"), "");
        assert_eq!(literal_prefix("a/b"), "a/b");
    }

    #[test]
    fn wildcard_scans_find_every_match_in_steps() {
        let mut r = Retained::new(Bounds::default());
        for i in 0..10_000 {
            r.apply(&msg(&format!("s/{i:05}/t"), "x")).expect("fits");
        }
        r.apply(&msg("s", "parent")).expect("fits");
        r.apply(&msg("$SYS/x", "sys")).expect("fits");
        r.apply(&msg("other/1/t", "x")).expect("fits");
        let (all, steps) = scan_all(&r, "s/#", 100);
        assert_eq!(all.len(), 10_001, "s/# matches s itself and every s/...");
        assert_eq!(steps, 101, "at most 100 matches a step");
        let (plus, _) = scan_all(&r, "+/+/t", usize::MAX);
        assert_eq!(plus.len(), 10_001, "+/+/t: the s/... topics and other/1/t");
        let (hash, steps) = scan_all(&r, "#", usize::MAX);
        assert_eq!(hash.len(), 10_002, "# skips $SYS");
        assert!(
            steps >= 10_003 / SCAN_STEP,
            "no step looks at more than SCAN_STEP"
        );
        let (exact, _) = scan_all(&r, "s/00042/t", 10);
        assert_eq!(exact, vec!["s/00042/t".to_owned()]);
    }

    #[test]
    fn a_scan_resumes_after_writes() {
        let mut r = Retained::new(Bounds::default());
        for t in ["a/1", "a/2", "a/3"] {
            r.apply(&msg(t, "x")).expect("fits");
        }
        let mut scan = Scan::new("a/#");
        let mut found = Vec::new();
        assert!(!r.scan(&mut scan, 1, Instant::now(), &mut found));
        r.apply(&msg("a/1", "")).expect("clear");
        r.apply(&msg("a/4", "x")).expect("fits");
        while !r.scan(&mut scan, 1, Instant::now(), &mut found) {}
        let topics: Vec<&str> = found.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(topics, ["a/1", "a/2", "a/3", "a/4"]);
    }

    #[test]
    fn bounds_refuse_new_topics_but_not_replacements_or_clears() {
        // Room for two small messages and 100 bytes more.
        let small = weight(&msg("a", "1"));
        let mut r = Retained::new(Bounds {
            messages: 2,
            bytes: 2 * small + 100,
        });
        r.apply(&msg("a", "1")).expect("fits");
        r.apply(&msg("b", "2")).expect("fits");
        assert_eq!(r.apply(&msg("c", "3")), Err(Full::Messages));
        assert_eq!(r.apply(&msg("a", "replaced")), Ok(Change::Stored));
        assert_eq!(r.apply(&msg("b", &"x".repeat(200))), Err(Full::Bytes));
        assert_eq!(r.apply(&msg("b", "")), Ok(Change::Cleared));
        assert_eq!(r.apply(&msg("b", "")), Ok(Change::None));
        assert_eq!(r.apply(&msg("c", "3")), Ok(Change::Stored));
        assert_eq!(r.len(), 2);
        assert_eq!(
            r.bytes(),
            weight(&msg("a", "replaced")) + weight(&msg("c", "3"))
        );
    }
}
