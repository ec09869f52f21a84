//! The MQTT face of `$queue/` work queues (the queues themselves are `roost_queue`).
//!
//! - Produce: PUBLISH to `$queue/<name>` or `$queue/<name>/<rest>`; the acknowledgement
//!   waits until the queue has stored the message (v5 producers get 0x97 when the queue
//!   is full, 3.x producers wait for room). `partition-key` picks the partition.
//! - Consume: SUBSCRIBE to `$share/<group>/$queue/<name>[/<filter>]`, or to
//!   `$queue/<name>[/<filter>]` with the v5 user property `consumer-group` (else the
//!   group `default`); `$queue/<name>/$dlq` is the dead-letter queue. Deliveries carry
//!   the user properties `queue`, `partition`, `offset`, `message-id`, `delivery-count`
//!   and `topic` (the topic it was published to).
//! - Settle: PUBACK/PUBCOMP acks, a v5 PUBACK/PUBREC >= 0x80 nacks; or PUBLISH to
//!   `$queue/<name>/$ack`, `$nack`, `$reject` with the `message-id` user property.

mod message;
mod topic;

use std::sync::Arc;

use roost_core::{Message, Properties, ProtocolVersion, QoS, ReasonCode};
use roost_queue::{DeliverySink, MessageId, ProduceError, Queue, QueueDelivery};

use std::future::Future;
use std::task::Poll;

use futures_util::future::Either;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tracing::{debug, info};

use crate::broker::{Broker, Control};
use crate::mailbox::{self, WeakSender};
use crate::metrics::Limit;
use crate::protocol::{AckToken, Connection, Event};
use crate::session::{Delivery, QueueRef};

use message::decode_headers;
pub use message::{captured_message, captured_publish, new_message, user_property};
pub use topic::{QueueFilter, QueueTopic, Settle, is_queue_filter, parse_filter, parse_topic};

/// The SUBACK reason code of a `$queue/` subscription that failed with `e`.
pub fn subscribe_reason(e: &roost_queue::QueueError) -> ReasonCode {
    use roost_queue::QueueError;
    match e {
        QueueError::TooManyQueues { .. } | QueueError::TooManyGroups { .. } => {
            ReasonCode::QuotaExceeded
        }
        QueueError::InvalidName(_) | QueueError::InvalidFilter(_) => ReasonCode::TopicFilterInvalid,
        _ => ReasonCode::UnspecifiedError,
    }
}

/// The reason code a producer gets for a failed produce.
pub fn produce_reason(e: &ProduceError) -> ReasonCode {
    e.reason_code()
}

/// Hands queue deliveries to one connection's mailbox. Holds the mailbox
/// weakly, so a connection that is gone refuses rather than keeps it open.
pub struct QueueSink {
    sender: WeakSender<Delivery, Control>,
    topic_base: String,
    qos: QoS,
    identifier: Option<u32>,
    /// The connection speaks MQTT 5.0. Only 5.0 carries properties, so a delivery to a
    /// 3.x consumer skips building them (the stored ones and the six user properties
    /// queue deliveries carry): most of a delivery's allocations.
    v5: bool,
}

impl QueueSink {
    /// A sink for a subscription of `filter` at `qos` (queue deliveries are at least
    /// QoS 1) by a connection speaking `version`.
    pub fn new(
        sender: WeakSender<Delivery, Control>,
        filter: &QueueFilter,
        qos: QoS,
        identifier: Option<u32>,
        version: ProtocolVersion,
    ) -> QueueSink {
        QueueSink {
            sender,
            topic_base: filter.topic_base.clone(),
            qos: qos.max(QoS::AtLeastOnce),
            identifier,
            v5: version.is_v5(),
        }
    }
}

impl DeliverySink for QueueSink {
    fn offer(&self, d: QueueDelivery) -> bool {
        // Built before looking for room: one lock per delivery, and a refusal is rare
        // (the group's window stops offering first).
        self.sender.try_send(to_delivery(d, self)).is_ok()
    }
}

fn to_delivery(d: QueueDelivery, sink: &QueueSink) -> Delivery {
    let visible_name =
        d.id.queue
            .strip_suffix(roost_queue::DEAD_LETTER_SUFFIX)
            .unwrap_or(&d.id.queue);
    // With a filter the subscription names the subtopic, so the topic carries it too.
    let topic = if d.group.filter.is_some() && d.dead_letter.is_none() {
        format!("$queue/{visible_name}/{}", d.subtopic)
    } else {
        sink.topic_base.clone()
    };
    let properties = if sink.v5 {
        delivery_properties(&d, visible_name)
    } else {
        Properties::default()
    };
    let qos = sink.qos;
    Delivery {
        msg: Arc::new(Message {
            topic,
            payload: d.payload,
            qos,
            retain: false,
            properties,
            publisher: None,
            received_at: crate::clock::now(),
        }),
        qos,
        retain: false,
        subscription_ids: sink.identifier.into_iter().collect(),
        share: None,
        seq: None,
        queue: Some(Arc::new(QueueRef {
            queue: d.id.queue.clone(),
            group: d.group,
            id: d.id,
        })),
    }
}

/// The properties of a delivery to a 5.0 consumer: as produced, plus the user
/// properties that say where the message lives (`queue`, `partition`, `offset`,
/// `message-id`, `delivery-count`) and where it was published (`topic`).
fn delivery_properties(d: &QueueDelivery, visible_name: &str) -> Properties {
    let (mut properties, captured_from) = decode_headers(&d.headers);
    let original = if !captured_from.is_empty() {
        captured_from
    } else if d.subtopic.is_empty() {
        format!("$queue/{visible_name}")
    } else {
        format!("$queue/{visible_name}/{}", d.subtopic)
    };
    let extra = [
        ("queue", visible_name.to_owned()),
        ("partition", d.id.partition.to_string()),
        ("offset", d.id.offset.to_string()),
        ("message-id", d.id.to_string()),
        ("delivery-count", d.delivery_count.to_string()),
        ("topic", original),
    ];
    properties.user_properties.reserve_exact(extra.len());
    properties
        .user_properties
        .extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v)));
    properties.message_expiry_interval = None;
    properties
}

/// Settles by message id (from `$ack`/`$nack`/`$reject` publishes); true if the
/// queue knew the message as in flight to `consumer`.
pub fn settle(queue: &Queue, consumer: &str, id: &MessageId, how: Settle) -> bool {
    match how {
        Settle::Ack => {
            drop(queue.ack(consumer, None, id));
            true
        }
        Settle::Nack => queue.nack(consumer, None, id),
        Settle::Reject => queue.reject(consumer, None, id),
    }
}

// ----- a connection's queue traffic -----

/// Acks of one connection for one queue and group, gathered in arrival order.
#[derive(Default)]
pub struct PendingAcks {
    target: Option<Arc<crate::session::QueueRef>>,
    ids: Vec<roost_queue::MessageId>,
}

impl PendingAcks {
    /// Gathers the ack of `queue` (settling what was gathered for another target).
    pub fn push(&mut self, broker: &Broker, client_id: &str, queue: Arc<crate::session::QueueRef>) {
        let same = self
            .target
            .as_ref()
            .is_some_and(|t| t.queue == queue.queue && t.group == queue.group);
        if !same {
            self.settle(broker, client_id);
        }
        self.ids.push(queue.id.clone());
        if !same {
            self.target = Some(queue);
        }
    }

    /// Settles what was gathered.
    pub fn settle(&mut self, broker: &Broker, client_id: &str) {
        let Some(target) = self.target.take() else {
            return;
        };
        if let Some(q) = broker.queues.get(&target.queue) {
            drop(q.ack_many(client_id, Some(&target.group), &self.ids));
        }
        self.ids.clear();
    }
}

/// What a connection needs for `$queue/` traffic: a weak handle on its own mailbox
/// (for the queues' sinks) and the produces whose acknowledgements wait.
pub struct QueueIo {
    sender: mailbox::WeakSender<Delivery, Control>,
    /// Created on the first produce and dropped when none is left (boxed: most
    /// connections never produce to a queue, and an idle one carries 8 bytes).
    work: Option<Box<QueueWork>>,
}

/// A connection's queue produces in progress.
#[derive(Default)]
struct QueueWork {
    /// Polled by the connection task itself (no task per produce).
    produces: FuturesUnordered<ProduceAck>,
    /// 3.x queue publishes waiting for room in a full queue, in arrival order.
    waiting: std::collections::VecDeque<WaitingProduce>,
}

/// A produce whose acknowledgement waits for its append.
type ProduceAck =
    std::pin::Pin<Box<dyn std::future::Future<Output = (AckToken, ReasonCode)> + Send>>;

struct WaitingProduce {
    queue: roost_queue::Queue,
    message: roost_queue::NewMessage,
    ack: Option<AckToken>,
}

impl QueueIo {
    /// A connection's queue state, its queues' sinks reaching it through `sender`.
    pub fn new(sender: mailbox::WeakSender<Delivery, Control>) -> Self {
        QueueIo { sender, work: None }
    }

    fn work(&mut self) -> &mut QueueWork {
        self.work.get_or_insert_with(Default::default)
    }

    /// A 3.x produce waits for room: the client is not read from meanwhile.
    pub fn is_held_back(&self) -> bool {
        self.work.as_ref().is_some_and(|w| !w.waiting.is_empty())
    }

    /// Some produce waits for its acknowledgement.
    pub fn is_producing(&self) -> bool {
        self.work.as_ref().is_some_and(|w| !w.produces.is_empty())
    }

    /// An acknowledgement that is ready now, if any.
    pub fn next_produced(&mut self) -> Option<(AckToken, ReasonCode)> {
        let work = self.work.as_mut()?;
        futures_util::FutureExt::now_or_never(work.produces.next()).flatten()
    }

    /// Gives the produce state back once nothing is in progress.
    pub fn tidy(&mut self) {
        if self
            .work
            .as_ref()
            .is_some_and(|w| w.produces.is_empty() && w.waiting.is_empty())
        {
            self.work = None;
        }
    }

    /// What the front waiting produce needs room in, if any.
    pub fn room_needed(&self) -> Option<(roost_queue::Queue, u64)> {
        self.work
            .as_ref()?
            .waiting
            .front()
            .map(|w| (w.queue.clone(), w.message.payload.len() as u64))
    }

    /// Starts the waiting produces that now fit, in order.
    pub fn start_waiting(&mut self) {
        while let Some(w) = self.work.as_ref().and_then(|w| w.waiting.front()) {
            if !w.queue.has_room(w.message.payload.len() as u64) {
                break;
            }
            if let Some(w) = self.work.as_mut().and_then(|w| w.waiting.pop_front()) {
                start_produce(self, &w.queue, w.message, w.ack, false);
            }
        }
        self.tidy();
    }
}

/// How often a 3.x produce refused for lack of disk space is tried again.
const NO_SPACE_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// Queues the append now (so one connection's messages keep their order) and resolves
/// the acknowledgement when it is durable. A 3.x producer that loses a race for the
/// last room waits for more rather than be told nothing (it has no reason codes).
fn start_produce(
    qio: &mut QueueIo,
    queue: &roost_queue::Queue,
    message: roost_queue::NewMessage,
    ack: Option<AckToken>,
    v5: bool,
) {
    // Only a 3.x producer tries again, so only it keeps a copy (cheap: shared bytes).
    let again = (!v5).then(|| (queue.clone(), message.clone()));
    let produced = Produced {
        token: ack.unwrap_or_default(),
        first: queue.produce(message),
        again,
        retry: None,
    };
    match ack {
        // Every queue publish allocates this future, so it is a plain struct (about a
        // third of a KiB): as an `async` block around an `async fn` it was over 1 KiB,
        // which cost a copy into its box and glibc a consolidation of its free lists.
        Some(_) => qio.work().produces.push(Box::pin(produced)),
        None => {
            tokio::spawn(produced);
        }
    }
}

/// The acknowledgement of a produce: its token and reason code once the produce
/// `first` is stored; a 3.x producer's produce is tried `again` while the queue is full
/// or the disk is.
struct Produced {
    token: AckToken,
    first: roost_queue::Produce,
    again: Option<(roost_queue::Queue, roost_queue::NewMessage)>,
    /// The tries after the first (boxed: rare, and inline its waits for room or a timer
    /// would more than double every produce's future).
    retry: Option<std::pin::Pin<Box<dyn Future<Output = ProduceResult> + Send>>>,
}

type ProduceResult = Result<MessageId, roost_queue::ProduceError>;

impl Future for Produced {
    type Output = (AckToken, ReasonCode);

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Self::Output> {
        let this = &mut *self;
        let result = match this.retry.as_mut() {
            Some(retry) => std::task::ready!(retry.as_mut().poll(cx)),
            None => {
                let result = std::task::ready!(std::pin::Pin::new(&mut this.first).poll(cx));
                match this.again.take() {
                    Some((queue, message)) if must_retry(&result) => {
                        let no_space = result.as_ref().is_err_and(|e| e.is_no_space());
                        let retry = this
                            .retry
                            .insert(Box::pin(produce_again(queue, message, no_space)));
                        std::task::ready!(retry.as_mut().poll(cx))
                    }
                    _ => result,
                }
            }
        };
        let reason = match result {
            Ok(_) => ReasonCode::Success,
            Err(e) => produce_reason(&e),
        };
        Poll::Ready((this.token, reason))
    }
}

/// A 3.x produce that failed with this is tried again (it has no reason code to
/// report it with).
fn must_retry(result: &ProduceResult) -> bool {
    match result {
        Err(roost_queue::ProduceError::QuotaExceeded { .. }) => true,
        Err(e) => e.is_no_space(),
        Ok(_) => false,
    }
}

/// Tries a refused 3.x produce again, each time once the queue has room (or, with the
/// disk full (`no_space`), after [`NO_SPACE_RETRY`]), until it is stored or fails
/// otherwise.
async fn produce_again(
    queue: roost_queue::Queue,
    message: roost_queue::NewMessage,
    mut no_space: bool,
) -> ProduceResult {
    loop {
        if no_space {
            // The disk is full: nothing says when space returns, so look again now
            // and then (the PUBACK waits; the producer's window stops it).
            tokio::time::sleep(NO_SPACE_RETRY).await;
        } else {
            queue.wait_for_room(message.payload.len() as u64).await;
        }
        let result = queue.produce(message.clone()).await;
        if !must_retry(&result) {
            return result;
        }
        no_space = result.as_ref().is_err_and(|e| e.is_no_space());
    }
}

/// Joins the consumer group of an [`Event::QueueSubscribe`], and settles its place in
/// the SUBACK with the outcome.
pub fn subscribe(broker: &Broker, conn: &mut Connection, qio: &QueueIo, event: &Event) {
    let Event::QueueSubscribe {
        filter,
        parsed: f,
        options,
        identifier,
        existed,
        held,
    } = event
    else {
        return;
    };
    let queue = if f.queue.ends_with(roost_queue::DEAD_LETTER_SUFFIX) {
        broker
            .queues
            .get(&f.queue)
            .ok_or_else(|| roost_queue::QueueError::NotFound(f.queue.clone()))
    } else {
        broker.queues.get_or_create(&f.queue)
    };
    // Every consumer's window adapts to how fast it acknowledges, within the queue's
    // `consumer_window`; a v5 consumer's also within its Receive Maximum.
    let window = roost_queue::Window::Adaptive {
        max: if conn.version().is_v5() {
            u32::try_from(conn.send_window()).unwrap_or(u32::MAX)
        } else {
            u32::MAX
        },
    };
    let sink = Arc::new(QueueSink::new(
        qio.sender.clone(),
        f,
        options.qos,
        *identifier,
        conn.version(),
    ));
    let joined = queue.and_then(|q| q.join(&f.group, conn.client_id().clone(), window, sink));
    let outcome = match joined {
        Ok(()) => {
            debug!(client_id = %conn.client_id(), queue = %f.queue, group = %f.group, "joined queue group");
            Ok(())
        }
        Err(e) => {
            info!(client_id = %conn.client_id(), queue = %f.queue, "cannot consume from queue: {e}");
            let limit = match e {
                roost_queue::QueueError::TooManyQueues { .. } => Some(Limit::Queues),
                roost_queue::QueueError::TooManyGroups { .. } => Some(Limit::ConsumerGroups),
                _ => None,
            };
            if let Some(limit) = limit {
                broker.metrics.limit_tripped(limit, 1);
            }
            Err(subscribe_reason(&e))
        }
    };
    if let Some(slot) = held {
        conn.settle_subscription(*slot, filter, *existed, outcome);
    }
}

/// Stores a `$queue/` publish (or settles by message id) and arranges its
/// acknowledgement: resolved when the message is durable in its queue.
pub fn publish(
    broker: &Broker,
    conn: &mut Connection,
    qio: &mut QueueIo,
    msg: &Message,
    ack: Option<AckToken>,
) {
    let resolve = |conn: &mut Connection, reason| {
        if let Some(token) = ack {
            conn.resolve_ack(token, reason);
        }
    };
    match parse_topic(&msg.topic) {
        Some(QueueTopic::Settle(name, how)) => {
            let id = user_property(msg, "message-id").and_then(|v| v.parse().ok());
            let settled = match (broker.queues.get(name), id) {
                (Some(q), Some(id)) => settle(&q, conn.client_id(), &id, how),
                _ => false,
            };
            let reason = if settled {
                ReasonCode::Success
            } else {
                ReasonCode::UnspecifiedError
            };
            resolve(conn, reason);
        }
        Some(QueueTopic::Produce(name, rest)) => {
            let queue = match broker.queues.get_or_create(name) {
                Ok(q) => q,
                Err(e) => {
                    debug!(client_id = %conn.client_id(), queue = %name, "cannot produce: {e}");
                    if matches!(e, roost_queue::QueueError::TooManyQueues { .. }) {
                        broker.metrics.limit_tripped(Limit::Queues, 1);
                    }
                    return resolve(conn, e.reason_code());
                }
            };
            let message = match new_message(msg, rest) {
                Ok(m) => m,
                Err(e) => {
                    debug!(client_id = %conn.client_id(), queue = %name, "produce refused: {e}");
                    return resolve(conn, produce_reason(&e));
                }
            };
            if let Some(held) = user_property(msg, "ack-message-id") {
                return ack_and_produce(broker, conn, qio, &queue, held, message, ack);
            }
            let v5 = conn.version().is_v5();
            // 3.x has no quota reason code: a full queue holds the producer back (its
            // PUBACK waits and roost stops reading from it) until there is room, and
            // its later queue publishes wait behind, in order.
            if !v5 && (qio.is_held_back() || !queue.has_room(message.payload.len() as u64)) {
                qio.work().waiting.push_back(WaitingProduce {
                    queue,
                    message,
                    ack,
                });
                return;
            }
            start_produce(qio, &queue, message, ack, v5);
        }
        None => resolve(conn, ReasonCode::TopicNameInvalid),
    }
}

/// Atomic ack-and-produce: the produce carries `ack-message-id`, the `message-id` of a
/// delivery this client holds; the queue settles that delivery and stores `message` in
/// one durable step, and the acknowledgement says whether both happened.
fn ack_and_produce(
    broker: &Broker,
    conn: &mut Connection,
    qio: &mut QueueIo,
    target: &Queue,
    held: &str,
    message: roost_queue::NewMessage,
    ack: Option<AckToken>,
) {
    let source = held
        .parse::<MessageId>()
        .ok()
        .and_then(|id| Some((broker.queues.get(&id.queue)?, id)));
    let Some((source, id)) = source else {
        debug!(client_id = %conn.client_id(), ack_message_id = held, "ack-and-produce of an unknown message");
        if let Some(token) = ack {
            conn.resolve_ack(token, ReasonCode::UnspecifiedError);
        }
        return;
    };
    let transfer = source.ack_and_produce(conn.client_id(), &id, target, message);
    let client_id = conn.client_id().clone();
    let produce = async move {
        match transfer.await {
            Ok(_) => ReasonCode::Success,
            Err(e) => {
                debug!(client_id = %client_id, "ack-and-produce failed: {e}");
                produce_reason(&e)
            }
        }
    };
    match ack {
        Some(token) => {
            qio.work()
                .produces
                .push(Box::pin(async move { (token, produce.await) }));
        }
        None => {
            tokio::spawn(produce);
        }
    }
}

/// Resolves once the front waiting produce of a held-back 3.x producer fits (never
/// without one).
pub fn wait_for_room(needed: Option<(roost_queue::Queue, u64)>) -> impl Future<Output = ()> {
    match needed {
        // Boxed: only a held-back 3.x producer waits here.
        Some((queue, bytes)) => Either::Left(Box::pin(async move {
            queue.wait_for_room(bytes).await;
        })),
        None => Either::Right(std::future::pending()),
    }
}

/// The next acknowledgement of a produce, when it is ready.
pub fn next_produce(
    qio: &mut QueueIo,
) -> impl Future<Output = Option<(AckToken, ReasonCode)>> + '_ {
    std::future::poll_fn(move |cx| match qio.work.as_mut() {
        Some(w) => w.produces.poll_next_unpin(cx),
        None => Poll::Pending,
    })
}

#[cfg(test)]
mod tests {
    use super::message::{NO_HEADERS, encode_headers};
    use super::*;
    use bytes::{Bytes, BytesMut};
    use roost_core::codec::{self, PublishView};
    use roost_queue::GroupKey;

    #[test]
    fn filters() {
        let f = parse_filter("$share/workers/$queue/orders", None).expect("queue");
        assert_eq!(f.queue, "orders");
        assert_eq!(f.group, GroupKey::new("workers", None));
        let f = parse_filter("$queue/orders/eu/+", Some("g")).expect("queue");
        assert_eq!(f.group, GroupKey::new("g", Some("eu/+")));
        assert_eq!(f.topic_base, "$queue/orders");
        let f = parse_filter("$queue/orders", None).expect("queue");
        assert_eq!(f.group, GroupKey::new("default", None));
        let f = parse_filter("$share/g/$queue/orders/$dlq", None).expect("dlq");
        assert_eq!(
            f.queue,
            format!("orders{}", roost_queue::DEAD_LETTER_SUFFIX)
        );
        assert!(parse_filter("$share/g/orders", None).is_none());
        assert!(parse_filter("a/$queue/x", None).is_none());
    }

    #[test]
    fn topics() {
        assert_eq!(
            parse_topic("$queue/jobs"),
            Some(QueueTopic::Produce("jobs", ""))
        );
        assert_eq!(
            parse_topic("$queue/jobs/dev/1"),
            Some(QueueTopic::Produce("jobs", "dev/1"))
        );
        assert_eq!(
            parse_topic("$queue/jobs/$nack"),
            Some(QueueTopic::Settle("jobs", Settle::Nack))
        );
        assert_eq!(parse_topic("queue/jobs"), None);
    }

    #[test]
    fn shared_empty_headers_are_what_the_codec_writes() {
        let empty = Properties::default();
        let view = PublishView {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "",
            packet_id: 0,
            properties: &empty,
            subscription_identifiers: &[],
            message_expiry_interval: None,
            topic_alias: None,
            payload: &Bytes::new(),
        };
        let mut buf = BytesMut::new();
        codec::encode_publish(&view, ProtocolVersion::V5, &mut buf).expect("encodes");
        assert_eq!(&buf[..], NO_HEADERS);
        assert_eq!(&encode_headers(&empty, "")[..], NO_HEADERS);
        assert_eq!(
            decode_headers(&encode_headers(&empty, "")),
            (empty, String::new())
        );
    }

    fn delivery(headers: Bytes) -> QueueDelivery {
        QueueDelivery {
            id: MessageId {
                queue: Arc::from("jobs"),
                partition: 3,
                offset: 41,
            },
            group: GroupKey::new("g", None),
            delivery_count: 2,
            subtopic: "dev/1".into(),
            headers,
            payload: Bytes::from_static(b"work"),
            timestamp_ms: 0,
            dead_letter: None,
        }
    }

    /// A 5.0 consumer gets the message's own properties and the queue's user
    /// properties; a 3.1.1 consumer (which cannot receive properties) gets the same
    /// message and settles it the same way, without them being built.
    #[test]
    fn deliveries_carry_properties_only_for_v5_consumers() {
        let (sender, _mailbox) = crate::mailbox::mailbox::<Delivery, Control>(4);
        let filter = parse_filter("$share/g/$queue/jobs", None).expect("queue filter");
        let props = Properties {
            content_type: Some("text/plain".into()),
            ..Properties::default()
        };
        let stored = encode_headers(&props, "");
        let v5 = QueueSink::new(
            sender.downgrade(),
            &filter,
            QoS::AtLeastOnce,
            None,
            ProtocolVersion::V5,
        );
        let d = to_delivery(delivery(stored.clone()), &v5);
        assert_eq!(d.msg.topic, "$queue/jobs");
        assert_eq!(d.msg.payload, Bytes::from_static(b"work"));
        assert_eq!(d.msg.properties.content_type.as_deref(), Some("text/plain"));
        let user: Vec<(&str, &str)> = d
            .msg
            .properties
            .user_properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            user,
            [
                ("queue", "jobs"),
                ("partition", "3"),
                ("offset", "41"),
                ("message-id", "jobs:3:41"),
                ("delivery-count", "2"),
                ("topic", "$queue/jobs/dev/1"),
            ]
        );
        let v3 = QueueSink::new(
            sender.downgrade(),
            &filter,
            QoS::AtLeastOnce,
            None,
            ProtocolVersion::V3_1_1,
        );
        let d3 = to_delivery(delivery(stored), &v3);
        assert_eq!(d3.msg.topic, "$queue/jobs");
        assert_eq!(d3.msg.payload, Bytes::from_static(b"work"));
        assert_eq!(d3.msg.properties, Properties::default());
        assert_eq!(d3.queue, d.queue);
    }

    #[test]
    fn headers_round_trip() {
        let props = Properties {
            user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            content_type: Some("text/plain".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            ..Properties::default()
        };
        assert_eq!(
            decode_headers(&encode_headers(&props, "")),
            (props.clone(), String::new())
        );
        assert_eq!(
            decode_headers(&encode_headers(&props, "a/b")),
            (props, "a/b".to_owned())
        );
    }

    /// Every queue publish allocates a [`Produced`]: past 1 KiB glibc's malloc
    /// consolidates its free lists first (and the future is copied into its box).
    #[test]
    fn a_produce_future_stays_small() {
        assert!(std::mem::size_of::<Produced>() <= 512);
    }
}
