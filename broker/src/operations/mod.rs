//! What operators see and touch: the HTTP admin API with `/metrics` and the web
//! dashboard, the `$SYS` status topics, and giving memory back after disconnect storms.

pub mod admin;
pub mod dashboard;
pub mod memory;
pub mod sys;
