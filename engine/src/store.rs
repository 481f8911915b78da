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

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tessera_net::proto::{
    Epoch, EpochVerdict, FLAG_REPLICA, FLAG_RESYNC, MAX_VOLUME_SIZE, MgmtReply, MirrorState,
    Partition, Refusal as MgmtRefusal, Request, Role, Status, VolumeId, VolumeMap,
};
use tessera_net::quic::PeerIdentity;
use tokio::sync::{Mutex, RwLock, RwLockReadGuard};
use tracing::{info, warn};

use crate::aligned::AlignedBuf;
use crate::bitmask::{Bitmasks, PoolFull};
use crate::error::EngineError;
use crate::format::{
    self, BLOCK, BitmaskBlock, Geometry, SLOTS_PER_BLOCK, SlotEntry, Superblock, SuperblockFault,
    VOLUME_NEEDS_FULL_COPY, VolumeRecord,
};
use crate::io::BlockDevice;

/// Why a data request is answered without being executed, with the
/// server's epoch for the volume (0 if it does not hold the volume). The
/// reply's status comes from the reason; its text is rendered only when
/// the reply is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub epoch: Epoch,
    pub reason: Refused,
}

impl Refusal {
    pub fn new(epoch: Epoch, reason: Refused) -> Self {
        Refusal { epoch, reason }
    }

    /// The status the reply carries.
    pub fn status(&self) -> Status {
        self.reason.status()
    }
}

/// The reasons a data request is refused, each with the fields that say
/// what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The request's epoch is not the volume's.
    #[error("{0}")]
    Epoch(EpochVerdict),
    /// A new epoch is being applied right now.
    #[error("an epoch change is in progress")]
    EpochChanging,
    /// A mirror is applying a newer epoch: the sender retries under it.
    #[error("mirror {mirror} is changing epoch")]
    MirrorChangingEpoch { mirror: String },
    /// A mirror failed, and the map changed before its loss was recorded.
    #[error("mirror {mirror} failed and the map changed meanwhile")]
    MirrorLostMapChanged { mirror: String },
    /// A mirror failed, and the management server did not record it.
    #[error("mirror {mirror} failed and its loss is not recorded: {refusal}")]
    MirrorLossUnrecorded {
        mirror: String,
        refusal: MgmtRefusal,
    },
    /// The header, payload or stream is malformed.
    #[error("{0}")]
    Malformed(tessera_net::proto::ProtoError),
    /// The payload did not arrive.
    #[error("payload not received: {error}")]
    PayloadNotReceived { error: String },
    /// The request's stream did not end after its payload in time.
    #[error("request stream not finished within {after:?}")]
    StreamNotFinished { after: std::time::Duration },
    /// The payload did not arrive in time.
    #[error("payload not received within {after:?}")]
    PayloadTimeout { after: std::time::Duration },
    /// A role that may not send data requests.
    #[error("role {role} may not send data requests")]
    RoleMayNotSendData { role: Role },
    /// A replica request from a peer that is not a storage server.
    #[error("role {role} may not send replica requests")]
    ReplicaFromRole { role: Role },
    /// The range ends past the volume.
    #[error("range ends at {end} past the volume size {size}")]
    PastEnd { end: u64, size: u64 },
    /// The volume is not held here.
    #[error("volume {volume} is not held by this server")]
    UnknownVolume { volume: VolumeId },
    /// The pages are not held here.
    #[error("pages {first}..={last} are not held by this server")]
    PagesNotHeld { first: u64, last: u64 },
    /// The range spans two partitions.
    #[error("pages {first}..={last} are not one partition")]
    AcrossPartitions { first: u64, last: u64 },
    /// A replica request from a peer that is not the partition's primary,
    /// or to a mirror that is out of sync.
    #[error("{sender} is not the primary of pages {first}..={last}, or this mirror is out of sync")]
    NotFromPrimary {
        sender: String,
        first: u64,
        last: u64,
    },
    /// A client request to a server that does not lead the pages.
    #[error("this server is not the primary of pages {first}..={last}")]
    NotPrimary { first: u64, last: u64 },
    /// The path needs a primary's admission and was not given one.
    #[error("not admitted as the partition's primary")]
    NotAdmittedAsPrimary,
    /// The volume's map has not been fetched since a restart.
    #[error("this server is fetching the volume's map after a restart")]
    NoMapYet,
    /// A metadata write failed earlier: the store serves nothing more.
    #[error("the store stopped after a metadata write error; restart the server")]
    Stopped,
    /// The disk failed the operation.
    #[error("{error}")]
    Io { error: String },
}

impl Refused {
    /// The one status each reason is answered with.
    pub fn status(&self) -> Status {
        match self {
            Refused::Epoch(_)
            | Refused::EpochChanging
            | Refused::MirrorChangingEpoch { .. }
            | Refused::MirrorLostMapChanged { .. } => Status::StaleEpoch,
            Refused::Malformed(e) => e.status(),
            Refused::PayloadNotReceived { .. }
            | Refused::StreamNotFinished { .. }
            | Refused::PayloadTimeout { .. } => Status::BadRequest,
            Refused::RoleMayNotSendData { .. } | Refused::ReplicaFromRole { .. } => {
                Status::Forbidden
            }
            Refused::PastEnd { .. } => Status::OutOfRange,
            Refused::UnknownVolume { .. }
            | Refused::PagesNotHeld { .. }
            | Refused::AcrossPartitions { .. }
            | Refused::NotFromPrimary { .. }
            | Refused::NotPrimary { .. }
            | Refused::NotAdmittedAsPrimary => Status::NotOwner,
            Refused::NoMapYet | Refused::MirrorLossUnrecorded { .. } => Status::Unavailable,
            Refused::Stopped | Refused::Io { .. } => Status::IoError,
        }
    }
}

/// A piece of read data: bytes from the device, or a run of zeroes.
#[derive(Debug)]
pub enum ReadPiece {
    Data(AlignedBuf),
    Zeroes(usize),
}

struct MetaBlock {
    seq: Cell<u64>,
    lock: Mutex<()>,
}

/// A volume this server holds a part of.
#[derive(Debug)]
pub struct Volume {
    pub id: VolumeId,
    record_index: u64,
    record: RefCell<VolumeRecord>,
    /// The whole map slice (replica sets and states), from the management
    /// server; `None` after a restart until it has been fetched again.
    map: RefCell<Option<Rc<VolumeMap>>>,
    /// Created by a map push in this process (not loaded from the device):
    /// nothing was written to it before this process knew its map.
    assigned_here: Cell<bool>,
    gate: RwLock<()>,
}

impl Volume {
    fn new(id: VolumeId, record_index: u64, record: VolumeRecord) -> Self {
        Volume {
            id,
            record_index,
            record: RefCell::new(record),
            map: RefCell::new(None),
            assigned_here: Cell::new(false),
            gate: RwLock::new(()),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.record.borrow().epoch
    }

    /// The map slice this server enforces, once known.
    pub fn map(&self) -> Option<Rc<VolumeMap>> {
        self.map.borrow().clone()
    }

    /// Whether this volume was assigned by a map push in this process.
    pub fn assigned_here(&self) -> bool {
        self.assigned_here.get()
    }

    /// Whether this replica was created empty and still needs a full copy.
    pub fn needs_full_copy(&self) -> bool {
        self.record.borrow().flags & VOLUME_NEEDS_FULL_COPY != 0
    }

    /// Hold the epoch gate shared: the epoch does not change until dropped.
    pub async fn hold(&self) -> Admitted<'_> {
        Admitted {
            _gate: self.gate.read().await,
        }
    }

    pub fn record(&self) -> VolumeRecord {
        self.record.borrow().clone()
    }
}

/// Admission to a volume: holding it keeps the volume's epoch fixed.
#[derive(Debug)]
pub struct Admitted<'a> {
    _gate: RwLockReadGuard<'a, ()>,
}

/// This server's part in the partition a request falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// It leads the partition: client requests come here and are forwarded.
    Primary,
    /// It mirrors the partition for the sender, the partition's primary.
    Mirror,
}

/// One partition of a shared map slice; cheap to clone and keep.
#[derive(Debug, Clone)]
pub struct PartitionRef {
    map: Rc<VolumeMap>,
    /// Always a valid index of `map.partitions`: it comes from `Store::check`,
    /// which found it in this very map.
    index: usize,
}

impl std::ops::Deref for PartitionRef {
    type Target = Partition;
    fn deref(&self) -> &Partition {
        &self.map.partitions[self.index]
    }
}

/// Where `Store::check` found a request to fall: the map it was judged
/// against and, for a request with a range, the index of its partition in
/// that map and this server's part in it.
#[derive(Debug, Clone)]
pub struct Placement {
    map: Option<Rc<VolumeMap>>,
    at: Option<(usize, Part)>,
}

impl Placement {
    /// The map the request was judged against (none for a request without
    /// a range on a server that has not fetched its map since a restart).
    pub fn map(&self) -> Option<&Rc<VolumeMap>> {
        self.map.as_ref()
    }
}

/// An admitted request: what admission found, and the volume's epoch gate,
/// held until the request's I/O is done. The paths that serve the request
/// take this and look none of it up again.
#[derive(Debug)]
pub struct Admission<'a> {
    /// The volume's epoch, fixed while this is held.
    pub epoch: Epoch,
    pub placement: Placement,
    _gate: Admitted<'a>,
}

impl Admission<'_> {
    /// The partition of a ranged request, if this server has `part` in it.
    pub fn partition(&self, part: Part) -> Option<PartitionRef> {
        let (index, found) = self.placement.at?;
        let map = self.placement.map.clone()?;
        (found == part).then_some(PartitionRef { map, index })
    }
}

type ChunkKey = (VolumeId, u64);

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
}

impl<D> std::fmt::Debug for Store<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("server", &self.superblock.server_name)
            .finish_non_exhaustive()
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EngineError {
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

impl Store<crate::io::MemDevice> {
    /// As [`Store::open`] for an in-memory device, which no other process
    /// can reach and so needs no lock.
    pub async fn open_in_memory(
        dev: crate::io::MemDevice,
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
        })
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

    /// Persist one logical metadata block: bump its sequence number and write
    /// the copy that number selects. The caller holds the block's lock.
    async fn write_meta(
        &self,
        block: &MetaBlock,
        home: u64,
        payload: &[u8],
    ) -> Result<(), EngineError> {
        let seq = block.seq.get() + 1;
        let mut buf = AlignedBuf::zeroed(BLOCK as usize);
        format::encode_meta(seq, home, payload, &mut buf);
        let (res, _) = self
            .dev
            .write_at(
                buf,
                0..BLOCK as usize,
                (home + format::copy_for(seq)) * BLOCK,
            )
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, block = home, "metadata write failed: the store stops serving until restarted");
            self.failed.set(true);
            return Err(io_err("write metadata of", &self.path)(e));
        }
        block.seq.set(seq);
        Ok(())
    }

    async fn write_volume_record(
        &self,
        index: u64,
        record: &VolumeRecord,
    ) -> Result<(), EngineError> {
        let payload = record
            .encode()
            .map_err(|count| EngineError::TooManyRanges {
                volume: record.id,
                count,
                max: format::MAX_RANGES,
            })?;
        self.write_volume_block(index, &payload).await
    }

    /// Persist the volume-table block `index` (an empty payload is an empty record).
    async fn write_volume_block(&self, index: u64, payload: &[u8]) -> Result<(), EngineError> {
        let block = &self.volume_blocks[index as usize];
        let _lock = block.lock.lock().await;
        let home = Geometry::copy_a(self.superblock.geometry.volume_table, index);
        self.write_meta(block, home, payload).await
    }

    /// Set one slot-table entry durably.
    async fn write_slot_entry(&self, slot: u32, entry: SlotEntry) -> Result<(), EngineError> {
        let index = u64::from(slot) / SLOTS_PER_BLOCK;
        let block = &self.slot_blocks[index as usize];
        let _lock = block.lock.lock().await;
        let range = (index * SLOTS_PER_BLOCK) as usize
            ..(((index + 1) * SLOTS_PER_BLOCK) as usize).min(self.slot_table.borrow().len());
        let previous = std::mem::replace(&mut self.slot_table.borrow_mut()[slot as usize], entry);
        let payload = format::encode_slot_entries(&self.slot_table.borrow()[range]);
        let home = Geometry::copy_a(self.superblock.geometry.slot_table, index);
        let result = self.write_meta(block, home, &payload).await;
        if result.is_err() {
            self.slot_table.borrow_mut()[slot as usize] = previous;
        }
        result
    }

    /// Set `regions` of `volume` for each of `peers` and make the bits
    /// durable before returning (write-intent). Regions whose bits are
    /// already on the device cost no metadata write.
    pub async fn mark_dirty(
        &self,
        volume: VolumeId,
        peers: &[&str],
        regions: Range<u64>,
    ) -> Result<(), EngineError> {
        for peer in peers {
            let pools = self
                .bitmasks
                .borrow_mut()
                .set(volume, peer, regions.clone())
                .map_err(|PoolFull| EngineError::BitmaskPoolFull {
                    blocks: self.superblock.geometry.bitmask_blocks,
                })?;
            for pool in pools {
                self.persist_bitmask(pool).await?;
            }
        }
        Ok(())
    }

    /// Clear `regions` of `volume` for `peer`, durably.
    pub async fn clear_dirty(
        &self,
        volume: VolumeId,
        peer: &str,
        regions: &[u64],
    ) -> Result<(), EngineError> {
        let runs: Vec<Range<u64>> = tessera_net::proto::region_runs(regions)
            .into_iter()
            .map(|(first, end)| first..end)
            .collect();
        self.clear_dirty_runs(volume, peer, &runs).await
    }

    /// Clear runs of regions of `volume` for `peer`, durably; the cost does
    /// not depend on how long the runs are.
    pub async fn clear_dirty_runs(
        &self,
        volume: VolumeId,
        peer: &str,
        runs: &[Range<u64>],
    ) -> Result<(), EngineError> {
        let mut pools = Vec::new();
        for run in runs {
            pools.extend(self.bitmasks.borrow_mut().clear(volume, peer, run.clone()));
        }
        pools.sort_unstable();
        pools.dedup();
        for pool in pools {
            self.persist_bitmask(pool).await?;
        }
        Ok(())
    }

    /// Whether `region` is durably set for `peer`.
    pub fn is_dirty(&self, volume: VolumeId, peer: &str, region: u64) -> bool {
        self.bitmasks.borrow().is_durable(volume, peer, region)
    }

    /// Regions set for `peer`, ascending.
    pub fn dirty_regions(&self, volume: VolumeId, peer: &str) -> Vec<u64> {
        self.bitmasks.borrow().regions(volume, peer)
    }

    /// How many regions of `range` are set for `peer`.
    pub fn dirty_count(&self, volume: VolumeId, peer: &str, range: Range<u64>) -> u64 {
        self.bitmasks.borrow().count_range(volume, peer, range)
    }

    /// Peers with bits for `volume`.
    pub fn dirty_peers(&self, volume: VolumeId) -> Vec<String> {
        self.bitmasks.borrow().peers(volume)
    }

    /// Bitmask pool blocks in use and in total.
    pub fn bitmask_usage(&self) -> (u64, u64) {
        self.bitmasks.borrow().usage()
    }

    /// Write pool block `pool` as the bitmask now is (under its lock).
    async fn persist_bitmask(&self, pool: u64) -> Result<(), EngineError> {
        let Some(block) = self.bitmask_blocks.get(pool as usize) else {
            return Ok(());
        };
        let _lock = block.lock.lock().await;
        let Some((payload, bits)) = self.bitmasks.borrow().snapshot(pool) else {
            return Ok(());
        };
        if self.bitmasks.borrow().is_persisted(pool, &bits) {
            return Ok(());
        }
        let home = Geometry::copy_a(self.superblock.geometry.bitmasks, pool);
        self.write_meta(block, home, &payload).await?;
        self.bitmasks.borrow_mut().persisted(pool, bits);
        Ok(())
    }

    /// Apply a map slice pushed by the management server: record the volume's
    /// epoch, size and the page ranges this server holds. Waits until requests
    /// admitted under the previous epoch have finished; returns the new epoch
    /// once it is durable.
    pub async fn apply_map(&self, map: &VolumeMap) -> Result<Epoch, EngineError> {
        let _serial = self.map_lock.lock().await;
        self.ensure_serving()?;
        if map.id == VolumeId(0) || map.size > MAX_VOLUME_SIZE {
            return Err(EngineError::Config {
                reason: format!("volume id {} or size {} is not valid", map.id, map.size),
            });
        }
        if map.page_size == 0 || u64::from(map.page_size) % BLOCK != 0 {
            return Err(EngineError::Config {
                reason: format!("page size {} is not a multiple of {BLOCK}", map.page_size),
            });
        }
        check_layout(map)?;
        let me = &self.superblock.server_name;
        let mut record = VolumeRecord {
            id: map.id,
            epoch: map.epoch,
            size: map.size,
            page_size: map.page_size,
            ranges: map.owned_ranges(me),
            flags: 0,
        };
        let in_sync = map
            .partitions
            .iter()
            .flat_map(|p| p.replicas.iter())
            .filter(|r| &r.server == me)
            .all(|r| r.state == MirrorState::InSync);
        if let Some(volume) = self.volume(map.id) {
            let _exclusive = volume.gate.write().await;
            let current = volume.epoch();
            if EpochVerdict::judge(current, map.epoch).is_stale() {
                return Err(EngineError::EpochRegression {
                    volume: map.id,
                    current,
                    pushed: map.epoch,
                });
            }
            // A replica that needs a full copy keeps needing it until the map says it is in sync.
            if volume.needs_full_copy() && !in_sync {
                record.flags |= VOLUME_NEEDS_FULL_COPY;
            }
            // With the gate held no write is in flight: the check is exact.
            self.refuse_data_loss(&volume.record.borrow(), &record)?;
            if *volume.record.borrow() != record {
                self.write_volume_record(volume.record_index, &record)
                    .await?;
                info!(volume = %map.id, from = %current, to = %map.epoch, "epoch changed");
                *volume.record.borrow_mut() = record;
            }
            *volume.map.borrow_mut() = Some(Rc::new(map.clone()));
            return Ok(map.epoch);
        }
        // A volume new to this server, on which it is not in sync: its
        // replicas were lost (a replaced or wiped disk) and must be copied
        // whole. Bits under this server's own name record what it lacks (set
        // before the record exists, so a crash cannot leave an empty replica
        // that looks whole); resync clears them as regions arrive, so a
        // restarted resync resumes. If the pool cannot hold them, the record
        // says to copy everything.
        if !in_sync {
            let region = u64::from(self.superblock.geometry.region_size);
            let page = u64::from(map.page_size);
            for (first, end) in &record.ranges {
                let bytes = first * page..(end * page).min(map.size);
                let regions = bytes.start / region..bytes.end.div_ceil(region);
                match self.mark_dirty(map.id, &[me.as_str()], regions).await {
                    Ok(()) => {}
                    Err(EngineError::BitmaskPoolFull { .. }) => {
                        record.flags |= VOLUME_NEEDS_FULL_COPY;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let index =
            self.free_records
                .borrow_mut()
                .pop_first()
                .ok_or(EngineError::TooManyVolumes {
                    max: self.superblock.geometry.max_volumes,
                })?;
        if let Err(e) = self.write_volume_record(index, &record).await {
            self.free_records.borrow_mut().insert(index);
            return Err(e);
        }
        info!(volume = %map.id, epoch = %map.epoch, name = %map.name, full_copy = !in_sync, "volume assigned");
        let volume = Volume::new(map.id, index, record);
        volume.assigned_here.set(true);
        *volume.map.borrow_mut() = Some(Rc::new(map.clone()));
        self.volumes.borrow_mut().insert(map.id, Rc::new(volume));
        Ok(map.epoch)
    }

    /// Would applying `map` take pages holding data from this server? A dry
    /// run of the check `apply_map` makes, for the management server to ask
    /// before it changes a layout.
    pub fn check_map(&self, map: &VolumeMap) -> Result<(), EngineError> {
        check_layout(map)?;
        let Some(volume) = self.volume(map.id) else {
            return Ok(());
        };
        let record = VolumeRecord {
            id: map.id,
            epoch: map.epoch,
            size: map.size,
            page_size: map.page_size,
            ranges: map.owned_ranges(&self.superblock.server_name),
            flags: volume.record.borrow().flags,
        };
        self.refuse_data_loss(&volume.record.borrow(), &record)
    }

    /// Refuse a record change that would take pages with data from this server.
    fn refuse_data_loss(&self, old: &VolumeRecord, new: &VolumeRecord) -> Result<(), EngineError> {
        let slot = u64::from(self.superblock.geometry.slot_size);
        let old_page = u64::from(old.page_size);
        let kept = |page: u64| {
            page * u64::from(new.page_size) < new.size
                && new.ranges.iter().any(|(a, b)| *a <= page && page < *b)
                && new.page_size == old.page_size
        };
        let mut lost: Vec<u64> = Vec::new();
        for ((volume, chunk), lock) in self.chunks.borrow().iter() {
            // A chunk being allocated counts as holding data.
            let holds = *volume == old.id && lock.try_read().map_or(true, |s| s.is_some());
            if !holds {
                continue;
            }
            let first = chunk * slot / old_page;
            let last = ((chunk + 1) * slot - 1) / old_page;
            lost.extend((first..=last).filter(|p| !kept(*p)));
        }
        if lost.is_empty() {
            return Ok(());
        }
        lost.sort_unstable();
        lost.dedup();
        let shown: Vec<String> = lost.iter().take(8).map(u64::to_string).collect();
        let more = if lost.len() > 8 {
            format!(" and {} more", lost.len() - 8)
        } else {
            String::new()
        };
        Err(EngineError::WouldLoseData {
            volume: old.id,
            pages: format!("{}{more}", shown.join(", ")),
        })
    }

    /// Forget a deleted volume: free every slot and bitmask it holds, then its record.
    /// Waits for requests in flight on it; later ones get NOT_OWNER.
    pub async fn drop_volume(&self, id: VolumeId) -> Result<(), EngineError> {
        let _serial = self.map_lock.lock().await;
        self.ensure_serving()?;
        let Some(volume) = self.volume(id) else {
            return Ok(());
        };
        let _exclusive = volume.gate.write().await;
        let keys: Vec<ChunkKey> = self
            .chunks
            .borrow()
            .keys()
            .filter(|(v, _)| *v == id)
            .copied()
            .collect();
        for key in keys {
            let Some(lock) = self.chunk_lock(key, false) else {
                continue;
            };
            let mut slot = lock.write().await;
            if let Some(s) = *slot {
                self.write_slot_entry(s, SlotEntry::default()).await?;
                *slot = None;
                self.quarantine.borrow_mut().push(s);
            }
            self.chunks.borrow_mut().remove(&key);
        }
        let pools = self.bitmasks.borrow().pool_blocks(id, None);
        for peer in self.dirty_peers(id) {
            self.bitmasks.borrow_mut().clear(id, &peer, 0..u64::MAX);
        }
        for pool in pools {
            self.persist_bitmask(pool).await?;
        }
        self.write_volume_block(volume.record_index, &[]).await?;
        self.volumes.borrow_mut().remove(&id);
        self.free_records.borrow_mut().insert(volume.record_index);
        info!(volume = %id, "volume dropped");
        Ok(())
    }

    /// The checks every data request passes before any disk I/O: the volume
    /// is held, the epoch matches, the range lies inside the volume and in
    /// pages this server holds, and the sender may send it here: a client
    /// only to the partition's primary, a forwarded (replica) request only
    /// from that primary to an in-sync or resyncing mirror. Does not wait;
    /// see [`Store::admit`].
    pub fn check(
        &self,
        volume: &Volume,
        request: &Request,
        peer: &PeerIdentity,
    ) -> Result<Placement, Refusal> {
        if self.failed.get() {
            return Err(Refusal::new(volume.epoch(), Refused::Stopped));
        }
        let record = volume.record.borrow();
        let verdict = EpochVerdict::judge(record.epoch, request.epoch);
        if !verdict.is_current() {
            return Err(Refusal::new(record.epoch, Refused::Epoch(verdict)));
        }
        let replica = request.flags & FLAG_REPLICA != 0;
        if request.flags & (FLAG_REPLICA | FLAG_RESYNC) != 0 && peer.role != Role::Storage {
            return Err(Refusal::new(
                record.epoch,
                Refused::ReplicaFromRole { role: peer.role },
            ));
        }
        if !request.opcode.has_range() {
            return Ok(Placement {
                map: volume.map(),
                at: None,
            });
        }
        if request.end() > record.size {
            return Err(Refusal::new(
                record.epoch,
                Refused::PastEnd {
                    end: request.end(),
                    size: record.size,
                },
            ));
        }
        let page = u64::from(record.page_size);
        let (first, last) = (request.offset / page, (request.end() - 1) / page);
        if !record.ranges.iter().any(|(a, b)| *a <= first && last < *b) {
            return Err(Refusal::new(
                record.epoch,
                Refused::PagesNotHeld { first, last },
            ));
        }
        let Some(map) = volume.map() else {
            return Err(Refusal::new(record.epoch, Refused::NoMapYet));
        };
        let me = &self.superblock.server_name;
        let Some(index) = map
            .partition_index_at(first)
            .filter(|i| last < map.partitions[*i].end_page)
        else {
            return Err(Refusal::new(
                record.epoch,
                Refused::AcrossPartitions { first, last },
            ));
        };
        let partition = &map.partitions[index];
        let primary = partition.replicas.first().map(|r| r.server.as_str());
        if replica {
            let mirror = partition.replicas.iter().skip(1).find(|r| &r.server == me);
            let receiving = mirror.is_some_and(|r| r.state != MirrorState::OutOfSync);
            if primary != Some(peer.name.as_str()) || !receiving {
                return Err(Refusal::new(
                    record.epoch,
                    Refused::NotFromPrimary {
                        sender: peer.name.clone(),
                        first,
                        last,
                    },
                ));
            }
        } else if primary != Some(me.as_str()) {
            return Err(Refusal::new(
                record.epoch,
                Refused::NotPrimary { first, last },
            ));
        }
        let part = if replica { Part::Mirror } else { Part::Primary };
        drop(record);
        Ok(Placement {
            map: Some(map),
            at: Some((index, part)),
        })
    }

    /// Look up the volume of a request, failing with NOT_OWNER.
    pub fn lookup(&self, request: &Request) -> Result<Rc<Volume>, Refusal> {
        self.volume(request.volume).ok_or_else(|| {
            Refusal::new(
                Epoch(0),
                Refused::UnknownVolume {
                    volume: request.volume,
                },
            )
        })
    }

    /// Admit a request: hold the volume's epoch gate and check the request.
    /// Keep the returned admission until the request's I/O is complete.
    pub async fn admit<'v>(
        &self,
        volume: &'v Volume,
        request: &Request,
        peer: &PeerIdentity,
    ) -> Result<Admission<'v>, Refusal> {
        let gate = volume.gate.read().await;
        let placement = self.check(volume, request, peer)?;
        Ok(Admission {
            epoch: volume.epoch(),
            placement,
            _gate: Admitted { _gate: gate },
        })
    }

    /// Admit a request without waiting: while a new epoch is being applied
    /// the request is refused with STALE_EPOCH at the current epoch (the
    /// sender retries once its own map has moved on).
    pub fn try_admit<'v>(
        &self,
        volume: &'v Volume,
        request: &Request,
        peer: &PeerIdentity,
    ) -> Result<Admission<'v>, Refusal> {
        let gate = volume
            .gate
            .try_read()
            .map_err(|_| Refusal::new(volume.epoch(), Refused::EpochChanging))?;
        let placement = self.check(volume, request, peer)?;
        Ok(Admission {
            epoch: volume.epoch(),
            placement,
            _gate: Admitted { _gate: gate },
        })
    }

    fn chunk_lock(&self, key: ChunkKey, create: bool) -> Option<Rc<RwLock<Option<u32>>>> {
        let mut chunks = self.chunks.borrow_mut();
        if create {
            Some(chunks.entry(key).or_default().clone())
        } else {
            chunks.get(&key).cloned()
        }
    }

    /// Split `[offset, offset + len)` at chunk (slot) boundaries:
    /// `(chunk, range within the chunk, range within the request)`.
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, Range<u64>, Range<usize>)> {
        let slot = u64::from(self.superblock.geometry.slot_size);
        let mut out = Vec::new();
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let chunk = pos / slot;
            let piece_end = end.min((chunk + 1).saturating_mul(slot));
            let at = (pos - offset) as usize..(piece_end - offset) as usize;
            out.push((chunk, pos - chunk * slot..piece_end - chunk * slot, at));
            pos = piece_end;
        }
        out
    }

    fn io_refusal(&self, volume: &Volume, e: &EngineError) -> Refusal {
        warn!(volume = %volume.id, error = %e, "I/O failed");
        Refusal::new(
            volume.epoch(),
            Refused::Io {
                error: e.to_string(),
            },
        )
    }

    /// Read an admitted range. Unwritten and trimmed chunks read as zeroes.
    pub async fn read(
        &self,
        volume: &Volume,
        offset: u64,
        len: u32,
    ) -> Result<Vec<ReadPiece>, Refusal> {
        let mut out = Vec::new();
        for (chunk, within, _) in self.pieces(offset, u64::from(len)) {
            let n = (within.end - within.start) as usize;
            let Some(lock) = self.chunk_lock((volume.id, chunk), false) else {
                out.push(ReadPiece::Zeroes(n));
                continue;
            };
            let slot = lock.read().await;
            let Some(slot) = *slot else {
                out.push(ReadPiece::Zeroes(n));
                continue;
            };
            let pos = self.superblock.geometry.slot_offset(slot) + within.start;
            let (res, buf) = self
                .dev
                .read_at(AlignedBuf::for_overwrite(n), 0..n, pos)
                .await;
            res.map_err(|e| self.io_refusal(volume, &io_err("read", &self.path)(e)))?;
            out.push(ReadPiece::Data(buf));
        }
        Ok(out)
    }

    /// Write an admitted range from `data` (whose length is the range's).
    /// A chunk written for the first time gets a slot: the slot is written
    /// whole (data and zeroes) before the slot table records it.
    pub async fn write(
        &self,
        volume: &Volume,
        offset: u64,
        mut data: AlignedBuf,
        fua: bool,
    ) -> Result<(), Refusal> {
        let g = self.superblock.geometry;
        for (chunk, within, at) in self.pieces(offset, data.len() as u64) {
            let lock = self
                .chunk_lock((volume.id, chunk), true)
                .unwrap_or_default();
            let shared = lock.read().await;
            if let Some(slot) = *shared {
                data = self
                    .write_in_place(volume, data, at, g.slot_offset(slot) + within.start)
                    .await?;
                continue;
            }
            drop(shared);
            let mut exclusive = lock.write().await;
            // Another writer may have allocated the chunk while we waited.
            if let Some(slot) = *exclusive {
                data = self
                    .write_in_place(volume, data, at, g.slot_offset(slot) + within.start)
                    .await?;
                continue;
            }
            match self
                .allocate(volume.id, chunk, &data[at], within.start as usize)
                .await
            {
                Ok(slot) => *exclusive = Some(slot),
                Err(e) => {
                    drop(exclusive);
                    self.forget_if_idle((volume.id, chunk), &lock);
                    return Err(self.io_refusal(volume, &e));
                }
            }
        }
        if fua {
            self.flush()
                .await
                .map_err(|e| self.io_refusal(volume, &e))?;
        }
        Ok(())
    }

    /// Write `data[at]` to an allocated slot at device byte `pos`; hands the buffer back.
    async fn write_in_place(
        &self,
        volume: &Volume,
        data: AlignedBuf,
        at: Range<usize>,
        pos: u64,
    ) -> Result<AlignedBuf, Refusal> {
        let (res, data) = self.dev.write_at(data, at, pos).await;
        res.map_err(|e| self.io_refusal(volume, &io_err("write", &self.path)(e)))?;
        Ok(data)
    }

    async fn allocate(
        &self,
        volume: VolumeId,
        chunk: u64,
        data: &[u8],
        at: usize,
    ) -> Result<u32, EngineError> {
        let g = self.superblock.geometry;
        if self.free_slots.borrow().is_empty() && !self.quarantine.borrow().is_empty() {
            // Slots wait in quarantine for a sync; when space runs out, sync now.
            self.flush().await?;
        }
        let slot = self
            .free_slots
            .borrow_mut()
            .pop_first()
            .ok_or(EngineError::NoSpace)?;
        let mut whole = AlignedBuf::zeroed(g.slot_size as usize);
        whole[at..at + data.len()].copy_from_slice(data);
        let (res, _) = self
            .dev
            .write_at(whole, 0..g.slot_size as usize, g.slot_offset(slot))
            .await;
        let result = match res {
            Ok(()) => {
                self.write_slot_entry(slot, SlotEntry { volume, chunk })
                    .await
            }
            Err(e) => Err(io_err("write", &self.path)(e)),
        };
        if let Err(e) = result {
            self.free_slots.borrow_mut().insert(slot);
            return Err(e);
        }
        Ok(slot)
    }

    /// Trim or write zeroes over an admitted range: whole chunks give their
    /// slot back; partial chunks get zeroes written. Both then read as zeroes.
    pub async fn zero(&self, volume: &Volume, offset: u64, len: u32) -> Result<(), Refusal> {
        let g = self.superblock.geometry;
        for (chunk, within, _) in self.pieces(offset, u64::from(len)) {
            let Some(lock) = self.chunk_lock((volume.id, chunk), false) else {
                continue;
            };
            if within.start == 0 && within.end == u64::from(g.slot_size) {
                let mut exclusive = lock.write().await;
                if let Some(slot) = *exclusive {
                    self.write_slot_entry(slot, SlotEntry::default())
                        .await
                        .map_err(|e| self.io_refusal(volume, &e))?;
                    *exclusive = None;
                    self.quarantine.borrow_mut().push(slot);
                }
                drop(exclusive);
                self.forget_if_idle((volume.id, chunk), &lock);
                continue;
            }
            let shared = lock.read().await;
            if let Some(slot) = *shared {
                let n = (within.end - within.start) as usize;
                let (res, _) = self
                    .dev
                    .write_at(
                        AlignedBuf::zeroed(n),
                        0..n,
                        g.slot_offset(slot) + within.start,
                    )
                    .await;
                res.map_err(|e| self.io_refusal(volume, &io_err("write", &self.path)(e)))?;
            }
        }
        Ok(())
    }

    /// Make every completed write durable.
    pub async fn flush(&self) -> Result<(), EngineError> {
        let synced = self.quarantine.borrow().len();
        self.dev
            .sync_data()
            .await
            .map_err(io_err("sync", &self.path))?;
        // Slots freed before the sync are durably free now.
        let released: Vec<u32> = self.quarantine.borrow_mut().drain(..synced).collect();
        self.free_slots.borrow_mut().extend(released);
        Ok(())
    }

    /// Drop a chunk's lock from the table when the chunk holds no slot and
    /// no task holds the lock, so unallocated chunks cost no memory.
    fn forget_if_idle(&self, key: ChunkKey, lock: &Rc<RwLock<Option<u32>>>) {
        // One reference in the table, one here: nobody else is waiting on it.
        if Rc::strong_count(lock) == 2 && lock.try_read().is_ok_and(|slot| slot.is_none()) {
            self.chunks.borrow_mut().remove(&key);
        }
    }

    fn ensure_serving(&self) -> Result<(), EngineError> {
        if self.failed.get() {
            return Err(EngineError::Stopped);
        }
        Ok(())
    }

    /// The answer to a map push, for the management protocol.
    pub async fn handle_push(&self, map: &VolumeMap) -> MgmtReply {
        match self.apply_map(map).await {
            Ok(epoch) => MgmtReply::Applied { epoch },
            Err(e) => {
                warn!(volume = %map.id, error = %e, "map push refused");
                MgmtReply::Refused(crate::server::refusal_of(&e))
            }
        }
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

/// Every lookup in a map is a binary search over its sorted partitions: a
/// map whose partitions are not in order is refused.
fn check_layout(map: &VolumeMap) -> Result<(), EngineError> {
    map.check_layout().map_err(|e| EngineError::Config {
        reason: format!("volume {}: {e}", map.id),
    })
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
