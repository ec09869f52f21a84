//! Wire primitives shared by the decoder and the encoder.
//!
//! Reading: a [`Reader`] owns the frozen body of exactly one packet, so running past its
//! end means the remaining length was too short for the content (malformed), and binary
//! fields and the PUBLISH payload are zero-copy slices of the read buffer.
//!
//! Writing: Variable Byte Integers and the field limits; the encoder's two passes over a
//! packet body are in `sink`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::DecodeError;

/// Largest value of a Variable Byte Integer (four bytes), hence of a remaining length.
pub(super) const MAX_VARINT: usize = 268_435_455;

/// Largest length of a UTF-8 string or binary data field (two-byte length prefix).
pub(super) const MAX_FIELD: usize = 65_535;

/// The error for a read past the end of a packet's remaining length.
const SHORT: DecodeError =
    DecodeError::MalformedPacket("remaining length too short for the packet's content");

/// Reads the fixed header's remaining length from the bytes after the first byte.
///
/// Returns `Ok(None)` while the length is still incomplete, else the value and the
/// number of bytes it took. Non-minimal encodings are accepted; a fifth byte is not.
pub(super) fn remaining_length(bytes: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = bytes.get(i) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::MalformedPacket(
        "remaining length longer than four bytes",
    ))
}

/// Cursor over the body of one complete packet.
pub(super) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(super) fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(SHORT);
        }
        Ok(self.buf.get_u8())
    }

    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(SHORT);
        }
        Ok(self.buf.get_u16())
    }

    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(SHORT);
        }
        Ok(self.buf.get_u32())
    }

    /// A Variable Byte Integer inside the body (property length, subscription id).
    pub(super) fn varint(&mut self) -> Result<usize, DecodeError> {
        match remaining_length(&self.buf)? {
            Some((value, len)) => {
                self.buf.advance(len);
                Ok(value)
            }
            None => Err(SHORT),
        }
    }

    /// The next `n` bytes, sharing the packet's memory.
    pub(super) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(SHORT);
        }
        Ok(self.buf.split_to(n))
    }

    /// Everything left (the PUBLISH payload), sharing the packet's memory.
    pub(super) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Binary Data: two-byte length, then that many bytes.
    pub(super) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }

    /// UTF-8 Encoded String: valid UTF-8 without U+0000 (both versions say malformed).
    pub(super) fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        // In UTF-8 the byte 0x00 only ever encodes U+0000, so a byte scan suffices.
        if raw.contains(&0) {
            return Err(DecodeError::MalformedPacket("U+0000 in a UTF-8 string"));
        }
        match std::str::from_utf8(&raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(DecodeError::MalformedPacket("invalid UTF-8 string")),
        }
    }

    /// Fails when content is left over inside the remaining length.
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::MalformedPacket(
                "trailing bytes after the packet's content",
            ))
        }
    }
}

/// Bytes a Variable Byte Integer of `v` takes.
pub(super) fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes a Variable Byte Integer; `v` must be at most [`MAX_VARINT`].
pub(super) fn put_varint(buf: &mut BytesMut, mut v: usize) {
    loop {
        let digit = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            buf.put_u8(digit);
            return;
        }
        buf.put_u8(digit | 0x80);
    }
}
