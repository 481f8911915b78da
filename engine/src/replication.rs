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

use futures_util::future::join_all;
use tessera_net::proto::{
    Epoch, FLAG_REPLICA, FLAG_RESYNC, MgmtReply, MgmtRequest, MirrorReport, MirrorState, Opcode,
    Partition, Refusal as MgmtRefusal, Replica, Request, ResyncProgress, Role, Status, VolumeId,
    VolumeMap, region_runs,
};
use tessera_net::quic::{Alpn, Connector, Endpoint};
use tokio::sync::{OnceCell, RwLock};
use tracing::{debug, info, warn};

use crate::aligned::AlignedBuf;
use crate::server::Service;
use crate::store::{Admitted, ReadPiece, Refusal, Volume, partition_of};

/// Regions copied between two cleaning steps of a resync.
const RESYNC_BATCH: usize = 64;

/// Replication settings (from the storage config).
#[derive(Debug, Clone)]
pub struct ReplicationSettings {
    pub forward_timeout: Duration,
    pub resync_rate: u64,
    pub clean_interval: Duration,
    /// The management server, to report mirror failures and resyncs to.
    pub mgmt: Option<(SocketAddr, String)>,
}

/// What a region has in flight: writers now, and a stamp of the last write.
#[derive(Debug, Default, Clone, Copy)]
struct RegionUse {
    writers: u32,
    generation: u64,
}

/// A mirror this server failed to forward to, and the outcome of reporting it.
#[derive(Debug, Default)]
struct Failure {
    reported: OnceCell<Result<(), MgmtRefusal>>,
    /// Wakes forwards still waiting on the mirror: they give up at once.
    signal: tokio::sync::Notify,
}

/// Why a forward did not succeed.
#[derive(Debug)]
enum ForwardError {
    /// The mirror holds a newer epoch: this server's map is behind (a push
    /// to it is on the way). Not the mirror's fault.
    Behind(Epoch),
    /// The mirror did not take the request.
    Failed(String),
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardError::Behind(epoch) => write!(f, "the mirror is at the newer epoch {epoch}"),
            ForwardError::Failed(reason) => f.write_str(reason),
        }
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
    locks: RefCell<HashMap<(VolumeId, u64), RegionLock>>,
    failures: RefCell<HashMap<PeerKey, Rc<Failure>>>,
    /// Regions the primary must copy to a peer before their bits may clear.
    must_copy: RefCell<HashMap<PeerKey, BTreeSet<u64>>>,
    /// Partitions this server leads, as of the last map applied.
    leading: RefCell<HashSet<(VolumeId, u64)>>,
    resyncs: RefCell<HashMap<(VolumeId, String, u64), Rc<Resync>>>,
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
        let mut map = self.replication.regions.borrow_mut();
        for r in self.regions.clone() {
            if let Some(u) = map.get_mut(&(self.volume, r)) {
                u.writers = u.writers.saturating_sub(1);
            }
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
            locks: RefCell::default(),
            failures: RefCell::default(),
            must_copy: RefCell::default(),
            leading: RefCell::default(),
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
        }
        InFlight {
            replication: self,
            volume,
            regions,
        }
    }

    /// The last write stamp of a region, if no write is in flight on it.
    fn quiet(&self, volume: VolumeId, region: u64) -> Option<u64> {
        match self.regions.borrow().get(&(volume, region)) {
            Some(u) if u.writers > 0 => None,
            Some(u) => Some(u.generation),
            None => Some(0),
        }
    }

    /// Forget stamps of quiet regions (they matter only between a snapshot and a clear).
    fn forget_quiet(&self, volume: VolumeId, regions: &[u64], stamps: &[u64]) {
        let mut map = self.regions.borrow_mut();
        for (r, stamp) in regions.iter().zip(stamps) {
            if map
                .get(&(volume, *r))
                .is_some_and(|u| u.writers == 0 && u.generation == *stamp)
            {
                map.remove(&(volume, *r));
            }
        }
    }

    fn lock(&self, volume: VolumeId, region: u64) -> Rc<RwLock<()>> {
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

    /// Whether forwarding to `server` failed and its loss is on record.
    fn written_off(&self, volume: VolumeId, server: &str) -> bool {
        self.failures
            .borrow()
            .get(&(volume, server.to_string()))
            .is_some_and(|f| matches!(f.reported.get(), Some(Ok(()))))
    }

    /// A map for `volume` was applied. Failures recorded under the old one
    /// are settled. Partitions this server leads now but did not before
    /// (it was promoted, or it restarted) may hold writes that reached some
    /// replicas only: the regions its bits name are copied to the in-sync
    /// mirrors before those bits may clear.
    pub fn map_changed(&self, service: &Service, volume: VolumeId) {
        self.failures.borrow_mut().retain(|(v, _), _| *v != volume);
        let Some(map) = service.store.volume(volume).and_then(|v| v.map()) else {
            return;
        };
        let mut leading = self.leading.borrow_mut();
        let before: HashSet<u64> = leading
            .iter()
            .filter(|(v, _)| *v == volume)
            .map(|(_, p)| *p)
            .collect();
        leading.retain(|(v, _)| *v != volume);
        for p in &map.partitions {
            if p.replicas.first().map(|r| &r.server) != Some(&self.me) {
                continue;
            }
            leading.insert((volume, p.first_page));
            if before.contains(&p.first_page) {
                continue;
            }
            let range = self.partition_regions(&map, p);
            for peer in p.replicas.iter().skip(1) {
                let ours: Vec<u64> = service
                    .store
                    .dirty_regions(volume, &peer.server)
                    .into_iter()
                    .filter(|r| range.contains(r))
                    .collect();
                if !ours.is_empty() {
                    info!(volume = %volume, mirror = %peer.server, regions = ours.len(), "leading a partition: its bits name regions a write may have left unequal");
                    self.must_copy
                        .borrow_mut()
                        .entry((volume, peer.server.clone()))
                        .or_default()
                        .extend(ours);
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
        volume: VolumeId,
        target: &Replica,
        request: &Request,
        payload: &[u8],
    ) -> Result<(), ForwardError> {
        let failure = self
            .failures
            .borrow_mut()
            .entry((volume, target.server.clone()))
            .or_default()
            .clone();
        let abandoned = failure.signal.notified();
        let deadline = Instant::now() + self.settings.forward_timeout;
        let attempt = async {
            loop {
                let mut forwarded = *request;
                forwarded.flags |= FLAG_REPLICA;
                forwarded.request_id = self.next_request_id();
                let failed = |e: tessera_net::quic::QuicError| ForwardError::Failed(e.to_string());
                let conn = self
                    .data
                    .get(target.addr, &target.server)
                    .await
                    .map_err(failed)?;
                let (reply, message) = conn.data(&forwarded, payload).await.map_err(failed)?;
                match reply.status {
                    Status::Ok => return Ok(()),
                    // The mirror has not applied the new map yet: it is being pushed.
                    Status::StaleEpoch
                        if reply.epoch < request.epoch && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Status::StaleEpoch if reply.epoch > request.epoch => {
                        return Err(ForwardError::Behind(reply.epoch));
                    }
                    status => {
                        return Err(ForwardError::Failed(format!(
                            "{status:?}: {}",
                            String::from_utf8_lossy(&message)
                        )));
                    }
                }
            }
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout_at(deadline.into(), attempt) => {
                r.unwrap_or_else(|_| Err(ForwardError::Failed(format!("no answer within {:?}", self.settings.forward_timeout))))
            }
            () = abandoned => Err(ForwardError::Failed("mirror written off".into())),
        };
        if matches!(outcome, Err(ForwardError::Failed(_))) {
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
        let key = (volume, server.to_string());
        let failure = {
            let mut failures = self.failures.borrow_mut();
            // A report that failed earlier is tried again.
            if failures
                .get(&key)
                .is_some_and(|f| matches!(f.reported.get(), Some(Err(_))))
            {
                failures.remove(&key);
            }
            failures.entry(key).or_default().clone()
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
                    Err(reason) => Err(MgmtRefusal::Unavailable { reason }),
                }
            })
            .await
            .clone();
        result.map_err(|refusal| match refusal {
            MgmtRefusal::StaleEpoch { current, .. } => Refusal {
                status: Status::StaleEpoch,
                epoch: current,
                message: format!("mirror {server} failed and the map changed meanwhile"),
            },
            other => Refusal {
                status: Status::Unavailable,
                epoch,
                message: format!("mirror {server} failed and its loss is not recorded: {other}"),
            },
        })
    }

    async fn call_mgmt(&self, request: &MgmtRequest) -> Result<MgmtReply, String> {
        let (addr, name) = self
            .settings
            .mgmt
            .clone()
            .ok_or("no management server configured")?;
        let reply = tokio::time::timeout(Duration::from_secs(10), async {
            let conn = self.mgmt.get(addr, &name).await?;
            conn.mgmt(request).await
        })
        .await;
        match reply {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                self.mgmt.forget(addr);
                Err(e.to_string())
            }
            Err(_) => {
                self.mgmt.forget(addr);
                Err("the management server did not answer".into())
            }
        }
    }

    async fn call_peer(&self, peer: &Replica, request: &MgmtRequest) -> Result<MgmtReply, String> {
        let reply = tokio::time::timeout(self.settings.forward_timeout * 2, async {
            let conn = self.peers.get(peer.addr, &peer.server).await?;
            conn.mgmt(request).await
        })
        .await;
        match reply {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                self.peers.forget(peer.addr);
                Err(e.to_string())
            }
            Err(_) => {
                self.peers.forget(peer.addr);
                Err(format!("{} did not answer", peer.server))
            }
        }
    }

    /// Bitmask counts and resync progress of the partitions this server leads.
    pub fn reports(&self, service: &Service) -> Vec<MirrorReport> {
        let mut out = Vec::new();
        for volume in service.store.volumes() {
            let Some(map) = volume.map() else { continue };
            for p in &map.partitions {
                if p.replicas.first().map(|r| &r.server) != Some(&self.me) {
                    continue;
                }
                let range = self.partition_regions(&map, p);
                for peer in p.replicas.iter().skip(1) {
                    let dirty = service
                        .store
                        .dirty_regions(volume.id, &peer.server)
                        .into_iter()
                        .filter(|r| range.contains(r))
                        .count() as u64;
                    let resync = self
                        .resyncs
                        .borrow()
                        .get(&(volume.id, peer.server.clone(), p.first_page))
                        .map(|r| {
                            let secs = r.started.elapsed().as_secs_f64().max(0.001);
                            ResyncProgress {
                                total_regions: r.total.get(),
                                copied_regions: r.copied.get(),
                                bytes_per_sec: (r.copied.get() as f64 * self.region_size as f64
                                    / secs) as u64,
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
        }
        out
    }

    pub fn resynced_bytes(&self) -> u64 {
        self.resynced_bytes.get()
    }
}

/// Execute an admitted write, trim or write-zeroes as the partition's
/// primary: intent bits, local I/O and forwarding in parallel. The epoch
/// gate (`admitted`) is let go once the I/O is done: waiting for the
/// management server to record a lost mirror must not hold up a map push.
pub async fn primary_write(
    service: &Service,
    volume: &Volume,
    admitted: Admitted<'_>,
    request: &Request,
    payload: Option<AlignedBuf>,
) -> Result<(), Refusal> {
    let store = &service.store;
    let repl = &service.replication;
    let epoch = volume.epoch();
    let map = volume.map().ok_or_else(|| Refusal {
        status: Status::Unavailable,
        epoch,
        message: "no map yet".into(),
    })?;
    let page = request.offset / u64::from(map.page_size);
    let Some(partition) = partition_of(&map, page) else {
        return Err(Refusal {
            status: Status::NotOwner,
            epoch,
            message: format!("page {page} is in no partition"),
        });
    };
    let peers: Vec<&Replica> = partition.replicas.iter().skip(1).collect();
    if peers.is_empty() {
        return apply_local(service, volume, request, payload).await;
    }
    let regions = repl.regions_of(request.offset, u64::from(request.length));
    let in_flight = repl.begin(volume.id, regions.clone());
    let locks: Vec<Rc<RwLock<()>>> = regions.clone().map(|r| repl.lock(volume.id, r)).collect();
    let mut guards = Vec::with_capacity(locks.len());
    for lock in &locks {
        guards.push(lock.read().await);
    }
    let names: Vec<&str> = peers.iter().map(|r| r.server.as_str()).collect();
    store
        .mark_dirty(volume.id, &names, regions.clone())
        .await
        .map_err(|e| io_refusal(volume, &e))?;
    let targets: Vec<&Replica> = peers
        .iter()
        .copied()
        .filter(|r| r.state != MirrorState::OutOfSync && !repl.written_off(volume.id, &r.server))
        .collect();
    let bytes = payload.as_ref().map(|p| p.to_vec()).unwrap_or_default();
    let local = apply_local(service, volume, request, payload);
    let remote = join_all(
        targets
            .iter()
            .map(|t| repl.forward(volume.id, t, request, &bytes)),
    );
    let (local, remote) = futures_util::future::join(local, remote).await;
    // Replicas that did not take the write must get this region copied
    // before its bits may clear: ours to all mirrors if the local I/O failed.
    let missed: Vec<&str> = if local.is_err() {
        names.clone()
    } else {
        targets
            .iter()
            .zip(&remote)
            .filter(|(_, outcome)| outcome.is_err())
            .map(|(t, _)| t.server.as_str())
            .collect()
    };
    if !missed.is_empty() {
        let mut must = repl.must_copy.borrow_mut();
        for name in missed {
            must.entry((volume.id, name.to_string()))
                .or_default()
                .extend(regions.clone());
        }
    }
    drop(guards);
    drop(locks);
    drop(in_flight);
    repl.unlock_idle(volume.id, regions);
    drop(admitted);
    for (target, outcome) in targets.iter().zip(remote) {
        match outcome {
            Ok(()) => {}
            Err(ForwardError::Behind(current)) => {
                return Err(Refusal {
                    status: Status::StaleEpoch,
                    epoch: current,
                    message: format!("mirror {} holds a newer map", target.server),
                });
            }
            Err(ForwardError::Failed(reason)) => {
                debug!(volume = %volume.id, mirror = %target.server, %reason, "forward failed");
                repl.mirror_failed(volume.id, epoch, partition.first_page, &target.server)
                    .await?;
            }
        }
    }
    local
}

/// FLUSH as a primary: locally and on every mirror this server forwards to.
pub async fn primary_flush(
    service: &Service,
    volume: &Volume,
    admitted: Admitted<'_>,
) -> Result<(), Refusal> {
    let repl = &service.replication;
    let epoch = volume.epoch();
    let mut targets: Vec<(Replica, u64)> = Vec::new();
    if let Some(map) = volume.map() {
        for p in &map.partitions {
            if p.replicas.first().map(|r| &r.server) != Some(&repl.me) {
                continue;
            }
            for r in p.replicas.iter().skip(1) {
                if r.state != MirrorState::OutOfSync
                    && !repl.written_off(volume.id, &r.server)
                    && !targets.iter().any(|(t, _)| t.server == r.server)
                {
                    targets.push((r.clone(), p.first_page));
                }
            }
        }
    }
    let request = Request::new(Opcode::Flush, volume.id, epoch, 0, 0, 0);
    let local = service.store.flush();
    let remote = join_all(
        targets
            .iter()
            .map(|(t, _)| repl.forward(volume.id, t, &request, &[])),
    );
    let (local, remote) = futures_util::future::join(local, remote).await;
    drop(admitted);
    local.map_err(|e| io_refusal(volume, &e))?;
    for ((target, first_page), outcome) in targets.iter().zip(remote) {
        match outcome {
            Ok(()) => {}
            Err(ForwardError::Behind(current)) => {
                return Err(Refusal {
                    status: Status::StaleEpoch,
                    epoch: current,
                    message: format!("mirror {} holds a newer map", target.server),
                });
            }
            Err(ForwardError::Failed(_)) => {
                repl.mirror_failed(volume.id, epoch, *first_page, &target.server)
                    .await?;
            }
        }
    }
    Ok(())
}

/// Apply a write forwarded by the primary: set bits for every other replica
/// (unless it is a resync copy), then write.
pub async fn mirror_write(
    service: &Service,
    volume: &Volume,
    request: &Request,
    payload: Option<AlignedBuf>,
) -> Result<(), Refusal> {
    let repl = &service.replication;
    if request.flags & FLAG_RESYNC == 0
        && let Some(map) = volume.map()
        && let Some(p) = partition_of(&map, request.offset / u64::from(map.page_size))
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
    Refusal {
        status: Status::IoError,
        epoch: volume.epoch(),
        message: e.to_string(),
    }
}

/// The management-protocol requests storage servers send each other.
pub async fn handle_peer_request(service: &Service, request: MgmtRequest) -> MgmtReply {
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
                regions: region_runs(&regions),
                region_size: repl.region_size(),
            }
        }
        MgmtRequest::Clean {
            volume,
            peers,
            regions,
            region_size,
        } => {
            // Clear only regions of ours wholly inside the sender's, and
            // inside the volume (the numbers come from the network).
            let Some(held) = store.volume(volume) else {
                return MgmtReply::Applied { epoch: Epoch(0) };
            };
            let limit = 0..held.record().size.div_ceil(repl.region_size);
            let mine = convert_runs(
                &regions,
                region_size,
                repl.region_size,
                &limit,
                Cover::Inside,
            );
            // Bits under this server's own name are what it lacks itself.
            for peer in &peers {
                if let Err(e) = store.clear_dirty(volume, peer, &mine).await {
                    return MgmtReply::Refused(MgmtRefusal::Unavailable {
                        reason: e.to_string(),
                    });
                }
            }
            MgmtReply::Applied { epoch: Epoch(0) }
        }
        other => MgmtReply::Refused(MgmtRefusal::Invalid {
            reason: format!("a storage server does not serve {}", other.operation()),
        }),
    }
}

/// How to map another server's regions onto ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover {
    /// Our regions wholly inside theirs (to clear bits: never too many).
    Inside,
    /// Our regions touching theirs (to copy: never too few).
    Touching,
}

/// Runs of regions of `theirs` bytes as our regions of `ours` bytes, within
/// `limit`. Saturating: the runs come from the network.
fn convert_runs(
    runs: &[(u64, u64)],
    theirs: u32,
    ours: u64,
    limit: &Range<u64>,
    cover: Cover,
) -> Vec<u64> {
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
            out.extend(from..to);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The background loop of a storage server's replication: clean bits, start
/// resyncs, notice partitions it newly leads.
pub async fn replication_loop(service: Rc<Service>) {
    let interval = service.replication.settings.clean_interval;
    loop {
        tokio::time::sleep(interval).await;
        schedule(&service);
        clean(&service).await;
    }
}

/// Start the resyncs that are due: mirrors being resynced, and in-sync
/// mirrors with regions to copy.
fn schedule(service: &Rc<Service>) {
    let repl = &service.replication;
    for volume in service.store.volumes() {
        let Some(map) = volume.map() else { continue };
        for p in &map.partitions {
            if p.replicas.first().map(|r| &r.server) != Some(&repl.me) {
                continue;
            }
            let range = repl.partition_regions(&map, p);
            for peer in p.replicas.iter().skip(1) {
                let pending = repl
                    .must_copy
                    .borrow()
                    .get(&(volume.id, peer.server.clone()))
                    .is_some_and(|s| s.range(range.clone()).next().is_some());
                let due = peer.state == MirrorState::Resyncing
                    || (peer.state == MirrorState::InSync && pending);
                let key = (volume.id, peer.server.clone(), p.first_page);
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
}

/// One cleaning pass: flush here and on the mirrors, then clear the bits of
/// regions that no write touched meanwhile, here and on the mirrors.
async fn clean(service: &Service) {
    let repl = &service.replication;
    let store = &service.store;
    // (volume, epoch, peer, regions, stamps, partition replicas)
    let mut work = Vec::new();
    for volume in store.volumes() {
        let Some(map) = volume.map() else { continue };
        for p in &map.partitions {
            if p.replicas.first().map(|r| &r.server) != Some(&repl.me) {
                continue;
            }
            let range = repl.partition_regions(&map, p);
            for peer in p.replicas.iter().skip(1) {
                // Only in-sync mirrors: a resyncing one may still lack regions
                // whose bits are set (its resync clears them as it copies).
                if peer.state != MirrorState::InSync || repl.written_off(volume.id, &peer.server) {
                    continue;
                }
                let must = repl.must_copy.borrow();
                let skip = must.get(&(volume.id, peer.server.clone()));
                let mut regions = Vec::new();
                let mut stamps = Vec::new();
                for r in store.dirty_regions(volume.id, &peer.server) {
                    if !range.contains(&r) || skip.is_some_and(|s| s.contains(&r)) {
                        continue;
                    }
                    if let Some(stamp) = repl.quiet(volume.id, r) {
                        regions.push(r);
                        stamps.push(stamp);
                    }
                }
                if !regions.is_empty() {
                    work.push((
                        volume.clone(),
                        peer.clone(),
                        p.replicas.clone(),
                        regions,
                        stamps,
                    ));
                }
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
    for (volume, peer, replicas, regions, stamps) in work {
        let flush = Request::new(Opcode::Flush, volume.id, volume.epoch(), 0, 0, 0);
        if repl.forward(volume.id, &peer, &flush, &[]).await.is_err() {
            continue;
        }
        let (clean, clean_stamps): (Vec<u64>, Vec<u64>) = regions
            .iter()
            .zip(&stamps)
            .filter(|(r, s)| repl.quiet(volume.id, **r) == Some(**s))
            .map(|(r, s)| (*r, *s))
            .unzip();
        if clean.is_empty() {
            continue;
        }
        if let Err(e) = store.clear_dirty(volume.id, &peer.server, &clean).await {
            warn!(error = %e, "cannot clear bits");
            continue;
        }
        repl.forget_quiet(volume.id, &clean, &clean_stamps);
        tell_clean(
            repl,
            volume.id,
            &replicas,
            &[repl.me.clone(), peer.server.clone()],
            &clean,
        )
        .await;
    }
}

/// Tell every other replica that `regions` are equal on `holders`.
async fn tell_clean(
    repl: &Replication,
    volume: VolumeId,
    replicas: &[Replica],
    holders: &[String],
    regions: &[u64],
) {
    let request = MgmtRequest::Clean {
        volume,
        peers: holders.to_vec(),
        regions: region_runs(regions),
        region_size: repl.region_size(),
    };
    for r in replicas
        .iter()
        .filter(|r| r.server != repl.me && r.state != MirrorState::OutOfSync)
    {
        if let Err(e) = repl.call_peer(r, &request).await {
            debug!(peer = %r.server, error = %e, "clean not delivered; its bits stay set");
        }
    }
}

/// The current map, if this server still leads partition `first_page` and
/// `peer` still is a mirror of it in one of `states`.
fn still_leading(
    service: &Service,
    volume: VolumeId,
    first_page: u64,
    peer: &str,
) -> Option<(Rc<Volume>, Rc<VolumeMap>, Partition, Replica)> {
    let v = service.store.volume(volume)?;
    let map = v.map()?;
    let p = map
        .partitions
        .iter()
        .find(|p| p.first_page == first_page)?
        .clone();
    if p.replicas.first().map(|r| &r.server) != Some(&service.replication.me) {
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
async fn resync_partition(service: &Service, key: &(VolumeId, String, u64), progress: &Resync) {
    let repl = &service.replication;
    let (volume_id, peer_name, first_page) = (key.0, key.1.as_str(), key.2);
    let Some((_, map, partition, peer)) = still_leading(service, volume_id, first_page, peer_name)
    else {
        return;
    };
    let resyncing = peer.state == MirrorState::Resyncing;
    let range = repl.partition_regions(&map, &partition);
    let mut todo: BTreeSet<u64> = repl
        .must_copy
        .borrow()
        .get(&(volume_id, peer_name.to_string()))
        .map(|s| s.range(range.clone()).copied().collect())
        .unwrap_or_default();
    if resyncing {
        todo.extend(
            service
                .store
                .dirty_regions(volume_id, peer_name)
                .into_iter()
                .filter(|r| range.contains(r)),
        );
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
                    todo.extend(range.clone());
                } else {
                    todo.extend(convert_runs(
                        &regions,
                        region_size,
                        repl.region_size,
                        &range,
                        Cover::Touching,
                    ));
                }
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
    progress.total.set(todo.len() as u64);
    info!(volume = %volume_id, mirror = peer_name, first_page, regions = todo.len(), full = todo.len() as u64 == range.end - range.start, "resync started");
    let todo: Vec<u64> = todo.into_iter().collect();
    let started = Instant::now();
    let mut copied_bytes = 0u64;
    for batch in todo.chunks(RESYNC_BATCH) {
        let mut copied = Vec::with_capacity(batch.len());
        let mut stamps = Vec::with_capacity(batch.len());
        for region in batch {
            // Rate limit: never ahead of the configured bytes per second.
            let due = Duration::from_secs_f64(
                copied_bytes as f64 / repl.settings.resync_rate.max(1) as f64,
            );
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            match copy_region(service, volume_id, first_page, peer_name, *region).await {
                Err(ForwardError::Behind(epoch)) => {
                    debug!(volume = %volume_id, mirror = peer_name, %epoch, "resync paused: this server's map is behind");
                    return;
                }
                Ok((bytes, stamp)) => {
                    copied_bytes += bytes;
                    repl.resynced_bytes.set(repl.resynced_bytes.get() + bytes);
                    progress.copied.set(progress.copied.get() + 1);
                    copied.push(*region);
                    stamps.push(stamp);
                }
                Err(ForwardError::Failed(reason)) => {
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
        if !finish_batch(service, volume_id, first_page, peer_name, &copied, &stamps).await {
            return;
        }
    }
    if resyncing {
        report_resync_done(service, volume_id, first_page, peer_name).await;
    }
    info!(volume = %volume_id, mirror = peer_name, first_page, bytes = copied_bytes, secs = started.elapsed().as_secs_f64(), "resync finished");
}

/// Copy one region (its part inside the partition) to `peer`; returns the
/// bytes copied and the region's write stamp at the copy.
async fn copy_region(
    service: &Service,
    volume_id: VolumeId,
    first_page: u64,
    peer_name: &str,
    region: u64,
) -> Result<(u64, u64), ForwardError> {
    let repl = &service.replication;
    let (volume, map, partition, peer) = still_leading(service, volume_id, first_page, peer_name)
        .ok_or_else(|| {
        ForwardError::Failed("no longer the primary, or the mirror is out of sync".into())
    })?;
    let _gate = volume.hold().await;
    let lock = repl.lock(volume_id, region);
    let _exclusive = lock.write().await;
    let page = u64::from(map.page_size);
    let start = (region * repl.region_size).max(partition.first_page * page);
    let end = ((region + 1) * repl.region_size)
        .min(partition.end_page * page)
        .min(volume.record().size);
    if start >= end {
        return Ok((0, 0));
    }
    let len = (end - start) as u32;
    let stamp = repl.quiet(volume_id, region).unwrap_or(0);
    let pieces = service
        .store
        .read(&volume, start, len)
        .await
        .map_err(|r| ForwardError::Failed(r.message))?;
    let mut data = Vec::new();
    let mut zero = true;
    for piece in &pieces {
        if let ReadPiece::Data(buf) = piece
            && buf.iter().any(|b| *b != 0)
        {
            zero = false;
        }
    }
    let mut request = if zero {
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
            .map_err(|e| ForwardError::Failed(e.to_string()))?
    };
    request.flags |= FLAG_RESYNC;
    repl.forward(volume_id, &peer, &request, &data).await?;
    drop(_exclusive);
    drop(lock);
    repl.unlock_idle(volume_id, region..region + 1);
    Ok((u64::from(len), stamp))
}

/// After a batch: flush the mirror, then clear the copied regions' bits here
/// and on the other replicas. False if the mirror is gone.
async fn finish_batch(
    service: &Service,
    volume_id: VolumeId,
    first_page: u64,
    peer_name: &str,
    copied: &[u64],
    stamps: &[u64],
) -> bool {
    let repl = &service.replication;
    let Some((volume, _, partition, peer)) =
        still_leading(service, volume_id, first_page, peer_name)
    else {
        return false;
    };
    let flush = Request::new(Opcode::Flush, volume_id, volume.epoch(), 0, 0, 0);
    if let Err(reason) = repl.forward(volume_id, &peer, &flush, &[]).await {
        warn!(mirror = peer_name, %reason, "flush after resync batch failed");
        return false;
    }
    if let Some(set) = repl
        .must_copy
        .borrow_mut()
        .get_mut(&(volume_id, peer_name.to_string()))
    {
        for r in copied {
            set.remove(r);
        }
    }
    let (clean, clean_stamps): (Vec<u64>, Vec<u64>) = copied
        .iter()
        .zip(stamps)
        .filter(|(r, s)| repl.quiet(volume_id, **r) == Some(**s))
        .map(|(r, s)| (*r, *s))
        .unzip();
    if let Err(e) = service
        .store
        .clear_dirty(volume_id, peer_name, &clean)
        .await
    {
        warn!(error = %e, "cannot clear bits after resync");
        return false;
    }
    repl.forget_quiet(volume_id, &clean, &clean_stamps);
    tell_clean(
        repl,
        volume_id,
        &partition.replicas,
        &[repl.me.clone(), peer_name.to_string()],
        &clean,
    )
    .await;
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

    #[test]
    fn runs_convert_between_region_sizes_conservatively() {
        let all = 0..u64::MAX;
        // Their 128 KiB regions 1..2 are our 64 KiB regions 2 and 3.
        assert_eq!(
            convert_runs(&[(1, 2)], 128 << 10, 64 << 10, &all, Cover::Inside),
            vec![2, 3]
        );
        // Their 64 KiB region 3 lies in half of our 128 KiB region 1: copy it, never clear it.
        assert_eq!(
            convert_runs(&[(3, 4)], 64 << 10, 128 << 10, &all, Cover::Touching),
            vec![1]
        );
        assert!(convert_runs(&[(3, 4)], 64 << 10, 128 << 10, &all, Cover::Inside).is_empty());
        // Hostile numbers neither overflow nor allocate past the limit.
        let hostile = [(0, u64::MAX), (u64::MAX - 1, u64::MAX)];
        assert_eq!(
            convert_runs(&hostile, u32::MAX, 64 << 10, &(5..9), Cover::Touching),
            vec![5, 6, 7, 8]
        );
        assert_eq!(
            convert_runs(&hostile, 0, 64 << 10, &(0..3), Cover::Inside),
            vec![0, 1, 2]
        );
    }
}
