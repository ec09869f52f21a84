//! Who may connect, and the ACL each connection is held to.
//!
//! A client is let in when it proves who it is, or when anonymous access is allowed:
//! - a username listed in the password file is decided by the file alone (right password:
//!   in; wrong: CONNACK 0x86, 3.x return code 4);
//! - any other client with a username is asked about at the HTTP hook when one is
//!   configured (a hook that cannot be reached answers as its `on_error` says: 0x86/4 or
//!   0x88/3), else refused with 0x86/4 when a password file is configured;
//! - a client without a username is let in when `allow_anonymous` is true, else asked
//!   about at the hook, else refused with 0x87 (not authorized, 3.x return code 5).
//!
//! With no password file and no hook, usernames are not checked, and `allow_anonymous`
//! (true by default then) decides for everyone.
//!
//! With a JWT key (`jwt_secret_file` or `jwt_public_key_file`), a client that gives a
//! password and is not a user of the password file is decided by its password as a
//! token ([`crate::security::jwt`]): a valid one lets it in as the token's user, held to
//! the token's `acl` claim besides the ACL file, until the token's `exp`; any other
//! gets 0x86 (3.x: 4) without asking the hook.
//!
//! A v5 client may instead authenticate with SCRAM-SHA-256 (enhanced authentication, see
//! [`crate::scram`]) against the verifiers of the password file ([`Auth::scram`]); the
//! hook and `allow_anonymous` play no part in that: a client that asks for SCRAM passes
//! it or is refused.
//!
//! The password file and the ACL file are read again on SIGHUP ([`Auth::reload`]): a file
//! that fails to read or parse leaves the previous version in force. Connections stay up;
//! the new ACL applies to them at once, new passwords to the next CONNECT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use roost_core::{Connect, ProtocolVersion};

use crate::config::{Config, HookErrorPolicy};
use crate::security::acl::{Acl, AclError, AclHandle, Authorizer};
use crate::security::auth_hook::{AuthHook, HookAnswer, HookRequest};
use crate::security::jwt::{JwtSettings, KeyError, Narrowed, TokenVerifier};
use crate::security::passwd::{PasswdError, PasswordFile};
use roost_engine::scram::{Credentials, Verifier};

pub use roost_engine::auth::Refusal;
use roost_engine::auth::{Authenticator, Grant, Verdict};

/// Bounds a kind of credential check: how many run at once, how many CONNECTs may wait
/// for one, and how many of those places one source address may hold. A password check
/// costs ~19 MiB and tens of milliseconds of CPU (argon2 by design), so without a bound
/// a burst of wrong passwords takes the memory of the machine; past the bound a client
/// is refused with 0x89, server busy (3.x: return code 3), at once, without a check.
/// The share per address keeps one script from filling the line: a client elsewhere
/// still gets a place, and its answer within a few checks' time.
#[derive(Debug)]
struct CheckGate {
    running: tokio::sync::Semaphore,
    /// Places taken (running or waiting) by each source address.
    by_address: parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
    max_per_address: usize,
}

/// A place at a [`CheckGate`], given back when dropped (also when the connection times
/// out or goes away while it waits).
struct Place<'a> {
    gate: &'a CheckGate,
    address: std::net::IpAddr,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut by_address = self.gate.by_address.lock();
        if let Some(n) = by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

/// A turn to run one check: held while it runs.
struct Turn<'a> {
    _running: tokio::sync::SemaphorePermit<'a>,
    _place: Place<'a>,
}

impl CheckGate {
    fn new(running: usize, max_waiting: usize) -> CheckGate {
        let running = running.max(1);
        CheckGate {
            running: tokio::sync::Semaphore::new(running),
            by_address: Default::default(),
            waiting: Default::default(),
            max_waiting,
            // An eighth of the places, and at least as many as run at once.
            max_per_address: (max_waiting / 8).max(running),
        }
    }

    /// A turn to run one check for a client at `address`, waiting in line if there is
    /// room in it for that address.
    async fn enter(&self, address: std::net::IpAddr) -> Result<Turn<'_>, Refusal> {
        {
            let mut by_address = self.by_address.lock();
            let n = by_address.entry(address).or_insert(0);
            if *n >= self.max_per_address {
                return Err(Refusal::Busy);
            }
            *n += 1;
        }
        let place = Place {
            gate: self,
            address,
        };
        if let Ok(permit) = self.running.try_acquire() {
            return Ok(Turn {
                _running: permit,
                _place: place,
            });
        }
        // Counted as waiting for as long as it waits.
        let Some(_waiting) = roost_engine::broker::enter(&self.waiting, self.max_waiting) else {
            return Err(Refusal::Busy);
        };
        let permit = self.running.acquire().await.map_err(|_| Refusal::Busy)?;
        Ok(Turn {
            _running: permit,
            _place: place,
        })
    }
}

/// Why the authentication state cannot be set up (at start) or a file of it reloaded
/// (on SIGHUP); each message names the config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// The `password_file` cannot be read or parsed.
    #[error("password_file: {0}")]
    PasswordFile(#[source] PasswdError),
    /// The `acl_file` cannot be read or parsed.
    #[error("acl_file: {0}")]
    AclFile(#[source] AclError),
    /// The hook's `auth_hook.url` is not one roost can ask.
    #[error("auth_hook.url: {0}")]
    HookUrl(String),
    /// The JWT key file cannot be read or holds no usable key.
    #[error("{0}")]
    JwtKey(#[source] KeyError),
    /// The system's random number generator failed (SCRAM's stand-in salts need it).
    #[error("cannot draw random bytes for SCRAM")]
    Random,
}

/// Requests to the auth hook in flight at once (each is a TCP connection to it).
const HOOK_REQUESTS: usize = 256;

/// The broker's authentication and authorization state.
#[derive(Debug)]
pub struct Auth {
    password_path: Option<PathBuf>,
    acl_path: Option<PathBuf>,
    allow_anonymous: bool,
    passwords: Arc<ArcSwap<PasswordFile>>,
    scram: Arc<ScramCredentials>,
    acl: Option<Arc<AclHandle>>,
    hook: Option<AuthHook>,
    /// How a client is refused when the hook cannot answer (`auth_hook.on_error`).
    hook_error: Refusal,
    /// Password checks (`max_auth_checks`, `max_auth_waiting`).
    password_checks: CheckGate,
    /// Questions to the hook ([`HOOK_REQUESTS`], `max_auth_waiting`).
    hook_requests: CheckGate,
    /// The JWT settings and the verifier of their key file (replaced on SIGHUP).
    jwt: Option<(JwtSettings, ArcSwap<TokenVerifier>)>,
}

impl Auth {
    /// Reads the password and ACL files the configuration names; errors name the file.
    pub fn from_config(config: &Config) -> Result<Auth, AuthSetupError> {
        let passwords = match &config.password_file {
            Some(path) => {
                let file = PasswordFile::load(path).map_err(AuthSetupError::PasswordFile)?;
                tracing::info!(
                    users = file.len(),
                    "password file {} loaded",
                    path.display()
                );
                file
            }
            None => PasswordFile::default(),
        };
        let acl = match &config.acl_file {
            Some(path) => {
                let acl = Acl::load(path).map_err(AuthSetupError::AclFile)?;
                log_acl_loaded(&acl, path);
                Some(AclHandle::new(acl))
            }
            None => None,
        };
        let hook = match &config.auth_hook {
            Some(h) => Some(AuthHook::new(h).map_err(AuthSetupError::HookUrl)?),
            None => None,
        };
        let hook_error = Refusal::HookUnavailable {
            deny: config.auth_hook.as_ref().map(|h| h.on_error) == Some(HookErrorPolicy::Deny),
        };
        let jwt = match config.jwt() {
            Some(settings) => {
                let verifier = TokenVerifier::load(&settings).map_err(AuthSetupError::JwtKey)?;
                tracing::info!("JWT authentication on ({verifier:?})");
                Some((settings, ArcSwap::from_pointee(verifier)))
            }
            None => None,
        };
        let passwords = Arc::new(ArcSwap::from_pointee(passwords));
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| AuthSetupError::Random)?;
        Ok(Auth {
            password_path: config.password_file.clone(),
            acl_path: config.acl_file.clone(),
            allow_anonymous: config.allow_anonymous_in_force(),
            scram: Arc::new(ScramCredentials {
                passwords: passwords.clone(),
                secret,
            }),
            passwords,
            acl,
            hook,
            hook_error,
            password_checks: CheckGate::new(config.max_auth_checks, config.max_auth_waiting),
            hook_requests: CheckGate::new(HOOK_REQUESTS, config.max_auth_waiting),
            jwt,
        })
    }

    /// Reads the password file and the ACL file again (SIGHUP). Each file that fails
    /// keeps its previous version; the errors are returned for the log.
    pub fn reload(&self) -> Vec<AuthSetupError> {
        let mut errors = Vec::new();
        if let Some(path) = &self.password_path {
            match PasswordFile::load(path) {
                Ok(file) => {
                    tracing::info!(
                        users = file.len(),
                        "password file {} reloaded",
                        path.display()
                    );
                    self.passwords.store(Arc::new(file));
                }
                Err(e) => errors.push(AuthSetupError::PasswordFile(e)),
            }
        }
        if let (Some(path), Some(handle)) = (&self.acl_path, &self.acl) {
            match Acl::load(path) {
                Ok(acl) => {
                    log_acl_loaded(&acl, path);
                    handle.replace(acl);
                }
                Err(e) => errors.push(AuthSetupError::AclFile(e)),
            }
        }
        if let Some((settings, verifier)) = &self.jwt {
            match TokenVerifier::load(settings) {
                Ok(v) => {
                    tracing::info!("JWT key reloaded");
                    verifier.store(Arc::new(v));
                }
                Err(e) => errors.push(AuthSetupError::JwtKey(e)),
            }
        }
        if let Some(hook) = &self.hook {
            hook.clear_cache();
        }
        errors
    }

    /// Decides whether the client of `connect` (with `client_id` in use) may connect,
    /// and what its token grants. The password check is slow by design, so it runs on
    /// the blocking pool, a bounded number at a time (see [`CheckGate`]).
    pub async fn authenticate(
        &self,
        connect: &Connect,
        client_id: &str,
        peer: SocketAddr,
    ) -> Result<Grant, Refusal> {
        let password = connect.password.as_deref();
        let passwords = self.passwords.load_full();
        let listed = connect
            .username
            .as_deref()
            .is_some_and(|u| passwords.contains(u));
        if let (Some((_, verifier)), Some(token), false) = (&self.jwt, password, listed) {
            let token = verifier
                .load()
                .verify(token, client_id)
                .map_err(Refusal::BadToken)?;
            return Ok(Grant {
                username: Some(token.username),
                expires_at: token.expires_at,
                narrowing: token
                    .access
                    .map(|a| Arc::new(a) as Arc<dyn crate::security::acl::Authorizer>),
            });
        }
        self.check_password(connect, &passwords, client_id, peer)
            .await
            .map(|()| Grant::default())
    }

    /// The password file, the hook and `allow_anonymous`, as the module's top says.
    async fn check_password(
        &self,
        connect: &Connect,
        passwords: &Arc<PasswordFile>,
        client_id: &str,
        peer: SocketAddr,
    ) -> Result<(), Refusal> {
        let password = connect.password.as_deref();
        let Some(user) = connect.username.as_deref() else {
            if self.allow_anonymous {
                return Ok(());
            }
            if let Some(hook) = &self.hook {
                return self.ask_hook(hook, connect, client_id, peer).await;
            }
            return Err(Refusal::AnonymousNotAllowed);
        };
        if passwords.contains(user) || (self.password_path.is_some() && self.hook.is_none()) {
            let turn = self.password_checks.enter(peer.ip()).await?;
            let passwords = passwords.clone();
            let user = user.to_owned();
            let password = password.map(<[u8]>::to_vec).unwrap_or_default();
            let ok = tokio::task::spawn_blocking(move || passwords.verify(&user, &password))
                .await
                .unwrap_or(false);
            drop(turn);
            return if ok {
                Ok(())
            } else {
                Err(Refusal::BadCredentials)
            };
        }
        if let Some(hook) = &self.hook {
            return self.ask_hook(hook, connect, client_id, peer).await;
        }
        if self.allow_anonymous {
            Ok(())
        } else {
            Err(Refusal::NoCredentialCheck)
        }
    }

    async fn ask_hook(
        &self,
        hook: &AuthHook,
        connect: &Connect,
        client_id: &str,
        peer: SocketAddr,
    ) -> Result<(), Refusal> {
        let request = HookRequest {
            client_id,
            username: connect.username.as_deref(),
            password: connect.password.as_deref(),
            peer,
            protocol: match connect.protocol {
                ProtocolVersion::V3_1 => "3.1",
                ProtocolVersion::V3_1_1 => "3.1.1",
                ProtocolVersion::V5 => "5.0",
            },
        };
        let turn = self.hook_requests.enter(peer.ip()).await?;
        let answer = hook.check(request).await;
        drop(turn);
        match answer {
            HookAnswer::Allow => Ok(()),
            HookAnswer::Deny => Err(Refusal::HookDenied),
            HookAnswer::Error => Err(self.hook_error),
        }
    }

    /// Where SCRAM exchanges find their verifiers: the password file in force, so a file
    /// reloaded on SIGHUP applies to the next exchange (and re-authentication).
    pub fn scram(&self) -> Arc<dyn Credentials> {
        self.scram.clone()
    }

    /// The ACL a client is held to; `None` when no ACL file is configured (then the
    /// client may do anything).
    pub fn authorizer(
        &self,
        username: Option<&str>,
        client_id: &Arc<str>,
    ) -> Option<Arc<dyn Authorizer>> {
        self.acl
            .as_ref()
            .map(|handle| handle.for_client(username, client_id))
    }
}

/// What a client is held to: the ACL file's decision (`file`), narrowed by what its
/// credentials grant (a token's `acl` claim), when there is either.
pub fn narrow(
    file: Option<Arc<dyn Authorizer>>,
    grant: Option<Arc<dyn Authorizer>>,
) -> Option<Arc<dyn Authorizer>> {
    match (file, grant) {
        (Some(file), Some(token)) => Some(Arc::new(Narrowed { file, token })),
        (file, None) => file,
        (None, token) => token,
    }
}

impl Authenticator for Auth {
    fn authenticate<'a>(
        &'a self,
        connect: &'a Connect,
        client_id: &'a str,
        peer: SocketAddr,
    ) -> Verdict<'a> {
        Box::pin(Auth::authenticate(self, connect, client_id, peer))
    }

    fn authorizer(
        &self,
        username: Option<&str>,
        client_id: &Arc<str>,
    ) -> Option<Arc<dyn Authorizer>> {
        Auth::authorizer(self, username, client_id)
    }

    fn scram(&self) -> Arc<dyn Credentials> {
        Auth::scram(self)
    }
}

/// The SCRAM verifiers of the password file in force.
struct ScramCredentials {
    passwords: Arc<ArcSwap<PasswordFile>>,
    /// Random per process: stand-in salts for users without a verifier are stable while
    /// the broker runs and reveal nothing.
    secret: [u8; 32],
}

impl std::fmt::Debug for ScramCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramCredentials").finish_non_exhaustive()
    }
}

impl Credentials for ScramCredentials {
    fn verifier(&self, username: &str) -> Option<Verifier> {
        self.passwords.load().scram(username).cloned()
    }

    fn stand_in_secret(&self) -> &[u8] {
        &self.secret
    }
}

fn log_acl_loaded(acl: &Acl, path: &std::path::Path) {
    if acl.rule_count() == 0 {
        tracing::warn!(
            "ACL file {} has no rules: every client may do anything",
            path.display()
        );
    } else {
        tracing::info!(
            rules = acl.rule_count(),
            "ACL file {} loaded",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthHookConfig;
    use crate::security::acl::Access;
    use crate::security::passwd::PasswordFile;
    use crate::security::passwd::tests::cheap_hash;
    use roost_core::ReasonCode;

    struct Files {
        dir: PathBuf,
    }

    impl Files {
        fn new(name: &str) -> Files {
            let dir =
                std::env::temp_dir().join(format!("roost-auth-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("tmp");
            Files { dir }
        }
        fn passwd(&self, users: &[(&str, &str)]) -> PathBuf {
            let mut file = PasswordFile::default();
            for (u, p) in users {
                file.set(u, cheap_hash(p), None).expect("set");
            }
            let path = self.dir.join("passwd");
            file.save(&path).expect("save");
            path
        }
        fn acl(&self, text: &str) -> PathBuf {
            let path = self.dir.join("acl");
            std::fs::write(&path, text).expect("write");
            path
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn connect(user: Option<&str>, password: Option<&str>) -> Connect {
        Connect {
            protocol: ProtocolVersion::V5,
            client_id: "c1".into(),
            username: user.map(str::to_owned),
            password: password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes())),
            ..Connect::default()
        }
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:40000".parse().expect("addr")
    }

    async fn code(auth: &Auth, user: Option<&str>, password: Option<&str>) -> ReasonCode {
        match auth
            .authenticate(&connect(user, password), "c1", peer())
            .await
        {
            Ok(_) => ReasonCode::Success,
            Err(refusal) => refusal.reason_code(),
        }
    }

    #[tokio::test]
    async fn without_files_everyone_is_in() {
        let auth = Auth::from_config(&Config::default()).expect("auth");
        assert_eq!(code(&auth, None, None).await, ReasonCode::Success);
        assert_eq!(code(&auth, Some("x"), Some("y")).await, ReasonCode::Success);
        assert!(auth.authorizer(None, &Arc::from("c1")).is_none());
        let closed = Config {
            allow_anonymous: Some(false),
            ..Config::default()
        };
        let auth = Auth::from_config(&closed).expect("auth");
        assert_eq!(code(&auth, None, None).await, ReasonCode::NotAuthorized);
        assert_eq!(
            code(&auth, Some("x"), None).await,
            ReasonCode::NotAuthorized
        );
    }

    #[tokio::test]
    async fn password_file_decides() {
        let files = Files::new("pw");
        let config = Config {
            password_file: Some(files.passwd(&[("alice", "wonderland")])),
            ..Config::default()
        };
        let auth = Auth::from_config(&config).expect("auth");
        assert_eq!(
            code(&auth, Some("alice"), Some("wonderland")).await,
            ReasonCode::Success
        );
        assert_eq!(
            code(&auth, Some("alice"), Some("nope")).await,
            ReasonCode::BadUserNameOrPassword
        );
        assert_eq!(
            code(&auth, Some("alice"), None).await,
            ReasonCode::BadUserNameOrPassword
        );
        assert_eq!(
            code(&auth, Some("mallory"), Some("wonderland")).await,
            ReasonCode::BadUserNameOrPassword
        );
        assert_eq!(code(&auth, None, None).await, ReasonCode::NotAuthorized);
        // Anonymous access can be opened explicitly next to the file.
        let open = Config {
            allow_anonymous: Some(true),
            ..config
        };
        let auth = Auth::from_config(&open).expect("auth");
        assert_eq!(code(&auth, None, None).await, ReasonCode::Success);
        assert_eq!(
            code(&auth, Some("alice"), Some("nope")).await,
            ReasonCode::BadUserNameOrPassword
        );
    }

    #[tokio::test]
    async fn reload_keeps_the_old_file_on_error() {
        let files = Files::new("reload");
        let config = Config {
            password_file: Some(files.passwd(&[("alice", "one")])),
            acl_file: Some(files.acl("everyone\nallow read a\n")),
            ..Config::default()
        };
        let auth = Auth::from_config(&config).expect("auth");
        let client = auth
            .authorizer(Some("alice"), &Arc::from("c1"))
            .expect("acl");
        assert!(client.allows(Access::Read, "a"));
        files.passwd(&[("alice", "one"), ("bob", "two")]);
        files.acl("everyone\nallow read b\n");
        assert!(auth.reload().is_empty());
        assert_eq!(
            code(&auth, Some("bob"), Some("two")).await,
            ReasonCode::Success
        );
        assert!(
            !client.allows(Access::Read, "a"),
            "new rules apply to live clients"
        );
        assert!(client.allows(Access::Read, "b"));
        std::fs::write(files.dir.join("passwd"), "bob:plain\n").expect("write");
        files.acl("everyone\nallow sing b\n");
        let errors = auth.reload();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(matches!(
            &errors[..],
            [AuthSetupError::PasswordFile(_), AuthSetupError::AclFile(_)]
        ));
        assert!(errors[0].to_string().starts_with("password_file: "));
        assert!(errors[1].to_string().starts_with("acl_file: "));
        assert_eq!(
            code(&auth, Some("bob"), Some("two")).await,
            ReasonCode::Success
        );
        assert!(client.allows(Access::Read, "b"));
    }

    #[test]
    fn reload_replaces_scram_verifiers() {
        let files = Files::new("scram");
        let path = files.dir.join("passwd");
        let mut file = PasswordFile::default();
        let v1 = Verifier::generate("one", roost_engine::scram::DEFAULT_ITERATIONS).expect("v");
        file.set("alice", cheap_hash("one"), Some(v1.clone()))
            .expect("set");
        file.save(&path).expect("save");
        let auth = Auth::from_config(&Config {
            password_file: Some(path.clone()),
            ..Config::default()
        })
        .expect("auth");
        // Taken once, like a live connection that may re-authenticate later.
        let credentials = auth.scram();
        assert_eq!(credentials.verifier("alice"), Some(v1));
        assert_eq!(credentials.verifier("bob"), None);
        let v2 = Verifier::generate("two", roost_engine::scram::DEFAULT_ITERATIONS).expect("v");
        file.set("alice", cheap_hash("two"), Some(v2.clone()))
            .expect("set");
        file.set("bob", cheap_hash("three"), None).expect("set");
        file.save(&path).expect("save");
        assert!(auth.reload().is_empty());
        assert_eq!(credentials.verifier("alice"), Some(v2));
        assert_eq!(credentials.verifier("bob"), None, "bob has no verifier");
    }

    #[test]
    fn missing_files_are_startup_errors() {
        let config = Config {
            password_file: Some(PathBuf::from("/nonexistent/roost/passwd")),
            ..Config::default()
        };
        let e = Auth::from_config(&config).expect_err("missing");
        assert!(e.to_string().contains("password_file"), "{e}");
        let config = Config {
            acl_file: Some(PathBuf::from("/nonexistent/roost/acl")),
            ..Config::default()
        };
        let e = Auth::from_config(&config).expect_err("missing");
        assert!(e.to_string().contains("acl_file"), "{e}");
    }

    #[tokio::test]
    async fn hook_down_answers_as_configured() {
        // A port nobody listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        for (policy, expected) in [
            (HookErrorPolicy::Deny, ReasonCode::BadUserNameOrPassword),
            (HookErrorPolicy::Unavailable, ReasonCode::ServerUnavailable),
        ] {
            let config = Config {
                auth_hook: Some(AuthHookConfig {
                    url: format!("http://127.0.0.1:{port}/auth"),
                    timeout_ms: 500,
                    cache_seconds: 10,
                    on_error: policy,
                }),
                ..Config::default()
            };
            let auth = Auth::from_config(&config).expect("auth");
            assert_eq!(code(&auth, Some("u"), Some("p")).await, expected);
            assert_eq!(
                code(&auth, None, None).await,
                expected,
                "anonymous asks the hook"
            );
        }
    }
}
