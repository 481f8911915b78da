//! The management service: one task owns the state and applies every change;
//! connection tasks hand it requests and wait for its answer.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tessera_net::proto::{
    AdminCommand, ClusterStatus, Epoch, EpochVerdict, MgmtReply, MgmtRequest, MirrorReport,
    MirrorState, Refusal, Role, ServerStatus, VolumeId, VolumeMap,
};
use tessera_net::quic::{
    Alpn, Connector, Endpoint, PeerConnection, PeerIdentity, TlsPaths, TransportTuning,
    serve_mgmt_stream,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::db::Db;
use crate::error::MgmtError;
use crate::monitor::{Liveness, mirror_status};
use crate::state::{ClusterState, Command, Outcome, ReplicaRecord, VolumeRecord};

/// Settings of `tessera mgmt`; the file is TOML, command-line flags override it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MgmtConfig {
    /// Directory of the state database.
    pub state: PathBuf,
    /// Where the management service listens (QUIC, UDP).
    pub listen: SocketAddr,
    /// A storage server silent this long (ms) is marked down.
    pub heartbeat_timeout_ms: u64,
    /// How long (ms) a config push may take before the server is marked down.
    pub push_timeout_ms: u64,
    pub tls: TlsPaths,
    pub transport: TransportTuning,
}

impl Default for MgmtConfig {
    fn default() -> Self {
        MgmtConfig {
            state: PathBuf::from("tessera-mgmt"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            heartbeat_timeout_ms: 5_000,
            push_timeout_ms: 2_000,
            tls: TlsPaths::default(),
            transport: TransportTuning::default(),
        }
    }
}

impl MgmtConfig {
    pub fn load(path: &std::path::Path) -> Result<Self, MgmtError> {
        let text = std::fs::read_to_string(path).map_err(|source| MgmtError::Io {
            op: "read config",
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| MgmtError::Config {
            reason: format!("{}: {}", path.display(), e.message()),
        })
    }
}

struct Request {
    peer: PeerIdentity,
    request: MgmtRequest,
    reply: oneshot::Sender<MgmtReply>,
}

/// The single owner of the configuration map.
struct Manager {
    state: ClusterState,
    db: Db,
    connector: Connector,
    /// When each storage server was last heard from. Connection tasks write
    /// it as requests arrive, so a heartbeat queued behind a slow change
    /// still counts on time.
    last_seen: LastSeen,
    /// The epoch each server last acknowledged or reported, per volume.
    held: Held,
    /// The state as of the last commit, for the connection tasks that
    /// answer heartbeats without waiting for this owner.
    published: Published,
    heartbeat_timeout: Duration,
    push_timeout: Duration,
    /// The latest mirror report of each storage server (monitor), with its
    /// resync byte counter.
    mirror_reports: HashMap<String, (Vec<MirrorReport>, u64)>,
    /// The boot id each storage server registered with, in this process:
    /// another one means the server's process restarted.
    boots: HashMap<String, u64>,
    /// When a primary last reported each server lost as a mirror: it is
    /// resynced only once it has been heard from since (a dead one would
    /// hold every client up for the push timeout).
    lost: HashMap<String, Instant>,
}

/// Bind, announce, and serve until `shutdown` resolves.
pub async fn run(
    config: MgmtConfig,
    identity: tessera_net::quic::TlsIdentity,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MgmtError> {
    // The socket first: a start that cannot serve creates no state.
    let endpoint = Endpoint::bind(config.listen, &identity, &config.transport, &[Alpn::Mgmt])
        .map_err(|error| MgmtError::Serve {
            addr: config.listen,
            error,
        })?;
    let (db, state) = Db::open(&config.state)?;
    let addr = endpoint.local_addr()?;
    info!(%addr, epoch = %state.epoch, servers = state.servers.len(), volumes = state.volumes.len(), "management server up");
    println!("tessera mgmt {} serving on {addr}", identity.me().name);
    let now = Instant::now();
    let last_seen: LastSeen = Arc::new(Mutex::new(
        state.servers.keys().map(|s| (s.clone(), now)).collect(),
    ));
    let published: Published = Arc::new(ArcSwap::from_pointee(state.clone()));
    let held: Held = Arc::default();
    let mut manager = Manager {
        last_seen: last_seen.clone(),
        state,
        db,
        connector: Connector::new(endpoint.clone(), Alpn::Mgmt, Role::Storage),
        held: held.clone(),
        published: published.clone(),
        heartbeat_timeout: Duration::from_millis(config.heartbeat_timeout_ms),
        push_timeout: Duration::from_millis(config.push_timeout_ms),
        mirror_reports: HashMap::new(),
        boots: HashMap::new(),
        lost: HashMap::new(),
    };
    let (tx, mut rx) = mpsc::channel::<Request>(1024);
    let shared = Shared {
        tx,
        last_seen,
        held,
        published,
    };
    tokio::spawn(accept_loop(endpoint.clone(), shared));
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(request) = rx.recv() => {
                if let MgmtRequest::MirrorFailed { volume, epoch, first_page, server } = request.request {
                    // Answered once durable, before the push: the primary that
                    // asks holds writes back until then, and the push to it
                    // waits for those writes.
                    let (reply, pending) = manager.mirror_failed(&request.peer, volume, epoch, first_page, &server);
                    let _ = request.reply.send(reply);
                    if let Some(outcome) = pending {
                        manager.propagate(outcome).await;
                    }
                    continue;
                }
                let reply = manager.handle(&request.peer, request.request).await;
                let _ = request.reply.send(reply);
            }
            _ = tick.tick() => {
                manager.check_heartbeats().await;
                manager.start_resyncs().await;
            }
            () = &mut shutdown => break,
        }
    }
    info!("shutting down");
    endpoint.close();
    // Let CONNECTION_CLOSE reach the storage servers, so they reconnect to
    // the next process at once instead of waiting on a dead connection.
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    Ok(())
}

type LastSeen = Arc<Mutex<HashMap<String, Instant>>>;
type Held = Arc<Mutex<HashMap<String, HashMap<VolumeId, Epoch>>>>;
type Published = Arc<ArcSwap<ClusterState>>;

/// A lock whose holder never leaves its table half-changed (each change is
/// one insert or remove), so a panic elsewhere does not poison it for good.
fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the connection tasks share with the owner of the state.
#[derive(Clone)]
struct Shared {
    tx: mpsc::Sender<Request>,
    last_seen: LastSeen,
    held: Held,
    published: Published,
}

async fn accept_loop(endpoint: Endpoint, shared: Shared) {
    while let Some(handshake) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            // A refusal is logged by `finish`.
            if let Ok(conn) = handshake.finish().await {
                serve_connection(conn, shared).await;
            }
        });
    }
}

async fn serve_connection(conn: PeerConnection, shared: Shared) {
    while let Some((send, recv)) = conn.accept_stream().await {
        let peer = conn.peer().clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let handled = serve_mgmt_stream(&peer.clone(), send, recv, |request| async move {
                let Shared {
                    tx,
                    last_seen,
                    held,
                    published,
                } = shared;
                if peer.role == Role::Storage
                    && matches!(
                        request,
                        MgmtRequest::Register { .. } | MgmtRequest::Heartbeat { .. }
                    )
                {
                    lock(&last_seen).insert(peer.name.clone(), Instant::now());
                }
                // A heartbeat of a server that is up is answered here, from
                // the last committed state: a busy owner (a push waiting out
                // a dead server) must not starve the servers' leases.
                if let MgmtRequest::Heartbeat { held: epochs } = &request
                    && peer.role == Role::Storage
                {
                    let state = published.load();
                    if state.servers.get(&peer.name).is_some_and(|s| s.up) {
                        return heartbeat_reply(&state, &held, &peer.name, epochs);
                    }
                }
                let (reply, answer) = oneshot::channel();
                let unavailable = || {
                    MgmtReply::Refused(Refusal::Unavailable {
                        reason: "shutting down".into(),
                    })
                };
                if tx
                    .send(Request {
                        peer,
                        request,
                        reply,
                    })
                    .await
                    .is_err()
                {
                    return unavailable();
                }
                answer.await.unwrap_or_else(|_| unavailable())
            })
            .await;
            if let Err(e) = handled {
                debug!(error = %e, "management stream failed");
            }
        });
    }
}

/// The answer to `server`'s heartbeat saying it holds `epochs`: the map
/// slices it does not hold at their epoch in `state`, and the volumes it
/// holds that were deleted. Records what it holds.
fn heartbeat_reply(
    state: &ClusterState,
    held: &Held,
    server: &str,
    epochs: &[(VolumeId, Epoch)],
) -> MgmtReply {
    let held_map: HashMap<VolumeId, Epoch> = epochs.iter().copied().collect();
    let mut maps: Vec<VolumeMap> = Vec::new();
    let mut dropped = Vec::new();
    for (id, epoch) in epochs {
        match state.volume_by_id(*id).and_then(|v| state.volume_map(v)) {
            Some(map) if !EpochVerdict::judge(map.epoch, *epoch).is_current() => maps.push(map),
            Some(_) => {}
            // Only ids this map has handed out: a management server
            // started on the wrong (say empty) state must not wipe servers.
            None if id.0 < state.next_volume_id => dropped.push(*id),
            None => {
                warn!(%server, volume = %id, "server holds a volume this map never assigned")
            }
        }
    }
    for (volume, record) in &state.volumes {
        if record.servers().contains(server) && !held_map.contains_key(&record.id) {
            maps.extend(state.volume_map(volume));
        }
    }
    lock(held).insert(server.to_string(), held_map);
    MgmtReply::Maps {
        epoch: state.epoch,
        maps,
        dropped,
    }
}

impl Manager {
    async fn handle(&mut self, peer: &PeerIdentity, request: MgmtRequest) -> MgmtReply {
        let reply = match request {
            MgmtRequest::Ping => Ok(MgmtReply::Pong {
                epoch: self.state.epoch,
            }),
            MgmtRequest::Register {
                data_addr,
                capacity,
                incarnation,
                boot,
            } => {
                self.register(peer, data_addr, capacity, incarnation, boot)
                    .await
            }
            MgmtRequest::ResyncDone {
                volume,
                epoch,
                first_page,
                server,
            } => {
                self.resync_done(peer, volume, epoch, first_page, server)
                    .await
            }
            MgmtRequest::ReportMirrors {
                mut mirrors,
                resynced_bytes,
            } => {
                for m in &mut mirrors {
                    m.reporter = peer.name.clone();
                }
                self.mirror_reports
                    .insert(peer.name.clone(), (mirrors, resynced_bytes));
                Ok(MgmtReply::Applied {
                    epoch: self.state.epoch,
                })
            }
            MgmtRequest::Heartbeat { held } => self.heartbeat(peer, held).await,
            MgmtRequest::GetMap { volume } => self
                .state
                .volume_map(&volume)
                .map(MgmtReply::Map)
                .ok_or(Refusal::NotFound {
                    kind: "volume".into(),
                    name: volume,
                }),
            MgmtRequest::Status => Ok(MgmtReply::Status(self.status())),
            MgmtRequest::MirrorStatus => {
                let status = self.status();
                let now = Instant::now();
                let seen = lock(&self.last_seen).clone();
                let liveness = status
                    .servers
                    .iter()
                    .map(|s| {
                        let heard = seen.get(&s.name).map(|t| now.duration_since(*t));
                        (s.name.clone(), Liveness { up: s.up, heard })
                    })
                    .collect();
                let mirrors = mirror_status(&status.volumes, &status.mirrors, &liveness);
                Ok(MgmtReply::MirrorStatus(mirrors))
            }
            MgmtRequest::Admin(command) => {
                info!(%peer, ?command, "admin command");
                self.execute(admin_command(command))
                    .await
                    .map(|epoch| MgmtReply::Applied { epoch })
            }
            MgmtRequest::MirrorFailed { .. } => Err(Refusal::Invalid {
                reason: "mirror failures are handled by the service loop".into(),
            }),
            other @ (MgmtRequest::PushMap { .. }
            | MgmtRequest::CheckMap { .. }
            | MgmtRequest::DropVolume { .. }
            | MgmtRequest::DirtyRegions { .. }
            | MgmtRequest::Clean { .. }
            | MgmtRequest::RegionChecksums { .. }) => Err(Refusal::Invalid {
                reason: format!("a management server does not serve {}", other.operation()),
            }),
        };
        reply.unwrap_or_else(|refusal| {
            debug!(%peer, %refusal, "refused");
            MgmtReply::Refused(refusal)
        })
    }

    async fn register(
        &mut self,
        peer: &PeerIdentity,
        data_addr: SocketAddr,
        capacity: u64,
        incarnation: u64,
        boot: u64,
    ) -> Result<MgmtReply, Refusal> {
        lock(&self.last_seen).insert(peer.name.clone(), Instant::now());
        // Unknown after this management server started: every server registers then.
        let restarted = self
            .boots
            .insert(peer.name.clone(), boot)
            .is_some_and(|before| before != boot);
        // A server registers when its process starts (or when it finds this
        // one new): a connection kept to its address leads to the old process.
        self.connector.forget(data_addr);
        let unchanged = self.state.servers.get(&peer.name).is_some_and(|s| {
            s.up && s.data_addr == data_addr
                && s.capacity == capacity
                && s.incarnation == incarnation
        });
        if !unchanged {
            info!(server = %peer.name, %data_addr, capacity, incarnation, "registering");
            self.execute(Command::RegisterServer {
                name: peer.name.clone(),
                data_addr,
                capacity,
                incarnation,
            })
            .await?;
        }
        if restarted {
            self.resync_mirrors_of(&peer.name).await;
        }
        Ok(MgmtReply::Registered {
            epoch: self.state.epoch,
            lease_ms: u64::try_from(self.lease().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// `server`'s process restarted: each of its replicas that was a mirror
    /// in sync is resynced, since writes it acknowledged but had not flushed
    /// may be gone (the primary's bits name them), and until then no one is
    /// told it is in sync.
    async fn resync_mirrors_of(&mut self, server: &str) {
        let due = self
            .mirrors_where(|mirror| mirror.server == server && mirror.state == MirrorState::InSync);
        self.start_resync(due, "mirror restarted: resyncing").await;
    }

    /// The mirrors `pick` chooses among the partitions whose primary is up
    /// and in sync (the only ones a mirror can be copied from).
    fn mirrors_where(&self, pick: impl Fn(&ReplicaRecord) -> bool) -> Vec<(String, u64, String)> {
        let up = |name: &str| self.state.servers.get(name).is_some_and(|s| s.up);
        let mut due = Vec::new();
        for (name, volume) in &self.state.volumes {
            for p in &volume.partitions {
                let Some(primary) = p.replicas.first() else {
                    continue;
                };
                if primary.state != MirrorState::InSync || !up(&primary.server) {
                    continue;
                }
                for r in p.replicas.iter().skip(1).filter(|r| pick(r)) {
                    due.push((name.clone(), p.first_page, r.server.clone()));
                }
            }
        }
        due
    }

    /// Put each of `due` (volume, first page, mirror) into `Resyncing`.
    async fn start_resync(&mut self, due: Vec<(String, u64, String)>, why: &str) {
        for (volume, first_page, server) in due {
            info!(%volume, first_page, mirror = %server, "{why}");
            let command = Command::SetMirrorState {
                volume,
                first_page,
                server,
                state: MirrorState::Resyncing,
            };
            if let Err(refusal) = self.execute(command).await {
                debug!(%refusal, "resync not started");
            }
        }
    }

    async fn heartbeat(
        &mut self,
        peer: &PeerIdentity,
        held: Vec<(VolumeId, Epoch)>,
    ) -> Result<MgmtReply, Refusal> {
        let name = &peer.name;
        let Some(server) = self.state.servers.get(name) else {
            return Err(Refusal::NotFound {
                kind: "server".into(),
                name: name.clone(),
            });
        };
        lock(&self.last_seen).insert(name.clone(), Instant::now());
        if !server.up {
            info!(server = %name, "back: marking up");
            self.execute(Command::MarkServer {
                name: name.clone(),
                up: true,
            })
            .await?;
        }
        Ok(heartbeat_reply(&self.state, &self.held, name, &held))
    }

    /// The lease each acknowledged heartbeat grants a storage server. Half
    /// the heartbeat timeout: a server silent for the timeout has been
    /// without a lease for half of it, so marking it down and promoting a
    /// mirror cannot leave two primaries serving.
    fn lease(&self) -> Duration {
        self.heartbeat_timeout / 2
    }

    fn status(&self) -> ClusterStatus {
        ClusterStatus {
            epoch: self.state.epoch,
            servers: self
                .state
                .servers
                .iter()
                .map(|(name, s)| {
                    let mut held: Vec<_> = lock(&self.held)
                        .get(name)
                        .map(|h| h.iter().map(|(v, e)| (*v, *e)).collect())
                        .unwrap_or_default();
                    held.sort();
                    ServerStatus {
                        name: name.clone(),
                        addr: s.data_addr,
                        capacity: s.capacity,
                        up: s.up,
                        held,
                        resynced_bytes: self.mirror_reports.get(name).map_or(0, |r| r.1),
                    }
                })
                .collect(),
            mirrors: self
                .state
                .servers
                .keys()
                .filter_map(|name| self.mirror_reports.get(name))
                .flat_map(|(reports, _)| reports.iter().cloned())
                .collect(),
            volumes: self
                .state
                .volumes
                .keys()
                .filter_map(|v| self.state.volume_map(v))
                .collect(),
        }
    }

    /// Apply a command: durable first, then pushed to every server concerned
    /// (marking down those that do not acknowledge), and only then answered,
    /// so no client can fetch a map that the servers do not enforce yet.
    async fn execute(&mut self, command: Command) -> Result<Epoch, Refusal> {
        let before = self.state.clone();
        self.check_no_data_loss(&command).await?;
        let outcome = self.commit(&command)?;
        if let Some(refusal) = self.propagate(outcome).await {
            // A write reached a server between the check and the push: put
            // the layout back (another epoch), so nothing is lost.
            warn!(%refusal, "layout change refused by a storage server: reverting");
            for (name, volume) in &before.volumes {
                let changed = self.state.volumes.get(name).is_some_and(|now| {
                    (now.size, &now.partitions) != (volume.size, &volume.partitions)
                });
                if changed {
                    let revert = Command::SetLayout {
                        volume: name.clone(),
                        size: volume.size,
                        partitions: volume.partitions.clone(),
                    };
                    match self.commit(&revert) {
                        Ok(outcome) => {
                            if let Some(still) = self.propagate(outcome).await {
                                tracing::error!(volume = %name, refusal = %still, "revert refused too");
                            }
                        }
                        Err(e) => {
                            tracing::error!(volume = %name, refusal = %e, "revert not committed")
                        }
                    }
                }
            }
            return Err(refusal);
        }
        Ok(self.state.epoch)
    }

    /// Before a change that takes pages from servers, ask each of them
    /// whether it holds data there; any that does (or cannot answer) refuses
    /// the change, and nothing is committed.
    async fn check_no_data_loss(&self, command: &Command) -> Result<(), Refusal> {
        let mut candidate = self.state.clone();
        let outcome = candidate.apply(command)?;
        if let Command::SetPartition {
            volume,
            first_page,
            end_page,
            servers,
        } = command
        {
            self.check_range_empty(volume, *first_page, *end_page, servers)
                .await?;
        }
        for name in outcome.changed.keys() {
            let (Some(old), Some(new)) =
                (self.state.volumes.get(name), candidate.volumes.get(name))
            else {
                continue;
            };
            let Some(map) = candidate.volume_map(name) else {
                continue;
            };
            for server in old.servers() {
                // A server the command removes gives up its data knowingly (--force).
                let Some(record) = candidate.servers.get(&server) else {
                    continue;
                };
                if !loses_pages(old, new, &server) {
                    continue;
                }
                if !record.up {
                    return Err(Refusal::WouldLoseData {
                        detail: format!(
                            "server {server} is down: cannot check that it holds no data in the pages {name} would take from it"
                        ),
                    });
                }
                self.ask_check_map(
                    &server,
                    record.data_addr,
                    &map,
                    "moving data is not supported yet",
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Until data can be copied, giving pages to other replicas (or another
    /// primary) is only safe while no current holder has data in them: a new
    /// replica would start empty. Ask every current holder of the range.
    async fn check_range_empty(
        &self,
        name: &str,
        first: u64,
        end: u64,
        servers: &[String],
    ) -> Result<(), Refusal> {
        let Some(map) = self.state.volume_map(name) else {
            return Ok(());
        };
        let affected: Vec<_> = map
            .partitions
            .iter()
            .filter(|p| p.first_page < end && first < p.end_page)
            .collect();
        let unchanged = affected.iter().all(|p| {
            p.replicas
                .iter()
                .map(|r| r.server.as_str())
                .eq(servers.iter().map(String::as_str))
        });
        if unchanged {
            return Ok(());
        }
        // The current map with the range cut out: holders answer whether they have data there.
        let mut probe = map.clone();
        probe.partitions = map
            .partitions
            .iter()
            .flat_map(|p| {
                let mut kept = Vec::new();
                if p.first_page < first {
                    kept.push(tessera_net::proto::Partition {
                        end_page: p.end_page.min(first),
                        ..p.clone()
                    });
                }
                if end < p.end_page {
                    kept.push(tessera_net::proto::Partition {
                        first_page: p.first_page.max(end),
                        ..p.clone()
                    });
                }
                if p.end_page <= first || end <= p.first_page {
                    kept = vec![p.clone()];
                }
                kept
            })
            .collect();
        let holders: BTreeSet<&str> = affected
            .iter()
            .flat_map(|p| p.replicas.iter().map(|r| r.server.as_str()))
            .collect();
        for server in holders {
            let Some(record) = self.state.servers.get(server).filter(|s| s.up) else {
                return Err(Refusal::WouldLoseData {
                    detail: format!(
                        "server {server} is down: cannot check that pages {first}..{end} of {name} hold no data"
                    ),
                });
            };
            self.ask_check_map(
                server,
                record.data_addr,
                &probe,
                "new replicas of pages with data would start empty, and copying data is not supported yet",
            )
            .await?;
        }
        Ok(())
    }

    /// Ask `server` whether it could take `map` without dropping data; a
    /// server with data there refuses with `WouldLoseData` (plus `why`).
    async fn ask_check_map(
        &self,
        server: &str,
        addr: SocketAddr,
        map: &VolumeMap,
        why: &str,
    ) -> Result<(), Refusal> {
        let reply = tokio::time::timeout(self.push_timeout, async {
            let conn = self.connector.get(addr, server).await?;
            conn.mgmt(&MgmtRequest::CheckMap { map: map.clone() }).await
        })
        .await;
        if !matches!(reply, Ok(Ok(_))) {
            self.connector.forget(addr);
        }
        match reply {
            Ok(Ok(MgmtReply::Applied { .. })) => Ok(()),
            Ok(Ok(MgmtReply::Refused(Refusal::WouldLoseData { detail }))) => {
                Err(Refusal::WouldLoseData {
                    detail: format!("server {server}: {detail}; {why}"),
                })
            }
            other => Err(Refusal::Unavailable {
                reason: format!("server {server} did not answer the data check: {other:?}"),
            }),
        }
    }

    /// Push `outcome` and mark down every server that does not acknowledge,
    /// until all servers concerned hold the new epochs or are down. Returns a
    /// refusal for data loss, which the caller undoes.
    async fn propagate(&mut self, mut outcome: Outcome) -> Option<Refusal> {
        let mut lost = None;
        loop {
            let (failed, would_lose) = self.push(&outcome).await;
            lost = lost.or(would_lose);
            if failed.is_empty() {
                break;
            }
            // A server that missed the push may still hold a lease from its
            // last heartbeat: until that has run out it may serve what it
            // knows, so no map that moves its partitions is let out before.
            let leases_end = failed
                .iter()
                .filter_map(|server| lock(&self.last_seen).get(server).copied())
                .max()
                .map(|heard| heard + self.lease());
            if let Some(end) = leases_end {
                tokio::time::sleep_until(end.into()).await;
            }
            let mut next = Outcome::default();
            for server in failed {
                warn!(%server, "did not acknowledge the new map: marking down");
                match self.commit(&Command::MarkServer {
                    name: server,
                    up: false,
                }) {
                    Ok(o) => {
                        next.changed.extend(o.changed);
                        next.epoch = o.epoch;
                    }
                    Err(refusal) => debug!(%refusal, "not marked down"),
                }
            }
            outcome = next;
        }
        lost
    }

    fn commit(&mut self, command: &Command) -> Result<Outcome, Refusal> {
        let mut next = self.state.clone();
        let outcome = next.apply(command)?;
        self.db.commit(command, &next).map_err(|e| {
            warn!(error = %e, "state not saved; command not applied");
            Refusal::Unavailable {
                reason: e.to_string(),
            }
        })?;
        self.state = next;
        self.published.store(Arc::new(self.state.clone()));
        Ok(outcome)
    }

    /// Push the changes of `outcome` to every server concerned that is up, in
    /// parallel; returns the servers that did not acknowledge in time.
    async fn push(&mut self, outcome: &Outcome) -> (BTreeSet<String>, Option<Refusal>) {
        let mut tasks = JoinSet::new();
        let spawn =
            |server: String, request: MgmtRequest, volume: VolumeId, tasks: &mut JoinSet<_>| {
                let Some(record) = self.state.servers.get(&server).filter(|s| s.up) else {
                    return;
                };
                let (addr, connector, timeout) =
                    (record.data_addr, self.connector.clone(), self.push_timeout);
                tasks.spawn(async move {
                    let result = tokio::time::timeout(timeout, async {
                        let conn = connector
                            .get(addr, &server)
                            .await
                            .map_err(|e| e.to_string())?;
                        conn.mgmt(&request).await.map_err(|e| e.to_string())
                    })
                    .await;
                    if !matches!(result, Ok(Ok(_))) {
                        // A dead process's connection would fail the next push too.
                        connector.forget(addr);
                    }
                    let acked = match result {
                        Ok(Ok(MgmtReply::Applied { epoch })) => Ok(epoch),
                        Ok(Ok(MgmtReply::Refused(Refusal::WouldLoseData { detail }))) => {
                            Err(Some(Refusal::WouldLoseData {
                                detail: format!("server {server}: {detail}"),
                            }))
                        }
                        Ok(Ok(other)) => {
                            warn!(%server, ?other, "push refused");
                            Err(None)
                        }
                        Ok(Err(e)) => {
                            warn!(%server, error = %e, "push failed");
                            Err(None)
                        }
                        Err(_) => Err(None),
                    };
                    (server, volume, acked)
                });
            };
        for (volume, servers) in &outcome.changed {
            let Some(map) = self.state.volume_map(volume) else {
                continue;
            };
            for server in servers {
                spawn(
                    server.clone(),
                    MgmtRequest::PushMap { map: map.clone() },
                    map.id,
                    &mut tasks,
                );
            }
        }
        for (id, servers) in &outcome.deleted {
            for server in servers {
                spawn(
                    server.clone(),
                    MgmtRequest::DropVolume { id: *id },
                    *id,
                    &mut tasks,
                );
            }
        }
        let mut failed = BTreeSet::new();
        let mut would_lose = None;
        while let Some(done) = tasks.join_next().await {
            let Ok((server, volume, acked)) = done else {
                continue;
            };
            match acked {
                Ok(epoch) => {
                    let mut all = lock(&self.held);
                    let held = all.entry(server).or_default();
                    if outcome.deleted.contains_key(&volume) {
                        held.remove(&volume);
                    } else {
                        held.insert(volume, epoch);
                    }
                }
                // Refused to drop data: the server is fine, the change is undone.
                Err(Some(refusal)) => would_lose = Some(refusal),
                Err(None) => {
                    failed.insert(server);
                }
            }
        }
        (failed, would_lose)
    }

    /// The partition of `volume` at `first_page`, if `reporter` is its primary.
    fn led_by(
        &self,
        reporter: &str,
        volume: VolumeId,
        first_page: u64,
    ) -> Result<(String, &crate::state::PartitionRecord, Epoch), Refusal> {
        let name = self
            .state
            .volume_by_id(volume)
            .ok_or_else(|| Refusal::NotFound {
                kind: "volume".into(),
                name: volume.to_string(),
            })?;
        let record = &self.state.volumes[name];
        let partition = record
            .partitions
            .iter()
            .find(|p| p.first_page == first_page)
            .filter(|p| p.replicas.first().is_some_and(|r| r.server == reporter))
            .ok_or_else(|| Refusal::Invalid {
                reason: format!("{reporter} is not the primary of {name} pages {first_page}.."),
            })?;
        Ok((name.to_string(), partition, record.epoch))
    }

    /// A primary could not forward to `server`: record it out of sync.
    /// Returns the answer and the change still to be pushed.
    fn mirror_failed(
        &mut self,
        peer: &PeerIdentity,
        volume: VolumeId,
        epoch: Epoch,
        first_page: u64,
        server: &str,
    ) -> (MgmtReply, Option<Outcome>) {
        let refused = |r: Refusal| (MgmtReply::Refused(r), None);
        if peer.role != Role::Storage {
            return refused(Refusal::Forbidden {
                role: peer.role,
                operation: "mirror-failed".into(),
            });
        }
        let (name, partition, current) = match self.led_by(&peer.name, volume, first_page) {
            Ok(found) => found,
            Err(r) => return refused(r),
        };
        let Some(replica) = partition
            .replicas
            .iter()
            .skip(1)
            .find(|r| r.server == server)
        else {
            return refused(Refusal::NotFound {
                kind: "mirror".into(),
                name: server.to_string(),
            });
        };
        if replica.state == MirrorState::OutOfSync {
            // Already on record (another write reported it first).
            return (MgmtReply::Applied { epoch: current }, None);
        }
        if !EpochVerdict::judge(current, epoch).is_current() {
            return refused(Refusal::StaleEpoch {
                request: epoch,
                current,
            });
        }
        warn!(volume = %name, first_page, mirror = server, primary = %peer.name, "mirror missed a write: out of sync");
        match self.commit(&Command::SetMirrorState {
            volume: name.clone(),
            first_page,
            server: server.to_string(),
            state: MirrorState::OutOfSync,
        }) {
            Ok(mut outcome) => {
                // The lost mirror need not hold the new map before clients may
                // fetch it: it serves no client of this partition, and it
                // refuses the primary's forwards at the new epoch until it has
                // it; of its other partitions the old and new maps say the
                // same. A live one gets the map with its next heartbeat; a
                // dead one would hold every client up for the push timeout.
                if let Some(servers) = outcome.changed.get_mut(&name) {
                    servers.remove(server);
                }
                self.lost.insert(server.to_string(), Instant::now());
                (
                    MgmtReply::Applied {
                        epoch: outcome.epoch,
                    },
                    Some(outcome),
                )
            }
            Err(r) => refused(r),
        }
    }

    /// A primary finished copying to a resyncing mirror: it is in sync.
    async fn resync_done(
        &mut self,
        peer: &PeerIdentity,
        volume: VolumeId,
        epoch: Epoch,
        first_page: u64,
        server: String,
    ) -> Result<MgmtReply, Refusal> {
        let (name, partition, current) = self.led_by(&peer.name, volume, first_page)?;
        let resyncing = partition
            .replicas
            .iter()
            .any(|r| r.server == server && r.state == MirrorState::Resyncing);
        if !resyncing {
            return Err(Refusal::Invalid {
                reason: format!("{server} is not resyncing {name} pages {first_page}.."),
            });
        }
        if !EpochVerdict::judge(current, epoch).is_current() {
            return Err(Refusal::StaleEpoch {
                request: epoch,
                current,
            });
        }
        info!(volume = %name, first_page, mirror = %server, "resync done: in sync");
        let epoch = self
            .execute(Command::SetMirrorState {
                volume: name,
                first_page,
                server,
                state: MirrorState::InSync,
            })
            .await?;
        Ok(MgmtReply::Applied { epoch })
    }

    /// Start resyncing every out-of-sync mirror that is back, where the
    /// partition's primary is up and in sync to copy from.
    async fn start_resyncs(&mut self) {
        let now = Instant::now();
        let fresh = |name: &str| {
            lock(&self.last_seen).get(name).is_some_and(|t| {
                now.duration_since(*t) < self.heartbeat_timeout
                    && self.lost.get(name).is_none_or(|lost| t > lost)
            })
        };
        let up = |name: &str| self.state.servers.get(name).is_some_and(|s| s.up);
        let due = self.mirrors_where(|mirror| {
            mirror.state == MirrorState::OutOfSync && up(&mirror.server) && fresh(&mirror.server)
        });
        self.start_resync(due, "mirror is back: resyncing").await;
    }

    async fn check_heartbeats(&mut self) {
        let now = Instant::now();
        let silent: Vec<String> = self
            .state
            .servers
            .iter()
            .filter(|(name, s)| {
                s.up && lock(&self.last_seen)
                    .get(*name)
                    .is_none_or(|t| now.duration_since(*t) > self.heartbeat_timeout)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in silent {
            warn!(server = %name, "no heartbeat: marking down");
            if let Err(refusal) = self.execute(Command::MarkServer { name, up: false }).await {
                debug!(%refusal, "not marked down");
            }
        }
    }
}

fn admin_command(command: AdminCommand) -> Command {
    match command {
        AdminCommand::CreateVolume {
            name,
            size,
            page_size,
            replicas,
            servers,
        } => Command::CreateVolume {
            name,
            size,
            page_size,
            replicas,
            servers,
        },
        AdminCommand::DeleteVolume { name } => Command::DeleteVolume { name },
        AdminCommand::ResizeVolume { name, size } => Command::ResizeVolume { name, size },
        AdminCommand::RemoveServer { name, force } => Command::RemoveServer { name, force },
        AdminCommand::SetPartition {
            volume,
            first_page,
            end_page,
            servers,
        } => Command::SetPartition {
            volume,
            first_page,
            end_page,
            servers,
        },
    }
}

/// Whether `server` holds pages in `old` that it does not hold in `new`.
fn loses_pages(old: &VolumeRecord, new: &VolumeRecord, server: &str) -> bool {
    let ranges = |v: &VolumeRecord| -> Vec<(u64, u64)> {
        let pages = v.pages();
        v.partitions
            .iter()
            .filter(|p| p.replicas.iter().any(|r| r.server == server))
            .map(|p| (p.first_page, p.end_page.min(pages)))
            .collect()
    };
    let kept = ranges(new);
    ranges(old).into_iter().any(|(first, end)| {
        // Every page of [first, end) must be in some kept range.
        let mut at = first;
        while at < end {
            match kept.iter().find(|(a, b)| *a <= at && at < *b) {
                Some((_, b)) => at = *b,
                None => return true,
            }
        }
        false
    })
}
