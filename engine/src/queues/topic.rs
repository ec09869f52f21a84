//! How `$queue/` topics and filters read: the one place that tells a queue
//! subscription or produce from any other (the protocol asks it when a SUBSCRIBE,
//! UNSUBSCRIBE or PUBLISH arrives). It depends on nothing of the engine.

use roost_queue::GroupKey;

/// A queue subscription, parsed from its raw filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFilter {
    /// Queue name (`<name>$dlq` for a dead-letter queue).
    pub queue: String,
    /// Group and filter.
    pub group: GroupKey,
    /// The topic deliveries carry: matches the subscription filter.
    pub topic_base: String,
}

/// Parses `$share/<g>/$queue/<name>[/<filter>]` or `$queue/<name>[/<filter>]`.
pub fn parse_filter(raw: &str, consumer_group: Option<&str>) -> Option<QueueFilter> {
    let (share, rest) = match raw.strip_prefix("$share/") {
        Some(r) => {
            let (g, rest) = r.split_once('/')?;
            (Some(g), rest)
        }
        None => (None, raw),
    };
    let rest = rest.strip_prefix("$queue/")?;
    let (name, filter) = match rest.split_once('/') {
        Some((n, f)) => (n, Some(f).filter(|f| !f.is_empty())),
        None => (rest, None),
    };
    let group = share.or(consumer_group).unwrap_or("default");
    if filter == Some("$dlq") {
        return Some(QueueFilter {
            queue: format!("{name}{}", roost_queue::DEAD_LETTER_SUFFIX),
            group: GroupKey::new(group, None),
            topic_base: format!("$queue/{name}/$dlq"),
        });
    }
    Some(QueueFilter {
        queue: name.to_owned(),
        group: GroupKey::new(group, filter),
        topic_base: format!("$queue/{name}"),
    })
}

/// True for a filter that names a queue (it never goes to the router).
pub fn is_queue_filter(raw: &str) -> bool {
    parse_filter(raw, None).is_some()
}

/// What a PUBLISH to `$queue/...` asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueTopic<'a> {
    /// Store a message: queue name and the rest of the topic (may be empty).
    Produce(&'a str, &'a str),
    /// Settle the message named by the `message-id` property.
    Settle(&'a str, Settle),
}

/// How a consumer settles a message by publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// `$ack`
    Ack,
    /// `$nack`: redeliver later.
    Nack,
    /// `$reject`: straight to the dead-letter queue.
    Reject,
}

/// Parses a `$queue/` topic name.
pub fn parse_topic(topic: &str) -> Option<QueueTopic<'_>> {
    let rest = topic.strip_prefix("$queue/")?;
    let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
    Some(match sub {
        "$ack" => QueueTopic::Settle(name, Settle::Ack),
        "$nack" => QueueTopic::Settle(name, Settle::Nack),
        "$reject" => QueueTopic::Settle(name, Settle::Reject),
        _ => QueueTopic::Produce(name, sub),
    })
}
