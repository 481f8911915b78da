//! Opening the device and serving it over QUIC.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::rc::Rc;

use bytes::Bytes;

use tessera_net::log_limit::LogLimit;
use tessera_net::proto::{
    self, BLOCK_SIZE, Epoch, FLAG_REPLICA, MAX_CHECKSUM_REGIONS, MgmtReply, MgmtRequest, Opcode,
    REQUEST_HEADER_LEN, Refusal as MgmtRefusal, Reply, Request, Role, Status, VolumeId,
};
use tessera_net::quic::{
    Alpn, Endpoint, PeerConnection, PeerIdentity, ReadExactError, RecvStream, SendStream,
    TlsIdentity, VarInt, serve_mgmt_stream,
};
use tessera_net::units::ByteSize;
use tracing::{debug, info, warn};

use crate::aligned::AlignedBuf;
use crate::config::StorageConfig;
use crate::error::EngineError;
use crate::format::{Geometry, Superblock, SuperblockFault};
use crate::io::{BlockDevice, IoEngine, StdDevice, UringDevice};
use crate::metrics::Metrics;
use crate::replication::{self, Replication};
use crate::store::{self, ReadPiece, Refusal, Refused, Store};

/// The device behind a store, as chosen by the config.
#[derive(Debug)]
pub enum AnyDevice {
    Uring(UringDevice),
    Std(StdDevice),
}

impl BlockDevice for AnyDevice {
    async fn read_at(
        &self,
        buf: AlignedBuf,
        range: std::ops::Range<usize>,
        pos: u64,
    ) -> (std::io::Result<()>, AlignedBuf) {
        match self {
            AnyDevice::Uring(d) => d.read_at(buf, range, pos).await,
            AnyDevice::Std(d) => d.read_at(buf, range, pos).await,
        }
    }

    async fn write_at(
        &self,
        buf: AlignedBuf,
        range: std::ops::Range<usize>,
        pos: u64,
    ) -> (std::io::Result<()>, AlignedBuf) {
        match self {
            AnyDevice::Uring(d) => d.write_at(buf, range, pos).await,
            AnyDevice::Std(d) => d.write_at(buf, range, pos).await,
        }
    }

    async fn sync_data(&self) -> std::io::Result<()> {
        match self {
            AnyDevice::Uring(d) => d.sync_data().await,
            AnyDevice::Std(d) => d.sync_data().await,
        }
    }
}

/// What to do with a device that does not hold this server's superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatPolicy {
    /// Format only a blank device (a new file, or one of zeroes): the default on start.
    IfBlank,
    /// Format whatever is there (`tessera storage format --force`).
    Force,
}

/// Open (creating if missing) and lock the data file, so that a second server
/// on the same file fails instead of corrupting it; the lock lasts as long as
/// the returned file is open.
fn open_locked(path: &Path) -> Result<(std::fs::File, RemoveOnFailure), EngineError> {
    let open = |create_new| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create_new)
            .mode(0o600)
            .open(path)
    };
    let (file, created) = match open(true) {
        Ok(file) => (Ok(file), true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (open(false), false),
        Err(e) => (Err(e), false),
    };
    let file = file.map_err(|source| EngineError::Io {
        op: "open",
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(EngineError::InUse {
            path: path.to_path_buf(),
        });
    }
    // The guard keeps a descriptor of its own, and with it the lock, until
    // it has removed the file: no other start can take the path meanwhile.
    let guard = match created {
        true => file.try_clone().ok().map(|held| (path.to_path_buf(), held)),
        false => None,
    };
    Ok((file, RemoveOnFailure(guard)))
}

/// Removes a data file this start created unless disarmed once the store
/// is open: a failed start leaves nothing behind.
struct RemoveOnFailure(Option<(std::path::PathBuf, std::fs::File)>);

impl RemoveOnFailure {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnFailure {
    fn drop(&mut self) {
        if let Some((path, _locked)) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Extend a blank data file to `size`; returns the device size.
fn prepare(file: &std::fs::File, path: &Path, size: u64) -> Result<u64, EngineError> {
    let err = |op| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { op, path, source }
    };
    let meta = file.metadata().map_err(err("stat"))?;
    if !meta.file_type().is_file() {
        // A block device keeps its size.
        let mut file = file;
        return std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(err("size"));
    }
    if meta.len() < size && superblock_is_blank(file) {
        file.set_len(size).map_err(err("extend"))?;
        // Reserve the space now so the server cannot run out of it later;
        // filesystems without fallocate keep a sparse file.
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
                debug!(%error, "fallocate unavailable; the file stays sparse");
            } else {
                // Give back what was taken: the file as it was, the space free.
                let _ = file.set_len(meta.len());
                return Err(err("reserve space for")(error));
            }
        }
        return Ok(size);
    }
    Ok(meta.len())
}

fn superblock_is_blank(file: &std::fs::File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut first = vec![0u8; 2 * crate::format::BLOCK as usize];
    match file.read_at(&mut first, 0) {
        Ok(n) => first[..n].iter().all(|b| *b == 0),
        Err(_) => false,
    }
}

fn open_device(path: &Path, engine: IoEngine) -> Result<AnyDevice, EngineError> {
    let result = match engine {
        IoEngine::Uring => UringDevice::open(path).map(AnyDevice::Uring),
        IoEngine::Std => StdDevice::open(path).map(AnyDevice::Std),
    };
    result.map_err(|source| {
        if source.raw_os_error() == Some(libc::EINVAL) && engine == IoEngine::Uring {
            EngineError::Config {
                reason: format!(
                    "{}: O_DIRECT is not supported on this filesystem (tmpfs?); put the data on a disk or set io_engine = \"std\"",
                    path.display()
                ),
            }
        } else {
            EngineError::Io {
                op: "open",
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Open (and on first start format) the store for `identity`. Must run
/// inside a tokio-uring runtime.
pub async fn open_store(
    config: &StorageConfig,
    identity: &TlsIdentity,
    policy: FormatPolicy,
) -> Result<Store<AnyDevice>, EngineError> {
    config.validate()?;
    let path = &config.data;
    let (lock, created) = open_locked(path)?;
    let device_size = prepare(&lock, path, config.size.0)?;
    let minimum = 2 * u64::from(BLOCK_SIZE);
    if device_size < minimum {
        return Err(EngineError::TooSmall {
            path: path.clone(),
            size: device_size,
            minimum,
        });
    }
    let dev = open_device(path, config.io_engine)?;
    let cluster_id = identity.cluster_id();
    let me = &identity.me().name;
    let fresh = |dev_size| -> Result<Superblock, EngineError> {
        let geometry = Geometry::compute(
            dev_size,
            config.slot_size()?,
            config.region_size()?,
            config.max_volumes,
        )?;
        Ok(Superblock {
            geometry,
            cluster_id,
            server_name: me.clone(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            incarnation: rand::random::<u64>().max(1),
        })
    };
    let found = store::read_superblock(&dev, path).await?;
    let superblock = match (found, policy) {
        (Ok(sb), FormatPolicy::IfBlank) => {
            if sb.cluster_id != cluster_id {
                return Err(EngineError::ClusterMismatch {
                    path: path.clone(),
                    expected: hex(&cluster_id),
                    found: hex(&sb.cluster_id),
                });
            }
            if &sb.server_name != me {
                return Err(EngineError::ServerMismatch {
                    path: path.clone(),
                    expected: me.clone(),
                    found: sb.server_name,
                });
            }
            if device_size < sb.geometry.device_size {
                return Err(EngineError::DeviceShrunk {
                    path: path.clone(),
                    formatted: sb.geometry.device_size,
                    now: device_size,
                });
            }
            if sb.geometry.device_size != device_size {
                warn!(
                    formatted = sb.geometry.device_size,
                    now = device_size,
                    "device size differs from the formatted size; using the formatted layout"
                );
            }
            note_format_wins(config, path, &sb.geometry);
            sb
        }
        (Err(SuperblockFault::Version(found)), FormatPolicy::IfBlank) => {
            return Err(EngineError::FormatVersion {
                path: path.clone(),
                found,
                supported: crate::format::FORMAT_VERSION,
            });
        }
        (Err(SuperblockFault::NoMagic), FormatPolicy::IfBlank) => {
            return Err(EngineError::ForeignData { path: path.clone() });
        }
        (Err(SuperblockFault::Damaged), FormatPolicy::IfBlank) => {
            return Err(EngineError::SuperblockDamaged { path: path.clone() });
        }
        (Err(SuperblockFault::Blank), _) | (_, FormatPolicy::Force) => {
            let sb = fresh(device_size)?;
            info!(
                path = %path.display(),
                size = device_size,
                slots = sb.geometry.slot_count,
                "formatting"
            );
            store::format(&dev, path, &sb).await?;
            sb
        }
    };
    let store = Store::open(dev, lock, path, superblock).await?;
    created.disarm();
    Ok(store)
}

/// Settings fixed at format time that differ from the data file's: the
/// file's values are used, and the log says so.
fn note_format_wins(config: &StorageConfig, path: &Path, formatted: &Geometry) {
    let size = |bytes: u32| ByteSize(u64::from(bytes)).to_string();
    let fixed = [
        (
            "slot_size",
            config.slot_size.to_string(),
            size(formatted.slot_size),
        ),
        (
            "region_size",
            config.region_size.to_string(),
            size(formatted.region_size),
        ),
        (
            "max_volumes",
            config.max_volumes.to_string(),
            formatted.max_volumes.to_string(),
        ),
    ];
    for (setting, configured, used) in fixed {
        if configured != used {
            info!(
                path = %path.display(),
                "{setting}: the data file was formatted with {used}, which is used; the setting ({configured}) applies to new data files only"
            );
        }
    }
    if config.size.0 != formatted.device_size {
        info!(
            path = %path.display(),
            "size: the data file holds {}; the setting ({}) applies to new data files only",
            ByteSize(formatted.device_size),
            config.size
        );
    }
}

/// The storage service: the store, and a signal to the report loop that a
/// client knows a newer epoch than this server (so its map is out of date).
#[derive(Debug)]
pub struct Service {
    pub store: Store<AnyDevice>,
    pub replication: Replication,
    pub refresh: tokio::sync::Notify,
    /// Counters for `GET /metrics`.
    pub metrics: Metrics,
    /// Payload bytes in memory across all requests, in blocks: taken before
    /// a buffer is allocated, so many headers without payloads cannot
    /// exhaust memory; requests over the budget wait.
    budget: tokio::sync::Semaphore,
}

/// Warnings any peer can cause at will are limited (`suppressed` counts
/// the lines held back since the last one).
static MALFORMED: LogLimit = LogLimit::new(10, std::time::Duration::from_secs(10));

/// Payload memory all requests together may hold.
const IO_BUDGET: usize = 256 << 20;
/// How long a peer may take to deliver a payload or accept a reply.
const STREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Service {
    pub fn new(store: Store<AnyDevice>, replication: Replication) -> Self {
        Service {
            store,
            replication,
            refresh: tokio::sync::Notify::new(),
            metrics: Metrics::default(),
            budget: tokio::sync::Semaphore::new(IO_BUDGET / BLOCK_SIZE as usize),
        }
    }
}

/// Serve on `endpoint` until it is closed.
pub async fn serve(service: Rc<Service>, endpoint: Endpoint) {
    while let Some(handshake) = endpoint.accept().await {
        let store = service.clone();
        tokio_uring::spawn(async move {
            // A refusal is logged by `finish`.
            if let Ok(conn) = handshake.finish().await {
                debug!(peer = %conn.peer(), remote = %conn.remote_address(), alpn = ?conn.alpn(), "connected");
                serve_connection(store, conn).await;
            }
        });
    }
}

async fn serve_connection(service: Rc<Service>, conn: PeerConnection) {
    while let Some((send, recv)) = conn.accept_stream().await {
        let service = service.clone();
        let peer = conn.peer().clone();
        match conn.alpn() {
            Alpn::Data => {
                tokio_uring::spawn(serve_data_stream(service, peer, send, recv));
            }
            Alpn::Mgmt => {
                tokio_uring::spawn(async move {
                    let sender = peer.clone();
                    let handled = serve_mgmt_stream(&peer, send, recv, |request| {
                        serve_mgmt_request(&service, &sender, request)
                    })
                    .await;
                    if let Err(e) = handled {
                        debug!(%peer, error = %e, "management stream failed");
                    }
                });
            }
        }
    }
}

async fn serve_mgmt_request(
    service: &Service,
    sender: &PeerIdentity,
    request: MgmtRequest,
) -> MgmtReply {
    let store = &service.store;
    match request {
        MgmtRequest::PushMap { map } => {
            let reply = store.handle_push(&map).await;
            service.replication.map_changed(service, map.id);
            reply
        }
        MgmtRequest::CheckMap { map } => match store.check_map(&map) {
            Ok(()) => MgmtReply::Applied { epoch: map.epoch },
            Err(e) => MgmtReply::Refused(refusal_of(&e)),
        },
        MgmtRequest::DropVolume { id } => match store.drop_volume(id).await {
            Ok(()) => MgmtReply::Applied { epoch: Epoch(0) },
            Err(e) => MgmtReply::Refused(MgmtRefusal::Invalid {
                reason: e.to_string(),
            }),
        },
        MgmtRequest::Ping => MgmtReply::Pong {
            epoch: store
                .volumes()
                .iter()
                .map(|v| v.epoch())
                .max()
                .unwrap_or(Epoch(0)),
        },
        request @ (MgmtRequest::DirtyRegions { .. } | MgmtRequest::Clean { .. }) => {
            replication::handle_peer_request(service, sender, request).await
        }
        MgmtRequest::RegionChecksums {
            volume,
            offset,
            length,
            region_size,
        } => region_checksums(store, volume, offset, length, region_size).await,
        other => MgmtReply::Refused(MgmtRefusal::Invalid {
            reason: format!("a storage server does not serve {}", other.operation()),
        }),
    }
}

/// crc32c of each region of a range as this replica holds it, for `volume verify`.
async fn region_checksums(
    store: &Store<AnyDevice>,
    id: VolumeId,
    offset: u64,
    length: u64,
    region_size: u32,
) -> MgmtReply {
    let invalid = |reason: String| MgmtReply::Refused(MgmtRefusal::Invalid { reason });
    let Some(volume) = store.volume(id) else {
        return MgmtReply::Refused(MgmtRefusal::NotFound {
            kind: "volume".into(),
            name: id.to_string(),
        });
    };
    let region = u64::from(region_size);
    let record = volume.record();
    let page = u64::from(record.page_size);
    let end = offset.checked_add(length);
    let valid = region_size.is_power_of_two()
        && region >= u64::from(BLOCK_SIZE)
        && region <= u64::from(proto::MAX_IO_LEN)
        && offset.is_multiple_of(region)
        && end.is_some_and(|end| end <= record.size)
        && length.div_ceil(region) <= MAX_CHECKSUM_REGIONS;
    let Some(end) = end.filter(|_| valid && length > 0) else {
        return invalid(format!(
            "range {offset}+{length} in regions of {region_size} bytes is not one this server can check"
        ));
    };
    let (first, last) = (offset / page, (end - 1) / page);
    if !record.ranges.iter().any(|(a, b)| *a <= first && last < *b) {
        return invalid(format!(
            "pages {first}..={last} are not held by this server"
        ));
    }
    let mut sums = Vec::new();
    let mut at = offset;
    while at < end {
        let len = (end - at).min(region) as u32;
        let _admitted = volume.hold().await;
        let pieces = match store.read(&volume, at, len).await {
            Ok(pieces) => pieces,
            Err(refusal) => return invalid(refusal.reason.to_string()),
        };
        let mut sum = 0u32;
        for bytes in pieces.iter().flat_map(piece_bytes) {
            sum = crc32c::crc32c_append(sum, bytes);
        }
        sums.push(sum);
        at += u64::from(len);
    }
    MgmtReply::Checksums { sums }
}

/// Bytes of zeroes to send for unwritten ranges without allocating them.
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

async fn serve_data_stream(
    service: Rc<Service>,
    peer: PeerIdentity,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    match recv.read_exact(&mut raw).await {
        Ok(()) => {}
        // The peer finished its side early, but can still read a refusal.
        Err(ReadExactError::FinishedEarly(available)) => {
            let error = proto::ProtoError::Truncated {
                needed: REQUEST_HEADER_LEN,
                available,
            };
            refuse_malformed(&service, &peer, &mut send, &mut recv, 0, error).await;
            return;
        }
        Err(e) => {
            debug!(%peer, error = %e, "request stream ended before its header");
            return;
        }
    }
    let started = std::time::Instant::now();
    let request = match proto::parse_request(&raw) {
        Ok((request, _)) => request,
        Err(e) => {
            let request_id = u64::from_le_bytes(raw[40..48].try_into().unwrap_or_default());
            refuse_malformed(&service, &peer, &mut send, &mut recv, request_id, e).await;
            return;
        }
    };
    // A request without payload must end at its header; checked before it
    // takes any budget, so a stream that never ends holds none.
    if !request.opcode.carries_payload()
        && let Err(reason) = stream_ends(&mut recv, &request).await
    {
        let refusal = Refusal::new(Epoch(0), reason);
        service.metrics.refused(refusal.status());
        refuse(&mut send, &mut recv, request.request_id, &refusal).await;
        return;
    }
    // Reads and writes hold their payload's share of the budget until the reply is sent.
    let blocks = if matches!(request.opcode, Opcode::Read | Opcode::Write) {
        request.length / BLOCK_SIZE
    } else {
        0
    };
    let Ok(_budget) = service.budget.acquire_many(blocks).await else {
        return;
    };
    let outcome = if matches!(peer.role, Role::Client | Role::Storage) {
        execute(&service, &peer, &request, &mut recv).await
    } else {
        Err(Refusal::new(
            Epoch(0),
            Refused::RoleMayNotSendData { role: peer.role },
        ))
    };
    let result = match outcome {
        Ok((epoch, pieces)) => {
            let sent = tokio::time::timeout(
                STREAM_TIMEOUT,
                send_pieces(&mut send, &request, epoch, pieces),
            )
            .await;
            match sent {
                Ok(Ok(())) => {
                    service.metrics.served(
                        request.opcode,
                        u64::from(request.length),
                        started.elapsed(),
                    );
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    let _ = send.reset(VarInt::from_u32(0));
                    Ok(())
                }
            }
        }
        Err(refusal) => {
            service.metrics.refused(refusal.status());
            debug!(%peer, id = request.request_id, status = ?refusal.status(), reason = %refusal.reason, "refused");
            refuse(&mut send, &mut recv, request.request_id, &refusal).await;
            Ok(())
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "reply not delivered");
    }
}

async fn execute(
    service: &Service,
    peer: &PeerIdentity,
    request: &Request,
    recv: &mut RecvStream,
) -> Result<(Epoch, Vec<ReadPiece>), Refusal> {
    let store = &service.store;
    if request.opcode == Opcode::Ping && request.volume == VolumeId(0) {
        return Ok((Epoch(0), Vec::new()));
    }
    let volume = store
        .lookup(request)
        .inspect_err(|_| service.refresh.notify_one())?;
    // Refuse before reading a payload or touching the disk...
    store.check(&volume, request, peer).inspect_err(|refusal| {
        if let Refused::Epoch(verdict) = refusal.reason
            && verdict.is_newer()
        {
            // The client has seen a newer map than ours: fetch it now.
            service.refresh.notify_one();
        }
    })?;
    let refusal = |reason: Refused| Refusal::new(volume.epoch(), reason);
    let payload = if request.opcode == Opcode::Write {
        let mut buf = AlignedBuf::for_overwrite(request.payload_len());
        let received = tokio::time::timeout(STREAM_TIMEOUT, recv.read_exact(&mut buf)).await;
        match received {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(refusal(Refused::PayloadNotReceived {
                    error: e.to_string(),
                }));
            }
            Err(_) => {
                return Err(refusal(Refused::PayloadTimeout {
                    after: STREAM_TIMEOUT,
                }));
            }
        }
        request
            .verify_payload(&buf)
            .map_err(|e| refusal(Refused::Malformed(e)))?;
        // Exactly the payload: the stream must end here.
        stream_ends(recv, request).await.map_err(refusal)?;
        Some(buf)
    } else {
        None
    };
    // ...and check again holding the epoch gate, which stays held until the I/O is done.
    let forwarded = request.flags & FLAG_REPLICA != 0;
    let admission = if forwarded {
        // A primary waits on this with its own gate held: queueing behind a
        // map push here could close a cycle of servers waiting on each other.
        store.try_admit(&volume, request, peer)?
    } else {
        store.admit(&volume, request, peer).await?
    };
    let epoch = admission.epoch;
    let pieces = match (request.opcode, payload) {
        (Opcode::Read, _) => store.read(&volume, request.offset, request.length).await?,
        (Opcode::Write | Opcode::Trim | Opcode::WriteZeroes, payload) => {
            if forwarded {
                replication::mirror_write(service, &volume, &admission, request, payload).await?;
            } else {
                replication::primary_write(service, &volume, admission, request, payload).await?;
            }
            Vec::new()
        }
        (Opcode::Flush, _) if !forwarded => {
            replication::primary_flush(service, &volume, admission).await?;
            Vec::new()
        }
        (Opcode::Flush, _) => {
            store.flush().await.map_err(|e| {
                Refusal::new(
                    epoch,
                    Refused::Io {
                        error: e.to_string(),
                    },
                )
            })?;
            Vec::new()
        }
        (Opcode::Ping, _) => Vec::new(),
    };
    Ok((epoch, pieces))
}

/// A request's stream holds exactly `payload_len` bytes after the header
/// and then ends; `Err` says how it did not.
async fn stream_ends(recv: &mut RecvStream, request: &Request) -> Result<(), Refused> {
    match tokio::time::timeout(STREAM_TIMEOUT, recv.read_chunk(1, true)).await {
        Ok(Ok(None)) => Ok(()),
        Ok(Ok(Some(_))) => Err(Refused::Malformed(proto::ProtoError::TrailingPayload {
            declared: request.payload_len(),
        })),
        Ok(Err(e)) => Err(Refused::PayloadNotReceived {
            error: e.to_string(),
        }),
        Err(_) => Err(Refused::StreamNotFinished {
            after: STREAM_TIMEOUT,
        }),
    }
}

fn piece_bytes(piece: &ReadPiece) -> impl Iterator<Item = &[u8]> {
    let (data, zeroes): (&[u8], usize) = match piece {
        ReadPiece::Data(buf) => (buf, 0),
        ReadPiece::Zeroes(n) => (&[], *n),
    };
    std::iter::once(data)
        .filter(|d| !d.is_empty())
        .chain(zero_chunks(zeroes))
}

/// `n` zero bytes as slices of [`ZEROES`].
fn zero_chunks<'a>(n: usize) -> impl Iterator<Item = &'a [u8]> {
    (0..n.div_ceil(ZEROES.len())).map(move |i| &ZEROES[..(n - i * ZEROES.len()).min(ZEROES.len())])
}

/// Send the reply header and the read data in one call. The data goes to
/// QUIC without a copy: each buffer becomes a `Bytes` that owns it.
async fn send_pieces(
    send: &mut SendStream,
    request: &Request,
    epoch: Epoch,
    pieces: Vec<ReadPiece>,
) -> Result<(), tessera_net::quic::QuicError> {
    let mut checksum = 0u32;
    let mut length = 0usize;
    for bytes in pieces.iter().flat_map(piece_bytes) {
        checksum = crc32c::crc32c_append(checksum, bytes);
        length += bytes.len();
    }
    let reply = Reply {
        status: Status::Ok,
        epoch,
        request_id: request.request_id,
        length: u32::try_from(length).unwrap_or(u32::MAX),
        checksum,
    };
    let mut chunks = vec![Bytes::copy_from_slice(&reply.encode())];
    for piece in pieces {
        match piece {
            ReadPiece::Data(buf) => chunks.push(Bytes::from_owner(buf)),
            ReadPiece::Zeroes(n) => chunks.extend(zero_chunks(n).map(Bytes::from_static)),
        }
    }
    send.write_all_chunks(&mut chunks).await?;
    send.finish()?;
    Ok(())
}

/// Refuse a header that does not parse: counted, logged (rate-limited) and answered.
async fn refuse_malformed(
    service: &Service,
    peer: &PeerIdentity,
    send: &mut SendStream,
    recv: &mut RecvStream,
    request_id: u64,
    error: proto::ProtoError,
) {
    if let Some(suppressed) = MALFORMED.allow() {
        warn!(%peer, error = %error, suppressed, "malformed request");
    }
    service.metrics.refused(error.status());
    let refusal = Refusal::new(Epoch(0), Refused::Malformed(error));
    refuse(send, recv, request_id, &refusal).await;
}

/// Answer with a refusal and stop reading whatever the peer still sends.
async fn refuse(send: &mut SendStream, recv: &mut RecvStream, request_id: u64, refusal: &Refusal) {
    // The reason's text is rendered here, at the edge, and cut to fit.
    let text = refusal.reason.to_string();
    let mut cut = text.len().min(proto::MAX_ERROR_MESSAGE as usize);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &text.as_bytes()[..cut];
    let reply = Reply::new(refusal.status(), refusal.epoch, request_id, message);
    let _ = recv.stop(VarInt::from_u32(0));
    let delivered = async {
        send.write_all(&reply.encode()).await?;
        send.write_all(message).await?;
        send.finish()?;
        Ok::<(), tessera_net::quic::QuicError>(())
    };
    if let Err(e) = delivered.await {
        debug!(error = %e, "refusal not delivered");
    }
}

/// Print a line scripts and tests wait for (`tessera storage NAME WHAT
/// ADDR`), then flush stdout. A reader that has gone away is no error.
pub fn announce(name: &str, what: &str, addr: std::net::SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "tessera storage {name} {what} {addr}");
    let _ = out.flush();
}

/// The management-protocol form of an engine error.
pub fn refusal_of(e: &EngineError) -> MgmtRefusal {
    match e {
        EngineError::WouldLoseData { .. } => MgmtRefusal::WouldLoseData {
            detail: e.to_string(),
        },
        _ => MgmtRefusal::Invalid {
            reason: e.to_string(),
        },
    }
}

/// Run a storage server for `config` until `shutdown` completes: bind its
/// sockets, open (or format) its data file, serve, replicate, report to the
/// management server, then flush. Must run inside a tokio-uring runtime;
/// prints `tessera storage NAME serving on ADDR` once it serves.
pub async fn run(
    config: &StorageConfig,
    identity: &TlsIdentity,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EngineError> {
    // Sockets first: a start that fails on them creates no data file.
    let endpoint = Endpoint::bind(config.listen, identity, &config.transport, &Alpn::ALL).map_err(
        |error| EngineError::ServeData {
            addr: config.listen,
            error,
        },
    )?;
    let metrics_listener = match config.metrics_listen {
        Some(listen) => Some(
            tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|error| EngineError::ServeMetrics {
                    addr: listen,
                    error,
                })?,
        ),
        None => None,
    };
    let store = open_store(config, identity, FormatPolicy::IfBlank).await?;
    let replication = Replication::new(
        identity.me().name.clone(),
        store.superblock().geometry.region_size,
        &endpoint,
        replication::ReplicationSettings {
            forward_timeout: std::time::Duration::from_millis(config.forward_timeout_ms),
            resync_rate: config.resync_rate.0,
            clean_interval: std::time::Duration::from_millis(config.clean_interval_ms),
            clean_after: std::time::Duration::from_millis(config.clean_after_ms),
            mgmt: config.mgmt.map(|addr| (addr, config.mgmt_name.clone())),
        },
    );
    let service = Rc::new(Service::new(store, replication));
    let addr = endpoint.local_addr()?;
    let name = &identity.me().name;
    info!(%name, %addr, data = %config.data.display(), "serving");
    announce(name, "serving on", addr);
    if let Some(listener) = metrics_listener {
        let bound = listener
            .local_addr()
            .map_err(|error| EngineError::ServeMetrics {
                addr: config.metrics_listen.unwrap_or(addr),
                error,
            })?;
        info!(addr = %bound, "metrics at http://{bound}/metrics");
        // After the "serving on" line, which scripts wait for first.
        announce(name, "metrics on", bound);
        tokio_uring::spawn(crate::metrics::serve_metrics(service.clone(), listener));
    }
    tokio_uring::spawn(serve(service.clone(), endpoint.clone()));
    tokio_uring::spawn(replication::replication_loop(service.clone()));
    if let Some(mgmt) = config.mgmt {
        let target = crate::report::ReportTarget {
            addr: mgmt,
            name: config.mgmt_name.clone(),
            advertise: config.advertise.unwrap_or(addr),
            interval: std::time::Duration::from_millis(config.heartbeat_ms),
        };
        tokio_uring::spawn(crate::report::report_loop(
            service.clone(),
            endpoint.clone(),
            target,
        ));
    }
    shutdown.await;
    info!("shutting down");
    endpoint.close();
    service.store.flush().await
}
