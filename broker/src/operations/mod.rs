//! What operators see and touch: the HTTP admin API with `/metrics` and the web
//! dashboard, the `$SYS` status topics, giving memory back after disconnect storms,
//! and the event-loop stall detector.

pub mod admin;
pub mod dashboard;
pub mod memory;
pub mod queues_command;
pub mod stalls;
pub mod sys;
