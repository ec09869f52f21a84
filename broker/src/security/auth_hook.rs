//! The HTTP authentication hook: asks an external service whether a client may connect.
//!
//! roost POSTs JSON `{"client_id", "username", "password", "password_encoding", "peer",
//! "protocol"}` to the configured `http://` URL. A 2xx answer allows the client (unless its
//! JSON body says `"result": "deny"`), 401 and 403 deny it; anything else, a refused
//! connection or the timeout passing is an error, answered as `on_error` says. The broker
//! never waits longer than `timeout_ms` and never goes down with the hook.
//!
//! The client is a minimal HTTP/1.1 one over a tokio `TcpStream` (`Connection: close`, no
//! TLS, response capped at 64 KiB): the hook is meant to live next to the broker.
//!
//! Definite answers are cached for `cache_seconds`, keyed by a keyed hash of client id,
//! username, password and peer IP (the password itself is not kept); errors never are.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use serde::Deserialize;

/// The `[auth_hook]` table: an HTTP service asked whether a client may connect.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthHookConfig {
    /// `http://host:port/path` to POST the client's credentials to (no TLS).
    pub url: String,
    /// Longest wait for the hook's answer, in milliseconds.
    #[serde(default = "AuthHookConfig::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Seconds an allow/deny answer is reused for the same credentials (0: no cache).
    #[serde(default = "AuthHookConfig::default_cache_seconds")]
    pub cache_seconds: u64,
    /// How to answer when the hook is down or answers nonsense.
    #[serde(default)]
    pub on_error: HookErrorPolicy,
}

impl AuthHookConfig {
    pub(crate) fn default_timeout_ms() -> u64 {
        2000
    }
    pub(crate) fn default_cache_seconds() -> u64 {
        60
    }
}

/// What a client is told when the auth hook cannot answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HookErrorPolicy {
    /// CONNACK 0x86 bad username or password (3.x return code 4): the client should not
    /// simply retry.
    Deny,
    /// CONNACK 0x88 server unavailable (3.x return code 3): try again later.
    #[default]
    Unavailable,
}

/// Most cached answers; past it, expired ones are purged, then the cache is cleared.
const CACHE_MAX: usize = 10_000;
/// Largest response read from the hook.
const RESPONSE_MAX: usize = 64 * 1024;

/// The hook's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAnswer {
    /// Let the client in.
    Allow,
    /// Refuse (bad username or password).
    Deny,
    /// The hook could not be asked or gave no usable answer.
    Error,
}

/// A parsed `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookUrl {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port (80 when not given).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HookUrl {
    /// Parses an `http://` URL; the error says what is wrong.
    pub fn parse(url: &str) -> Result<HookUrl, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?} must start with http:// (TLS is not supported)"))?;
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(format!("{url:?}: credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed [ in host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            None => 80,
        };
        Ok(HookUrl {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What the hook is asked about.
#[derive(Debug, Clone, Copy)]
pub struct HookRequest<'a> {
    /// Client id in use.
    pub client_id: &'a str,
    /// Username, if any.
    pub username: Option<&'a str>,
    /// Password, if any.
    pub password: Option<&'a [u8]>,
    /// The client's address.
    pub peer: SocketAddr,
    /// "3.1", "3.1.1" or "5.0".
    pub protocol: &'a str,
}

/// The configured hook with its cache.
#[derive(Debug)]
pub struct AuthHook {
    url: HookUrl,
    timeout: Duration,
    cache_for: Duration,
    cache: Mutex<HashMap<u64, (Instant, HookAnswer)>>,
    hasher: std::collections::hash_map::RandomState,
}

impl AuthHook {
    /// A hook from its (validated) configuration.
    pub fn new(config: &AuthHookConfig) -> Result<AuthHook, String> {
        Ok(AuthHook {
            url: HookUrl::parse(&config.url)?,
            timeout: Duration::from_millis(config.timeout_ms),
            cache_for: Duration::from_secs(config.cache_seconds),
            cache: Mutex::new(HashMap::new()),
            hasher: Default::default(),
        })
    }

    /// Forgets every cached answer (on SIGHUP, so changed credentials apply at once).
    pub fn clear_cache(&self) {
        self.cache.lock().clear();
    }

    /// Asks the hook (or the cache) about a client.
    pub async fn check(&self, req: HookRequest<'_>) -> HookAnswer {
        let key = self.cache_key(&req);
        let now = Instant::now();
        if !self.cache_for.is_zero()
            && let Some(&(until, answer)) = self.cache.lock().get(&key)
            && until > now
        {
            return answer;
        }
        let answer = match tokio::time::timeout(self.timeout, self.ask(&req)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                tracing::warn!(url = %self.url.host_header(), "auth hook failed: {e}");
                HookAnswer::Error
            }
            Err(_) => {
                tracing::warn!(url = %self.url.host_header(), "auth hook did not answer within {:?}", self.timeout);
                HookAnswer::Error
            }
        };
        if answer != HookAnswer::Error && !self.cache_for.is_zero() {
            let mut cache = self.cache.lock();
            if cache.len() >= CACHE_MAX {
                cache.retain(|_, (until, _)| *until > now);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(key, (now + self.cache_for, answer));
        }
        answer
    }

    fn cache_key(&self, req: &HookRequest<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        req.client_id.hash(&mut h);
        req.username.hash(&mut h);
        req.password.hash(&mut h);
        req.peer.ip().hash(&mut h);
        h.finish()
    }

    async fn ask(&self, req: &HookRequest<'_>) -> std::io::Result<HookAnswer> {
        let body = request_body(req);
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: roost/{}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.url.path,
            self.url.host_header(),
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        let mut stream = TcpStream::connect((self.url.host.as_str(), self.url.port)).await?;
        let _ = stream.set_nodelay(true);
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        stream.write_all(&out).await?;
        let mut response = Vec::with_capacity(1024);
        loop {
            if response.len() >= RESPONSE_MAX {
                break;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&chunk[..n]);
            if let Some(answer) = parse_response(&response, false) {
                return Ok(answer);
            }
        }
        parse_response(&response, true).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response")
        })
    }
}

/// The JSON request body. The password goes as a string when it is UTF-8, else base64.
fn request_body(req: &HookRequest<'_>) -> String {
    let (password, encoding) = match req.password {
        None => (serde_json::Value::Null, "utf-8"),
        Some(p) => match std::str::from_utf8(p) {
            Ok(s) => (serde_json::Value::from(s), "utf-8"),
            Err(_) => (serde_json::Value::from(base64(p)), "base64"),
        },
    };
    serde_json::json!({
        "client_id": req.client_id,
        "username": req.username,
        "password": password,
        "password_encoding": encoding,
        "peer": req.peer.to_string(),
        "protocol": req.protocol,
    })
    .to_string()
}

/// Reads an HTTP response: `Some` once the status (and, for a 2xx, the body) is known.
/// With `complete`, the stream has ended: what is there is all there is.
fn parse_response(buf: &[u8], complete: bool) -> Option<HookAnswer> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return Some(HookAnswer::Error);
    }
    let status: u16 = parts.next()?.parse().ok()?;
    match status {
        200..=299 => {}
        401 | 403 => return Some(HookAnswer::Deny),
        _ => return Some(HookAnswer::Error),
    }
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
    }
    let raw_body = &buf[head_end + 4..];
    let body = if chunked {
        match dechunk(raw_body) {
            Chunked::Done(b) => b,
            Chunked::Malformed => return Some(HookAnswer::Error),
            Chunked::Partial if complete => return Some(HookAnswer::Error),
            Chunked::Partial => return None,
        }
    } else if let Some(len) = content_length {
        if raw_body.len() < len {
            return if complete {
                Some(HookAnswer::Error)
            } else {
                None
            };
        }
        raw_body[..len].to_vec()
    } else if complete {
        raw_body.to_vec()
    } else {
        return None;
    };
    Some(body_answer(&body))
}

/// A 2xx body: JSON `{"result": "deny"}` denies; anything else (empty, other JSON) allows.
fn body_answer(body: &[u8]) -> HookAnswer {
    let denied = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("result")
                .and_then(|r| r.as_str())
                .map(|r| r.eq_ignore_ascii_case("deny"))
        })
        .unwrap_or(false);
    if denied {
        HookAnswer::Deny
    } else {
        HookAnswer::Allow
    }
}

/// A chunked body as far as it has arrived.
#[derive(Debug, PartialEq, Eq)]
enum Chunked {
    /// The last chunk arrived: the decoded body.
    Done(Vec<u8>),
    /// More is to come.
    Partial,
    /// Not a chunked body roost reads: a size that is not hex, or a chunk larger than
    /// a whole response may be.
    Malformed,
}

/// Decodes a chunked body. The chunk sizes come from whatever answers at the hook's
/// address, so they are checked, never trusted in arithmetic.
fn dechunk(mut raw: &[u8]) -> Chunked {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return Chunked::Partial;
        };
        let size = std::str::from_utf8(&raw[..line_end])
            .ok()
            .and_then(|line| line.split(';').next())
            .and_then(|size| usize::from_str_radix(size.trim(), 16).ok());
        let Some(size) = size.filter(|&size| size <= RESPONSE_MAX) else {
            return Chunked::Malformed;
        };
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Chunked::Done(out);
        }
        let (Some(chunk), Some(rest)) = (raw.get(..size), raw.get(size + 2..)) else {
            return Chunked::Partial;
        };
        out.extend_from_slice(chunk);
        raw = rest;
    }
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(TABLE[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = HookUrl::parse("http://127.0.0.1:8080/auth?x=1").expect("valid");
        assert_eq!(
            u,
            HookUrl {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/auth?x=1".into()
            }
        );
        let u = HookUrl::parse("http://auth.local").expect("valid");
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = HookUrl::parse("http://[::1]:9000/a").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        assert_eq!(u.host_header(), "[::1]:9000");
        for bad in [
            "https://x/",
            "x:80/",
            "http:///a",
            "http://h:port/",
            "http://u:p@h/",
        ] {
            assert!(HookUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(ok, false), Some(HookAnswer::Allow));
        let deny = b"HTTP/1.0 403 Forbidden\r\n\r\n";
        assert_eq!(parse_response(deny, false), Some(HookAnswer::Deny));
        let err = b"HTTP/1.1 500 Oops\r\n\r\n";
        assert_eq!(parse_response(err, false), Some(HookAnswer::Error));
        let body_deny = b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{\"result\":\"deny\"}";
        assert_eq!(parse_response(body_deny, false), Some(HookAnswer::Deny));
        // Body not complete yet.
        assert_eq!(
            parse_response(&body_deny[..body_deny.len() - 3], false),
            None
        );
        let no_length = b"HTTP/1.0 200 OK\r\n\r\n{\"result\":\"allow\"}";
        assert_eq!(parse_response(no_length, false), None);
        assert_eq!(parse_response(no_length, true), Some(HookAnswer::Allow));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{\"result\r\n9\r\n\":\"deny\"}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked, false), Some(HookAnswer::Deny));
        assert_eq!(parse_response(b"HTTP/1.1 200", true), None);
        assert_eq!(
            parse_response(b"SMTP 200\r\n\r\n", true),
            Some(HookAnswer::Error)
        );
    }

    /// Chunk sizes come from the network: one past `usize` arithmetic, or larger than
    /// a response may be, is an error answer, never a panic or a wait for more.
    #[test]
    fn hostile_chunk_sizes_are_errors() {
        for size in ["ffffffffffffffff", "fffffffffffffffe", "10001", "zz", ""] {
            let response = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nabc\r\n0\r\n\r\n"
            );
            assert_eq!(
                parse_response(response.as_bytes(), false),
                Some(HookAnswer::Error),
                "chunk size {size:?}"
            );
        }
        let partial = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffff\r\nabc";
        assert_eq!(parse_response(partial, false), None);
        assert_eq!(parse_response(partial, true), Some(HookAnswer::Error));
        assert_eq!(
            dechunk(b"3\r\nabc\r\n0\r\n\r\n"),
            Chunked::Done(b"abc".to_vec())
        );
    }

    #[test]
    fn body_encodes_password() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let req = HookRequest {
            client_id: "c1",
            username: Some("alice"),
            password: Some(b"pw"),
            peer,
            protocol: "5.0",
        };
        let v: serde_json::Value = serde_json::from_str(&request_body(&req)).expect("json");
        assert_eq!(v["client_id"], "c1");
        assert_eq!(v["username"], "alice");
        assert_eq!(v["password"], "pw");
        assert_eq!(v["password_encoding"], "utf-8");
        assert_eq!(v["peer"], "127.0.0.1:5000");
        let binary = HookRequest {
            password: Some(&[0xff, 0x00, 0x41]),
            username: None,
            ..req
        };
        let v: serde_json::Value = serde_json::from_str(&request_body(&binary)).expect("json");
        assert_eq!(v["password"], "/wBB");
        assert_eq!(v["password_encoding"], "base64");
        assert!(v["username"].is_null());
    }

    #[test]
    fn base64_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }
}
