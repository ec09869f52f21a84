//! A replicated queue partition's types as openraft sees them.

use std::fmt;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::{Deserialize, Serialize};

use crate::raft::types::NodeId;

openraft::declare_raft_types!(
    /// The type configuration of a partition's Raft group.
    pub PartConfig: D = Op, R = OpOutcome, SnapshotData = std::io::Cursor<Vec<u8>>
);

/// A replicated partition: queue name and partition number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupId {
    /// The queue.
    pub queue: String,
    /// The partition.
    pub partition: u32,
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.queue, self.partition)
    }
}

/// A change to a partition, as its log carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Store a message (the fields of `roost_queue::NewMessage`).
    Produce {
        /// Subtopic.
        subtopic: String,
        /// `partition-key`.
        #[serde(default, with = "b64::opt")]
        key: Option<Vec<u8>>,
        /// Encoded MQTT properties.
        #[serde(with = "b64")]
        headers: Vec<u8>,
        /// Body.
        #[serde(with = "b64")]
        payload: Vec<u8>,
        /// `dedup-id`.
        #[serde(default, with = "b64::opt")]
        dedup_id: Option<Vec<u8>>,
        /// Delivery time.
        deliver_at: Option<u64>,
        /// A request id under `ack_mode = "leader"` (as in [`Op::Batch`]); only in
        /// entries of older versions, which proposed one produce per entry.
        #[serde(default)]
        early: Option<u64>,
    },
    /// Group (`group`, `filter`) settled these offsets.
    Settle {
        /// The group's name.
        group: String,
        /// The group's filter.
        filter: Option<String>,
        /// The offsets.
        offsets: Vec<u64>,
    },
    /// Group (`group`, `filter`) delivered these offsets, each for the given time.
    Delivered {
        /// The group's name.
        group: String,
        /// The group's filter.
        filter: Option<String>,
        /// (offset, delivery count).
        counts: Vec<(u64, u32)>,
    },
    /// Group (`group`, `filter`) had these offsets nacked: each is delivered again,
    /// not before the given time.
    Nacked {
        /// The group's name.
        group: String,
        /// The group's filter.
        filter: Option<String>,
        /// (offset, delivery count, redelivery time in ms since the epoch).
        retries: Vec<(u64, u32, u64)>,
    },
    /// These changes in this order, in one entry: what one node had to propose to the
    /// partition while its previous proposal was being committed (one entry, one
    /// fdatasync per replica, however many produces and settles came meanwhile).
    Batch {
        /// The changes (never a batch).
        ops: Vec<Op>,
        /// Set under `ack_mode = "leader"`: a request id, and the proposal is answered
        /// once the leader's own log has the entry on disk instead of once a majority
        /// has it.
        early: Option<u64>,
    },
}

impl Op {
    /// How many messages applying this stores (the state machine gives the k-th
    /// message of the log offset k).
    pub fn produces(&self) -> u64 {
        match self {
            Op::Produce { .. } => 1,
            Op::Settle { .. } | Op::Delivered { .. } | Op::Nacked { .. } => 0,
            Op::Batch { ops, .. } => ops.iter().map(Op::produces).sum(),
        }
    }

    /// The request id of a proposal answered from the leader's disk.
    pub fn early(&self) -> Option<u64> {
        match self {
            Op::Produce { early, .. } | Op::Batch { early, .. } => *early,
            Op::Settle { .. } | Op::Delivered { .. } | Op::Nacked { .. } => None,
        }
    }
}

/// What applying an [`Op`] answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpOutcome {
    /// The message's offset.
    Produced(u64),
    /// Anything else.
    Done,
    /// A batch's outcomes, one per change.
    Batch(Vec<OpOutcome>),
}

/// A partition's Raft message, or a proposal forwarded to its leader.
#[derive(Debug, Serialize, Deserialize)]
pub enum PartRpc {
    /// Append entries (and heartbeats).
    Append(AppendEntriesRequest<PartConfig>),
    /// A vote.
    Vote(VoteRequest<NodeId>),
    /// A snapshot chunk (refused: partitions take no snapshots).
    Snapshot(InstallSnapshotRequest<PartConfig>),
    /// To the leader: commit this (answer: the JSON [`OpOutcome`]).
    Propose(Op),
    /// To the leader: how far behind each replica is (answer: the JSON list of
    /// [`super::lag::Lag`]; empty from a replica that does not lead).
    Lags,
}

/// Message bytes in a change: a base64 string (a third larger, where JSON writes a
/// byte as up to four characters). Entries of older versions wrote an array of
/// numbers, which is still read.
mod b64 {
    use std::fmt;

    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("base64 or an array of bytes")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            STANDARD.decode(v).map_err(E::custom)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    /// The same for an optional field.
    pub mod opt {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match bytes {
                Some(b) => super::serialize(b, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            #[derive(Deserialize)]
            struct Wrapped(#[serde(with = "super")] Vec<u8>);
            Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce(payload: Vec<u8>, key: Option<Vec<u8>>) -> Op {
        Op::Produce {
            subtopic: "a/b".into(),
            key,
            headers: vec![],
            payload,
            dedup_id: None,
            deliver_at: None,
            early: None,
        }
    }

    #[test]
    fn message_bytes_are_base64_and_entries_of_older_versions_still_read() {
        let op = Op::Batch {
            ops: vec![
                produce(vec![0, 1, 255], Some(b"k".to_vec())),
                produce(vec![], None),
            ],
            early: Some(7),
        };
        let json = serde_json::to_string(&op).expect("encodes");
        assert!(json.contains("\"AAH/\""), "{json}");
        assert_eq!(serde_json::from_str::<Op>(&json).expect("decodes"), op);
        assert_eq!(op.produces(), 2);
        assert_eq!(op.early(), Some(7));
        // As versions before the batch wrote one.
        let old = r#"{"Produce":{"subtopic":"a/b","key":[107],"headers":[],"payload":[0,1,255],"dedup_id":null,"deliver_at":null,"early":null}}"#;
        assert_eq!(
            serde_json::from_str::<Op>(old).expect("decodes"),
            produce(vec![0, 1, 255], Some(b"k".to_vec()))
        );
        let older = r#"{"Produce":{"subtopic":"a/b","key":null,"headers":[],"payload":[9],"dedup_id":null,"deliver_at":null}}"#;
        assert_eq!(
            serde_json::from_str::<Op>(older).expect("decodes"),
            produce(vec![9], None)
        );
    }
}
