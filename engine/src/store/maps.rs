//! Applying map slices pushed by the management server, refusing those
//! that would lose data, and dropping volumes.

use std::rc::Rc;

use tessera_net::proto::{
    Epoch, EpochVerdict, MAX_VOLUME_SIZE, MgmtReply, MirrorState, VolumeId, VolumeMap,
};
use tracing::{info, warn};

use super::ChunkKey;
use super::{Store, Volume};
use crate::disk::format::{BLOCK, SlotEntry, VOLUME_NEEDS_FULL_COPY, VolumeRecord};
use crate::disk::io::BlockDevice;
use crate::error::EngineError;

impl<D: BlockDevice> Store<D> {
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

    /// The answer to a map push, for the management protocol.
    pub async fn handle_push(&self, map: &VolumeMap) -> MgmtReply {
        match self.apply_map(map).await {
            Ok(epoch) => MgmtReply::Applied { epoch },
            Err(e) => {
                warn!(volume = %map.id, error = %e, "map push refused");
                MgmtReply::Refused(e.to_mgmt_refusal())
            }
        }
    }
}

/// Every lookup in a map is a binary search over its sorted partitions: a
/// map whose partitions are not in order is refused.
fn check_layout(map: &VolumeMap) -> Result<(), EngineError> {
    map.check_layout().map_err(|e| EngineError::Config {
        reason: format!("volume {}: {e}", map.id),
    })
}
