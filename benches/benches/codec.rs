//! Codec benchmarks: decoding and encoding the PUBLISH that dominates broker traffic,
//! for MQTT 3.1.1 and 5.0, with allocations per operation printed before each group.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use roost_benches::{CountingAlloc, Flamegraph, allocations_per_op};
use roost_core::codec::{self, PublishView};
use roost_core::{Packet, Properties, ProtocolVersion, Publish, QoS};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn sample(version: ProtocolVersion) -> (Publish, BytesMut) {
    let mut properties = Properties::default();
    if version.is_v5() {
        properties.content_type = Some("application/json".into());
        properties.user_properties = vec![("device".into(), "sensor-17".into())];
        properties.message_expiry_interval = Some(60);
    }
    let publish = Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 42,
        topic: "site/17/dev/3/temp".into(),
        payload: Bytes::from(vec![b'x'; 100]),
        properties,
        ..Publish::default()
    };
    let mut wire = BytesMut::new();
    codec::encode(&Packet::Publish(publish.clone()), version, &mut wire).expect("encodes");
    (publish, wire)
}

fn bench_codec(c: &mut Criterion) {
    for (name, version) in [
        ("v311", ProtocolVersion::V3_1_1),
        ("v5", ProtocolVersion::V5),
    ] {
        let (publish, wire) = sample(version);
        let mut group = c.benchmark_group(format!("publish_{name}"));

        // Decoding from a buffer that holds 64 packets, as a socket read would.
        let batch: BytesMut = std::iter::repeat_n(&wire[..], 64)
            .flatten()
            .copied()
            .collect();
        let decode_all = |buf: &mut BytesMut| {
            while let Some(p) = codec::decode(buf, Some(version), usize::MAX).expect("valid") {
                black_box(p);
            }
        };
        let allocs = allocations_per_op(100, || decode_all(&mut batch.clone())) / 64.0;
        println!("publish_{name}/decode: {allocs:.2} allocations per packet");
        group.throughput(Throughput::Elements(64));
        group.bench_function("decode", |b| {
            b.iter_batched_ref(
                || batch.clone(),
                decode_all,
                criterion::BatchSize::SmallInput,
            )
        });

        let view = PublishView {
            dup: false,
            qos: publish.qos,
            retain: false,
            topic: &publish.topic,
            packet_id: publish.packet_id,
            properties: &publish.properties,
            subscription_identifiers: &[],
            message_expiry_interval: publish.properties.message_expiry_interval,
            topic_alias: None,
            payload: &publish.payload,
        };
        let mut out = BytesMut::with_capacity(64 * 1024);
        let mut encode = || {
            if out.len() > 60 * 1024 {
                out.clear();
            }
            codec::encode_publish(&view, version, &mut out).expect("encodes");
        };
        let allocs = allocations_per_op(10_000, &mut encode);
        println!("publish_{name}/encode: {allocs:.2} allocations per packet");
        group.throughput(Throughput::Elements(1));
        group.bench_function("encode", |b| b.iter(&mut encode));
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_profiler(Flamegraph::new(1000));
    targets = bench_codec
}
criterion_main!(benches);
