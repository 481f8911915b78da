//! Micro-benchmarks of the per-request paths: `cargo bench -p tessera-bench`.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tessera_engine::store::bitmask::Bitmasks;
use tessera_net::proto::{
    Epoch, MirrorState, Opcode, Partition, Replica, Request, VolumeId, VolumeMap, parse_request,
};

fn headers(c: &mut Criterion) {
    let request = Request::new(Opcode::Read, VolumeId(7), Epoch(42), 1 << 30, 4096, 9);
    let bytes = request.encode();
    c.bench_function("request header encode", |b| {
        b.iter(|| black_box(black_box(&request).encode()))
    });
    c.bench_function("request header parse", |b| {
        b.iter(|| black_box(parse_request(black_box(&bytes)).unwrap()))
    });
}

fn checksums(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32c");
    for size in [4096usize, 1 << 20] {
        let data = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{size} bytes"), |b| {
            b.iter(|| black_box(crc32c::crc32c(black_box(&data))))
        });
    }
    group.finish();
}

fn bitmasks(c: &mut Criterion) {
    let mut hot = Bitmasks::new(64);
    let pools = hot.set(VolumeId(1), "mirror", 10..11).unwrap();
    let (_, bits) = hot.snapshot(pools[0]).unwrap();
    hot.persisted(pools[0], bits);
    c.bench_function("bitmask set, hot region (no metadata write)", |b| {
        b.iter(|| black_box(hot.set(VolumeId(1), "mirror", black_box(10..11)).unwrap()))
    });
    let mut cold = Bitmasks::new(64);
    let mut region = 0u64;
    c.bench_function("bitmask set then clear", |b| {
        b.iter(|| {
            region = (region + 17) % 30_000;
            cold.set(VolumeId(1), "mirror", region..region + 1).unwrap();
            black_box(cold.clear(VolumeId(1), "mirror", region..region + 1))
        })
    });
}

fn map_lookup(c: &mut Criterion) {
    let addr: SocketAddr = "127.0.0.1:7401".parse().unwrap();
    for partitions in [3u64, 64, 4096] {
        let map = VolumeMap {
            id: VolumeId(1),
            name: "v".into(),
            epoch: Epoch(1),
            size: partitions << 30,
            page_size: 1 << 20,
            partitions: (0..partitions)
                .map(|i| Partition {
                    first_page: i * 1024,
                    end_page: (i + 1) * 1024,
                    replicas: vec![Replica {
                        server: format!("s{i}"),
                        addr,
                        state: MirrorState::InSync,
                    }],
                })
                .collect(),
        };
        let page = partitions * 1024 - 1;
        c.bench_function(&format!("map lookup, {partitions} partitions"), |b| {
            b.iter(|| black_box(black_box(&map).partition_at(black_box(page))))
        });
    }
}

criterion_group!(micro, headers, checksums, bitmasks, map_lookup);
criterion_main!(micro);
