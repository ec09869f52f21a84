//! Where the engine's durable state goes: sessions and retained messages in an
//! embedded LSM store (fjall), behind the engine's `SessionStore` trait. (`$queue/`
//! partitions live in the `roost-queue` crate's segment logs.)

pub mod fjall_journal;
pub mod session_store;
