//! Byte layout of records and index entries, and nothing else: no I/O here.
//!
//! Every decoder in this module takes untrusted bytes (a file that may be torn,
//! bit-rotted or foreign) and answers with a value or a reason; none of them
//! panics or allocates in proportion to a length field it has not checked
//! against the bytes actually present.

use crate::Offset;

/// Version byte at the start of every record body.
pub(crate) const RECORD_VERSION: u8 = 1;

/// `length` (u32) + `crc` (u32).
pub(crate) const FRAME_PREFIX: usize = 8;

/// Fixed part of the body: version (u8), offset (u64), timestamp (u64), headers length (u32).
pub(crate) const BODY_FIXED: usize = 1 + 8 + 8 + 4;

/// Bytes a record costs on disk beyond its headers and payload.
pub(crate) const RECORD_OVERHEAD: usize = FRAME_PREFIX + BODY_FIXED;

/// Largest frame (prefix included) the log writes or believes when reading.
pub(crate) const MAX_FRAME: usize = 512 * 1024 * 1024;

/// Size of one `.index` entry: relative offset (u32) + position (u32).
pub(crate) const INDEX_ENTRY: usize = 8;

/// Size of one `.timeindex` entry: timestamp (u64) + relative offset (u32).
pub(crate) const TIME_ENTRY: usize = 12;

/// Frame length of a record with these headers and payload.
pub(crate) fn frame_len(headers: usize, payload: usize) -> usize {
    RECORD_OVERHEAD
        .saturating_add(headers)
        .saturating_add(payload)
}

/// Appends one framed record to `buf`.
///
/// The caller has checked `frame_len(..) <= MAX_FRAME`, so the length fits in u32.
pub(crate) fn encode_record(
    buf: &mut Vec<u8>,
    offset: Offset,
    timestamp: u64,
    headers: &[u8],
    payload: &[u8],
) {
    let start = buf.len();
    let frame = frame_len(headers.len(), payload.len());
    buf.reserve(frame);
    let length = u32::try_from(frame - 4).unwrap_or(u32::MAX);
    buf.extend_from_slice(&length.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.push(RECORD_VERSION);
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&timestamp.to_le_bytes());
    let headers_len = u32::try_from(headers.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&headers_len.to_le_bytes());
    buf.extend_from_slice(headers);
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c(&buf[start + FRAME_PREFIX..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A record decoded in place: ranges point into the slice given to [`decode_record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawRecord {
    pub offset: Offset,
    pub timestamp: u64,
    /// Start and end of the headers within the decoded slice.
    pub headers: (usize, usize),
    /// Start and end of the payload within the decoded slice.
    pub payload: (usize, usize),
    /// Bytes the whole frame occupies.
    pub frame_len: usize,
}

/// Why bytes are not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Damage {
    /// The length field is smaller than any record or larger than [`MAX_FRAME`].
    BadLength(u32),
    /// The CRC32C stored in the frame does not match its body.
    CrcMismatch,
    /// The body starts with a version this code does not write.
    UnknownVersion(u8),
    /// The headers length runs past the end of the body.
    BadHeadersLength,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::BadLength(n) => write!(f, "impossible record length {n}"),
            Damage::CrcMismatch => f.write_str("CRC32C mismatch"),
            Damage::UnknownVersion(v) => write!(f, "unknown record version {v}"),
            Damage::BadHeadersLength => f.write_str("headers length exceeds record"),
        }
    }
}

/// Result of looking for one record at the start of a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoded {
    Record(RawRecord),
    /// The frame is not complete: `frame_len` bytes are needed (0 if even the
    /// length field is missing).
    Incomplete {
        frame_len: usize,
    },
    Damaged(Damage),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The length of the frame at the start of `buf` as its prefix states it, if the prefix
/// is there and the length is one a record can have (nothing else is checked).
pub(crate) fn frame_len_at(buf: &[u8]) -> Option<usize> {
    let frame = u32_at(buf.get(..4)?, 0) as usize + 4;
    (RECORD_OVERHEAD..=MAX_FRAME)
        .contains(&frame)
        .then_some(frame)
}

/// Decodes the record at the start of `buf`, checking its length, CRC and layout.
pub(crate) fn decode_record(buf: &[u8]) -> Decoded {
    if buf.len() < 4 {
        return Decoded::Incomplete { frame_len: 0 };
    }
    let length = u32_at(buf, 0);
    let frame = length as usize + 4;
    if !(RECORD_OVERHEAD..=MAX_FRAME).contains(&frame) {
        return Decoded::Damaged(Damage::BadLength(length));
    }
    if buf.len() < frame {
        return Decoded::Incomplete { frame_len: frame };
    }
    let body = &buf[FRAME_PREFIX..frame];
    if crc32c::crc32c(body) != u32_at(buf, 4) {
        return Decoded::Damaged(Damage::CrcMismatch);
    }
    if body[0] != RECORD_VERSION {
        return Decoded::Damaged(Damage::UnknownVersion(body[0]));
    }
    let offset = u64_at(body, 1);
    let timestamp = u64_at(body, 9);
    let headers_len = u32_at(body, 17) as usize;
    if headers_len > body.len() - BODY_FIXED {
        return Decoded::Damaged(Damage::BadHeadersLength);
    }
    let headers_start = FRAME_PREFIX + BODY_FIXED;
    let payload_start = headers_start + headers_len;
    Decoded::Record(RawRecord {
        offset,
        timestamp,
        headers: (headers_start, payload_start),
        payload: (payload_start, frame),
        frame_len: frame,
    })
}

/// A sparse offset-index entry: the record `base + rel` starts at byte `position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub rel: u32,
    pub position: u32,
}

/// A sparse time-index entry: the record `base + rel` has timestamp `timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub timestamp: u64,
    pub rel: u32,
}

pub(crate) fn encode_index(buf: &mut Vec<u8>, entries: &[IndexEntry]) {
    for e in entries {
        buf.extend_from_slice(&e.rel.to_le_bytes());
        buf.extend_from_slice(&e.position.to_le_bytes());
    }
}

pub(crate) fn encode_time_index(buf: &mut Vec<u8>, entries: &[TimeEntry]) {
    for e in entries {
        buf.extend_from_slice(&e.timestamp.to_le_bytes());
        buf.extend_from_slice(&e.rel.to_le_bytes());
    }
}

/// Parses an `.index` file; `None` if it is not a well-formed index (wrong size,
/// entries not strictly increasing). Bounds against the data are checked by the caller.
pub(crate) fn parse_index(bytes: &[u8]) -> Option<Vec<IndexEntry>> {
    if !bytes.len().is_multiple_of(INDEX_ENTRY) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / INDEX_ENTRY);
    for chunk in bytes.chunks_exact(INDEX_ENTRY) {
        let e = IndexEntry {
            rel: u32_at(chunk, 0),
            position: u32_at(chunk, 4),
        };
        if let Some(prev) = out.last() {
            let prev: &IndexEntry = prev;
            if e.rel <= prev.rel || e.position <= prev.position {
                return None;
            }
        } else if e.rel == 0 || e.position == 0 {
            // Offset `base` at position 0 is implicit and never written.
            return None;
        }
        out.push(e);
    }
    Some(out)
}

/// Parses a `.timeindex` file; `None` if malformed (wrong size, offsets not
/// strictly increasing, timestamps decreasing).
pub(crate) fn parse_time_index(bytes: &[u8]) -> Option<Vec<TimeEntry>> {
    if !bytes.len().is_multiple_of(TIME_ENTRY) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / TIME_ENTRY);
    for chunk in bytes.chunks_exact(TIME_ENTRY) {
        let e = TimeEntry {
            timestamp: u64_at(chunk, 0),
            rel: u32_at(chunk, 8),
        };
        if let Some(prev) = out.last() {
            let prev: &TimeEntry = prev;
            if e.rel <= prev.rel || e.timestamp < prev.timestamp {
                return None;
            }
        }
        out.push(e);
    }
    Some(out)
}

/// The entry to start a scan from to reach `rel`: the last entry at or before it.
pub(crate) fn index_lookup(entries: &[IndexEntry], rel: u32) -> Option<IndexEntry> {
    let i = entries.partition_point(|e| e.rel <= rel);
    i.checked_sub(1).map(|i| entries[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 42, 1_700_000_000_000, b"hdr", b"payload");
        assert_eq!(buf.len(), frame_len(3, 7));
        match decode_record(&buf) {
            Decoded::Record(r) => {
                assert_eq!(r.offset, 42);
                assert_eq!(r.timestamp, 1_700_000_000_000);
                assert_eq!(&buf[r.headers.0..r.headers.1], b"hdr");
                assert_eq!(&buf[r.payload.0..r.payload.1], b"payload");
                assert_eq!(r.frame_len, buf.len());
            }
            other => panic!("not a record: {other:?}"),
        }
    }

    #[test]
    fn every_prefix_is_incomplete_and_every_flip_is_damage() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 7, 9, b"h", b"some payload bytes");
        for cut in 0..buf.len() {
            assert!(
                matches!(decode_record(&buf[..cut]), Decoded::Incomplete { .. }),
                "prefix of {cut} bytes"
            );
        }
        for i in 4..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(
                matches!(decode_record(&bad), Decoded::Damaged(_)),
                "flip at byte {i}"
            );
        }
    }

    #[test]
    fn garbage_index_is_rejected() {
        assert!(parse_index(&[1, 2, 3]).is_none());
        let mut buf = Vec::new();
        encode_index(
            &mut buf,
            &[
                IndexEntry {
                    rel: 5,
                    position: 100,
                },
                IndexEntry {
                    rel: 3,
                    position: 200,
                },
            ],
        );
        assert!(parse_index(&buf).is_none());
    }
}
