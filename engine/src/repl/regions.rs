//! Region tracking: writes in flight and their stamps, cleaning passes,
//! and the per-region locks that order client writes and resync copies.

use std::ops::Range;
use std::rc::Rc;

use tessera_net::proto::VolumeId;
use tokio::sync::RwLock;

use super::Replication;

/// What a region has in flight: writers now, a stamp of the last write, and
/// the cleaning pass during which that write began.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct RegionUse {
    writers: u32,
    generation: u64,
    pass: u64,
}

/// Client writes hold a region's lock shared; a resync copy holds it exclusively.
pub(super) type RegionLock = Rc<RwLock<()>>;

/// Holds regions as "being written" until dropped.
pub(super) struct InFlight<'a> {
    replication: &'a Replication,
    pub(super) volume: VolumeId,
    pub(super) regions: Range<u64>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let repl = self.replication;
        let mut map = repl.regions.borrow_mut();
        for r in self.regions.clone() {
            let key = (self.volume, r);
            if let Some(u) = map.get_mut(&key) {
                u.writers = u.writers.saturating_sub(1);
                if repl.forgettable(u) {
                    map.remove(&key);
                }
            }
        }
    }
}

/// Keeps write stamps while a snapshot of quiet regions is being acted on.
pub(super) struct Watch<'a>(&'a Replication);

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let repl = self.0;
        repl.watchers.set(repl.watchers.get().saturating_sub(1));
        // Entries wait for the last watcher; sweeping before then finds nothing.
        if repl.watchers.get() == 0 {
            repl.regions
                .borrow_mut()
                .retain(|_, u| !repl.forgettable(u));
        }
    }
}

impl Replication {
    pub(super) fn begin(&self, volume: VolumeId, regions: Range<u64>) -> InFlight<'_> {
        let generation = self.next_generation.get();
        self.next_generation.set(generation + 1);
        let mut map = self.regions.borrow_mut();
        for r in regions.clone() {
            let u = map.entry((volume, r)).or_default();
            u.writers += 1;
            u.generation = generation;
            u.pass = self.passes.get();
        }
        InFlight {
            replication: self,
            volume,
            regions,
        }
    }

    /// Cleaning passes a region must go without writes before its bits clear.
    fn hold_passes(&self) -> u64 {
        let interval = self.settings.clean_interval.as_millis().max(1);
        u64::try_from(self.settings.clean_after.as_millis().div_ceil(interval)).unwrap_or(u64::MAX)
    }

    /// Whether no write has begun on `u`'s region for `hold_passes` passes.
    fn cold(&self, u: &RegionUse) -> bool {
        u.writers == 0 && self.passes.get().saturating_sub(u.pass) >= self.hold_passes()
    }

    /// Whether no write has begun on `region` for `hold_passes` passes.
    pub(super) fn region_cold(&self, volume: VolumeId, region: u64) -> bool {
        self.regions
            .borrow()
            .get(&(volume, region))
            .is_none_or(|u| self.cold(u))
    }

    /// Whether `u`'s entry can go: it is cold, and no snapshot needs its stamp.
    fn forgettable(&self, u: &RegionUse) -> bool {
        self.watchers.get() == 0 && self.cold(u)
    }

    /// Start a cleaning pass: regions age by one pass, and entries no
    /// longer needed go.
    pub(super) fn next_pass(&self) {
        self.passes.set(self.passes.get() + 1);
        self.regions
            .borrow_mut()
            .retain(|_, u| !self.forgettable(u));
    }

    pub(super) fn watch(&self) -> Watch<'_> {
        self.watchers.set(self.watchers.get() + 1);
        Watch(self)
    }

    /// The last write stamp of a region, if no write is in flight on it
    /// (0 if none was stamped; stamps are kept while a `Watch` is held).
    pub(super) fn quiet(&self, volume: VolumeId, region: u64) -> Option<u64> {
        match self.regions.borrow().get(&(volume, region)) {
            Some(u) if u.writers > 0 => None,
            Some(u) => Some(u.generation),
            None => Some(0),
        }
    }

    fn lock(&self, volume: VolumeId, region: u64) -> RegionLock {
        self.locks
            .borrow_mut()
            .entry((volume, region))
            .or_default()
            .clone()
    }

    fn unlock_idle(&self, volume: VolumeId, regions: Range<u64>) {
        let mut locks = self.locks.borrow_mut();
        for r in regions {
            if locks
                .get(&(volume, r))
                .is_some_and(|l| Rc::strong_count(l) == 1)
            {
                locks.remove(&(volume, r));
            }
        }
    }
}

/// The region locks a write or a copy takes, dropped from the table when
/// nobody holds them any more.
pub(super) struct RegionLocks<'a> {
    pub(super) repl: &'a Replication,
    pub(super) volume: VolumeId,
    pub(super) regions: Range<u64>,
    pub(super) locks: Vec<RegionLock>,
}

impl<'a> RegionLocks<'a> {
    pub(super) fn new(repl: &'a Replication, volume: VolumeId, regions: Range<u64>) -> Self {
        let locks = regions.clone().map(|r| repl.lock(volume, r)).collect();
        RegionLocks {
            repl,
            volume,
            regions,
            locks,
        }
    }
}

impl Drop for RegionLocks<'_> {
    fn drop(&mut self) {
        self.locks.clear();
        self.repl.unlock_idle(self.volume, self.regions.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tessera_net::proto::Role;
    use tessera_net::quic::Endpoint;

    use crate::repl::ReplicationSettings;

    use super::*;

    fn replication(clean_interval: Duration, clean_after: Duration) -> Replication {
        let ca = tessera_net::quic::certs::ClusterCa::generate("test", 1).expect("test CA");
        let issued = ca.issue(Role::Storage, "s1", 1).expect("certificate");
        let identity = tessera_net::quic::TlsIdentity::from_pem(
            ca.cert_pem(),
            &issued.cert_pem,
            &issued.key_pem,
            std::path::Path::new("s1"),
        )
        .expect("identity");
        let tuning = tessera_net::quic::TransportTuning::default();
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let endpoint = Endpoint::bind(loopback, &identity, &tuning, &[]).expect("endpoint");
        let settings = ReplicationSettings {
            forward_timeout: Duration::from_secs(1),
            resync_rate: 1 << 20,
            clean_interval,
            clean_after,
            mgmt: None,
        };
        Replication::new("s1".into(), 64 << 10, &endpoint, settings)
    }

    #[test]
    fn a_region_is_cleaned_only_after_passes_without_writes() {
        tokio_uring::start(async {
            let v = VolumeId(1);
            let repl = replication(Duration::from_secs(1), Duration::from_millis(2500));
            assert_eq!(repl.hold_passes(), 3);
            assert!(repl.region_cold(v, 7), "never written");
            let write = repl.begin(v, 7..8);
            repl.next_pass();
            assert!(!repl.region_cold(v, 7), "a write in flight");
            drop(write);
            for _ in 0..2 {
                assert!(!repl.region_cold(v, 7), "written within the hold");
                repl.next_pass();
            }
            assert!(repl.region_cold(v, 7), "quiet for three passes");
            assert!(
                repl.regions.borrow().is_empty(),
                "the cold entry is forgotten"
            );
            // A snapshot in progress keeps the stamp of a finished write.
            let watch = repl.watch();
            drop(repl.begin(v, 8..9));
            let stamp = repl.quiet(v, 8);
            assert!(stamp.is_some_and(|s| s > 0));
            for _ in 0..3 {
                repl.next_pass();
            }
            assert!(repl.region_cold(v, 8));
            assert_eq!(repl.quiet(v, 8), stamp, "kept while watched");
            drop(watch);
            assert!(repl.regions.borrow().is_empty());
            // With no hold, a region is cold as soon as its write ends.
            let eager = replication(Duration::from_secs(1), Duration::ZERO);
            drop(eager.begin(v, 1..2));
            assert!(eager.region_cold(v, 1));
            assert!(eager.regions.borrow().is_empty());
        });
    }
}
