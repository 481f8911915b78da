#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;

const MIB: u64 = 1 << 20;

fn register(state: &mut ClusterState, name: &str, port: u16) -> Outcome {
    state
        .apply(&Command::RegisterServer {
            name: name.into(),
            data_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            capacity: 1 << 40,
            incarnation: 1,
        })
        .unwrap()
}

fn create(name: &str, size: u64, replicas: u8) -> Command {
    Command::CreateVolume {
        name: name.into(),
        size,
        page_size: MIB as u32,
        replicas,
        servers: None,
    }
}

fn three_servers() -> ClusterState {
    let mut s = ClusterState::default();
    for (i, name) in ["s1", "s2", "s3"].iter().enumerate() {
        register(&mut s, name, 7000 + i as u16);
    }
    s
}

#[test]
fn every_command_advances_the_epoch_by_one() {
    let mut s = ClusterState::default();
    assert_eq!(register(&mut s, "s1", 1).epoch, Epoch(1));
    assert_eq!(register(&mut s, "s2", 2).epoch, Epoch(2));
    assert_eq!(s.apply(&create("a", 8 * MIB, 1)).unwrap().epoch, Epoch(3));
    assert_eq!(s.epoch, Epoch(3));
}

#[test]
fn create_spreads_partitions_with_distinct_replicas() {
    let mut s = three_servers();
    let out = s.apply(&create("db", 100 * MIB, 2)).unwrap();
    let v = &s.volumes["db"];
    assert_eq!(v.epoch, out.epoch);
    assert_eq!(v.partitions.len(), 3);
    let mut next = 0;
    for p in &v.partitions {
        assert_eq!(p.first_page, next);
        next = p.end_page;
        assert_eq!(p.replicas.len(), 2);
        assert_ne!(p.replicas[0].server, p.replicas[1].server);
    }
    assert_eq!(next, 100);
    let primaries: BTreeSet<_> = v
        .partitions
        .iter()
        .map(|p| p.replicas[0].server.clone())
        .collect();
    assert_eq!(primaries.len(), 3, "primaries rotate");
    assert_eq!(out.changed["db"], v.servers());
    let map = s.volume_map("db").unwrap();
    assert_eq!(
        map.partitions[0].replicas[0].addr,
        s.servers["s1"].data_addr
    );
}

#[test]
fn a_change_bumps_only_the_volumes_it_affects() {
    let mut s = three_servers();
    s.apply(&Command::CreateVolume {
        name: "a".into(),
        size: 4 * MIB,
        page_size: MIB as u32,
        replicas: 1,
        servers: Some(vec!["s1".into()]),
    })
    .unwrap();
    s.apply(&Command::CreateVolume {
        name: "b".into(),
        size: 4 * MIB,
        page_size: MIB as u32,
        replicas: 1,
        servers: Some(vec!["s2".into()]),
    })
    .unwrap();
    let (a, b) = (s.volumes["a"].epoch, s.volumes["b"].epoch);
    let out = s
        .apply(&Command::MarkServer {
            name: "s1".into(),
            up: false,
        })
        .unwrap();
    assert_eq!(s.volumes["a"].epoch, out.epoch);
    assert!(s.volumes["a"].epoch > a);
    assert_eq!(s.volumes["b"].epoch, b, "volume b is not on s1");
    assert_eq!(
        s.volume_map("a").unwrap().partitions[0].replicas[0].state,
        MirrorState::OutOfSync
    );
    let out = s
        .apply(&Command::ResizeVolume {
            name: "b".into(),
            size: 8 * MIB,
        })
        .unwrap();
    assert_eq!(s.volumes["b"].epoch, out.epoch);
    assert_eq!(s.volumes["b"].partitions.last().unwrap().end_page, 8);
    assert!(s.volumes["a"].epoch < out.epoch);
}

#[test]
fn refusals_change_nothing() {
    let mut s = three_servers();
    s.apply(&create("db", 8 * MIB, 1)).unwrap();
    let before = s.clone();
    let refused = [
        create("db", 8 * MIB, 1),
        create("x", 8 * MIB, 4),
        create("bad name", 8 * MIB, 1),
        create("x", 0, 1),
        create("x", 4095, 1),
        create("x", 8 * MIB, 0),
        Command::CreateVolume {
            name: "x".into(),
            size: MIB,
            page_size: 1000,
            replicas: 1,
            servers: None,
        },
        Command::CreateVolume {
            name: "x".into(),
            size: MIB,
            page_size: 8 << 20,
            replicas: 1,
            servers: None,
        },
        Command::CreateVolume {
            name: "x".into(),
            size: MIB,
            page_size: MIB as u32,
            replicas: 1,
            servers: Some(vec!["nope".into()]),
        },
        Command::CreateVolume {
            name: "x".into(),
            size: MIB,
            page_size: MIB as u32,
            replicas: 2,
            servers: Some(vec!["s1".into(), "s1".into()]),
        },
        Command::ResizeVolume {
            name: "db".into(),
            size: 8 * MIB,
        },
        set_partition("db", 2, 2, &["s1"]),
        set_partition("db", 3, 9, &["s1"]),
        set_partition("db", 0, 2, &[]),
        set_partition("db", 0, 2, &["s1", "s1"]),
        set_partition("db", 0, 2, &["nope"]),
        set_partition("nope", 0, 2, &["s1"]),
        Command::ResizeVolume {
            name: "nope".into(),
            size: 4 * MIB,
        },
        Command::DeleteVolume {
            name: "nope".into(),
        },
        Command::RemoveServer {
            name: "s1".into(),
            force: false,
        },
        Command::RemoveServer {
            name: "nope".into(),
            force: false,
        },
        Command::MarkServer {
            name: "s1".into(),
            up: true,
        },
        Command::RegisterServer {
            name: "s1".into(),
            data_addr: before.servers["s1"].data_addr,
            capacity: before.servers["s1"].capacity,
            incarnation: before.servers["s1"].incarnation,
        },
    ];
    for command in refused {
        assert!(s.apply(&command).is_err(), "{command:?} was applied");
        assert_eq!(s, before, "{command:?} changed the state");
    }
}

fn set_partition(volume: &str, first: u64, end: u64, servers: &[&str]) -> Command {
    Command::SetPartition {
        volume: volume.into(),
        first_page: first,
        end_page: end,
        servers: servers.iter().map(|s| s.to_string()).collect(),
    }
}

fn layout(s: &ClusterState, volume: &str) -> Vec<(u64, u64, Vec<String>)> {
    s.volumes[volume]
        .partitions
        .iter()
        .map(|p| {
            (
                p.first_page,
                p.end_page,
                p.replicas.iter().map(|r| r.server.clone()).collect(),
            )
        })
        .collect()
}

#[test]
fn set_partition_splits_replaces_and_refuses_straddling_ranges() {
    let mut s = three_servers();
    s.apply(&create("db", 9 * MIB, 1)).unwrap(); // 0..3 s1, 3..6 s2, 6..9 s3
    let v = |a: &str| vec![a.to_string()];
    // Split a partition.
    let out = s.apply(&set_partition("db", 1, 2, &["s3", "s2"])).unwrap();
    assert_eq!(
        layout(&s, "db"),
        vec![
            (0, 1, v("s1")),
            (1, 2, vec!["s3".into(), "s2".into()]),
            (2, 3, v("s1")),
            (3, 6, v("s2")),
            (6, 9, v("s3")),
        ]
    );
    assert_eq!(s.volumes["db"].epoch, out.epoch);
    // Replace whole partitions; neighbours with the same replicas merge.
    s.apply(&set_partition("db", 3, 9, &["s2"])).unwrap();
    assert_eq!(layout(&s, "db")[3..], [(3, 9, v("s2"))]);
    // A range across a boundary is refused.
    assert!(s.apply(&set_partition("db", 2, 5, &["s1"])).is_err());
}

#[test]
fn mirror_state_changes_bump_the_volume_epoch() {
    let mut s = three_servers();
    s.apply(&create("db", 9 * MIB, 2)).unwrap();
    let command = Command::SetMirrorState {
        volume: "db".into(),
        first_page: 0,
        server: "s2".into(),
        state: MirrorState::OutOfSync,
    };
    let out = s.apply(&command).unwrap();
    assert_eq!(s.volumes["db"].epoch, out.epoch);
    let map = s.volume_map("db").unwrap();
    assert_eq!(map.partitions[0].replicas[1].state, MirrorState::OutOfSync);
    assert!(s.apply(&command).is_err(), "no change is refused");
    let missing = Command::SetMirrorState {
        volume: "db".into(),
        first_page: 0,
        server: "s3".into(),
        state: MirrorState::InSync,
    };
    assert!(s.apply(&missing).is_err());
}

fn replicas(s: &ClusterState, volume: &str) -> Vec<(String, MirrorState)> {
    s.volumes[volume].partitions[0]
        .replicas
        .iter()
        .map(|r| (r.server.clone(), r.state))
        .collect()
}

#[test]
fn losing_a_primary_promotes_an_in_sync_mirror() {
    let mut s = three_servers();
    s.apply(&create("v", 4 * MIB, 2)).unwrap();
    let before = replicas(&s, "v");
    let (primary, mirror) = (before[0].0.clone(), before[1].0.clone());
    let out = s
        .apply(&Command::MarkServer {
            name: primary.clone(),
            up: false,
        })
        .unwrap();
    assert_eq!(
        s.volumes["v"].epoch, out.epoch,
        "a promotion is an epoch bump"
    );
    assert_eq!(
        replicas(&s, "v"),
        vec![
            (mirror.clone(), MirrorState::InSync),
            (primary.clone(), MirrorState::OutOfSync)
        ]
    );
    // Coming back does not make it a copy again: that takes a resync.
    s.apply(&Command::MarkServer {
        name: primary.clone(),
        up: true,
    })
    .unwrap();
    assert_eq!(replicas(&s, "v")[1], (primary, MirrorState::OutOfSync));
}

#[test]
fn losing_the_last_in_sync_replica_keeps_the_layout() {
    let mut s = three_servers();
    s.apply(&create("v", 4 * MIB, 2)).unwrap();
    let before = replicas(&s, "v");
    for (name, _) in before.iter().rev() {
        s.apply(&Command::MarkServer {
            name: name.clone(),
            up: false,
        })
        .unwrap();
    }
    // The mirror went out of sync first; the primary, down too, still holds
    // every acknowledged write, so the partition waits for it.
    assert_eq!(
        replicas(&s, "v"),
        vec![
            (before[0].0.clone(), MirrorState::InSync),
            (before[1].0.clone(), MirrorState::OutOfSync)
        ]
    );
}

/// `name` registers again with a new incarnation, as after its disk was wiped.
fn reregister_wiped(s: &mut ClusterState, name: &str) {
    let record = s.servers[name].clone();
    s.apply(&Command::RegisterServer {
        name: name.to_string(),
        data_addr: record.data_addr,
        capacity: record.capacity,
        incarnation: record.incarnation + 1,
    })
    .unwrap();
}

#[test]
fn a_wiped_disk_puts_its_replicas_out_of_sync() {
    let mut s = three_servers();
    s.apply(&create("v", 4 * MIB, 2)).unwrap();
    let before = replicas(&s, "v");
    let primary = before[0].0.clone();
    reregister_wiped(&mut s, &primary);
    assert_eq!(
        replicas(&s, "v")[1],
        (primary.clone(), MirrorState::OutOfSync)
    );
    assert!(s.servers[&primary].up, "registered, so up");
}

#[test]
fn a_wiped_sole_copy_is_out_of_sync_not_a_copy() {
    let mut s = three_servers();
    s.apply(&create("v", 4 * MIB, 1)).unwrap();
    let only = replicas(&s, "v")[0].0.clone();
    reregister_wiped(&mut s, &only);
    assert_eq!(replicas(&s, "v"), vec![(only, MirrorState::OutOfSync)]);
}

#[test]
fn the_primary_cannot_be_marked_out_of_sync() {
    let mut s = three_servers();
    s.apply(&create("v", 4 * MIB, 2)).unwrap();
    let primary = replicas(&s, "v")[0].0.clone();
    let err = s
        .apply(&Command::SetMirrorState {
            volume: "v".into(),
            first_page: 0,
            server: primary,
            state: MirrorState::OutOfSync,
        })
        .unwrap_err();
    assert!(matches!(err, Refusal::Invalid { .. }), "{err}");
}

#[test]
fn no_mirror_is_in_sync_while_its_primary_is_not() {
    let mut s = three_servers();
    s.apply(&create("v", MIB, 3)).unwrap();
    let names: Vec<String> = replicas(&s, "v").into_iter().map(|(n, _)| n).collect();
    // Every copy out of sync: the primary's disk wiped, the others lost.
    for name in &names[1..] {
        s.apply(&Command::MarkServer {
            name: name.clone(),
            up: false,
        })
        .unwrap();
    }
    s.apply(&Command::RegisterServer {
        name: names[0].clone(),
        data_addr: "127.0.0.1:9".parse().unwrap(),
        capacity: 1 << 30,
        incarnation: 99,
    })
    .unwrap();
    assert_eq!(replicas(&s, "v")[0].1, MirrorState::OutOfSync);
    for state in [MirrorState::InSync, MirrorState::Resyncing] {
        let err = s
            .apply(&Command::SetMirrorState {
                volume: "v".into(),
                first_page: 0,
                server: names[2].clone(),
                state,
            })
            .unwrap_err();
        assert!(err.to_string().contains("is out of sync"), "{err}");
    }
}

#[test]
fn shrink_truncates_partitions() {
    let mut s = three_servers();
    s.apply(&create("db", 9 * MIB, 1)).unwrap();
    let out = s
        .apply(&Command::ResizeVolume {
            name: "db".into(),
            size: 4 * MIB,
        })
        .unwrap();
    assert_eq!(
        layout(&s, "db"),
        vec![
            (0, 3, vec!["s1".to_string()]),
            (3, 4, vec!["s2".to_string()])
        ]
    );
    assert!(
        out.changed["db"].contains("s3"),
        "the server that lost its partition is told"
    );
}

#[test]
fn remove_server_with_force_drops_its_replicas() {
    let mut s = three_servers();
    s.apply(&create("db", 9 * MIB, 2)).unwrap();
    let remove = Command::RemoveServer {
        name: "s2".into(),
        force: true,
    };
    assert!(
        s.apply(&remove).is_err(),
        "a server that is up would go on serving: refused"
    );
    s.apply(&Command::MarkServer {
        name: "s2".into(),
        up: false,
    })
    .unwrap();
    let out = s
        .apply(&Command::RemoveServer {
            name: "s2".into(),
            force: true,
        })
        .unwrap();
    assert!(!s.servers.contains_key("s2"));
    assert!(!s.volumes["db"].servers().contains("s2"));
    assert!(
        out.changed["db"].contains("s2"),
        "the old layout's servers are told too"
    );
    assert_eq!(s.volumes["db"].epoch, out.epoch);
}

#[test]
fn delete_reports_the_servers_that_held_the_volume() {
    let mut s = three_servers();
    s.apply(&create("db", 9 * MIB, 1)).unwrap();
    let id = s.volumes["db"].id;
    let out = s
        .apply(&Command::DeleteVolume { name: "db".into() })
        .unwrap();
    assert_eq!(out.deleted[&id].len(), 3);
    assert!(s.volume_map("db").is_none());
    // Ids are never reused.
    s.apply(&create("db", 9 * MIB, 1)).unwrap();
    assert!(s.volumes["db"].id > id);
}

fn arb_command() -> impl Strategy<Value = Command> {
    let server = prop::sample::select(vec!["s1", "s2", "s3", "s4"]).prop_map(String::from);
    let volume = prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from);
    prop_oneof![
        (server.clone(), 1u16..4).prop_map(|(name, port)| Command::RegisterServer {
            name,
            data_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            capacity: 1 << 30,
            incarnation: u64::from(port % 2),
        }),
        (server.clone(), any::<bool>()).prop_map(|(name, up)| Command::MarkServer { name, up }),
        (
            volume.clone(),
            0u64..8,
            server.clone(),
            prop::sample::select(vec![
                MirrorState::InSync,
                MirrorState::OutOfSync,
                MirrorState::Resyncing
            ])
        )
            .prop_map(
                |(volume, first_page, server, state)| Command::SetMirrorState {
                    volume,
                    first_page,
                    server,
                    state
                }
            ),
        (server, any::<bool>()).prop_map(|(name, force)| Command::RemoveServer { name, force }),
        (volume.clone(), 1u64..64, 1u8..4).prop_map(|(name, mib, replicas)| create(
            &name,
            mib * MIB,
            replicas
        )),
        volume
            .clone()
            .prop_map(|name| Command::DeleteVolume { name }),
        (volume.clone(), 1u64..64).prop_map(|(name, mib)| Command::ResizeVolume {
            name,
            size: mib * MIB
        }),
        (
            volume,
            0u64..64,
            1u64..8,
            prop::collection::vec(prop::sample::select(vec!["s1", "s2", "s3", "s4"]), 1..3)
        )
            .prop_map(|(name, first, len, servers)| set_partition(
                &name,
                first,
                first + len,
                &servers
            )),
    ]
}

proptest! {
    #[test]
    fn invariants_hold_under_any_command_sequence(commands in prop::collection::vec(arb_command(), 1..60)) {
        let mut s = ClusterState::default();
        let mut replay = ClusterState::default();
        for command in &commands {
            let before = s.clone();
            match s.apply(command) {
                Ok(out) => {
                    prop_assert_eq!(out.epoch, Epoch(before.epoch.0 + 1));
                    replay.apply(command).unwrap();
                }
                Err(_) => prop_assert_eq!(&s, &before),
            }
            for (name, v) in &s.volumes {
                prop_assert!(v.epoch <= s.epoch);
                let old = before.volumes.get(name);
                if let Some(old) = old {
                    prop_assert!(v.epoch >= old.epoch, "a volume epoch went back");
                }
                let mut next = 0;
                for p in &v.partitions {
                    prop_assert_eq!(p.first_page, next);
                    prop_assert!(p.end_page > p.first_page);
                    next = p.end_page;
                    let distinct: BTreeSet<_> = p.replicas.iter().map(|r| &r.server).collect();
                    prop_assert_eq!(distinct.len(), p.replicas.len());
                    // The primary holds every acknowledged write: it is never a
                    // replica known to lack some while an in-sync one is up.
                    if let Some(primary) = p.replicas.first() {
                        let up_in_sync = p.replicas.iter().any(|r| {
                            r.state == MirrorState::InSync && s.servers.get(&r.server).is_some_and(|x| x.up)
                        });
                        prop_assert!(primary.state == MirrorState::InSync || !up_in_sync, "{:?}", p);
                    }
                }
                prop_assert_eq!(next, v.pages());
            }
        }
        // Deterministic: the same commands give the same state.
        prop_assert_eq!(s, replay);
    }
}
