//! Per-peer bitmasks in memory: for each (volume, peer) a sparse set of
//! regions the peer may lack this server's version of, in blocks of
//! [`REGIONS_PER_BITMASK_BLOCK`] regions, each persisted in one block of the
//! on-disk bitmask pool (see `docs/replication.md`).
//!
//! Every block keeps two bit sets: `bits`, what is true now, and `durable`,
//! what the device holds. A write may proceed on a region only when its bit
//! is set in both (write-intent is on disk); setting a bit that is not
//! durable asks the caller to persist the block first. Pure and synchronous:
//! the store does the I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bitvec::prelude::{BitVec, Lsb0};
use tessera_net::proto::VolumeId;

use crate::disk::format::{BitmaskBlock, REGIONS_PER_BITMASK_BLOCK};

type Bits = BitVec<u8, Lsb0>;

#[derive(Debug)]
struct Entry {
    /// Index of the pool block that stores this entry.
    pool: u64,
    bits: Bits,
    durable: Bits,
}

/// Identifies one bitmask block: volume, peer, and which block of regions.
pub type BlockKey = (VolumeId, String, u64);

/// The pool is full: more (volume, peer, region-block) combinations are dirty
/// than the format reserved blocks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolFull;

/// Blocks of one (volume, peer), by block number.
type Blocks = BTreeMap<u64, Entry>;

#[derive(Debug, Default)]
pub struct Bitmasks {
    /// By volume, then peer: looked up on every write by the peer's name
    /// without building a key.
    entries: HashMap<VolumeId, HashMap<String, Blocks>>,
    owners: HashMap<u64, BlockKey>,
    free: BTreeSet<u64>,
}

/// The blocks of (`volume`, `peer`), made empty if there are none yet.
fn blocks_entry<'a>(
    entries: &'a mut HashMap<VolumeId, HashMap<String, Blocks>>,
    volume: VolumeId,
    peer: &str,
) -> &'a mut Blocks {
    let peers = entries.entry(volume).or_default();
    if !peers.contains_key(peer) {
        peers.insert(peer.to_string(), Blocks::new());
    }
    peers
        .get_mut(peer)
        .unwrap_or_else(|| unreachable!("inserted above"))
}

/// Drop the blocks of (`volume`, `peer`) once none is left.
fn prune(entries: &mut HashMap<VolumeId, HashMap<String, Blocks>>, volume: VolumeId, peer: &str) {
    let Some(peers) = entries.get_mut(&volume) else {
        return;
    };
    if peers.get(peer).is_some_and(BTreeMap::is_empty) {
        peers.remove(peer);
    }
    if peers.is_empty() {
        entries.remove(&volume);
    }
}

fn empty_bits() -> Bits {
    BitVec::repeat(false, REGIONS_PER_BITMASK_BLOCK as usize)
}

fn split(region: u64) -> (u64, usize) {
    (
        region / REGIONS_PER_BITMASK_BLOCK,
        (region % REGIONS_PER_BITMASK_BLOCK) as usize,
    )
}

/// The bits of block `number` that `range` covers (perhaps none), or `None`
/// when the block starts at or past the end of `range`, so that no later
/// block can hold any either.
fn bits_within(number: u64, range: &std::ops::Range<u64>) -> Option<std::ops::Range<usize>> {
    let base = number * REGIONS_PER_BITMASK_BLOCK;
    if base >= range.end {
        return None;
    }
    let from = range.start.saturating_sub(base) as usize;
    let to = (range.end - base).min(REGIONS_PER_BITMASK_BLOCK) as usize;
    Some(from..to)
}

impl Bitmasks {
    fn blocks(&self, volume: VolumeId, peer: &str) -> Option<&Blocks> {
        self.entries.get(&volume)?.get(peer)
    }

    /// An empty set over a pool of `pool_blocks` blocks.
    pub fn new(pool_blocks: u64) -> Self {
        Bitmasks {
            free: (0..pool_blocks).collect(),
            ..Default::default()
        }
    }

    /// Load pool block `pool` as read from the device.
    pub fn load(&mut self, pool: u64, block: BitmaskBlock) -> Result<(), &'static str> {
        let bits = Bits::from_vec(block.bits);
        if bits.len() != REGIONS_PER_BITMASK_BLOCK as usize {
            return Err("bitmask block of the wrong length");
        }
        let number = block.first_region / REGIONS_PER_BITMASK_BLOCK;
        let map = blocks_entry(&mut self.entries, block.volume, &block.peer);
        if map.contains_key(&number) || !self.free.remove(&pool) {
            return Err("bitmask block recorded twice");
        }
        map.insert(
            number,
            Entry {
                pool,
                durable: bits.clone(),
                bits,
            },
        );
        self.owners.insert(pool, (block.volume, block.peer, number));
        Ok(())
    }

    /// Whether `region` is set for `peer` in memory and on the device.
    pub fn is_durable(&self, volume: VolumeId, peer: &str, region: u64) -> bool {
        let (number, bit) = split(region);
        self.blocks(volume, peer)
            .and_then(|m| m.get(&number))
            .is_some_and(|e| e.bits[bit] && e.durable[bit])
    }

    /// Set `regions` for `peer`; returns the pool blocks that must be
    /// persisted before a write may rely on the bits: those where a bit was
    /// not set, or set but not yet on the device. (A bit just cleared in
    /// memory may still read as durable while the clear is being written: a
    /// bit that was not set always needs a write of its own.) Works a block
    /// at a time, so a huge range costs one step per block; on `PoolFull`
    /// the blocks this call took go back to the pool.
    pub fn set(
        &mut self,
        volume: VolumeId,
        peer: &str,
        regions: std::ops::Range<u64>,
    ) -> Result<Vec<u64>, PoolFull> {
        let mut dirty = Vec::new();
        let mut taken = Vec::new();
        let mut at = regions.start;
        while at < regions.end {
            let (number, first) = split(at);
            let block_end = (number + 1).saturating_mul(REGIONS_PER_BITMASK_BLOCK);
            let end = regions.end.min(block_end);
            let last = first + (end - at) as usize;
            let map = blocks_entry(&mut self.entries, volume, peer);
            let entry = match map.entry(number) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    let Some(pool) = self.free.pop_first() else {
                        self.give_back(volume, peer, &taken);
                        return Err(PoolFull);
                    };
                    taken.push(number);
                    self.owners.insert(pool, (volume, peer.to_string(), number));
                    slot.insert(Entry {
                        pool,
                        bits: empty_bits(),
                        durable: empty_bits(),
                    })
                }
            };
            let was_set = entry.bits[first..last].all();
            let durable = entry.durable[first..last].all();
            entry.bits[first..last].fill(true);
            if !was_set || !durable {
                dirty.push(entry.pool);
            }
            at = end;
        }
        Ok(dirty)
    }

    /// Undo the blocks a failed `set` took (none of their bits is on the device).
    fn give_back(&mut self, volume: VolumeId, peer: &str, numbers: &[u64]) {
        let Some(map) = self.entries.get_mut(&volume).and_then(|p| p.get_mut(peer)) else {
            return;
        };
        for number in numbers {
            if let Some(entry) = map.remove(number) {
                self.owners.remove(&entry.pool);
                self.free.insert(entry.pool);
            }
        }
        prune(&mut self.entries, volume, peer);
    }

    /// Clear `regions` for `peer`; returns the pool blocks that changed.
    /// Costs one step per block that holds bits, however large the range.
    pub fn clear(
        &mut self,
        volume: VolumeId,
        peer: &str,
        regions: std::ops::Range<u64>,
    ) -> Vec<u64> {
        let mut changed = Vec::new();
        let Some(map) = self.entries.get_mut(&volume).and_then(|p| p.get_mut(peer)) else {
            return changed;
        };
        let (first_block, _) = split(regions.start);
        for (number, entry) in map.range_mut(first_block..) {
            let Some(bits) = bits_within(*number, &regions) else {
                break;
            };
            if !bits.is_empty() && entry.bits[bits.clone()].any() {
                entry.bits[bits].fill(false);
                changed.push(entry.pool);
            }
        }
        changed
    }

    /// What pool block `pool` should hold now: its content (empty when no
    /// bit is set) and the bits it records.
    pub fn snapshot(&self, pool: u64) -> Option<(Vec<u8>, Vec<u8>)> {
        let (volume, peer, number) = self.owners.get(&pool)?;
        let entry = self.blocks(*volume, peer)?.get(number)?;
        let raw = entry.bits.as_raw_slice().to_vec();
        if entry.bits.not_any() {
            return Some((Vec::new(), raw));
        }
        let block = BitmaskBlock {
            volume: *volume,
            peer: peer.clone(),
            first_region: number * REGIONS_PER_BITMASK_BLOCK,
            bits: raw.clone(),
        };
        // Peer names are checked at certificate issue; an over-long one cannot occur.
        Some((block.encode().unwrap_or_default(), raw))
    }

    /// Whether the device already holds `bits` for pool block `pool`.
    pub fn is_persisted(&self, pool: u64, bits: &[u8]) -> bool {
        self.owners
            .get(&pool)
            .and_then(|(v, p, n)| self.blocks(*v, p)?.get(n))
            .is_some_and(|e| e.durable.as_raw_slice() == bits)
    }

    /// The device now holds `bits` for pool block `pool`. A block whose
    /// bits are all clear on both sides returns to the free pool.
    pub fn persisted(&mut self, pool: u64, bits: Vec<u8>) {
        let Some((volume, peer, number)) = self.owners.get(&pool).cloned() else {
            return;
        };
        let Some(map) = self.entries.get_mut(&volume).and_then(|p| p.get_mut(&peer)) else {
            return;
        };
        let Some(entry) = map.get_mut(&number) else {
            return;
        };
        entry.durable = Bits::from_vec(bits);
        if entry.bits.not_any() && entry.durable.not_any() {
            map.remove(&number);
            prune(&mut self.entries, volume, &peer);
            self.owners.remove(&pool);
            self.free.insert(pool);
        }
    }

    /// Regions set for `peer`, ascending.
    pub fn regions(&self, volume: VolumeId, peer: &str) -> Vec<u64> {
        let Some(map) = self.blocks(volume, peer) else {
            return Vec::new();
        };
        map.iter()
            .flat_map(|(number, e)| {
                e.bits
                    .iter_ones()
                    .map(move |bit| number * REGIONS_PER_BITMASK_BLOCK + bit as u64)
            })
            .collect()
    }

    /// How many regions of `range` are set for `peer` (a step per block).
    pub fn count_range(&self, volume: VolumeId, peer: &str, range: std::ops::Range<u64>) -> u64 {
        let Some(map) = self.blocks(volume, peer) else {
            return 0;
        };
        let (first_block, _) = split(range.start);
        let mut count = 0;
        for (number, entry) in map.range(first_block..) {
            let Some(bits) = bits_within(*number, &range) else {
                break;
            };
            if !bits.is_empty() {
                count += entry.bits[bits].count_ones() as u64;
            }
        }
        count
    }

    /// Every peer with an entry for `volume`.
    pub fn peers(&self, volume: VolumeId) -> Vec<String> {
        let mut peers: Vec<String> = self
            .entries
            .get(&volume)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        peers.sort();
        peers
    }

    /// Pool blocks used by `volume` (for `peer`, or every peer).
    pub fn pool_blocks(&self, volume: VolumeId, peer: Option<&str>) -> Vec<u64> {
        self.owners
            .iter()
            .filter(|(_, (v, p, _))| *v == volume && peer.is_none_or(|peer| peer == p))
            .map(|(pool, _)| *pool)
            .collect()
    }

    /// Blocks in use and in the pool.
    pub fn usage(&self) -> (u64, u64) {
        let used = self.owners.len() as u64;
        (used, used + self.free.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const V: VolumeId = VolumeId(3);

    #[test]
    fn set_asks_for_persistence_once() {
        let mut b = Bitmasks::new(4);
        let dirty = b.set(V, "p", 5..8).unwrap();
        assert_eq!(dirty.len(), 1);
        assert!(!b.is_durable(V, "p", 5), "not on the device yet");
        let (payload, bits) = b.snapshot(dirty[0]).unwrap();
        assert!(!payload.is_empty());
        b.persisted(dirty[0], bits);
        assert!(b.is_durable(V, "p", 6));
        // A hot region costs no more metadata writes.
        assert!(b.set(V, "p", 5..8).unwrap().is_empty());
        assert_eq!(b.count_range(V, "p", 0..u64::MAX), 3);
        assert_eq!(b.regions(V, "p"), vec![5, 6, 7]);
    }

    #[test]
    fn cleared_blocks_return_to_the_pool() {
        let mut b = Bitmasks::new(2);
        let far = REGIONS_PER_BITMASK_BLOCK * 10;
        let pools = b.set(V, "p", far..far + 1).unwrap();
        let (_, bits) = b.snapshot(pools[0]).unwrap();
        b.persisted(pools[0], bits);
        let changed = b.clear(V, "p", far..far + 1);
        assert_eq!(changed, pools);
        let (payload, bits) = b.snapshot(pools[0]).unwrap();
        assert!(payload.is_empty(), "an all-clear block is written empty");
        b.persisted(pools[0], bits);
        assert_eq!(b.usage(), (0, 2));
        assert_eq!(b.count_range(V, "p", 0..u64::MAX), 0);
    }

    #[test]
    fn a_full_pool_is_reported_and_gives_back_what_it_took() {
        let mut b = Bitmasks::new(2);
        b.set(V, "p", 0..1).unwrap();
        // Three blocks' worth needs two more than the one left.
        assert_eq!(
            b.set(V, "q", 0..3 * REGIONS_PER_BITMASK_BLOCK),
            Err(PoolFull)
        );
        assert_eq!(b.usage(), (1, 2), "the failed set kept no block");
        assert_eq!(b.count_range(V, "q", 0..u64::MAX), 0);
        b.set(V, "q", 0..1).unwrap();
    }

    #[test]
    fn a_cleared_bit_set_again_is_persisted_again() {
        let mut b = Bitmasks::new(2);
        let pools = b.set(V, "p", 7..8).unwrap();
        let (_, bits) = b.snapshot(pools[0]).unwrap();
        b.persisted(pools[0], bits);
        // The cleaner clears the bit; its write is not done yet...
        assert_eq!(b.clear(V, "p", 7..8), pools);
        let (_, cleared) = b.snapshot(pools[0]).unwrap();
        // ...when a write sets it again: it must not rely on the old durable bit.
        assert_eq!(b.set(V, "p", 7..8).unwrap(), pools);
        b.persisted(pools[0], cleared);
        assert!(!b.is_durable(V, "p", 7));
    }

    #[test]
    fn counts_by_range() {
        let mut b = Bitmasks::new(4);
        b.set(V, "p", 10..20).unwrap();
        b.set(
            V,
            "p",
            REGIONS_PER_BITMASK_BLOCK + 5..REGIONS_PER_BITMASK_BLOCK + 8,
        )
        .unwrap();
        assert_eq!(b.count_range(V, "p", 0..u64::MAX), 13);
        assert_eq!(b.count_range(V, "p", 15..REGIONS_PER_BITMASK_BLOCK + 6), 6);
        assert_eq!(b.count_range(V, "q", 0..u64::MAX), 0);
    }

    #[test]
    fn huge_ranges_cost_one_step_per_block() {
        let mut b = Bitmasks::new(64);
        let pools = b.set(V, "me", 0..10 * REGIONS_PER_BITMASK_BLOCK).unwrap();
        assert_eq!(pools.len(), 10);
        assert_eq!(
            b.count_range(V, "me", 0..u64::MAX),
            10 * REGIONS_PER_BITMASK_BLOCK
        );
        assert_eq!(b.clear(V, "me", 5..u64::MAX).len(), 10);
        assert_eq!(b.regions(V, "me"), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn load_restores_what_was_persisted() {
        let mut b = Bitmasks::new(3);
        let pools = b.set(V, "peer-x", 40_000..40_002).unwrap();
        let (payload, bits) = b.snapshot(pools[0]).unwrap();
        b.persisted(pools[0], bits);
        let mut again = Bitmasks::new(3);
        again
            .load(pools[0], BitmaskBlock::decode(&payload).unwrap().unwrap())
            .unwrap();
        assert_eq!(again.regions(V, "peer-x"), vec![40_000, 40_001]);
        assert!(again.is_durable(V, "peer-x", 40_001));
        assert!(
            again
                .load(pools[0], BitmaskBlock::decode(&payload).unwrap().unwrap())
                .is_err()
        );
    }
}
