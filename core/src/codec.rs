//! Bytes to packets and back.
//!
//! Decoding: [`decode`] looks at the fixed header first and refuses a packet whose
//! remaining length exceeds the limit before any of its body is buffered. Every UTF-8
//! string is checked for validity and for U+0000; a v5 property is rejected when it is
//! not allowed in its packet or appears twice where the spec forbids it.
//!
//! Encoding: [`encode`] writes any packet for a protocol version; [`encode_publish`]
//! writes a PUBLISH from borrowed parts so a fanned-out message is never copied.

mod decoder;
mod encoder;
mod error;
mod props;
mod publish_view;
mod sink;
mod wire;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use decoder::decode;
pub use encoder::{encode, encode_publish, encoded_len, publish_len};
pub use error::{DecodeError, EncodeError};
pub use publish_view::PublishView;
