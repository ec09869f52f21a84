//! The password file and the `roost passwd` command that manages it.
//!
//! One `username:hash[:scram]` line per user. The hash is an argon2id PHC string
//! (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`): salted, slow, self-describing; it
//! checks the password of a CONNECT. The optional third field is a SCRAM-SHA-256 verifier
//! in RFC 5803's form (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, see
//! [`crate::scram`]), for MQTT 5 enhanced authentication, which cannot use an argon2 hash.
//! A PHC string holds no ':', so the first ':' after the hash starts the verifier, and
//! files from before SCRAM (two fields) read as they did.
//! Blank lines and lines starting with `#` are kept as they are. A file with a line that
//! is not a well-formed hash (a plain-text password, say) is refused as a whole, so a
//! typo never silently locks a user out or lets one in.
//!
//! Writes go to a temporary file in the same directory that is then renamed over the
//! old one, so a reader (the broker on SIGHUP) sees the old or the new file, never half.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::LazyLock;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

use roost_engine::scram::{self, Verifier};

/// Why a password file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line that is not `username:hash`.
    #[error("password file line {line}: {why}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// The password cannot be used with SCRAM.
    #[error("{0}")]
    Scram(#[from] scram::ScramError),
    /// A username that cannot be stored.
    #[error("invalid username {0:?}: it must be non-empty and contain no ':' or line break")]
    BadUsername(String),
    /// Hashing failed (out of memory, bad parameters).
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// The users and their password hashes, as read from the file.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    lines: Vec<Line>,
    index: HashMap<String, usize>,
}

#[derive(Debug, Clone)]
enum Line {
    /// Blank or comment, kept verbatim.
    Other(String),
    User {
        name: String,
        hash: String,
        scram: Option<Box<Verifier>>,
    },
}

impl PasswordFile {
    /// Reads a password file; a missing file is an error.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswdError::Io {
            path: path.display().to_string(),
            source,
        })?;
        PasswordFile::parse(&text)
    }

    /// Parses password file text, checking that every hash is a PHC string argon2 reads.
    pub fn parse(text: &str) -> Result<PasswordFile, PasswdError> {
        let mut file = PasswordFile::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let syntax = |why: &str| PasswdError::Syntax {
                line,
                why: why.to_owned(),
            };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                file.lines.push(Line::Other(raw.to_owned()));
                continue;
            }
            let Some((name, fields)) = trimmed.split_once(':') else {
                return Err(syntax("expected username:hash"));
            };
            let (hash, scram) = match fields.split_once(':') {
                Some((hash, verifier)) => {
                    let v = Verifier::parse(verifier).map_err(syntax)?;
                    (hash, Some(Box::new(v)))
                }
                None => (fields, None),
            };
            if name.is_empty() {
                return Err(syntax("empty username"));
            }
            let parsed =
                PasswordHash::new(hash).map_err(|_| syntax("not a PHC password hash string"))?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err(syntax("only argon2 hashes are supported"));
            }
            if file.index.contains_key(name) {
                return Err(syntax(&format!("user {name:?} appears twice")));
            }
            file.index.insert(name.to_owned(), file.lines.len());
            file.lines.push(Line::User {
                name: name.to_owned(),
                hash: hash.to_owned(),
                scram,
            });
        }
        Ok(file)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when the file has no users.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// True when `user` has a line.
    pub fn contains(&self, user: &str) -> bool {
        self.index.contains_key(user)
    }

    /// Checks `password` for `user`. Slow by design (tens of milliseconds): call it off
    /// the async runtime. An unknown user costs as much as a known one, so timing does
    /// not tell which usernames exist.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.hash_of(user) {
            Some(hash) => verify_hash(hash, password),
            None => {
                let _ = verify_hash(&DUMMY_HASH, password);
                false
            }
        }
    }

    fn hash_of(&self, user: &str) -> Option<&str> {
        match self.lines.get(*self.index.get(user)?) {
            Some(Line::User { hash, .. }) => Some(hash),
            _ => None,
        }
    }

    /// `user`'s SCRAM-SHA-256 verifier, if the line has one.
    pub fn scram(&self, user: &str) -> Option<&Verifier> {
        match self.lines.get(*self.index.get(user)?) {
            Some(Line::User { scram, .. }) => scram.as_deref(),
            _ => None,
        }
    }

    /// Sets (adds or replaces) `user`'s password hash and SCRAM verifier. Both come from
    /// one password: a verifier is never kept next to a new hash, so a changed password
    /// does not stay valid for SCRAM.
    pub fn set(
        &mut self,
        user: &str,
        hash: String,
        scram: Option<Verifier>,
    ) -> Result<(), PasswdError> {
        if user.is_empty() || user.contains([':', '\n', '\r']) || user.trim() != user {
            return Err(PasswdError::BadUsername(user.to_owned()));
        }
        let line = Line::User {
            name: user.to_owned(),
            hash,
            scram: scram.map(Box::new),
        };
        match self.index.get(user) {
            Some(&at) => self.lines[at] = line,
            None => {
                self.index.insert(user.to_owned(), self.lines.len());
                self.lines.push(line);
            }
        }
        Ok(())
    }

    /// Removes `user`; false when there was no such user.
    pub fn remove(&mut self, user: &str) -> bool {
        let Some(at) = self.index.remove(user) else {
            return false;
        };
        self.lines.remove(at);
        for i in self.index.values_mut() {
            if *i > at {
                *i -= 1;
            }
        }
        true
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            match line {
                Line::Other(text) => out.push_str(text),
                Line::User { name, hash, scram } => {
                    out.push_str(name);
                    out.push(':');
                    out.push_str(hash);
                    if let Some(v) = scram {
                        out.push(':');
                        out.push_str(&v.render());
                    }
                }
            }
            out.push('\n');
        }
        out
    }

    /// Writes the file atomically; a new file is readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), PasswdError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let io = |source| PasswdError::Io {
            path: path.display().to_string(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map_or_else(|| "passwd".into(), |n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
        let mode = std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o7777);
        let written = (|| {
            let mut f = std::fs::File::options()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }
}

/// Hashes `password` with argon2id, the crate's default (OWASP) parameters and a fresh
/// random salt.
pub fn hash_password(password: &[u8]) -> Result<String, PasswdError> {
    Argon2::default()
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|e| PasswdError::Hash(e.to_string()))
}

/// Checks `password` against a PHC hash string (parameters come from the string).
pub fn verify_hash(hash: &str, password: &[u8]) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A hash of nothing in particular, verified against for unknown users.
static DUMMY_HASH: LazyLock<String> =
    LazyLock::new(|| hash_password(b"roost: no such user").unwrap_or_default());

/// `roost passwd`: add, change or delete a user in a password file.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  roost passwd /etc/roost/passwd alice          (asks for the password)\n  roost passwd -b /etc/roost/passwd alice s3cret\n  roost passwd -D /etc/roost/passwd alice\n\nThe file is created when missing (mode 0600). A running broker reads it again on SIGHUP.\nEach user gets an argon2id hash (for the password of a CONNECT) and a SCRAM-SHA-256\nverifier (for MQTT 5 enhanced authentication) unless --no-scram is given."
)]
pub struct PasswdArgs {
    /// Batch mode: take the password from the command line instead of prompting.
    #[arg(short = 'b', conflicts_with = "delete")]
    pub batch: bool,
    /// Delete the user.
    #[arg(short = 'D')]
    pub delete: bool,
    /// Store no SCRAM-SHA-256 verifier: the user can then log in with a CONNECT password
    /// only. A SCRAM verifier is cheaper to attack than the argon2id hash if the file leaks.
    #[arg(long, conflicts_with = "delete")]
    pub no_scram: bool,
    /// PBKDF2 iterations of the SCRAM verifier (each client login computes them).
    #[arg(long, default_value_t = scram::DEFAULT_ITERATIONS, conflicts_with = "delete",
          value_parser = clap::value_parser!(u32).range(i64::from(scram::MIN_ITERATIONS)..=i64::from(scram::MAX_ITERATIONS)))]
    pub scram_iterations: u32,
    /// The password file.
    pub file: PathBuf,
    /// The username.
    pub user: String,
    /// The password (batch mode only).
    pub password: Option<String>,
}

/// Why `roost passwd` left the file as it was.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    /// The file cannot be read, parsed or written, or the user cannot be stored.
    #[error(transparent)]
    File(#[from] PasswdError),
    /// `-D` with a password.
    #[error("-D takes no password")]
    PasswordToDelete,
    /// `-D` on a file that does not exist.
    #[error("{} does not exist", .0.display())]
    NoFile(PathBuf),
    /// `-D` of a user the file does not have.
    #[error("no user {user:?} in {}", file.display())]
    NoUser {
        /// The username.
        user: String,
        /// The file.
        file: PathBuf,
    },
    /// `-b` without a password.
    #[error("-b needs a password after the username")]
    NoPassword,
    /// A password without `-b`.
    #[error("a password on the command line needs -b (or leave it out to be asked)")]
    PasswordWithoutBatch,
    /// The prompt cannot read from the terminal.
    #[error("cannot read the password from the terminal: {0}")]
    Terminal(#[source] std::io::Error),
    /// The two passwords typed at the prompt differ.
    #[error("the passwords do not match")]
    Mismatch,
    /// An empty password typed at the prompt.
    #[error("empty password")]
    EmptyPassword,
    /// The password cannot be made into a SCRAM verifier.
    #[error("{0} (SCRAM needs it; --no-scram stores the password for CONNECT only)")]
    Scram(#[source] scram::ScramError),
}

/// Runs `roost passwd`; messages go to stderr.
pub fn run(args: PasswdArgs) -> ExitCode {
    match passwd(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roost passwd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn passwd(args: PasswdArgs) -> Result<(), CommandError> {
    let exists = args.file.exists();
    let mut file = if exists {
        PasswordFile::load(&args.file)?
    } else {
        PasswordFile::default()
    };
    if args.delete {
        if args.password.is_some() {
            return Err(CommandError::PasswordToDelete);
        }
        if !exists {
            return Err(CommandError::NoFile(args.file));
        }
        if !file.remove(&args.user) {
            return Err(CommandError::NoUser {
                user: args.user,
                file: args.file,
            });
        }
        file.save(&args.file)?;
        return Ok(());
    }
    let password = match (args.batch, args.password) {
        (true, Some(p)) => p,
        (true, None) => return Err(CommandError::NoPassword),
        (false, Some(_)) => return Err(CommandError::PasswordWithoutBatch),
        (false, None) => prompt()?,
    };
    let hash = hash_password(password.as_bytes())?;
    let scram = if args.no_scram {
        None
    } else {
        Some(Verifier::generate(&password, args.scram_iterations).map_err(CommandError::Scram)?)
    };
    file.set(&args.user, hash, scram)?;
    file.save(&args.file)?;
    Ok(())
}

fn prompt() -> Result<String, CommandError> {
    let first = rpassword::prompt_password("Password: ").map_err(CommandError::Terminal)?;
    let second =
        rpassword::prompt_password("Reenter password: ").map_err(CommandError::Terminal)?;
    if first != second {
        return Err(CommandError::Mismatch);
    }
    if first.is_empty() {
        return Err(CommandError::EmptyPassword);
    }
    Ok(first)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use argon2::{Algorithm, Params, Version};

    /// A cheap hash for tests (the parameters travel in the string).
    pub(crate) fn cheap_hash(password: &str) -> String {
        let params = Params::new(64, 1, 1, None).expect("params");
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes())
            .expect("hash")
            .to_string()
    }

    #[test]
    fn default_hash_is_salted_argon2id() {
        let a = hash_password(b"pw").expect("hash");
        let b = hash_password(b"pw").expect("hash");
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "a fresh salt each time");
        assert!(verify_hash(&a, b"pw"));
        assert!(!verify_hash(&a, b"pW"));
    }

    #[test]
    fn parse_verify_and_render_round_trip() {
        let text = format!(
            "# users\nalice:{}\n\nbob:{}\n",
            cheap_hash("wonderland"),
            cheap_hash("builder")
        );
        let file = PasswordFile::parse(&text).expect("valid");
        assert_eq!(file.len(), 2);
        assert!(file.verify("alice", b"wonderland"));
        assert!(!file.verify("alice", b"builder"));
        assert!(file.verify("bob", b"builder"));
        assert!(!file.verify("carol", b"wonderland"));
        assert_eq!(file.render(), text);
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        let good = cheap_hash("x");
        for (text, line, word) in [
            ("alice:plaintext\n".to_string(), 1, "PHC"),
            ("# c\nalice\n".to_string(), 2, "username:hash"),
            (format!(":{good}\n"), 1, "empty username"),
            (format!("a:{good}\na:{good}\n"), 2, "twice"),
            (
                "a:$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E\n".to_string(),
                1,
                "argon2",
            ),
        ] {
            let e = PasswordFile::parse(&text).expect_err(&text).to_string();
            assert!(e.contains(&format!("line {line}")), "{text:?}: {e}");
            assert!(e.contains(word), "{text:?}: {e}");
        }
    }

    #[test]
    fn set_replace_and_remove() {
        let mut file = PasswordFile::parse("# header\n").expect("valid");
        assert!(file.is_empty());
        file.set("alice", cheap_hash("one"), None).expect("set");
        file.set("bob", cheap_hash("two"), None).expect("set");
        file.set("alice", cheap_hash("three"), None)
            .expect("replace");
        assert_eq!(file.len(), 2);
        assert!(file.verify("alice", b"three"));
        assert!(!file.verify("alice", b"one"));
        assert!(file.remove("alice"));
        assert!(!file.remove("alice"));
        assert!(!file.contains("alice"));
        assert!(file.verify("bob", b"two"));
        let again = PasswordFile::parse(&file.render()).expect("re-parse");
        assert!(again.verify("bob", b"two"));
        assert!(again.render().starts_with("# header\n"));
        for bad in ["", "a:b", "a\nb", " a"] {
            assert!(file.set(bad, cheap_hash("x"), None).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn scram_verifiers_are_a_third_field_and_old_lines_still_read() {
        let old = format!("alice:{}\n", cheap_hash("one"));
        let mut file = PasswordFile::parse(&old).expect("a file from before SCRAM");
        assert!(file.scram("alice").is_none());
        assert_eq!(file.render(), old);
        let v = Verifier::generate("two", scram::DEFAULT_ITERATIONS).expect("verifier");
        file.set("bob", cheap_hash("two"), Some(v.clone()))
            .expect("set");
        let text = file.render();
        let bob = text.lines().nth(1).expect("bob's line");
        assert!(bob.starts_with("bob:$argon2id$"), "{bob}");
        assert!(bob.contains(":SCRAM-SHA-256$4096:"), "{bob}");
        let again = PasswordFile::parse(&text).expect("re-parse");
        assert_eq!(again.scram("bob"), Some(&v));
        assert!(
            again.verify("bob", b"two"),
            "the argon2 hash still checks CONNECT"
        );
        // A new password without a verifier drops the old one.
        file.set("bob", cheap_hash("three"), None).expect("set");
        assert!(file.scram("bob").is_none());
        // A broken verifier refuses the file, naming the line.
        let bad = format!("{}:SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA\n", old.trim_end());
        let e = PasswordFile::parse(&bad)
            .expect_err("bad verifier")
            .to_string();
        assert!(e.contains("line 1") && e.contains("SCRAM key"), "{e}");
    }

    #[test]
    fn save_is_atomic_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("roost-passwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let path = dir.join("passwd");
        let mut file = PasswordFile::default();
        file.set("alice", cheap_hash("pw"), None).expect("set");
        file.save(&path).expect("save");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = PasswordFile::load(&path).expect("load");
        assert!(loaded.verify("alice", b"pw"));
        // Existing permissions are kept.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        loaded.save(&path).expect("save again");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        let leftovers = std::fs::read_dir(&dir).expect("list").count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
        std::fs::remove_dir_all(&dir).ok();
    }
}
