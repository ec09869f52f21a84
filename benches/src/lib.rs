//! Shared pieces of roost's criterion benchmarks.
//!
//! [`CountingAlloc`] is a global allocator wrapper that counts allocations, so a bench
//! can report allocations per operation next to its time (the hot paths aim for zero).
#![deny(missing_docs)]
#![allow(unsafe_code)] // a GlobalAlloc wrapper cannot be written without it

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts every allocation made through it, then defers to the system allocator.
pub struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's own arguments, so the
// `GlobalAlloc` contract is exactly `System`'s; the counter has no effect on memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged (see above).
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged (see above).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged (see above).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations made by `f`, averaged over `iterations` calls.
pub fn allocations_per_op(iterations: u64, mut f: impl FnMut()) -> f64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..iterations {
        f();
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    (after - before) as f64 / iterations as f64
}

/// A criterion [`Profiler`](criterion::profiler::Profiler) that samples the benchmark
/// with pprof and writes `flamegraph.svg` into the benchmark's report directory.
///
/// pprof's own criterion integration does not build against criterion 0.8, hence
/// this adapter. Use it with criterion's `--profile-time`, on a build with frame
/// pointers (pprof unwinds by them here):
///
/// ```sh
/// RUSTFLAGS="-C force-frame-pointers=yes" cargo bench -p roost-benches --bench router -- \
///     --profile-time 10 'fan-out'
/// # -> target/criterion/<group>/<bench>/profile/flamegraph.svg
/// ```
pub struct Flamegraph {
    frequency: i32,
    guard: Option<pprof::ProfilerGuard<'static>>,
}

impl Flamegraph {
    /// Samples `frequency` times per second while a benchmark is profiled.
    pub fn new(frequency: i32) -> Flamegraph {
        Flamegraph {
            frequency,
            guard: None,
        }
    }
}

impl criterion::profiler::Profiler for Flamegraph {
    fn start_profiling(&mut self, benchmark_id: &str, _dir: &std::path::Path) {
        match pprof::ProfilerGuardBuilder::default()
            .frequency(self.frequency)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
        {
            Ok(guard) => self.guard = Some(guard),
            Err(e) => eprintln!("{benchmark_id}: cannot start the profiler: {e}"),
        }
    }

    fn stop_profiling(&mut self, benchmark_id: &str, dir: &std::path::Path) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let written = guard
            .report()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|report| {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                let path = dir.join("flamegraph.svg");
                let file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
                report.flamegraph(file).map_err(|e| e.to_string())?;
                Ok(path)
            });
        match written {
            Ok(path) => eprintln!("{benchmark_id}: flame graph in {}", path.display()),
            Err(e) => eprintln!("{benchmark_id}: no flame graph: {e}"),
        }
    }
}
