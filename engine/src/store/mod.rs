//! The store: volumes, epochs, the page (chunk) table and data I/O on one device.
//!
//! Everything runs on one thread (tokio-uring), so in-memory tables live in
//! `RefCell`s that are never borrowed across an `.await`. What must be
//! serialized across awaits has its own async lock:
//! * each metadata block: updates are applied and written one at a time;
//! * each chunk: reads and writes share it, allocating or freeing its slot
//!   takes it exclusively, so a slot is never reused under an in-flight I/O;
//! * each volume's epoch gate: requests hold it shared from their epoch check
//!   to completion, and a new epoch takes it exclusively, so once a map push
//!   is acknowledged no request admitted under the old epoch is still running.

mod admission;
pub mod bitmask;
mod data;
pub mod lease;
mod maps;
mod meta;
pub mod open;
mod volume;

pub use admission::{Admission, Part, PartitionRef, Placement, Refusal, Refused};
pub use data::ReadPiece;
pub use lease::{Lease, NoLease};
pub use volume::{Admitted, Volume};

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tessera_net::proto::VolumeId;
use tokio::sync::{Mutex, RwLock};
use tracing::{info, warn};

use crate::disk::aligned::AlignedBuf;
use crate::disk::format::{
    self, BLOCK, BitmaskBlock, Geometry, SLOTS_PER_BLOCK, SlotEntry, Superblock, SuperblockFault,
    VolumeRecord,
};
use crate::disk::io::BlockDevice;
use crate::error::EngineError;
use crate::store::bitmask::Bitmasks;

pub(super) struct MetaBlock {
    seq: Cell<u64>,
    lock: Mutex<()>,
}

pub(super) type ChunkKey = (VolumeId, u64);

pub struct Store<D> {
    dev: D,
    /// Holds the exclusive lock on the data file while the store is open.
    _lock: Option<std::fs::File>,
    path: PathBuf,
    superblock: Superblock,
    volume_blocks: Vec<MetaBlock>,
    slot_blocks: Vec<MetaBlock>,
    bitmask_blocks: Vec<MetaBlock>,
    bitmasks: RefCell<Bitmasks>,
    volumes: RefCell<HashMap<VolumeId, Rc<Volume>>>,
    free_records: RefCell<BTreeSet<u64>>,
    slot_table: RefCell<Vec<SlotEntry>>,
    free_slots: RefCell<BTreeSet<u32>>,
    /// Slots freed since the last sync: not reused until a sync has made the
    /// cleared slot-table entries durable, so that after power loss no slot
    /// can be claimed by two chunks or show one volume's bytes in another.
    quarantine: RefCell<Vec<u32>>,
    /// Serializes map pushes and volume drops (they create and remove volumes).
    map_lock: Mutex<()>,
    /// Set when a metadata write failed: memory and disk may disagree, so
    /// the store stops serving until it is restarted and reloaded from disk.
    failed: Cell<bool>,
    chunks: RefCell<HashMap<ChunkKey, Rc<RwLock<Option<u32>>>>>,
    /// Admission needs it while the server reports to a management server.
    lease: Lease,
}

impl<D> std::fmt::Debug for Store<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("server", &self.superblock.server_name)
            .finish_non_exhaustive()
    }
}

pub(super) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EngineError {
    let path = path.to_path_buf();
    move |source| EngineError::Io { op, path, source }
}

async fn read_blocks<D: BlockDevice>(
    dev: &D,
    path: &Path,
    first: u64,
    count: u64,
) -> Result<AlignedBuf, EngineError> {
    let len = usize::try_from(count * BLOCK).map_err(|_| EngineError::Config {
        reason: "metadata area too large for memory".into(),
    })?;
    let (res, buf) = dev
        .read_at(AlignedBuf::zeroed(len), 0..len, first * BLOCK)
        .await;
    res.map_err(io_err("read metadata of", path))?;
    Ok(buf)
}

/// Read both superblock copies; the newest valid one wins, faults are classified.
pub async fn read_superblock<D: BlockDevice>(
    dev: &D,
    path: &Path,
) -> Result<Result<Superblock, SuperblockFault>, EngineError> {
    let buf = read_blocks(dev, path, 0, 2).await?;
    let a = Superblock::decode(&buf[..BLOCK as usize]);
    let b = Superblock::decode(&buf[BLOCK as usize..]);
    Ok(match (a, b) {
        (Ok(sb), _) | (_, Ok(sb)) => Ok(sb),
        (Err(SuperblockFault::Version(v)), _) | (_, Err(SuperblockFault::Version(v))) => {
            Err(SuperblockFault::Version(v))
        }
        (Err(SuperblockFault::Blank), Err(SuperblockFault::Blank)) => Err(SuperblockFault::Blank),
        (Err(SuperblockFault::Damaged), _) | (_, Err(SuperblockFault::Damaged)) => {
            Err(SuperblockFault::Damaged)
        }
        _ => Err(SuperblockFault::NoMagic),
    })
}

/// Write an empty metadata area and the superblock (both copies), then sync.
pub async fn format<D: BlockDevice>(
    dev: &D,
    path: &Path,
    sb: &Superblock,
) -> Result<(), EngineError> {
    const CHUNK: u64 = 1 << 20;
    // Clear the old superblock first: an interrupted format must not leave a
    // valid superblock over half-cleared metadata.
    let (res, _) = dev
        .write_at(
            AlignedBuf::zeroed(2 * BLOCK as usize),
            0..2 * BLOCK as usize,
            0,
        )
        .await;
    res.map_err(io_err("format", path))?;
    let meta = sb.geometry.metadata_blocks();
    let (mut pos, end) = (meta.start * BLOCK, meta.end * BLOCK);
    let mut zeroes = AlignedBuf::zeroed(CHUNK as usize);
    while pos < end {
        let n = (end - pos).min(CHUNK) as usize;
        let (res, buf) = dev.write_at(zeroes, 0..n, pos).await;
        res.map_err(io_err("format", path))?;
        zeroes = buf;
        pos += n as u64;
    }
    let encoded = sb
        .encode()
        .map_err(|reason| EngineError::Config { reason })?;
    let mut block = AlignedBuf::zeroed(2 * BLOCK as usize);
    block[..BLOCK as usize].copy_from_slice(&encoded);
    block[BLOCK as usize..].copy_from_slice(&encoded);
    let len = block.len();
    let (res, _) = dev.write_at(block, 0..len, 0).await;
    res.map_err(io_err("write superblock of", path))?;
    dev.sync_data().await.map_err(io_err("sync", path))
}

impl Store<crate::disk::io::MemDevice> {
    /// As [`Store::open`] for an in-memory device, which no other process
    /// can reach and so needs no lock.
    pub async fn open_in_memory(
        dev: crate::disk::io::MemDevice,
        superblock: Superblock,
    ) -> Result<Self, EngineError> {
        Self::load(dev, None, Path::new("memory"), superblock).await
    }
}

impl<D: BlockDevice> Store<D> {
    /// Load a formatted device: the volume table and the slot table.
    /// `lock` holds the data file's exclusive lock for as long as the store lives.
    pub async fn open(
        dev: D,
        lock: std::fs::File,
        path: &Path,
        superblock: Superblock,
    ) -> Result<Self, EngineError> {
        Self::load(dev, Some(lock), path, superblock).await
    }

    async fn load(
        dev: D,
        lock: Option<std::fs::File>,
        path: &Path,
        superblock: Superblock,
    ) -> Result<Self, EngineError> {
        let g = superblock.geometry;
        let path = path.to_path_buf();
        let mut volumes = HashMap::new();
        let mut free_records = BTreeSet::new();
        let mut volume_blocks = Vec::new();
        let table = read_blocks(&dev, &path, g.volume_table, 2 * u64::from(g.max_volumes)).await?;
        for index in 0..u64::from(g.max_volumes) {
            let (seq, payload) =
                choose_copy(&table, index, Geometry::copy_a(g.volume_table, index))?;
            volume_blocks.push(MetaBlock {
                seq: Cell::new(seq),
                lock: Mutex::new(()),
            });
            match VolumeRecord::decode(payload) {
                Ok(Some(record)) if volumes.contains_key(&record.id) => {
                    warn!(index, volume = %record.id, "volume recorded twice");
                    return Err(EngineError::MetadataDamaged {
                        block: Geometry::copy_a(g.volume_table, index),
                    });
                }
                Ok(Some(record)) => {
                    let id = record.id;
                    volumes.insert(id, Rc::new(Volume::new(id, index, record)));
                }
                Ok(None) => {
                    free_records.insert(index);
                }
                Err(reason) => {
                    warn!(index, reason, "volume record is inconsistent");
                    return Err(EngineError::MetadataDamaged {
                        block: Geometry::copy_a(g.volume_table, index),
                    });
                }
            }
        }

        let mut slot_table = Vec::with_capacity(g.slot_count as usize);
        let mut slot_blocks = Vec::new();
        let blocks = g.slot_table_blocks();
        // Read the slot table in pieces of 512 logical blocks (4 MiB).
        let mut first = 0;
        while first < blocks {
            let count = (blocks - first).min(512);
            let area = read_blocks(&dev, &path, g.slot_table + 2 * first, 2 * count).await?;
            for i in 0..count {
                let index = first + i;
                let (seq, payload) = choose_copy(&area, i, Geometry::copy_a(g.slot_table, index))?;
                slot_blocks.push(MetaBlock {
                    seq: Cell::new(seq),
                    lock: Mutex::new(()),
                });
                let entries = (g.slot_count - index * SLOTS_PER_BLOCK).min(SLOTS_PER_BLOCK);
                slot_table.extend(format::decode_slot_entries(payload, entries as usize));
            }
            first += count;
        }

        let mut bitmasks = Bitmasks::new(g.bitmask_blocks);
        let mut bitmask_blocks = Vec::new();
        let area = read_blocks(&dev, &path, g.bitmasks, 2 * g.bitmask_blocks).await?;
        for pool in 0..g.bitmask_blocks {
            let home = Geometry::copy_a(g.bitmasks, pool);
            let (seq, payload) = choose_copy(&area, pool, home)?;
            bitmask_blocks.push(MetaBlock {
                seq: Cell::new(seq),
                lock: Mutex::new(()),
            });
            let loaded = match BitmaskBlock::decode(payload) {
                Ok(Some(block)) => bitmasks.load(pool, block),
                Ok(None) => Ok(()),
                Err(reason) => Err(reason),
            };
            if let Err(reason) = loaded {
                warn!(pool, reason, "bitmask block is inconsistent");
                return Err(EngineError::MetadataDamaged { block: home });
            }
        }

        let mut chunks = HashMap::new();
        let mut free_slots = BTreeSet::new();
        for (slot, entry) in slot_table.iter().enumerate() {
            let slot = u32::try_from(slot).map_err(|_| EngineError::Config {
                reason: "more than 2^32 slots".into(),
            })?;
            if entry.volume == VolumeId(0) {
                free_slots.insert(slot);
            } else if chunks
                .insert(
                    (entry.volume, entry.chunk),
                    Rc::new(RwLock::new(Some(slot))),
                )
                .is_some()
            {
                return Err(EngineError::MetadataDamaged {
                    block: g.slot_table + 2 * (u64::from(slot) / SLOTS_PER_BLOCK),
                });
            }
        }
        info!(
            path = %path.display(),
            volumes = volumes.len(),
            used_slots = chunks.len(),
            free_slots = free_slots.len(),
            "store opened"
        );
        Ok(Store {
            dev,
            _lock: lock,
            path,
            superblock,
            volume_blocks,
            slot_blocks,
            bitmask_blocks,
            bitmasks: RefCell::new(bitmasks),
            volumes: RefCell::new(volumes),
            free_records: RefCell::new(free_records),
            slot_table: RefCell::new(slot_table),
            free_slots: RefCell::new(free_slots),
            quarantine: RefCell::default(),
            map_lock: Mutex::new(()),
            failed: Cell::new(false),
            chunks: RefCell::new(chunks),
            lease: Lease::default(),
        })
    }

    /// The lease that admission checks (see [`Lease`]).
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn volume(&self, id: VolumeId) -> Option<Rc<Volume>> {
        self.volumes.borrow().get(&id).cloned()
    }

    pub fn volumes(&self) -> Vec<Rc<Volume>> {
        let mut all: Vec<_> = self.volumes.borrow().values().cloned().collect();
        all.sort_by_key(|v| v.id);
        all
    }

    /// Data slots in use and in total.
    pub fn slot_usage(&self) -> (u64, u64) {
        let g = self.superblock.geometry;
        (
            g.slot_count - self.free_slots.borrow().len() as u64,
            g.slot_count,
        )
    }

    fn ensure_serving(&self) -> Result<(), EngineError> {
        if self.failed.get() {
            return Err(EngineError::Stopped);
        }
        Ok(())
    }
}

fn choose_copy(area: &[u8], index: u64, home: u64) -> Result<(u64, &[u8]), EngineError> {
    let at = (2 * index * BLOCK) as usize;
    let block = |i: usize| {
        area.get(at + i * BLOCK as usize..at + (i + 1) * BLOCK as usize)
            .unwrap_or(&[])
    };
    format::choose(
        format::decode_meta(block(0), home, 0),
        format::decode_meta(block(1), home, 1),
    )
    .ok_or(EngineError::MetadataDamaged { block: home })
}

#[cfg(test)]
mod tests;
