//! Management messages: versioned serde enums in length-prefixed frames.
//!
//! A frame is `length: u32 LE` (bytes after this field), `version: u16 LE`,
//! then the postcard encoding of the message. The length is checked against
//! [`MAX_FRAME_LEN`] before anything is allocated, and the version before the
//! body is decoded.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::ProtoError;
use super::header::{Epoch, VolumeId};

/// Management protocol version carried in every frame.
pub const MGMT_VERSION: u16 = 2;
/// The largest management frame accepted (after the length field).
pub const MAX_FRAME_LEN: u32 = 8 << 20;
/// Bytes before the message body: length and version.
pub const FRAME_PREFIX_LEN: usize = 6;

/// What a certificate entitles its holder to; carried in the certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A management server.
    Mgmt,
    /// A storage server.
    Storage,
    /// An application (driver) reading and writing volumes.
    Client,
    /// An operator changing the configuration map.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Mgmt, Role::Storage, Role::Client, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Mgmt => "mgmt",
            Role::Storage => "storage",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown role name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected mgmt, storage, client or admin")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// State of one replica of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MirrorState {
    InSync,
    OutOfSync,
    Resyncing,
}

/// One replica of a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// The storage server's certificate name.
    pub server: String,
    /// Where its data service listens.
    pub addr: SocketAddr,
    pub state: MirrorState,
}

/// A range of pages `[first_page, end_page)` and its replicas (first = primary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub first_page: u64,
    pub end_page: u64,
    pub replicas: Vec<Replica>,
}

/// The slice of the configuration map a client or server needs for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMap {
    pub id: VolumeId,
    pub name: String,
    /// The epoch at which this volume's layout last changed.
    pub epoch: Epoch,
    pub size: u64,
    pub page_size: u32,
    /// Sorted by first page and disjoint ([`VolumeMap::check_layout`]).
    pub partitions: Vec<Partition>,
}

impl VolumeMap {
    /// The partition holding `page`, by binary search over the sorted partitions.
    pub fn partition_at(&self, page: u64) -> Option<&Partition> {
        self.partition_index_at(page).map(|i| &self.partitions[i])
    }

    /// The index in `partitions` of the partition holding `page`.
    pub fn partition_index_at(&self, page: u64) -> Option<usize> {
        let i = self.partitions.partition_point(|p| p.end_page <= page);
        self.partitions
            .get(i)
            .filter(|p| p.first_page <= page && page < p.end_page)
            .map(|_| i)
    }

    /// The partition that starts at `first_page` (how peers name a partition).
    pub fn partition_starting_at(&self, first_page: u64) -> Option<&Partition> {
        self.partition_at(first_page)
            .filter(|p| p.first_page == first_page)
    }

    /// The page ranges `server` holds a replica of, merged and sorted.
    pub fn owned_ranges(&self, server: &str) -> Vec<(u64, u64)> {
        let mut merged: Vec<(u64, u64)> = Vec::new();
        let held = self
            .partitions
            .iter()
            .filter(|p| p.first_page < p.end_page && p.replicas.iter().any(|r| r.server == server));
        for p in held {
            match merged.last_mut() {
                Some(last) if p.first_page <= last.1 => last.1 = last.1.max(p.end_page),
                _ => merged.push((p.first_page, p.end_page)),
            }
        }
        merged
    }

    /// Partitions in order, none overlapping the one before: what the
    /// lookups above rely on. Checked on every map a server or client takes.
    pub fn check_layout(&self) -> Result<(), ProtoError> {
        let mut end = 0;
        for (index, p) in self.partitions.iter().enumerate() {
            if p.first_page < end || p.end_page < p.first_page {
                return Err(ProtoError::PartitionOrder {
                    index,
                    first_page: p.first_page,
                    end_page: p.end_page,
                });
            }
            end = p.end_page;
        }
        Ok(())
    }
}

/// Changes only an admin may make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminCommand {
    CreateVolume {
        name: String,
        size: u64,
        page_size: u32,
        replicas: u8,
        /// Restrict placement to these servers (all servers when `None`).
        servers: Option<Vec<String>>,
    },
    DeleteVolume {
        name: String,
    },
    ResizeVolume {
        name: String,
        size: u64,
    },
    RemoveServer {
        name: String,
        force: bool,
    },
    /// Give pages `[first_page, end_page)` of a volume to `servers` (first = primary).
    SetPartition {
        volume: String,
        first_page: u64,
        end_page: u64,
        servers: Vec<String>,
    },
}

/// A storage server as the management server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub name: String,
    pub addr: SocketAddr,
    pub capacity: u64,
    pub up: bool,
    /// The epochs it last reported holding, per volume.
    pub held: Vec<(VolumeId, Epoch)>,
    /// Bytes it has copied to mirrors by resync since it started.
    pub resynced_bytes: u64,
}

/// Progress of a resync, as its primary reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncProgress {
    /// Regions to copy when the resync (re)started, and copied since.
    pub total_regions: u64,
    pub copied_regions: u64,
    /// Copy rate over the resync so far.
    pub bytes_per_sec: u64,
}

/// A primary's view of one mirror of one partition: what its bitmask holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorReport {
    /// The reporting server (the partition's primary); set by the management server.
    pub reporter: String,
    pub volume: VolumeId,
    pub first_page: u64,
    /// The mirror.
    pub peer: String,
    /// Regions the mirror may lack the primary's version of.
    pub dirty_regions: u64,
    pub region_size: u32,
    pub resync: Option<ResyncProgress>,
}

/// The whole configuration map, for `tessera status` and listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub epoch: Epoch,
    pub servers: Vec<ServerStatus>,
    pub volumes: Vec<VolumeMap>,
    /// The latest bitmask reports of every primary.
    pub mirrors: Vec<MirrorReport>,
}

/// One mirror of one partition as the management server's monitor sees it:
/// its state, what may differ from the primary, and resync progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStatus {
    pub volume: String,
    pub first_page: u64,
    pub end_page: u64,
    pub primary: String,
    pub mirror: String,
    pub state: MirrorState,
    /// Regions (and bytes) the mirror may lack, per the primary's bitmask;
    /// zero for a mirror in sync.
    pub differing_regions: u64,
    pub differing_bytes: u64,
    pub resync_total_regions: u64,
    pub resync_copied_regions: u64,
    pub resync_bytes_per_sec: u64,
    /// Seconds until a resync finishes at its current rate.
    pub eta_secs: Option<u64>,
    /// Whether the management server counts each server as up, and how
    /// long ago it last heard from it (in this management process).
    pub primary_up: bool,
    pub mirror_up: bool,
    pub primary_heard_ms: Option<u64>,
    pub mirror_heard_ms: Option<u64>,
}

/// A request to a management server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MgmtRequest {
    /// Liveness check; any role.
    Ping,
    /// A storage server announces itself (its name comes from its certificate).
    Register {
        data_addr: SocketAddr,
        capacity: u64,
        /// Random per format of its disk: a new value means the disk was
        /// replaced or wiped and its replicas need a full copy.
        incarnation: u64,
        /// Random per start of the server's process: a new value means the
        /// process restarted, and its mirrors are checked by a resync.
        boot: u64,
    },
    /// A storage server reports that it is alive and which epochs it holds.
    Heartbeat { held: Vec<(VolumeId, Epoch)> },
    /// Fetch one volume's map slice.
    GetMap { volume: String },
    /// Change the configuration map.
    Admin(AdminCommand),
    /// The whole map: servers, volumes, epochs.
    Status,
    /// Management server to storage server: the new map slice of a volume.
    /// Acknowledged with `Applied` once the server holds the new epoch durably
    /// and no request admitted under the old one is still running.
    PushMap { map: VolumeMap },
    /// Management server to storage server: would `PushMap { map }` be
    /// refused because it takes pages that hold data from the server?
    /// Answered `Applied` (it would not) or `Refused(WouldLoseData)`.
    CheckMap { map: VolumeMap },
    /// Management server to storage server: the volume was deleted; free its data.
    DropVolume { id: VolumeId },
    /// A primary could not forward a write to `server`, its mirror of the
    /// partition at `first_page`: mark it out of sync. Answered once that is
    /// durable, so the primary may then acknowledge the write.
    MirrorFailed {
        volume: VolumeId,
        epoch: Epoch,
        first_page: u64,
        server: String,
    },
    /// A primary finished resyncing `server`: mark it in sync.
    ResyncDone {
        volume: VolumeId,
        epoch: Epoch,
        first_page: u64,
        server: String,
    },
    /// A storage server's bitmask counts and resync progress, for the monitor.
    ReportMirrors {
        mirrors: Vec<MirrorReport>,
        resynced_bytes: u64,
    },
    /// Storage server to storage server: the regions of `volume` you hold
    /// bits for `peer` in (answered with `Regions`).
    DirtyRegions { volume: VolumeId, peer: String },
    /// Storage server to storage server: `regions` are equal on every replica
    /// named in `peers`; clear your bits for them.
    /// Only from the primary of the partition at `first_page`, at the
    /// volume's current epoch; regions outside the partition are ignored.
    Clean {
        volume: VolumeId,
        epoch: Epoch,
        first_page: u64,
        peers: Vec<String>,
        regions: Vec<(u64, u64)>,
        /// The sender's region size (the unit of `regions`).
        region_size: u32,
    },
    /// Admin to storage server: crc32c of each region of
    /// `[offset, offset + length)` as this replica holds it (`Checksums`).
    RegionChecksums {
        volume: VolumeId,
        offset: u64,
        length: u64,
        region_size: u32,
    },
    /// Every mirror of every partition as the management server's monitor
    /// judges it (`MirrorStatus`).
    MirrorStatus,
}

/// The most regions one `RegionChecksums` request covers.
pub const MAX_CHECKSUM_REGIONS: u64 = 16_384;

/// Sorted region numbers as runs `[first, end)`.
pub fn region_runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for r in sorted {
        match runs.last_mut() {
            Some(last) if last.1 == *r => last.1 = r + 1,
            _ => runs.push((*r, r + 1)),
        }
    }
    runs
}

impl MgmtRequest {
    /// Short name for logs and refusals.
    pub fn operation(&self) -> &'static str {
        match self {
            MgmtRequest::Ping => "ping",
            MgmtRequest::Register { .. } => "register",
            MgmtRequest::Heartbeat { .. } => "heartbeat",
            MgmtRequest::GetMap { .. } => "get-map",
            MgmtRequest::Admin(_) => "admin",
            MgmtRequest::Status => "status",
            MgmtRequest::PushMap { .. } => "push-map",
            MgmtRequest::DropVolume { .. } => "drop-volume",
            MgmtRequest::CheckMap { .. } => "check-map",
            MgmtRequest::MirrorFailed { .. } => "mirror-failed",
            MgmtRequest::ResyncDone { .. } => "resync-done",
            MgmtRequest::ReportMirrors { .. } => "report-mirrors",
            MgmtRequest::DirtyRegions { .. } => "dirty-regions",
            MgmtRequest::Clean { .. } => "clean",
            MgmtRequest::RegionChecksums { .. } => "region-checksums",
            MgmtRequest::MirrorStatus => "mirror-status",
        }
    }

    /// Whether a peer holding `role` may make this request.
    pub fn permits(&self, role: Role) -> bool {
        match self {
            MgmtRequest::Ping => true,
            MgmtRequest::Register { .. }
            | MgmtRequest::Heartbeat { .. }
            | MgmtRequest::MirrorFailed { .. }
            | MgmtRequest::ResyncDone { .. }
            | MgmtRequest::ReportMirrors { .. }
            | MgmtRequest::DirtyRegions { .. }
            | MgmtRequest::Clean { .. } => role == Role::Storage,
            MgmtRequest::RegionChecksums { .. } => role == Role::Admin,
            MgmtRequest::GetMap { .. } => true,
            MgmtRequest::Admin(_) => role == Role::Admin,
            MgmtRequest::Status | MgmtRequest::MirrorStatus => {
                matches!(role, Role::Admin | Role::Mgmt)
            }
            MgmtRequest::PushMap { .. }
            | MgmtRequest::CheckMap { .. }
            | MgmtRequest::DropVolume { .. } => role == Role::Mgmt,
        }
    }
}

/// Why a management request was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("role {role} may not {operation}")]
    Forbidden { role: Role, operation: String },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: String, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: String, name: String },
    #[error("invalid request: {reason}")]
    Invalid { reason: String },
    /// Reserved for lock-manager fencing: nothing sends it yet.
    #[error("client {client:?} is fenced from volume {volume:?}")]
    Fenced { volume: String, client: String },
    #[error("management server unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    /// The change would drop written data (moving data is not supported yet).
    #[error("{detail}")]
    WouldLoseData { detail: String },
    /// The request's epoch is not the current one.
    #[error("epoch {request} is not the current {current}")]
    StaleEpoch { request: Epoch, current: Epoch },
}

/// A management server's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MgmtReply {
    Pong {
        epoch: Epoch,
    },
    /// Answer to `Register`, with the lease each acknowledged heartbeat
    /// grants (counted from when the heartbeat was sent): the server admits
    /// no request once it has run out.
    Registered {
        epoch: Epoch,
        lease_ms: u64,
    },
    Map(VolumeMap),
    /// An admin command was applied; the cluster is now at `epoch`.
    Applied {
        epoch: Epoch,
    },
    /// Answer to a heartbeat: map slices the server does not hold at their
    /// current epoch, and volumes it holds that no longer exist.
    Maps {
        epoch: Epoch,
        maps: Vec<VolumeMap>,
        dropped: Vec<VolumeId>,
    },
    Status(ClusterStatus),
    Refused(Refusal),
    /// Answer to `DirtyRegions`: `all` when this replica must be copied whole.
    Regions {
        all: bool,
        regions: Vec<(u64, u64)>,
        region_size: u32,
    },
    /// Answer to `RegionChecksums`, one per region.
    Checksums {
        sums: Vec<u32>,
    },
    /// Answer to `MirrorStatus`.
    MirrorStatus(Vec<MirrorStatus>),
}

/// Encode `message` as one frame.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, ProtoError> {
    let mut out = vec![0u8; FRAME_PREFIX_LEN];
    out = postcard::to_extend(message, out).map_err(|e| ProtoError::Encode {
        reason: e.to_string(),
    })?;
    let length = u32::try_from(out.len() - 4)
        .ok()
        .filter(|len| *len <= MAX_FRAME_LEN)
        .ok_or(ProtoError::Encode {
            reason: format!("frame of {} bytes is over the maximum", out.len()),
        })?;
    out[..4].copy_from_slice(&length.to_le_bytes());
    out[4..6].copy_from_slice(&MGMT_VERSION.to_le_bytes());
    Ok(out)
}

/// The number of bytes that follow a frame's 4-byte length field, checked
/// against [`MAX_FRAME_LEN`] so the caller may allocate that much.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtoError> {
    let length = u32::from_le_bytes(prefix);
    if length > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            length,
            max: MAX_FRAME_LEN,
        });
    }
    if (length as usize) < FRAME_PREFIX_LEN - 4 {
        return Err(ProtoError::FrameTooShort { length });
    }
    Ok(length as usize)
}

/// Decode the part of a frame after its length field (version and body).
pub fn decode_frame_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtoError> {
    let Some((version, message)) = body.split_first_chunk::<2>() else {
        return Err(ProtoError::FrameTooShort {
            length: u32::try_from(body.len()).unwrap_or(u32::MAX),
        });
    };
    let version = u16::from_le_bytes(*version);
    if version != MGMT_VERSION {
        return Err(ProtoError::UnsupportedMgmtVersion {
            found: version,
            supported: MGMT_VERSION,
        });
    }
    let (value, rest) = postcard::take_from_bytes(message).map_err(|e| ProtoError::Malformed {
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(ProtoError::TrailingBytes { extra: rest.len() });
    }
    Ok(value)
}

/// Decode one whole frame from the front of `buf`; returns the message and
/// the number of bytes it took. `Truncated` means more bytes are needed.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<(T, usize), ProtoError> {
    let Some((prefix, rest)) = buf.split_first_chunk::<4>() else {
        return Err(ProtoError::Truncated {
            needed: 4,
            available: buf.len(),
        });
    };
    let length = frame_len(*prefix)?;
    let Some(body) = rest.get(..length) else {
        return Err(ProtoError::Truncated {
            needed: 4 + length,
            available: buf.len(),
        });
    };
    Ok((decode_frame_body(body)?, 4 + length))
}
