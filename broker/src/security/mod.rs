//! Who may connect and what they may do: the password file (argon2id and SCRAM
//! verifiers, `roost passwd`), the HTTP auth hook, JWTs, the ACL file, and [`auth::Auth`],
//! which puts them together as the engine's authenticator.

pub mod acl;
pub mod auth;
pub mod auth_hook;
pub mod jwt;
pub mod passwd;
