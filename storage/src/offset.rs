//! [`Offset`], the position of a record in its log.
//!
//! It stands alone because every layer names it (record framing, segments, errors, the
//! log and the committer) while lib.rs only declares modules and re-exports.

/// The position of a record in its log.
pub type Offset = u64;
