//! JWT authentication: the CONNECT password is a signed token (RFC 7519) that names the
//! user, when it stops being valid, and optionally what the client may do.
//!
//! The key comes from `jwt_secret_file` (HMAC: HS256, HS384, HS512) or
//! `jwt_public_key_file` (a PEM RSA or EC public key: RS256/384/512, PS256/384/512,
//! ES256/384; or a JWKS file, `{"keys": [...]}`, whose keys are picked by the token's
//! `kid`). The key decides the algorithms a token may use, so a token signed with an
//! HMAC over a public key, or not signed at all (`alg: none`), is refused.
//!
//! Invariants:
//! - `exp` and `nbf` are enforced to the second, with no leeway; a token without `exp`
//!   does not expire (the connection it opens is closed at `exp` otherwise);
//! - `jwt_audience` and `jwt_issuer`, when set, must be in the token (`aud` may be a
//!   list that contains it);
//! - the `jwt_username_claim` (default `sub`) must be a non-empty string: it becomes the
//!   client's username;
//! - an `acl` claim, `{"pub": [filters], "sub": [filters]}`, narrows what the client may
//!   do: it is held to that claim and to the ACL file both. A claim with no filters
//!   allows nothing. `%u` and `%c` are replaced as in the ACL file.
//! - nothing here logs or returns the token; refusals are [`TokenProblem`]s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use roost_core::topic;

use crate::security::acl::{self, Access, Authorizer, Identity};
pub use roost_engine::auth::TokenProblem;

/// The `jwt_*` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtSettings {
    /// Where the key is.
    pub key: KeySource,
    /// The claim that names the user.
    pub username_claim: String,
    /// The `aud` a token must name, if any.
    pub audience: Option<String>,
    /// The `iss` a token must have, if any.
    pub issuer: Option<String>,
}

/// Which file holds the key, and what kind it is.
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    /// `jwt_secret_file`: an HMAC secret (the file's bytes, less a trailing newline).
    Secret(PathBuf),
    /// `jwt_public_key_file`: a PEM public key or a JWKS file.
    PublicKey(PathBuf),
}

/// Why the key file cannot be used; names the setting and the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("{key}: cannot read {path}: {source}")]
    Read {
        /// The setting.
        key: &'static str,
        /// The file.
        path: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file holds no usable key.
    #[error("{key}: {path}: {why}")]
    Unusable {
        /// The setting.
        key: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// A key and the algorithms it verifies.
struct VerifyingKey {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Checks tokens against the configured key and claims.
pub struct TokenVerifier {
    keys: Vec<VerifyingKey>,
    username_claim: String,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("keys", &self.keys.len())
            .field("username_claim", &self.username_claim)
            .finish_non_exhaustive()
    }
}

/// What a verified token says about its client.
#[derive(Debug)]
pub struct VerifiedToken {
    /// The username claim.
    pub username: String,
    /// `exp`, if the token has one.
    pub expires_at: Option<SystemTime>,
    /// The `acl` claim, if the token has one.
    pub access: Option<TokenAccess>,
}

const HMAC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

impl TokenVerifier {
    /// Reads the key file of `settings`.
    pub fn load(settings: &JwtSettings) -> Result<TokenVerifier, KeyError> {
        let (key, path) = match &settings.key {
            KeySource::Secret(p) => ("jwt_secret_file", p),
            KeySource::PublicKey(p) => ("jwt_public_key_file", p),
        };
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            key,
            path: path.display().to_string(),
            source,
        })?;
        let unusable = |why: String| KeyError::Unusable {
            key,
            path: path.display().to_string(),
            why,
        };
        let keys = match &settings.key {
            KeySource::Secret(_) => {
                let secret = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
                let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
                if secret.len() < 32 {
                    return Err(unusable(format!(
                        "an HMAC secret needs at least 32 bytes, this one has {}",
                        secret.len()
                    )));
                }
                vec![VerifyingKey {
                    kid: None,
                    key: DecodingKey::from_secret(secret),
                    algorithms: HMAC.to_vec(),
                }]
            }
            KeySource::PublicKey(_) => public_keys(&bytes).map_err(unusable)?,
        };
        Ok(TokenVerifier {
            keys,
            username_claim: settings.username_claim.clone(),
            audience: settings.audience.clone(),
            issuer: settings.issuer.clone(),
        })
    }

    /// Verifies `token` for the client `client_id` (for `%c` in its `acl` claim).
    pub fn verify(&self, token: &[u8], client_id: &str) -> Result<VerifiedToken, TokenProblem> {
        let token = std::str::from_utf8(token).map_err(|_| TokenProblem::Malformed)?;
        let header = Header::read(token)?;
        let algorithm: Algorithm = header
            .alg
            .parse()
            .map_err(|_| TokenProblem::WrongAlgorithm)?;
        let named = |k: &&VerifyingKey| match (&header.kid, &k.kid) {
            (Some(wanted), Some(kid)) => wanted == kid,
            _ => true,
        };
        let candidates: Vec<&VerifyingKey> = self.keys.iter().filter(named).collect();
        if candidates.is_empty() {
            return Err(TokenProblem::UnknownKey);
        }
        let mut problem = TokenProblem::WrongAlgorithm;
        for key in candidates
            .into_iter()
            .filter(|k| k.algorithms.contains(&algorithm))
        {
            match jsonwebtoken::decode::<serde_json::Value>(
                token,
                &key.key,
                &self.validation(algorithm),
            ) {
                Ok(data) => return self.claims(data.claims, client_id),
                Err(e) => {
                    problem = problem_of(e.kind());
                    if problem != TokenProblem::BadSignature {
                        // The signature verified: the claims are what is wrong.
                        return Err(problem);
                    }
                }
            }
        }
        Err(problem)
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut v = Validation::new(algorithm);
        v.leeway = 0;
        v.validate_nbf = true;
        v.required_spec_claims.clear();
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                v.required_spec_claims.insert("aud".into());
            }
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        v
    }

    fn claims(
        &self,
        claims: serde_json::Value,
        client_id: &str,
    ) -> Result<VerifiedToken, TokenProblem> {
        let username = claims
            .get(&self.username_claim)
            .and_then(serde_json::Value::as_str)
            .filter(|u| !u.is_empty())
            .ok_or(TokenProblem::NoUsername)?
            .to_owned();
        let expires_at = claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let access = match claims.get("acl") {
            None => None,
            Some(acl) => Some(TokenAccess::from_claim(
                acl,
                username.clone(),
                client_id.to_owned(),
            )?),
        };
        Ok(VerifiedToken {
            username,
            expires_at,
            access,
        })
    }
}

/// The JOSE header fields roost looks at before verifying.
struct Header {
    alg: String,
    kid: Option<String>,
}

impl Header {
    /// Reads the header of a compact JWS (three base64url parts); an unsigned token is
    /// refused here, by name, whatever the key.
    fn read(token: &str) -> Result<Header, TokenProblem> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenProblem::Malformed);
        };
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header.trim_end_matches('='))
            .map_err(|_| TokenProblem::Malformed)?;
        let value: serde_json::Value =
            serde_json::from_slice(&json).map_err(|_| TokenProblem::Malformed)?;
        let alg = value
            .get("alg")
            .and_then(serde_json::Value::as_str)
            .ok_or(TokenProblem::Malformed)?;
        if alg.eq_ignore_ascii_case("none") {
            return Err(TokenProblem::Unsigned);
        }
        Ok(Header {
            alg: alg.to_owned(),
            kid: value
                .get("kid")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
        })
    }
}

fn problem_of(kind: &ErrorKind) -> TokenProblem {
    match kind {
        ErrorKind::ExpiredSignature => TokenProblem::Expired,
        ErrorKind::ImmatureSignature => TokenProblem::NotYetValid,
        ErrorKind::InvalidAudience => TokenProblem::WrongAudience,
        ErrorKind::InvalidIssuer => TokenProblem::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => TokenProblem::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => TokenProblem::WrongIssuer,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            TokenProblem::WrongAlgorithm
        }
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => TokenProblem::Malformed,
        _ => TokenProblem::BadSignature,
    }
}

/// The keys of a `jwt_public_key_file`: a JWKS document, or one PEM public key.
fn public_keys(bytes: &[u8]) -> Result<Vec<VerifyingKey>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_owned())?;
    if text.trim_start().starts_with('{') {
        let set: JwkSet =
            serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let algorithms = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => RSA.to_vec(),
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => vec![Algorithm::ES256],
                    EllipticCurve::P384 => vec![Algorithm::ES384],
                    _ => return Err(format!("key {i}: only P-256 and P-384 curves are served")),
                },
                AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
                AlgorithmParameters::OctetKey(_) => {
                    return Err(format!(
                        "key {i}: a secret key belongs in jwt_secret_file, not in a public key file"
                    ));
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {i}: {e}"))?;
            keys.push(VerifyingKey {
                kid: jwk.common.key_id.clone(),
                key,
                algorithms,
            });
        }
        if keys.is_empty() {
            return Err("the JWKS document has no keys".into());
        }
        return Ok(keys);
    }
    let key = if let Ok(k) = DecodingKey::from_rsa_pem(bytes) {
        VerifyingKey {
            kid: None,
            key: k,
            algorithms: RSA.to_vec(),
        }
    } else if let Ok(k) = DecodingKey::from_ec_pem(bytes) {
        VerifyingKey {
            kid: None,
            key: k,
            algorithms: vec![Algorithm::ES256, Algorithm::ES384],
        }
    } else {
        return Err("neither a PEM RSA or EC public key nor a JWKS document".into());
    };
    Ok(vec![key])
}

/// What a token's `acl` claim lets its client do: publish to the `pub` filters,
/// subscribe to and receive from the `sub` filters. Whatever they do not name is denied.
#[derive(Debug)]
pub struct TokenAccess {
    publish: Vec<String>,
    subscribe: Vec<String>,
    username: String,
    client_id: String,
}

impl TokenAccess {
    fn from_claim(
        claim: &serde_json::Value,
        username: String,
        client_id: String,
    ) -> Result<TokenAccess, TokenProblem> {
        let object = claim.as_object().ok_or(TokenProblem::BadAcl)?;
        if object.keys().any(|k| k != "pub" && k != "sub") {
            return Err(TokenProblem::BadAcl);
        }
        let filters = |key: &str| -> Result<Vec<String>, TokenProblem> {
            let Some(list) = object.get(key) else {
                return Ok(Vec::new());
            };
            list.as_array()
                .ok_or(TokenProblem::BadAcl)?
                .iter()
                .map(|f| match f.as_str() {
                    Some(f) if topic::validate_filter(f).is_ok() => Ok(f.to_owned()),
                    _ => Err(TokenProblem::BadAcl),
                })
                .collect()
        };
        Ok(TokenAccess {
            publish: filters("pub")?,
            subscribe: filters("sub")?,
            username,
            client_id,
        })
    }
}

impl Authorizer for TokenAccess {
    fn allows(&self, access: Access, topic: &str) -> bool {
        let who = Identity {
            username: Some(&self.username),
            client_id: &self.client_id,
        };
        let filters = match access {
            Access::Write => &self.publish,
            Access::Read | Access::Subscribe => &self.subscribe,
        };
        filters.iter().any(|f| {
            let Some(filter) = acl::expand(f, who) else {
                return false;
            };
            match access {
                Access::Read | Access::Write => topic::matches(&filter, topic),
                Access::Subscribe => acl::covers(&filter, topic),
            }
        })
    }
}

/// Both a file ACL and a token's claim: what both allow.
#[derive(Debug)]
pub struct Narrowed {
    /// The ACL file's decision for the client.
    pub file: Arc<dyn Authorizer>,
    /// The token's.
    pub token: Arc<dyn Authorizer>,
}

impl Authorizer for Narrowed {
    fn allows(&self, access: Access, topic: &str) -> bool {
        self.file.allows(access, topic) && self.token.allows(access, topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header as JwtHeader, encode};
    use serde_json::json;
    use std::path::Path;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier(dir: &Path, audience: Option<&str>) -> TokenVerifier {
        let path = dir.join("secret");
        std::fs::write(&path, [SECRET, b"\n"].concat()).expect("write");
        TokenVerifier::load(&JwtSettings {
            key: KeySource::Secret(path),
            username_claim: "sub".into(),
            audience: audience.map(str::to_owned),
            issuer: None,
        })
        .expect("load")
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    fn token(claims: serde_json::Value) -> String {
        encode(
            &JwtHeader::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("encode")
    }

    #[test]
    fn each_bad_token_is_refused_for_its_reason() {
        let dir = tempfile::tempdir().expect("dir");
        let v = verifier(dir.path(), Some("roost"));
        let good = json!({"sub": "alice", "aud": "roost", "exp": now() + 60});
        let ok = v.verify(token(good.clone()).as_bytes(), "c").expect("good");
        assert_eq!(ok.username, "alice");
        assert!(ok.expires_at.is_some() && ok.access.is_none());
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let unsigned = format!("{}.{}.", b64(json!({"alg": "none"})), b64(good.clone()));
        let other_key = encode(
            &JwtHeader::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(b"another secret, 32 bytes long..."),
        )
        .expect("encode");
        for (token, problem) in [
            (unsigned, TokenProblem::Unsigned),
            (other_key, TokenProblem::BadSignature),
            (
                token(json!({"sub": "alice", "aud": "roost", "exp": now() - 1})),
                TokenProblem::Expired,
            ),
            (
                token(json!({"sub": "alice", "aud": "roost", "nbf": now() + 60})),
                TokenProblem::NotYetValid,
            ),
            (
                token(json!({"sub": "alice", "aud": "other"})),
                TokenProblem::WrongAudience,
            ),
            (token(json!({"sub": "alice"})), TokenProblem::WrongAudience),
            (token(json!({"aud": "roost"})), TokenProblem::NoUsername),
            (
                token(json!({"sub": "alice", "aud": "roost", "acl": {"pub": ["a/#/b"]}})),
                TokenProblem::BadAcl,
            ),
            ("not a token".into(), TokenProblem::Malformed),
            ("a.b.c.d".into(), TokenProblem::Malformed),
        ] {
            assert_eq!(
                v.verify(token.as_bytes(), "c").map(|_| ()),
                Err(problem),
                "{problem:?}"
            );
        }
        // The same secret in an RS256 header: the key serves HMAC only.
        let parts: Vec<String> = token(good).split('.').map(str::to_owned).collect();
        let rs = format!("{}.{}.{}", b64(json!({"alg": "RS256"})), parts[1], parts[2]);
        assert_eq!(
            v.verify(rs.as_bytes(), "c").map(|_| ()),
            Err(TokenProblem::WrongAlgorithm)
        );
    }

    #[test]
    fn an_acl_claim_allows_only_what_it_names() {
        let dir = tempfile::tempdir().expect("dir");
        let v = verifier(dir.path(), None);
        let t = token(json!({
            "sub": "alice",
            "acl": {"pub": ["devices/%c/out"], "sub": ["users/%u/#"]}
        }));
        let access = v
            .verify(t.as_bytes(), "dev1")
            .expect("good")
            .access
            .expect("acl");
        assert!(access.allows(Access::Write, "devices/dev1/out"));
        assert!(!access.allows(Access::Write, "devices/dev2/out"));
        assert!(!access.allows(Access::Read, "devices/dev1/out"));
        assert!(access.allows(Access::Subscribe, "users/alice/+"));
        assert!(access.allows(Access::Read, "users/alice/x"));
        assert!(!access.allows(Access::Subscribe, "users/#"));
        assert!(!access.allows(Access::Write, "users/alice/x"));
        let none = token(json!({"sub": "alice", "acl": {}}));
        let access = v.verify(none.as_bytes(), "c").expect("ok").access;
        assert!(!access.expect("acl").allows(Access::Write, "a"));
    }

    /// A JWKS file with two EC keys: the token's `kid` picks its key, an unknown `kid`
    /// is refused, and a token signed by the other key does not pass as this one.
    #[test]
    fn a_jwks_file_picks_the_key_by_kid() {
        let dir = tempfile::tempdir().expect("dir");
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let keys: Vec<rcgen::KeyPair> = (0..2)
            .map(|_| rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key"))
            .collect();
        let jwks: Vec<serde_json::Value> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                // The raw public key is the uncompressed point: 0x04, x, y.
                let raw = k.public_key_raw();
                json!({"kty": "EC", "crv": "P-256", "kid": format!("k{i}"),
                       "x": b64(&raw[1..33]), "y": b64(&raw[33..65])})
            })
            .collect();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({ "keys": jwks }).to_string()).expect("write");
        let v = TokenVerifier::load(&JwtSettings {
            key: KeySource::PublicKey(path),
            username_claim: "client".into(),
            audience: None,
            issuer: None,
        })
        .expect("jwks loads");
        let sign = |key: &rcgen::KeyPair, kid: &str| {
            let mut header = JwtHeader::new(Algorithm::ES256);
            header.kid = Some(kid.into());
            let pem = key.serialize_pem();
            encode(
                &header,
                &json!({"client": "dev-7", "exp": now() + 60}),
                &EncodingKey::from_ec_pem(pem.as_bytes()).expect("pem"),
            )
            .expect("encode")
        };
        let ok = v.verify(sign(&keys[1], "k1").as_bytes(), "c").expect("k1");
        assert_eq!(ok.username, "dev-7");
        assert_eq!(
            v.verify(sign(&keys[0], "k1").as_bytes(), "c").map(|_| ()),
            Err(TokenProblem::BadSignature)
        );
        assert_eq!(
            v.verify(sign(&keys[0], "k9").as_bytes(), "c").map(|_| ()),
            Err(TokenProblem::UnknownKey)
        );
    }

    #[test]
    fn short_secrets_and_unusable_key_files_are_startup_errors() {
        let dir = tempfile::tempdir().expect("dir");
        let short = dir.path().join("short");
        std::fs::write(&short, "secret\n").expect("write");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "-----BEGIN NOTHING-----\n").expect("write");
        for (source, key) in [
            (KeySource::Secret(short), "jwt_secret_file"),
            (KeySource::PublicKey(junk), "jwt_public_key_file"),
            (
                KeySource::PublicKey(dir.path().join("missing")),
                "jwt_public_key_file",
            ),
        ] {
            let e = TokenVerifier::load(&JwtSettings {
                key: source,
                username_claim: "sub".into(),
                audience: None,
                issuer: None,
            })
            .expect_err("unusable");
            assert!(e.to_string().starts_with(key), "{e}");
        }
    }
}
