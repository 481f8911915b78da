//! Region tracking: writes in flight and their stamps, cleaning passes,
//! and the per-region locks that order client writes and resync copies.

use std::ops::Range;
use std::rc::Rc;

use tessera_net::proto::VolumeId;
use tokio::sync::RwLock;

use super::Replication;
use super::state::ReplState;

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
        let (volume, regions) = (self.volume, self.regions.clone());
        self.replication.state(|s| s.write_ended(volume, regions));
    }
}

/// Keeps write stamps while a snapshot of quiet regions is being acted on.
pub(super) struct Watch<'a>(&'a Replication);

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.0.state(ReplState::unwatch);
    }
}

impl Replication {
    pub(super) fn begin(&self, volume: VolumeId, regions: Range<u64>) -> InFlight<'_> {
        self.state(|s| s.write_began(volume, regions.clone()));
        InFlight {
            replication: self,
            volume,
            regions,
        }
    }

    /// Cleaning passes a region must go without writes before its bits clear.
    #[cfg(test)]
    fn hold_passes(&self) -> u64 {
        self.state(|s| s.hold_passes())
    }

    /// Whether no write has begun on `region` for `hold_passes` passes.
    pub(super) fn region_cold(&self, volume: VolumeId, region: u64) -> bool {
        self.state(|s| s.region_cold(volume, region))
    }

    /// Start a cleaning pass: regions age by one pass, and entries no
    /// longer needed go.
    pub(super) fn next_pass(&self) {
        self.state(ReplState::next_pass);
    }

    pub(super) fn watch(&self) -> Watch<'_> {
        self.state(ReplState::watch);
        Watch(self)
    }

    /// The last write stamp of a region, if no write is in flight on it
    /// (0 if none was stamped; stamps are kept while a `Watch` is held).
    pub(super) fn quiet(&self, volume: VolumeId, region: u64) -> Option<u64> {
        self.state(|s| s.quiet(volume, region))
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
            assert_eq!(
                repl.state(|s| s.tracked_regions()),
                0,
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
            assert_eq!(repl.state(|s| s.tracked_regions()), 0);
            // With no hold, a region is cold as soon as its write ends.
            let eager = replication(Duration::from_secs(1), Duration::ZERO);
            drop(eager.begin(v, 1..2));
            assert!(eager.region_cold(v, 1));
            assert_eq!(eager.state(|s| s.tracked_regions()), 0);
        });
    }
}
