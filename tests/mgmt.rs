//! The management server with real processes: one `tessera mgmt` and three
//! `tessera storage` on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tessera_net::proto::{
    AdminCommand, Epoch, MgmtReply, MgmtRequest, Opcode, Refusal, Role, Status, VolumeMap,
};
use tessera_net::quic::{Alpn, Endpoint, PeerConnection};

async fn get_map(mgmt: &MgmtProc, cluster: &TestCluster, volume: &str) -> VolumeMap {
    let conn = mgmt.connect(cluster, Role::Client, "app").await;
    match conn
        .mgmt(&MgmtRequest::GetMap {
            volume: volume.into(),
        })
        .await
        .unwrap()
    {
        MgmtReply::Map(map) => map,
        other => panic!("{other:?}"),
    }
}

/// A data connection to the primary of the partition holding `page`.
async fn primary(client: &Endpoint, map: &VolumeMap, page: u64) -> PeerConnection {
    let p = map
        .partitions
        .iter()
        .find(|p| p.first_page <= page && page < p.end_page)
        .unwrap();
    let r = &p.replicas[0];
    client
        .connect(r.addr, &r.server, Alpn::Data, Role::Storage)
        .await
        .unwrap()
}

#[tokio::test]
async fn layout_change_refuses_old_epoch_everywhere_and_keeps_data() {
    let (cluster, mgmt, _servers) = three_servers(5_000, "64M").await;
    let MgmtReply::Applied { epoch: other_epoch } =
        admin(&mgmt, &cluster, create("other", 4, 1, Some(&["s1"]))).await
    else {
        panic!("not created");
    };
    let MgmtReply::Applied { epoch } = admin(&mgmt, &cluster, create("db", 30, 1, None)).await
    else {
        panic!("not created");
    };
    let map = get_map(&mgmt, &cluster, "db").await;
    assert_eq!(map.epoch, epoch);
    assert_eq!(map.partitions.len(), 3);
    let client = cluster.endpoint(Role::Client, "app");

    // Write the first page of every partition through its primary.
    let mut written = Vec::new();
    for p in &map.partitions {
        let conn = primary(&client, &map, p.first_page).await;
        let data = pattern(p.first_page, 8192);
        let reply = write(&conn, map.id.0, map.epoch.0, p.first_page * MIB, &data).await;
        assert_eq!(reply.status, Status::Ok, "{}", p.replicas[0].server);
        written.push((p.first_page, data));
    }
    let other = get_map(&mgmt, &cluster, "other").await;
    let other_conn = primary(&client, &other, 0).await;
    assert_eq!(
        write(
            &other_conn,
            other.id.0,
            other.epoch.0,
            0,
            &pattern(99, 4096)
        )
        .await
        .status,
        Status::Ok
    );

    // Change the layout (grow: the last partition gets more pages).
    let MgmtReply::Applied { epoch: new_epoch } = admin(
        &mgmt,
        &cluster,
        AdminCommand::ResizeVolume {
            name: "db".into(),
            size: 40 * MIB,
        },
    )
    .await
    else {
        panic!("not resized");
    };
    assert!(new_epoch > epoch);
    let new_map = get_map(&mgmt, &cluster, "db").await;
    assert_eq!(new_map.epoch, new_epoch);
    for p in &map.partitions {
        let conn = primary(&client, &map, p.first_page).await;
        // Old epoch: refused at every server, with the new epoch in the reply.
        let reply = write(
            &conn,
            map.id.0,
            map.epoch.0,
            p.first_page * MIB,
            &pattern(7, 4096),
        )
        .await;
        assert_eq!((reply.status, reply.epoch), (Status::StaleEpoch, new_epoch));
        let reply = op(
            &conn,
            Opcode::Read,
            map.id.0,
            map.epoch.0,
            p.first_page * MIB,
            4096,
        )
        .await;
        assert_eq!(reply.status, Status::StaleEpoch);
    }
    // New epoch: served, and no write was lost.
    for (page, data) in &written {
        let conn = primary(&client, &new_map, *page).await;
        let (reply, got) = read(&conn, new_map.id.0, new_epoch.0, page * MIB, 8192).await;
        assert_eq!(reply.status, Status::Ok);
        assert_eq!(&got, data);
    }
    let last = new_map.partitions.last().unwrap();
    assert_eq!(last.end_page, 40);
    let conn = primary(&client, &new_map, 39).await;
    assert_eq!(
        write(
            &conn,
            new_map.id.0,
            new_epoch.0,
            39 * MIB,
            &pattern(3, 4096)
        )
        .await
        .status,
        Status::Ok
    );

    // The other volume's epoch did not move, and its client keeps working with its old map.
    assert_eq!(get_map(&mgmt, &cluster, "other").await.epoch, other_epoch);
    let (reply, _) = read(&other_conn, other.id.0, other.epoch.0, 0, 4096).await;
    assert_eq!(reply.status, Status::Ok);

    // Every server holds the epochs the management server pushed.
    let s = status(&mgmt, &cluster).await;
    for server in &s.servers {
        assert!(server.held.contains(&(new_map.id, new_epoch)), "{server:?}");
    }
}

#[tokio::test]
async fn roles_are_enforced() {
    let (cluster, mgmt, _servers) = three_servers(5_000, "64M").await;
    admin(&mgmt, &cluster, create("db", 8, 1, None)).await;
    let client = mgmt.connect(&cluster, Role::Client, "app").await;
    assert!(matches!(
        client
            .mgmt(&MgmtRequest::GetMap {
                volume: "db".into()
            })
            .await
            .unwrap(),
        MgmtReply::Map(_)
    ));
    for request in [
        MgmtRequest::Admin(create("x", 8, 1, None)),
        MgmtRequest::Status,
        MgmtRequest::Register {
            data_addr: mgmt.addr,
            capacity: 1,
            incarnation: 1,
            boot: 1,
        },
        MgmtRequest::Heartbeat { held: vec![] },
    ] {
        let reply = client.mgmt(&request).await.unwrap();
        assert!(
            matches!(
                reply,
                MgmtReply::Refused(Refusal::Forbidden {
                    role: Role::Client,
                    ..
                })
            ),
            "{request:?}: {reply:?}"
        );
    }
    let storage = mgmt.connect(&cluster, Role::Storage, "s1").await;
    let reply = storage
        .mgmt(&MgmtRequest::Admin(create("y", 8, 1, None)))
        .await
        .unwrap();
    assert!(matches!(
        reply,
        MgmtReply::Refused(Refusal::Forbidden {
            role: Role::Storage,
            ..
        })
    ));
    assert!(matches!(
        storage
            .mgmt(&MgmtRequest::Heartbeat { held: vec![] })
            .await
            .unwrap(),
        MgmtReply::Maps { .. }
    ));
    // An unknown storage server must register before its heartbeats count.
    let stranger = mgmt.connect(&cluster, Role::Storage, "s9").await;
    let reply = stranger
        .mgmt(&MgmtRequest::Heartbeat { held: vec![] })
        .await
        .unwrap();
    assert!(
        matches!(reply, MgmtReply::Refused(Refusal::NotFound { .. })),
        "{reply:?}"
    );
    // Admin refusals change nothing.
    let before = status(&mgmt, &cluster).await.epoch;
    for command in [
        create("db", 8, 1, None),
        create("z", 8, 4, None),
        create("z", 8, 1, Some(&["nope"])),
        AdminCommand::ResizeVolume {
            name: "db".into(),
            size: 8 * MIB,
        },
        AdminCommand::RemoveServer {
            name: "s1".into(),
            force: false,
        },
        AdminCommand::DeleteVolume {
            name: "nope".into(),
        },
    ] {
        let reply = admin(&mgmt, &cluster, command.clone()).await;
        assert!(
            matches!(reply, MgmtReply::Refused(_)),
            "{command:?}: {reply:?}"
        );
    }
    assert_eq!(status(&mgmt, &cluster).await.epoch, before);
}

#[tokio::test]
async fn silent_server_is_marked_down_and_catches_up_when_back() {
    let (cluster, mgmt, mut servers) = three_servers(1_000, "64M").await;
    admin(&mgmt, &cluster, create("on-s3", 8, 1, Some(&["s3"]))).await;
    admin(&mgmt, &cluster, create("on-s1", 8, 1, Some(&["s1"]))).await;
    let (before_s3, before_s1) = (
        get_map(&mgmt, &cluster, "on-s3").await.epoch,
        get_map(&mgmt, &cluster, "on-s1").await.epoch,
    );
    servers[2].kill9();
    wait_status(&mgmt, &cluster, "s3 down", |s| {
        s.servers.iter().any(|s| s.name == "s3" && !s.up)
    })
    .await;
    let down_epoch = get_map(&mgmt, &cluster, "on-s3").await.epoch;
    assert!(
        down_epoch > before_s3,
        "marking s3 down bumps its volumes' epochs"
    );
    assert_eq!(
        get_map(&mgmt, &cluster, "on-s1").await.epoch,
        before_s1,
        "other volumes keep theirs"
    );

    // Back: registered again, marked up, and it holds the current map.
    servers[2] = StorageProc::start(&cluster, "s3", "64M", &["--mgmt", &mgmt.addr.to_string()]);
    let s = wait_status(&mgmt, &cluster, "s3 up and current", |s| {
        s.servers
            .iter()
            .any(|s| s.name == "s3" && s.up && !s.held.is_empty())
    })
    .await;
    let map = get_map(&mgmt, &cluster, "on-s3").await;
    assert!(map.epoch > down_epoch);
    let s3 = s.servers.iter().find(|s| s.name == "s3").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut held = s3.held.clone();
    while !held.contains(&(map.id, map.epoch)) {
        assert!(
            Instant::now() < deadline,
            "s3 never caught up: {held:?} vs {:?}",
            map.epoch
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = status(&mgmt, &cluster)
            .await
            .servers
            .into_iter()
            .find(|s| s.name == "s3")
            .unwrap()
            .held;
    }
    let client = cluster.endpoint(Role::Client, "app");
    let conn = primary(&client, &map, 0).await;
    assert_eq!(
        op(&conn, Opcode::Read, map.id.0, map.epoch.0, 0, 4096)
            .await
            .status,
        Status::Ok
    );
}

#[tokio::test]
async fn sigkill_of_mgmt_loses_no_acknowledged_change() {
    let cluster = TestCluster::new();
    let mut mgmt = MgmtProc::start(&cluster, 5_000);
    let addr = mgmt.addr;
    let _server = StorageProc::start(&cluster, "s1", "64M", &["--mgmt", &addr.to_string()]);
    wait_status(&mgmt, &cluster, "s1 up", |s| s.servers.len() == 1).await;
    let conn = mgmt.connect(&cluster, Role::Admin, "admin").await;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = acked.clone();
    let creator = tokio::spawn(async move {
        for i in 0..200 {
            let request = MgmtRequest::Admin(create(&format!("v{i}"), 1, 1, None));
            match conn.mgmt(&request).await {
                Ok(MgmtReply::Applied { epoch }) => {
                    record.lock().unwrap().push((format!("v{i}"), epoch))
                }
                Ok(other) => panic!("{other:?}"),
                Err(_) => break,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    mgmt.kill9();
    // The request in flight at the kill is neither acknowledged nor waited for.
    creator.abort();
    let _ = creator.await;
    let acked = acked.lock().unwrap().clone();
    println!("{} changes acknowledged before the kill", acked.len());
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged before the kill"
    );
    assert!(acked.len() < 200, "the kill came after the whole sequence");

    let mgmt = MgmtProc::start_at(&cluster, 5_000, addr);
    let s = status(&mgmt, &cluster).await;
    let last = acked.last().unwrap().1;
    assert!(s.epoch >= last, "epoch went back: {:?} < {last:?}", s.epoch);
    for (name, _) in &acked {
        assert!(
            s.volumes.iter().any(|v| &v.name == name),
            "acknowledged {name} was lost"
        );
    }
    // It goes on from there.
    let MgmtReply::Applied { epoch } = admin(&mgmt, &cluster, create("after", 1, 1, None)).await
    else {
        panic!("not created");
    };
    assert!(epoch > s.epoch);
    assert_eq!(epoch, Epoch(s.epoch.0 + 1));
}

#[tokio::test]
async fn cli_admin_commands() {
    let (cluster, mgmt, _servers) = three_servers(5_000, "64M").await;
    cluster.issue(Role::Admin, "admin");
    let run = |args: &[&str]| {
        let out = tessera()
            .args(args)
            .env("TESSERA_CLUSTER_DIR", cluster.dir.path())
            .env("TESSERA_MGMT", mgmt.addr.to_string())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&["volume", "create", "db", "--size", "20M", "--replicas", "2"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("created volume db (20 MiB)"), "{out}");
    let (code, out, _) = run(&["volume", "list", "--json"]);
    assert_eq!(code, Some(0));
    let volumes: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(volumes[0]["name"], "db");
    assert_eq!(volumes[0]["size"], 20 * MIB);
    let (code, out, _) = run(&["status"]);
    assert_eq!(code, Some(0));
    for needle in ["cluster epoch", "s1", "20 MiB", "up"] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
    let (code, out, _) = run(&["volume", "show", "db"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("(in sync)"), "{out}");
    let (code, _, err) = run(&["volume", "create", "db", "--size", "1G"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.trim(), "error: refused: volume \"db\" already exists");
    let (code, _, err) = run(&["server", "remove", "s1"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("holds partitions of db"), "{err}");
    let (code, _, err) = run(&["volume", "delete", "db"]);
    assert_eq!(code, Some(1), "deleting needs confirmation");
    assert!(err.contains("--yes"), "{err}");
    let (code, out, err) = run(&["volume", "delete", "db", "--yes"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("deleted volume db"));
}

#[tokio::test]
async fn partition_changes_and_shrinks_never_drop_written_data() {
    let (cluster, mgmt, servers) = three_servers(5_000, "64M").await;
    admin(&mgmt, &cluster, create("db", 30, 1, None)).await; // s1 0..10, s2 10..20, s3 20..30
    let client = cluster.endpoint(Role::Client, "app");
    let map = get_map(&mgmt, &cluster, "db").await;
    for page in [2, 25] {
        let conn = primary(&client, &map, page).await;
        assert_eq!(
            write(
                &conn,
                map.id.0,
                map.epoch.0,
                page * MIB,
                &pattern(page, 4096)
            )
            .await
            .status,
            Status::Ok
        );
    }
    let set = |first, end, servers: &[&str]| AdminCommand::SetPartition {
        volume: "db".into(),
        first_page: first,
        end_page: end,
        servers: servers.iter().map(|s| s.to_string()).collect(),
    };

    // Empty pages move freely; neighbours on the same server merge.
    let MgmtReply::Applied { epoch } = admin(&mgmt, &cluster, set(5, 10, &["s2"])).await else {
        panic!("empty pages did not move");
    };
    let map = get_map(&mgmt, &cluster, "db").await;
    assert_eq!(map.epoch, epoch);
    assert!(
        map.partitions
            .iter()
            .any(|p| (p.first_page, p.end_page) == (5, 20) && p.replicas[0].server == "s2"),
        "{map:?}"
    );
    let conn = primary(&client, &map, 6).await;
    assert_eq!(
        write(&conn, map.id.0, epoch.0, 6 * MIB, &pattern(6, 4096))
            .await
            .status,
        Status::Ok
    );

    // Pages with data are not taken away, nor cut off by a shrink: refused, nothing changes.
    let before = status(&mgmt, &cluster).await.epoch;
    for command in [
        set(0, 5, &["s3"]),
        AdminCommand::ResizeVolume {
            name: "db".into(),
            size: 24 * MIB,
        },
    ] {
        let reply = admin(&mgmt, &cluster, command.clone()).await;
        let MgmtReply::Refused(Refusal::WouldLoseData { detail }) = reply else {
            panic!("{command:?}: {reply:?}");
        };
        assert!(detail.contains("has data in pages"), "{detail}");
    }
    assert_eq!(status(&mgmt, &cluster).await.epoch, before);

    // A shrink that keeps every written page goes through.
    let MgmtReply::Applied { epoch } = admin(
        &mgmt,
        &cluster,
        AdminCommand::ResizeVolume {
            name: "db".into(),
            size: 26 * MIB,
        },
    )
    .await
    else {
        panic!("shrink above the data was refused");
    };
    let map = get_map(&mgmt, &cluster, "db").await;
    for page in [2, 6, 25] {
        let conn = primary(&client, &map, page).await;
        let (reply, data) = read(&conn, map.id.0, epoch.0, page * MIB, 4096).await;
        assert_eq!(reply.status, Status::Ok);
        assert_eq!(data, pattern(page, 4096), "page {page}");
    }

    // New replicas (or a new primary) for pages with data would start empty: refused.
    let reply = admin(&mgmt, &cluster, set(0, 5, &["s2", "s1"])).await;
    assert!(
        matches!(&reply, MgmtReply::Refused(Refusal::WouldLoseData { detail }) if detail.contains("start empty")),
        "{reply:?}"
    );
    // For empty pages a new replica set is fine.
    let reply = admin(&mgmt, &cluster, set(12, 14, &["s3", "s2"])).await;
    assert!(matches!(reply, MgmtReply::Applied { .. }), "{reply:?}");
    let map = get_map(&mgmt, &cluster, "db").await;
    let epoch = map.epoch;

    // The storage server enforces this itself, whoever pushes the map.
    let mut taking = map.clone();
    taking.epoch = Epoch(epoch.0 + 100);
    taking.partitions.retain(|p| p.replicas[0].server != "s1");
    let pusher = cluster.endpoint(Role::Mgmt, "mgmt");
    let reply = push(&pusher, &servers[0], &taking).await;
    assert!(
        matches!(reply, MgmtReply::Refused(Refusal::WouldLoseData { .. })),
        "{reply:?}"
    );
}
