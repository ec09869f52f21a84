//! The engine's clock: one function that every part of the engine reads the time from.
//!
//! It is tokio's clock, which is the system's monotonic clock in production and a
//! virtual one in tests that pause time (`#[tokio::test(start_paused = true)]`), so a
//! test can let a session expire or a will delay pass without waiting for it.

use std::time::Instant;

/// Now.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
