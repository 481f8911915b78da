//! Data I/O: reading, writing and zeroing through the chunk table, and
//! allocating slots for thin-provisioned chunks.

use std::ops::Range;
use std::rc::Rc;

use tessera_net::proto::VolumeId;
use tokio::sync::RwLock;
use tracing::warn;

use super::io_err;
use super::{ChunkKey, Refusal, Refused, Store, Volume};
use crate::disk::aligned::AlignedBuf;
use crate::disk::format::SlotEntry;
use crate::disk::io::BlockDevice;
use crate::error::EngineError;

/// A piece of read data: bytes from the device, or a run of zeroes.
#[derive(Debug)]
pub enum ReadPiece {
    Data(AlignedBuf),
    Zeroes(usize),
}

impl<D: BlockDevice> Store<D> {
    pub(super) fn chunk_lock(
        &self,
        key: ChunkKey,
        create: bool,
    ) -> Option<Rc<RwLock<Option<u32>>>> {
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
                .read_at(AlignedBuf::with_capacity(n), 0..n, pos)
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
}
