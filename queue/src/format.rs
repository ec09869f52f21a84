//! What the queue writes into storage records: the message header in front of the
//! broker's opaque headers, and the group-progress records. All integers little-endian;
//! every decoder is bounds-checked and returns `None` on malformed input, never panics.
//!
//! Message record (`headers` field of a partition record; the payload is the message):
//!
//! ```text
//! version   u8    1
//! flags     u8    bit 0: a dead-letter origin follows the subtopic; bits 1-4: the
//!                 fields below in this order (absent when their bit is clear)
//! sub_len   u16   then the subtopic (UTF-8)
//! [origin: partition u32, offset u64, delivery_count u32, reason u8]
//! [bit 1 dedup:      len u16, the `dedup-id`]
//! [bit 2 deliver_at: u64, ms since the epoch: no group gets it before then]
//! [bit 3 key:        len u16, the `partition-key` (kept for last-value queues)]
//! [bit 4 transfer:   len u16, source queue name, txn u64: written by a transfer]
//! opaque    rest  the broker's headers, as produced
//! ```
//!
//! Progress record (payload of a `g.<queue>` record, headers empty): a tag byte, then
//!
//! ```text
//! 1 declare   key                       a group exists (from the queue's earliest offset)
//! 2 settle    key, n u32, n x (partition u32, offset u64)   acked or dead-lettered
//! 3 reset     key, partition u32, offset u64
//! 4 delete    key
//! 5 purge     partition u32, offset u64  the queue's floor: nothing below is delivered
//! 6 snapshot  floors: n u32, n x u64; groups: n u32, n x (key, partitions u32,
//!             partitions x (committed u64, acked n u32, n x u64))
//! 7 transfer  txn u64, drop u8, keys n u32 x key, partition u32, offset u64,
//!             target len u16 + name, target_partition u32, headers len u32 + bytes,
//!             payload len u32 + bytes: settles (partition, offset) for `keys` (or, with drop,
//!             for every group, present and future) and stands for the target record
//! 8 done      txn u64: the transfer's target record is stored
//! 9 drop      partition u32, n u32, n x offset u64: delivered to no group
//! 10 delivered key, n u32, n x (partition u32, offset u64, count u32)  deliveries so far
//!             of unsettled messages (the latest record of an offset wins); written as
//!             they are handed out, and after each snapshot for all outstanding ones
//! key = group_len u16, group, has_filter u8, [filter_len u16, filter]
//! ```
//!
//! A transfer (atomic ack-and-produce, dead-letter redrive) is one record in the
//! source's progress log: once it is durable the settle and the produce both count.
//! The target record is appended after it and tagged with the txn, so recovery can
//! tell whether the append happened before a crash (see `Queues::open`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::group::GroupKey;

const VERSION: u8 = 1;
const FLAG_ORIGIN: u8 = 1;
const FLAG_DEDUP: u8 = 1 << 1;
const FLAG_DELIVER_AT: u8 = 1 << 2;
const FLAG_KEY: u8 = 1 << 3;
const FLAG_TRANSFER: u8 = 1 << 4;

/// The address of one message: `<queue>:<partition>:<offset>`, the `message-id` user
/// property of a delivery, which a consumer hands back to `$ack`, `$nack` or `$reject`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// The queue's name (`<name>$dlq` for a dead-letter queue).
    pub queue: Arc<str>,
    /// Partition index.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.queue, self.partition, self.offset)
    }
}

/// A `message-id` that is not `<queue>:<partition>:<offset>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message id {0:?}: expected <queue>:<partition>:<offset>")]
pub struct InvalidMessageId(pub String);

impl FromStr for MessageId {
    type Err = InvalidMessageId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidMessageId(s.to_owned());
        // Queue names cannot contain ':', so split from the right.
        let mut parts = s.rsplitn(3, ':');
        let offset = parts.next().and_then(|o| o.parse().ok()).ok_or_else(bad)?;
        let partition = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let queue = parts.next().filter(|q| !q.is_empty()).ok_or_else(bad)?;
        Ok(MessageId {
            queue: Arc::from(queue),
            partition,
            offset,
        })
    }
}

/// Why a message went to the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// Nacked or timed out `max_deliveries` times.
    MaxDeliveries,
    /// Rejected by a consumer.
    Rejected,
}

/// Where a dead letter came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// Partition in the source queue.
    pub partition: u32,
    /// Offset in that partition.
    pub offset: u64,
    /// Deliveries it had.
    pub delivery_count: u32,
    /// Why it was dead-lettered.
    pub reason: DeadReason,
}

/// A decoded message header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MessageHeader {
    pub subtopic: Bytes,
    pub origin: Option<Origin>,
    pub meta: Meta,
    pub headers: Bytes,
}

/// What the queue itself reads from a stored message besides its subtopic and origin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    /// The producer's `dedup-id`.
    pub dedup_id: Option<Bytes>,
    /// Delivered to no group before this time (ms since the epoch).
    pub deliver_at: Option<u64>,
    /// The partition key (stored for last-value queues only).
    pub key: Option<Bytes>,
    /// The transfer that wrote this record: source queue name and txn.
    pub transfer: Option<(Bytes, u64)>,
}

/// Longest `dedup-id` or partition key the queue header stores.
pub(crate) const MAX_META_BYTES: usize = 1024;

/// Longest subtopic (an MQTT topic is at most 65535 bytes).
pub(crate) const MAX_SUBTOPIC: usize = u16::MAX as usize;

pub(crate) fn encode_message(
    subtopic: &str,
    origin: Option<&Origin>,
    meta: &Meta,
    headers: &[u8],
) -> Bytes {
    let short = |b: &Bytes| b.slice(..b.len().min(MAX_META_BYTES));
    let mut flags = if origin.is_some() { FLAG_ORIGIN } else { 0 };
    for (bit, on) in [
        (FLAG_DEDUP, meta.dedup_id.is_some()),
        (FLAG_DELIVER_AT, meta.deliver_at.is_some()),
        (FLAG_KEY, meta.key.is_some()),
        (FLAG_TRANSFER, meta.transfer.is_some()),
    ] {
        if on {
            flags |= bit;
        }
    }
    let mut b = BytesMut::with_capacity(4 + subtopic.len() + 17 + headers.len());
    b.put_u8(VERSION);
    b.put_u8(flags);
    b.put_u16_le(u16::try_from(subtopic.len()).unwrap_or(u16::MAX));
    b.put_slice(&subtopic.as_bytes()[..subtopic.len().min(MAX_SUBTOPIC)]);
    if let Some(o) = origin {
        b.put_u32_le(o.partition);
        b.put_u64_le(o.offset);
        b.put_u32_le(o.delivery_count);
        b.put_u8(match o.reason {
            DeadReason::MaxDeliveries => 1,
            DeadReason::Rejected => 2,
        });
    }
    if let Some(d) = &meta.dedup_id {
        let d = short(d);
        b.put_u16_le(d.len() as u16);
        b.put_slice(&d);
    }
    if let Some(t) = meta.deliver_at {
        b.put_u64_le(t);
    }
    if let Some(k) = &meta.key {
        let k = short(k);
        b.put_u16_le(k.len() as u16);
        b.put_slice(&k);
    }
    if let Some((source, txn)) = &meta.transfer {
        let s = short(source);
        b.put_u16_le(s.len() as u16);
        b.put_slice(&s);
        b.put_u64_le(*txn);
    }
    b.put_slice(headers);
    b.freeze()
}

pub(crate) fn decode_message(raw: &Bytes) -> Option<MessageHeader> {
    let mut r = Reader { buf: raw, pos: 0 };
    if r.u8()? != VERSION {
        return None;
    }
    let flags = r.u8()?;
    let len = usize::from(r.u16()?);
    let subtopic = r.bytes(len)?;
    std::str::from_utf8(&subtopic).ok()?;
    let origin = if flags & FLAG_ORIGIN != 0 {
        Some(Origin {
            partition: r.u32()?,
            offset: r.u64()?,
            delivery_count: r.u32()?,
            reason: match r.u8()? {
                2 => DeadReason::Rejected,
                _ => DeadReason::MaxDeliveries,
            },
        })
    } else {
        None
    };
    let mut meta = Meta::default();
    if flags & FLAG_DEDUP != 0 {
        let n = usize::from(r.u16()?);
        meta.dedup_id = Some(r.bytes(n)?);
    }
    if flags & FLAG_DELIVER_AT != 0 {
        meta.deliver_at = Some(r.u64()?);
    }
    if flags & FLAG_KEY != 0 {
        let n = usize::from(r.u16()?);
        meta.key = Some(r.bytes(n)?);
    }
    if flags & FLAG_TRANSFER != 0 {
        let n = usize::from(r.u16()?);
        let source = r.bytes(n)?;
        meta.transfer = Some((source, r.u64()?));
    }
    Some(MessageHeader {
        subtopic,
        origin,
        meta,
        headers: raw.slice(r.pos..),
    })
}

/// One change to group progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    Declare(GroupKey),
    Settle(GroupKey, Vec<(u32, u64)>),
    Reset(GroupKey, u32, u64),
    Delete(GroupKey),
    Purge(u32, u64),
    Snapshot(Snapshot),
    Transfer(Transfer),
    TransferDone(u64),
    Drop(u32, Vec<u64>),
    Delivered(GroupKey, Vec<(u32, u64, u32)>),
}

/// One durable step that settles a message of this queue and stands for a record
/// stored in another (or the same) queue: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transfer {
    /// Unique within the source queue; tags the target record.
    pub txn: u64,
    /// Settle for every group, present and future (a redrive out of a dead-letter
    /// queue), rather than for `keys`.
    pub drop: bool,
    /// The groups whose delivery it settles.
    pub keys: Vec<GroupKey>,
    /// The settled message.
    pub partition: u32,
    /// The settled message.
    pub offset: u64,
    /// The queue the new record goes to.
    pub target: String,
    /// Its partition there.
    pub target_partition: u32,
    /// The target record's headers (queue header included, tagged with `txn`).
    pub headers: Bytes,
    /// The target record's payload.
    pub payload: Bytes,
}

/// One partition's durable progress: committed offset and the settled offsets above it.
pub(crate) type PartitionProgress = (u64, Vec<u64>);

/// Everything durable about a queue's groups at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub floors: Vec<u64>,
    pub groups: Vec<(GroupKey, Vec<PartitionProgress>)>,
}

fn put_key(b: &mut BytesMut, k: &GroupKey) {
    let put_str = |b: &mut BytesMut, s: &str| {
        let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        b.put_u16_le(s.len() as u16);
        b.put_slice(s);
    };
    put_str(b, &k.group);
    match &k.filter {
        Some(f) => {
            b.put_u8(1);
            put_str(b, f);
        }
        None => b.put_u8(0),
    }
}

impl Progress {
    pub(crate) fn encode(&self) -> Bytes {
        // A settle of a batch carries 12 bytes per message, a dispatch's delivery
        // counts 16: sized at once, not grown.
        let per_message = match self {
            Progress::Settle(_, ids) => 12 * ids.len(),
            Progress::Delivered(_, items) => 16 * items.len(),
            _ => 0,
        };
        let mut b = BytesMut::with_capacity(64 + per_message);
        match self {
            Progress::Declare(k) => {
                b.put_u8(1);
                put_key(&mut b, k);
            }
            Progress::Settle(k, ids) => {
                b.put_u8(2);
                put_key(&mut b, k);
                b.put_u32_le(ids.len() as u32);
                for &(p, o) in ids {
                    b.put_u32_le(p);
                    b.put_u64_le(o);
                }
            }
            Progress::Reset(k, p, o) => {
                b.put_u8(3);
                put_key(&mut b, k);
                b.put_u32_le(*p);
                b.put_u64_le(*o);
            }
            Progress::Delete(k) => {
                b.put_u8(4);
                put_key(&mut b, k);
            }
            Progress::Purge(p, o) => {
                b.put_u8(5);
                b.put_u32_le(*p);
                b.put_u64_le(*o);
            }
            Progress::Transfer(t) => {
                b.put_u8(7);
                b.put_u64_le(t.txn);
                b.put_u8(u8::from(t.drop));
                b.put_u32_le(t.keys.len() as u32);
                for k in &t.keys {
                    put_key(&mut b, k);
                }
                b.put_u32_le(t.partition);
                b.put_u64_le(t.offset);
                let target = &t.target.as_bytes()[..t.target.len().min(u16::MAX as usize)];
                b.put_u16_le(target.len() as u16);
                b.put_slice(target);
                b.put_u32_le(t.target_partition);
                b.put_u32_le(t.headers.len() as u32);
                b.put_slice(&t.headers);
                b.put_u32_le(t.payload.len() as u32);
                b.put_slice(&t.payload);
            }
            Progress::TransferDone(txn) => {
                b.put_u8(8);
                b.put_u64_le(*txn);
            }
            Progress::Drop(p, offsets) => {
                b.put_u8(9);
                b.put_u32_le(*p);
                b.put_u32_le(offsets.len() as u32);
                for &o in offsets {
                    b.put_u64_le(o);
                }
            }
            Progress::Snapshot(s) => {
                b.put_u8(6);
                b.put_u32_le(s.floors.len() as u32);
                for &f in &s.floors {
                    b.put_u64_le(f);
                }
                b.put_u32_le(s.groups.len() as u32);
                for (k, parts) in &s.groups {
                    put_key(&mut b, k);
                    b.put_u32_le(parts.len() as u32);
                    for (committed, acked) in parts {
                        b.put_u64_le(*committed);
                        b.put_u32_le(acked.len() as u32);
                        for &a in acked {
                            b.put_u64_le(a);
                        }
                    }
                }
            }
            Progress::Delivered(k, items) => {
                b.put_u8(10);
                put_key(&mut b, k);
                b.put_u32_le(items.len() as u32);
                for &(p, o, count) in items {
                    b.put_u32_le(p);
                    b.put_u64_le(o);
                    b.put_u32_le(count);
                }
            }
        }
        b.freeze()
    }

    pub(crate) fn decode(raw: &Bytes) -> Option<Progress> {
        let mut r = Reader { buf: raw, pos: 0 };
        let p = match r.u8()? {
            1 => Progress::Declare(r.key()?),
            2 => {
                let k = r.key()?;
                let n = r.count(12)?;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push((r.u32()?, r.u64()?));
                }
                Progress::Settle(k, ids)
            }
            3 => Progress::Reset(r.key()?, r.u32()?, r.u64()?),
            4 => Progress::Delete(r.key()?),
            5 => Progress::Purge(r.u32()?, r.u64()?),
            6 => {
                let n = r.count(8)?;
                let mut floors = Vec::with_capacity(n);
                for _ in 0..n {
                    floors.push(r.u64()?);
                }
                let n = r.count(4)?;
                let mut groups = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = r.key()?;
                    let np = r.count(12)?;
                    let mut parts = Vec::with_capacity(np);
                    for _ in 0..np {
                        let committed = r.u64()?;
                        let na = r.count(8)?;
                        let mut acked = Vec::with_capacity(na);
                        for _ in 0..na {
                            acked.push(r.u64()?);
                        }
                        parts.push((committed, acked));
                    }
                    groups.push((k, parts));
                }
                Progress::Snapshot(Snapshot { floors, groups })
            }
            7 => {
                let txn = r.u64()?;
                let drop = r.u8()? != 0;
                let n = r.count(3)?;
                let mut keys = Vec::with_capacity(n);
                for _ in 0..n {
                    keys.push(r.key()?);
                }
                let partition = r.u32()?;
                let offset = r.u64()?;
                let target = r.string()?.to_string();
                let target_partition = r.u32()?;
                let hlen = usize::try_from(r.u32()?).ok()?;
                let headers = r.bytes(hlen)?;
                let plen = usize::try_from(r.u32()?).ok()?;
                let payload = r.bytes(plen)?;
                Progress::Transfer(Transfer {
                    txn,
                    drop,
                    keys,
                    partition,
                    offset,
                    target,
                    target_partition,
                    headers,
                    payload,
                })
            }
            8 => Progress::TransferDone(r.u64()?),
            9 => {
                let p = r.u32()?;
                let n = r.count(8)?;
                let mut offsets = Vec::with_capacity(n);
                for _ in 0..n {
                    offsets.push(r.u64()?);
                }
                Progress::Drop(p, offsets)
            }
            10 => {
                let k = r.key()?;
                let n = r.count(16)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push((r.u32()?, r.u64()?, r.u32()?));
                }
                Progress::Delivered(k, items)
            }
            _ => return None,
        };
        (r.pos == raw.len()).then_some(p)
    }
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let end = self.pos.checked_add(N)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        s.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    /// A count of items of at least `min_size` bytes each that must fit in what is left
    /// (so a corrupt count cannot make us allocate wildly).
    fn count(&mut self, min_size: usize) -> Option<usize> {
        let n = usize::try_from(self.u32()?).ok()?;
        (n.checked_mul(min_size)? <= self.buf.len() - self.pos).then_some(n)
    }
    fn bytes(&mut self, len: usize) -> Option<Bytes> {
        let end = self.pos.checked_add(len)?;
        if end > self.buf.len() {
            return None;
        }
        let b = self.buf.slice(self.pos..end);
        self.pos = end;
        Some(b)
    }
    fn string(&mut self) -> Option<Arc<str>> {
        let len = usize::from(self.u16()?);
        let b = self.bytes(len)?;
        std::str::from_utf8(&b).ok().map(Arc::from)
    }
    fn key(&mut self) -> Option<GroupKey> {
        let group = self.string()?;
        let filter = match self.u8()? {
            0 => None,
            1 => Some(self.string()?),
            _ => return None,
        };
        Some(GroupKey { group, filter })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(g: &str, f: Option<&str>) -> GroupKey {
        GroupKey {
            group: g.into(),
            filter: f.map(Into::into),
        }
    }

    #[test]
    fn message_id_round_trip() {
        let id = MessageId {
            queue: "orders$dlq".into(),
            partition: 3,
            offset: 42,
        };
        assert_eq!(id.to_string(), "orders$dlq:3:42");
        assert_eq!("orders$dlq:3:42".parse::<MessageId>().ok(), Some(id));
        for bad in ["", "a:1", ":1:2", "a:x:2", "a:1:-2", "a:1:2:"] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn message_header_round_trip_and_garbage() {
        let o = Origin {
            partition: 2,
            offset: 9,
            delivery_count: 5,
            reason: DeadReason::Rejected,
        };
        let meta = Meta {
            dedup_id: Some(Bytes::from_static(b"d-1")),
            deliver_at: Some(77),
            key: Some(Bytes::from_static(b"k")),
            transfer: Some((Bytes::from_static(b"src"), 9)),
        };
        for meta in [Meta::default(), meta] {
            let raw = encode_message("dev/1", Some(&o), &meta, b"props");
            let h = decode_message(&raw);
            assert_eq!(h.as_ref().map(|h| &h.meta), Some(&meta));
            assert_eq!(h.map(|h| h.headers), Some(Bytes::from_static(b"props")));
            for n in 0..raw.len() {
                let _ = decode_message(&raw.slice(..n));
            }
        }
        for origin in [None, Some(o)] {
            let raw = encode_message("dev/1", origin.as_ref(), &Meta::default(), b"props");
            let h = decode_message(&raw);
            assert_eq!(h.as_ref().map(|h| &h.subtopic[..]), Some(&b"dev/1"[..]));
            assert_eq!(h.as_ref().map(|h| &h.headers[..]), Some(&b"props"[..]));
            assert_eq!(h.and_then(|h| h.origin), origin);
        }
        for n in 0..8 {
            let raw = encode_message("dev/1", None, &Meta::default(), b"");
            let _ = decode_message(&raw.slice(..n.min(raw.len())));
        }
        assert_eq!(decode_message(&Bytes::from_static(&[9, 0, 0, 0])), None);
    }

    #[test]
    fn progress_round_trip() {
        let all = [
            Progress::Declare(key("g", None)),
            Progress::Settle(key("g", Some("a/+")), vec![(1, 2), (3, 4)]),
            Progress::Reset(key("g", None), 7, 8),
            Progress::Delete(key("h", Some(""))),
            Progress::Purge(1, 99),
            Progress::Snapshot(Snapshot {
                floors: vec![1, 2],
                groups: vec![(key("g", None), vec![(5, vec![7, 9]), (0, vec![])])],
            }),
            Progress::Transfer(Transfer {
                txn: 5,
                drop: false,
                keys: vec![key("g", None), key("h", Some("a/#"))],
                partition: 2,
                offset: 40,
                target: "out".into(),
                target_partition: 1,
                headers: Bytes::from_static(b"hdr"),
                payload: Bytes::from_static(b"body"),
            }),
            Progress::TransferDone(5),
            Progress::Drop(0, vec![3, 4, 9]),
            Progress::Delivered(key("g", Some("a/#")), vec![(0, 5, 2), (3, u64::MAX, 1)]),
        ];
        for p in all {
            let raw = p.encode();
            assert_eq!(Progress::decode(&raw).as_ref(), Some(&p));
            for n in 0..raw.len() {
                assert_eq!(Progress::decode(&raw.slice(..n)), None);
            }
        }
    }
}
