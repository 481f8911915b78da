//! `Store` on an in-memory device: admission, maps, allocation, refusing
//! data loss and torn metadata, with no file, process or socket.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tessera_net::proto::{
    Epoch, FLAG_REPLICA, MirrorState, Opcode, Partition, Replica, Request, Role, Status, VolumeId,
    VolumeMap,
};
use tessera_net::quic::PeerIdentity;

use super::*;
use crate::disk::format::{DEFAULT_REGION_SIZE, Geometry};
use crate::disk::io::MemDevice;

const SIZE: u64 = 32 << 20;
const SLOT: u32 = 1 << 20;
const ME: &str = "store-1";

fn run<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn superblock() -> Superblock {
    Superblock {
        geometry: Geometry::compute(SIZE, SLOT, DEFAULT_REGION_SIZE, 16).unwrap(),
        cluster_id: [1; 32],
        server_name: ME.into(),
        created_unix: 0,
        incarnation: 1,
    }
}

/// A formatted in-memory device and a store open on it.
async fn fresh() -> (MemDevice, Store<MemDevice>) {
    let dev = MemDevice::new(SIZE as usize);
    format(&dev, Path::new("mem"), &superblock()).await.unwrap();
    let store = reopen(&dev).await.unwrap();
    (dev, store)
}

async fn reopen(dev: &MemDevice) -> Result<Store<MemDevice>, EngineError> {
    Store::open_in_memory(dev.clone(), superblock()).await
}

fn replica(server: &str) -> Replica {
    let addr: SocketAddr = "127.0.0.1:7401".parse().unwrap();
    Replica {
        server: server.into(),
        addr,
        state: MirrorState::InSync,
    }
}

/// Volume 1, 8 pages of 1 MiB: pages 0..4 on [ME, store-2], 4..8 on [store-2, ME].
fn map(epoch: u64) -> VolumeMap {
    VolumeMap {
        id: VolumeId(1),
        name: "v".into(),
        epoch: Epoch(epoch),
        size: 8 << 20,
        page_size: 1 << 20,
        partitions: vec![
            Partition {
                first_page: 0,
                end_page: 4,
                replicas: vec![replica(ME), replica("store-2")],
            },
            Partition {
                first_page: 4,
                end_page: 8,
                replicas: vec![replica("store-2"), replica(ME)],
            },
        ],
    }
}

fn client() -> PeerIdentity {
    PeerIdentity {
        role: Role::Client,
        name: "app".into(),
    }
}

fn read_at(epoch: u64, offset: u64) -> Request {
    Request::new(Opcode::Read, VolumeId(1), Epoch(epoch), offset, 4096, 1)
}

fn refusal(
    store: &Store<MemDevice>,
    request: &Request,
    peer: &PeerIdentity,
) -> (Status, Epoch, String) {
    let volume = match store.lookup(request) {
        Ok(volume) => volume,
        Err(r) => return (r.status(), r.epoch, r.reason.to_string()),
    };
    let r = store.check(&volume, request, peer).unwrap_err();
    (r.status(), r.epoch, r.reason.to_string())
}

async fn contents(store: &Store<MemDevice>, offset: u64, len: u32) -> Vec<u8> {
    let volume = store.volume(VolumeId(1)).unwrap();
    let mut out = Vec::new();
    for piece in store.read(&volume, offset, len).await.unwrap() {
        match piece {
            ReadPiece::Data(buf) => out.extend_from_slice(&buf),
            ReadPiece::Zeroes(n) => out.resize(out.len() + n, 0),
        }
    }
    out
}

fn filled(byte: u8, len: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(len);
    buf.fill(byte);
    buf
}

#[test]
fn admission_judges_epoch_range_ownership_and_role() {
    run(async {
        let (_dev, store) = fresh().await;
        store.apply_map(&map(5)).await.unwrap();
        let volume = store.volume(VolumeId(1)).unwrap();
        store.check(&volume, &read_at(5, 0), &client()).unwrap();

        let (status, epoch, message) = refusal(&store, &read_at(4, 0), &client());
        assert_eq!((status, epoch), (Status::StaleEpoch, Epoch(5)));
        assert!(message.contains("older than the held e5"), "{message}");
        let (status, epoch, message) = refusal(&store, &read_at(6, 0), &client());
        assert_eq!((status, epoch), (Status::StaleEpoch, Epoch(5)));
        assert!(message.contains("newer than the held e5"), "{message}");

        // Past the end; a volume it does not hold; pages it mirrors but does not lead.
        assert_eq!(
            refusal(&store, &read_at(5, 8 << 20), &client()).0,
            Status::OutOfRange
        );
        let other = Request::new(Opcode::Read, VolumeId(2), Epoch(5), 0, 4096, 1);
        assert_eq!(refusal(&store, &other, &client()).0, Status::NotOwner);
        assert_eq!(
            refusal(&store, &read_at(5, 4 << 20), &client()).0,
            Status::NotOwner
        );
        // A range across two partitions.
        let across = Request::new(
            Opcode::Read,
            VolumeId(1),
            Epoch(5),
            (4 << 20) - 4096,
            8192,
            1,
        );
        assert_eq!(refusal(&store, &across, &client()).0, Status::NotOwner);

        // Replica requests: never from a client; from storage only its partition's primary.
        let mut forwarded = read_at(5, 4 << 20);
        forwarded.flags = FLAG_REPLICA;
        assert_eq!(refusal(&store, &forwarded, &client()).0, Status::Forbidden);
        let primary = PeerIdentity {
            role: Role::Storage,
            name: "store-2".into(),
        };
        store.check(&volume, &forwarded, &primary).unwrap();
        let impostor = PeerIdentity {
            role: Role::Storage,
            name: "store-3".into(),
        };
        assert_eq!(refusal(&store, &forwarded, &impostor).0, Status::NotOwner);
    });
}

#[test]
fn maps_move_forward_only_and_survive_a_reopen() {
    run(async {
        let (dev, store) = fresh().await;
        assert_eq!(store.apply_map(&map(5)).await.unwrap(), Epoch(5));
        assert_eq!(store.apply_map(&map(7)).await.unwrap(), Epoch(7));
        let err = store.apply_map(&map(6)).await.unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::EpochRegression {
                    current: Epoch(7),
                    pushed: Epoch(6),
                    ..
                }
            ),
            "{err}"
        );
        // A map whose partitions are out of order is refused before anything changes.
        let mut disordered = map(8);
        disordered.partitions.swap(0, 1);
        assert!(store.apply_map(&disordered).await.is_err());
        assert_eq!(store.volume(VolumeId(1)).unwrap().epoch(), Epoch(7));
        drop(store);

        let store = reopen(&dev).await.unwrap();
        let volume = store.volume(VolumeId(1)).unwrap();
        assert_eq!(volume.epoch(), Epoch(7));
        assert_eq!(volume.record().ranges, vec![(0, 8)]);
        // After a restart the map's replica sets are unknown until fetched again.
        assert!(volume.map().is_none());
    });
}

#[test]
fn writes_allocate_slots_on_first_touch_and_read_back() {
    run(async {
        let (dev, store) = fresh().await;
        store.apply_map(&map(5)).await.unwrap();
        let volume = store.volume(VolumeId(1)).unwrap();
        assert_eq!(store.slot_usage().0, 0);
        assert_eq!(contents(&store, 0, 8192).await, vec![0; 8192]);

        store
            .write(&volume, 4096, filled(0xab, 4096), false)
            .await
            .unwrap();
        store
            .write(&volume, 8192, filled(0xcd, 4096), true)
            .await
            .unwrap();
        assert_eq!(store.slot_usage().0, 1, "one slot for the first chunk");
        let back = contents(&store, 0, 3 * 4096).await;
        assert_eq!(
            &back[..4096],
            &[0; 4096][..],
            "the rest of a new slot reads as zeroes"
        );
        assert_eq!(&back[4096..8192], &[0xab; 4096][..]);
        assert_eq!(&back[8192..], &[0xcd; 4096][..]);

        // Another chunk takes another slot; zeroing keeps the data readable as zeroes.
        store
            .write(&volume, 2 << 20, filled(1, 4096), false)
            .await
            .unwrap();
        assert_eq!(store.slot_usage().0, 2);
        store.zero(&volume, 4096, 4096).await.unwrap();
        assert_eq!(contents(&store, 4096, 4096).await, vec![0; 4096]);
        drop((volume, store));

        let store = reopen(&dev).await.unwrap();
        assert_eq!(store.slot_usage().0, 2);
        assert_eq!(contents(&store, 8192, 4096).await, vec![0xcd; 4096]);
        assert_eq!(contents(&store, 2 << 20, 4096).await, vec![1; 4096]);
    });
}

#[test]
fn a_map_that_would_drop_written_pages_is_refused() {
    run(async {
        let (_dev, store) = fresh().await;
        store.apply_map(&map(5)).await.unwrap();
        let volume = store.volume(VolumeId(1)).unwrap();
        store
            .write(&volume, 0, filled(9, 4096), false)
            .await
            .unwrap();
        // Pages 0..4 move to other servers entirely.
        let mut moved = map(6);
        moved.partitions[0].replicas = vec![replica("store-2"), replica("store-3")];
        assert!(matches!(
            store.check_map(&moved),
            Err(EngineError::WouldLoseData { .. })
        ));
        let err = store.apply_map(&moved).await.unwrap_err();
        assert!(matches!(err, EngineError::WouldLoseData { .. }), "{err}");
        assert_eq!(volume.epoch(), Epoch(5));
        assert_eq!(contents(&store, 0, 4096).await, vec![9; 4096]);
        // Pages without data may go.
        let mut unwritten = map(6);
        unwritten.partitions[1].replicas = vec![replica("store-2"), replica("store-3")];
        assert_eq!(store.apply_map(&unwritten).await.unwrap(), Epoch(6));
    });
}

#[test]
fn a_torn_record_falls_back_and_a_failed_metadata_write_stops_the_store() {
    run(async {
        let (dev, store) = fresh().await;
        store.apply_map(&map(3)).await.unwrap(); // volume record: copy B
        store.apply_map(&map(4)).await.unwrap(); // volume record: copy A
        drop(store);
        let g = superblock().geometry;
        let damage = |block: u64| {
            dev.edit(|bytes| bytes[(block * BLOCK) as usize + 1000] ^= 0xff);
        };
        damage(Geometry::copy_a(g.volume_table, 0));
        let store = reopen(&dev).await.unwrap();
        assert_eq!(store.volume(VolumeId(1)).unwrap().epoch(), Epoch(3));
        drop(store);
        damage(Geometry::copy_a(g.volume_table, 0) + 1);
        assert!(matches!(
            reopen(&dev).await.unwrap_err(),
            EngineError::MetadataDamaged { .. }
        ));

        // A data write that fails is refused; the store goes on.
        let (dev, store) = fresh().await;
        store.apply_map(&map(5)).await.unwrap();
        let volume = store.volume(VolumeId(1)).unwrap();
        dev.fail_writes(Some(g.data_start..SIZE));
        let refused = store
            .write(&volume, 0, filled(2, 4096), false)
            .await
            .unwrap_err();
        assert_eq!(refused.status(), Status::IoError);
        dev.fail_writes(None);
        store.check(&volume, &read_at(5, 0), &client()).unwrap();
        // A metadata write that fails (the slot table, on a first write) stops
        // it: memory and disk may disagree until it is reopened from disk.
        dev.fail_writes(Some(0..g.data_start));
        assert!(
            store
                .write(&volume, 0, filled(2, 4096), false)
                .await
                .is_err()
        );
        dev.fail_writes(None);
        let refused = store.check(&volume, &read_at(5, 0), &client()).unwrap_err();
        assert_eq!(refused.status(), Status::IoError);
        drop((volume, store));
        let store = reopen(&dev).await.unwrap();
        assert_eq!(
            contents(&store, 0, 4096).await,
            vec![0; 4096],
            "an unacknowledged write"
        );
    });
}

#[test]
fn admission_hands_over_the_partition_and_this_servers_part() {
    run(async {
        let (_dev, store) = fresh().await;
        store.apply_map(&map(5)).await.unwrap();
        let volume = store.volume(VolumeId(1)).unwrap();

        let led = store
            .admit(&volume, &read_at(5, 4096), &client())
            .await
            .unwrap();
        assert_eq!(led.epoch, Epoch(5));
        let partition = led.partition(Part::Primary).unwrap();
        assert_eq!((partition.first_page, partition.end_page), (0, 4));
        assert!(led.partition(Part::Mirror).is_none());
        drop(led);

        let mut forwarded = read_at(5, 5 << 20);
        forwarded.flags = FLAG_REPLICA;
        let primary = PeerIdentity {
            role: Role::Storage,
            name: "store-2".into(),
        };
        let mirrored = store.try_admit(&volume, &forwarded, &primary).unwrap();
        let partition = mirrored.partition(Part::Mirror).unwrap();
        assert_eq!((partition.first_page, partition.end_page), (4, 8));
        assert_eq!(partition.replicas[0].server, "store-2");
        drop(mirrored);

        // A request without a range has the map but no partition.
        let flush = Request::new(Opcode::Flush, VolumeId(1), Epoch(5), 0, 0, 1);
        let unranged = store.admit(&volume, &flush, &client()).await.unwrap();
        assert!(unranged.placement.map().is_some());
        assert!(unranged.partition(Part::Primary).is_none());
        // While it is held, a map push waits: the epoch cannot move.
        let next = map(6);
        let push = store.apply_map(&next);
        let pushed = tokio::time::timeout(Duration::from_millis(50), push).await;
        assert!(pushed.is_err(), "a push went through an admitted request");
        drop(unranged);
        assert_eq!(store.apply_map(&map(6)).await.unwrap(), Epoch(6));
    });
}

#[test]
fn each_reason_has_one_status_and_a_message_with_its_fields() {
    use tessera_net::proto::{EpochVerdict, ProtoError};
    let cases = [
        (
            Refused::Epoch(EpochVerdict::judge(Epoch(5), Epoch(4))),
            Status::StaleEpoch,
            "request epoch e4 is older than the held e5",
        ),
        (Refused::EpochChanging, Status::StaleEpoch, "epoch change"),
        (
            Refused::Malformed(ProtoError::ChecksumMismatch {
                expected: 1,
                actual: 2,
            }),
            Status::ChecksumMismatch,
            "checksum",
        ),
        (
            Refused::Malformed(ProtoError::TrailingPayload { declared: 4096 }),
            Status::BadRequest,
            "more than the 4096 payload bytes",
        ),
        (
            Refused::PastEnd { end: 9, size: 8 },
            Status::OutOfRange,
            "ends at 9 past the volume size 8",
        ),
        (
            Refused::ReplicaFromRole { role: Role::Client },
            Status::Forbidden,
            "role client may not send replica requests",
        ),
        (
            Refused::NotFromPrimary {
                sender: "s3".into(),
                first: 4,
                last: 5,
            },
            Status::NotOwner,
            "s3 is not the primary of pages 4..=5",
        ),
        (
            Refused::NoMapYet,
            Status::Unavailable,
            "fetching the volume's map",
        ),
        (Refused::Stopped, Status::IoError, "restart the server"),
    ];
    for (reason, status, text) in cases {
        assert_eq!(reason.status(), status, "{reason}");
        assert!(reason.to_string().contains(text), "{reason}");
        assert_eq!(Refusal::new(Epoch(3), reason).status(), status);
    }
}

#[test]
fn without_a_lease_nothing_is_admitted_and_a_renewed_one_admits_again() {
    run(async {
        let (_dev, store) = fresh().await;
        store.apply_map(&map(5)).await.unwrap();
        let volume = store.volume(VolumeId(1)).unwrap();
        store.lease().require();
        // Before the first acknowledged heartbeat: refused, with the epoch.
        let (status, epoch, message) = refusal(&store, &read_at(5, 0), &client());
        assert_eq!((status, epoch), (Status::Unavailable, Epoch(5)));
        assert!(message.contains("no heartbeat acknowledged"), "{message}");
        let now = std::time::Instant::now();
        store.lease().renew(now, Duration::from_secs(60));
        store.check(&volume, &read_at(5, 0), &client()).unwrap();
        // A lease granted long ago has run out: refused again.
        let (_, store) = fresh().await;
        store.apply_map(&map(5)).await.unwrap();
        store.lease().require();
        store
            .lease()
            .renew(now - Duration::from_secs(10), Duration::from_secs(2));
        let (status, _, message) = refusal(&store, &read_at(5, 0), &client());
        assert_eq!(status, Status::Unavailable);
        assert!(message.contains("lease ran out"), "{message}");
    });
}
