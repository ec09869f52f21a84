//! What operators see and touch: the HTTP admin API with `/metrics`, the `$SYS` status
//! topics, giving memory back after disconnect storms, and the event-loop stall
//! detector.

pub mod admin;
pub mod memory;
pub mod stalls;
pub mod sys;
