//! What operators see and touch: the HTTP admin API with `/metrics`, the `$SYS` status
//! topics, and giving memory back after disconnect storms.

pub mod admin;
pub mod memory;
pub mod sys;
