//! Gives memory freed by closed connections back to the operating system.
//!
//! glibc's malloc keeps what is freed in its arenas for reuse: after thousands of
//! clients disconnect, the broker's RSS stays at its peak (measured: 34.9 MiB after
//! 10,000 idle connections closed, against 8.5 MiB before they came). `malloc_trim`
//! hands the free pages back (10.5 MiB). It walks the arenas under their locks, so it
//! runs on a blocking thread, and only after many connections have gone.
//! (mimalloc was measured too: +12 MiB RSS at start and nothing returned.)

use std::sync::Arc;
use std::time::Duration;

use roost_engine::broker::Broker;

/// Connections that must have closed since the last release before the next one.
const CLOSED_BEFORE_RELEASE: usize = 1000;

/// How often the connection count is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Releases free memory whenever at least [`CLOSED_BEFORE_RELEASE`] fewer connections
/// are open than at their peak since the last release, and the buffers of connections
/// gone idle every [`CHECK_EVERY`]. Runs until aborted.
pub async fn release_after_disconnects(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut high = 0;
    loop {
        tick.tick().await;
        // A connection's mailbox keeps a small buffer while deliveries keep coming; an
        // idle one gives it back here.
        broker.release_idle_mailboxes();
        let open = broker.connection_count();
        high = high.max(broker.take_connection_peak());
        if high >= open + CLOSED_BEFORE_RELEASE {
            high = open;
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
    }
}

/// Returns the allocator's free pages to the operating system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointer from us; it only walks glibc's own free
    // lists, under the arena locks every malloc and free also take.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}
