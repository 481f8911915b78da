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

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use tessera_net::proto::{
    Epoch, EpochVerdict, FLAG_RESYNC, Forward, MgmtReply, MgmtRequest, MirrorReport, MirrorState,
    Opcode, Partition, Refusal as MgmtRefusal, Replica, Request, ResyncProgress, Role, Status,
    VolumeId, VolumeMap, region_runs,
};
use tessera_net::quic::{Alpn, Connector, Endpoint, PeerIdentity};
use tokio::sync::{OnceCell, RwLock};
use tracing::{debug, info, warn};

use crate::aligned::AlignedBuf;
use crate::server::Service;
use crate::store::{Admission, Part, ReadPiece, Refusal, Refused, Volume};

/// Regions copied between two cleaning steps of a resync.
const RESYNC_BATCH: usize = 64;

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

/// What a region has in flight: writers now, a stamp of the last write, and
/// the cleaning pass during which that write began.
#[derive(Debug, Default, Clone, Copy)]
struct RegionUse {
    writers: u32,
    generation: u64,
    pass: u64,
}

/// A mirror this server failed to forward to, and the outcome of reporting it.
#[derive(Debug, Default)]
struct Failure {
    reported: OnceCell<Result<(), MgmtRefusal>>,
    /// Wakes forwards still waiting on the mirror: they give up at once.
    signal: tokio::sync::Notify,
}

/// Why a forward did not succeed. Every variant but `Behind` means the
/// mirror did not take the request (and may be reported out of sync).
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    /// The mirror holds a newer epoch (this server's map is behind: a push
    /// to it is on the way), or is applying one right now. Not the mirror's
    /// fault: the request is retried under the new map.
    #[error("the mirror is at the newer epoch {0}")]
    Behind(Epoch),
    /// Connecting, sending or reading the reply failed.
    #[error("transport: {0}")]
    Transport(tessera_net::quic::QuicError),
    /// The mirror refused the request.
    #[error("refused with {status:?}: {message}")]
    Refused { status: Status, message: String },
    /// No answer within the forward timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The mirror was written off while this forward waited.
    #[error("the mirror was written off")]
    WrittenOff,
    /// This server no longer leads the partition, or the mirror is out of sync.
    #[error("no longer the primary, or the mirror is out of sync")]
    NotLeading,
    /// This server could not read its own copy of the region.
    #[error("reading the region to copy failed: {0}")]
    LocalRead(String),
    /// The region's copy does not make a valid request.
    #[error("the copy is not a valid request: {0}")]
    InvalidCopy(tessera_net::proto::ProtoError),
}

impl ForwardError {
    /// Whether the mirror itself failed (not this server's map being behind).
    fn mirror_failed(&self) -> bool {
        !matches!(self, ForwardError::Behind(_))
    }
}

/// Progress of one running resync.
#[derive(Debug)]
struct Resync {
    total: Cell<u64>,
    copied: Cell<u64>,
    started: Instant,
}

type PeerKey = (VolumeId, String);
/// A mirror of one partition: volume, mirror, the partition's first page.
type MirrorKey = (VolumeId, String, u64);
/// Failed forwards by partition (volume, first page), then by mirror: looked
/// up on every forward by the mirror's name without building a key.
#[derive(Debug, Default)]
struct Failures(HashMap<(VolumeId, u64), HashMap<String, Rc<Failure>>>);

impl Failures {
    fn get(&self, volume: VolumeId, first_page: u64, server: &str) -> Option<&Rc<Failure>> {
        self.0.get(&(volume, first_page))?.get(server)
    }

    fn get_or_insert(&mut self, volume: VolumeId, first_page: u64, server: &str) -> Rc<Failure> {
        let by_mirror = self.0.entry((volume, first_page)).or_default();
        match by_mirror.get(server) {
            Some(failure) => failure.clone(),
            None => by_mirror.entry(server.to_string()).or_default().clone(),
        }
    }

    fn remove(&mut self, volume: VolumeId, first_page: u64, server: &str) {
        if let Some(by_mirror) = self.0.get_mut(&(volume, first_page)) {
            by_mirror.remove(server);
        }
    }

    fn forget_volume(&mut self, volume: VolumeId) {
        self.0.retain(|(v, _), _| *v != volume);
    }
}

/// Client writes hold a region's lock shared; a resync copy holds it exclusively.
type RegionLock = Rc<RwLock<()>>;

/// Replication state of one storage server.
#[derive(Debug)]
pub struct Replication {
    me: String,
    region_size: u64,
    settings: ReplicationSettings,
    data: Connector,
    peers: Connector,
    mgmt: Connector,
    regions: RefCell<HashMap<(VolumeId, u64), RegionUse>>,
    next_generation: Cell<u64>,
    /// Cleaning passes and resync batches between their snapshot and their
    /// clear: while any runs, finished writes keep their stamps.
    watchers: Cell<u32>,
    /// Cleaning passes so far; a region written `hold_passes` passes ago is cold.
    passes: Cell<u64>,
    locks: RefCell<HashMap<(VolumeId, u64), RegionLock>>,
    failures: RefCell<Failures>,
    /// Partitions newly led whose in-sync mirrors must be asked for their
    /// bits (a write may have reached a mirror but not this server).
    probe: RefCell<HashSet<MirrorKey>>,
    /// Regions the primary must copy to a peer before their bits may clear.
    must_copy: RefCell<HashMap<PeerKey, BTreeSet<u64>>>,
    /// Volumes whose map this process has applied at least once.
    seen: RefCell<HashSet<VolumeId>>,
    /// Partitions this server leads, as of the last map applied.
    leading: RefCell<HashSet<(VolumeId, u64)>>,
    resyncs: RefCell<HashMap<MirrorKey, Rc<Resync>>>,
    resynced_bytes: Cell<u64>,
    next_id: Cell<u64>,
}

/// Holds regions as "being written" until dropped.
struct InFlight<'a> {
    replication: &'a Replication,
    volume: VolumeId,
    regions: Range<u64>,
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
struct Watch<'a>(&'a Replication);

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
    pub fn new(
        me: String,
        region_size: u32,
        endpoint: &Endpoint,
        settings: ReplicationSettings,
    ) -> Self {
        Replication {
            me,
            region_size: u64::from(region_size),
            settings,
            data: Connector::new(endpoint.clone(), Alpn::Data, Role::Storage),
            peers: Connector::new(endpoint.clone(), Alpn::Mgmt, Role::Storage),
            mgmt: Connector::new(endpoint.clone(), Alpn::Mgmt, Role::Mgmt),
            regions: RefCell::default(),
            next_generation: Cell::new(1),
            watchers: Cell::new(0),
            passes: Cell::new(0),
            locks: RefCell::default(),
            failures: RefCell::default(),
            probe: RefCell::default(),
            must_copy: RefCell::default(),
            leading: RefCell::default(),
            seen: RefCell::default(),
            resyncs: RefCell::default(),
            resynced_bytes: Cell::new(0),
            next_id: Cell::new(1),
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

    fn begin(&self, volume: VolumeId, regions: Range<u64>) -> InFlight<'_> {
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
    fn region_cold(&self, volume: VolumeId, region: u64) -> bool {
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
    fn next_pass(&self) {
        self.passes.set(self.passes.get() + 1);
        self.regions
            .borrow_mut()
            .retain(|_, u| !self.forgettable(u));
    }

    fn watch(&self) -> Watch<'_> {
        self.watchers.set(self.watchers.get() + 1);
        Watch(self)
    }

    /// The last write stamp of a region, if no write is in flight on it
    /// (0 if none was stamped; stamps are kept while a `Watch` is held).
    fn quiet(&self, volume: VolumeId, region: u64) -> Option<u64> {
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

    /// Whether this server is the primary of `partition`.
    fn leads(&self, partition: &Partition) -> bool {
        partition
            .replicas
            .first()
            .is_some_and(|r| r.server == self.me)
    }

    /// Whether forwarding to `server` failed and its loss is on record.
    fn written_off(&self, volume: VolumeId, server: &str, first_page: u64) -> bool {
        self.failures
            .borrow()
            .get(volume, first_page, server)
            .is_some_and(|f| matches!(f.reported.get(), Some(Ok(()))))
    }

    /// Record that `peer` must get `regions` copied before their bits clear.
    fn owe(&self, volume: VolumeId, peer: &str, regions: impl IntoIterator<Item = u64>) {
        self.must_copy
            .borrow_mut()
            .entry((volume, peer.to_string()))
            .or_default()
            .extend(regions);
    }

    /// A map for `volume` was applied. Failures recorded under the old one
    /// are settled. Partitions this server leads now but did not before
    /// (it was promoted, or it restarted) may hold writes that reached some
    /// replicas only: the regions its bits name are copied to the in-sync
    /// mirrors before those bits may clear.
    pub fn map_changed(&self, service: &Service, volume: VolumeId) {
        self.failures.borrow_mut().forget_volume(volume);
        let Some(held) = service.store.volume(volume) else {
            return;
        };
        let Some(map) = held.map() else {
            return;
        };
        // Debts to servers that are no longer replicas of the volume are void.
        let replicas: HashSet<&str> = map
            .partitions
            .iter()
            .flat_map(|p| p.replicas.iter().map(|r| r.server.as_str()))
            .collect();
        self.must_copy
            .borrow_mut()
            .retain(|(v, peer), _| *v != volume || replicas.contains(peer.as_str()));
        let mut leading = self.leading.borrow_mut();
        let before: HashSet<u64> = leading
            .iter()
            .filter(|(v, _)| *v == volume)
            .map(|(_, p)| *p)
            .collect();
        // A volume new to this server, first seen now: nothing was written.
        let first_map = self.seen.borrow_mut().insert(volume);
        let fresh = first_map && held.assigned_here();
        leading.retain(|(v, _)| *v != volume);
        for p in map.partitions.iter().filter(|p| self.leads(p)) {
            leading.insert((volume, p.first_page));
            if before.contains(&p.first_page) || fresh {
                continue;
            }
            let range = self.partition_regions(&map, p);
            for peer in p.replicas.iter().skip(1) {
                if peer.state == MirrorState::InSync {
                    self.probe
                        .borrow_mut()
                        .insert((volume, peer.server.clone(), p.first_page));
                }
                let ours: Vec<u64> = service
                    .store
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

    fn next_request_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// Send a replica request to `target`, waiting at most the forward
    /// timeout, or less if the mirror is written off meanwhile.
    async fn forward(
        &self,
        key: (VolumeId, u64),
        target: &Replica,
        request: &Request,
        kind: Forward,
        payload: Bytes,
    ) -> Result<(), ForwardError> {
        let (volume, first_page) = key;
        let failure = self
            .failures
            .borrow_mut()
            .get_or_insert(volume, first_page, &target.server);
        let abandoned = failure.signal.notified();
        let deadline = Instant::now() + self.settings.forward_timeout;
        let attempt = async {
            loop {
                let forwarded = request.forwarded(kind, self.next_request_id());
                let failed = ForwardError::Transport;
                let conn = self
                    .data
                    .get(target.addr, &target.server)
                    .await
                    .map_err(failed)?;
                let (reply, message) = conn
                    .data_shared(&forwarded, payload.clone())
                    .await
                    .map_err(failed)?;
                // The mirror's verdict on our epoch, judged against what it holds.
                let verdict = EpochVerdict::judge(reply.epoch, request.epoch);
                match reply.status {
                    Status::Ok => return Ok(()),
                    // The mirror has not applied the new map yet: it is being pushed.
                    Status::StaleEpoch if verdict.is_newer() && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    // Stale: our map is behind. Current: the mirror is applying
                    // a new epoch right now. Either way the sender's map moves on.
                    Status::StaleEpoch if !verdict.is_newer() => {
                        return Err(ForwardError::Behind(reply.epoch));
                    }
                    status => {
                        return Err(ForwardError::Refused {
                            status,
                            message: String::from_utf8_lossy(&message).into_owned(),
                        });
                    }
                }
            }
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout_at(deadline.into(), attempt) => {
                r.unwrap_or(Err(ForwardError::Timeout(self.settings.forward_timeout)))
            }
            () = abandoned => Err(ForwardError::WrittenOff),
        };
        if outcome.as_ref().is_err_and(ForwardError::mirror_failed) {
            // A dead connection would stall the next attempt too.
            self.data.forget(target.addr);
        }
        outcome
    }

    /// Have `server` marked out of sync for the partition at `first_page`;
    /// concurrent failures of the same mirror share one report.
    async fn mirror_failed(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        first_page: u64,
        server: &str,
    ) -> Result<(), Refusal> {
        let failure = {
            let mut failures = self.failures.borrow_mut();
            // A report that failed earlier is tried again.
            if failures
                .get(volume, first_page, server)
                .is_some_and(|f| matches!(f.reported.get(), Some(Err(_))))
            {
                failures.remove(volume, first_page, server);
            }
            failures.get_or_insert(volume, first_page, server)
        };
        failure.signal.notify_waiters();
        let result = failure
            .reported
            .get_or_init(|| async {
                warn!(volume = %volume, mirror = server, %epoch, "mirror did not take a write: reporting it out of sync");
                let request = MgmtRequest::MirrorFailed {
                    volume,
                    epoch,
                    first_page,
                    server: server.to_string(),
                };
                match self.call_mgmt(&request).await {
                    Ok(MgmtReply::Applied { .. }) => Ok(()),
                    Ok(MgmtReply::Refused(r)) => Err(r),
                    Ok(other) => Err(MgmtRefusal::Invalid {
                        reason: format!("unexpected reply {other:?}"),
                    }),
                    Err(e) => Err(MgmtRefusal::Unavailable {
                        reason: e.to_string(),
                    }),
                }
            })
            .await
            .clone();
        result.map_err(|refusal| match refusal {
            MgmtRefusal::StaleEpoch { current, .. } => Refusal::new(
                current,
                Refused::MirrorLostMapChanged {
                    mirror: server.to_string(),
                },
            ),
            refusal => Refusal::new(
                epoch,
                Refused::MirrorLossUnrecorded {
                    mirror: server.to_string(),
                    refusal,
                },
            ),
        })
    }

    async fn call_mgmt(&self, request: &MgmtRequest) -> Result<MgmtReply, CallError> {
        let (addr, name) = self.settings.mgmt.as_ref().ok_or(CallError::NoManagement)?;
        call(&self.mgmt, *addr, name, Duration::from_secs(10), request).await
    }

    async fn call_peer(
        &self,
        peer: &Replica,
        request: &MgmtRequest,
    ) -> Result<MgmtReply, CallError> {
        let timeout = self.settings.forward_timeout * 2;
        call(&self.peers, peer.addr, &peer.server, timeout, request).await
    }

    /// Every partition this server leads, with its volume and regions.
    fn led(&self, service: &Service) -> Vec<(Rc<Volume>, Partition, Range<u64>)> {
        let mut out = Vec::new();
        for volume in service.store.volumes() {
            let Some(map) = volume.map() else { continue };
            for p in map.partitions.iter().filter(|p| self.leads(p)) {
                let range = self.partition_regions(&map, p);
                out.push((volume.clone(), p.clone(), range));
            }
        }
        out
    }

    /// Bitmask counts and resync progress of the partitions this server leads.
    pub fn reports(&self, service: &Service) -> Vec<MirrorReport> {
        let mut out = Vec::new();
        for (volume, p, range) in self.led(service) {
            for peer in p.replicas.iter().skip(1) {
                let dirty = service
                    .store
                    .dirty_count(volume.id, &peer.server, range.clone());
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
        self.resynced_bytes.get()
    }
}

/// Why a management request to a peer or the management server got no reply.
#[derive(Debug, thiserror::Error)]
enum CallError {
    /// The server runs without a management server.
    #[error("no management server configured")]
    NoManagement,
    /// Connecting or the exchange failed.
    #[error("{name}: {error}")]
    Transport {
        name: String,
        error: tessera_net::quic::QuicError,
    },
    /// No reply within the call's timeout.
    #[error("{name} did not answer within {timeout:?}")]
    Timeout { name: String, timeout: Duration },
}

/// One management request over `connector`, within `timeout`; a connection
/// that failed or went silent is dropped so that the next call dials afresh.
async fn call(
    connector: &Connector,
    addr: SocketAddr,
    name: &str,
    timeout: Duration,
    request: &MgmtRequest,
) -> Result<MgmtReply, CallError> {
    let reply = tokio::time::timeout(timeout, async {
        let conn = connector.get(addr, name).await?;
        conn.mgmt(request).await
    })
    .await;
    match reply {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(error)) => {
            connector.forget(addr);
            Err(CallError::Transport {
                name: name.to_string(),
                error,
            })
        }
        Err(_) => {
            connector.forget(addr);
            Err(CallError::Timeout {
                name: name.to_string(),
                timeout,
            })
        }
    }
}

/// Execute an admitted write, trim or write-zeroes as the partition's
/// primary: intent bits, local I/O and forwarding in parallel. The epoch
/// gate (`admission`) is let go once the I/O is done: waiting for the
/// management server to record a lost mirror must not hold up a map push.
pub async fn primary_write(
    service: &Service,
    volume: &Volume,
    admission: Admission<'_>,
    request: &Request,
    payload: Option<AlignedBuf>,
) -> Result<(), Refusal> {
    let store = &service.store;
    let repl = &service.replication;
    let epoch = admission.epoch;
    let Some(partition) = admission.partition(Part::Primary) else {
        return Err(Refusal::new(epoch, Refused::NotAdmittedAsPrimary));
    };
    let first_page = partition.first_page;
    let peers: Vec<&Replica> = partition.replicas.iter().skip(1).collect();
    if peers.is_empty() {
        return apply_local(service, volume, request, payload).await;
    }
    let regions = repl.regions_of(request.offset, u64::from(request.length));
    let in_flight = repl.begin(volume.id, regions.clone());
    let locks = RegionLocks::new(repl, volume.id, regions.clone());
    let mut guards = Vec::with_capacity(locks.locks.len());
    for lock in &locks.locks {
        guards.push(lock.read().await);
    }
    let names: Vec<&str> = peers.iter().map(|r| r.server.as_str()).collect();
    store
        .mark_dirty(volume.id, &names, regions.clone())
        .await
        .map_err(|e| io_refusal(volume, &e))?;
    let (targets, skipped): (Vec<&Replica>, Vec<&Replica>) = peers.iter().copied().partition(|r| {
        r.state != MirrorState::OutOfSync && !repl.written_off(volume.id, &r.server, first_page)
    });
    // The local write owns the aligned buffer; the forwards share one copy.
    let bytes = match &payload {
        Some(p) if !targets.is_empty() => Bytes::copy_from_slice(p),
        _ => Bytes::new(),
    };
    let local = apply_local(service, volume, request, payload);
    let remote = join_all(targets.iter().map(|t| {
        repl.forward(
            (volume.id, first_page),
            t,
            request,
            Forward::Client,
            bytes.clone(),
        )
    }));
    let (local, remote) = futures_util::future::join(local, remote).await;
    // Replicas that did not take the write get this region copied before its
    // bits may clear (all of them, with our version, if ours failed).
    let missed = targets
        .iter()
        .zip(&remote)
        .filter(|(_, outcome)| local.is_err() || outcome.is_err())
        .map(|(t, _)| *t)
        .chain(skipped);
    for replica in missed {
        repl.owe(volume.id, &replica.server, regions.clone());
    }
    drop(guards);
    drop(locks);
    drop(in_flight);
    drop(admission);
    let pages = [first_page];
    let outcomes = targets.iter().zip(remote).map(|(t, o)| (*t, &pages[..], o));
    settle(repl, volume.id, epoch, outcomes).await?;
    local
}

/// After forwarding: a mirror changing epoch sends the client to retry
/// under the new map; a mirror that failed is reported out of sync for each
/// of its partitions `pages`, and the request waits until that is recorded.
async fn settle<'a>(
    repl: &Replication,
    volume: VolumeId,
    epoch: Epoch,
    outcomes: impl Iterator<Item = (&'a Replica, &'a [u64], Result<(), ForwardError>)>,
) -> Result<(), Refusal> {
    for (target, pages, outcome) in outcomes {
        match outcome {
            Ok(()) => {}
            Err(ForwardError::Behind(current)) => {
                return Err(Refusal::new(
                    current,
                    Refused::MirrorChangingEpoch {
                        mirror: target.server.clone(),
                    },
                ));
            }
            Err(reason) => {
                debug!(volume = %volume, mirror = %target.server, %reason, "forward failed");
                for first_page in pages {
                    repl.mirror_failed(volume, epoch, *first_page, &target.server)
                        .await?;
                }
            }
        }
    }
    Ok(())
}

/// The region locks a write or a copy takes, dropped from the table when
/// nobody holds them any more.
struct RegionLocks<'a> {
    repl: &'a Replication,
    volume: VolumeId,
    regions: Range<u64>,
    locks: Vec<RegionLock>,
}

impl<'a> RegionLocks<'a> {
    fn new(repl: &'a Replication, volume: VolumeId, regions: Range<u64>) -> Self {
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

/// FLUSH as a primary: locally and on every mirror this server forwards to.
pub async fn primary_flush(
    service: &Service,
    volume: &Volume,
    admission: Admission<'_>,
) -> Result<(), Refusal> {
    let repl = &service.replication;
    let epoch = admission.epoch;
    // Each mirror once, with every partition it mirrors for us (a failure
    // is reported for each of them).
    let mut targets: Vec<(Replica, Vec<u64>)> = Vec::new();
    if let Some(map) = admission.placement.map() {
        for p in map.partitions.iter().filter(|p| repl.leads(p)) {
            for r in p.replicas.iter().skip(1) {
                if r.state == MirrorState::OutOfSync
                    || repl.written_off(volume.id, &r.server, p.first_page)
                {
                    continue;
                }
                match targets.iter_mut().find(|(t, _)| t.server == r.server) {
                    Some((_, pages)) => pages.push(p.first_page),
                    None => targets.push((r.clone(), vec![p.first_page])),
                }
            }
        }
    }
    let request = Request::new(Opcode::Flush, volume.id, epoch, 0, 0, 0);
    let local = service.store.flush();
    let remote = join_all(targets.iter().map(|(t, pages)| {
        repl.forward(
            (volume.id, pages[0]),
            t,
            &request,
            Forward::Client,
            Bytes::new(),
        )
    }));
    let (local, remote) = futures_util::future::join(local, remote).await;
    drop(admission);
    local.map_err(|e| io_refusal(volume, &e))?;
    let outcomes = targets
        .iter()
        .zip(remote)
        .map(|((t, pages), o)| (t, pages.as_slice(), o));
    settle(repl, volume.id, epoch, outcomes).await
}

/// Apply a write forwarded by the primary: set bits for every other replica
/// (unless it is a resync copy), then write.
pub async fn mirror_write(
    service: &Service,
    volume: &Volume,
    admission: &Admission<'_>,
    request: &Request,
    payload: Option<AlignedBuf>,
) -> Result<(), Refusal> {
    let repl = &service.replication;
    if request.flags & FLAG_RESYNC == 0
        && let Some(p) = admission.partition(Part::Mirror)
    {
        let others: Vec<&str> = p
            .replicas
            .iter()
            .map(|r| r.server.as_str())
            .filter(|s| *s != repl.me)
            .collect();
        let regions = repl.regions_of(request.offset, u64::from(request.length));
        service
            .store
            .mark_dirty(volume.id, &others, regions)
            .await
            .map_err(|e| io_refusal(volume, &e))?;
    }
    apply_local(service, volume, request, payload).await
}

async fn apply_local(
    service: &Service,
    volume: &Volume,
    request: &Request,
    payload: Option<AlignedBuf>,
) -> Result<(), Refusal> {
    let store = &service.store;
    match (request.opcode, payload) {
        (Opcode::Write, Some(data)) => {
            store
                .write(volume, request.offset, data, request.fua())
                .await
        }
        (Opcode::Trim | Opcode::WriteZeroes, _) => {
            store.zero(volume, request.offset, request.length).await
        }
        _ => Ok(()),
    }
}

fn io_refusal(volume: &Volume, e: &crate::EngineError) -> Refusal {
    warn!(volume = %volume.id, error = %e, "replication I/O failed");
    Refusal::new(
        volume.epoch(),
        Refused::Io {
            error: e.to_string(),
        },
    )
}

/// The management-protocol requests storage servers send each other.
pub async fn handle_peer_request(
    service: &Service,
    sender: &PeerIdentity,
    request: MgmtRequest,
) -> MgmtReply {
    let store = &service.store;
    let repl = &service.replication;
    match request {
        MgmtRequest::DirtyRegions { volume, peer } => {
            let all = store.volume(volume).is_none_or(|v| v.needs_full_copy());
            // What `peer` may lack of ours, and what this replica itself lacks.
            let mut regions = store.dirty_regions(volume, &peer);
            regions.extend(store.dirty_regions(volume, &repl.me));
            regions.sort_unstable();
            regions.dedup();
            MgmtReply::Regions {
                all,
                regions: coarsen(region_runs(&regions), MAX_REGION_RUNS),
                region_size: repl.region_size(),
            }
        }
        MgmtRequest::Clean {
            volume,
            epoch,
            first_page,
            peers,
            regions,
            region_size,
        } => match clean_for(
            service,
            sender,
            volume,
            epoch,
            first_page,
            &peers,
            &regions,
            region_size,
        )
        .await
        {
            Ok(()) => MgmtReply::Applied { epoch },
            Err(refusal) => MgmtReply::Refused(refusal),
        },
        other => MgmtReply::Refused(MgmtRefusal::Invalid {
            reason: format!("a storage server does not serve {}", other.operation()),
        }),
    }
}

/// Apply a `Clean` from `sender`: only from the partition's primary, at the
/// volume's current epoch (under its gate), and only inside the partition.
#[allow(clippy::too_many_arguments)]
async fn clean_for(
    service: &Service,
    sender: &PeerIdentity,
    volume: VolumeId,
    epoch: Epoch,
    first_page: u64,
    peers: &[String],
    regions: &[(u64, u64)],
    region_size: u32,
) -> Result<(), MgmtRefusal> {
    let repl = &service.replication;
    let held = service
        .store
        .volume(volume)
        .ok_or_else(|| MgmtRefusal::NotFound {
            kind: "volume".into(),
            name: volume.to_string(),
        })?;
    let _gate = held.hold().await;
    if !EpochVerdict::judge(held.epoch(), epoch).is_current() {
        return Err(MgmtRefusal::StaleEpoch {
            request: epoch,
            current: held.epoch(),
        });
    }
    let map = held.map().ok_or_else(|| MgmtRefusal::Unavailable {
        reason: "no map yet".into(),
    })?;
    let partition = map
        .partition_starting_at(first_page)
        .filter(|p| p.replicas.first().is_some_and(|r| r.server == sender.name))
        .ok_or_else(|| MgmtRefusal::Invalid {
            reason: format!("{} is not the primary of pages {first_page}..", sender.name),
        })?;
    // Ours wholly inside the sender's regions and inside the partition: a
    // region shared with a neighbour partition keeps its bits.
    let page = u64::from(map.page_size);
    let start = first_page.saturating_mul(page);
    let end = partition.end_page.saturating_mul(page).min(map.size);
    let limit = start.div_ceil(repl.region_size)..end / repl.region_size;
    let mine = convert_runs(
        regions,
        region_size,
        repl.region_size,
        &limit,
        Cover::Inside,
    );
    // Bits under this server's own name are what it lacks itself.
    for peer in peers {
        service
            .store
            .clear_dirty_runs(volume, peer, &mine)
            .await
            .map_err(|e| MgmtRefusal::Unavailable {
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

/// How to map another server's regions onto ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover {
    /// Our regions wholly inside theirs (to clear bits: never too many).
    Inside,
    /// Our regions touching theirs (to copy: never too few).
    Touching,
}

/// Runs of regions of `theirs` bytes as merged runs of our regions of
/// `ours` bytes, within `limit`. Saturating: the runs come from the network;
/// the result has at most as many runs as the input, whatever their length.
fn convert_runs(
    runs: &[(u64, u64)],
    theirs: u32,
    ours: u64,
    limit: &Range<u64>,
    cover: Cover,
) -> Vec<Range<u64>> {
    let theirs = u64::from(theirs.max(1));
    let ours = ours.max(1);
    let mut out = Vec::new();
    for (first, end) in runs {
        let (start, stop) = (first.saturating_mul(theirs), end.saturating_mul(theirs));
        let (from, to) = match cover {
            Cover::Inside => (start.div_ceil(ours), stop / ours),
            Cover::Touching => (start / ours, stop.div_ceil(ours)),
        };
        let (from, to) = (from.max(limit.start), to.min(limit.end));
        if from < to {
            out.push(from..to);
        }
    }
    merge_runs(out)
}

/// The most runs a `DirtyRegions` answer carries (well inside a frame).
const MAX_REGION_RUNS: usize = 100_000;

/// At most `max` runs covering `runs`: neighbours are joined across ever
/// larger gaps. Covering more is safe where it is used (what to copy).
fn coarsen(mut runs: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    let mut gap = 1u64;
    while runs.len() > max.max(1) {
        let mut joined: Vec<(u64, u64)> = Vec::with_capacity(runs.len() / 2 + 1);
        for (first, end) in runs {
            match joined.last_mut() {
                Some(last) if first.saturating_sub(last.1) <= gap => last.1 = last.1.max(end),
                _ => joined.push((first, end)),
            }
        }
        runs = joined;
        gap = gap.saturating_mul(2);
    }
    runs
}

/// Sort and merge overlapping or touching runs.
fn merge_runs(mut runs: Vec<Range<u64>>) -> Vec<Range<u64>> {
    runs.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(runs.len());
    for run in runs {
        match merged.last_mut() {
            Some(last) if run.start <= last.end => last.end = last.end.max(run.end),
            _ => merged.push(run),
        }
    }
    merged
}

/// Sorted regions as runs.
fn runs_of(regions: impl IntoIterator<Item = u64>) -> Vec<Range<u64>> {
    merge_runs(regions.into_iter().map(|r| r..r + 1).collect())
}

/// The background loop of a storage server's replication: clean bits and
/// start the resyncs that are due.
pub async fn replication_loop(service: Rc<Service>) {
    let interval = service.replication.settings.clean_interval;
    loop {
        tokio::time::sleep(interval).await;
        schedule(&service);
        clean(&service).await;
    }
}

/// Start the resyncs that are due: mirrors being resynced, and in-sync
/// mirrors with regions to copy or bits to ask for.
fn schedule(service: &Rc<Service>) {
    let repl = &service.replication;
    for (volume, p, range) in repl.led(service) {
        for peer in p.replicas.iter().skip(1) {
            let key = (volume.id, peer.server.clone(), p.first_page);
            let pending = repl
                .must_copy
                .borrow()
                .get(&(volume.id, peer.server.clone()))
                .is_some_and(|s| s.range(range.clone()).next().is_some())
                || repl.probe.borrow().contains(&key);
            let due = peer.state == MirrorState::Resyncing
                || (peer.state == MirrorState::InSync && pending);
            if due && !repl.resyncs.borrow().contains_key(&key) {
                let resync = Rc::new(Resync {
                    total: Cell::new(0),
                    copied: Cell::new(0),
                    started: Instant::now(),
                });
                repl.resyncs
                    .borrow_mut()
                    .insert(key.clone(), resync.clone());
                let service = service.clone();
                tokio_uring::spawn(async move {
                    resync_partition(&service, &key, &resync).await;
                    service.replication.resyncs.borrow_mut().remove(&key);
                });
            }
        }
    }
}

/// Whether `region` may be cleared for `peer`: quiet since `stamp`, and not
/// owed a copy.
fn clearable(repl: &Replication, volume: VolumeId, peer: &str, region: u64, stamp: u64) -> bool {
    repl.quiet(volume, region) == Some(stamp)
        && !repl
            .must_copy
            .borrow()
            .get(&(volume, peer.to_string()))
            .is_some_and(|s| s.contains(&region))
}

/// One cleaning pass: flush here and on the mirrors, then clear the bits of
/// regions that no write touched meanwhile, here and on the mirrors.
async fn clean(service: &Service) {
    let repl = &service.replication;
    let store = &service.store;
    repl.next_pass();
    let _watch = repl.watch();
    let mut work = Vec::new();
    for (volume, p, range) in repl.led(service) {
        for peer in p.replicas.iter().skip(1) {
            // Only in-sync mirrors: a resyncing one may still lack regions
            // whose bits are set (its resync clears them as it copies).
            if peer.state != MirrorState::InSync
                || repl.written_off(volume.id, &peer.server, p.first_page)
            {
                continue;
            }
            let mut snapshot = Vec::new();
            for r in store.dirty_regions(volume.id, &peer.server) {
                if !range.contains(&r) {
                    continue;
                }
                // Recently written regions keep their bits: the next write
                // would only set them again, at the cost of a metadata write.
                if !repl.region_cold(volume.id, r) {
                    continue;
                }
                if let Some(stamp) = repl.quiet(volume.id, r) {
                    snapshot.push((r, stamp));
                }
            }
            if !snapshot.is_empty() {
                work.push((volume.clone(), p.clone(), peer.clone(), snapshot));
            }
        }
    }
    if work.is_empty() {
        return;
    }
    if let Err(e) = store.flush().await {
        warn!(error = %e, "flush before cleaning bits failed");
        return;
    }
    for (volume, partition, peer, snapshot) in work {
        let epoch = volume.epoch();
        let flush = Request::new(Opcode::Flush, volume.id, epoch, 0, 0, 0);
        let key = (volume.id, partition.first_page);
        if repl
            .forward(key, &peer, &flush, Forward::Client, Bytes::new())
            .await
            .is_err()
        {
            continue;
        }
        let clean: Vec<u64> = snapshot
            .iter()
            .filter(|(r, stamp)| clearable(repl, volume.id, &peer.server, *r, *stamp))
            .map(|(r, _)| *r)
            .collect();
        if clean.is_empty() {
            continue;
        }
        if let Err(e) = store.clear_dirty(volume.id, &peer.server, &clean).await {
            warn!(error = %e, "cannot clear bits");
            continue;
        }
        let holders = [repl.me.clone(), peer.server.clone()];
        tell_clean(repl, volume.id, epoch, &partition, &holders, &clean).await;
    }
}

/// Tell the other replicas of `partition` that `regions` are equal on `holders`.
async fn tell_clean(
    repl: &Replication,
    volume: VolumeId,
    epoch: Epoch,
    partition: &Partition,
    holders: &[String],
    regions: &[u64],
) {
    let request = MgmtRequest::Clean {
        volume,
        epoch,
        first_page: partition.first_page,
        peers: holders.to_vec(),
        regions: region_runs(regions),
        region_size: repl.region_size(),
    };
    let others = partition
        .replicas
        .iter()
        .filter(|r| r.server != repl.me && r.state != MirrorState::OutOfSync);
    let sent =
        join_all(others.map(|r| async { (r.server.clone(), repl.call_peer(r, &request).await) }))
            .await;
    for (server, reply) in sent {
        if !matches!(reply, Ok(MgmtReply::Applied { .. })) {
            debug!(peer = %server, ?reply, "clean not applied; its bits stay set");
        }
    }
}

/// The current map, if this server still leads partition `first_page` and
/// `peer` still is a mirror of it that is not out of sync.
fn still_leading(
    service: &Service,
    volume: VolumeId,
    first_page: u64,
    peer: &str,
) -> Option<(Rc<Volume>, Rc<VolumeMap>, Partition, Replica)> {
    let v = service.store.volume(volume)?;
    let map = v.map()?;
    let p = map.partition_starting_at(first_page)?.clone();
    if !service.replication.leads(&p) {
        return None;
    }
    let r = p
        .replicas
        .iter()
        .skip(1)
        .find(|r| r.server == peer)?
        .clone();
    if r.state == MirrorState::OutOfSync {
        return None;
    }
    Some((v, map, p, r))
}

/// Copy to `peer` every region it may lack in one partition.
async fn resync_partition(service: &Service, key: &MirrorKey, progress: &Resync) {
    let repl = &service.replication;
    let (volume_id, peer_name, first_page) = (key.0, key.1.as_str(), key.2);
    let Some((_, map, partition, peer)) = still_leading(service, volume_id, first_page, peer_name)
    else {
        return;
    };
    let resyncing = peer.state == MirrorState::Resyncing;
    let range = repl.partition_regions(&map, &partition);
    let mut todo: Vec<Range<u64>> = repl
        .must_copy
        .borrow()
        .get(&(volume_id, peer_name.to_string()))
        .map(|s| runs_of(s.range(range.clone()).copied()))
        .unwrap_or_default();
    let probing = repl.probe.borrow().contains(key);
    if resyncing || probing {
        // Ours for the mirror (while it was away), and the mirror's for us
        // or for itself (writes that reached it only; what a wiped disk lacks).
        if resyncing {
            todo.extend(runs_of(
                service
                    .store
                    .dirty_regions(volume_id, peer_name)
                    .into_iter()
                    .filter(|r| range.contains(r)),
            ));
        }
        let ask = MgmtRequest::DirtyRegions {
            volume: volume_id,
            peer: repl.me.clone(),
        };
        match repl.call_peer(&peer, &ask).await {
            Ok(MgmtReply::Regions {
                all,
                regions,
                region_size,
            }) => {
                if all {
                    todo.push(range.clone());
                } else {
                    todo.extend(convert_runs(
                        &regions,
                        region_size,
                        repl.region_size,
                        &range,
                        Cover::Touching,
                    ));
                }
                repl.probe.borrow_mut().remove(key);
            }
            other => {
                debug!(
                    peer = peer_name,
                    ?other,
                    "cannot fetch the mirror's bits; retrying later"
                );
                return;
            }
        }
    }
    let todo = merge_runs(todo);
    let total: u64 = todo.iter().map(|r| r.end - r.start).sum();
    progress.total.set(total);
    if total == 0 && !resyncing {
        return;
    }
    info!(volume = %volume_id, mirror = peer_name, first_page, regions = total, "resync started");
    let started = Instant::now();
    let mut copied_bytes = 0u64;
    let mut regions = todo.into_iter().flatten().peekable();
    while regions.peek().is_some() {
        let _watch = repl.watch();
        let mut copied = Vec::with_capacity(RESYNC_BATCH);
        for region in regions.by_ref().take(RESYNC_BATCH) {
            // Rate limit: never ahead of the configured bytes per second.
            let due = Duration::from_secs_f64(
                copied_bytes as f64 / repl.settings.resync_rate.max(1) as f64,
            );
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            match copy_region(service, volume_id, first_page, peer_name, region).await {
                Ok((bytes, stamp)) => {
                    copied_bytes += bytes;
                    repl.resynced_bytes.set(repl.resynced_bytes.get() + bytes);
                    progress.copied.set(progress.copied.get() + 1);
                    copied.push((region, stamp));
                }
                Err(ForwardError::Behind(epoch)) => {
                    debug!(volume = %volume_id, mirror = peer_name, %epoch, "resync paused: an epoch change is under way");
                    return;
                }
                Err(reason) => {
                    warn!(volume = %volume_id, mirror = peer_name, region, %reason, "resync stopped");
                    if let Some((v, _, _, _)) =
                        still_leading(service, volume_id, first_page, peer_name)
                    {
                        let _ = repl
                            .mirror_failed(volume_id, v.epoch(), first_page, peer_name)
                            .await;
                    }
                    return;
                }
            }
        }
        if !finish_batch(service, key, &copied).await {
            return;
        }
    }
    if resyncing {
        report_resync_done(service, volume_id, first_page, peer_name).await;
    }
    info!(volume = %volume_id, mirror = peer_name, first_page, bytes = copied_bytes, secs = started.elapsed().as_secs_f64(), "resync finished");
}

/// Copy one region (its part inside the partition) to `peer`; returns the
/// bytes copied and the region's write stamp at the copy (`None` if a write
/// was waiting on it: then its bits must not clear).
async fn copy_region(
    service: &Service,
    volume_id: VolumeId,
    first_page: u64,
    peer_name: &str,
    region: u64,
) -> Result<(u64, Option<u64>), ForwardError> {
    let repl = &service.replication;
    let (volume, map, partition, peer) =
        still_leading(service, volume_id, first_page, peer_name).ok_or(ForwardError::NotLeading)?;
    let _gate = volume.hold().await;
    let locks = RegionLocks::new(repl, volume_id, region..region + 1);
    let _exclusive = locks.locks[0].write().await;
    let page = u64::from(map.page_size);
    let start = (region * repl.region_size).max(partition.first_page * page);
    let end = ((region + 1) * repl.region_size)
        .min(partition.end_page * page)
        .min(volume.record().size);
    let stamp = repl.quiet(volume_id, region);
    if start >= end {
        return Ok((0, stamp));
    }
    let len = (end - start) as u32;
    let pieces = service
        .store
        .read(&volume, start, len)
        .await
        .map_err(|r| ForwardError::LocalRead(r.reason.to_string()))?;
    let zero = pieces.iter().all(|piece| match piece {
        ReadPiece::Data(buf) => buf.iter().all(|b| *b == 0),
        ReadPiece::Zeroes(_) => true,
    });
    let mut data = Vec::new();
    let request = if zero {
        Request::new(
            Opcode::WriteZeroes,
            volume_id,
            volume.epoch(),
            start,
            len,
            0,
        )
    } else {
        for piece in &pieces {
            match piece {
                ReadPiece::Data(buf) => data.extend_from_slice(buf),
                ReadPiece::Zeroes(n) => data.resize(data.len() + n, 0),
            }
        }
        Request::write(volume_id, volume.epoch(), start, &data, 0)
            .map_err(ForwardError::InvalidCopy)?
    };
    repl.forward(
        (volume_id, first_page),
        &peer,
        &request,
        Forward::Resync,
        Bytes::from(data),
    )
    .await?;
    Ok((u64::from(len), stamp))
}

/// After a batch: flush the mirror, then clear the bits of the copied
/// regions that no write touched since, here and on the other replicas.
/// False if the mirror is gone.
async fn finish_batch(service: &Service, key: &MirrorKey, copied: &[(u64, Option<u64>)]) -> bool {
    let repl = &service.replication;
    let (volume_id, peer_name, first_page) = (key.0, key.1.as_str(), key.2);
    let Some((volume, _, partition, peer)) =
        still_leading(service, volume_id, first_page, peer_name)
    else {
        return false;
    };
    let epoch = volume.epoch();
    let flush = Request::new(Opcode::Flush, volume_id, epoch, 0, 0, 0);
    if let Err(reason) = repl
        .forward(
            (volume_id, first_page),
            &peer,
            &flush,
            Forward::Client,
            Bytes::new(),
        )
        .await
    {
        warn!(mirror = peer_name, %reason, "flush after resync batch failed");
        return false;
    }
    // The copy paid the debt only where no write came after it.
    let clean: Vec<u64> = copied
        .iter()
        .filter_map(|(r, stamp)| Some((*r, (*stamp)?)))
        .filter(|(r, stamp)| repl.quiet(volume_id, *r) == Some(*stamp))
        .map(|(r, _)| r)
        .collect();
    if let Some(owed) = repl
        .must_copy
        .borrow_mut()
        .get_mut(&(volume_id, peer_name.to_string()))
    {
        for r in &clean {
            owed.remove(r);
        }
    }
    if let Err(e) = service
        .store
        .clear_dirty(volume_id, peer_name, &clean)
        .await
    {
        warn!(error = %e, "cannot clear bits after resync");
        return false;
    }
    let holders = [repl.me.clone(), peer_name.to_string()];
    tell_clean(repl, volume_id, epoch, &partition, &holders, &clean).await;
    true
}

/// Tell the management server the mirror is in sync; retried until it is
/// recorded or the map moves on.
async fn report_resync_done(service: &Service, volume_id: VolumeId, first_page: u64, peer: &str) {
    let repl = &service.replication;
    for attempt in 0..20u32 {
        let Some((volume, _, _, r)) = still_leading(service, volume_id, first_page, peer) else {
            return;
        };
        if r.state != MirrorState::Resyncing {
            return;
        }
        let request = MgmtRequest::ResyncDone {
            volume: volume_id,
            epoch: volume.epoch(),
            first_page,
            server: peer.to_string(),
        };
        match repl.call_mgmt(&request).await {
            Ok(MgmtReply::Applied { .. }) => return,
            other => debug!(attempt, ?other, "resync completion not recorded yet"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn runs_convert_between_region_sizes_conservatively() {
        let all = 0..u64::MAX;
        // Their 128 KiB region 1 is our 64 KiB regions 2 and 3.
        let inside = convert_runs(&[(1, 2)], 128 << 10, 64 << 10, &all, Cover::Inside);
        assert_eq!(inside, vec![2..4]);
        // Their 64 KiB region 3 is half of our 128 KiB region 1: copy it, never clear it.
        let touching = convert_runs(&[(3, 4)], 64 << 10, 128 << 10, &all, Cover::Touching);
        assert_eq!(touching, vec![1..2]);
        assert!(convert_runs(&[(3, 4)], 64 << 10, 128 << 10, &all, Cover::Inside).is_empty());
        // Hostile numbers neither overflow nor reach past the limit.
        let hostile = [(0, u64::MAX), (u64::MAX - 1, u64::MAX)];
        let limited = convert_runs(&hostile, u32::MAX, 64 << 10, &(5..9), Cover::Touching);
        assert_eq!(limited, vec![5..9]);
        assert_eq!(
            convert_runs(&hostile, 0, 64 << 10, &(0..3), Cover::Inside),
            vec![0..3]
        );
        // A run of 2^44 regions stays one run.
        let huge = convert_runs(&[(0, 1 << 44)], 65536, 65536, &all, Cover::Inside);
        assert_eq!(huge, vec![0..1 << 44]);
    }

    #[test]
    fn coarsened_runs_cover_what_they_replace() {
        let runs: Vec<(u64, u64)> = (0..1000).map(|i| (i * 3, i * 3 + 1)).collect();
        let coarse = coarsen(runs.clone(), 10);
        assert!(coarse.len() <= 10, "{}", coarse.len());
        for (first, end) in runs {
            assert!(coarse.iter().any(|(a, b)| *a <= first && end <= *b));
        }
        assert_eq!(coarsen(vec![(1, 2)], 10), vec![(1, 2)]);
    }

    #[test]
    fn runs_merge() {
        assert_eq!(merge_runs(vec![5..7, 1..2, 2..3, 6..9]), vec![1..3, 5..9]);
        assert_eq!(runs_of([1, 2, 3, 7]), vec![1..4, 7..8]);
    }
}
