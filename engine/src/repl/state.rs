//! The replication state that is plain data: what each region has in
//! flight, the cleaning passes, the copies owed to peers, the partitions led.
//!
//! One `RefCell` in [`Replication`] owns it, and it changes only through the
//! synchronous methods here, each reached by one call of
//! [`Replication::state`]: a borrow can never live across an `.await`, and
//! every change is applied whole, on the model of Crucible's downstairs
//! (one owner, events applied synchronously). It holds no I/O handle and no
//! async primitive, so it is tested without sockets or a runtime. What tasks
//! wait on (region locks, reports of failed mirrors, running resyncs) stays
//! beside it in `Replication`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Range;

use tessera_net::proto::{MirrorState, VolumeId, VolumeMap};

use super::{MirrorKey, Replication};

/// What a region has in flight: writers now, a stamp of the last write, and
/// the cleaning pass during which that write began.
#[derive(Debug, Default, Clone, Copy)]
struct RegionUse {
    writers: u32,
    generation: u64,
    pass: u64,
}

#[derive(Debug)]
pub(super) struct ReplState {
    /// Cleaning passes a region must go without writes before its bits clear.
    hold_passes: u64,
    regions: HashMap<(VolumeId, u64), RegionUse>,
    next_generation: u64,
    /// Cleaning passes and resync batches between their snapshot and their
    /// clear: while any runs, finished writes keep their stamps.
    watchers: u32,
    /// Cleaning passes so far; a region written `hold_passes` passes ago is cold.
    passes: u64,
    /// Partitions newly led whose in-sync mirrors must be asked for their
    /// bits (a write may have reached a mirror but not this server).
    probe: HashSet<MirrorKey>,
    /// Regions the primary must copy to a peer before their bits may clear,
    /// by volume, then peer (looked up by name without building a key).
    must_copy: HashMap<VolumeId, HashMap<String, BTreeSet<u64>>>,
    /// Volumes whose map this process has applied at least once.
    seen: HashSet<VolumeId>,
    /// Partitions this server leads, as of the last map applied.
    leading: HashSet<(VolumeId, u64)>,
    resynced_bytes: u64,
    next_request_id: u64,
}

impl ReplState {
    pub(super) fn new(hold_passes: u64) -> Self {
        ReplState {
            hold_passes,
            regions: HashMap::new(),
            next_generation: 1,
            watchers: 0,
            passes: 0,
            probe: HashSet::new(),
            must_copy: HashMap::new(),
            seen: HashSet::new(),
            leading: HashSet::new(),
            resynced_bytes: 0,
            next_request_id: 1,
        }
    }

    #[cfg(test)]
    pub(super) fn hold_passes(&self) -> u64 {
        self.hold_passes
    }

    /// A write on `regions` begins: each is stamped with a new generation.
    pub(super) fn write_began(&mut self, volume: VolumeId, regions: Range<u64>) {
        let generation = self.next_generation;
        self.next_generation += 1;
        for r in regions {
            let u = self.regions.entry((volume, r)).or_default();
            u.writers += 1;
            u.generation = generation;
            u.pass = self.passes;
        }
    }

    /// A write on `regions` ended.
    pub(super) fn write_ended(&mut self, volume: VolumeId, regions: Range<u64>) {
        for r in regions {
            let key = (volume, r);
            if let Some(u) = self.regions.get_mut(&key) {
                u.writers = u.writers.saturating_sub(1);
                let u = *u;
                if self.forgettable(&u) {
                    self.regions.remove(&key);
                }
            }
        }
    }

    /// Whether no write has begun on `u`'s region for `hold_passes` passes.
    fn cold(&self, u: &RegionUse) -> bool {
        u.writers == 0 && self.passes.saturating_sub(u.pass) >= self.hold_passes
    }

    /// Whether no write has begun on `region` for `hold_passes` passes.
    pub(super) fn region_cold(&self, volume: VolumeId, region: u64) -> bool {
        self.regions
            .get(&(volume, region))
            .is_none_or(|u| self.cold(u))
    }

    /// Whether `u`'s entry can go: it is cold, and no snapshot needs its stamp.
    fn forgettable(&self, u: &RegionUse) -> bool {
        self.watchers == 0 && self.cold(u)
    }

    fn sweep(&mut self) {
        let forget: Vec<_> = self
            .regions
            .iter()
            .filter(|(_, u)| self.forgettable(u))
            .map(|(k, _)| *k)
            .collect();
        for key in forget {
            self.regions.remove(&key);
        }
    }

    /// Start a cleaning pass: regions age by one pass, and entries no
    /// longer needed go.
    pub(super) fn next_pass(&mut self) {
        self.passes += 1;
        self.sweep();
    }

    /// A snapshot of quiet regions starts being acted on: finished writes
    /// keep their stamps until it ends.
    pub(super) fn watch(&mut self) {
        self.watchers += 1;
    }

    pub(super) fn unwatch(&mut self) {
        self.watchers = self.watchers.saturating_sub(1);
        // Entries wait for the last watcher; sweeping before then finds nothing.
        if self.watchers == 0 {
            self.sweep();
        }
    }

    /// The last write stamp of a region, if no write is in flight on it
    /// (0 if none was stamped; stamps are kept while a snapshot is watched).
    pub(super) fn quiet(&self, volume: VolumeId, region: u64) -> Option<u64> {
        match self.regions.get(&(volume, region)) {
            Some(u) if u.writers > 0 => None,
            Some(u) => Some(u.generation),
            None => Some(0),
        }
    }

    /// Regions with an entry (in flight, or stamped and still needed).
    #[cfg(test)]
    pub(super) fn tracked_regions(&self) -> usize {
        self.regions.len()
    }

    /// Record that `peer` must get `regions` copied before their bits clear.
    pub(super) fn owe(
        &mut self,
        volume: VolumeId,
        peer: &str,
        regions: impl IntoIterator<Item = u64>,
    ) {
        let by_peer = self.must_copy.entry(volume).or_default();
        match by_peer.get_mut(peer) {
            Some(owed) => owed.extend(regions),
            None => {
                by_peer.insert(peer.to_string(), regions.into_iter().collect());
            }
        }
    }

    /// Whether `peer` is owed a copy of `region`.
    pub(super) fn owes(&self, volume: VolumeId, peer: &str, region: u64) -> bool {
        self.owed(volume, peer)
            .is_some_and(|owed| owed.contains(&region))
    }

    /// The regions in `range` that `peer` is owed, in order.
    pub(super) fn owed_in(&self, volume: VolumeId, peer: &str, range: Range<u64>) -> Vec<u64> {
        self.owed(volume, peer)
            .map(|owed| owed.range(range).copied().collect())
            .unwrap_or_default()
    }

    /// Whether `peer` is owed any region in `range`.
    pub(super) fn owes_any_in(&self, volume: VolumeId, peer: &str, range: Range<u64>) -> bool {
        self.owed(volume, peer)
            .is_some_and(|owed| owed.range(range).next().is_some())
    }

    fn owed(&self, volume: VolumeId, peer: &str) -> Option<&BTreeSet<u64>> {
        self.must_copy.get(&volume)?.get(peer)
    }

    /// `regions` reached `peer`: the debt for them is paid.
    pub(super) fn paid(&mut self, volume: VolumeId, peer: &str, regions: &[u64]) {
        if let Some(owed) = self
            .must_copy
            .get_mut(&volume)
            .and_then(|by_peer| by_peer.get_mut(peer))
        {
            for r in regions {
                owed.remove(r);
            }
        }
    }

    /// Whether the mirror of `key` must be asked for its bits.
    pub(super) fn probing(&self, key: &MirrorKey) -> bool {
        self.probe.contains(key)
    }

    /// The mirror of `key` has answered with its bits.
    pub(super) fn probed(&mut self, key: &MirrorKey) {
        self.probe.remove(key);
    }

    /// A map for `volume` was applied (`fresh`: the volume was created by
    /// this push, so nothing was written to it). Debts to servers that are
    /// no longer replicas go; the partitions `me` leads now but did not
    /// before are returned, and their in-sync mirrors will be probed.
    pub(super) fn map_applied(&mut self, map: &VolumeMap, me: &str, fresh: bool) -> Vec<usize> {
        let volume = map.id;
        let replicas: HashSet<&str> = map
            .partitions
            .iter()
            .flat_map(|p| p.replicas.iter().map(|r| r.server.as_str()))
            .collect();
        if let Some(by_peer) = self.must_copy.get_mut(&volume) {
            by_peer.retain(|peer, _| replicas.contains(peer.as_str()));
        }
        let before: HashSet<u64> = self
            .leading
            .iter()
            .filter(|(v, _)| *v == volume)
            .map(|(_, p)| *p)
            .collect();
        // A volume new to this server, first seen now: nothing was written.
        let first_map = self.seen.insert(volume);
        let fresh = first_map && fresh;
        self.leading.retain(|(v, _)| *v != volume);
        let mut newly_led = Vec::new();
        for (index, p) in map.partitions.iter().enumerate() {
            if p.replicas.first().is_none_or(|r| r.server != me) {
                continue;
            }
            self.leading.insert((volume, p.first_page));
            if before.contains(&p.first_page) || fresh {
                continue;
            }
            for peer in p.replicas.iter().skip(1) {
                if peer.state == MirrorState::InSync {
                    self.probe
                        .insert((volume, peer.server.clone(), p.first_page));
                }
            }
            newly_led.push(index);
        }
        newly_led
    }

    pub(super) fn next_request_id(&mut self) -> u64 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        id
    }

    pub(super) fn resynced(&mut self, bytes: u64) {
        self.resynced_bytes += bytes;
    }

    pub(super) fn resynced_bytes(&self) -> u64 {
        self.resynced_bytes
    }
}

impl Replication {
    /// Apply `change` to the replication state: the only way to reach it.
    pub(super) fn state<R>(&self, change: impl FnOnce(&mut ReplState) -> R) -> R {
        change(&mut self.state.borrow_mut())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tessera_net::proto::{Epoch, Partition, Replica};

    use super::*;

    fn map(partitions: &[(&str, &str, MirrorState)]) -> VolumeMap {
        let replica = |server: &str, state| Replica {
            server: server.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            state,
        };
        VolumeMap {
            id: VolumeId(1),
            name: "v".into(),
            epoch: Epoch(2),
            size: 2 << 20,
            page_size: 1 << 20,
            partitions: partitions
                .iter()
                .enumerate()
                .map(|(i, (primary, mirror, state))| Partition {
                    first_page: i as u64,
                    end_page: i as u64 + 1,
                    replicas: vec![
                        replica(primary, MirrorState::InSync),
                        replica(mirror, *state),
                    ],
                })
                .collect(),
        }
    }

    #[test]
    fn a_partition_newly_led_is_reported_once_and_its_in_sync_mirrors_probed() {
        let mut state = ReplState::new(1);
        let first = map(&[
            ("s1", "s2", MirrorState::InSync),
            ("s2", "s1", MirrorState::InSync),
        ]);
        // Loaded from disk after a restart (not fresh): what s1 leads is new to it.
        assert_eq!(state.map_applied(&first, "s1", false), vec![0]);
        assert!(state.probing(&(VolumeId(1), "s2".into(), 0)));
        assert!(!state.probing(&(VolumeId(1), "s1".into(), 1)));
        // The same map again: nothing newly led.
        assert!(state.map_applied(&first, "s1", false).is_empty());
        // A failover gives s1 the second partition, whose mirror is out of sync.
        let promoted = map(&[
            ("s1", "s2", MirrorState::InSync),
            ("s1", "s2", MirrorState::OutOfSync),
        ]);
        assert_eq!(state.map_applied(&promoted, "s1", false), vec![1]);
        assert!(
            !state.probing(&(VolumeId(1), "s2".into(), 1)),
            "an out-of-sync mirror is resynced, not probed"
        );
    }

    #[test]
    fn a_fresh_volume_owes_nothing_and_debts_to_former_replicas_go() {
        let mut state = ReplState::new(1);
        let m = map(&[("s1", "s2", MirrorState::InSync)]);
        assert!(
            state.map_applied(&m, "s1", true).is_empty(),
            "created by this push"
        );
        state.owe(VolumeId(1), "s2", [3, 4]);
        state.owe(VolumeId(1), "s3", [5]);
        assert_eq!(state.owed_in(VolumeId(1), "s2", 0..4), vec![3]);
        assert!(state.owes(VolumeId(1), "s3", 5));
        state.map_applied(&m, "s1", true);
        assert!(
            !state.owes(VolumeId(1), "s3", 5),
            "s3 is no replica any more"
        );
        state.paid(VolumeId(1), "s2", &[3]);
        assert_eq!(state.owed_in(VolumeId(1), "s2", 0..10), vec![4]);
    }

    #[test]
    fn stamps_change_with_every_write_and_block_quiet_while_in_flight() {
        let mut state = ReplState::new(0);
        let v = VolumeId(1);
        assert_eq!(state.quiet(v, 1), Some(0), "never written");
        state.watch();
        state.write_began(v, 1..3);
        assert_eq!(state.quiet(v, 1), None, "in flight");
        state.write_ended(v, 1..3);
        let first = state.quiet(v, 1);
        state.write_began(v, 2..3);
        state.write_ended(v, 2..3);
        assert_eq!(state.quiet(v, 1), first, "region 1 untouched");
        assert_ne!(state.quiet(v, 2), first, "region 2 written again");
        state.unwatch();
        assert_eq!(state.tracked_regions(), 0, "cold at once without a hold");
    }
}
