use std::path::PathBuf;

use tessera_net::proto::{Epoch, VolumeId};
use tessera_net::quic::QuicError;

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
    /// The device is too small for the metadata and one data slot.
    #[error("device of {size} bytes is too small: at least {minimum} bytes are needed")]
    TooSmall { size: u64, minimum: u64 },
    /// Invalid geometry or configuration value.
    #[error("invalid configuration: {reason}")]
    Config { reason: String },
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
    #[error("{}: device has {now} bytes but was formatted with {formatted}", path.display())]
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
    /// The transport failed.
    #[error(transparent)]
    Net(#[from] QuicError),
}
