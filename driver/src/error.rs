use tessera_net::proto::{Refusal, Status};
use tessera_net::quic::QuicError;
use tessera_net::units::ByteSize;

/// What an application sees when a volume operation fails.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// This client is fenced from the volume (a lock was revoked).
    #[error("fenced from volume {volume}")]
    Fenced { volume: String },
    /// No server could serve the request within the retry budget.
    #[error("volume {volume} unavailable: {reason}")]
    Unavailable { volume: String, reason: String },
    /// The range lies (partly) past the end of the volume.
    #[error("range {offset}+{len} is past the end of the volume ({})", ByteSize(*size))]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// Offsets and lengths must be multiples of the block size.
    #[error("offset {offset} and length {len} must be multiples of {block}")]
    Misaligned { offset: u64, len: u64, block: u32 },
    /// The storage server failed the operation.
    #[error("I/O error ({status:?}): {message}")]
    Io { status: Status, message: String },
    /// The management server refused (e.g. no such volume).
    #[error("management server: {0}")]
    Refused(Refusal),
    /// The management server sent a map this client cannot use (its
    /// partitions out of order, or a page size of 0).
    #[error("the map of volume {volume} is not usable: {reason}")]
    UnusableMap { volume: String, reason: String },
    /// None of the management servers could be reached.
    #[error("no management server reachable: {reason}")]
    NoManagement { reason: String },
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] QuicError),
}
