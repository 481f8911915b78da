use std::path::PathBuf;

use tessera_net::proto::{Epoch, Refusal as MgmtRefusal, VolumeId};
use tessera_net::quic::QuicError;
use tessera_net::units::ByteSize;

use crate::disk::format::GeometryError;

/// Everything the storage server can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A disk or file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process has the data file open.
    #[error("{} is in use by another storage server", path.display())]
    InUse { path: PathBuf },
    /// The file or device holds no Tessera superblock and is not blank.
    #[error(
        "{} holds data that is not a Tessera data file; refusing to touch it (use `tessera storage format --force` to overwrite)",
        path.display()
    )]
    ForeignData { path: PathBuf },
    /// The file or device has never been formatted.
    #[error("{} is not formatted (run `tessera storage format`)", path.display())]
    NotFormatted { path: PathBuf },
    /// Both superblock copies are damaged.
    #[error("{}: both superblock copies are damaged", path.display())]
    SuperblockDamaged { path: PathBuf },
    /// Written by another on-disk format version.
    #[error("{}: on-disk format version {found}, this build reads {supported}", path.display())]
    FormatVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// Formatted for another cluster (another CA).
    #[error("{}: belongs to cluster {found}, not this cluster {expected}", path.display())]
    ClusterMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    /// Formatted for another storage server name.
    #[error("{}: formatted for server {found:?}, but this server is {expected:?}", path.display())]
    ServerMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    /// The file or device cannot hold even a superblock.
    #[error("{} is {}, too small to be a Tessera data file (at least {} is needed); give a larger --size for a new file, or another device", path.display(), ByteSize(*size), ByteSize(*minimum))]
    TooSmall {
        path: PathBuf,
        size: u64,
        minimum: u64,
    },
    /// A setting has a value the server cannot use.
    #[error("{setting} = {value}: {reason}")]
    InvalidSetting {
        setting: &'static str,
        value: String,
        reason: String,
    },
    /// The config file does not parse.
    #[error("config file {}, line {line}, column {column}: {reason}", path.display())]
    ConfigFile {
        path: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
    /// Invalid geometry or configuration value.
    #[error("invalid configuration: {reason}")]
    Config { reason: String },
    /// The device cannot be laid out with the configured parameters.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    /// Both copies of a metadata block are damaged.
    #[error("metadata block {block} is damaged in both copies")]
    MetadataDamaged { block: u64 },
    /// No free data slot is left.
    #[error("no free data slot left")]
    NoSpace,
    /// The volume table is full.
    #[error("volume table is full ({max} volumes)")]
    TooManyVolumes { max: u32 },
    /// A volume's owned page ranges do not fit in its record.
    #[error("volume {volume} has {count} page ranges on this server, at most {max} fit")]
    TooManyRanges {
        volume: VolumeId,
        count: usize,
        max: usize,
    },
    /// A pushed map would move a volume's epoch backwards.
    #[error("volume {volume}: pushed epoch {pushed} is older than the held {current}")]
    EpochRegression {
        volume: VolumeId,
        current: Epoch,
        pushed: Epoch,
    },
    /// A map would take pages from this server while it holds data in them.
    #[error("volume {volume} has data in pages {pages} that the new map takes from this server")]
    WouldLoseData { volume: VolumeId, pages: String },
    /// The device is smaller than when it was formatted.
    #[error("{} is {} but was formatted with {}: it was truncated or replaced; restore the file, or wipe it with `tessera storage format --force` and let the mirrors resync it", path.display(), ByteSize(*now), ByteSize(*formatted))]
    DeviceShrunk {
        path: PathBuf,
        formatted: u64,
        now: u64,
    },
    /// A metadata write failed earlier; the store serves nothing until restarted.
    #[error("the store stopped after a metadata write error; restart the server")]
    Stopped,
    /// More regions are dirty than the bitmask pool reserved at format time can record.
    #[error("the bitmask pool ({blocks} blocks) is full: too many regions differ between replicas")]
    BitmaskPoolFull { blocks: u64 },
    /// The data and management endpoint could not be set up.
    #[error("cannot serve data on {addr}: {error}")]
    ServeData {
        addr: std::net::SocketAddr,
        error: QuicError,
    },
    /// The metrics listener could not be set up.
    #[error("cannot serve metrics on {addr}: {error}")]
    ServeMetrics {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    /// The transport failed.
    #[error(transparent)]
    Net(#[from] QuicError),
    /// The management server did not answer a call in time: its process may
    /// be gone without closing the connection.
    #[error("the management server did not answer within {after:?}")]
    MgmtSilent { after: std::time::Duration },
}

impl EngineError {
    /// The management-protocol form of this error, for a refused push or check.
    pub fn to_mgmt_refusal(&self) -> MgmtRefusal {
        match self {
            EngineError::WouldLoseData { .. } => MgmtRefusal::WouldLoseData {
                detail: self.to_string(),
            },
            _ => MgmtRefusal::Invalid {
                reason: self.to_string(),
            },
        }
    }
}
