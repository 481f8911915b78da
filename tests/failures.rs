//! Failures handled fast and without false alarms, with real processes: a
//! management server restarted at once, a storage server restarted after a
//! few seconds. Each test reproduces a bug of issue 14 first.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tessera_driver::{Client, MgmtServer, Volume};
use tessera_net::proto::{
    AdminCommand, ClusterStatus, Epoch, MgmtReply, MirrorState, Opcode, Request, Role, Status,
};

/// The management server's default heartbeat timeout: the bugs showed there.
const HEARTBEAT_TIMEOUT_MS: u64 = 5_000;

async fn mirrored(mgmt: &MgmtProc, cluster: &TestCluster, name: &str, servers: &[&str]) {
    let reply = admin(
        mgmt,
        cluster,
        create(name, 64, servers.len() as u8, Some(servers)),
    )
    .await;
    assert!(matches!(reply, MgmtReply::Applied { .. }), "{reply:?}");
    let reply = admin(
        mgmt,
        cluster,
        AdminCommand::SetPartition {
            volume: name.into(),
            first_page: 0,
            end_page: 64,
            servers: servers.iter().map(|s| s.to_string()).collect(),
        },
    )
    .await;
    assert!(matches!(reply, MgmtReply::Applied { .. }), "{reply:?}");
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

/// Write 4 KiB blocks one after another until `stop`; returns the longest
/// stall: the longest time between two writes completing (every write must
/// succeed).
fn writer(volume: Volume, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        let mut longest = Duration::ZERO;
        let mut last = Instant::now();
        let mut block = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let data = pattern(block, 4096);
            volume.write_at((block % 4096) * 4096, &data).await.unwrap();
            longest = longest.max(last.elapsed());
            last = Instant::now();
            block += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        longest
    })
}

fn in_sync(status: &ClusterStatus, volume: &str) -> bool {
    status
        .volumes
        .iter()
        .filter(|v| v.name == volume)
        .flat_map(|v| &v.partitions)
        .flat_map(|p| &p.replicas)
        .all(|r| r.state == MirrorState::InSync)
}

/// Poll the cluster for `how_long`: every server stays up and the epoch stays
/// `epoch` (a mark-down or a promotion would bump it).
async fn assert_calm(mgmt: &MgmtProc, cluster: &TestCluster, epoch: Epoch, how_long: Duration) {
    let until = Instant::now() + how_long;
    while Instant::now() < until {
        let s = status(mgmt, cluster).await;
        let down: Vec<_> = s
            .servers
            .iter()
            .filter(|s| !s.up)
            .map(|s| &s.name)
            .collect();
        assert!(down.is_empty(), "marked down: {down:?}\n{}", mgmt.log());
        assert_eq!(s.epoch, epoch, "the map changed\n{}", mgmt.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_management_server_restarted_at_once_marks_no_server_down() {
    let (cluster, mut mgmt, _servers) = three_servers(HEARTBEAT_TIMEOUT_MS, "256M").await;
    mirrored(&mgmt, &cluster, "m", &["s1", "s2"]).await;
    let settled = wait_status(&mgmt, &cluster, "mirrors in sync", |s| in_sync(s, "m")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(open(&cluster, &mgmt, "m").await, stop.clone());
    for kill in [true, false] {
        // SIGKILL sends no CONNECTION_CLOSE; SIGTERM should.
        match kill {
            true => mgmt.kill9(),
            false => mgmt.stop(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        mgmt = MgmtProc::start_at(&cluster, HEARTBEAT_TIMEOUT_MS, mgmt.addr);
        // Past the heartbeat timeout, which a restarted server grants everyone.
        assert_calm(
            &mgmt,
            &cluster,
            settled.epoch,
            Duration::from_millis(HEARTBEAT_TIMEOUT_MS + 3_000),
        )
        .await;
        let s = status(&mgmt, &cluster).await;
        assert!(
            s.servers
                .iter()
                .all(|s| !s.held.is_empty() || s.name == "s3"),
            "every server holding the volume heartbeated the new process: {s:#?}"
        );
    }
    let log = mgmt.log();
    assert!(log.contains("management server up"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
    stop.store(true, Ordering::Relaxed);
    // Reported, not asserted: CI machines are noisy (the target is 1 s).
    println!(
        "longest write stall across both restarts: {:?}",
        writes.await.unwrap()
    );
}

/// Lines of `log` that mention `server` and contain `what`.
fn count(log: &str, server: &str, what: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(what) && l.contains(&format!("server={server}")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_server_restarted_after_a_few_seconds_does_not_flap() {
    let (cluster, mgmt, mut servers) = three_servers(HEARTBEAT_TIMEOUT_MS, "256M").await;
    mirrored(&mgmt, &cluster, "m", &["s1", "s2"]).await;
    wait_status(&mgmt, &cluster, "mirrors in sync", |s| in_sync(s, "m")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(open(&cluster, &mgmt, "m").await, stop.clone());
    servers[1].kill9();
    wait_status(&mgmt, &cluster, "s2 marked down", |s| {
        s.servers.iter().any(|s| s.name == "s2" && !s.up)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = status(&mgmt, &cluster).await.epoch;
    let addr = mgmt.addr.to_string();
    // On its old address, as a service restarted on its host would be.
    let listen = servers[1].addr;
    servers[1] = StorageProc::start_at(&cluster, "s2", "256M", listen, &["--mgmt", &addr]);
    let back = Instant::now();
    let resyncing = wait_status(&mgmt, &cluster, "s2 resyncing or in sync", |s| {
        s.epoch > before
            && s.volumes
                .iter()
                .flat_map(|v| &v.partitions)
                .flat_map(|p| &p.replicas)
                .any(|r| r.server == "s2" && r.state != MirrorState::OutOfSync)
    })
    .await;
    println!("resync began {:?} after the restart", back.elapsed());
    let synced = wait_status(&mgmt, &cluster, "back in sync", |s| in_sync(s, "m")).await;
    // Give a flap the time it took to show: a push to the dead process timing out.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = mgmt.log();
    // Once, when it died (its mirror loss was pushed to it in vain, or it
    // missed heartbeats), and never after it came back.
    assert_eq!(count(&log, "s2", "marking down"), 1, "{log}");
    assert_eq!(count(&log, "s1", "marking down"), 0, "{log}");
    let end = status(&mgmt, &cluster).await;
    assert_eq!(
        end.epoch, synced.epoch,
        "the map changed after the resync: {end:#?}"
    );
    assert!(resyncing.epoch > before);
    stop.store(true, Ordering::Relaxed);
    println!("longest write stall: {:?}", writes.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_back_within_seconds_is_used_at_once() {
    // One replica: nothing fails over, the client waits for the server itself.
    let (cluster, mgmt, mut servers) = three_servers(HEARTBEAT_TIMEOUT_MS, "256M").await;
    mirrored(&mgmt, &cluster, "one", &["s1"]).await;
    let volume = open(&cluster, &mgmt, "one").await;
    volume.write_at(0, &pattern(1, 4096)).await.unwrap();
    let addr = mgmt.addr.to_string();
    let listen = servers[0].addr;
    for outage in [Duration::from_secs(1), Duration::from_secs(4)] {
        servers[0].kill9();
        let down = Instant::now();
        let write = {
            let volume = volume.clone();
            tokio::spawn(async move { volume.write_at(4096, &pattern(2, 4096)).await })
        };
        tokio::time::sleep(outage).await;
        servers[0] = StorageProc::start_at(&cluster, "s1", "256M", listen, &["--mgmt", &addr]);
        let back = Instant::now();
        write.await.unwrap().unwrap();
        let after_return = back.elapsed();
        println!(
            "outage {outage:?}: the write took {:?}, {after_return:?} after the server was back",
            down.elapsed()
        );
        // Without the reset it waited out the request timeout (10 s); a
        // loose bound, well above the noise of a busy machine.
        assert!(
            after_return < Duration::from_secs(6),
            "the write waited {after_return:?} for a server that was back"
        );
    }
    let mut read = vec![0; 4096];
    volume.read_at(4096, &mut read).await.unwrap();
    assert_eq!(read, pattern(2, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_wait_after_a_restart_waits_for_the_new_process() {
    let (cluster, mgmt, mut servers) = three_servers(HEARTBEAT_TIMEOUT_MS, "256M").await;
    mirrored(&mgmt, &cluster, "m", &["s1", "s2"]).await;
    let before = wait_status(&mgmt, &cluster, "mirrors in sync", |s| in_sync(s, "m")).await;
    // A rolling restart's step, as a script runs it: restart, then wait. No
    // write fails meanwhile, so only the new process's registration tells.
    let listen = servers[1].addr;
    let addr = mgmt.addr.to_string();
    servers[1].kill9();
    servers[1] = StorageProc::start_at(&cluster, "s2", "256M", listen, &["--mgmt", &addr]);
    let out = tokio::task::block_in_place(|| {
        admin_cli(&cluster, &mgmt, &["mirror", "wait", "m", "--timeout", "60"])
    });
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Its mirror was resynced (writes it acknowledged but had not flushed
    // may be gone), and the wait saw it through.
    let settled = status(&mgmt, &cluster).await;
    assert!(in_sync(&settled, "m"), "{settled:#?}");
    assert!(
        settled.epoch > before.epoch,
        "the wait returned before the restart was noticed: {settled:#?}\n{}",
        mgmt.log()
    );
    assert!(
        mgmt.log().contains("mirror restarted: resyncing"),
        "{}",
        mgmt.log()
    );
    assert_calm(&mgmt, &cluster, settled.epoch, Duration::from_secs(2)).await;
    let text = admin_cli(&cluster, &mgmt, &["volume", "show", "m"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("s2 (in sync)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_which_replicas_servers_are_down() {
    let (cluster, mgmt, mut servers) = three_servers(HEARTBEAT_TIMEOUT_MS, "256M").await;
    mirrored(&mgmt, &cluster, "m", &["s1", "s2"]).await;
    wait_status(&mgmt, &cluster, "mirrors in sync", |s| in_sync(s, "m")).await;
    servers[1].kill9();
    wait_status(&mgmt, &cluster, "s2 down", |s| {
        s.servers.iter().any(|s| s.name == "s2" && !s.up)
    })
    .await;
    let show = admin_cli(&cluster, &mgmt, &["volume", "show", "m"]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains("s2 (in sync, server down)")
            || show.contains("s2 (out of sync, server down)"),
        "{show}"
    );
    let rows = admin_cli(&cluster, &mgmt, &["mirror", "status", "m"]);
    let rows = String::from_utf8_lossy(&rows.stdout);
    assert!(rows.contains("s2 down"), "{rows}");
    let json = admin_cli(&cluster, &mgmt, &["mirror", "status", "m", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json[0]["mirror_up"], false, "{json}");
    assert_eq!(json[0]["primary_up"], true, "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_mirror_stalls_writes_briefly() {
    let (cluster, mgmt, mut servers) = three_servers(HEARTBEAT_TIMEOUT_MS, "256M").await;
    mirrored(&mgmt, &cluster, "m", &["s1", "s2"]).await;
    wait_status(&mgmt, &cluster, "mirrors in sync", |s| in_sync(s, "m")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(open(&cluster, &mgmt, "m").await, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    servers[1].kill9();
    let lost = wait_status(&mgmt, &cluster, "s2 out of sync", |s| {
        s.volumes
            .iter()
            .flat_map(|v| &v.partitions)
            .flat_map(|p| &p.replicas)
            .any(|r| r.server == "s2" && r.state == MirrorState::OutOfSync)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let longest = writes.await.unwrap();
    // Reported, not asserted (the target is 2 s, the goal 1 s): the
    // forward timeout (1.5 s) is most of it.
    println!("losing a mirror: longest write stall {longest:?}");
    if std::env::var_os("TESSERA_SHOW_LOGS").is_some() {
        println!("{}\n{}", servers[0].log(), mgmt.log());
    }
    assert!(lost.servers.iter().any(|s| s.name == "s1" && s.up));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_lease_serves_nothing() {
    // Lease: half the heartbeat timeout, 1 s.
    let (cluster, mgmt, servers) = three_servers(2_000, "256M").await;
    mirrored(&mgmt, &cluster, "one", &["s1"]).await;
    let volume = open(&cluster, &mgmt, "one").await;
    volume.write_at(0, &pattern(1, 4096)).await.unwrap();
    let map = status(&mgmt, &cluster).await;
    let (id, epoch) = map
        .volumes
        .iter()
        .find(|v| v.name == "one")
        .map(|v| (v.id.0, v.epoch.0))
        .unwrap();
    let app = cluster.endpoint(Role::Client, "raw");
    let conn = servers[0].connect(&app).await;
    let read = || op(&conn, Opcode::Read, id, epoch, 0, 4096);
    assert_eq!(read().await.status, Status::Ok);
    // The management server stops answering: no heartbeat is acknowledged.
    mgmt.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let refused = loop {
        let reply = read().await;
        if reply.status != Status::Ok {
            break reply;
        }
        assert!(frozen.elapsed() < Duration::from_secs(10), "still served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.status, Status::Unavailable);
    let gone = frozen.elapsed();
    println!("reads refused {gone:?} after the management server froze (lease 1 s)");
    assert!(
        gone >= Duration::from_millis(500),
        "refused before a lease could have run out: {gone:?}"
    );
    mgmt.signal(libc::SIGCONT);
    let back = Instant::now();
    while read().await.status != Status::Ok {
        assert!(back.elapsed() < Duration::from_secs(10), "no new lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut data = vec![0; 4096];
    volume.read_at(0, &mut data).await.unwrap();
    assert_eq!(data, pattern(1, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_write_that_arrives_late_does_not_land() {
    let (cluster, mgmt, servers) = three_servers(HEARTBEAT_TIMEOUT_MS, "256M").await;
    mirrored(&mgmt, &cluster, "m", &["s1", "s2"]).await;
    wait_status(&mgmt, &cluster, "mirrors in sync", |s| in_sync(s, "m")).await;
    let map = status(&mgmt, &cluster).await;
    let volume = map.volumes.iter().find(|v| v.name == "m").unwrap();
    let (id, epoch) = (volume.id, volume.epoch);
    let app = cluster.endpoint(Role::Client, "app");
    let s1 = servers[0].connect(&app).await;
    let write = |tag: u64, sequence: u64| {
        let data = pattern(tag, 4096);
        let mut request = Request::write(id, epoch, 0, &data, sequence).unwrap();
        request.session = 0x5e55;
        request.sequence = sequence;
        (request, data)
    };
    // W1 is sent, delayed in the network, retried and acknowledged; then
    // W2 to the same block is acknowledged.
    let (w1, w1_data) = write(1, 1);
    let (reply, _) = s1.data(&w1, &w1_data).await.unwrap();
    assert_eq!(reply.status, Status::Ok);
    let (w2, w2_data) = write(2, 2);
    let (reply, _) = s1.data(&w2, &w2_data).await.unwrap();
    assert_eq!(reply.status, Status::Ok);
    // The delayed original W1 arrives at last, on a connection of its own.
    let late = cluster.endpoint(Role::Client, "app");
    let late = servers[0].connect(&late).await;
    let (reply, _) = late.data(&w1, &w1_data).await.unwrap();
    assert_eq!(reply.status, Status::Ok, "answered as the write it copies");
    // The block holds W2, on both replicas.
    let read = Request::new(Opcode::Read, id, epoch, 0, 4096, 9);
    let (reply, data) = s1.data(&read, &[]).await.unwrap();
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(data, w2_data, "the late W1 landed after W2");
    let out = admin_cli(&cluster, &mgmt, &["volume", "verify", "m"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A session's copy of a write it let go of long ago is refused, not run.
    let (old, old_data) = write(3, 1);
    for sequence in 10..10 + 4200 {
        let (w, d) = write(4, sequence);
        let (reply, _) = s1.data(&w, &d).await.unwrap();
        assert_eq!(reply.status, Status::Ok);
    }
    let (reply, _) = late.data(&old, &old_data).await.unwrap();
    assert_eq!(reply.status, Status::BadRequest);
    let (_, data) = s1.data(&read, &[]).await.unwrap();
    assert_eq!(data, pattern(4, 4096));
}
