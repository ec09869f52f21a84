//! Property tests: every packet type round-trips in every version, sizes are exact,
//! and no input makes the decoder panic or depend on how the bytes were chunked.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;
use proptest::strategy::Union;

use super::props::PropSet;
use super::*;
use crate::packet::ProtocolVersion::{V3_1, V3_1_1, V5};
use crate::packet::*;
use crate::properties::{Properties, id};
use crate::reason::ReasonCode;

/// Any string without U+0000 (the only one the spec forbids outright).
fn text() -> impl Strategy<Value = String> {
    "[^\\x00]{0,12}"
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..16).prop_map(Bytes::from)
}

fn flag() -> impl Strategy<Value = u8> {
    0u8..=1
}

/// Every property set to a valid value or absent; [`restrict`] then keeps a packet's set.
fn any_properties() -> impl Strategy<Value = Properties> {
    let message = (
        of(flag()),
        of(any::<u32>()),
        of(text()),
        of(text()),
        of(binary()),
        vec(1u32..=268_435_455, 0..3),
        of(1u16..),
    );
    let session = (
        of(any::<u32>()),
        of(text()),
        of(any::<u16>()),
        of(text()),
        of(binary()),
        of(flag()),
        of(any::<u32>()),
        of(flag()),
        of(text()),
        of(text()),
    );
    let limits = (
        of(text()),
        of(1u16..),
        of(any::<u16>()),
        of(flag()),
        of(flag()),
        vec((text(), text()), 0..3),
        of(1u32..),
        of(flag()),
        of(flag()),
        of(flag()),
    );
    (message, session, limits).prop_map(|(m, s, l)| Properties {
        payload_format_indicator: m.0,
        message_expiry_interval: m.1,
        content_type: m.2,
        response_topic: m.3,
        correlation_data: m.4,
        subscription_identifiers: m.5,
        topic_alias: m.6,
        session_expiry_interval: s.0,
        assigned_client_identifier: s.1,
        server_keep_alive: s.2,
        authentication_method: s.3,
        authentication_data: s.4,
        request_problem_information: s.5,
        will_delay_interval: s.6,
        request_response_information: s.7,
        response_information: s.8,
        server_reference: s.9,
        reason_string: l.0,
        receive_maximum: l.1,
        topic_alias_maximum: l.2,
        maximum_qos: l.3,
        retain_available: l.4,
        user_properties: l.5,
        maximum_packet_size: l.6,
        wildcard_subscription_available: l.7,
        subscription_identifier_available: l.8,
        shared_subscription_available: l.9,
    })
}

/// Clears every property `set` does not allow (and keeps one SUBSCRIBE identifier).
fn restrict(mut p: Properties, set: PropSet) -> Properties {
    let allowed = set.allowed();
    macro_rules! keep {
        ($($field:ident: $ident:expr),* $(,)?) => {
            $(if allowed & (1u64 << $ident) == 0 {
                p.$field = Default::default();
            })*
        };
    }
    keep!(
        payload_format_indicator: id::PAYLOAD_FORMAT_INDICATOR,
        message_expiry_interval: id::MESSAGE_EXPIRY_INTERVAL,
        content_type: id::CONTENT_TYPE,
        response_topic: id::RESPONSE_TOPIC,
        correlation_data: id::CORRELATION_DATA,
        subscription_identifiers: id::SUBSCRIPTION_IDENTIFIER,
        session_expiry_interval: id::SESSION_EXPIRY_INTERVAL,
        assigned_client_identifier: id::ASSIGNED_CLIENT_IDENTIFIER,
        server_keep_alive: id::SERVER_KEEP_ALIVE,
        authentication_method: id::AUTHENTICATION_METHOD,
        authentication_data: id::AUTHENTICATION_DATA,
        request_problem_information: id::REQUEST_PROBLEM_INFORMATION,
        will_delay_interval: id::WILL_DELAY_INTERVAL,
        request_response_information: id::REQUEST_RESPONSE_INFORMATION,
        response_information: id::RESPONSE_INFORMATION,
        server_reference: id::SERVER_REFERENCE,
        reason_string: id::REASON_STRING,
        receive_maximum: id::RECEIVE_MAXIMUM,
        topic_alias_maximum: id::TOPIC_ALIAS_MAXIMUM,
        topic_alias: id::TOPIC_ALIAS,
        maximum_qos: id::MAXIMUM_QOS,
        retain_available: id::RETAIN_AVAILABLE,
        user_properties: id::USER_PROPERTY,
        maximum_packet_size: id::MAXIMUM_PACKET_SIZE,
        wildcard_subscription_available: id::WILDCARD_SUBSCRIPTION_AVAILABLE,
        subscription_identifier_available: id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        shared_subscription_available: id::SHARED_SUBSCRIPTION_AVAILABLE,
    );
    if set == PropSet::Subscribe {
        p.subscription_identifiers.truncate(1);
    }
    p
}

fn props(set: PropSet) -> impl Strategy<Value = Properties> {
    any_properties().prop_map(move |p| restrict(p, set))
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn reason() -> impl Strategy<Value = ReasonCode> {
    any::<u8>().prop_filter_map("not a reason code", ReasonCode::from_u8)
}

fn packet_id() -> impl Strategy<Value = PacketId> {
    1u16..
}

fn options() -> impl Strategy<Value = SubscriptionOptions> {
    let rh = prop_oneof![
        Just(RetainHandling::SendAtSubscribe),
        Just(RetainHandling::SendIfNew),
        Just(RetainHandling::DoNotSend)
    ];
    (qos(), any::<bool>(), any::<bool>(), rh).prop_map(|(qos, nl, rap, rh)| SubscriptionOptions {
        qos,
        no_local: nl,
        retain_as_published: rap,
        retain_handling: rh,
    })
}

fn connect(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let will = (text(), binary(), qos(), any::<bool>(), props(PropSet::Will)).prop_map(
        |(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties,
        },
    );
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        of(will),
        of(text()),
        of(binary()),
        props(PropSet::Connect),
    )
        .prop_map(
            move |(
                clean_start,
                keep_alive,
                client_id,
                will,
                mut username,
                password,
                properties,
            )| {
                // 3.x forbids a password without a user name.
                if !v.is_v5() && password.is_some() && username.is_none() {
                    username = Some(String::new());
                }
                Packet::Connect(Box::new(Connect {
                    protocol: v,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        )
}

fn publish() -> impl Strategy<Value = Publish> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        text(),
        packet_id(),
        props(PropSet::Publish),
        binary(),
    )
        .prop_map(
            |(qos, dup, retain, topic, packet_id, properties, payload)| {
                let qos0 = qos == QoS::AtMostOnce;
                Publish {
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic,
                    packet_id: if qos0 { 0 } else { packet_id },
                    properties,
                    payload,
                }
            },
        )
}

fn pub_response() -> impl Strategy<Value = PubResponse> {
    (packet_id(), reason(), props(PropSet::PubResponse)).prop_map(
        |(packet_id, reason, properties)| PubResponse {
            packet_id,
            reason,
            properties,
        },
    )
}

/// Any packet of any type that exists in `v`.
fn any_packet(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let mut arms: Vec<BoxedStrategy<Packet>> = vec![
        connect(v).boxed(),
        (any::<bool>(), reason(), props(PropSet::ConnAck))
            .prop_map(|(session_present, code, properties)| {
                Packet::ConnAck(ConnAck {
                    session_present,
                    code,
                    properties,
                })
            })
            .boxed(),
        publish().prop_map(Packet::Publish).boxed(),
        pub_response().prop_map(Packet::PubAck).boxed(),
        pub_response().prop_map(Packet::PubRec).boxed(),
        pub_response().prop_map(Packet::PubRel).boxed(),
        pub_response().prop_map(Packet::PubComp).boxed(),
        (
            packet_id(),
            vec((text(), options()), 1..4),
            props(PropSet::Subscribe),
        )
            .prop_map(|(packet_id, filters, properties)| {
                Packet::Subscribe(Subscribe {
                    packet_id,
                    filters,
                    properties,
                })
            })
            .boxed(),
        (packet_id(), vec(reason(), 0..4), props(PropSet::SubAck))
            .prop_map(|(packet_id, reasons, properties)| {
                Packet::SubAck(SubAck {
                    packet_id,
                    reasons,
                    properties,
                })
            })
            .boxed(),
        (packet_id(), vec(text(), 1..4), props(PropSet::Unsubscribe))
            .prop_map(|(packet_id, filters, properties)| {
                Packet::Unsubscribe(Unsubscribe {
                    packet_id,
                    filters,
                    properties,
                })
            })
            .boxed(),
        (packet_id(), vec(reason(), 0..4), props(PropSet::UnsubAck))
            .prop_map(|(packet_id, reasons, properties)| {
                Packet::UnsubAck(UnsubAck {
                    packet_id,
                    reasons,
                    properties,
                })
            })
            .boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        (reason(), props(PropSet::Disconnect))
            .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
            .boxed(),
    ];
    if v.is_v5() {
        arms.push(
            (reason(), props(PropSet::Auth))
                .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
                .boxed(),
        );
    }
    Union::new(arms)
}

/// What decoding `p` encoded for `v` must give: 3.x carries no properties and no ack
/// reason codes, and maps CONNACK/SUBACK codes onto its few return codes.
fn expected(p: &Packet, v: ProtocolVersion) -> Packet {
    let mut p = p.clone();
    if let Packet::Connect(c) = &mut p {
        c.protocol = v;
    }
    if v.is_v5() {
        return p;
    }
    let none = Properties::default();
    match &mut p {
        Packet::Connect(c) => {
            c.properties = none;
            if let Some(w) = &mut c.will {
                w.properties = Properties::default();
            }
        }
        Packet::ConnAck(c) => {
            c.properties = none;
            c.code = ReasonCode::from_v3_connack(c.code.to_v3_connack()).unwrap_or_default();
        }
        Packet::Publish(p) => p.properties = none,
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            *r = PubResponse::new(r.packet_id);
        }
        Packet::Subscribe(s) => {
            s.properties = none;
            for (_, o) in &mut s.filters {
                *o = SubscriptionOptions {
                    qos: o.qos,
                    ..Default::default()
                };
            }
        }
        Packet::SubAck(s) => {
            s.properties = none;
            for r in &mut s.reasons {
                if !matches!(
                    r,
                    ReasonCode::Success | ReasonCode::GrantedQoS1 | ReasonCode::GrantedQoS2
                ) {
                    *r = ReasonCode::UnspecifiedError;
                }
            }
        }
        Packet::Unsubscribe(u) => u.properties = none,
        Packet::UnsubAck(u) => {
            u.properties = none;
            u.reasons.clear();
        }
        Packet::Disconnect(d) => *d = Disconnect::default(),
        Packet::PingReq | Packet::PingResp | Packet::Auth(_) => {}
    }
    p
}

fn round_trip(p: &Packet, v: ProtocolVersion) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    prop_assert_eq!(encode(p, v, &mut buf), Ok(()));
    prop_assert_eq!(buf.len(), encoded_len(p, v));
    // A CONNECT is what a connection starts with: decode it as such.
    let version = match p {
        Packet::Connect(_) => None,
        _ => Some(v),
    };
    prop_assert_eq!(
        decode(&mut buf, version, usize::MAX),
        Ok(Some(expected(p, v)))
    );
    prop_assert!(buf.is_empty());
    Ok(())
}

fn any_version() -> impl Strategy<Value = Option<ProtocolVersion>> {
    prop_oneof![
        Just(None),
        Just(Some(V3_1)),
        Just(Some(V3_1_1)),
        Just(Some(V5))
    ]
}

/// Decodes whole and byte by byte; both must agree, and neither may panic.
fn same_result_incrementally(
    bytes: &[u8],
    v: Option<ProtocolVersion>,
    max: usize,
) -> Result<(), TestCaseError> {
    let mut whole = BytesMut::from(bytes);
    let expected = decode(&mut whole, v, max);
    let mut fed = BytesMut::new();
    let mut got = Ok(None);
    for &b in bytes {
        fed.put_u8(b);
        got = decode(&mut fed, v, max);
        if got != Ok(None) {
            break;
        }
    }
    prop_assert_eq!(got, expected);
    Ok(())
}

proptest! {
    // Fifteen packet types share the cases: run enough that each gets a fair number.
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn round_trip_v3_1_1(p in any_packet(V3_1_1)) {
        round_trip(&p, V3_1_1)?;
    }

    #[test]
    fn round_trip_v5(p in any_packet(V5)) {
        round_trip(&p, V5)?;
    }

    /// 3.1 differs from 3.1.1 on the wire only in CONNECT, but check every type.
    #[test]
    fn round_trip_v3_1(p in any_packet(V3_1)) {
        round_trip(&p, V3_1)?;
    }

    #[test]
    fn round_trip_v3_1_connect(p in connect(V3_1)) {
        round_trip(&p, V3_1)?;
    }

    /// The per-subscriber fields of a view win over the message's own properties.
    #[test]
    fn publish_view_len_and_round_trip(
        p in publish(),
        ids in vec(1u32..=268_435_455, 0..4),
        expiry in of(any::<u32>()),
        alias in of(1u16..),
        v in prop_oneof![Just(V3_1_1), Just(V5)],
    ) {
        let view = PublishView {
            subscription_identifiers: &ids,
            message_expiry_interval: expiry,
            topic_alias: alias,
            ..PublishView::of(&p)
        };
        let mut buf = BytesMut::new();
        prop_assert_eq!(encode_publish(&view, v, &mut buf), Ok(()));
        prop_assert_eq!(buf.len(), publish_len(&view, v));
        let mut want = p.clone();
        if v.is_v5() {
            want.properties.subscription_identifiers = ids.clone();
            want.properties.message_expiry_interval = expiry;
            want.properties.topic_alias = alias;
        } else {
            want.properties = Properties::default();
        }
        prop_assert_eq!(decode(&mut buf, Some(v), usize::MAX), Ok(Some(Packet::Publish(want))));
    }

    #[test]
    fn decode_never_panics(
        bytes in vec(any::<u8>(), 0..300),
        v in any_version(),
        max in prop_oneof![Just(usize::MAX), 0usize..400],
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode(&mut buf, v, max) {}
    }

    /// Random bytes rarely get past the fixed header; flipping bytes of valid packets
    /// reaches the body parsers.
    #[test]
    fn decode_never_panics_on_mutated_packets(
        p in any_packet(V5),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        v in any_version(),
    ) {
        let mut bytes = BytesMut::new();
        prop_assert_eq!(encode(&p, V5, &mut bytes), Ok(()));
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        same_result_incrementally(&bytes, v, usize::MAX)?;
    }

    #[test]
    fn incremental_decode_matches_whole_on_valid_packets(
        p in any_packet(V5),
        tail in vec(any::<u8>(), 0..4),
        max in prop_oneof![Just(usize::MAX), 0usize..200],
    ) {
        let mut bytes = BytesMut::new();
        prop_assert_eq!(encode(&p, V5, &mut bytes), Ok(()));
        bytes.put_slice(&tail);
        let v = if matches!(p, Packet::Connect(_)) { None } else { Some(V5) };
        same_result_incrementally(&bytes, v, max)?;
    }

    #[test]
    fn incremental_decode_matches_whole_on_any_bytes(
        bytes in vec(any::<u8>(), 0..64),
        v in any_version(),
        max in prop_oneof![Just(usize::MAX), 0usize..100],
    ) {
        same_result_incrementally(&bytes, v, max)?;
    }
}
