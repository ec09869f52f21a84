//! Unit tests: one per receiver rule of the specs, known byte vectors, encoder forms.

use bytes::{BufMut, Bytes, BytesMut};

use super::*;
use crate::packet::ProtocolVersion::{V3_1, V3_1_1, V5};
use crate::packet::*;
use crate::properties::{Properties, id};
use crate::reason::ReasonCode;

const MAX: usize = 1 << 20;

fn dec(bytes: &[u8], v: Option<ProtocolVersion>) -> Result<Option<Packet>, DecodeError> {
    decode(&mut BytesMut::from(bytes), v, MAX)
}

/// Decodes a packet that must be complete and valid.
fn ok(bytes: &[u8], v: Option<ProtocolVersion>) -> Packet {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, v, MAX)
        .expect("valid packet")
        .expect("complete packet");
    assert!(buf.is_empty(), "packet not fully consumed");
    packet
}

fn is_malformed(r: Result<Option<Packet>, DecodeError>) -> bool {
    matches!(r, Err(DecodeError::MalformedPacket(_)))
}

fn is_protocol_error(r: Result<Option<Packet>, DecodeError>) -> bool {
    matches!(r, Err(DecodeError::ProtocolError(_)))
}

fn enc(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(p, v, &mut buf).expect("encodable");
    assert_eq!(buf.len(), encoded_len(p, v));
    buf.to_vec()
}

/// A packet from a first byte and a body; the remaining length is computed.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    buf.put_u8(first);
    wire::put_varint(&mut buf, body.len());
    buf.put_slice(body);
    buf.to_vec()
}

/// A 3.1.1/5.0 CONNECT body with the given level, flags and rest of the body.
fn connect_body(level: u8, flags: u8, props_and_payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 60];
    b.extend_from_slice(props_and_payload);
    b
}

/// A v5 PUBLISH QoS 0 to topic "t" with the given raw properties.
fn v5_publish_with(props: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 1, b't', props.len() as u8];
    body.extend_from_slice(props);
    frame(0x30, &body)
}

// ---- fixed header ----

#[test]
fn remaining_length_of_five_bytes_is_malformed() {
    assert!(is_malformed(dec(
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        Some(V5)
    )));
    // Four continuation bytes are enough to know.
    assert!(is_malformed(dec(&[0x30, 0x80, 0x80, 0x80, 0x80], Some(V5))));
}

#[test]
fn non_minimal_remaining_length_is_accepted() {
    assert_eq!(ok(&[0xC0, 0x80, 0x00], Some(V3_1_1)), Packet::PingReq);
}

#[test]
fn incomplete_packet_is_none_and_not_consumed() {
    let bytes = enc(&Packet::PubAck(PubResponse::new(7)), V3_1_1);
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        assert_eq!(decode(&mut buf, Some(V3_1_1), MAX), Ok(None));
        assert_eq!(&buf[..], &bytes[..cut]);
    }
}

#[test]
fn too_large_is_refused_from_the_fixed_header_alone() {
    // Remaining length 128 announced, no body yet.
    let mut buf = BytesMut::from(&[0x30, 0x80, 0x01][..]);
    assert_eq!(
        decode(&mut buf, Some(V5), 100),
        Err(DecodeError::PacketTooLarge {
            size: 131,
            max: 100
        })
    );
    // Exactly at the limit is fine.
    let bytes = frame(0x30, &[0, 1, b't', 0, b'x']);
    assert!(decode(&mut BytesMut::from(&bytes[..]), Some(V5), bytes.len()).is_ok());
    assert!(matches!(
        decode(&mut BytesMut::from(&bytes[..]), Some(V5), bytes.len() - 1),
        Err(DecodeError::PacketTooLarge { .. })
    ));
}

#[test]
fn first_packet_must_be_connect() {
    assert_eq!(
        dec(&[0xC0, 0x00], None),
        Err(DecodeError::ProtocolError("first packet must be CONNECT"))
    );
    assert_eq!(
        dec(&frame(0x30, &[0, 1, b't']), None),
        Err(DecodeError::ProtocolError("first packet must be CONNECT"))
    );
}

#[test]
fn packet_type_zero_and_v3_auth_are_malformed() {
    assert!(is_malformed(dec(&[0x00, 0x00], Some(V5))));
    assert!(is_malformed(dec(&[0xF0, 0x00], Some(V3_1_1))));
    assert!(is_malformed(dec(&[0xF0, 0x00], Some(V3_1))));
    assert_eq!(ok(&[0xF0, 0x00], Some(V5)), Packet::Auth(Auth::default()));
}

#[test]
fn reserved_fixed_header_flags_are_malformed() {
    // PUBREL, SUBSCRIBE, UNSUBSCRIBE need 0010.
    assert!(is_malformed(dec(&[0x60, 2, 0, 1], Some(V3_1_1))));
    assert!(is_malformed(dec(
        &frame(0x80, &[0, 1, 0, 1, b'a', 0]),
        Some(V3_1_1)
    )));
    assert!(is_malformed(dec(
        &frame(0xA0, &[0, 1, 0, 1, b'a']),
        Some(V3_1_1)
    )));
    assert!(is_malformed(dec(
        &frame(0x83, &[0, 1, 0, 1, b'a', 0]),
        Some(V5)
    )));
    // Everything else but PUBLISH needs 0000.
    assert!(is_malformed(dec(&[0x42, 2, 0, 1], Some(V3_1_1))));
    assert!(is_malformed(dec(&[0xC1, 0], Some(V3_1_1))));
    assert!(is_malformed(dec(&[0xE8, 0], Some(V3_1_1))));
    assert!(is_malformed(dec(&[0x21, 2, 0, 0], Some(V3_1_1))));
    let connect = frame(0x12, &connect_body(4, 0x02, &[0, 0]));
    assert!(is_malformed(dec(&connect, None)));
    // The correct flags decode.
    assert!(matches!(
        ok(&[0x62, 2, 0, 1], Some(V3_1_1)),
        Packet::PubRel(_)
    ));
}

#[test]
fn publish_qos3_and_qos0_dup_are_malformed() {
    let body = [0, 1, b't', 0, 1];
    assert!(is_malformed(dec(&frame(0x36, &body), Some(V3_1_1))));
    assert!(is_malformed(dec(&frame(0x38, &body), Some(V3_1_1))));
    assert!(is_malformed(dec(&frame(0x38, &body), Some(V5))));
    // DUP with QoS 1 is fine.
    let p = ok(&frame(0x3A, &body), Some(V3_1_1));
    assert!(matches!(
        p,
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            packet_id: 1,
            ..
        })
    ));
}

// ---- CONNECT ----

#[test]
fn connect_protocol_name_and_level_decide_the_version() {
    let mq_isdp = frame(
        0x10,
        &[
            0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 1, b'c',
        ],
    );
    let Packet::Connect(c) = ok(&mq_isdp, None) else {
        panic!("not a CONNECT")
    };
    assert_eq!(c.protocol, V3_1);
    assert_eq!(c.client_id, "c");

    for (level, version) in [(4, V3_1_1), (5, V5)] {
        let props: &[u8] = if level == 5 {
            &[0, 0, 1, b'c']
        } else {
            &[0, 1, b'c']
        };
        let Packet::Connect(c) = ok(&frame(0x10, &connect_body(level, 0x02, props)), None) else {
            panic!("not a CONNECT")
        };
        assert_eq!(c.protocol, version);
        assert!(c.clean_start);
        assert_eq!(c.keep_alive, 60);
    }

    assert_eq!(
        dec(&frame(0x10, &connect_body(6, 0x02, &[0, 1, b'c'])), None),
        Err(DecodeError::UnsupportedProtocolVersion(6))
    );
    assert_eq!(
        dec(&frame(0x10, &connect_body(3, 0x02, &[0, 1, b'c'])), None),
        Err(DecodeError::UnsupportedProtocolVersion(3))
    );
    let isdp_level4 = frame(
        0x10,
        &[
            0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 4, 0x02, 0, 60, 0, 1, b'c',
        ],
    );
    assert_eq!(
        dec(&isdp_level4, None),
        Err(DecodeError::UnsupportedProtocolVersion(4))
    );
    let bad_name = frame(
        0x10,
        &[0, 4, b'M', b'Q', b'T', b'X', 4, 0x02, 0, 60, 0, 1, b'c'],
    );
    assert_eq!(dec(&bad_name, None), Err(DecodeError::InvalidProtocolName));
}

#[test]
fn second_connect_still_decodes() {
    let bytes = frame(0x10, &connect_body(4, 0x02, &[0, 1, b'c']));
    assert!(matches!(ok(&bytes, Some(V5)), Packet::Connect(c) if c.protocol == V3_1_1));
}

#[test]
fn connect_flag_rules() {
    let plain = [0, 1, b'c'];
    // Reserved bit 0.
    assert!(is_malformed(dec(
        &frame(0x10, &connect_body(4, 0x03, &plain)),
        None
    )));
    // Will QoS or retain without the will flag.
    assert!(is_malformed(dec(
        &frame(0x10, &connect_body(4, 0x08, &plain)),
        None
    )));
    assert!(is_malformed(dec(
        &frame(0x10, &connect_body(4, 0x20, &plain)),
        None
    )));
    // Will QoS 3.
    let will = [0, 1, b'c', 0, 1, b'w', 0, 0];
    assert!(is_malformed(dec(
        &frame(0x10, &connect_body(4, 0x1C, &will)),
        None
    )));
    assert!(
        matches!(ok(&frame(0x10, &connect_body(4, 0x34, &will)), None),
        Packet::Connect(c) if c.will.as_ref().is_some_and(|w| w.qos == QoS::ExactlyOnce && w.retain))
    );
    // Password without user name: malformed in 3.1.1 and 3.1, allowed in 5.0.
    let pass = [0, 1, b'c', 0, 2, 1, 2];
    assert!(is_malformed(dec(
        &frame(0x10, &connect_body(4, 0x40, &pass)),
        None
    )));
    let isdp = [
        &[0u8, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x40, 0, 60][..],
        &pass[..],
    ]
    .concat();
    assert!(is_malformed(dec(&frame(0x10, &isdp), None)));
    let v5_pass = [0, 0, 1, b'c', 0, 2, 1, 2];
    let Packet::Connect(c) = ok(&frame(0x10, &connect_body(5, 0x40, &v5_pass)), None) else {
        panic!("not a CONNECT")
    };
    assert_eq!(c.username, None);
    assert_eq!(c.password, Some(Bytes::from_static(&[1, 2])));
}

/// MQTT 3.1.1 §3.1.2.11's example variable header (flags 0xCE, keep alive 10), with a
/// payload: client id, will topic and message, user name, password.
#[test]
fn v311_connect_known_bytes() {
    let bytes: &[u8] = &[
        0x10, 34, // fixed header
        0, 4, b'M', b'Q', b'T', b'T', 4, 0xCE, 0, 10, // variable header
        0, 3, b'c', b'i', b'd', // client id
        0, 3, b'w', b'/', b't', // will topic
        0, 2, b'h', b'i', // will message
        0, 4, b'u', b's', b'e', b'r', // user name
        0, 2, 1, 2, // password
    ];
    let expected = Packet::Connect(Box::new(Connect {
        protocol: V3_1_1,
        clean_start: true,
        keep_alive: 10,
        client_id: "cid".into(),
        will: Some(LastWill {
            topic: "w/t".into(),
            payload: Bytes::from_static(b"hi"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }),
        username: Some("user".into()),
        password: Some(Bytes::from_static(&[1, 2])),
        properties: Properties::default(),
    }));
    assert_eq!(ok(bytes, None), expected);
    assert_eq!(enc(&expected, V3_1_1), bytes);
}

#[test]
fn v31_connect_is_written_as_mqisdp_level_3() {
    let c = Packet::Connect(Box::new(Connect {
        protocol: V3_1,
        client_id: "c".into(),
        ..Default::default()
    }));
    assert_eq!(
        enc(&c, V3_1),
        [
            0x10, 15, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0, 0, 0, 0, 1, b'c'
        ]
    );
}

// ---- packet identifiers, SUBSCRIBE, UNSUBSCRIBE ----

#[test]
fn packet_id_zero_is_malformed() {
    for v in [V3_1_1, V5] {
        assert!(is_malformed(dec(
            &frame(0x32, &[0, 1, b't', 0, 0]),
            Some(v)
        )));
        for first in [0x40, 0x50, 0x62, 0x70] {
            assert!(is_malformed(dec(&[first, 2, 0, 0], Some(v))), "{first:#x}");
        }
        let props: &[u8] = if v == V5 { &[0] } else { &[] };
        let sub = [&[0, 0][..], props, &[0, 1, b'a', 0]].concat();
        assert!(is_malformed(dec(&frame(0x82, &sub), Some(v))));
        let unsub = [&[0, 0][..], props, &[0, 1, b'a']].concat();
        assert!(is_malformed(dec(&frame(0xA2, &unsub), Some(v))));
        let suback = [&[0, 0][..], props, &[0]].concat();
        assert!(is_malformed(dec(&frame(0x90, &suback), Some(v))));
        let unsuback = [&[0, 0][..], props].concat();
        assert!(is_malformed(dec(&frame(0xB0, &unsuback), Some(v))));
    }
}

#[test]
fn subscribe_and_unsubscribe_without_filters_are_protocol_errors() {
    assert!(is_protocol_error(dec(&[0x82, 2, 0, 1], Some(V3_1_1))));
    assert!(is_protocol_error(dec(&[0xA2, 2, 0, 1], Some(V3_1_1))));
    assert!(is_protocol_error(dec(&[0x82, 3, 0, 1, 0], Some(V5))));
    assert!(is_protocol_error(dec(&[0xA2, 3, 0, 1, 0], Some(V5))));
}

#[test]
fn subscription_options_rules() {
    let v5 = |opts: u8| dec(&frame(0x82, &[0, 1, 0, 0, 1, b'a', opts]), Some(V5));
    assert!(is_malformed(v5(0x40)));
    assert!(is_malformed(v5(0x80)));
    assert!(is_malformed(v5(0x03)));
    assert!(is_protocol_error(v5(0x30)));
    let Ok(Some(Packet::Subscribe(s))) = v5(0x2E) else {
        panic!("valid options refused")
    };
    assert_eq!(
        s.filters[0].1,
        SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::DoNotSend,
        }
    );
    // 3.x: only the two QoS bits may be set.
    let v3 = |opts: u8| dec(&frame(0x82, &[0, 1, 0, 1, b'a', opts]), Some(V3_1_1));
    assert!(is_malformed(v3(0x04)));
    assert!(is_malformed(v3(0x40)));
    assert!(is_malformed(v3(0x03)));
    assert!(v3(0x02).is_ok());
}

// ---- lengths ----

#[test]
fn trailing_bytes_are_malformed() {
    assert!(is_malformed(dec(&[0x40, 3, 0, 1, 0], Some(V3_1_1))));
    assert!(is_malformed(dec(&[0xB0, 3, 0, 1, 0], Some(V3_1_1))));
    assert!(is_malformed(dec(&[0x20, 3, 0, 0, 0], Some(V3_1_1))));
    let connect = frame(0x10, &connect_body(4, 0x02, &[0, 1, b'c', 9]));
    assert!(is_malformed(dec(&connect, None)));
    // A v5 ack whose property length covers fewer bytes than remain.
    assert!(is_malformed(dec(&[0x40, 5, 0, 1, 0x10, 0, 0], Some(V5))));
}

#[test]
fn remaining_length_too_short_is_malformed() {
    assert!(is_malformed(dec(&[0x40, 1, 0], Some(V3_1_1))));
    assert!(is_malformed(dec(&frame(0x30, &[0, 5, b't']), Some(V3_1_1))));
    let connect = frame(0x10, &connect_body(4, 0x82, &[0, 1, b'c']));
    assert!(
        is_malformed(dec(&connect, None)),
        "user name flag without user name"
    );
    // Property length beyond the packet.
    assert!(is_malformed(dec(&[0x40, 4, 0, 1, 0x10, 5], Some(V5))));
}

#[test]
fn ping_and_v3_disconnect_must_be_empty() {
    for v in [V3_1_1, V5] {
        assert!(is_malformed(dec(&[0xC0, 1, 0], Some(v))));
        assert!(is_malformed(dec(&[0xD0, 1, 0], Some(v))));
    }
    assert!(is_malformed(dec(&[0xE0, 1, 0], Some(V3_1_1))));
    assert_eq!(ok(&[0xD0, 0], Some(V3_1_1)), Packet::PingResp);
    assert_eq!(
        ok(&[0xE0, 0], Some(V3_1_1)),
        Packet::Disconnect(Disconnect::default())
    );
}

#[test]
fn server_packets_decode_too() {
    let connack = ok(&[0x20, 2, 1, 0], Some(V3_1_1));
    assert_eq!(
        connack,
        Packet::ConnAck(ConnAck {
            session_present: true,
            ..Default::default()
        })
    );
    let suback = ok(&[0x90, 4, 0, 9, 1, 0x80], Some(V3_1_1));
    assert_eq!(
        suback,
        Packet::SubAck(SubAck {
            packet_id: 9,
            reasons: vec![ReasonCode::GrantedQoS1, ReasonCode::UnspecifiedError],
            properties: Properties::default(),
        })
    );
    assert!(is_malformed(dec(&[0x90, 3, 0, 9, 0x03], Some(V3_1_1))));
    assert!(
        is_malformed(dec(&[0x20, 2, 2, 0], Some(V3_1_1))),
        "CONNACK reserved flags"
    );
}

// ---- UTF-8 ----

#[test]
fn strings_must_be_utf8_without_nul() {
    for v in [V3_1_1, V5] {
        let props: &[u8] = if v == V5 { &[0] } else { &[] };
        let with_topic = |topic: &[u8]| {
            let body = [&[0, topic.len() as u8][..], topic, props].concat();
            dec(&frame(0x30, &body), Some(v))
        };
        assert!(is_malformed(with_topic(&[b'a', 0xFF])));
        assert!(is_malformed(with_topic(&[0xED, 0xA0, 0x80])), "surrogate");
        assert!(is_malformed(with_topic(&[b'a', 0, b'b'])));
        assert!(with_topic("é/ü".as_bytes()).is_ok());
    }
    let nul_client_id = frame(0x10, &connect_body(4, 0x02, &[0, 1, 0]));
    assert!(is_malformed(dec(&nul_client_id, None)));
    // NUL inside a user property.
    let nul_prop = v5_publish_with(&[id::USER_PROPERTY, 0, 1, 0, 0, 0]);
    assert!(is_malformed(dec(&nul_prop, Some(V5))));
}

// ---- properties ----

#[test]
fn unknown_or_misplaced_property_is_malformed() {
    assert!(is_malformed(dec(&v5_publish_with(&[0x05, 0]), Some(V5))));
    assert!(is_malformed(dec(&v5_publish_with(&[0x7F]), Some(V5))));
    // Session expiry belongs to CONNECT, CONNACK and DISCONNECT, not PUBLISH.
    let expiry = [id::SESSION_EXPIRY_INTERVAL, 0, 0, 0, 1];
    assert!(is_malformed(dec(&v5_publish_with(&expiry), Some(V5))));
    // Topic alias is PUBLISH-only.
    assert!(is_malformed(dec(
        &frame(0x82, &[0, 1, 3, id::TOPIC_ALIAS, 0, 1, 0, 1, b'a', 0]),
        Some(V5)
    )));
    // Will delay is a will property, not a CONNECT property...
    let will_delay_in_connect = connect_body(
        5,
        0x02,
        &[5, id::WILL_DELAY_INTERVAL, 0, 0, 0, 9, 0, 1, b'c'],
    );
    assert!(is_malformed(dec(
        &frame(0x10, &will_delay_in_connect),
        None
    )));
    // ...and fine among the will properties, where session expiry is not.
    let will = |will_props: &[u8]| {
        let payload = [
            &[0, 0, 1, b'c', will_props.len() as u8][..],
            will_props,
            &[0, 1, b'w', 0, 0],
        ]
        .concat();
        dec(&frame(0x10, &connect_body(5, 0x06, &payload)), None)
    };
    let Ok(Some(Packet::Connect(c))) = will(&[id::WILL_DELAY_INTERVAL, 0, 0, 0, 9]) else {
        panic!("will delay refused")
    };
    assert_eq!(
        c.will.map(|w| w.properties.will_delay_interval),
        Some(Some(9))
    );
    assert!(is_malformed(will(&[
        id::SESSION_EXPIRY_INTERVAL,
        0,
        0,
        0,
        9
    ])));
    // Reason string is not allowed in PUBLISH, but is in PUBACK.
    assert!(is_malformed(dec(
        &v5_publish_with(&[id::REASON_STRING, 0, 0]),
        Some(V5)
    )));
    assert!(dec(&[0x40, 7, 0, 1, 0x10, 3, id::REASON_STRING, 0, 0], Some(V5)).is_ok());
}

#[test]
fn duplicate_properties_are_protocol_errors() {
    let twice = [
        id::MESSAGE_EXPIRY_INTERVAL,
        0,
        0,
        0,
        1,
        id::MESSAGE_EXPIRY_INTERVAL,
        0,
        0,
        0,
        2,
    ];
    assert!(is_protocol_error(dec(&v5_publish_with(&twice), Some(V5))));
    let two_ids_in_subscribe = frame(
        0x82,
        &[
            0,
            1,
            4,
            id::SUBSCRIPTION_IDENTIFIER,
            1,
            id::SUBSCRIPTION_IDENTIFIER,
            2,
            0,
            1,
            b'a',
            0,
        ],
    );
    assert!(is_protocol_error(dec(&two_ids_in_subscribe, Some(V5))));
    // PUBLISH may carry several subscription identifiers, and user properties repeat
    // anywhere, in wire order.
    let repeats = [
        id::SUBSCRIPTION_IDENTIFIER,
        2,
        id::USER_PROPERTY,
        0,
        1,
        b'k',
        0,
        1,
        b'2',
        id::SUBSCRIPTION_IDENTIFIER,
        1,
        id::USER_PROPERTY,
        0,
        1,
        b'k',
        0,
        1,
        b'1',
        id::USER_PROPERTY,
        0,
        1,
        b'a',
        0,
        0,
    ];
    let Packet::Publish(p) = ok(&v5_publish_with(&repeats), Some(V5)) else {
        panic!("not a PUBLISH")
    };
    assert_eq!(p.properties.subscription_identifiers, vec![2, 1]);
    assert_eq!(
        p.properties.user_properties,
        vec![
            ("k".into(), "2".into()),
            ("k".into(), "1".into()),
            ("a".into(), String::new())
        ]
    );
}

#[test]
fn property_value_rules() {
    let publish = |props: &[u8]| dec(&v5_publish_with(props), Some(V5));
    assert!(is_protocol_error(publish(&[
        id::SUBSCRIPTION_IDENTIFIER,
        0
    ])));
    assert_eq!(
        publish(&[id::TOPIC_ALIAS, 0, 0]),
        Err(DecodeError::TopicAliasInvalid)
    );
    assert!(is_protocol_error(publish(&[
        id::PAYLOAD_FORMAT_INDICATOR,
        2
    ])));
    assert!(publish(&[id::PAYLOAD_FORMAT_INDICATOR, 1]).is_ok());

    let sub_id_zero = frame(
        0x82,
        &[0, 1, 2, id::SUBSCRIPTION_IDENTIFIER, 0, 0, 1, b'a', 0],
    );
    assert!(is_protocol_error(dec(&sub_id_zero, Some(V5))));

    let connect = |props: &[u8]| {
        let rest = [&[props.len() as u8][..], props, &[0, 1, b'c']].concat();
        dec(&frame(0x10, &connect_body(5, 0x02, &rest)), None)
    };
    assert!(is_protocol_error(connect(&[id::RECEIVE_MAXIMUM, 0, 0])));
    assert!(is_protocol_error(connect(&[
        id::MAXIMUM_PACKET_SIZE,
        0,
        0,
        0,
        0
    ])));
    assert!(is_protocol_error(connect(&[
        id::REQUEST_PROBLEM_INFORMATION,
        2
    ])));
    assert!(is_protocol_error(connect(&[
        id::REQUEST_RESPONSE_INFORMATION,
        2
    ])));
    assert!(
        connect(&[
            id::RECEIVE_MAXIMUM,
            0,
            1,
            id::MAXIMUM_PACKET_SIZE,
            0,
            0,
            1,
            0
        ])
        .is_ok()
    );

    let connack = |props: &[u8]| {
        let body = [&[0, 0, props.len() as u8][..], props].concat();
        dec(&frame(0x20, &body), Some(V5))
    };
    assert!(is_protocol_error(connack(&[id::MAXIMUM_QOS, 2])));
    assert!(is_protocol_error(connack(&[id::RETAIN_AVAILABLE, 2])));
    assert!(connack(&[id::MAXIMUM_QOS, 1]).is_ok());
}

// ---- reason codes ----

#[test]
fn unknown_reason_code_is_malformed() {
    assert!(is_malformed(dec(&[0x40, 3, 0, 1, 0x03], Some(V5))));
    assert!(is_malformed(dec(&[0xE0, 1, 0x03], Some(V5))));
    assert!(is_malformed(dec(&[0xF0, 1, 0x03], Some(V5))));
    assert!(is_malformed(dec(&[0x20, 3, 0, 0x03, 0], Some(V5))));
    assert!(is_malformed(dec(&[0x90, 4, 0, 1, 0, 0x03], Some(V5))));
    assert!(is_malformed(dec(&[0xB0, 4, 0, 1, 0, 0x03], Some(V5))));
}

#[test]
fn v5_short_forms_decode() {
    assert_eq!(
        ok(&[0x40, 2, 0, 1], Some(V5)),
        Packet::PubAck(PubResponse::new(1))
    );
    assert_eq!(
        ok(&[0x50, 3, 0, 1, 0x10], Some(V5)),
        Packet::PubRec(PubResponse {
            packet_id: 1,
            reason: ReasonCode::NoMatchingSubscribers,
            properties: Properties::default(),
        })
    );
    assert_eq!(
        ok(&[0xE0, 0], Some(V5)),
        Packet::Disconnect(Disconnect::default())
    );
    assert_eq!(
        ok(&[0xE0, 1, 0x04], Some(V5)),
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::DisconnectWithWillMessage,
            properties: Properties::default(),
        })
    );
    assert_eq!(ok(&[0xF0, 0], Some(V5)), Packet::Auth(Auth::default()));
}

#[test]
fn encoder_uses_short_forms() {
    assert_eq!(
        enc(&Packet::PubAck(PubResponse::new(1)), V5),
        [0x40, 2, 0, 1]
    );
    let rel = Packet::PubRel(PubResponse {
        packet_id: 1,
        reason: ReasonCode::PacketIdentifierNotFound,
        properties: Properties::default(),
    });
    assert_eq!(enc(&rel, V5), [0x62, 3, 0, 1, 0x92]);
    let with_props = Packet::PubComp(PubResponse {
        packet_id: 1,
        reason: ReasonCode::Success,
        properties: Properties {
            reason_string: Some("r".into()),
            ..Default::default()
        },
    });
    assert_eq!(
        enc(&with_props, V5),
        [0x70, 8, 0, 1, 0, 4, id::REASON_STRING, 0, 1, b'r']
    );
    assert_eq!(
        enc(&Packet::Disconnect(Disconnect::default()), V5),
        [0xE0, 0]
    );
    let d = Packet::Disconnect(Disconnect {
        reason: ReasonCode::ServerShuttingDown,
        properties: Properties::default(),
    });
    assert_eq!(enc(&d, V5), [0xE0, 1, 0x8B]);
    assert_eq!(enc(&Packet::Auth(Auth::default()), V5), [0xF0, 0]);
    let a = Packet::Auth(Auth {
        reason: ReasonCode::ContinueAuthentication,
        properties: Properties::default(),
    });
    assert_eq!(enc(&a, V5), [0xF0, 2, 0x18, 0]);
}

#[test]
fn encoder_drops_properties_a_packet_does_not_allow() {
    let ack = Packet::PubAck(PubResponse {
        packet_id: 1,
        reason: ReasonCode::Success,
        properties: Properties {
            topic_alias: Some(3),
            ..Default::default()
        },
    });
    assert_eq!(enc(&ack, V5), [0x40, 2, 0, 1]);
}

// ---- 3.x specifics ----

#[test]
fn v3_connack_return_codes() {
    let connack = |code| {
        Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: Properties::default(),
        })
    };
    assert_eq!(enc(&connack(ReasonCode::Banned), V3_1_1), [0x20, 2, 0, 5]);
    assert_eq!(
        enc(&connack(ReasonCode::ServerBusy), V3_1_1),
        [0x20, 2, 0, 3]
    );
    assert_eq!(
        ok(&[0x20, 2, 0, 5], Some(V3_1_1)),
        connack(ReasonCode::NotAuthorized)
    );
    assert!(is_malformed(dec(&[0x20, 2, 0, 6], Some(V3_1_1))));
}

#[test]
fn v3_suback_maps_failures_to_0x80() {
    let ack = Packet::SubAck(SubAck {
        packet_id: 3,
        reasons: vec![
            ReasonCode::GrantedQoS2,
            ReasonCode::NotAuthorized,
            ReasonCode::QuotaExceeded,
        ],
        properties: Properties::default(),
    });
    assert_eq!(enc(&ack, V3_1_1), [0x90, 5, 0, 3, 2, 0x80, 0x80]);
}

#[test]
fn v3_unsuback_has_no_payload() {
    let ack = Packet::UnsubAck(UnsubAck {
        packet_id: 3,
        reasons: vec![ReasonCode::Success],
        properties: Properties::default(),
    });
    assert_eq!(enc(&ack, V3_1_1), [0xB0, 2, 0, 3]);
    assert_eq!(
        ok(&[0xB0, 2, 0, 3], Some(V3_1_1)),
        Packet::UnsubAck(UnsubAck {
            packet_id: 3,
            ..Default::default()
        })
    );
}

#[test]
fn v3_ignores_properties_and_ack_reasons() {
    let props = Properties {
        message_expiry_interval: Some(5),
        user_properties: vec![("a".into(), "b".into())],
        ..Default::default()
    };
    let publish = Packet::Publish(Publish {
        topic: "t".into(),
        properties: props.clone(),
        payload: Bytes::from_static(b"x"),
        ..Default::default()
    });
    assert_eq!(enc(&publish, V3_1_1), [0x30, 4, 0, 1, b't', b'x']);
    let ack = Packet::PubAck(PubResponse {
        packet_id: 1,
        reason: ReasonCode::QuotaExceeded,
        properties: props,
    });
    assert_eq!(enc(&ack, V3_1_1), [0x40, 2, 0, 1]);
}

// ---- encoder limits ----

#[test]
fn encode_auth_in_v3_is_not_in_version() {
    let mut buf = BytesMut::new();
    for v in [V3_1, V3_1_1] {
        assert_eq!(
            encode(&Packet::Auth(Auth::default()), v, &mut buf),
            Err(EncodeError::NotInVersion)
        );
    }
    assert!(buf.is_empty());
}

#[test]
fn encode_refuses_long_fields_and_huge_packets_without_writing() {
    let mut buf = BytesMut::from(&b"keep"[..]);
    let long = "x".repeat(65_536);
    let publish = Packet::Publish(Publish {
        topic: long.clone(),
        ..Default::default()
    });
    assert_eq!(
        encode(&publish, V5, &mut buf),
        Err(EncodeError::FieldTooLong)
    );
    let ok_len = Packet::Publish(Publish {
        topic: "x".repeat(65_535),
        ..Default::default()
    });
    let unsub = Packet::Unsubscribe(Unsubscribe {
        packet_id: 1,
        filters: vec![long],
        properties: Properties::default(),
    });
    assert_eq!(
        encode(&unsub, V3_1_1, &mut buf),
        Err(EncodeError::FieldTooLong)
    );
    let sub_id = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![("a".into(), SubscriptionOptions::default())],
        properties: Properties {
            subscription_identifiers: vec![268_435_456],
            ..Default::default()
        },
    });
    assert_eq!(
        encode(&sub_id, V5, &mut buf),
        Err(EncodeError::FieldTooLong)
    );
    // alloc_zeroed: the 256 MiB are never touched.
    let huge = Packet::Publish(Publish {
        topic: "t".into(),
        payload: Bytes::from(vec![0u8; 268_435_456]),
        ..Default::default()
    });
    assert_eq!(
        encode(&huge, V3_1_1, &mut buf),
        Err(EncodeError::PacketTooLarge)
    );
    assert_eq!(&buf[..], b"keep");
    assert!(encode(&ok_len, V5, &mut buf).is_ok());
}

// ---- PUBLISH ----

/// A 5.0 PUBLISH QoS 1 retained with properties, byte for byte.
#[test]
fn v5_publish_known_bytes() {
    let bytes: &[u8] = &[
        0x33,
        33, // PUBLISH QoS 1 retain, remaining length
        0,
        3,
        b'a',
        b'/',
        b'b', // topic
        0,
        10, // packet id
        20, // property length
        id::PAYLOAD_FORMAT_INDICATOR,
        1,
        id::MESSAGE_EXPIRY_INTERVAL,
        0,
        0,
        0,
        60,
        id::SUBSCRIPTION_IDENTIFIER,
        0xAC,
        0x02, // 300
        id::TOPIC_ALIAS,
        0,
        5,
        id::USER_PROPERTY,
        0,
        1,
        b'k',
        0,
        1,
        b'v',
        b'h',
        b'e',
        b'l',
        b'l',
        b'o',
    ];
    let expected = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: "a/b".into(),
        packet_id: 10,
        properties: Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            subscription_identifiers: vec![300],
            topic_alias: Some(5),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        },
        payload: Bytes::from_static(b"hello"),
    });
    assert_eq!(ok(bytes, Some(V5)), expected);
    assert_eq!(enc(&expected, V5), bytes);
}

#[test]
fn publish_payload_shares_the_read_buffer() {
    let bytes = frame(0x30, &[0, 1, b't', 1, 2, 3, 4]);
    let mut buf = BytesMut::from(&bytes[..]);
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, Some(V3_1_1), MAX) else {
        panic!("not a PUBLISH")
    };
    let at = p.payload.as_ptr() as usize;
    assert!(at >= start && at + p.payload.len() <= end);
    assert_eq!(&p.payload[..], &[1, 2, 3, 4]);
}

#[test]
fn publish_view_fields_replace_the_message_properties() {
    let props = Properties {
        subscription_identifiers: vec![1],
        message_expiry_interval: Some(100),
        topic_alias: Some(3),
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    let payload = Bytes::from_static(b"m");
    let view = PublishView {
        dup: true,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: "a",
        packet_id: 42,
        properties: &props,
        subscription_identifiers: &[7, 8],
        message_expiry_interval: Some(5),
        topic_alias: None,
        payload: &payload,
    };
    let mut buf = BytesMut::new();
    encode_publish(&view, V5, &mut buf).expect("encodable");
    assert_eq!(buf.len(), publish_len(&view, V5));
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, Some(V5), MAX) else {
        panic!("not a PUBLISH")
    };
    assert!(p.dup);
    assert_eq!(p.packet_id, 42);
    assert_eq!(p.properties.subscription_identifiers, vec![7, 8]);
    assert_eq!(p.properties.message_expiry_interval, Some(5));
    assert_eq!(p.properties.topic_alias, None);
    assert_eq!(p.properties.content_type.as_deref(), Some("text/plain"));
}

#[test]
fn qos0_publish_is_written_without_dup() {
    let p = Packet::Publish(Publish {
        dup: true,
        topic: "t".into(),
        ..Default::default()
    });
    assert_eq!(enc(&p, V3_1_1), [0x30, 3, 0, 1, b't']);
}

#[test]
fn back_to_back_packets_decode_in_order() {
    let mut buf = BytesMut::new();
    buf.put_slice(&enc(&Packet::PingReq, V5));
    buf.put_slice(&enc(&Packet::PubAck(PubResponse::new(5)), V5));
    buf.put_slice(&[0x30]); // start of a third
    assert_eq!(decode(&mut buf, Some(V5), MAX), Ok(Some(Packet::PingReq)));
    assert_eq!(
        decode(&mut buf, Some(V5), MAX),
        Ok(Some(Packet::PubAck(PubResponse::new(5))))
    );
    assert_eq!(decode(&mut buf, Some(V5), MAX), Ok(None));
    assert_eq!(&buf[..], &[0x30]);
}

#[test]
fn decode_error_reason_codes() {
    assert_eq!(
        DecodeError::MalformedPacket("x").reason_code(),
        ReasonCode::MalformedPacket
    );
    assert_eq!(
        DecodeError::TopicAliasInvalid.reason_code(),
        ReasonCode::TopicAliasInvalid
    );
}

/// Writes the fuzzer's seed corpus (`core/fuzz/corpus/decode/`). Run on purpose with
/// `cargo test -p roost-core -- --ignored write_fuzz_seed_corpus`.
#[test]
#[ignore]
fn write_fuzz_seed_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let props = Properties {
        user_properties: vec![("k".into(), "v".into())],
        reason_string: Some("why".into()),
        ..Default::default()
    };
    let connect = |protocol| {
        Packet::Connect(Box::new(Connect {
            protocol,
            clean_start: true,
            keep_alive: 30,
            client_id: "seed".into(),
            will: Some(LastWill {
                topic: "w".into(),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties {
                    will_delay_interval: Some(5),
                    content_type: Some("t".into()),
                    ..Default::default()
                },
            }),
            username: Some("u".into()),
            password: Some(Bytes::from_static(b"p")),
            properties: Properties {
                session_expiry_interval: Some(60),
                receive_maximum: Some(10),
                ..Default::default()
            },
        }))
    };
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: true,
        topic: "a/b".into(),
        packet_id: 7,
        properties: Properties {
            message_expiry_interval: Some(9),
            subscription_identifiers: vec![1, 300],
            topic_alias: Some(2),
            correlation_data: Some(Bytes::from_static(b"c")),
            ..Default::default()
        },
        payload: Bytes::from_static(b"payload"),
    });
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![
            ("a/+".into(), SubscriptionOptions::default()),
            (
                "$share/g/#".into(),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::SendIfNew,
                },
            ),
        ],
        properties: Properties {
            subscription_identifiers: vec![4],
            ..Default::default()
        },
    });
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("connect-v311", enc(&connect(V3_1_1), V3_1_1)),
        ("connect-v5", enc(&connect(V5), V5)),
        ("connect-v31", enc(&connect(V3_1), V3_1)),
        ("publish-v5", enc(&publish, V5)),
        ("publish-v311", enc(&publish, V3_1_1)),
        ("subscribe-v5", enc(&subscribe, V5)),
        (
            "puback-v5",
            enc(
                &Packet::PubAck(PubResponse {
                    packet_id: 3,
                    reason: ReasonCode::NoMatchingSubscribers,
                    properties: props.clone(),
                }),
                V5,
            ),
        ),
        (
            "disconnect-v5",
            enc(
                &Packet::Disconnect(Disconnect {
                    reason: ReasonCode::ServerMoved,
                    properties: Properties {
                        server_reference: Some("elsewhere".into()),
                        ..Default::default()
                    },
                }),
                V5,
            ),
        ),
        (
            "connect-then-pings",
            [
                enc(&connect(V5), V5),
                enc(&Packet::PingReq, V5),
                enc(&Packet::PingResp, V5),
            ]
            .concat(),
        ),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    }
}
