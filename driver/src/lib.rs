//! The Tessera client library: open a volume and read and write it.
//!
//! The driver fetches the volume's map slice from a management server,
//! stamps every request with the volume epoch it knows, and sends each page
//! range to its partition's primary. A request that crosses pages is split
//! and its pieces run in parallel. When a server answers STALE_EPOCH (or no
//! longer holds a page) the driver fetches the new map and retries, with
//! bounded retries and backoff; the application sees typed errors only.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use tessera_driver::{Client, MgmtServer};
//! use tessera_net::quic::TlsIdentity;
//!
//! let identity = TlsIdentity::load_dir("cluster".as_ref(), "app-1")?;
//! let mgmt = [MgmtServer { addr: "127.0.0.1:7400".parse()?, name: "mgmt".into() }];
//! let client = Client::connect(&mgmt, &identity).await?;
//! let volume = client.open_volume("db").await?;
//! volume.write_at(0, &[7u8; 4096]).await?;
//! let mut back = vec![0u8; 4096];
//! volume.read_at(0, &mut back).await?;
//! volume.flush().await?;
//! assert_eq!(back, [7u8; 4096]);
//! # Ok(())
//! # }
//! ```

mod error;
pub mod nbd;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
pub use error::DriverError;
use futures_util::future::try_join_all;
use futures_util::{StreamExt, TryStreamExt};
use tessera_net::proto::{
    BLOCK_SIZE, Epoch, EpochVerdict, FLAG_FUA, MgmtReply, MgmtRequest, Opcode, Refusal, Replica,
    Request, Role, Status, VolumeId, VolumeMap,
};
use tessera_net::quic::{
    Alpn, Connector, Endpoint, PeerConnection, QuicError, TlsIdentity, TransportTuning,
};
use tracing::{debug, warn};

/// How long a request piece is retried (through map changes, a primary's
/// failover, a server's restart) before the application gets `Unavailable`.
/// Longer than the management server's default heartbeat timeout (5 s), so a
/// failover completes within it.
const RETRY_BUDGET: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Map fetches for one volume are at least this far apart.
const MIN_FETCH_INTERVAL: Duration = Duration::from_millis(50);
/// One request (or map fetch) that takes longer is given up and retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A request unanswered this long makes the driver check for a newer map
/// (its server may have died and been replaced), and retry if there is one.
const MAP_CHECK_AFTER: Duration = Duration::from_millis(1000);
/// A request unanswered this long makes the driver ask its server for its
/// boot id on a fresh connection, and again at this interval (each probe
/// waits as long for its answer).
const PING_AFTER: Duration = Duration::from_millis(500);
/// Pieces of one call in flight at once (a huge TRIM is many pieces).
const MAX_PIECES_IN_FLIGHT: usize = 64;

/// The boot id of the server behind `conn` (a PING of volume 0 answers with
/// it); `None` if the answer carries none.
async fn ask_boot(conn: &PeerConnection) -> Result<Option<u64>, QuicError> {
    let ping = Request::new(Opcode::Ping, VolumeId(0), Epoch(0), 0, 0, 0);
    let mut boot = [0u8; 8];
    let (reply, _) = conn.data_into(&ping, &[], &mut boot).await?;
    Ok(
        (reply.status == Status::Ok && reply.payload_len() == boot.len())
            .then(|| u64::from_le_bytes(boot)),
    )
}

/// Why a request still unanswered is given up.
enum Stuck {
    /// The map moved on while it waited: the partition may have a new primary.
    MapMoved,
    /// The server answers on a new connection from another process: the
    /// one the request went to has died.
    ServerRestarted,
}

/// A management server: where it listens and the name on its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MgmtServer {
    pub addr: SocketAddr,
    pub name: String,
}

/// A connection to a Tessera cluster; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    mgmt: Arc<[MgmtServer]>,
    mgmt_conns: Connector,
    data: Connector,
    endpoint: Endpoint,
    /// Per storage server: the connection in use and the boot id of the
    /// process behind it, to tell a restarted server from a slow one.
    boots: Arc<std::sync::Mutex<HashMap<SocketAddr, (usize, u64)>>>,
    /// Per storage server, the latest probe of its boot id on a fresh
    /// connection and when it was made: however many requests wait on a
    /// silent server, it is probed once per `PING_AFTER`.
    probes: Arc<std::sync::Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Probe>>>>>,
    /// This client's session: with a sequence number per request, kept by
    /// its retries, it lets a server take each write once, however many
    /// copies of it arrive, and however late.
    session: u64,
    sequence: Arc<AtomicU64>,
}

/// When a server was last probed, and the boot id it answered with.
type Probe = Option<(tokio::time::Instant, Option<u64>)>;

impl Client {
    /// Connect with this application's identity (a `client` certificate).
    pub async fn connect(mgmt: &[MgmtServer], identity: &TlsIdentity) -> Result<Self, DriverError> {
        let first = mgmt.first().ok_or_else(|| DriverError::NoManagement {
            reason: "no management server given".into(),
        })?;
        let endpoint = Endpoint::client(first.addr, identity, &TransportTuning::default())?;
        let client = Client {
            mgmt: mgmt.into(),
            mgmt_conns: Connector::new(endpoint.clone(), Alpn::Mgmt, Role::Mgmt),
            data: Connector::new(endpoint.clone(), Alpn::Data, Role::Storage),
            endpoint,
            boots: Arc::default(),
            probes: Arc::default(),
            session: rand::random::<u64>().max(1),
            sequence: Arc::new(AtomicU64::new(1)),
        };
        client.call_mgmt(&MgmtRequest::Ping).await?;
        Ok(client)
    }

    /// Learn the boot id of the process behind `conn` (to `addr`), once per
    /// connection. Cheap when known: no call into the connection's state.
    async fn learn_boot(&self, conn: &PeerConnection, addr: SocketAddr) {
        if self
            .lock_boots()
            .get(&addr)
            .is_some_and(|(id, _)| *id == conn.id())
        {
            return;
        }
        // A server that does not answer has other trouble: the request finds it.
        if let Ok(Some(boot)) = tokio::time::timeout(REQUEST_TIMEOUT, ask_boot(conn))
            .await
            .unwrap_or(Ok(None))
        {
            self.lock_boots().insert(addr, (conn.id(), boot));
        }
    }

    /// Whether the server behind `conn`, still silent, has restarted: on a
    /// fresh connection it answers with another boot id. A slow server, or
    /// one not back yet, is not restarted.
    async fn restarted(&self, conn: &PeerConnection, server: &Replica) -> bool {
        let Some(old) = self
            .lock_boots()
            .get(&server.addr)
            .filter(|(id, _)| *id == conn.id())
            .map(|(_, boot)| *boot)
        else {
            return false;
        };
        let slot = self
            .probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(server.addr)
            .or_default()
            .clone();
        let mut latest = slot.lock().await;
        let boot = match *latest {
            Some((at, boot)) if at.elapsed() < PING_AFTER => boot,
            _ => {
                let probe = tokio::time::timeout(PING_AFTER, async {
                    let fresh = self
                        .endpoint
                        .connect(server.addr, &server.server, Alpn::Data, Role::Storage)
                        .await?;
                    let boot = ask_boot(&fresh).await;
                    fresh.close();
                    boot
                })
                .await;
                let boot = probe.ok().and_then(Result::ok).flatten();
                *latest = Some((tokio::time::Instant::now(), boot));
                boot
            }
        };
        boot.is_some_and(|boot| boot != old)
    }

    fn lock_boots(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, (usize, u64)>> {
        // A panic while holding it cannot leave the table half-changed.
        self.boots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open a volume by name.
    pub async fn open_volume(&self, name: &str) -> Result<Volume, DriverError> {
        let map = self.fetch_map(name).await?;
        Ok(Volume {
            inner: Arc::new(VolumeInner {
                client: self.clone(),
                name: name.to_string(),
                map: ArcSwap::from_pointee(map),
                refreshing: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(1),
                refreshes: AtomicU64::new(0),
            }),
        })
    }

    async fn call_mgmt(&self, request: &MgmtRequest) -> Result<MgmtReply, DriverError> {
        let mut last = String::new();
        for server in self.mgmt.iter() {
            let reply = async {
                let conn = self.mgmt_conns.get(server.addr, &server.name).await?;
                conn.mgmt(request).await
            }
            .await;
            match reply {
                Ok(MgmtReply::Refused(refusal)) => return Err(DriverError::Refused(refusal)),
                Ok(reply) => return Ok(reply),
                Err(e) => last = format!("{} ({}): {e}", server.name, server.addr),
            }
        }
        Err(DriverError::NoManagement { reason: last })
    }

    async fn fetch_map(&self, name: &str) -> Result<VolumeMap, DriverError> {
        let request = MgmtRequest::GetMap {
            volume: name.to_string(),
        };
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, self.call_mgmt(&request))
            .await
            .unwrap_or_else(|_| {
                Err(DriverError::NoManagement {
                    reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
                })
            });
        match reply {
            Ok(MgmtReply::Map(map)) if map.page_size == 0 => Err(DriverError::UnusableMap {
                volume: name.to_string(),
                reason: "its page size is 0".into(),
            }),
            Ok(MgmtReply::Map(map)) => match map.check_layout() {
                Ok(()) => Ok(map),
                Err(e) => Err(DriverError::UnusableMap {
                    volume: name.to_string(),
                    reason: e.to_string(),
                }),
            },
            Ok(other) => Err(DriverError::NoManagement {
                reason: format!("unexpected reply {other:?}"),
            }),
            Err(DriverError::Refused(Refusal::Fenced { volume, .. })) => {
                Err(DriverError::Fenced { volume })
            }
            Err(e) => Err(e),
        }
    }
}

/// An open volume; cheap to clone and safe to use from many tasks at once.
#[derive(Debug, Clone)]
pub struct Volume {
    inner: Arc<VolumeInner>,
}

#[derive(Debug)]
struct VolumeInner {
    client: Client,
    name: String,
    /// The current map slice, swapped whole on refresh: requests read it without a lock.
    map: ArcSwap<VolumeMap>,
    /// One map fetch at a time; others wait for it instead of fetching
    /// again. Holds when the last fetch started.
    refreshing: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    next_id: AtomicU64,
    /// Newer maps fetched after a server refused a request.
    refreshes: AtomicU64,
}

/// One request piece: it lies within one page.
#[derive(Debug, Clone, Copy)]
struct Piece {
    opcode: Opcode,
    offset: u64,
    len: u32,
    fua: bool,
}

impl Volume {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Size in bytes, as of the current map.
    pub fn size(&self) -> u64 {
        self.inner.map.load().size
    }

    /// How many times a server's refusal made the driver fetch a newer map.
    pub fn map_refreshes(&self) -> u64 {
        self.inner.refreshes.load(Ordering::Relaxed)
    }

    /// The map slice the driver currently routes by.
    pub fn map(&self) -> Arc<VolumeMap> {
        self.inner.map.load_full()
    }

    /// Read `buf.len()` bytes at `offset` (both multiples of 4 KiB).
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DriverError> {
        let pieces = self.split(Opcode::Read, offset, buf.len() as u64, false)?;
        let mut rest = buf;
        let mut targets = Vec::with_capacity(pieces.len());
        for piece in &pieces {
            let (head, tail) = rest.split_at_mut(piece.len as usize);
            targets.push(head);
            rest = tail;
        }
        try_join_all(
            pieces
                .into_iter()
                .zip(targets)
                .map(|(piece, target)| self.inner.run(piece, &[], target)),
        )
        .await?;
        Ok(())
    }

    /// Write `data` at `offset` (both multiples of 4 KiB).
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DriverError> {
        self.write_at_with(offset, data, false).await
    }

    /// Write with force-unit-access: durable when this returns.
    pub async fn write_at_fua(&self, offset: u64, data: &[u8]) -> Result<(), DriverError> {
        self.write_at_with(offset, data, true).await
    }

    async fn write_at_with(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DriverError> {
        let pieces = self.split(Opcode::Write, offset, data.len() as u64, fua)?;
        let mut at = 0usize;
        let mut jobs = Vec::with_capacity(pieces.len());
        for piece in pieces {
            let payload = &data[at..at + piece.len as usize];
            at += piece.len as usize;
            jobs.push(self.inner.run(piece, payload, &mut []));
        }
        try_join_all(jobs).await?;
        Ok(())
    }

    /// Discard a range: it reads as zeroes afterwards.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), DriverError> {
        self.ranged(Opcode::Trim, offset, len).await
    }

    /// Write zeroes over a range without sending them.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DriverError> {
        self.ranged(Opcode::WriteZeroes, offset, len).await
    }

    async fn ranged(&self, opcode: Opcode, offset: u64, len: u64) -> Result<(), DriverError> {
        let pieces = self.split(opcode, offset, len, false)?;
        futures_util::stream::iter(pieces.into_iter().map(|p| self.inner.run(p, &[], &mut [])))
            .buffer_unordered(MAX_PIECES_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    /// Make every completed write durable on every server of the volume.
    pub async fn flush(&self) -> Result<(), DriverError> {
        // A failover during the flush can move partitions to primaries this
        // round did not reach: flush again under the new map.
        for _ in 0..8 {
            let epoch = self.inner.map.load().epoch;
            self.flush_primaries().await?;
            if EpochVerdict::judge(epoch, self.inner.map.load().epoch).is_current() {
                return Ok(());
            }
        }
        Err(DriverError::Unavailable {
            volume: self.inner.name.clone(),
            reason: "the map kept changing during a flush".into(),
        })
    }

    /// One FLUSH to each primary of the current map.
    async fn flush_primaries(&self) -> Result<(), DriverError> {
        let map = self.inner.map.load_full();
        // One FLUSH per primary server, addressed through one of its partitions.
        let mut primaries = std::collections::BTreeMap::new();
        for p in &map.partitions {
            if let Some(r) = p.replicas.first() {
                primaries.entry(r.server.clone()).or_insert(p.first_page);
            }
        }
        let page = u64::from(map.page_size);
        try_join_all(primaries.into_values().map(|first| {
            let piece = Piece {
                opcode: Opcode::Flush,
                offset: first * page,
                len: 0,
                fua: false,
            };
            self.inner.run(piece, &[], &mut [])
        }))
        .await?;
        Ok(())
    }

    /// Cut `[offset, offset + len)` at page boundaries.
    fn split(
        &self,
        opcode: Opcode,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<Vec<Piece>, DriverError> {
        let map = self.inner.map.load();
        let block = u64::from(BLOCK_SIZE);
        if !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
            return Err(DriverError::Misaligned {
                offset,
                len,
                block: BLOCK_SIZE,
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > map.size) {
            return Err(DriverError::OutOfRange {
                offset,
                len,
                size: map.size,
            });
        }
        let page = u64::from(map.page_size);
        let mut pieces = Vec::new();
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let piece_end = end.min((pos / page + 1) * page);
            pieces.push(Piece {
                opcode,
                offset: pos,
                len: (piece_end - pos) as u32,
                fua,
            });
            pos = piece_end;
        }
        Ok(pieces)
    }
}

impl VolumeInner {
    /// Send one piece to the primary of its page, following map changes. A
    /// read's data lands in `out` (as long as the piece); other requests pass
    /// an empty `out`.
    async fn run(&self, piece: Piece, payload: &[u8], out: &mut [u8]) -> Result<(), DriverError> {
        let mut backoff = FIRST_BACKOFF;
        let mut last = String::new();
        let deadline = tokio::time::Instant::now() + RETRY_BUDGET;
        // The same in every attempt: the attempts are copies of one request.
        let sequence = self.client.sequence.fetch_add(1, Ordering::Relaxed);
        for attempt in 0.. {
            if attempt > 0 {
                if tokio::time::Instant::now() + backoff > deadline {
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            let map = self.map.load_full();
            let page = piece.offset / u64::from(map.page_size);
            let Some(primary) = map.partition_at(page).and_then(|p| p.replicas.first()) else {
                last = format!("page {page} has no replica in map epoch {}", map.epoch);
                self.refresh(map.epoch).await?;
                continue;
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut request = if piece.opcode == Opcode::Write {
                Request::write(map.id, map.epoch, piece.offset, payload, id).map_err(|e| {
                    DriverError::Io {
                        status: Status::BadRequest,
                        message: e.to_string(),
                    }
                })?
            } else {
                Request::new(piece.opcode, map.id, map.epoch, piece.offset, piece.len, id)
            };
            if piece.fua {
                request.flags |= FLAG_FUA;
            }
            request.session = self.client.session;
            request.sequence = sequence;
            if piece.opcode == Opcode::Flush {
                // FLUSH carries no range; it goes to the server of `piece.offset`'s page.
                request.offset = 0;
                request.length = 0;
            }
            let connected = tokio::time::timeout(
                REQUEST_TIMEOUT,
                self.client.data.get(primary.addr, &primary.server),
            )
            .await;
            let conn = match connected {
                Ok(Ok(conn)) => {
                    self.client.learn_boot(&conn, primary.addr).await;
                    conn
                }
                Ok(Err(e)) => {
                    debug!(volume = %self.name, server = %primary.server, error = %e, "cannot connect");
                    last = format!("{}: {e}", primary.server);
                    self.refresh(map.epoch).await?;
                    continue;
                }
                Err(_) => {
                    last = format!(
                        "{}: no connection within {REQUEST_TIMEOUT:?}",
                        primary.server
                    );
                    self.refresh(map.epoch).await?;
                    continue;
                }
            };
            let send = tokio::time::timeout(
                REQUEST_TIMEOUT,
                conn.data_into(&request, payload, &mut *out),
            );
            // A dead server does not answer at all: while waiting, look for
            // a map that has moved on (a failover), and ping the server on
            // the same connection. A server restarted on its address resets
            // the connection at the ping (its reset key outlives the
            // process), so the request is sent again to the new process
            // instead of waiting out the timeout.
            let moved = async {
                let mut map_checked = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(PING_AFTER).await;
                    if map_checked.elapsed() >= MAP_CHECK_AFTER {
                        map_checked = tokio::time::Instant::now();
                        self.refresh(map.epoch).await?;
                        if EpochVerdict::judge(map.epoch, self.map.load().epoch).is_newer() {
                            return Ok::<_, DriverError>(Stuck::MapMoved);
                        }
                    }
                    if self.client.restarted(&conn, primary).await {
                        return Ok(Stuck::ServerRestarted);
                    }
                }
            };
            let sent = tokio::select! {
                sent = send => sent.unwrap_or_else(|_| {
                    Err(QuicError::Socket {
                        action: "request",
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within {REQUEST_TIMEOUT:?}"),
                        ),
                    })
                }),
                stuck = moved => match stuck? {
                    Stuck::MapMoved => {
                        debug!(volume = %self.name, server = %primary.server, "no answer, and the map moved on: retrying");
                        last = format!("{}: no answer before epoch {}", primary.server, map.epoch);
                        continue;
                    }
                    Stuck::ServerRestarted => {
                        // The process the request went to is gone, and its
                        // requests with it: sending it again cannot land twice.
                        debug!(volume = %self.name, server = %primary.server, "the server restarted under the request: sending it again");
                        last = format!("{}: restarted", primary.server);
                        self.client.data.forget(primary.addr);
                        continue;
                    }
                },
            };
            let (reply, data) = match sent {
                Ok(answer) => answer,
                Err(e) => {
                    // The server may be down: the management server will move on; so do we.
                    debug!(volume = %self.name, server = %primary.server, error = %e, "request failed");
                    self.client.data.forget(primary.addr);
                    last = format!("{}: {e}", primary.server);
                    self.refresh(map.epoch).await?;
                    continue;
                }
            };
            match reply.status {
                Status::Ok if reply.payload_len() == out.len() => return Ok(()),
                Status::Ok => {
                    return Err(DriverError::Io {
                        status: Status::Ok,
                        message: format!(
                            "{:?} returned {} bytes, expected {}",
                            piece.opcode,
                            data.len(),
                            out.len()
                        ),
                    });
                }
                Status::StaleEpoch | Status::NotOwner | Status::Unavailable => {
                    debug!(volume = %self.name, status = ?reply.status, ours = %map.epoch, theirs = %reply.epoch, "refreshing map");
                    last = format!(
                        "{}: {:?} at epoch {}",
                        primary.server, reply.status, map.epoch
                    );
                    self.refresh(map.epoch).await?;
                }
                Status::OutOfRange => {
                    self.refresh(map.epoch).await?;
                    let size = self.map.load().size;
                    if piece.offset + u64::from(piece.len) > size {
                        return Err(DriverError::OutOfRange {
                            offset: piece.offset,
                            len: u64::from(piece.len),
                            size,
                        });
                    }
                }
                Status::Fenced => {
                    return Err(DriverError::Fenced {
                        volume: self.name.clone(),
                    });
                }
                status => {
                    return Err(DriverError::Io {
                        status,
                        message: String::from_utf8_lossy(&data).into_owned(),
                    });
                }
            }
        }
        warn!(volume = %self.name, %last, "giving up");
        Err(DriverError::Unavailable {
            volume: self.name.clone(),
            reason: last,
        })
    }

    /// Fetch the map again unless someone already did since epoch `seen`.
    async fn refresh(&self, seen: Epoch) -> Result<(), DriverError> {
        let mut last_fetch = self.refreshing.lock().await;
        if EpochVerdict::judge(seen, self.map.load().epoch).is_newer() {
            return Ok(());
        }
        // Many requests waiting on one dead server ask at once: one fetch
        // answers them all for a moment.
        if last_fetch.is_some_and(|t| t.elapsed() < MIN_FETCH_INTERVAL) {
            return Ok(());
        }
        *last_fetch = Some(tokio::time::Instant::now());
        match self.client.fetch_map(&self.name).await {
            Ok(map) => {
                // Never go back to an older map (a lagging management server).
                if EpochVerdict::judge(self.map.load().epoch, map.epoch).is_newer() {
                    self.refreshes.fetch_add(1, Ordering::Relaxed);
                    self.map.store(Arc::new(map));
                }
                Ok(())
            }
            // The management server may be restarting: keep the map and retry later.
            Err(DriverError::NoManagement { reason }) => {
                debug!(%reason, "map refresh failed");
                Ok(())
            }
            // A map that cannot be used is not taken: the old one stays.
            Err(e @ DriverError::UnusableMap { .. }) => {
                warn!(error = %e, "map refresh refused the new map");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// A volume for callers that are not async: each call blocks on an internal runtime.
#[derive(Debug)]
pub struct BlockingVolume {
    volume: Volume,
    runtime: tokio::runtime::Runtime,
}

impl BlockingVolume {
    /// Connect and open `name`.
    pub fn open(
        mgmt: &[MgmtServer],
        identity: &TlsIdentity,
        name: &str,
    ) -> Result<Self, DriverError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| {
                DriverError::Transport(QuicError::Socket {
                    action: "start runtime",
                    source: e,
                })
            })?;
        let volume = runtime.block_on(async {
            let client = Client::connect(mgmt, identity).await?;
            client.open_volume(name).await
        })?;
        Ok(BlockingVolume { volume, runtime })
    }

    pub fn size(&self) -> u64 {
        self.volume.size()
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DriverError> {
        self.runtime.block_on(self.volume.read_at(offset, buf))
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DriverError> {
        self.runtime.block_on(self.volume.write_at(offset, data))
    }

    pub fn flush(&self) -> Result<(), DriverError> {
        self.runtime.block_on(self.volume.flush())
    }

    pub fn trim(&self, offset: u64, len: u64) -> Result<(), DriverError> {
        self.runtime.block_on(self.volume.trim(offset, len))
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DriverError> {
        self.runtime.block_on(self.volume.write_zeroes(offset, len))
    }
}
