//! Who may connect, as the engine asks it: an [`Authenticator`] decides on a CONNECT's
//! credentials and names the [`Authorizer`] the connection is held to. The broker's
//! reads its password file, ACL file and HTTP hook; [`AllowAll`] lets everyone in.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use roost_core::{Connect, ReasonCode};

use crate::access::Authorizer;
use crate::scram::Credentials;

/// Why a CONNECT is refused: the CONNACK code and a short reason for the log.
pub type Refusal = (ReasonCode, &'static str);

/// A boxed future of an authentication.
pub type Verdict<'a> = Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send + 'a>>;

/// Decides who may connect and what each connection may do.
pub trait Authenticator: Send + Sync {
    /// Whether the client of `connect` (with `client_id` in use, from `peer`) may
    /// connect. May take time (a password hash, a question to a service).
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
        Box::pin(std::future::ready(Ok(())))
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
