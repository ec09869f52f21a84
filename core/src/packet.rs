//! The MQTT control packets as plain data.
//!
//! One model serves all three protocol versions: fields that only MQTT 5.0 carries
//! (properties, reason codes on acks) are simply left empty/default for 3.x, and the
//! codec ignores them when it writes a 3.x packet.

use bytes::Bytes;

use crate::properties::Properties;
use crate::reason::ReasonCode;

pub use crate::qos::QoS;

/// The protocol level a client announced in its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum ProtocolVersion {
    /// MQTT 3.1, protocol name `MQIsdp`, level 3.
    V3_1,
    /// MQTT 3.1.1, protocol name `MQTT`, level 4.
    #[default]
    V3_1_1,
    /// MQTT 5.0, protocol name `MQTT`, level 5.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V3_1 => 3,
            ProtocolVersion::V3_1_1 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// True for MQTT 5.0, the only version with properties and reason codes on acks.
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
}

/// A packet identifier. Never zero on the wire; QoS 0 publishes carry none (0 here).
pub type PacketId = u16;

/// The kind of a control packet: the high nibble of the fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    /// CONNECT (1)
    Connect = 1,
    /// CONNACK (2)
    ConnAck = 2,
    /// PUBLISH (3)
    Publish = 3,
    /// PUBACK (4)
    PubAck = 4,
    /// PUBREC (5)
    PubRec = 5,
    /// PUBREL (6)
    PubRel = 6,
    /// PUBCOMP (7)
    PubComp = 7,
    /// SUBSCRIBE (8)
    Subscribe = 8,
    /// SUBACK (9)
    SubAck = 9,
    /// UNSUBSCRIBE (10)
    Unsubscribe = 10,
    /// UNSUBACK (11)
    UnsubAck = 11,
    /// PINGREQ (12)
    PingReq = 12,
    /// PINGRESP (13)
    PingResp = 13,
    /// DISCONNECT (14)
    Disconnect = 14,
    /// AUTH (15, MQTT 5.0 only)
    Auth = 15,
}

/// Any MQTT control packet.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    /// Client asks for a session.
    Connect(Box<Connect>),
    /// Server answers CONNECT.
    ConnAck(ConnAck),
    /// An application message.
    Publish(Publish),
    /// QoS 1 acknowledgement.
    PubAck(PubResponse),
    /// QoS 2, step 1: publish received.
    PubRec(PubResponse),
    /// QoS 2, step 2: publish release.
    PubRel(PubResponse),
    /// QoS 2, step 3: publish complete.
    PubComp(PubResponse),
    /// Subscription request.
    Subscribe(Subscribe),
    /// Subscription acknowledgement.
    SubAck(SubAck),
    /// Unsubscription request.
    Unsubscribe(Unsubscribe),
    /// Unsubscription acknowledgement.
    UnsubAck(UnsubAck),
    /// Keep-alive ping.
    PingReq,
    /// Keep-alive answer.
    PingResp,
    /// Orderly end of a connection (either direction in 5.0).
    Disconnect(Disconnect),
    /// Enhanced authentication exchange (5.0).
    Auth(Auth),
}

impl Packet {
    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }
}

/// CONNECT: the first packet of every connection.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Connect {
    /// Protocol version announced by the client.
    pub protocol: ProtocolVersion,
    /// Clean session (3.x) / clean start (5.0).
    pub clean_start: bool,
    /// Keep-alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// Client identifier; may be empty (the server then assigns one or refuses).
    pub client_id: String,
    /// The will message, published when the connection ends abnormally.
    pub will: Option<LastWill>,
    /// User name, if the flag was set.
    pub username: Option<String>,
    /// Password, if the flag was set (binary data).
    pub password: Option<Bytes>,
    /// CONNECT properties (5.0).
    pub properties: Properties,
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LastWill {
    /// Topic to publish the will to.
    pub topic: String,
    /// Will payload.
    pub payload: Bytes,
    /// QoS of the will publish.
    pub qos: QoS,
    /// Whether the will is published retained.
    pub retain: bool,
    /// Will properties (5.0): will delay, expiry, content type, user properties, ...
    pub properties: Properties,
}

/// CONNACK: the server's answer to CONNECT.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConnAck {
    /// Whether the server resumed a stored session.
    pub session_present: bool,
    /// Result. For 3.x the codec maps this to the 3.x return code.
    pub code: ReasonCode,
    /// CONNACK properties (5.0).
    pub properties: Properties,
}

/// PUBLISH: an application message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Publish {
    /// Redelivery flag.
    pub dup: bool,
    /// Delivery QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Topic name; empty in 5.0 when a topic alias stands in for it.
    pub topic: String,
    /// Packet identifier; 0 for QoS 0.
    pub packet_id: PacketId,
    /// PUBLISH properties (5.0).
    pub properties: Properties,
    /// Application payload.
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PubResponse {
    /// The packet identifier being acknowledged.
    pub packet_id: PacketId,
    /// Reason code (5.0); `Success` in 3.x.
    pub reason: ReasonCode,
    /// Reason string and user properties (5.0).
    pub properties: Properties,
}

impl PubResponse {
    /// A successful response for `packet_id` with no properties.
    pub fn new(packet_id: PacketId) -> Self {
        PubResponse {
            packet_id,
            ..Default::default()
        }
    }
}

/// Retain handling option of a subscription (5.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// 1: send retained messages only if the subscription did not exist.
    SendIfNew = 1,
    /// 2: never send retained messages for this subscription.
    DoNotSend = 2,
}

/// The options byte of one SUBSCRIBE entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS the subscriber accepts.
    pub qos: QoS,
    /// 5.0: do not send messages published by this same client.
    pub no_local: bool,
    /// 5.0: keep the RETAIN flag as published instead of clearing it.
    pub retain_as_published: bool,
    /// 5.0: when to send retained messages.
    pub retain_handling: RetainHandling,
}

/// SUBSCRIBE: one or more topic filters with options.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Subscribe {
    /// Packet identifier.
    pub packet_id: PacketId,
    /// Filters in request order.
    pub filters: Vec<(String, SubscriptionOptions)>,
    /// SUBSCRIBE properties (5.0): subscription identifier, user properties.
    pub properties: Properties,
}

/// SUBACK: one reason code per requested filter, in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: PacketId,
    /// Granted QoS (0x00..0x02) or failure (>= 0x80) per filter.
    pub reasons: Vec<ReasonCode>,
    /// Reason string and user properties (5.0).
    pub properties: Properties,
}

/// UNSUBSCRIBE: topic filters to remove.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Unsubscribe {
    /// Packet identifier.
    pub packet_id: PacketId,
    /// Filters in request order.
    pub filters: Vec<String>,
    /// User properties (5.0).
    pub properties: Properties,
}

/// UNSUBACK: in 5.0 one reason code per filter; in 3.x no payload.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UnsubAck {
    /// Packet identifier of the UNSUBSCRIBE.
    pub packet_id: PacketId,
    /// One reason code per filter (5.0 only; empty for 3.x).
    pub reasons: Vec<ReasonCode>,
    /// Reason string and user properties (5.0).
    pub properties: Properties,
}

/// DISCONNECT: in 3.x only client to server, without content.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Disconnect {
    /// Reason code (5.0).
    pub reason: ReasonCode,
    /// Session expiry, reason string, server reference, user properties (5.0).
    pub properties: Properties,
}

/// AUTH (5.0): enhanced authentication step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Auth {
    /// 0x00 success, 0x18 continue authentication, 0x19 re-authenticate.
    pub reason: ReasonCode,
    /// Authentication method and data, reason string, user properties.
    pub properties: Properties,
}
