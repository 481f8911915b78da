//! Torn metadata writes: the store falls back to the other copy; both copies
//! damaged is a typed error, and the file is left as it was.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use tessera_engine::EngineError;
use tessera_engine::disk::aligned::AlignedBuf;
use tessera_engine::disk::format::{
    BLOCK, DEFAULT_REGION_SIZE, DEFAULT_SLOT_SIZE, Geometry, Superblock,
};
use tessera_engine::disk::io::{BlockDevice, StdDevice, UringDevice};
use tessera_engine::store::{self, Store};
use tessera_net::proto::{Epoch, MirrorState, Partition, Replica, VolumeId, VolumeMap};

const SIZE: u64 = 32 << 20;

fn data_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("data.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    (dir, path)
}

fn superblock() -> Superblock {
    Superblock {
        geometry: Geometry::compute(SIZE, DEFAULT_SLOT_SIZE, DEFAULT_REGION_SIZE, 16).unwrap(),
        cluster_id: [1; 32],
        server_name: "store-1".into(),
        created_unix: 0,
        incarnation: 1,
    }
}

fn map(epoch: u64) -> VolumeMap {
    VolumeMap {
        id: VolumeId(1),
        name: "v".into(),
        epoch: Epoch(epoch),
        size: 8 << 20,
        page_size: 1 << 20,
        partitions: vec![Partition {
            first_page: 0,
            end_page: 8,
            replicas: vec![Replica {
                server: "store-1".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                state: MirrorState::InSync,
            }],
        }],
    }
}

async fn open(path: &Path) -> Result<Store<StdDevice>, EngineError> {
    let lock = std::fs::File::open(path).unwrap();
    Store::open(StdDevice::open(path).unwrap(), lock, path, superblock()).await
}

async fn read_block(store: &Store<StdDevice>, offset: u64) -> Vec<u8> {
    let vol = store.volume(VolumeId(1)).unwrap();
    let pieces = store.read(&vol, offset, 4096).await.unwrap();
    match &pieces[..] {
        [store::ReadPiece::Data(buf)] => buf.to_vec(),
        [store::ReadPiece::Zeroes(n)] => vec![0; *n],
        other => panic!("{} pieces", other.len()),
    }
}

fn damage(path: &Path, block: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[(block * BLOCK) as usize + 1000] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn torn_copy_falls_back_and_double_damage_is_refused() {
    let (_dir, path) = data_file();
    let sb = superblock();
    let g = sb.geometry;
    store::format(&StdDevice::open(&path).unwrap(), &path, &sb)
        .await
        .unwrap();
    {
        let store = open(&path).await.unwrap();
        store.apply_map(&map(3)).await.unwrap(); // volume record: seq 1 (copy B)
        let vol = store.volume(VolumeId(1)).unwrap();
        let mut data = AlignedBuf::zeroed(4096);
        data.fill(0xab);
        store.write(&vol, 0, data, false).await.unwrap(); // slot table block 0: seq 1 (copy B)
        store.apply_map(&map(4)).await.unwrap(); // volume record: seq 2 (copy A)
        assert_eq!(read_block(&store, 0).await, vec![0xab; 4096]);
    }

    // Tear the newest volume record (epoch 4, copy A): epoch 3 comes back.
    damage(&path, Geometry::copy_a(g.volume_table, 0));
    let store = open(&path).await.unwrap();
    assert_eq!(store.volume(VolumeId(1)).unwrap().epoch(), Epoch(3));
    assert_eq!(read_block(&store, 0).await, vec![0xab; 4096]);
    drop(store);

    // Tear the slot-table write that mapped the chunk (copy B): the mapping
    // was never acknowledged, the chunk reads as zeroes, the store opens.
    damage(&path, Geometry::copy_a(g.slot_table, 0) + 1);
    let store = open(&path).await.unwrap();
    assert_eq!(read_block(&store, 0).await, vec![0; 4096]);
    assert_eq!(store.slot_usage().0, 0);
    drop(store);

    // Both copies of the volume record damaged: refused, file untouched.
    damage(&path, Geometry::copy_a(g.volume_table, 0) + 1);
    let before = std::fs::read(&path).unwrap();
    let err = open(&path).await.unwrap_err();
    assert!(matches!(err, EngineError::MetadataDamaged { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn uring_device_reads_back_what_it_wrote() {
    let (_dir, path) = data_file();
    tokio_uring::start(async {
        let dev = UringDevice::open(&path).unwrap();
        let mut buf = AlignedBuf::zeroed(8192);
        buf[4096..].fill(7);
        let (res, buf) = dev.write_at(buf, 4096..8192, 1 << 20).await;
        res.unwrap();
        let (res, back) = dev
            .read_at(AlignedBuf::zeroed(4096), 0..4096, 1 << 20)
            .await;
        res.unwrap();
        assert_eq!(&back[..], &buf[4096..]);
        dev.sync_data().await.unwrap();
    });
}
