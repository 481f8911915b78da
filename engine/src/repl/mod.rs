//! Primary-copy replication (see `docs/replication.md`).
//!
//! * A client write reaches the partition's primary. The primary sets the
//!   write-intent bits of the written regions for every peer replica
//!   (durably, unless already set), writes locally and forwards the write to
//!   every in-sync or resyncing mirror in parallel, and acknowledges when all
//!   of them hold it. A mirror that does not answer within the forward
//!   timeout is reported to the management server, which marks it out of
//!   sync (an epoch bump) before the write is acknowledged; its bits stay set.
//! * A mirror applies forwarded writes and sets bits for every other replica
//!   of the partition, so that if it is promoted it knows what to copy.
//! * The cleaner clears bits once the region is on every in-sync mirror and
//!   flushed there, and tells the mirrors to clear theirs.
//! * Resync copies the regions a returning mirror may lack (the primary's
//!   bits for it and the mirror's bits for the primary), one region at a
//!   time under an exclusive region lock, at a limited rate, then reports
//!   the mirror in sync.

mod cleaner;
mod forward;
mod peer;
mod regions;
mod resync;
mod runs;
mod state;
mod write;

pub use peer::handle_peer_request;
pub use write::{mirror_write, primary_flush, primary_write};

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::time::Duration;

use tessera_net::proto::{MirrorReport, Partition, ResyncProgress, Role, VolumeId, VolumeMap};
use tessera_net::quic::{Alpn, Connector, Endpoint};
use tracing::info;

use crate::disk::io::BlockDevice;
use crate::store::{Store, Volume};
use cleaner::clean;
use forward::Failures;
use regions::RegionLock;
use resync::{Resync, schedule};
use state::ReplState;

/// Replication settings (from the storage config).
#[derive(Debug, Clone)]
pub struct ReplicationSettings {
    pub forward_timeout: Duration,
    pub resync_rate: u64,
    pub clean_interval: Duration,
    /// Bits of a region clear only after it has been free of writes this long.
    pub clean_after: Duration,
    /// The management server, to report mirror failures and resyncs to.
    pub mgmt: Option<(SocketAddr, String)>,
}

/// A mirror of one partition: volume, mirror, the partition's first page.
pub(super) type MirrorKey = (VolumeId, String, u64);
/// Replication state of one storage server.
#[derive(Debug)]
pub struct Replication {
    me: String,
    region_size: u64,
    settings: ReplicationSettings,
    data: Connector,
    peers: Connector,
    mgmt: Connector,
    /// The plain state, changed only through `Replication::state`.
    state: RefCell<ReplState>,
    /// What tasks wait on: region locks (writes shared, resync copies
    /// exclusive), reports of failed mirrors, running resyncs.
    locks: RefCell<HashMap<(VolumeId, u64), RegionLock>>,
    failures: RefCell<Failures>,
    resyncs: RefCell<HashMap<MirrorKey, Rc<Resync>>>,
}

impl Replication {
    pub fn new(
        me: String,
        region_size: u32,
        endpoint: &Endpoint,
        settings: ReplicationSettings,
    ) -> Self {
        // Cleaning passes a region must go without writes before its bits clear.
        let interval = settings.clean_interval.as_millis().max(1);
        let hold_passes =
            u64::try_from(settings.clean_after.as_millis().div_ceil(interval)).unwrap_or(u64::MAX);
        Replication {
            me,
            region_size: u64::from(region_size),
            settings,
            state: RefCell::new(ReplState::new(hold_passes)),
            data: Connector::new(endpoint.clone(), Alpn::Data, Role::Storage),
            peers: Connector::new(endpoint.clone(), Alpn::Mgmt, Role::Storage),
            mgmt: Connector::new(endpoint.clone(), Alpn::Mgmt, Role::Mgmt),
            locks: RefCell::default(),
            failures: RefCell::default(),
            resyncs: RefCell::default(),
        }
    }

    pub fn region_size(&self) -> u32 {
        self.region_size as u32
    }

    /// Regions touched by `[offset, offset + len)`.
    pub fn regions_of(&self, offset: u64, len: u64) -> Range<u64> {
        offset / self.region_size..(offset + len.max(1)).div_ceil(self.region_size)
    }

    /// Regions of a partition's pages.
    fn partition_regions(&self, map: &VolumeMap, p: &Partition) -> Range<u64> {
        let page = u64::from(map.page_size);
        let end = (p.end_page * page).min(map.size);
        self.regions_of(p.first_page * page, end.saturating_sub(p.first_page * page))
    }

    /// Whether this server is the primary of `partition`.
    fn leads(&self, partition: &Partition) -> bool {
        partition
            .replicas
            .first()
            .is_some_and(|r| r.server == self.me)
    }

    /// Record that `peer` must get `regions` copied before their bits clear.
    fn owe(&self, volume: VolumeId, peer: &str, regions: impl IntoIterator<Item = u64>) {
        self.state(|s| s.owe(volume, peer, regions));
    }

    /// A map for `volume` was applied. Failures recorded under the old one
    /// are settled. Partitions this server leads now but did not before
    /// (it was promoted, or it restarted) may hold writes that reached some
    /// replicas only: the regions its bits name are copied to the in-sync
    /// mirrors before those bits may clear.
    pub fn map_changed<D: BlockDevice>(&self, store: &Store<D>, volume: VolumeId) {
        self.failures.borrow_mut().forget_volume(volume);
        let Some(held) = store.volume(volume) else {
            return;
        };
        let Some(map) = held.map() else {
            return;
        };
        let newly_led = self.state(|s| s.map_applied(&map, &self.me, held.assigned_here()));
        for p in newly_led.into_iter().filter_map(|i| map.partitions.get(i)) {
            let range = self.partition_regions(&map, p);
            for peer in p.replicas.iter().skip(1) {
                let ours: Vec<u64> = store
                    .dirty_regions(volume, &peer.server)
                    .into_iter()
                    .filter(|r| range.contains(r))
                    .collect();
                if !ours.is_empty() {
                    info!(volume = %volume, mirror = %peer.server, regions = ours.len(), "leading a partition: its bits name regions a write may have left unequal");
                    self.owe(volume, &peer.server, ours);
                }
            }
        }
    }

    /// Every partition this server leads, with its volume and regions.
    fn led<D: BlockDevice>(&self, store: &Store<D>) -> Vec<(Rc<Volume>, Partition, Range<u64>)> {
        let mut out = Vec::new();
        for volume in store.volumes() {
            let Some(map) = volume.map() else { continue };
            for p in map.partitions.iter().filter(|p| self.leads(p)) {
                let range = self.partition_regions(&map, p);
                out.push((volume.clone(), p.clone(), range));
            }
        }
        out
    }

    /// Bitmask counts and resync progress of the partitions this server leads.
    pub fn reports<D: BlockDevice>(&self, store: &Store<D>) -> Vec<MirrorReport> {
        let mut out = Vec::new();
        for (volume, p, range) in self.led(store) {
            for peer in p.replicas.iter().skip(1) {
                let dirty = store.dirty_count(volume.id, &peer.server, range.clone());
                let resync = self
                    .resyncs
                    .borrow()
                    .get(&(volume.id, peer.server.clone(), p.first_page))
                    .map(|r| {
                        let secs = r.started.elapsed().as_secs_f64().max(0.001);
                        ResyncProgress {
                            total_regions: r.total.get(),
                            copied_regions: r.copied.get(),
                            bytes_per_sec: (r.copied.get() as f64 * self.region_size as f64 / secs)
                                as u64,
                        }
                    });
                out.push(MirrorReport {
                    reporter: self.me.clone(),
                    volume: volume.id,
                    first_page: p.first_page,
                    peer: peer.server.clone(),
                    dirty_regions: dirty,
                    region_size: self.region_size(),
                    resync,
                });
            }
        }
        out
    }

    pub fn resynced_bytes(&self) -> u64 {
        self.state(|s| s.resynced_bytes())
    }
}

/// The background loop of a storage server's replication: clean bits and
/// start the resyncs that are due.
pub async fn replication_loop<D: BlockDevice + 'static>(
    store: Rc<Store<D>>,
    repl: Rc<Replication>,
) {
    let interval = repl.settings.clean_interval;
    loop {
        tokio::time::sleep(interval).await;
        schedule(&store, &repl);
        clean(&store, &repl).await;
    }
}
