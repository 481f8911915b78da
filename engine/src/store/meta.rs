//! Metadata persistence: volume records, slot entries and bitmask blocks,
//! each written to alternating copies under its own lock.

use std::ops::Range;

use tessera_net::proto::VolumeId;

use super::io_err;
use super::{MetaBlock, Store};
use crate::disk::aligned::AlignedBuf;
use crate::disk::format::{self, BLOCK, Geometry, SLOTS_PER_BLOCK, SlotEntry, VolumeRecord};
use crate::disk::io::BlockDevice;
use crate::error::EngineError;
use crate::store::bitmask::PoolFull;

impl<D: BlockDevice> Store<D> {
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

    pub(super) async fn write_volume_record(
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
    pub(super) async fn write_volume_block(
        &self,
        index: u64,
        payload: &[u8],
    ) -> Result<(), EngineError> {
        let block = &self.volume_blocks[index as usize];
        let _lock = block.lock.lock().await;
        let home = Geometry::copy_a(self.superblock.geometry.volume_table, index);
        self.write_meta(block, home, payload).await
    }

    /// Set one slot-table entry durably.
    pub(super) async fn write_slot_entry(
        &self,
        slot: u32,
        entry: SlotEntry,
    ) -> Result<(), EngineError> {
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
    pub(super) async fn persist_bitmask(&self, pool: u64) -> Result<(), EngineError> {
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
}
