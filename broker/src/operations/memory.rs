//! Gives memory freed by closed connections back to the operating system.
//!
//! An allocator keeps what is freed for reuse: after thousands of clients disconnect,
//! the broker's RSS would stay near its peak for a while (with glibc's malloc, measured:
//! 34.9 MiB after 10,000 idle connections closed, against 8.5 MiB before they came,
//! and 10.5 MiB after `malloc_trim`). The roost binary allocates with jemalloc, which
//! returns unused pages after a 10 s decay; a purge hands them back at once. It walks
//! the arenas under their locks, so it runs on a blocking thread, and only after many
//! connections have gone.

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

/// Returns the allocator's free pages to the operating system: jemalloc's (the roost
/// binary's allocator, see main.rs), which would otherwise give them back over its
/// 10 s decay, and glibc's (everything else, such as the library's tests).
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // "arena.<MALLCTL_ARENAS_ALL>.purge": every arena's unused dirty pages.
    const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
    // SAFETY: the name is NUL-terminated and this control reads and writes nothing
    // (all four pointers null, lengths 0), as jemalloc requires for purge.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
    release_glibc_memory();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_glibc_memory() {
    // SAFETY: malloc_trim takes no pointer from us; it only walks glibc's own free
    // lists, under the arena locks every malloc and free also take.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_glibc_memory() {}
