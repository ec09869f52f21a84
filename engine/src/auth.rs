//! Who may connect, as the engine asks it: an [`Authenticator`] decides on a CONNECT's
//! credentials and names the [`Authorizer`] the connection is held to. The broker's
//! reads its password file, ACL file and HTTP hook; [`AllowAll`] lets everyone in.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use roost_core::{Connect, ReasonCode};

use crate::access::Authorizer;
use crate::metrics::{AuthFailure, Limit};
use crate::scram::Credentials;

/// Why a CONNECT that was read and understood is refused: by the [`Authenticator`],
/// by the ACL (its will), or by the broker (`max_sessions`). Each variant is answered
/// with its CONNACK code ([`Refusal::reason_code`]; 3.x clients get the matching
/// return code) and its text (the `Display`), which is both the v5 reason string and
/// what the log says; `/metrics` counts it as [`Refusal::auth_failure`] or
/// [`Refusal::limit`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A user the password file knows (or, with a password file and no hook, any user)
    /// gave a wrong or no password: 0x86 (3.x: 4).
    #[error("bad username or password")]
    BadCredentials,
    /// No username, and anonymous clients are not allowed: 0x87 (3.x: 5).
    #[error("anonymous clients are not allowed")]
    AnonymousNotAllowed,
    /// A username, anonymous access off, and neither a password file nor a hook to
    /// check it against: 0x87 (3.x: 5).
    #[error("no password file or auth hook to check the username against")]
    NoCredentialCheck,
    /// The auth hook said no: 0x86 (3.x: 4).
    #[error("refused by the auth hook")]
    HookDenied,
    /// The auth hook could not answer; its `on_error` policy says how the client is
    /// told: `deny` as a wrong password (0x86, 3.x: 4), else server unavailable (0x88,
    /// 3.x: 3).
    #[error("the auth hook is unavailable")]
    HookUnavailable {
        /// `on_error = "deny"`.
        deny: bool,
    },
    /// Too many CONNECTs already wait for a credential check (`max_auth_waiting`, or
    /// one address's share of it): 0x89 server busy (3.x: 3), at once.
    #[error("too many authentications in progress")]
    Busy,
    /// The ACL does not let the client write its will's topic: 0x87 (3.x: 5).
    #[error("the will topic is not writable for this client")]
    WillNotWritable,
    /// A new session past `max_sessions`: 0x97 quota exceeded (3.x: 3).
    #[error("too many sessions")]
    TooManySessions,
    /// The CONNECT password is a token (JWT) that does not prove who the client is:
    /// 0x86 (3.x: 4). The text names the problem, never the token.
    #[error("bad token: {0}")]
    BadToken(TokenProblem),
}

/// Why a token (a JWT given as the CONNECT password) is refused: what the log line and
/// the v5 reason string name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    /// Not three base64url parts with a JSON header and claims.
    #[error("malformed")]
    Malformed,
    /// `alg: none`: an unsigned token.
    #[error("unsigned (alg none)")]
    Unsigned,
    /// Signed with an algorithm the configured key does not serve.
    #[error("algorithm not accepted")]
    WrongAlgorithm,
    /// The signature does not verify with the configured key.
    #[error("bad signature")]
    BadSignature,
    /// Past its `exp`.
    #[error("expired")]
    Expired,
    /// Before its `nbf`.
    #[error("not yet valid")]
    NotYetValid,
    /// Its `aud` is not `jwt_audience`.
    #[error("wrong audience")]
    WrongAudience,
    /// Its `iss` is not `jwt_issuer`.
    #[error("wrong issuer")]
    WrongIssuer,
    /// It lacks the `jwt_username_claim`, or that claim is not a non-empty string.
    #[error("no username claim")]
    NoUsername,
    /// Its `acl` claim is not `{"pub": [filters], "sub": [filters]}`.
    #[error("bad acl claim")]
    BadAcl,
    /// Its `kid` names no key of the JWKS file.
    #[error("unknown key id")]
    UnknownKey,
}

/// What a successful authentication tells about the client, beyond letting it in.
#[derive(Debug, Default)]
pub struct Grant {
    /// Who the credentials prove the client to be (a token's username claim); it
    /// replaces the CONNECT's username, for the ACL and everything after.
    pub username: Option<String>,
    /// When the credentials stop being valid (a token's `exp`): the connection is closed
    /// then, v5 clients with DISCONNECT 0x87.
    pub expires_at: Option<std::time::SystemTime>,
    /// What the credentials allow (a token's `acl` claim): the client is held to it as
    /// well as to the ACL file, so it can only narrow what the file allows.
    pub narrowing: Option<Arc<dyn Authorizer>>,
}

impl Refusal {
    /// The CONNACK reason code the client is refused with.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Refusal::BadCredentials
            | Refusal::BadToken(_)
            | Refusal::HookDenied
            | Refusal::HookUnavailable { deny: true } => ReasonCode::BadUserNameOrPassword,
            Refusal::AnonymousNotAllowed
            | Refusal::NoCredentialCheck
            | Refusal::WillNotWritable => ReasonCode::NotAuthorized,
            Refusal::HookUnavailable { deny: false } => ReasonCode::ServerUnavailable,
            Refusal::Busy => ReasonCode::ServerBusy,
            Refusal::TooManySessions => ReasonCode::QuotaExceeded,
        }
    }

    /// The `reason` of `roost_auth_failures_total` the refusal counts under, if any: a
    /// hook that is down counts as what its client is told.
    pub fn auth_failure(&self) -> Option<AuthFailure> {
        match self {
            Refusal::BadCredentials
            | Refusal::BadToken(_)
            | Refusal::HookDenied
            | Refusal::HookUnavailable { deny: true } => Some(AuthFailure::BadCredentials),
            Refusal::AnonymousNotAllowed | Refusal::NoCredentialCheck => {
                Some(AuthFailure::NotAuthorized)
            }
            Refusal::HookUnavailable { deny: false } => Some(AuthFailure::BackendUnavailable),
            Refusal::Busy | Refusal::WillNotWritable | Refusal::TooManySessions => None,
        }
    }

    /// The overload limit that refused the client, if one did (the `limit` of
    /// `roost_limit_trips_total`). `max_sessions` is counted by the broker where it
    /// refuses the session, the others where the refusal is answered.
    pub fn limit(&self) -> Option<Limit> {
        match self {
            Refusal::Busy => Some(Limit::AuthWaiting),
            Refusal::TooManySessions => Some(Limit::Sessions),
            Refusal::BadCredentials
            | Refusal::BadToken(_)
            | Refusal::AnonymousNotAllowed
            | Refusal::NoCredentialCheck
            | Refusal::HookDenied
            | Refusal::HookUnavailable { .. }
            | Refusal::WillNotWritable => None,
        }
    }
}

/// A boxed future of an authentication.
pub type Verdict<'a> = Pin<Box<dyn Future<Output = Result<Grant, Refusal>> + Send + 'a>>;

/// Decides who may connect and what each connection may do.
pub trait Authenticator: Send + Sync {
    /// Whether the client of `connect` (with `client_id` in use, from `peer`) may
    /// connect, and what its credentials grant. May take time (a password hash, a
    /// question to a service).
    fn authenticate<'a>(
        &'a self,
        connect: &'a Connect,
        client_id: &'a str,
        peer: SocketAddr,
    ) -> Verdict<'a>;

    /// The ACL a client is held to; `None` lets it do anything.
    fn authorizer(
        &self,
        username: Option<&str>,
        client_id: &Arc<str>,
    ) -> Option<Arc<dyn Authorizer>>;

    /// Where SCRAM exchanges (v5 enhanced authentication) find their verifiers.
    fn scram(&self) -> Arc<dyn Credentials>;
}

/// Lets every client in, holds none to an ACL, and knows no SCRAM user.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

/// Knows no SCRAM user (every exchange fails as an unknown user would).
#[derive(Debug, Default)]
struct NoCredentials;

impl Credentials for NoCredentials {
    fn verifier(&self, _username: &str) -> Option<crate::scram::Verifier> {
        None
    }

    fn stand_in_secret(&self) -> &[u8] {
        b"no users"
    }
}

impl Authenticator for AllowAll {
    fn authenticate<'a>(
        &'a self,
        _connect: &'a Connect,
        _client_id: &'a str,
        _peer: SocketAddr,
    ) -> Verdict<'a> {
        Box::pin(std::future::ready(Ok(Grant::default())))
    }

    fn authorizer(
        &self,
        _username: Option<&str>,
        _client_id: &Arc<str>,
    ) -> Option<Arc<dyn Authorizer>> {
        None
    }

    fn scram(&self) -> Arc<dyn Credentials> {
        Arc::new(NoCredentials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a refused client reads (CONNACK code and v5 reason string) and how
    /// `/metrics` counts it, for every refusal.
    #[test]
    fn each_refusal_has_its_code_text_and_count() {
        use AuthFailure as F;
        use ReasonCode as C;
        for (refusal, code, text, failure, limit) in [
            (
                Refusal::BadCredentials,
                C::BadUserNameOrPassword,
                "bad username or password",
                Some(F::BadCredentials),
                None,
            ),
            (
                Refusal::AnonymousNotAllowed,
                C::NotAuthorized,
                "anonymous clients are not allowed",
                Some(F::NotAuthorized),
                None,
            ),
            (
                Refusal::NoCredentialCheck,
                C::NotAuthorized,
                "no password file or auth hook to check the username against",
                Some(F::NotAuthorized),
                None,
            ),
            (
                Refusal::HookDenied,
                C::BadUserNameOrPassword,
                "refused by the auth hook",
                Some(F::BadCredentials),
                None,
            ),
            (
                Refusal::HookUnavailable { deny: true },
                C::BadUserNameOrPassword,
                "the auth hook is unavailable",
                Some(F::BadCredentials),
                None,
            ),
            (
                Refusal::HookUnavailable { deny: false },
                C::ServerUnavailable,
                "the auth hook is unavailable",
                Some(F::BackendUnavailable),
                None,
            ),
            (
                Refusal::Busy,
                C::ServerBusy,
                "too many authentications in progress",
                None,
                Some(Limit::AuthWaiting),
            ),
            (
                Refusal::WillNotWritable,
                C::NotAuthorized,
                "the will topic is not writable for this client",
                None,
                None,
            ),
            (
                Refusal::TooManySessions,
                C::QuotaExceeded,
                "too many sessions",
                None,
                Some(Limit::Sessions),
            ),
            (
                Refusal::BadToken(TokenProblem::Expired),
                C::BadUserNameOrPassword,
                "bad token: expired",
                Some(F::BadCredentials),
                None,
            ),
        ] {
            assert_eq!(refusal.reason_code(), code, "{refusal:?}");
            assert_eq!(refusal.to_string(), text, "{refusal:?}");
            assert_eq!(refusal.auth_failure(), failure, "{refusal:?}");
            assert_eq!(refusal.limit(), limit, "{refusal:?}");
        }
    }
}
