//! The driver against a real cluster: one `tessera mgmt`, three `tessera storage`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_driver::{BlockingVolume, Client, DriverError, MgmtServer};
use tessera_net::proto::{AdminCommand, MgmtReply, Refusal, Role};

async fn cluster_with_volume(mib: u64) -> (TestCluster, MgmtProc, Vec<StorageProc>) {
    let (cluster, mgmt, servers) = three_servers(5_000, "64M").await;
    let create = create("db", mib, 1, None);
    assert!(matches!(
        admin(&mgmt, &cluster, create).await,
        MgmtReply::Applied { .. }
    ));
    (cluster, mgmt, servers)
}

fn mgmt_servers(mgmt: &MgmtProc) -> Vec<MgmtServer> {
    vec![MgmtServer {
        addr: mgmt.addr,
        name: "mgmt".into(),
    }]
}

#[tokio::test]
async fn reads_and_writes_across_pages_and_servers() {
    let (cluster, mgmt, _servers) = cluster_with_volume(24).await;
    let identity = cluster.identity(Role::Client, "app");
    let client = Client::connect(&mgmt_servers(&mgmt), &identity)
        .await
        .unwrap();
    let volume = client.open_volume("db").await.unwrap();
    assert_eq!(volume.size(), 24 * MIB);
    assert_eq!(volume.map().partitions.len(), 3);

    // 3 MiB from just below the first partition boundary (page 8): three servers' worth of pieces.
    let at = 8 * MIB - 8192;
    let data = pattern(1, 3 << 20);
    volume.write_at(at, &data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    volume.read_at(at, &mut back).await.unwrap();
    assert_eq!(back, data);

    let mut unwritten = vec![1u8; 64 << 10];
    volume.read_at(20 * MIB, &mut unwritten).await.unwrap();
    assert!(unwritten.iter().all(|b| *b == 0));

    volume.write_zeroes(at, 8192).await.unwrap();
    volume.trim(8 * MIB, MIB).await.unwrap();
    volume.write_at_fua(12 * MIB, &data[..4096]).await.unwrap();
    volume.flush().await.unwrap();
    let mut back = vec![1u8; 3 << 20];
    volume.read_at(at, &mut back).await.unwrap();
    assert!(
        back[..8192 + MIB as usize].iter().all(|b| *b == 0),
        "zeroed and trimmed ranges read as zeroes"
    );
    assert_eq!(&back[8192 + MIB as usize..], &data[8192 + MIB as usize..]);

    let err = volume
        .write_at(24 * MIB - 4096, &data[..8192])
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::OutOfRange { .. }), "{err}");
    let err = volume.read_at(100, &mut [0u8; 4096]).await.unwrap_err();
    assert!(matches!(err, DriverError::Misaligned { .. }), "{err}");
    let err = client.open_volume("nope").await.unwrap_err();
    assert!(
        matches!(err, DriverError::Refused(Refusal::NotFound { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn blocking_volume_for_callers_without_async() {
    let (cluster, mgmt, _servers) = cluster_with_volume(8).await;
    let identity = cluster.identity(Role::Client, "app");
    let mgmt = mgmt_servers(&mgmt);
    let handle = std::thread::spawn(move || {
        let volume = BlockingVolume::open(&mgmt, &identity, "db").unwrap();
        let data = pattern(2, 1 << 20);
        volume.write_at(MIB, &data).unwrap();
        volume.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        volume.read_at(MIB, &mut back).unwrap();
        back == data && volume.size() == 8 * MIB
    });
    assert!(handle.join().unwrap());
}

#[tokio::test]
async fn epoch_changes_during_a_seeded_write_workload_lose_nothing() {
    const WRITERS: u64 = 6;
    const REGION: u64 = 4 * MIB;
    let (cluster, mgmt, _servers) = cluster_with_volume(WRITERS * REGION / MIB).await;
    let identity = cluster.identity(Role::Client, "app");
    let client = Client::connect(&mgmt_servers(&mgmt), &identity)
        .await
        .unwrap();
    let volume = client.open_volume("db").await.unwrap();
    let start_epoch = volume.map().epoch;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (volume, stop) = (volume.clone(), stop.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(0x7e55 + w);
                let mut expected = vec![0u8; REGION as usize];
                let mut writes = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || writes < 20 {
                    let blocks = rng.random_range(1..=32u64);
                    let first = rng.random_range(0..REGION / 4096 - blocks);
                    let data = pattern(w << 32 | writes, (blocks * 4096) as usize);
                    let at = w * REGION + first * 4096;
                    // Every write must succeed: epoch changes are the driver's business.
                    volume
                        .write_at(at, &data)
                        .await
                        .unwrap_or_else(|e| panic!("writer {w}: {e}"));
                    expected[(first * 4096) as usize..][..data.len()].copy_from_slice(&data);
                    writes += 1;
                }
                (w, expected, writes)
            })
        })
        .collect();

    // Three layout changes (epoch bumps) while they write.
    let size = WRITERS * REGION;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let grow = |mib| AdminCommand::ResizeVolume {
        name: "db".into(),
        size: size + mib * MIB,
    };
    assert!(matches!(
        admin(&mgmt, &cluster, grow(4)).await,
        MgmtReply::Applied { .. }
    ));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let first_new = size / MIB;
    let move_new = AdminCommand::SetPartition {
        volume: "db".into(),
        first_page: first_new,
        end_page: first_new + 4,
        servers: vec!["s1".into()],
    };
    let reply = admin(&mgmt, &cluster, move_new).await;
    assert!(matches!(reply, MgmtReply::Applied { .. }), "{reply:?}");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(matches!(
        admin(&mgmt, &cluster, grow(8)).await,
        MgmtReply::Applied { .. }
    ));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut total = 0;
    for w in writers {
        let (w, expected, writes) = w.await.unwrap();
        total += writes;
        let mut back = vec![0u8; REGION as usize];
        volume.read_at(w * REGION, &mut back).await.unwrap();
        assert!(back == expected, "writer {w}: data lost");
    }
    let end_epoch = volume.map().epoch;
    println!(
        "{total} writes across epochs {start_epoch}..{end_epoch}, {} map refreshes",
        volume.map_refreshes()
    );
    assert!(
        end_epoch.0 >= start_epoch.0 + 3,
        "the layout did not change under the writers"
    );
    assert!(
        volume.map_refreshes() >= 1,
        "no request was refused for a stale epoch"
    );
}
