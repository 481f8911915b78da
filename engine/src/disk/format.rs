//! The on-disk format, as pure encode/decode functions (see `docs/disk-format.md`).
//!
//! Layout, in 4 KiB blocks: two superblock copies; the volume table; the slot
//! table; a pool of per-peer bitmask blocks; space reserved for migration marks; then the
//! data slots, aligned to the slot size. Every metadata block exists twice
//! (copy A and B) and carries a sequence number and a crc32c: an update goes
//! to the copy the new sequence number selects, so a torn write can only
//! damage the copy being written and the other still holds the previous state.

use tessera_net::proto::{Epoch, VolumeId};
use tessera_net::units::ByteSize;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of a block: the unit of metadata I/O and of data alignment.
pub const BLOCK: u64 = 4096;
const BLOCK_USIZE: usize = 4096;
pub const FORMAT_VERSION: u32 = 2;
pub const SUPER_MAGIC: [u8; 8] = *b"TSRSUPER";
/// Magic of a metadata block copy: `b"TSMB"` little-endian.
pub const META_MAGIC: u32 = u32::from_le_bytes(*b"TSMB");
pub const META_HEADER_LEN: usize = 24;
/// Bytes of content in a metadata block.
pub const META_PAYLOAD_LEN: usize = BLOCK_USIZE - META_HEADER_LEN;
/// Slot table entries per metadata block.
pub const SLOTS_PER_BLOCK: u64 = (META_PAYLOAD_LEN / SLOT_ENTRY_LEN) as u64;
const SLOT_ENTRY_LEN: usize = 16;
/// Regions one bitmask block covers (3968 bytes of bits).
pub const REGIONS_PER_BITMASK_BLOCK: u64 = 3968 * 8;
const BITMASK_FIXED_LEN: usize = 80;
/// The bitmask pool has one logical block per this many data slots, and at least [`MIN_BITMASK_BLOCKS`].
pub const SLOTS_PER_BITMASK_BLOCK: u64 = 512;
pub const MIN_BITMASK_BLOCKS: u64 = 64;
/// Page ranges one volume record holds.
pub const MAX_RANGES: usize = (META_PAYLOAD_LEN - VOLUME_FIXED_LEN) / 16;
const VOLUME_FIXED_LEN: usize = 40;
/// Volume-record flag: this replica was created empty while out of sync and
/// must be copied whole before it can be in sync (a replaced or wiped disk).
pub const VOLUME_NEEDS_FULL_COPY: u32 = 1;
pub const DEFAULT_REGION_SIZE: u32 = 64 << 10;
/// Largest bitmask region.
pub const MAX_REGION_SIZE: u32 = 16 << 20;
pub const DEFAULT_SLOT_SIZE: u32 = 1 << 20;
pub const DEFAULT_MAX_VOLUMES: u32 = 1024;
const MAX_SERVER_NAME: usize = 63;

/// Where everything lies on the device; derived from size, slot size and
/// volume-table capacity, and recorded in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub device_size: u64,
    pub slot_size: u32,
    /// Unit of the per-peer bitmasks (resync copies whole regions).
    pub region_size: u32,
    pub max_volumes: u32,
    pub slot_count: u64,
    /// Logical blocks in the bitmask pool.
    pub bitmask_blocks: u64,
    /// First block of each area (each logical block `i` occupies blocks `start + 2i` and `start + 2i + 1`).
    pub volume_table: u64,
    pub slot_table: u64,
    pub bitmasks: u64,
    pub migration_marks: u64,
    /// Byte offset of data slot 0.
    pub data_start: u64,
}

fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

/// Why a device cannot be laid out with the given parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// The slot size is not a power-of-two multiple of the block size.
    #[error("slot size {} must be a power of two multiple of {}", ByteSize(u64::from(*slot_size)), ByteSize(BLOCK))]
    SlotSize { slot_size: u32 },
    /// The region size is not a power of two within the allowed range.
    #[error("region size {} must be a power of two from {} to {}", ByteSize(u64::from(*region_size)), ByteSize(BLOCK), ByteSize(u64::from(MAX_REGION_SIZE)))]
    RegionSize { region_size: u32 },
    /// No room for any volume.
    #[error("max_volumes must be at least 1")]
    NoVolumes,
    /// The device cannot hold the metadata and one data slot.
    #[error("{} is too small: at least {} is needed", ByteSize(*size), ByteSize(*minimum))]
    TooSmall { size: u64, minimum: u64 },
    /// More slots than the slot table can number.
    #[error("{slots} slots is more than 2^32: use a larger slot size")]
    TooManySlots { slots: u64 },
}

impl Geometry {
    /// Lay out a device of `device_size` bytes.
    pub fn compute(
        device_size: u64,
        slot_size: u32,
        region_size: u32,
        max_volumes: u32,
    ) -> Result<Self, GeometryError> {
        if slot_size == 0 || u64::from(slot_size) % BLOCK != 0 || !slot_size.is_power_of_two() {
            return Err(GeometryError::SlotSize { slot_size });
        }
        if u64::from(region_size) < BLOCK
            || !region_size.is_power_of_two()
            || region_size > MAX_REGION_SIZE
        {
            return Err(GeometryError::RegionSize { region_size });
        }
        if max_volumes == 0 {
            return Err(GeometryError::NoVolumes);
        }
        let slot = u64::from(slot_size);
        let mut slots = device_size / slot;
        loop {
            let g = Self::layout(device_size, slot_size, region_size, max_volumes, slots);
            let fit = device_size.saturating_sub(g.data_start) / slot;
            if fit >= slots {
                if slots > u64::from(u32::MAX) {
                    return Err(GeometryError::TooManySlots { slots });
                }
                return if slots == 0 {
                    Err(GeometryError::TooSmall {
                        size: device_size,
                        minimum: Self::layout(device_size, slot_size, region_size, max_volumes, 1)
                            .data_start
                            + slot,
                    })
                } else {
                    Ok(g)
                };
            }
            slots = fit;
        }
    }

    fn layout(
        device_size: u64,
        slot_size: u32,
        region_size: u32,
        max_volumes: u32,
        slots: u64,
    ) -> Self {
        let volume_table = 2;
        let slot_table = volume_table + 2 * u64::from(max_volumes);
        let bitmasks = slot_table + 2 * div_ceil(slots, SLOTS_PER_BLOCK);
        let bitmask_blocks = (slots / SLOTS_PER_BITMASK_BLOCK).max(MIN_BITMASK_BLOCKS);
        let migration_marks = bitmasks + 2 * bitmask_blocks;
        let meta_end = migration_marks + 2 * div_ceil(slots, META_PAYLOAD_LEN as u64 * 8);
        let data_start = (meta_end * BLOCK).next_multiple_of(u64::from(slot_size));
        Geometry {
            device_size,
            slot_size,
            region_size,
            max_volumes,
            slot_count: slots,
            bitmask_blocks,
            volume_table,
            slot_table,
            bitmasks,
            migration_marks,
            data_start,
        }
    }

    /// Number of slot-table logical blocks.
    pub fn slot_table_blocks(&self) -> u64 {
        div_ceil(self.slot_count, SLOTS_PER_BLOCK)
    }

    /// Blocks from the volume table to the end of the metadata area.
    pub fn metadata_blocks(&self) -> std::ops::Range<u64> {
        self.volume_table..self.data_start / BLOCK
    }

    /// Byte offset of data slot `slot`.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.data_start + u64::from(slot) * u64::from(self.slot_size)
    }

    /// Block number of copy A of a logical metadata block.
    pub fn copy_a(area_start: u64, index: u64) -> u64 {
        area_start + 2 * index
    }
}

#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawSuperblock {
    magic: [u8; 8],
    format_version: U32,
    block_size: U32,
    slot_size: U32,
    region_size: U32,
    max_volumes: U32,
    device_size: U64,
    slot_count: U64,
    volume_table: U64,
    slot_table: U64,
    bitmasks: U64,
    migration_marks: U64,
    data_start: U64,
    created_unix: U64,
    incarnation: U64,
    cluster_id: [u8; 32],
    server_name_len: U32,
    server_name: [u8; 64],
    crc: U32,
}

/// The superblock: what this device is and how it is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub geometry: Geometry,
    pub cluster_id: [u8; 32],
    pub server_name: String,
    pub created_unix: u64,
    /// Random at format time: tells the management server that a disk was
    /// replaced or wiped, so every replica on it needs a full copy.
    pub incarnation: u64,
}

/// Why a superblock copy was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuperblockFault {
    /// All zero: never formatted.
    Blank,
    /// Some other content: not ours.
    NoMagic,
    /// Ours, but the checksum or a field is wrong.
    Damaged,
    /// Ours, but another format version.
    Version(u32),
}

impl Superblock {
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let name = self.server_name.as_bytes();
        if name.len() > MAX_SERVER_NAME {
            return Err(format!("server name longer than {MAX_SERVER_NAME} bytes"));
        }
        let g = &self.geometry;
        let mut server_name = [0u8; 64];
        server_name[..name.len()].copy_from_slice(name);
        let mut raw = RawSuperblock {
            magic: SUPER_MAGIC,
            format_version: FORMAT_VERSION.into(),
            block_size: (BLOCK as u32).into(),
            slot_size: g.slot_size.into(),
            region_size: g.region_size.into(),
            max_volumes: g.max_volumes.into(),
            device_size: g.device_size.into(),
            slot_count: g.slot_count.into(),
            volume_table: g.volume_table.into(),
            slot_table: g.slot_table.into(),
            bitmasks: g.bitmasks.into(),
            migration_marks: g.migration_marks.into(),
            data_start: g.data_start.into(),
            created_unix: self.created_unix.into(),
            incarnation: self.incarnation.into(),
            cluster_id: self.cluster_id,
            server_name_len: (name.len() as u32).into(),
            server_name,
            crc: 0.into(),
        };
        let crc_at = size_of::<RawSuperblock>() - 4;
        raw.crc = crc32c::crc32c(&raw.as_bytes()[..crc_at]).into();
        let mut block = vec![0u8; BLOCK_USIZE];
        block[..size_of::<RawSuperblock>()].copy_from_slice(raw.as_bytes());
        Ok(block)
    }

    pub fn decode(block: &[u8]) -> Result<Self, SuperblockFault> {
        let Ok((raw, _)) = RawSuperblock::ref_from_prefix(block) else {
            return Err(SuperblockFault::Damaged);
        };
        if raw.magic != SUPER_MAGIC {
            return Err(if block.iter().all(|b| *b == 0) {
                SuperblockFault::Blank
            } else {
                SuperblockFault::NoMagic
            });
        }
        let crc_at = size_of::<RawSuperblock>() - 4;
        if crc32c::crc32c(&raw.as_bytes()[..crc_at]) != raw.crc.get() {
            return Err(SuperblockFault::Damaged);
        }
        if raw.format_version.get() != FORMAT_VERSION {
            return Err(SuperblockFault::Version(raw.format_version.get()));
        }
        let name_len = raw.server_name_len.get() as usize;
        let name = raw
            .server_name
            .get(..name_len)
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or(SuperblockFault::Damaged)?;
        if raw.block_size.get() as u64 != BLOCK {
            return Err(SuperblockFault::Damaged);
        }
        let geometry = Geometry {
            device_size: raw.device_size.get(),
            slot_size: raw.slot_size.get(),
            region_size: raw.region_size.get(),
            max_volumes: raw.max_volumes.get(),
            slot_count: raw.slot_count.get(),
            bitmask_blocks: (raw.slot_count.get() / SLOTS_PER_BITMASK_BLOCK)
                .max(MIN_BITMASK_BLOCKS),
            volume_table: raw.volume_table.get(),
            slot_table: raw.slot_table.get(),
            bitmasks: raw.bitmasks.get(),
            migration_marks: raw.migration_marks.get(),
            data_start: raw.data_start.get(),
        };
        // The recorded layout must be the one the recorded parameters give.
        let expected = Geometry::compute(
            geometry.device_size,
            geometry.slot_size,
            geometry.region_size,
            geometry.max_volumes,
        )
        .map_err(|_| SuperblockFault::Damaged)?;
        if expected != geometry {
            return Err(SuperblockFault::Damaged);
        }
        Ok(Superblock {
            geometry,
            cluster_id: raw.cluster_id,
            server_name: name.to_string(),
            created_unix: raw.created_unix.get(),
            incarnation: raw.incarnation.get(),
        })
    }
}

/// One copy of a metadata block, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaCopy<'a> {
    /// Never written (all zero): sequence 0, empty content.
    Blank,
    Valid {
        seq: u64,
        payload: &'a [u8],
    },
    /// Torn, overwritten or misplaced: ignored in favour of the other copy.
    Damaged,
}

/// Decode copy `copy` (0 = A, 1 = B) of the logical metadata block whose
/// copy A is block `home`. A copy whose sequence number belongs to the other
/// position was misdirected: the next write would overwrite the newest state.
pub fn decode_meta(block: &[u8], home: u64, copy: u64) -> MetaCopy<'_> {
    if block.len() != BLOCK_USIZE {
        return MetaCopy::Damaged;
    }
    if block.iter().all(|b| *b == 0) {
        return MetaCopy::Blank;
    }
    let word =
        |at: usize| u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
    let dword = |at: usize| u64::from(word(at)) | (u64::from(word(at + 4)) << 32);
    if word(0) != META_MAGIC
        || word(4) != crc32c::crc32c(&block[8..])
        || dword(16) != home
        || copy_for(dword(8)) != copy
    {
        return MetaCopy::Damaged;
    }
    MetaCopy::Valid {
        seq: dword(8),
        payload: &block[META_HEADER_LEN..],
    }
}

/// Encode a metadata block copy; `payload` is at most [`META_PAYLOAD_LEN`] bytes.
pub fn encode_meta(seq: u64, home: u64, payload: &[u8], out: &mut [u8]) {
    out.fill(0);
    out[0..4].copy_from_slice(&META_MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[16..24].copy_from_slice(&home.to_le_bytes());
    let n = payload.len().min(META_PAYLOAD_LEN);
    out[META_HEADER_LEN..META_HEADER_LEN + n].copy_from_slice(&payload[..n]);
    let crc = crc32c::crc32c(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Of the two copies of a logical block, the current one: `(seq, payload)`,
/// with an empty payload for a never-written block; `None` if both are damaged.
pub fn choose<'a>(a: MetaCopy<'a>, b: MetaCopy<'a>) -> Option<(u64, &'a [u8])> {
    let pick = |c: MetaCopy<'a>| match c {
        MetaCopy::Blank => Some((0, &[][..])),
        MetaCopy::Valid { seq, payload } => Some((seq, payload)),
        MetaCopy::Damaged => None,
    };
    match (pick(a), pick(b)) {
        (Some(x), Some(y)) => Some(if y.0 > x.0 { y } else { x }),
        (x, y) => x.or(y),
    }
}

/// Which copy (0 = A, 1 = B) holds sequence number `seq`.
pub fn copy_for(seq: u64) -> u64 {
    seq % 2
}

/// An entry of the slot table: which (volume, chunk) a data slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotEntry {
    /// `VolumeId(0)` marks a free slot.
    pub volume: VolumeId,
    pub chunk: u64,
}

pub fn encode_slot_entries(entries: &[SlotEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * SLOT_ENTRY_LEN);
    for e in entries {
        out.extend_from_slice(&e.volume.0.to_le_bytes());
        out.extend_from_slice(&e.chunk.to_le_bytes());
    }
    out
}

/// Decode `count` entries; a blank block gives free entries.
pub fn decode_slot_entries(payload: &[u8], count: usize) -> Vec<SlotEntry> {
    (0..count)
        .map(|i| {
            let at = i * SLOT_ENTRY_LEN;
            match payload.get(at..at + SLOT_ENTRY_LEN) {
                Some(e) => SlotEntry {
                    volume: VolumeId(u64::from_le_bytes(e[..8].try_into().unwrap_or_default())),
                    chunk: u64::from_le_bytes(e[8..].try_into().unwrap_or_default()),
                },
                None => SlotEntry::default(),
            }
        })
        .collect()
}

/// The little-endian u64 at `at`, if `payload` is long enough.
fn le_u64(payload: &[u8], at: usize) -> Option<u64> {
    payload
        .get(at..at.checked_add(8)?)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
}

/// What the server records about a volume it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub epoch: Epoch,
    pub size: u64,
    pub page_size: u32,
    /// Page ranges `[first, end)` this server holds a replica of.
    pub ranges: Vec<(u64, u64)>,
    /// [`VOLUME_NEEDS_FULL_COPY`] and future flags.
    pub flags: u32,
}

impl VolumeRecord {
    pub fn encode(&self) -> Result<Vec<u8>, usize> {
        if self.ranges.len() > MAX_RANGES {
            return Err(self.ranges.len());
        }
        let mut out = Vec::with_capacity(META_PAYLOAD_LEN);
        out.extend_from_slice(&self.id.0.to_le_bytes());
        out.extend_from_slice(&self.epoch.0.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&(self.ranges.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for (first, end) in &self.ranges {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&end.to_le_bytes());
        }
        Ok(out)
    }

    /// `None` for an empty record (no volume); `Err` for an inconsistent one.
    pub fn decode(payload: &[u8]) -> Result<Option<Self>, &'static str> {
        let u64_at = |at: usize| le_u64(payload, at).ok_or("truncated volume record");
        let u32_at = |at: usize| -> Result<u32, &'static str> {
            payload
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or("truncated volume record")
        };
        if payload.is_empty() || u64_at(0)? == 0 {
            return Ok(None);
        }
        let page_size = u32_at(24)?;
        if page_size == 0 || u64::from(page_size) % BLOCK != 0 {
            return Err("page size in volume record is not a multiple of the block size");
        }
        let count = u32_at(28)? as usize;
        if count > MAX_RANGES {
            return Err("too many ranges in volume record");
        }
        let mut ranges = Vec::with_capacity(count);
        for i in 0..count {
            let at = VOLUME_FIXED_LEN + 16 * i;
            let (first, end) = (u64_at(at)?, u64_at(at + 8)?);
            if first >= end {
                return Err("empty or reversed page range in volume record");
            }
            ranges.push((first, end));
        }
        Ok(Some(VolumeRecord {
            id: VolumeId(u64_at(0)?),
            epoch: Epoch(u64_at(8)?),
            size: u64_at(16)?,
            page_size: u32_at(24)?,
            ranges,
            flags: u32_at(32)?,
        }))
    }
}

/// One block of a per-peer bitmask: which regions `[first_region,
/// first_region + REGIONS_PER_BITMASK_BLOCK)` of `volume` the peer `peer` may
/// lack this server's version of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmaskBlock {
    pub volume: VolumeId,
    pub peer: String,
    pub first_region: u64,
    /// `REGIONS_PER_BITMASK_BLOCK / 8` bytes, bit `i` of byte `i / 8` (LSB first).
    pub bits: Vec<u8>,
}

impl BitmaskBlock {
    pub const BITS_LEN: usize = (REGIONS_PER_BITMASK_BLOCK / 8) as usize;

    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let peer = self.peer.as_bytes();
        if peer.len() > MAX_SERVER_NAME {
            return Err(format!("peer name longer than {MAX_SERVER_NAME} bytes"));
        }
        if self.bits.len() != Self::BITS_LEN {
            return Err(format!("bitmask of {} bytes", self.bits.len()));
        }
        let mut out = Vec::with_capacity(BITMASK_FIXED_LEN + Self::BITS_LEN);
        out.extend_from_slice(&self.volume.0.to_le_bytes());
        out.extend_from_slice(&self.first_region.to_le_bytes());
        out.push(peer.len() as u8);
        out.extend_from_slice(peer);
        out.resize(BITMASK_FIXED_LEN, 0);
        out.extend_from_slice(&self.bits);
        Ok(out)
    }

    /// `None` for a free pool block; `Err` for an inconsistent one.
    pub fn decode(payload: &[u8]) -> Result<Option<Self>, &'static str> {
        let u64_at = |at: usize| le_u64(payload, at).ok_or("truncated bitmask block");
        if payload.is_empty() || u64_at(0)? == 0 {
            return Ok(None);
        }
        let first_region = u64_at(8)?;
        if !first_region.is_multiple_of(REGIONS_PER_BITMASK_BLOCK) {
            return Err("bitmask block starts inside a block's worth of regions");
        }
        let len = usize::from(*payload.get(16).ok_or("truncated bitmask block")?);
        let peer = payload
            .get(17..17 + len)
            .filter(|_| len <= MAX_SERVER_NAME && len > 0)
            .and_then(|p| std::str::from_utf8(p).ok())
            .ok_or("bad peer name in bitmask block")?;
        let bits = payload
            .get(BITMASK_FIXED_LEN..BITMASK_FIXED_LEN + Self::BITS_LEN)
            .ok_or("truncated bitmask block")?;
        Ok(Some(BitmaskBlock {
            volume: VolumeId(u64_at(0)?),
            peer: peer.to_string(),
            first_region,
            bits: bits.to_vec(),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    fn sb() -> Superblock {
        Superblock {
            geometry: Geometry::compute(256 << 20, DEFAULT_SLOT_SIZE, DEFAULT_REGION_SIZE, 64)
                .unwrap(),
            cluster_id: [7; 32],
            server_name: "store-1".into(),
            created_unix: 1_700_000_000,
            incarnation: 0x1234_5678_9abc,
        }
    }

    #[test]
    fn geometry_fits_device() {
        for size in [16u64 << 20, 256 << 20, 10 << 30, 1 << 40, (1 << 40) + 12345] {
            let g = Geometry::compute(
                size,
                DEFAULT_SLOT_SIZE,
                DEFAULT_REGION_SIZE,
                DEFAULT_MAX_VOLUMES,
            )
            .unwrap();
            assert!(
                g.data_start + g.slot_count * u64::from(g.slot_size) <= size,
                "{g:?}"
            );
            assert!(g.data_start.is_multiple_of(u64::from(g.slot_size)));
            // Everything the slot count needs fits before the data.
            assert_eq!(
                Geometry::layout(
                    size,
                    g.slot_size,
                    g.region_size,
                    g.max_volumes,
                    g.slot_count
                ),
                g
            );
            // Not wasteful: one more slot would not fit.
            let more = Geometry::layout(
                size,
                g.slot_size,
                g.region_size,
                g.max_volumes,
                g.slot_count + 1,
            );
            assert!(more.data_start + (g.slot_count + 1) * u64::from(g.slot_size) > size);
        }
    }

    #[test]
    fn tiny_device_is_refused() {
        let err = Geometry::compute(
            1 << 20,
            DEFAULT_SLOT_SIZE,
            DEFAULT_REGION_SIZE,
            DEFAULT_MAX_VOLUMES,
        )
        .unwrap_err();
        assert!(err.to_string().contains("too small"), "{err}");
        assert!(Geometry::compute(1 << 30, 3000, DEFAULT_REGION_SIZE, 1).is_err());
        let err = Geometry::compute(1 << 30, DEFAULT_SLOT_SIZE, 3000, 1).unwrap_err();
        assert!(err.to_string().contains("region size"), "{err}");
    }

    #[test]
    fn superblock_round_trips() {
        let sb = sb();
        assert_eq!(Superblock::decode(&sb.encode().unwrap()).unwrap(), sb);
    }

    #[test]
    fn superblock_faults() {
        assert_eq!(
            Superblock::decode(&[0u8; 4096]).unwrap_err(),
            SuperblockFault::Blank
        );
        let mut foreign = vec![0u8; 4096];
        foreign[100] = 1;
        assert_eq!(
            Superblock::decode(&foreign).unwrap_err(),
            SuperblockFault::NoMagic
        );
        let mut damaged = sb().encode().unwrap();
        damaged[40] ^= 0xff;
        assert_eq!(
            Superblock::decode(&damaged).unwrap_err(),
            SuperblockFault::Damaged
        );
    }

    #[test]
    fn meta_block_round_trips_and_detects_damage() {
        let mut block = vec![0u8; 4096];
        encode_meta(5, 42, b"hello", &mut block);
        let MetaCopy::Valid { seq: 5, payload } = decode_meta(&block, 42, 1) else {
            panic!("block did not decode");
        };
        assert_eq!(&payload[..5], b"hello");
        assert_eq!(
            decode_meta(&block, 44, 1),
            MetaCopy::Damaged,
            "misplaced copy"
        );
        assert_eq!(
            decode_meta(&block, 42, 0),
            MetaCopy::Damaged,
            "sequence 5 belongs in copy B"
        );
        // A torn write: the second half holds other bytes than the checksum covers.
        let mut torn = block.clone();
        torn[3000..].fill(0xee);
        assert_eq!(decode_meta(&torn, 42, 1), MetaCopy::Damaged);
        assert_eq!(decode_meta(&[0u8; 4096], 42, 0), MetaCopy::Blank);
    }

    #[test]
    fn choose_prefers_newest_valid_copy() {
        let old = MetaCopy::Valid {
            seq: 3,
            payload: b"old",
        };
        let new = MetaCopy::Valid {
            seq: 4,
            payload: b"new",
        };
        assert_eq!(choose(old.clone(), new.clone()).unwrap().1, b"new");
        assert_eq!(choose(new.clone(), old.clone()).unwrap().1, b"new");
        // A torn write of the newer copy falls back to the older one.
        assert_eq!(choose(old.clone(), MetaCopy::Damaged).unwrap().1, b"old");
        assert_eq!(choose(MetaCopy::Blank, MetaCopy::Blank).unwrap().0, 0);
        assert!(choose(MetaCopy::Damaged, MetaCopy::Damaged).is_none());
    }

    #[test]
    fn volume_record_round_trips() {
        let rec = VolumeRecord {
            id: VolumeId(9),
            epoch: Epoch(12),
            size: 10 << 30,
            page_size: 1 << 20,
            ranges: vec![(0, 10), (20, 30)],
            flags: VOLUME_NEEDS_FULL_COPY,
        };
        assert_eq!(
            VolumeRecord::decode(&rec.encode().unwrap()).unwrap(),
            Some(rec.clone())
        );
        assert_eq!(VolumeRecord::decode(&[0u8; 64]).unwrap(), None);
        let too_many = VolumeRecord {
            ranges: vec![(0, 1); MAX_RANGES + 1],
            ..rec
        };
        assert!(too_many.encode().is_err());
    }

    #[test]
    fn bitmask_block_round_trips_and_rejects_damage() {
        let mut bits = vec![0u8; BitmaskBlock::BITS_LEN];
        bits[3] = 0b1010_0001;
        let block = BitmaskBlock {
            volume: VolumeId(4),
            peer: "store-2".into(),
            first_region: 2 * REGIONS_PER_BITMASK_BLOCK,
            bits,
        };
        let bytes = block.encode().unwrap();
        assert!(bytes.len() <= META_PAYLOAD_LEN);
        assert_eq!(BitmaskBlock::decode(&bytes).unwrap(), Some(block.clone()));
        assert_eq!(BitmaskBlock::decode(&[0u8; 100]).unwrap(), None);
        let mut unaligned = bytes.clone();
        unaligned[8] = 1;
        assert!(BitmaskBlock::decode(&unaligned).is_err());
        let mut no_name = bytes.clone();
        no_name[16] = 0;
        assert!(BitmaskBlock::decode(&no_name).is_err());
        assert!(BitmaskBlock::decode(&bytes[..200]).is_err());
        let long = BitmaskBlock {
            peer: "x".repeat(64),
            ..block
        };
        assert!(long.encode().is_err());
    }

    proptest! {
        #[test]
        fn slot_entries_round_trip(raw in prop::collection::vec((1u64..u64::MAX, any::<u64>()), 0..254)) {
            let entries: Vec<_> = raw.iter().map(|(v, c)| SlotEntry { volume: VolumeId(*v), chunk: *c }).collect();
            let bytes = encode_slot_entries(&entries);
            prop_assert_eq!(decode_slot_entries(&bytes, entries.len()), entries);
        }

        #[test]
        fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4200), home in any::<u64>()) {
            let _ = Superblock::decode(&bytes);
            let _ = decode_meta(&bytes, home, home % 2);
            let _ = VolumeRecord::decode(&bytes);
            let _ = BitmaskBlock::decode(&bytes);
            let _ = decode_slot_entries(&bytes, 254);
        }
    }
}
