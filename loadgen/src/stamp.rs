//! The 16-byte stamp at the front of every payload roost-bench publishes.
//!
//! Layout (little endian): send time in nanoseconds since the run's one `Instant` base
//! (8 bytes), publisher id (4 bytes), per-publisher sequence number (4 bytes). Every
//! client of a run lives in this process, so the send time and the receive time come
//! from the same monotonic clock and their difference is the end-to-end latency. The
//! rest of the payload is filler. Sequence numbers start at 0 and are dense per
//! publisher, which is what loss and duplicate accounting rely on.

/// Bytes the stamp takes at the front of a payload; the smallest payload size allowed.
pub const STAMP_LEN: usize = 16;

/// What a received payload says about its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Send time, ns since the run's base instant.
    pub sent_ns: u64,
    /// Which publisher of this run sent it.
    pub publisher: u32,
    /// The publisher's sequence number for it.
    pub seq: u32,
}

impl Stamp {
    /// Writes the stamp over the first [`STAMP_LEN`] bytes of `out`.
    ///
    /// Called on the already encoded PUBLISH in the write buffer, so the payload
    /// template is never copied or reallocated per message.
    pub fn write(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.sent_ns.to_le_bytes());
        out[8..12].copy_from_slice(&self.publisher.to_le_bytes());
        out[12..16].copy_from_slice(&self.seq.to_le_bytes());
    }

    /// Reads a stamp from the front of a payload; `None` when it is too short to carry
    /// one (a message from some other publisher).
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let head: &[u8; STAMP_LEN] = payload.get(..STAMP_LEN)?.try_into().ok()?;
        let (t, rest) = head.split_at(8);
        let (p, s) = rest.split_at(4);
        Some(Stamp {
            sent_ns: u64::from_le_bytes(t.try_into().ok()?),
            publisher: u32::from_le_bytes(p.try_into().ok()?),
            seq: u32::from_le_bytes(s.try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_and_short_payloads_carry_none() {
        let s = Stamp {
            sent_ns: 0x0102_0304_0506_0708,
            publisher: 7,
            seq: u32::MAX,
        };
        let mut buf = [0xAAu8; 20];
        s.write(&mut buf);
        assert_eq!(Stamp::read(&buf), Some(s));
        assert_eq!(buf[16..], [0xAA; 4], "filler untouched");
        assert_eq!(Stamp::read(&buf[..15]), None);
    }
}
