//! Decoder fuzz target: arbitrary bytes as a connection's first packets (no version
//! yet), as a 3.1.1 stream and as a 5.0 stream. Every packet that decodes must encode
//! to exactly `encoded_len` bytes and decode back to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use roost_core::ProtocolVersion::{V3_1_1, V5};
use roost_core::codec::{decode, encode, encoded_len};
use roost_core::{Packet, ProtocolVersion};

fuzz_target!(|data: &[u8]| {
    for version in [None, Some(V3_1_1), Some(V5)] {
        let mut buf = BytesMut::from(data);
        // Small enough that some inputs hit the size limit, large enough for most.
        let max = if data.last().is_some_and(|b| b & 1 == 1) {
            64
        } else {
            usize::MAX
        };
        while let Ok(Some(packet)) = decode(&mut buf, version, max) {
            re_round_trip(&packet, version);
        }
    }
});

fn re_round_trip(packet: &Packet, version: Option<ProtocolVersion>) {
    // A CONNECT carries its own version; anything else was decoded with `version`.
    let (v, decode_as) = match (packet, version) {
        (Packet::Connect(c), _) => (c.protocol, None),
        (_, Some(v)) => (v, Some(v)),
        (_, None) => panic!("non-CONNECT decoded without a version: {packet:?}"),
    };
    let mut out = BytesMut::new();
    if let Err(e) = encode(packet, v, &mut out) {
        panic!("decoded packet does not encode ({e}): {packet:?}");
    }
    assert_eq!(out.len(), encoded_len(packet, v), "encoded_len disagrees");
    match decode(&mut out, decode_as, usize::MAX) {
        Ok(Some(back)) => assert_eq!(&back, packet, "re-decoded packet differs"),
        other => panic!("re-encoded packet does not decode: {other:?} from {packet:?}"),
    }
    assert!(out.is_empty(), "re-encoded packet has trailing bytes");
}
