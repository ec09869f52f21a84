//! The encoder's two passes over a packet body.
//!
//! Every packet body is described once, against the [`Sink`] trait, and that single
//! description is run twice: through a [`Counter`] (sizes, field-limit checks) and then
//! through a [`Writer`] into a buffer already reserved to the exact size. One
//! description is what keeps `encoded_len` equal to the bytes `encode` writes.
//!
//! [`PropsOut`], the 5.0 property block, lives here with the trait rather than with the
//! property tables in `props`: it is the one part of a body that re-enters the sink (the
//! counting pass sizes each block once and the writing pass reuses that size), so the
//! two are written against each other and stand or fall together.

use bytes::{BufMut, Bytes, BytesMut};

use super::props::{PropSet, bit};
use super::wire::{MAX_FIELD, MAX_VARINT, put_varint, varint_len};
use crate::properties::{Properties, id};

/// The shape of a packet body, as seen by the two passes of the encoder.
pub(super) trait Sink {
    fn u8(&mut self, v: u8);
    fn u16(&mut self, v: u16);
    fn u32(&mut self, v: u32);
    fn varint(&mut self, v: usize);
    /// Binary Data: two-byte length prefix and the bytes.
    fn binary(&mut self, b: &[u8]);
    /// Bytes as they are, without a length prefix (the PUBLISH payload).
    fn raw(&mut self, b: &[u8]);
    /// UTF-8 Encoded String: same layout as binary data.
    fn string(&mut self, s: &str) {
        self.binary(s.as_bytes());
    }
    /// A 5.0 property block: property length, then the properties.
    fn properties(&mut self, p: &PropsOut<'_>);
}

/// Property blocks one packet can hold: CONNECT has two, its own and the will's.
const PROPERTY_BLOCKS: usize = 2;

/// First encoder pass: adds up sizes and notes fields that cannot be encoded.
#[derive(Default)]
pub(super) struct Counter {
    /// Bytes the body takes.
    pub(super) len: usize,
    /// A string/binary field over 65,535 bytes, or a varint value over the maximum.
    pub(super) field_too_long: bool,
    /// Lengths of the property blocks in body order, so the writing pass need not
    /// size them again.
    property_lens: [usize; PROPERTY_BLOCKS],
    blocks: usize,
}

impl Counter {
    /// The writing pass for the body this counter has sized.
    pub(super) fn writer<'a>(&self, buf: &'a mut BytesMut) -> Writer<'a> {
        Writer {
            buf,
            property_lens: self.property_lens,
            next: 0,
        }
    }
}

impl Sink for Counter {
    fn u8(&mut self, _: u8) {
        self.len += 1;
    }
    fn u16(&mut self, _: u16) {
        self.len += 2;
    }
    fn u32(&mut self, _: u32) {
        self.len += 4;
    }
    fn varint(&mut self, v: usize) {
        self.field_too_long |= v > MAX_VARINT;
        self.len += varint_len(v);
    }
    fn binary(&mut self, b: &[u8]) {
        self.field_too_long |= b.len() > MAX_FIELD;
        self.len += 2 + b.len();
    }
    fn raw(&mut self, b: &[u8]) {
        self.len += b.len();
    }
    fn properties(&mut self, p: &PropsOut<'_>) {
        let mut inner = Counter::default();
        p.content(&mut inner);
        if let Some(slot) = self.property_lens.get_mut(self.blocks) {
            *slot = inner.len;
        }
        self.blocks += 1;
        self.varint(inner.len);
        self.len += inner.len;
        self.field_too_long |= inner.field_too_long;
    }
}

/// Second encoder pass: writes into a buffer reserved by the caller to the exact size,
/// after the [`Counter`] pass found every field encodable.
pub(super) struct Writer<'a> {
    buf: &'a mut BytesMut,
    property_lens: [usize; PROPERTY_BLOCKS],
    next: usize,
}

impl Sink for Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.buf.put_u8(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.put_u16(v);
    }
    fn u32(&mut self, v: u32) {
        self.buf.put_u32(v);
    }
    fn varint(&mut self, v: usize) {
        put_varint(self.buf, v);
    }
    fn binary(&mut self, b: &[u8]) {
        // The Counter pass rejected anything longer, so the cast cannot truncate.
        self.buf.put_u16(b.len() as u16);
        self.buf.put_slice(b);
    }
    fn raw(&mut self, b: &[u8]) {
        self.buf.put_slice(b);
    }
    fn properties(&mut self, p: &PropsOut<'_>) {
        let len = match self.property_lens.get(self.next) {
            Some(&len) => len,
            None => p.content_len(),
        };
        self.next += 1;
        put_varint(self.buf, len);
        p.content(self);
    }
}

/// Properties to write: a [`Properties`] restricted to one packet's set, with the three
/// per-subscriber PUBLISH fields taken from outside it (see `PublishView`).
pub(super) struct PropsOut<'a> {
    pub(super) props: &'a Properties,
    pub(super) subscription_identifiers: &'a [u32],
    pub(super) message_expiry_interval: Option<u32>,
    pub(super) topic_alias: Option<u16>,
    pub(super) allowed: u64,
}

impl<'a> PropsOut<'a> {
    /// The properties of `props` that `set` allows, as they are.
    pub(super) fn of(props: &'a Properties, set: PropSet) -> Self {
        PropsOut {
            props,
            subscription_identifiers: &props.subscription_identifiers,
            message_expiry_interval: props.message_expiry_interval,
            topic_alias: props.topic_alias,
            allowed: set.allowed(),
        }
    }

    /// Size of the properties, without their length prefix.
    pub(super) fn content_len(&self) -> usize {
        let mut c = Counter::default();
        self.content(&mut c);
        c.len
    }

    /// Property length prefix and the properties.
    pub(super) fn write<S: Sink>(&self, s: &mut S) {
        s.properties(self);
    }

    /// The properties without their length prefix.
    pub(super) fn content<S: Sink>(&self, s: &mut S) {
        let p = self.props;
        let on = |ident: u8| self.allowed & bit(ident) != 0;
        fn byte<S: Sink>(s: &mut S, ident: u8, v: Option<u8>) {
            if let Some(v) = v {
                s.u8(ident);
                s.u8(v);
            }
        }
        fn two<S: Sink>(s: &mut S, ident: u8, v: Option<u16>) {
            if let Some(v) = v {
                s.u8(ident);
                s.u16(v);
            }
        }
        fn four<S: Sink>(s: &mut S, ident: u8, v: Option<u32>) {
            if let Some(v) = v {
                s.u8(ident);
                s.u32(v);
            }
        }
        fn string<S: Sink>(s: &mut S, ident: u8, v: &Option<String>) {
            if let Some(v) = v {
                s.u8(ident);
                s.string(v);
            }
        }
        fn binary<S: Sink>(s: &mut S, ident: u8, v: &Option<Bytes>) {
            if let Some(v) = v {
                s.u8(ident);
                s.binary(v);
            }
        }

        if on(id::PAYLOAD_FORMAT_INDICATOR) {
            byte(s, id::PAYLOAD_FORMAT_INDICATOR, p.payload_format_indicator);
        }
        if on(id::MESSAGE_EXPIRY_INTERVAL) {
            four(s, id::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        }
        if on(id::CONTENT_TYPE) {
            string(s, id::CONTENT_TYPE, &p.content_type);
        }
        if on(id::RESPONSE_TOPIC) {
            string(s, id::RESPONSE_TOPIC, &p.response_topic);
        }
        if on(id::CORRELATION_DATA) {
            binary(s, id::CORRELATION_DATA, &p.correlation_data);
        }
        if on(id::SUBSCRIPTION_IDENTIFIER) {
            for &v in self.subscription_identifiers {
                s.u8(id::SUBSCRIPTION_IDENTIFIER);
                s.varint(v as usize);
            }
        }
        if on(id::SESSION_EXPIRY_INTERVAL) {
            four(s, id::SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
        }
        if on(id::ASSIGNED_CLIENT_IDENTIFIER) {
            string(
                s,
                id::ASSIGNED_CLIENT_IDENTIFIER,
                &p.assigned_client_identifier,
            );
        }
        if on(id::SERVER_KEEP_ALIVE) {
            two(s, id::SERVER_KEEP_ALIVE, p.server_keep_alive);
        }
        if on(id::AUTHENTICATION_METHOD) {
            string(s, id::AUTHENTICATION_METHOD, &p.authentication_method);
        }
        if on(id::AUTHENTICATION_DATA) {
            binary(s, id::AUTHENTICATION_DATA, &p.authentication_data);
        }
        if on(id::REQUEST_PROBLEM_INFORMATION) {
            byte(
                s,
                id::REQUEST_PROBLEM_INFORMATION,
                p.request_problem_information,
            );
        }
        if on(id::WILL_DELAY_INTERVAL) {
            four(s, id::WILL_DELAY_INTERVAL, p.will_delay_interval);
        }
        if on(id::REQUEST_RESPONSE_INFORMATION) {
            byte(
                s,
                id::REQUEST_RESPONSE_INFORMATION,
                p.request_response_information,
            );
        }
        if on(id::RESPONSE_INFORMATION) {
            string(s, id::RESPONSE_INFORMATION, &p.response_information);
        }
        if on(id::SERVER_REFERENCE) {
            string(s, id::SERVER_REFERENCE, &p.server_reference);
        }
        if on(id::REASON_STRING) {
            string(s, id::REASON_STRING, &p.reason_string);
        }
        if on(id::RECEIVE_MAXIMUM) {
            two(s, id::RECEIVE_MAXIMUM, p.receive_maximum);
        }
        if on(id::TOPIC_ALIAS_MAXIMUM) {
            two(s, id::TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
        }
        if on(id::TOPIC_ALIAS) {
            two(s, id::TOPIC_ALIAS, self.topic_alias);
        }
        if on(id::MAXIMUM_QOS) {
            byte(s, id::MAXIMUM_QOS, p.maximum_qos);
        }
        if on(id::RETAIN_AVAILABLE) {
            byte(s, id::RETAIN_AVAILABLE, p.retain_available);
        }
        if on(id::USER_PROPERTY) {
            for (name, value) in &p.user_properties {
                s.u8(id::USER_PROPERTY);
                s.string(name);
                s.string(value);
            }
        }
        if on(id::MAXIMUM_PACKET_SIZE) {
            four(s, id::MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
        }
        if on(id::WILDCARD_SUBSCRIPTION_AVAILABLE) {
            byte(
                s,
                id::WILDCARD_SUBSCRIPTION_AVAILABLE,
                p.wildcard_subscription_available,
            );
        }
        if on(id::SUBSCRIPTION_IDENTIFIER_AVAILABLE) {
            byte(
                s,
                id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
                p.subscription_identifier_available,
            );
        }
        if on(id::SHARED_SUBSCRIPTION_AVAILABLE) {
            byte(
                s,
                id::SHARED_SUBSCRIPTION_AVAILABLE,
                p.shared_subscription_available,
            );
        }
    }
}
