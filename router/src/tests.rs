//! Unit, property and concurrency tests for the trie.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

use proptest::prelude::*;
use roost_core::QoS;
use roost_core::topic;

use super::*;

fn sub(client: &str, identifier: u32) -> Subscription {
    Subscription {
        client_id: client.into(),
        options: SubscriptionOptions::default(),
        identifier: Some(identifier),
    }
}

/// Sorted (client, identifier) pairs of the plain matches.
fn direct(router: &Router, topic: &str) -> Vec<(String, Option<u32>)> {
    let mut out = Matches::default();
    router.matches(topic, &mut out);
    let mut found: Vec<_> = out
        .direct
        .iter()
        .map(|s| (s.client_id.to_string(), s.identifier))
        .collect();
    found.sort();
    found
}

/// Router with one subscription per filter, identified by its position in `filters`.
fn router_with(filters: &[&str]) -> Router {
    let router = Router::new();
    for (i, f) in filters.iter().enumerate() {
        router.subscribe(None, f, sub("c", i as u32));
    }
    router
}

/// The filters (by text) from `filters` that match `topic` according to the router.
fn matching<'a>(filters: &[&'a str], topic: &str) -> Vec<&'a str> {
    let router = router_with(filters);
    direct(&router, topic)
        .into_iter()
        .filter_map(|(_, id)| id.and_then(|i| filters.get(i as usize).copied()))
        .collect()
}

#[test]
fn multi_level_wildcard_spec_examples() {
    let f = ["sport/tennis/player1/#"];
    for t in [
        "sport/tennis/player1",
        "sport/tennis/player1/ranking",
        "sport/tennis/player1/score/wimbledon",
    ] {
        assert_eq!(matching(&f, t), f, "{t}");
    }
    assert!(matching(&f, "sport/tennis/player2").is_empty());
    assert!(matching(&f, "sport/tennis").is_empty());
    assert_eq!(matching(&["sport/#"], "sport"), ["sport/#"]);
    assert_eq!(matching(&["#"], "a/b/c"), ["#"]);
    assert_eq!(matching(&["#"], "/"), ["#"]);
}

#[test]
fn single_level_wildcard_spec_examples() {
    let f = ["sport/tennis/+"];
    assert_eq!(matching(&f, "sport/tennis/player1"), f);
    assert_eq!(matching(&f, "sport/tennis/player2"), f);
    assert!(matching(&f, "sport/tennis/player1/ranking").is_empty());
    assert!(matching(&["sport/+"], "sport").is_empty());
    assert_eq!(matching(&["sport/+"], "sport/"), ["sport/+"]);
    let mut both = matching(&["+/+", "/+", "+"], "/finance");
    both.sort();
    assert_eq!(both, ["+/+", "/+"]);
    assert_eq!(matching(&["+/tennis/#"], "sport/tennis"), ["+/tennis/#"]);
}

#[test]
fn empty_levels_are_levels() {
    let filters = ["a/+/b", "a//b", "a/b", "+/a", "/a", "a/#", "a/+"];
    let mut got = matching(&filters, "a//b");
    got.sort();
    assert_eq!(got, ["a/#", "a/+/b", "a//b"]);
    let mut got = matching(&filters, "/a");
    got.sort();
    assert_eq!(got, ["+/a", "/a"]);
    let mut got = matching(&filters, "a/");
    got.sort();
    assert_eq!(got, ["a/#", "a/+"]);
}

#[test]
fn dollar_topics_skip_leading_wildcards() {
    let filters = [
        "#",
        "+/monitor/Clients",
        "$SYS/#",
        "$SYS/monitor/+",
        "+",
        "$SYS",
    ];
    let mut got = matching(&filters, "$SYS/monitor/Clients");
    got.sort();
    assert_eq!(got, ["$SYS/#", "$SYS/monitor/+"]);
    let mut got = matching(&filters, "$SYS");
    got.sort();
    assert_eq!(got, ["$SYS", "$SYS/#"]);
    // `$` only matters at the start of the topic.
    assert_eq!(matching(&["a/+"], "a/$x"), ["a/+"]);
    assert_eq!(matching(&["a/#"], "a/$x"), ["a/#"]);
}

#[test]
fn resubscribing_replaces_and_overlaps_are_kept_apart() {
    let router = Router::new();
    assert!(!router.subscribe(None, "a/b", sub("c1", 1)));
    let mut again = sub("c1", 2);
    again.options.qos = QoS::ExactlyOnce;
    assert!(router.subscribe(None, "a/b", again.clone()));
    assert_eq!(router.len(), 1);
    let mut out = Matches::default();
    router.matches("a/b", &mut out);
    assert_eq!(out.direct, [again]);

    // Same client, overlapping filter: a second entry for the broker to merge.
    assert!(!router.subscribe(None, "a/+", sub("c1", 3)));
    // Same client and filter in a share group: a separate subscription.
    assert!(!router.subscribe(Some("g"), "a/b", sub("c1", 4)));
    assert!(router.subscribe(Some("g"), "a/b", sub("c1", 5)));
    assert_eq!(router.len(), 3);
    assert_eq!(
        direct(&router, "a/b"),
        [("c1".into(), Some(2)), ("c1".into(), Some(3))]
    );
    out.clear();
    assert!(out.is_empty());
    router.matches("a/b", &mut out);
    assert_eq!(out.shared.len(), 1);
    assert_eq!(out.shared[0].members, [sub("c1", 5)]);
}

#[test]
fn matches_appends_without_clearing() {
    let router = router_with(&["a"]);
    let mut out = Matches::default();
    router.matches("a", &mut out);
    router.matches("a", &mut out);
    assert_eq!(out.direct.len(), 2);
    out.clear();
    router.matches("b", &mut out);
    assert!(out.is_empty());
}

#[test]
fn unsubscribe_prunes_every_empty_node() {
    let filters = [
        "a/b/c",
        "a/b",
        "a/+/c",
        "a/#",
        "#",
        "+",
        "/",
        "//x",
        "$SYS/#",
        "a/b/c/d/e/f",
    ];
    let router = router_with(&filters);
    router.subscribe(Some("g"), "a/b/c", sub("c", 99));
    assert_eq!(router.len(), filters.len() + 1);
    assert!(router.node_count() > 1);

    assert!(!router.unsubscribe(None, "a/b/c", "someone-else"));
    assert!(!router.unsubscribe(None, "x/y/z", "c"));
    assert!(!router.unsubscribe(Some("h"), "a/b/c", "c"));
    let before = router.node_count();
    assert!(!router.unsubscribe(None, "never/seen/+", "c"));
    assert_eq!(router.node_count(), before, "a miss creates no node");

    for f in filters.iter().rev() {
        assert!(router.unsubscribe(None, f, "c"), "{f}");
        assert!(!router.unsubscribe(None, f, "c"), "{f} twice");
    }
    assert_eq!(router.len(), 1);
    assert!(router.unsubscribe(Some("g"), "a/b/c", "c"));
    assert_eq!(router.len(), 0);
    assert!(router.is_empty());
    assert_eq!(router.node_count(), 1);
    let mut out = Matches::default();
    router.matches("a/b/c", &mut out);
    assert!(out.is_empty());
}

#[test]
fn unsubscribe_keeps_nodes_still_in_use() {
    let router = router_with(&["a/b/c", "a/b"]);
    assert_eq!(router.node_count(), 4);
    assert!(router.unsubscribe(None, "a/b/c", "c"));
    assert_eq!(router.node_count(), 3);
    assert_eq!(direct(&router, "a/b"), [("c".into(), Some(1))]);
    let router = router_with(&["a/b/#", "a/b/c"]);
    assert!(router.unsubscribe(None, "a/b/c", "c"));
    assert_eq!(router.node_count(), 3);
    assert!(router.unsubscribe(None, "a/b/#", "c"));
    assert_eq!(router.node_count(), 1);
}

#[test]
fn share_group_rotates_across_matches() {
    let router = Router::new();
    for m in ["m0", "m1", "m2"] {
        router.subscribe(Some("workers"), "jobs/+", sub(m, 0));
    }
    router.subscribe(Some("audit"), "jobs/#", sub("a0", 0));
    router.subscribe(None, "jobs/+", sub("plain", 0));
    assert_eq!(router.len(), 5);

    let mut out = Matches::default();
    let mut firsts = Vec::new();
    for _ in 0..6 {
        out.clear();
        router.matches("jobs/1", &mut out);
        assert_eq!(out.direct, [sub("plain", 0)]);
        assert_eq!(out.shared.len(), 2);
        let Some(workers) = out.shared.iter().find(|s| &*s.group == "workers") else {
            panic!("workers group missing");
        };
        assert_eq!(&*workers.filter, "jobs/+");
        let order: Vec<usize> = workers.rotation().collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2], "each member offered once");
        let first = order[0];
        firsts.push(workers.members[first].client_id.to_string());
    }
    assert_eq!(firsts, ["m0", "m1", "m2", "m0", "m1", "m2"]);

    // A member leaves: the rest still share the work.
    assert!(router.unsubscribe(Some("workers"), "jobs/+", "m1"));
    out.clear();
    router.matches("jobs/1", &mut out);
    let Some(workers) = out.shared.iter().find(|s| &*s.group == "workers") else {
        panic!("workers group missing");
    };
    let mut members: Vec<_> = workers
        .members
        .iter()
        .map(|s| s.client_id.to_string())
        .collect();
    members.sort();
    assert_eq!(members, ["m0", "m2"]);

    // The last members leave: the group is gone.
    assert!(router.unsubscribe(Some("workers"), "jobs/+", "m0"));
    assert!(router.unsubscribe(Some("workers"), "jobs/+", "m2"));
    out.clear();
    router.matches("jobs/1", &mut out);
    assert_eq!(out.shared.len(), 1);
    assert_eq!(&*out.shared[0].group, "audit");
    assert_eq!(router.len(), 2);
}

#[test]
fn rotation_of_empty_group_yields_nothing() {
    let m = SharedMatch {
        group: "g".into(),
        filter: "f".into(),
        members: Vec::new(),
        cursor: Arc::new(AtomicUsize::new(0)),
    };
    assert_eq!(m.rotation().count(), 0);
}

#[test]
fn deep_topics_do_not_overflow_the_stack() {
    let deep = "/".repeat(100_000);
    let router = Router::new();
    router.subscribe(None, &deep, sub("c", 1));
    router.subscribe(None, "+/#", sub("c", 2));
    assert_eq!(
        direct(&router, &deep),
        [("c".into(), Some(1)), ("c".into(), Some(2))]
    );
    assert!(router.unsubscribe(None, &deep, "c"));
    assert!(router.unsubscribe(None, "+/#", "c"));
    assert_eq!(router.node_count(), 1);

    // Dropped while deep, on a thread with a small stack.
    let router = Router::new();
    router.subscribe(None, &deep, sub("c", 1));
    let dropper = thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || drop(router));
    assert!(dropper.is_ok_and(|h| h.join().is_ok()));
}

#[test]
fn router_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Router>();
    check::<Matches>();
}

/// Readers match a fixed topic while writers churn subscriptions on the same paths,
/// creating and pruning nodes. Readers must always see the stable subscriptions exactly
/// once and never see a filter that does not match; each writer must always see its own
/// fresh subscription (a subscribe lost to a concurrent prune would fail that).
#[test]
fn concurrent_matches_while_subscribing() {
    const TOPIC: &str = "a/b/c";
    // (filter, matches TOPIC)
    const CHURN: [(&str, bool); 6] = [
        ("a/b/c", true),
        ("a/b/#", true),
        ("a/b", false),
        ("a/b/c/d", false),
        ("a/+/c/#", true),
        ("x/y", false),
    ];
    let router = Router::new();
    router.subscribe(None, "a/+/c", sub("stable", 1));
    router.subscribe(None, "#", sub("stable", 2));
    router.subscribe(Some("g"), "a/b/+", sub("member", 3));
    let stable_nodes = router.node_count();
    let done = AtomicBool::new(false);

    thread::scope(|s| {
        let mut writers = Vec::new();
        for w in 0..2 {
            let router = &router;
            writers.push(s.spawn(move || {
                let client = format!("churn{w}");
                let mut out = Matches::default();
                for round in 0..2_000 {
                    for (i, (filter, hits)) in CHURN.iter().enumerate() {
                        let id = 100 + i as u32;
                        assert!(!router.subscribe(None, filter, sub(&client, id)));
                        if *hits && round % 4 == 0 {
                            out.clear();
                            router.matches(TOPIC, &mut out);
                            assert!(
                                out.direct.contains(&sub(&client, id)),
                                "own subscription to {filter} lost"
                            );
                        }
                    }
                    for (filter, _) in CHURN {
                        assert!(router.unsubscribe(None, filter, &client));
                    }
                }
            }));
        }
        for _ in 0..2 {
            s.spawn(|| {
                let mut out = Matches::default();
                let mut rounds = 0u64;
                while !done.load(Ordering::Relaxed) || rounds == 0 {
                    rounds += 1;
                    out.clear();
                    router.matches(TOPIC, &mut out);
                    let stable: Vec<_> = out
                        .direct
                        .iter()
                        .filter(|s| &*s.client_id == "stable")
                        .map(|s| s.identifier)
                        .collect();
                    assert!(stable == [Some(1), Some(2)] || stable == [Some(2), Some(1)]);
                    for s in out.direct.iter().filter(|s| &*s.client_id != "stable") {
                        let i = s.identifier.unwrap_or(0).wrapping_sub(100) as usize;
                        assert!(CHURN.get(i).is_some_and(|c| c.1), "wrong match {s:?}");
                    }
                    assert_eq!(out.shared.len(), 1);
                    assert_eq!(out.shared[0].members, [sub("member", 3)]);
                }
            });
        }
        for w in writers {
            if w.join().is_err() {
                done.store(true, Ordering::Relaxed);
                panic!("writer failed");
            }
        }
        done.store(true, Ordering::Relaxed);
    });
    assert_eq!(router.len(), 3);
    assert_eq!(router.node_count(), stable_nodes);
}

// ---- property test against the reference matcher ----

#[derive(Debug, Clone)]
enum Op {
    Subscribe {
        client: u8,
        group: Option<u8>,
        filter: String,
    },
    /// Unsubscribe an arbitrary filter, mostly one that is not there.
    Unsubscribe {
        client: u8,
        group: Option<u8>,
        filter: String,
    },
    /// Unsubscribe the n-th stored subscription (modulo how many there are).
    UnsubscribeStored(usize),
}

fn name_level() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("a"), Just("b"), Just("$x"), Just("")]
}

fn filter_level() -> impl Strategy<Value = &'static str> {
    prop_oneof![3 => name_level(), 1 => Just("+")]
}

fn nonempty(joined: String) -> String {
    // A lone empty level is the empty string, which is not a valid name or filter.
    if joined.is_empty() {
        "/".into()
    } else {
        joined
    }
}

fn filter_strategy() -> impl Strategy<Value = String> {
    (prop::collection::vec(filter_level(), 0..4), any::<bool>()).prop_map(|(levels, hash)| {
        if levels.is_empty() {
            return "#".into();
        }
        let joined = nonempty(levels.join("/"));
        if hash { format!("{joined}/#") } else { joined }
    })
}

fn topic_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec(name_level(), 1..5).prop_map(|levels| nonempty(levels.join("/")))
}

fn group_strategy() -> impl Strategy<Value = Option<u8>> {
    prop_oneof![2 => Just(None), 1 => (0u8..2).prop_map(Some)]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, group_strategy(), filter_strategy())
            .prop_map(|(client, group, filter)| Op::Subscribe { client, group, filter }),
        1 => (0u8..3, group_strategy(), filter_strategy())
            .prop_map(|(client, group, filter)| Op::Unsubscribe { client, group, filter }),
        2 => any::<usize>().prop_map(Op::UnsubscribeStored),
    ]
}

type Key = (Option<String>, String, String);

/// A match result in a canonical order: sorted plain subscriptions, and sorted
/// (group, filter, sorted members) triples.
type Normalized = (Vec<Subscription>, Vec<(String, String, Vec<Subscription>)>);

/// What the router should return, computed the slow way from `topic::matches`.
fn naive(model: &BTreeMap<Key, Subscription>, topic: &str) -> Normalized {
    let mut direct = Vec::new();
    let mut shared: BTreeMap<(String, String), Vec<Subscription>> = BTreeMap::new();
    for ((group, filter, _), s) in model {
        if !topic::matches(filter, topic) {
            continue;
        }
        match group {
            None => direct.push(s.clone()),
            Some(g) => shared
                .entry((g.clone(), filter.clone()))
                .or_default()
                .push(s.clone()),
        }
    }
    direct.sort_by(|a, b| (&a.client_id, a.identifier).cmp(&(&b.client_id, b.identifier)));
    let shared = shared
        .into_iter()
        .map(|((g, f), mut m)| {
            m.sort_by(|a, b| a.client_id.cmp(&b.client_id));
            (g, f, m)
        })
        .collect();
    (direct, shared)
}

fn actual(router: &Router, topic: &str) -> Normalized {
    let mut out = Matches::default();
    router.matches(topic, &mut out);
    let mut direct = out.direct;
    direct.sort_by(|a, b| (&a.client_id, a.identifier).cmp(&(&b.client_id, b.identifier)));
    let mut shared: Vec<_> = out
        .shared
        .into_iter()
        .map(|m| {
            let mut members = m.members;
            members.sort_by(|a, b| a.client_id.cmp(&b.client_id));
            (m.group.to_string(), m.filter.to_string(), members)
        })
        .collect();
    shared.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    (direct, shared)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn agrees_with_reference_matcher(
        ops in prop::collection::vec(op_strategy(), 1..60),
        topics in prop::collection::vec(topic_strategy(), 1..8),
    ) {
        let router = Router::new();
        let mut model: BTreeMap<Key, Subscription> = BTreeMap::new();
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Subscribe { client, group, filter } => {
                    prop_assert!(topic::validate_filter(&filter).is_ok(), "{}", filter);
                    let group = group.map(|g| format!("g{g}"));
                    let client = format!("c{client}");
                    let mut s = sub(&client, n as u32);
                    s.options.qos = if n % 2 == 0 { QoS::AtLeastOnce } else { QoS::AtMostOnce };
                    let replaced = router.subscribe(group.as_deref(), &filter, s.clone());
                    let existed = model.insert((group, filter, client), s).is_some();
                    prop_assert_eq!(replaced, existed);
                }
                Op::Unsubscribe { client, group, filter } => {
                    let group = group.map(|g| format!("g{g}"));
                    let client = format!("c{client}");
                    let removed = router.unsubscribe(group.as_deref(), &filter, &client);
                    prop_assert_eq!(removed, model.remove(&(group, filter, client)).is_some());
                }
                Op::UnsubscribeStored(i) => {
                    if model.is_empty() {
                        continue;
                    }
                    let Some(key) = model.keys().nth(i % model.len()).cloned() else {
                        continue;
                    };
                    prop_assert!(router.unsubscribe(key.0.as_deref(), &key.1, &key.2));
                    model.remove(&key);
                }
            }
            prop_assert_eq!(router.len(), model.len());
        }
        for topic in &topics {
            prop_assert_eq!(actual(&router, topic), naive(&model, topic), "topic {}", topic);
        }
        for (group, filter, client) in model.keys() {
            prop_assert!(router.unsubscribe(group.as_deref(), filter, client));
        }
        prop_assert_eq!(router.len(), 0);
        prop_assert_eq!(router.node_count(), 1);
    }
}
