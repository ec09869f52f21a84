//! Subscription trie benchmarks: matching against a router holding 100,000 subscriptions.
//!
//! The mix, by filter shape:
//! - 90,000 exact filters `site/{i}/dev/{j}/temp` (1,000 sites x 90 devices, one client each);
//! - 5,000 single-level wildcards `site/{i}/dev/+/temp` (5 per site);
//! - 3,000 multi-level wildcards `site/{i}/#` (3 per site);
//! - 700 clients on `alerts/fire` and 300 on `alerts/+`: `alerts/fire` fans out to 1,000;
//! - 500 on `alerts/smoke`;
//! - 500 on `x/#`, or in a second router on `#`, to see what catch-all subscribers cost.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use roost_benches::{CountingAlloc, Flamegraph, allocations_per_op};
use roost_router::{Matches, Router, Subscription, SubscriptionOptions};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Prints the allocations per call of `f` (after one warm-up call, so buffers that are
/// reused across calls have reached their size).
fn report_allocations(name: &str, mut f: impl FnMut()) {
    f();
    let allocs = allocations_per_op(1_000, f);
    println!("{name}: {allocs:.2} allocations per op");
}

fn sub(client: String) -> Subscription {
    Subscription {
        client_id: Arc::from(client),
        options: SubscriptionOptions::default(),
        identifier: None,
    }
}

/// 100,000 subscriptions; with `catch_all`, 500 of them are `#`, otherwise `x/#`.
fn build(catch_all: bool) -> Router {
    let router = Router::new();
    for i in 0..1_000 {
        for j in 0..90 {
            router.subscribe(
                None,
                &format!("site/{i}/dev/{j}/temp"),
                sub(format!("d{i}-{j}")),
            );
        }
        for k in 0..5 {
            router.subscribe(
                None,
                &format!("site/{i}/dev/+/temp"),
                sub(format!("p{i}-{k}")),
            );
        }
        for k in 0..3 {
            router.subscribe(None, &format!("site/{i}/#"), sub(format!("h{i}-{k}")));
        }
    }
    for k in 0..700 {
        router.subscribe(None, "alerts/fire", sub(format!("af{k}")));
    }
    for k in 0..300 {
        router.subscribe(None, "alerts/+", sub(format!("ap{k}")));
    }
    let everything = if catch_all { "#" } else { "x/#" };
    for k in 0..500 {
        router.subscribe(None, "alerts/smoke", sub(format!("as{k}")));
        router.subscribe(None, everything, sub(format!("all{k}")));
    }
    assert_eq!(router.len(), 100_000);
    router
}

fn bench_router(c: &mut Criterion) {
    let router = build(false);
    let mut out = Matches::default();
    for (name, topic) in [
        ("router/match 9 of 100k", "site/42/dev/7/temp"),
        ("router/match none of 100k", "site/42/dev/7/humidity"),
        ("router/fan-out 1000 of 100k", "alerts/fire"),
    ] {
        report_allocations(name, || {
            out.clear();
            router.matches(topic, &mut out);
        });
    }

    c.bench_function("router/match 9 of 100k", |b| {
        b.iter(|| {
            out.clear();
            router.matches(black_box("site/42/dev/7/temp"), &mut out);
            assert_eq!(out.direct.len(), 9);
        })
    });
    c.bench_function("router/match none of 100k", |b| {
        b.iter(|| {
            out.clear();
            router.matches(black_box("site/42/dev/7/humidity"), &mut out);
        })
    });
    c.bench_function("router/fan-out 1000 of 100k", |b| {
        b.iter(|| {
            out.clear();
            router.matches(black_box("alerts/fire"), &mut out);
            assert_eq!(out.direct.len(), 1_000);
        })
    });
    c.bench_function("router/subscribe+unsubscribe at 100k", |b| {
        let s = sub("bench-client".into());
        b.iter(|| {
            router.subscribe(None, black_box("site/42/dev/new/temp"), s.clone());
            router.unsubscribe(None, black_box("site/42/dev/new/temp"), "bench-client");
        })
    });

    let router = build(true);
    c.bench_function("router/match 509 of 100k (500 on #)", |b| {
        b.iter(|| {
            out.clear();
            router.matches(black_box("site/42/dev/7/temp"), &mut out);
            assert_eq!(out.direct.len(), 509);
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_profiler(Flamegraph::new(1000));
    targets = bench_router
}
criterion_main!(benches);
