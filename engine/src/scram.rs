//! SCRAM-SHA-256 (RFC 5802, RFC 7677), server side, for MQTT 5 enhanced authentication.
//!
//! The exchange, carried in the Authentication Data of MQTT packets:
//! client-first-message (CONNECT, or AUTH 0x19 to re-authenticate) -> server-first-message
//! (AUTH 0x18) -> client-final-message (AUTH 0x18) -> server-final-message (CONNACK, or
//! AUTH 0x00 after a re-authentication).
//!
//! Invariants:
//! - The server holds a [`Verifier`] per user (salt, iteration count, StoredKey, ServerKey),
//!   never the password. Checking a proof costs two HMACs and a hash: the slow PBKDF2 runs
//!   on the client (and once in `roost passwd`).
//! - A user without a verifier (unknown, or listed without one) is given a salt and an
//!   iteration count like any other, derived from a per-process secret so they are stable,
//!   and fails at the proof: the exchange does not reveal which usernames exist.
//! - No channel binding: `-PLUS` is not offered, so a client that requires it (`p=`) is
//!   refused, and `y` (the client could bind but thinks we cannot) is accepted, as RFC 5802
//!   allows a server without channel binding to do.
//! - An authorization identity (`a=`) must be absent or equal to the username.
//! - Bad input yields a [`ScramError`], never a panic.
//!
//! SASLprep (RFC 4013) is applied to the password when a verifier is made: exactly for
//! ASCII passwords; for others the mapping and prohibition tables are applied but not NFKC
//! normalization, the bidirectional check or the unassigned-code-point check (see
//! [`saslprep`]). Usernames are compared as sent, without SASLprep.

use std::borrow::Cow;
use std::num::NonZeroU32;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hmac, pbkdf2};
use roost_core::ReasonCode;

/// The Authentication Method name a client puts in CONNECT.
pub const METHOD: &str = "SCRAM-SHA-256";
/// Iteration count of new verifiers: RFC 7677's minimum, which small devices can afford.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// RFC 7677: the iteration count SHOULD be at least 4096.
pub const MIN_ITERATIONS: u32 = 4096;
/// Above this a client (an ESP32, say) would take minutes per login: a typo, not a policy.
pub const MAX_ITERATIONS: u32 = 10_000_000;

const KEY_LEN: usize = 32;
const SALT_LEN: usize = 16;
/// Random bytes in the server's half of the nonce (base64-encoded on the wire).
const NONCE_LEN: usize = 18;

/// Why a SCRAM exchange failed. Each maps to the CONNACK (or DISCONNECT) reason code it
/// produces and to RFC 5802's `server-error-value`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The message does not follow RFC 5802's grammar.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client requires channel binding (`p=`), which roost does not offer.
    #[error("SCRAM channel binding is not supported")]
    ChannelBinding,
    /// The client sent a mandatory extension (`m=`).
    #[error("SCRAM mandatory extensions are not supported")]
    Extensions,
    /// The authorization identity names someone other than the username.
    #[error("the SCRAM authorization identity must be empty or equal the username")]
    Authzid,
    /// The client-final-message's nonce is not the one of this exchange.
    #[error("the SCRAM nonce does not continue this exchange")]
    Nonce,
    /// The client-final-message's channel binding does not repeat the GS2 header.
    #[error("the SCRAM channel binding data does not match the client-first-message")]
    ChannelBindingMismatch,
    /// Wrong password, unknown user, or a user without a SCRAM verifier.
    #[error("bad username or password")]
    InvalidProof,
    /// The password holds a character SASLprep prohibits (a control character, say).
    #[error("the password contains a character SASLprep prohibits")]
    Prohibited,
    /// The system random number generator failed.
    #[error("cannot draw random bytes")]
    Random,
}

impl ScramError {
    /// RFC 5802's `server-error-value` for this failure (sent as `e=<value>`).
    pub fn server_error(&self) -> &'static str {
        match self {
            ScramError::Malformed(_) => "invalid-encoding",
            ScramError::ChannelBinding => "channel-binding-not-supported",
            ScramError::Extensions => "extensions-not-supported",
            ScramError::Authzid | ScramError::Random | ScramError::Prohibited => "other-error",
            ScramError::Nonce => "other-error",
            ScramError::ChannelBindingMismatch => "channel-bindings-dont-match",
            ScramError::InvalidProof => "invalid-proof",
        }
    }

    /// The MQTT reason code: a wrong proof is a bad password (0x86, CONNACK only), the
    /// rest is not authorized (0x87); a broken RNG is the server's fault.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            ScramError::InvalidProof => ReasonCode::BadUserNameOrPassword,
            ScramError::Random => ReasonCode::UnspecifiedError,
            _ => ReasonCode::NotAuthorized,
        }
    }
}

/// Where an exchange finds the verifiers. Implemented by the broker's auth state, so a
/// password file reloaded on SIGHUP applies to the next exchange.
pub trait Credentials: Send + Sync + std::fmt::Debug {
    /// The SCRAM verifier of `username`, if it has one.
    fn verifier(&self, username: &str) -> Option<Verifier>;
    /// A secret of this server process, from which stand-in salts for users without a
    /// verifier are derived.
    fn stand_in_secret(&self) -> &[u8];
}

/// What the server stores to check a SCRAM-SHA-256 proof: enough to verify a client and
/// to prove itself to it, not enough to log in as the user (that needs the ClientKey).
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Derives the verifier of `password` (SASLprepped first) with `salt` and `iterations`.
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> Result<Verifier, ScramError> {
        let prepared = saslprep(password)?;
        let rounds = NonZeroU32::new(iterations).ok_or(ScramError::Malformed("0 iterations"))?;
        let mut salted = [0u8; KEY_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            salt,
            prepared.as_bytes(),
            &mut salted,
        );
        let client_key = hmac_sha256(&salted, b"Client Key");
        Ok(Verifier {
            salt: salt.to_vec(),
            iterations,
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted, b"Server Key"),
        })
    }

    /// A verifier of `password` with a fresh random salt.
    pub fn generate(password: &str, iterations: u32) -> Result<Verifier, ScramError> {
        let mut salt = [0u8; SALT_LEN];
        SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| ScramError::Random)?;
        Verifier::derive(password, &salt, iterations)
    }

    /// The iteration count.
    #[cfg(test)]
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// Reads the RFC 5803 text form `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
    /// (base64 fields), the form PostgreSQL also stores.
    pub fn parse(text: &str) -> Result<Verifier, &'static str> {
        let rest = text
            .strip_prefix(METHOD)
            .and_then(|r| r.strip_prefix('$'))
            .ok_or("a SCRAM verifier starts with SCRAM-SHA-256$")?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or("expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or("expected <iterations>:<salt> in the SCRAM verifier")?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| "the SCRAM iteration count is not a number")?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err("the SCRAM iteration count must be between 4096 and 10000000");
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| "the SCRAM salt is not base64")?;
        if salt.is_empty() {
            return Err("the SCRAM salt is empty");
        }
        let (stored, server) = keys
            .split_once(':')
            .ok_or("expected <StoredKey>:<ServerKey> in the SCRAM verifier")?;
        let key = |b64: &str| -> Result<[u8; KEY_LEN], &'static str> {
            B64.decode(b64)
                .ok()
                .and_then(|k| <[u8; KEY_LEN]>::try_from(k).ok())
                .ok_or("a SCRAM key is not 32 bytes of base64")
        };
        Ok(Verifier {
            salt,
            iterations,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// The RFC 5803 text form [`Verifier::parse`] reads.
    pub fn render(&self) -> String {
        format!(
            "{METHOD}${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }

    /// A verifier nobody can pass, with a salt that is stable for `username` (so a
    /// repeated probe cannot tell a stand-in from a real user).
    fn stand_in(secret: &[u8], username: &str) -> Verifier {
        let tagged = |tag: &[u8]| {
            let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
            let mut ctx = hmac::Context::with_key(&key);
            ctx.update(tag);
            ctx.update(username.as_bytes());
            let mut out = [0u8; KEY_LEN];
            out.copy_from_slice(ctx.sign().as_ref());
            out
        };
        Verifier {
            salt: tagged(b"salt\0")[..SALT_LEN].to_vec(),
            iterations: DEFAULT_ITERATIONS,
            stored_key: tagged(b"stored\0"),
            server_key: tagged(b"server\0"),
        }
    }
}

// ----- the exchange as MQTT 5 carries it (section 4.12) -----
//
// The client-first-message comes in CONNECT (or AUTH 0x19, re-authentication) with the
// Authentication Method; the server answers AUTH 0x18 with its server-first-message;
// the client's AUTH 0x18 carries the client-final-message; the server ends with its
// server-final-message, in CONNACK (or AUTH 0x00). The connection task (at CONNECT) and
// the protocol state machine (re-authentication) both run it through these two steps.

/// An AUTH packet of this method with `reason` and `data`.
pub fn auth_packet(reason: ReasonCode, data: Vec<u8>) -> roost_core::Auth {
    let mut auth = roost_core::Auth {
        reason,
        ..roost_core::Auth::default()
    };
    auth.properties.authentication_method = Some(METHOD.to_owned());
    auth.properties.authentication_data = Some(data.into());
    auth
}

/// The first step: the exchange to continue and the AUTH 0x18 that carries the
/// server-first-message, for a `client_first` message.
pub fn begin(
    client_first: &[u8],
    credentials: &dyn Credentials,
) -> Result<(Exchange, roost_core::Auth), ScramError> {
    let (exchange, server_first) = Exchange::start(client_first, credentials)?;
    Ok((
        exchange,
        auth_packet(ReasonCode::ContinueAuthentication, server_first),
    ))
}

/// The client-final-message of an AUTH that continues an exchange (reason 0x18, this
/// method); otherwise why the AUTH breaks the sequence.
pub fn client_final(auth: &roost_core::Auth) -> Result<&[u8], &'static str> {
    if auth.properties.authentication_method.as_deref() != Some(METHOD) {
        return Err("AUTH with another authentication method");
    }
    if auth.reason != ReasonCode::ContinueAuthentication {
        return Err("AUTH reason code out of sequence");
    }
    Ok(auth
        .properties
        .authentication_data
        .as_deref()
        .unwrap_or(&[]))
}

/// A SCRAM exchange after the server-first-message, waiting for the client-final-message.
#[derive(Debug)]
pub struct Exchange {
    username: String,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    verifier: Verifier,
    /// False for a stand-in verifier: the proof fails whatever it is.
    known: bool,
}

/// A completed exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Success {
    /// Who the client proved to be.
    pub username: String,
    /// The server-final-message (`v=<ServerSignature>`), for the client to check.
    pub server_final: Vec<u8>,
}

impl Exchange {
    /// Reads a client-first-message and answers it: the exchange to continue and the
    /// server-first-message to send.
    pub fn start(
        client_first: &[u8],
        credentials: &dyn Credentials,
    ) -> Result<(Exchange, Vec<u8>), ScramError> {
        let mut raw = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| ScramError::Random)?;
        Exchange::start_with_nonce(client_first, credentials, &B64.encode(raw))
    }

    fn start_with_nonce(
        client_first: &[u8],
        credentials: &dyn Credentials,
        server_nonce: &str,
    ) -> Result<(Exchange, Vec<u8>), ScramError> {
        let text = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::Malformed("client-first-message is not UTF-8"))?;
        let (flag, rest) = text
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad GS2 channel binding flag")),
        }
        let (authz, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        let authzid = match authz {
            "" => None,
            a => Some(decode_saslname(a.strip_prefix("a=").ok_or(
                ScramError::Malformed("bad GS2 authorization identity"),
            )?)?),
        };
        let gs2_header = &text[..flag.len() + authz.len() + 2];
        let mut attrs = bare.split(',');
        let user = attrs.next().unwrap_or_default();
        if user.starts_with("m=") {
            return Err(ScramError::Extensions);
        }
        let username = decode_saslname(
            user.strip_prefix("n=")
                .ok_or(ScramError::Malformed("expected n=<username>"))?,
        )?;
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("expected r=<nonce>"))?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ScramError::Malformed(
                "the nonce must be printable ASCII without ','",
            ));
        }
        // Optional extensions follow; none is understood, and only `m=` must be.
        if attrs.any(|a| !is_attribute(a)) {
            return Err(ScramError::Malformed("bad attribute"));
        }
        if authzid.is_some_and(|a| a != username) {
            return Err(ScramError::Authzid);
        }
        let (verifier, known) = match credentials.verifier(&username) {
            Some(v) => (v, true),
            None => (
                Verifier::stand_in(credentials.stand_in_secret(), &username),
                false,
            ),
        };
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let reply = server_first.clone().into_bytes();
        Ok((
            Exchange {
                username,
                gs2_header: gs2_header.to_owned(),
                client_first_bare: bare.to_owned(),
                server_first,
                nonce,
                verifier,
                known,
            },
            reply,
        ))
    }

    /// The username the client gave in its first message.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Reads the client-final-message and checks the proof.
    pub fn finish(self, client_final: &[u8]) -> Result<Success, ScramError> {
        let text = std::str::from_utf8(client_final)
            .map_err(|_| ScramError::Malformed("client-final-message is not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("expected p=<proof> last"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("expected c=<channel binding>"))?;
        let binding = B64
            .decode(binding)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        if binding != self.gs2_header.as_bytes() {
            return Err(ScramError::ChannelBindingMismatch);
        }
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("expected r=<nonce>"))?;
        if attrs.any(|a| !is_attribute(a)) {
            return Err(ScramError::Malformed("bad attribute"));
        }
        if nonce != self.nonce {
            return Err(ScramError::Nonce);
        }
        let proof = B64
            .decode(proof)
            .ok()
            .and_then(|p| <[u8; KEY_LEN]>::try_from(p).ok())
            .ok_or(ScramError::Malformed("the proof is not 32 bytes of base64"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac_sha256(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        let matches = constant_time_eq(&sha256(&client_key), &self.verifier.stored_key);
        if !(matches && self.known) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac_sha256(&self.verifier.server_key, auth_message.as_bytes());
        Ok(Success {
            username: self.username,
            server_final: format!("v={}", B64.encode(server_signature)).into_bytes(),
        })
    }
}

/// `saslname` of RFC 5802: `=2C` is ',' and `=3D` is '='; any other '=' is an error.
fn decode_saslname(s: &str) -> Result<String, ScramError> {
    if s.is_empty() {
        return Err(ScramError::Malformed("empty username"));
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad '=' escape in a username")),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    if out.contains('\0') {
        return Err(ScramError::Malformed("NUL in a username"));
    }
    Ok(out)
}

/// `attr-val` of RFC 5802: one ASCII letter, '=', a value.
fn is_attribute(a: &str) -> bool {
    let b = a.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b'='
}

/// SASLprep (RFC 4013) of a password, as far as roost implements it: exact for ASCII
/// (printable characters pass, control characters are refused); for other text, non-ASCII
/// spaces become ' ', characters "commonly mapped to nothing" are removed and prohibited
/// characters are refused, but NFKC normalization, the bidirectional check and the
/// unassigned-code-point check are not done. A password that NFKC would change (full-width
/// letters, ligatures, decomposed accents) therefore has to reach the client byte for byte
/// as it was given to `roost passwd`.
pub fn saslprep(s: &str) -> Result<Cow<'_, str>, ScramError> {
    if s.is_ascii() {
        if s.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(ScramError::Prohibited);
        }
        return Ok(Cow::Borrowed(s));
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if is_non_ascii_space(c) {
            out.push(' ');
        } else if maps_to_nothing(c) {
        } else if is_prohibited(c) {
            return Err(ScramError::Prohibited);
        } else {
            out.push(c);
        }
    }
    Ok(Cow::Owned(out))
}

/// RFC 3454 table C.1.2.
fn is_non_ascii_space(c: char) -> bool {
    matches!(
        c,
        '\u{a0}' | '\u{1680}' | '\u{2000}'..='\u{200b}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
    )
}

/// RFC 3454 table B.1.
fn maps_to_nothing(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{34f}'
            | '\u{1806}'
            | '\u{180b}'..='\u{180d}'
            | '\u{200b}'..='\u{200d}'
            | '\u{2060}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{feff}'
    )
}

/// RFC 4013 section 2.3: RFC 3454 tables C.2.1 to C.9 (C.5, surrogates, cannot occur in
/// a Rust string).
fn is_prohibited(c: char) -> bool {
    let n = u32::from(c);
    // C.4: the last two code points of every plane are non-characters.
    if n & 0xfffe == 0xfffe {
        return true;
    }
    matches!(
        c,
        // C.2.1, C.2.2: control characters.
        '\u{0}'..='\u{1f}'
            | '\u{7f}'..='\u{9f}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{180e}'
            | '\u{200c}'
            | '\u{200d}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{2060}'..='\u{2063}'
            | '\u{206a}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffc}'
            | '\u{1d173}'..='\u{1d17a}'
            // C.3: private use.
            | '\u{e000}'..='\u{f8ff}'
            | '\u{f0000}'..='\u{ffffd}'
            | '\u{100000}'..='\u{10fffd}'
            // C.4: non-characters.
            | '\u{fdd0}'..='\u{fdef}'
            // C.6: inappropriate for plain text.
            | '\u{fffd}'
            // C.7: ideographic description characters.
            | '\u{2ff0}'..='\u{2ffb}'
            // C.8: display properties, deprecated.
            | '\u{340}'
            | '\u{341}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            // C.9: tagging characters.
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
    )
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; KEY_LEN] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

fn sha256(data: &[u8]) -> [u8; KEY_LEN] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compares without an early exit, so timing does not tell how much of a key matched.
fn constant_time_eq(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Verifiers in a map, for tests.
    #[derive(Debug, Default)]
    pub(crate) struct Users(pub HashMap<String, Verifier>);

    impl Credentials for Users {
        fn verifier(&self, username: &str) -> Option<Verifier> {
            self.0.get(username).cloned()
        }
        fn stand_in_secret(&self) -> &[u8] {
            b"test secret"
        }
    }

    pub(crate) fn users(list: &[(&str, &str)]) -> Users {
        Users(
            list.iter()
                .map(|(u, p)| {
                    (
                        (*u).to_owned(),
                        Verifier::generate(p, DEFAULT_ITERATIONS).expect("verifier"),
                    )
                })
                .collect(),
        )
    }

    /// The client's side of the computation, written out from RFC 5802 section 3, so the
    /// server is checked against an independent client. Returns the client-final-message
    /// and the server signature the client expects.
    pub(crate) fn client_final(
        password: &str,
        gs2_header: &str,
        client_first_bare: &str,
        server_first: &str,
    ) -> (String, String) {
        let mut nonce = "";
        let mut salt = Vec::new();
        let mut iterations = 0;
        for attr in server_first.split(',') {
            match attr.split_at(2) {
                ("r=", v) => nonce = v,
                ("s=", v) => salt = B64.decode(v).expect("salt"),
                ("i=", v) => iterations = v.parse().expect("i"),
                _ => {}
            }
        }
        let v = Verifier::derive(password, &salt, iterations).expect("derive");
        let prepared = saslprep(password).expect("prep");
        let mut salted = [0u8; KEY_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::new(iterations).expect("i > 0"),
            &salt,
            prepared.as_bytes(),
            &mut salted,
        );
        let client_key = hmac_sha256(&salted, b"Client Key");
        let without_proof = format!("c={},r={nonce}", B64.encode(gs2_header));
        let auth = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac_sha256(&sha256(&client_key), auth.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_sig = hmac_sha256(&v.server_key, auth.as_bytes());
        (
            format!("{without_proof},p={}", B64.encode(proof)),
            format!("v={}", B64.encode(server_sig)),
        )
    }

    fn run(creds: &Users, user: &str, password: &str) -> Result<(Success, String), ScramError> {
        let bare = format!("n={user},r=fyko+d2lbbFgONRv9qkxdawL");
        let (ex, first) = Exchange::start(format!("n,,{bare}").as_bytes(), creds)?;
        let first = String::from_utf8(first).expect("utf8");
        let (fin, expected) = client_final(password, "n,,", &bare, &first);
        ex.finish(fin.as_bytes()).map(|s| (s, expected))
    }

    #[test]
    fn rfc7677_test_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let v = Verifier::derive("pencil", &salt, 4096).expect("derive");
        let creds = Users([("user".to_owned(), v)].into_iter().collect());
        let (ex, first) = Exchange::start_with_nonce(
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            &creds,
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        )
        .expect("first");
        assert_eq!(
            String::from_utf8(first).expect("utf8"),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        assert_eq!(ex.username(), "user");
        let done = ex
            .finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .expect("the RFC's proof is accepted");
        assert_eq!(done.username, "user");
        assert_eq!(
            String::from_utf8(done.server_final).expect("utf8"),
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn rfc7677_proof_with_one_bit_flipped_is_refused() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let v = Verifier::derive("pencil", &salt, 4096).expect("derive");
        let creds = Users([("user".to_owned(), v)].into_iter().collect());
        let (ex, _) = Exchange::start_with_nonce(
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            &creds,
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        )
        .expect("first");
        // Last proof character 'Q' -> 'U': one bit of the final byte differs.
        let e = ex
            .finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVU=")
            .expect_err("wrong proof");
        assert_eq!(e, ScramError::InvalidProof);
        assert_eq!(e.reason_code(), ReasonCode::BadUserNameOrPassword);
        assert_eq!(e.server_error(), "invalid-proof");
    }

    #[test]
    fn good_and_wrong_passwords() {
        let creds = users(&[("alice", "wonderland"), ("a,b=c", "x")]);
        let (done, expected) = run(&creds, "alice", "wonderland").expect("good password");
        assert_eq!(done.username, "alice");
        assert_eq!(done.server_final, expected.into_bytes());
        assert_eq!(
            run(&creds, "alice", "Wonderland").expect_err("wrong"),
            ScramError::InvalidProof
        );
        // Escaped ',' and '=' in the username.
        let (done, _) = run(&creds, "a=2Cb=3Dc", "x").expect("escaped name");
        assert_eq!(done.username, "a,b=c");
    }

    #[test]
    fn unknown_users_look_like_known_ones_and_fail() {
        let creds = users(&[("alice", "wonderland")]);
        let salt_of = |user: &str| {
            let msg = format!("n,,n={user},r=abc");
            let (_, first) = Exchange::start(msg.as_bytes(), &creds).expect("first");
            let first = String::from_utf8(first).expect("utf8");
            first.split(',').skip(1).collect::<Vec<_>>().join(",")
        };
        let mallory = salt_of("mallory");
        assert_eq!(mallory, salt_of("mallory"), "a stand-in salt is stable");
        assert_ne!(mallory, salt_of("trudy"));
        assert!(mallory.ends_with(",i=4096"), "{mallory}");
        // Even the right computation with the stand-in salt fails.
        assert_eq!(
            run(&creds, "mallory", "anything").expect_err("unknown"),
            ScramError::InvalidProof
        );
    }

    #[test]
    fn bad_client_first_messages_are_refused() {
        let creds = users(&[("alice", "wonderland")]);
        for (msg, want) in [
            (
                &b"p=tls-unique,,n=alice,r=abc"[..],
                ScramError::ChannelBinding,
            ),
            (b"n,,m=ext,n=alice,r=abc", ScramError::Extensions),
            (b"n,a=bob,n=alice,r=abc", ScramError::Authzid),
            (b"", ScramError::Malformed("no GS2 header")),
            (b"n,,", ScramError::Malformed("expected n=<username>")),
            (
                b"x,,n=alice,r=abc",
                ScramError::Malformed("bad GS2 channel binding flag"),
            ),
            (b"n,,n=,r=abc", ScramError::Malformed("empty username")),
            (
                b"n,,n=al=ice,r=abc",
                ScramError::Malformed("bad '=' escape in a username"),
            ),
            (
                b"n,,n=alice=2",
                ScramError::Malformed("bad '=' escape in a username"),
            ),
            (b"n,,n=alice", ScramError::Malformed("expected r=<nonce>")),
            (
                b"n,,n=alice,r=",
                ScramError::Malformed("the nonce must be printable ASCII without ','"),
            ),
            (
                b"n,,n=alice,r=a b",
                ScramError::Malformed("the nonce must be printable ASCII without ','"),
            ),
            (
                b"n,,n=alice,r=abc,,",
                ScramError::Malformed("bad attribute"),
            ),
            (
                b"n,,n=\xff,r=abc",
                ScramError::Malformed("client-first-message is not UTF-8"),
            ),
        ] {
            let got = Exchange::start(msg, &creds)
                .map(|_| ())
                .expect_err("refused");
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(msg));
        }
        // Accepted forms: 'y' flag, a matching authzid, an optional extension.
        for msg in [
            &b"y,,n=alice,r=abc"[..],
            b"n,a=alice,n=alice,r=abc",
            b"n,,n=alice,r=abc,x=whatever",
        ] {
            assert!(Exchange::start(msg, &creds).is_ok(), "{msg:?}");
        }
    }

    #[test]
    fn bad_client_final_messages_are_refused() {
        let creds = users(&[("alice", "wonderland")]);
        let bare = "n=alice,r=abc";
        let start = || {
            Exchange::start_with_nonce(format!("n,,{bare}").as_bytes(), &creds, "SRV")
                .expect("first")
        };
        let (ex, first) = start();
        let first = String::from_utf8(first).expect("utf8");
        let nonce = first.split(',').next().expect("r").to_owned();
        let (good, _) = client_final("wonderland", "n,,", bare, &first);
        let proof = good.rsplit_once(",p=").expect("p").1.to_owned();
        drop(ex);
        for (msg, want) in [
            (
                format!("c=biws,{nonce}"),
                ScramError::Malformed("expected p=<proof> last"),
            ),
            (
                format!("{nonce},c=biws,p={proof}"),
                ScramError::Malformed("expected c=<channel binding>"),
            ),
            (
                format!("c=eSws,{nonce},p={proof}"),
                ScramError::ChannelBindingMismatch,
            ),
            (
                format!("c=!!,{nonce},p={proof}"),
                ScramError::Malformed("channel binding is not base64"),
            ),
            (format!("c=biws,r=abcX,p={proof}"), ScramError::Nonce),
            (
                format!("c=biws,p={proof}"),
                ScramError::Malformed("expected r=<nonce>"),
            ),
            (
                format!("c=biws,{nonce},p=AAAA"),
                ScramError::Malformed("the proof is not 32 bytes of base64"),
            ),
            (
                format!("c=biws,{nonce},p={proof},x=1"),
                ScramError::Malformed("the proof is not 32 bytes of base64"),
            ),
        ] {
            let (ex, _) = start();
            assert_eq!(ex.finish(msg.as_bytes()).expect_err(&msg), want, "{msg}");
        }
        // The good one passes.
        let (ex, _) = start();
        assert!(ex.finish(good.as_bytes()).is_ok());
    }

    #[test]
    fn truncated_and_garbled_messages_never_panic() {
        let creds = users(&[("alice", "wonderland")]);
        let bare = "n=alice,r=abc";
        let first_msg = format!("n,a=alice,{bare},x=1");
        for end in 0..=first_msg.len() {
            let _ = Exchange::start(&first_msg.as_bytes()[..end], &creds);
        }
        let (_, first) = Exchange::start(first_msg.as_bytes(), &creds).expect("first");
        let first = String::from_utf8(first).expect("utf8");
        let (fin, _) = client_final("wonderland", "n,a=alice,", bare, &first);
        for end in 0..fin.len() {
            let (ex, _) = Exchange::start(first_msg.as_bytes(), &creds).expect("first");
            assert!(ex.finish(&fin.as_bytes()[..end]).is_err());
            let mut garbled = fin.clone().into_bytes();
            garbled[end] = b'=';
            let (ex, _) = Exchange::start(first_msg.as_bytes(), &creds).expect("first");
            let _ = ex.finish(&garbled);
        }
    }

    #[test]
    fn verifier_text_round_trips_and_bad_text_is_refused() {
        let v = Verifier::generate("pencil", 8192).expect("v");
        let text = v.render();
        assert!(text.starts_with("SCRAM-SHA-256$8192:"), "{text}");
        assert_eq!(Verifier::parse(&text), Ok(v.clone()));
        assert_ne!(
            Verifier::generate("pencil", 8192).expect("v"),
            v,
            "a fresh salt each time"
        );
        let good_key = B64.encode([7u8; 32]);
        for bad in [
            "".to_owned(),
            "SCRAM-SHA-1$4096:c2FsdA==$k:k".to_owned(),
            format!("SCRAM-SHA-256$4096:c2FsdA==${good_key}"),
            format!("SCRAM-SHA-256$100:c2FsdA==${good_key}:{good_key}"),
            format!("SCRAM-SHA-256$x:c2FsdA==${good_key}:{good_key}"),
            format!("SCRAM-SHA-256$4096:!!${good_key}:{good_key}"),
            format!("SCRAM-SHA-256$4096:${good_key}:{good_key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==$AAAA:{good_key}"),
        ] {
            assert!(Verifier::parse(&bad).is_err(), "{bad}");
        }
        let ok = format!("SCRAM-SHA-256$4096:c2FsdA==${good_key}:{good_key}");
        assert_eq!(Verifier::parse(&ok).map(|v| v.iterations()), Ok(4096));
    }

    #[test]
    fn saslprep_ascii_and_the_tables_roost_applies() {
        assert_eq!(saslprep("pencil").expect("ascii"), "pencil");
        assert_eq!(saslprep("I X ~!").expect("ascii"), "I X ~!");
        assert!(matches!(saslprep("pencil"), Ok(Cow::Borrowed(_))));
        assert_eq!(saslprep("a\u{7}b"), Err(ScramError::Prohibited));
        assert_eq!(saslprep("tab\there"), Err(ScramError::Prohibited));
        // RFC 4013 section 3 examples that need no normalization.
        assert_eq!(saslprep("I\u{ad}X").expect("mapped"), "IX");
        assert_eq!(saslprep("a\u{a0}b").expect("space"), "a b");
        assert_eq!(saslprep("\u{7}"), Err(ScramError::Prohibited));
        assert_eq!(saslprep("caf\u{e9}").expect("accent"), "caf\u{e9}");
        assert_eq!(saslprep("x\u{e000}"), Err(ScramError::Prohibited));
        assert_eq!(saslprep("x\u{fffe}"), Err(ScramError::Prohibited));
        assert_eq!(saslprep("x\u{200e}"), Err(ScramError::Prohibited));
        // The same password with a soft hyphen makes the same verifier.
        let salt = b"0123456789abcdef";
        assert_eq!(
            Verifier::derive("pass\u{ad}w\u{f6}rd", salt, 4096).expect("v"),
            Verifier::derive("passw\u{f6}rd", salt, 4096).expect("v")
        );
    }
}
