//! [`QoS`], the quality of service of a message or subscription.
//!
//! It stands alone because both the packets and the reason codes speak of it (a SUBACK
//! grants a QoS), and the packets already depend on the reason codes; it is re-exported
//! from [`crate::packet`], where it has always been named.

/// Quality of service of a message or the maximum of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    /// QoS 0: fire and forget.
    #[default]
    AtMostOnce = 0,
    /// QoS 1: PUBACK flow; duplicates possible.
    AtLeastOnce = 1,
    /// QoS 2: PUBREC/PUBREL/PUBCOMP flow; exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a wire value, `None` for 3 or above.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}
