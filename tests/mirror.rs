//! Mirrors with real processes: one `tessera mgmt`, storage servers killed
//! with SIGKILL and restarted during a seeded write workload through the
//! driver. Every acknowledged write must read back, resync must copy only
//! what the bitmasks name, and the replicas must end equal (`volume verify`).
//!
//! The long thrash test: `TESSERA_THRASH_SECS=300 cargo test --release --test mirror -- --ignored`
//! (`TESSERA_THRASH_REPLICAS=3` for three replicas; `TESSERA_SEED=N` replays a run).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_driver::{Client, MgmtServer, Volume};
use tessera_net::proto::{
    AdminCommand, ClusterStatus, Epoch, FLAG_FUA, FLAG_REPLICA, MgmtReply, MgmtRequest,
    MirrorState, Request, Role, Status, VolumeId,
};
use tessera_net::quic::{Alpn, Endpoint};

const BLOCK: u64 = 4096;
/// Heartbeat timeout of the management server in these tests.
const HEARTBEAT_TIMEOUT_MS: u64 = 1_500;

fn seed() -> u64 {
    std::env::var("TESSERA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d69_7272)
}

async fn open(cluster: &TestCluster, mgmt: &MgmtProc, name: &str) -> Volume {
    let identity = cluster.identity(Role::Client, "app");
    let servers = [MgmtServer {
        addr: mgmt.addr,
        name: "mgmt".into(),
    }];
    let client = Client::connect(&servers, &identity).await.unwrap();
    client.open_volume(name).await.unwrap()
}

/// A volume of `mib` MiB with every page on `servers` (first = primary).
async fn mirrored_volume(
    cluster: &TestCluster,
    mgmt: &MgmtProc,
    name: &str,
    mib: u64,
    servers: &[&str],
) {
    let reply = admin(
        mgmt,
        cluster,
        create(name, mib, servers.len() as u8, Some(servers)),
    )
    .await;
    assert!(matches!(reply, MgmtReply::Applied { .. }), "{reply:?}");
    let reply = admin(
        mgmt,
        cluster,
        AdminCommand::SetPartition {
            volume: name.into(),
            first_page: 0,
            end_page: mib,
            servers: servers.iter().map(|s| s.to_string()).collect(),
        },
    )
    .await;
    assert!(matches!(reply, MgmtReply::Applied { .. }), "{reply:?}");
}

/// Replica states of every partition of `volume`.
fn states(status: &ClusterStatus, volume: &str) -> Vec<Vec<(String, MirrorState)>> {
    status
        .volumes
        .iter()
        .find(|v| v.name == volume)
        .map(|v| {
            v.partitions
                .iter()
                .map(|p| {
                    p.replicas
                        .iter()
                        .map(|r| (r.server.clone(), r.state))
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn all_in_sync(status: &ClusterStatus, volume: &str) -> bool {
    let servers_up = |name: &str| status.servers.iter().any(|s| s.name == name && s.up);
    states(status, volume)
        .iter()
        .flatten()
        .all(|(s, state)| *state == MirrorState::InSync && servers_up(s))
}

/// Wait until every mirror of `volume` is in sync (resyncs can take a while under load).
async fn wait_in_sync(mgmt: &MgmtProc, cluster: &TestCluster, volume: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = status(mgmt, cluster).await;
        if all_in_sync(&s, volume) {
            return;
        }
        if Instant::now() > deadline {
            for name in ["s1", "s2", "s3"] {
                let log = std::fs::read_to_string(cluster.path(&format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!(
                    "---- {name} (last lines, newest first)\n{}",
                    tail.join("\n")
                );
            }
            panic!(
                "mirrors of {volume} not in sync after {secs} s: {:?}\n{}",
                states(&s, volume),
                mgmt.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What each 4 KiB block last held when a write of it was acknowledged.
type Acked = Arc<Mutex<HashMap<u64, u64>>>;

/// A seeded writer: random ranges of 1..=16 blocks, each block stamped with
/// (block, write tag), until `stop`. Records acknowledged content; counts failures.
struct Workload {
    acked: Acked,
    writes: Arc<AtomicU64>,
    /// The longest a write took (µs): the stall a lost replica causes.
    slowest_us: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn block_bytes(block: u64, tag: u64) -> Vec<u8> {
    let mut out = pattern(block ^ (tag << 20), BLOCK as usize);
    out[..8].copy_from_slice(&block.to_le_bytes());
    out[8..16].copy_from_slice(&tag.to_le_bytes());
    out
}

impl Workload {
    fn start(volume: &Volume, writers: u64, seed: u64) -> Self {
        let acked: Acked = Arc::default();
        let writes = Arc::new(AtomicU64::new(0));
        let slowest_us = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let blocks = volume.size() / BLOCK;
        let tasks = (0..writers)
            .map(|w| {
                let (volume, acked, writes, slowest_us, failures, stop) = (
                    volume.clone(),
                    acked.clone(),
                    writes.clone(),
                    slowest_us.clone(),
                    failures.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed ^ (w << 32));
                    // Writers own disjoint stripes, so no two write one block at once.
                    let stripe = blocks / writers;
                    let mut tag = w << 40;
                    while !stop.load(Ordering::Relaxed) {
                        tag += 1;
                        let count = rng.random_range(1..=16u64).min(stripe);
                        let first = w * stripe + rng.random_range(0..=stripe - count);
                        let mut data = Vec::with_capacity((count * BLOCK) as usize);
                        for b in first..first + count {
                            data.extend_from_slice(&block_bytes(b, tag));
                        }
                        let started = Instant::now();
                        let written = volume.write_at(first * BLOCK, &data).await;
                        slowest_us
                            .fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                        match written {
                            Ok(()) => {
                                let mut a = acked.lock().unwrap();
                                for b in first..first + count {
                                    a.insert(b, tag);
                                }
                                writes.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                eprintln!("write at block {first} failed: {e}");
                                failures.fetch_add(1, Ordering::Relaxed);
                                // Its blocks are now unknown: forget them.
                                let mut a = acked.lock().unwrap();
                                for b in first..first + count {
                                    a.remove(&b);
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Workload {
            acked,
            writes,
            slowest_us,
            failures,
            stop,
            tasks,
        }
    }

    async fn finish(self) -> (HashMap<u64, u64>, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        (
            acked,
            self.writes.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

/// Every acknowledged block reads back as its last acknowledged content.
async fn check_acked(volume: &Volume, acked: &HashMap<u64, u64>) {
    let mut blocks: Vec<_> = acked.iter().collect();
    blocks.sort();
    for (block, tag) in blocks {
        let mut back = vec![0u8; BLOCK as usize];
        volume.read_at(block * BLOCK, &mut back).await.unwrap();
        assert!(
            back == block_bytes(*block, *tag),
            "block {block}: acknowledged write {tag:#x}, found write {:#x} of block {}",
            u64::from_le_bytes(back[8..16].try_into().unwrap()),
            u64::from_le_bytes(back[..8].try_into().unwrap()),
        );
    }
}

/// `tessera volume verify`: every replica holds the same bytes.
fn verify(cluster: &TestCluster, mgmt: &MgmtProc, volume: &str) {
    let out = admin_cli(cluster, mgmt, &["volume", "verify", volume, "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "replicas differ: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(report["regions"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["differences"].as_array().unwrap().len(), 0);
}

fn restart(cluster: &TestCluster, mgmt: &MgmtProc, name: &str) -> StorageProc {
    StorageProc::start(cluster, name, "256M", &["--mgmt", &mgmt.addr.to_string()])
}

/// What `server`'s bits for `peer` say of volume 1, asked by the storage
/// endpoint `asker`.
async fn dirty_regions(asker: &Endpoint, server: &StorageProc, peer: &str) -> MgmtReply {
    let conn = asker
        .connect(server.addr, &server.name, Alpn::Mgmt, Role::Storage)
        .await
        .unwrap();
    let ask = MgmtRequest::DirtyRegions {
        volume: VolumeId(1),
        peer: peer.into(),
    };
    conn.mgmt(&ask).await.unwrap()
}

/// crc32c of each 64 KiB region of `[0, len)` of volume 1 as `server` holds it.
async fn region_sums(cluster: &TestCluster, server: &StorageProc, len: u64) -> Vec<u32> {
    let conn = cluster
        .endpoint(Role::Admin, "admin")
        .connect(server.addr, &server.name, Alpn::Mgmt, Role::Storage)
        .await
        .unwrap();
    let request = MgmtRequest::RegionChecksums {
        volume: VolumeId(1),
        offset: 0,
        length: len,
        region_size: 64 << 10,
    };
    match conn.mgmt(&request).await.unwrap() {
        MgmtReply::Checksums { sums } => sums,
        other => panic!("{other:?}"),
    }
}

/// The fencing rules of the data path, with raw requests: only the primary
/// takes client writes; a mirror takes forwarded writes only from the
/// primary, at the current epoch, while it is not out of sync; a primary
/// records in its bits what an out-of-sync mirror misses.
#[tokio::test]
async fn forwarding_rules_fence_everyone_but_the_primary() {
    let cluster = TestCluster::new();
    let s1 = StorageProc::start(&cluster, "s1", "64M", &[]);
    let s2 = StorageProc::start(&cluster, "s2", "64M", &[]);
    let mgmt = cluster.endpoint(Role::Mgmt, "mgmt-1");
    let map = whole_volume(1, 5, 16 * MIB, &[&s1, &s2]);
    for s in [&s1, &s2] {
        assert!(matches!(
            push(&mgmt, s, &map).await,
            MgmtReply::Applied { .. }
        ));
    }
    let client = cluster.endpoint(Role::Client, "app");
    let data = pattern(1, 4096);
    let forwarded = |epoch: u64, offset: u64| {
        let mut r = Request::write(VolumeId(1), Epoch(epoch), offset, &data, 1).unwrap();
        r.flags |= FLAG_REPLICA;
        r
    };

    // A client write to the mirror would skip replication.
    let to_mirror = s2.connect(&client).await;
    assert_eq!(
        write(&to_mirror, 1, 5, 0, &data).await.status,
        Status::NotOwner
    );
    // A client cannot pose as a primary.
    let reply = to_mirror.data(&forwarded(5, 0), &data).await.unwrap().0;
    assert_eq!(reply.status, Status::Forbidden);
    // Nor can a storage server that is not the partition's primary.
    let s3 = cluster.endpoint(Role::Storage, "s3");
    let reply = s2
        .connect(&s3)
        .await
        .data(&forwarded(5, 0), &data)
        .await
        .unwrap()
        .0;
    assert_eq!(reply.status, Status::NotOwner);
    // The primary at an older epoch (a deposed primary) is refused.
    let as_primary = s2.connect(&cluster.endpoint(Role::Storage, "s1")).await;
    let reply = as_primary.data(&forwarded(4, 0), &data).await.unwrap().0;
    assert_eq!((reply.status, reply.epoch), (Status::StaleEpoch, Epoch(5)));

    // Through the primary, a write lands on both replicas.
    let to_primary = s1.connect(&client).await;
    let both = pattern(2, 64 << 10);
    assert_eq!(write(&to_primary, 1, 5, 0, &both).await.status, Status::Ok);
    assert_eq!(
        region_sums(&cluster, &s1, 64 << 10).await,
        region_sums(&cluster, &s2, 64 << 10).await
    );

    // Out of sync, the mirror takes nothing more; the primary goes on alone
    // and its bits name what the mirror missed.
    let mut away = whole_volume(1, 6, 16 * MIB, &[&s1, &s2]);
    away.partitions[0].replicas[1].state = MirrorState::OutOfSync;
    for s in [&s1, &s2] {
        assert!(matches!(
            push(&mgmt, s, &away).await,
            MgmtReply::Applied { .. }
        ));
    }
    let reply = as_primary.data(&forwarded(6, 0), &data).await.unwrap().0;
    assert_eq!(reply.status, Status::NotOwner);
    assert_eq!(
        write(&to_primary, 1, 6, 3 * (64 << 10), &data).await.status,
        Status::Ok
    );
    match dirty_regions(&s3, &s1, "s2").await {
        MgmtReply::Regions {
            all: false,
            regions,
            region_size,
        } => {
            assert_eq!(region_size, 64 << 10);
            assert!(regions.contains(&(3, 4)), "{regions:?}");
        }
        other => panic!("{other:?}"),
    }
    let sums = (
        region_sums(&cluster, &s1, 4 << 16).await,
        region_sums(&cluster, &s2, 4 << 16).await,
    );
    assert_eq!(sums.0[..3], sums.1[..3]);
    assert_ne!(sums.0[3], sums.1[3], "the mirror missed region 3");
}

/// Every flag byte a client can put on a write to the primary: only plain
/// and FUA writes are taken, and each taken one is on both replicas with the
/// mirror's write-intent bit for the primary set. Before the fix a client's
/// RESYNC bit went through to the mirror, which then skipped its bits, so a
/// failover could leave the replicas unequal while both reported in sync.
#[tokio::test]
async fn client_flags_cannot_make_a_mirror_skip_its_bits() {
    const REGION: u64 = 64 << 10;
    let cluster = TestCluster::new();
    // Bits stay set for the whole test instead of clearing after 5 s idle.
    let config = cluster.path("slow-clean.toml");
    std::fs::write(&config, "clean_after_ms = 600000\n").unwrap();
    let extra = ["--config", config.to_str().unwrap()];
    let s1 = StorageProc::start(&cluster, "s1", "64M", &extra);
    let s2 = StorageProc::start(&cluster, "s2", "64M", &extra);
    let mgmt = cluster.endpoint(Role::Mgmt, "mgmt-1");
    let map = whole_volume(1, 5, 256 * REGION, &[&s1, &s2]);
    for s in [&s1, &s2] {
        assert!(matches!(
            push(&mgmt, s, &map).await,
            MgmtReply::Applied { .. }
        ));
    }
    let to_primary = s1.connect(&cluster.endpoint(Role::Client, "app")).await;
    let mut taken = Vec::new();
    for flags in 0..=u8::MAX {
        let data = pattern(u64::from(flags) + 1, BLOCK as usize);
        let offset = u64::from(flags) * REGION;
        let mut request =
            Request::write(VolumeId(1), Epoch(5), offset, &data, u64::from(flags)).unwrap();
        request.flags = flags;
        let (reply, message) = to_primary.data(&request, &data).await.unwrap();
        match reply.status {
            Status::Ok => taken.push(flags),
            Status::BadRequest | Status::Forbidden => {}
            other => panic!(
                "flags {flags:#04x}: {other:?} {}",
                String::from_utf8_lossy(&message)
            ),
        }
    }
    assert_eq!(taken, [0, FLAG_FUA]);

    let (primary, mirror) = (
        region_sums(&cluster, &s1, 256 * REGION).await,
        region_sums(&cluster, &s2, 256 * REGION).await,
    );
    assert_eq!(primary, mirror, "the replicas differ");
    let zero = crc32c::crc32c(&[0u8; REGION as usize]);
    assert!(primary[..2].iter().all(|s| *s != zero));
    assert!(
        primary[2..].iter().all(|s| *s == zero),
        "a refused write landed"
    );

    match dirty_regions(&cluster.endpoint(Role::Storage, "s3"), &s2, "s1").await {
        MgmtReply::Regions {
            all: false,
            regions,
            ..
        } => {
            let marked: Vec<u64> = regions.iter().flat_map(|(a, b)| *a..*b).collect();
            assert_eq!(marked, [0, 1], "the mirror's bits for the primary");
        }
        other => panic!("{other:?}"),
    }
}

/// Kill `victim` during a write workload, keep writing, bring it back and
/// wait for its resync; nothing the application saw failed.
async fn lose_and_return(victim: usize) {
    let (cluster, mgmt, mut servers) = three_servers(HEARTBEAT_TIMEOUT_MS, "256M").await;
    mirrored_volume(&cluster, &mgmt, "m", 32, &["s1", "s2"]).await;
    let volume = open(&cluster, &mgmt, "m").await;
    let workload = Workload::start(&volume, 4, seed());
    tokio::time::sleep(Duration::from_millis(800)).await;

    let name = servers[victim].name.clone();
    servers[victim].kill9();
    let survivor = if victim == 0 { "s2" } else { "s1" };
    wait_status(&mgmt, &cluster, "the lost replica out of sync", |s| {
        states(s, "m")[0]
            .iter()
            .any(|(n, st)| *n == name && *st == MirrorState::OutOfSync)
            && states(s, "m")[0][0].0 == survivor
    })
    .await;
    let before = workload.writes.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        workload.writes.load(Ordering::Relaxed) > before,
        "writes go on at the survivor"
    );

    servers[victim] = restart(&cluster, &mgmt, &name);
    wait_in_sync(&mgmt, &cluster, "m", 60).await;
    let slowest = Duration::from_micros(workload.slowest_us.load(Ordering::Relaxed));
    let (acked, writes, failures) = workload.finish().await;
    assert_eq!(failures, 0, "the application saw write errors");
    assert!(writes > 50, "only {writes} writes");
    check_acked(&volume, &acked).await;
    volume.flush().await.unwrap();
    verify(&cluster, &mgmt, "m");
    let s = status(&mgmt, &cluster).await;
    let copied: u64 = s.servers.iter().map(|s| s.resynced_bytes).sum();
    assert!(copied > 0, "the returning replica was resynced");
    println!(
        "lost {name}: {writes} writes acknowledged, slowest {slowest:?}, {} blocks checked, {copied} bytes resynced",
        acked.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_mirror_during_writes_then_resync() {
    lose_and_return(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_primary_during_writes_fails_over_then_resync() {
    lose_and_return(0).await;
}

/// Writing 1% of a 1 GiB volume while its mirror is away makes resync copy
/// about 1%: the bitmask names the written regions and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_copies_only_what_was_written_while_away() {
    let (cluster, mgmt, mut servers) = three_servers(HEARTBEAT_TIMEOUT_MS, "512M").await;
    mirrored_volume(&cluster, &mgmt, "big", 1024, &["s1", "s2"]).await;
    let volume = open(&cluster, &mgmt, "big").await;
    // Data written while both are up is not copied again.
    for i in 0..16u64 {
        volume
            .write_at(i * 64 * MIB, &pattern(i, 256 << 10))
            .await
            .unwrap();
    }
    // Bits clear within a cleaning interval (1 s); reports come with heartbeats (1 s).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    wait_status(
        &mgmt,
        &cluster,
        "the first writes cleaned from the bitmask",
        |s| {
            s.mirrors
                .iter()
                .any(|m| m.peer == "s2" && m.dirty_regions == 0)
        },
    )
    .await;
    servers[1].kill9();

    const REGION: u64 = 64 << 10;
    let regions = (1024 * MIB / REGION) / 100 + 1; // 1% of the volume's regions
    let mut rng = StdRng::seed_from_u64(seed());
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < regions {
        chosen.insert(rng.random_range(0..1024 * MIB / REGION));
    }
    for r in &chosen {
        volume
            .write_at(r * REGION, &pattern(*r, REGION as usize))
            .await
            .unwrap();
    }
    let away = wait_status(&mgmt, &cluster, "bitmask report of the away mirror", |s| {
        s.mirrors
            .iter()
            .any(|m| m.peer == "s2" && m.dirty_regions == regions)
    })
    .await;
    assert_eq!(
        states(&away, "big")[0][1],
        ("s2".into(), MirrorState::OutOfSync)
    );
    // What an operator sees.
    let out = admin_cli(&cluster, &mgmt, &["mirror", "status", "big", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["state"], "out of sync", "{rows}");
    assert_eq!(rows[0]["differing_regions"], regions, "{rows}");
    assert_eq!(rows[0]["differing_bytes"], regions * REGION, "{rows}");
    let out = admin_cli(&cluster, &mgmt, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("out of sync") && text.contains("regions"),
        "{text}"
    );

    servers[1] = restart(&cluster, &mgmt, "s2");
    let out = admin_cli(
        &cluster,
        &mgmt,
        &["mirror", "wait", "big", "--timeout", "60"],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all_in_sync(&status(&mgmt, &cluster).await, "big"));
    let written = regions * REGION;
    // The counter arrives with the heartbeats: wait for the report after the
    // resync, then one more.
    let copied_by_s1 = |s: &ClusterStatus| {
        s.servers
            .iter()
            .find(|s| s.name == "s1")
            .unwrap()
            .resynced_bytes
    };
    wait_status(&mgmt, &cluster, "the resync counter", |s| {
        copied_by_s1(s) >= written
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let copied = copied_by_s1(&status(&mgmt, &cluster).await);
    println!(
        "written while away: {written} bytes ({regions} regions); resync copied {copied} bytes ({:.2}% of the volume)",
        100.0 * copied as f64 / (1024 * MIB) as f64
    );
    assert!(
        copied >= written && copied <= written + 16 * REGION,
        "resync copied {copied} bytes for {written} written\n{}",
        servers[0]
            .log()
            .lines()
            .filter(|l| l.contains("resync"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for r in chosen.iter().take(20) {
        let mut back = vec![0u8; REGION as usize];
        volume.read_at(r * REGION, &mut back).await.unwrap();
        assert!(back == pattern(*r, REGION as usize), "region {r}");
    }
    verify(&cluster, &mgmt, "big");
}

/// A mirror whose disk was replaced comes back empty: it is copied whole, at
/// a limited rate, and the copy resumes from the bitmasks after the
/// management server and the primary are killed in the middle of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_mirror_gets_a_full_copy_that_resumes_after_restarts() {
    const MIB_WRITTEN: u64 = 24;
    const REGIONS: u64 = 32 * MIB / (64 << 10);
    let cluster = TestCluster::new();
    let mut mgmt = MgmtProc::start(&cluster, HEARTBEAT_TIMEOUT_MS);
    let config = cluster.path("slow-resync.toml");
    std::fs::write(&config, "resync_rate = \"3M\"\n").unwrap();
    let mgmt_addr = mgmt.addr.to_string();
    let args = ["--mgmt", &mgmt_addr, "--config", config.to_str().unwrap()];
    let mut s1 = StorageProc::start(&cluster, "s1", "256M", &args);
    let mut s2 = StorageProc::start(&cluster, "s2", "256M", &args);
    wait_status(&mgmt, &cluster, "2 servers up", |s| {
        s.servers.iter().filter(|s| s.up).count() == 2
    })
    .await;
    mirrored_volume(&cluster, &mgmt, "w", 32, &["s1", "s2"]).await;
    let volume = open(&cluster, &mgmt, "w").await;
    let data = pattern(9, (MIB_WRITTEN * MIB) as usize);
    for (i, chunk) in data.chunks(4 << 20).enumerate() {
        volume.write_at(i as u64 * (4 << 20), chunk).await.unwrap();
    }

    // A replaced disk: the same server, an empty data file.
    s2.kill9();
    std::fs::remove_file(&s2.data).unwrap();
    s2 = StorageProc::start(&cluster, "s2", "256M", &args);
    let progress = |s: &ClusterStatus| {
        s.mirrors
            .iter()
            .find(|m| m.peer == "s2")
            .and_then(|m| m.resync.clone())
    };
    let started = wait_status(&mgmt, &cluster, "a full resync under way", |s| {
        progress(s).is_some_and(|p| p.total_regions == REGIONS && p.copied_regions > 0)
    })
    .await;
    println!("full resync: {:?}", progress(&started));

    // The management server dies and comes back mid-copy...
    let mgmt_at = mgmt.addr;
    mgmt.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    mgmt = MgmtProc::start_at(&cluster, HEARTBEAT_TIMEOUT_MS, mgmt_at);
    let before = wait_status(&mgmt, &cluster, "more copied", |s| {
        progress(s).is_some_and(|p| p.copied_regions > REGIONS / 4)
    })
    .await;
    let copied_bytes = |s: &ClusterStatus| {
        s.servers
            .iter()
            .find(|s| s.name == "s1")
            .map_or(0, |s| s.resynced_bytes)
    };
    let before = copied_bytes(&before);
    // ...then the primary: its resync starts again from the bits, not from the start.
    s1.kill9();
    s1 = StorageProc::start(&cluster, "s1", "256M", &args);
    let resumed = wait_status(&mgmt, &cluster, "the resync resumed", |s| {
        // A report of the new process (its byte counter began again).
        copied_bytes(s) < before
            && progress(s).is_some_and(|p| p.total_regions > 0)
            && s.servers.iter().all(|s| s.up)
    })
    .await;
    let resumed = progress(&resumed).unwrap();
    println!("after the primary's restart: {resumed:?}");
    assert!(
        resumed.total_regions <= REGIONS - 64,
        "the resync started over: {resumed:?}"
    );
    wait_in_sync(&mgmt, &cluster, "w", 90).await;
    let mut back = vec![0u8; data.len()];
    volume.read_at(0, &mut back).await.unwrap();
    assert!(back == data, "data read back differs");
    verify(&cluster, &mgmt, "w");
    drop((s1, s2));
}

/// SIGKILL and restart random storage servers while writing; one replica of
/// every partition stays alive (one server down at a time, and the next kill
/// waits until the mirrors are in sync again).
async fn thrash(duration: Duration, seed: u64, replicas: u8) {
    println!(
        "thrash: seed {seed}, {} s, {replicas} replicas",
        duration.as_secs()
    );
    let (cluster, mgmt, mut servers) = three_servers(HEARTBEAT_TIMEOUT_MS, "256M").await;
    let reply = admin(&mgmt, &cluster, create("t", 48, replicas, None)).await;
    assert!(matches!(reply, MgmtReply::Applied { .. }), "{reply:?}");
    let volume = open(&cluster, &mgmt, "t").await;
    let workload = Workload::start(&volume, 4, seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        let victim = rng.random_range(0..servers.len());
        let name = servers[victim].name.clone();
        servers[victim].kill9();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..2500))).await;
        servers[victim] = restart(&cluster, &mgmt, &name);
        wait_in_sync(&mgmt, &cluster, "t", 120).await;
    }
    let (acked, writes, failures) = workload.finish().await;
    assert_eq!(failures, 0, "the application saw write errors");
    check_acked(&volume, &acked).await;
    volume.flush().await.unwrap();
    verify(&cluster, &mgmt, "t");
    println!(
        "thrash: {kills} kills, {writes} writes, {} blocks checked",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thrash_short() {
    thrash(Duration::from_secs(8), seed(), 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "several minutes: TESSERA_THRASH_SECS=300 cargo test --release --test mirror -- --ignored"]
async fn thrash_long() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let secs = env("TESSERA_THRASH_SECS", 300);
    let replicas = env("TESSERA_THRASH_REPLICAS", 2).clamp(2, 3) as u8;
    thrash(Duration::from_secs(secs), seed(), replicas).await;
}
