//! The frames of a node-to-node link.
//!
//! ```text
//! length  u32 BE   bytes after this field (kind + body), at most MAX_FRAME
//! kind    u8
//! body:
//!   HELLO     JSON Hello                       first frame each way
//!   REQUEST   id u64 BE, JSON Request          answered by one RESPONSE with its id
//!   RESPONSE  id u64 BE, ok u8, body           body: JSON, or a session's bytes; ok 0: a UTF-8 error
//!   PUBLISH   ack u64 BE (0: no ack wanted), n u16 BE, n x (group, filter) as
//!             u16-length strings, then the message (roost_engine::record's encoding)
//!   ACKED     id u64 BE                        the PUBLISH with that ack id is stored
//!   PING      (empty)                          keeps an idle link known to be alive
//! ```
//!
//! Anything else, a frame over [`MAX_FRAME`] or a body that does not parse is a
//! protocol error: the link is closed and the reason logged.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use roost_engine::peers::ShareKey;
use serde::{Deserialize, Serialize};

/// The largest frame accepted (a message larger than this is not forwarded).
pub const MAX_FRAME: usize = 64 << 20;

/// The version of this protocol, checked in the hello.
pub const VERSION: u32 = 1;

const HELLO: u8 = 0;
const REQUEST: u8 = 1;
const RESPONSE: u8 = 2;
const PUBLISH: u8 = 3;
const ACKED: u8 = 4;
const PING: u8 = 5;

/// The first frame each way: who is speaking, for which cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The cluster's name; both ends must agree.
    pub cluster: String,
    /// The speaker's node id.
    pub node: u64,
    /// Protocol version ([`VERSION`]).
    pub version: u32,
}

/// A frame.
#[derive(Debug, Clone)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// A request (JSON of [`crate::node::Request`]).
    Request {
        /// Correlates the response.
        id: u64,
        /// JSON.
        body: Bytes,
    },
    /// The answer to a request.
    Response {
        /// The request's id.
        id: u64,
        /// Success, or an error whose text is `body`.
        ok: bool,
        /// The answer.
        body: Bytes,
    },
    /// A message forwarded to the receiving node's subscribers.
    Publish {
        /// Non-zero when the sender waits for an [`Frame::Acked`] once it is stored.
        ack: u64,
        /// Share groups whose turn the receiver has.
        shared: Vec<ShareKey>,
        /// The message (see [`roost_engine::record::encode_retained`]).
        message: Bytes,
    },
    /// A forwarded message is stored.
    Acked {
        /// The publish's ack id.
        id: u64,
    },
    /// Nothing; proves the link alive.
    Ping,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Malformed.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// A JSON body that does not parse.
    #[error("malformed frame body: {0}")]
    Json(#[from] serde_json::Error),
}

fn put_str(out: &mut BytesMut, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.put_u16(len);
    out.put_slice(&s.as_bytes()[..usize::from(len)]);
}

impl Frame {
    /// Appends the frame, length first, to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        match self {
            Frame::Hello(h) => {
                out.put_u8(HELLO);
                out.put_slice(&serde_json::to_vec(h).unwrap_or_default());
            }
            Frame::Request { id, body } => {
                out.put_u8(REQUEST);
                out.put_u64(*id);
                out.put_slice(body);
            }
            Frame::Response { id, ok, body } => {
                out.put_u8(RESPONSE);
                out.put_u64(*id);
                out.put_u8(u8::from(*ok));
                out.put_slice(body);
            }
            Frame::Publish {
                ack,
                shared,
                message,
            } => {
                out.put_u8(PUBLISH);
                out.put_u64(*ack);
                out.put_u16(shared.len().min(usize::from(u16::MAX)) as u16);
                for k in shared.iter().take(usize::from(u16::MAX)) {
                    put_str(out, &k.group);
                    put_str(out, &k.filter);
                }
                out.put_slice(message);
            }
            Frame::Acked { id } => {
                out.put_u8(ACKED);
                out.put_u64(*id);
            }
            Frame::Ping => out.put_u8(PING),
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Takes one whole frame off the front of `buf`, if it holds one.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        if len == 0 {
            return Err(WireError::Malformed("empty frame"));
        }
        if buf.len() < 4 + len {
            buf.reserve(4 + len - buf.len());
            return Ok(None);
        }
        buf.advance(4);
        let mut body = buf.split_to(len).freeze();
        let kind = body.get_u8();
        let need = |body: &Bytes, n: usize| {
            if body.len() < n {
                Err(WireError::Malformed("frame too short"))
            } else {
                Ok(())
            }
        };
        Ok(Some(match kind {
            HELLO => Frame::Hello(serde_json::from_slice(&body)?),
            REQUEST => {
                need(&body, 8)?;
                let id = body.get_u64();
                Frame::Request { id, body }
            }
            RESPONSE => {
                need(&body, 9)?;
                let id = body.get_u64();
                let ok = body.get_u8() != 0;
                Frame::Response { id, ok, body }
            }
            PUBLISH => {
                need(&body, 10)?;
                let ack = body.get_u64();
                let n = body.get_u16();
                let mut shared = Vec::with_capacity(usize::from(n).min(64));
                let take_str = |body: &mut Bytes| -> Result<std::sync::Arc<str>, WireError> {
                    need(body, 2)?;
                    let len = usize::from(body.get_u16());
                    need(body, len)?;
                    let s = body.split_to(len);
                    std::str::from_utf8(&s)
                        .map(Into::into)
                        .map_err(|_| WireError::Malformed("share group is not UTF-8"))
                };
                for _ in 0..n {
                    let group = take_str(&mut body)?;
                    let filter = take_str(&mut body)?;
                    shared.push(ShareKey { group, filter });
                }
                Frame::Publish {
                    ack,
                    shared,
                    message: body,
                }
            }
            ACKED => {
                need(&body, 8)?;
                Frame::Acked { id: body.get_u64() }
            }
            PING => Frame::Ping,
            _ => return Err(WireError::Malformed("unknown frame kind")),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let frames = vec![
            Frame::Hello(Hello {
                cluster: "c".into(),
                node: 2,
                version: VERSION,
            }),
            Frame::Request {
                id: 7,
                body: Bytes::from_static(b"{}"),
            },
            Frame::Response {
                id: 7,
                ok: false,
                body: Bytes::from_static(b"no"),
            },
            Frame::Publish {
                ack: 9,
                shared: vec![ShareKey {
                    group: "g".into(),
                    filter: "a/+".into(),
                }],
                message: Bytes::from_static(b"msg"),
            },
            Frame::Acked { id: 9 },
            Frame::Ping,
        ];
        let mut buf = BytesMut::new();
        for f in &frames {
            f.encode(&mut buf);
        }
        let mut n = 0;
        while let Some(f) = Frame::decode(&mut buf).expect("decodes") {
            assert_eq!(format!("{f:?}"), format!("{:?}", frames[n]));
            n += 1;
        }
        assert_eq!(n, frames.len());

        for garbage in [
            &b"\xff\xff\xff\xff"[..],
            b"\x00\x00\x00\x00",
            b"\x00\x00\x00\x02\x63\x00",
            b"\x00\x00\x00\x03\x01\x00\x00",
            b"\x00\x00\x00\x06\x03\x00\x00\x00\x00\x00",
            b"\x00\x00\x00\x04\x00not",
        ] {
            let mut buf = BytesMut::from(garbage);
            assert!(Frame::decode(&mut buf).is_err(), "{garbage:?} is an error");
        }
    }
}
