//! Typed rejections of bytes read from the network.

use super::header::{Opcode, Status};

/// Why a frame, header or payload read from the network was rejected.
///
/// Every variant is a distinct fault so that a peer (and a log) can tell what
/// was wrong; [`ProtoError::status`] maps each one to the reply status that
/// the data service sends back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Fewer bytes than a fixed header needs.
    #[error("truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    /// The first four bytes are not the expected magic number.
    #[error("bad magic {found:#010x} (expected {expected:#010x})")]
    BadMagic { found: u32, expected: u32 },
    /// The header's protocol version is not one this build speaks.
    #[error("unsupported protocol version {found} (this build speaks {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    /// The opcode byte names no known operation.
    #[error("unknown opcode {found:#04x}")]
    UnknownOpcode { found: u8 },
    /// The reply status byte names no known status.
    #[error("unknown status {found:#04x}")]
    UnknownStatus { found: u8 },
    /// Flag bits are set that this version does not define.
    #[error("unknown flag bits {found:#04x}")]
    UnknownFlags { found: u8 },
    /// RESYNC is set without REPLICA: only a primary's forwarded copy may carry it.
    #[error("flags {flags:#04x}: RESYNC (bit 2) is only valid with REPLICA (bit 1)")]
    ResyncWithoutReplica { flags: u8 },
    /// Offset or length is not a multiple of the block size.
    #[error("offset {offset} or length {length} is not a multiple of {block} bytes")]
    Misaligned {
        offset: u64,
        length: u32,
        block: u32,
    },
    /// Length is larger than one request may carry.
    #[error("length {length} is over the maximum of {max} bytes")]
    LengthTooLarge { length: u32, max: u32 },
    /// `offset + length` does not fit in 64 bits.
    #[error("range at offset {offset} with length {length} overflows")]
    RangeOverflow { offset: u64, length: u32 },
    /// The length does not suit the opcode (e.g. a READ of zero bytes, a FLUSH with a range).
    #[error("{opcode:?} does not take offset {offset} and length {length}")]
    BadRange {
        opcode: Opcode,
        offset: u64,
        length: u32,
    },
    /// A reply that is not OK carries more than a short error message.
    #[error("{status:?} reply carries {length} bytes, more than the {max} allowed for a message")]
    ErrorMessageTooLong {
        status: Status,
        length: u32,
        max: u32,
    },
    /// The payload has another length than the header announced.
    #[error("payload is {actual} bytes, header says {declared}")]
    PayloadLength { declared: usize, actual: usize },
    /// The request's stream goes on past the payload the header declares.
    #[error("the stream carries more than the {declared} payload bytes the header declares")]
    TrailingPayload { declared: usize },
    /// The payload's crc32c is not the one the header carries.
    #[error("payload checksum {actual:#010x} does not match header {expected:#010x}")]
    ChecksumMismatch { expected: u32, actual: u32 },
    /// A request without a payload carries a non-zero checksum.
    #[error("checksum {found:#010x} given for an operation without payload")]
    UnexpectedChecksum { found: u32 },
    /// A management frame announces more bytes than the maximum frame size.
    #[error("frame of {length} bytes is over the maximum of {max}")]
    FrameTooLarge { length: u32, max: u32 },
    /// A management frame is too short to hold its version field.
    #[error("frame of {length} bytes is too short")]
    FrameTooShort { length: u32 },
    /// A management frame of another protocol version.
    #[error("unsupported management protocol version {found} (this build speaks {supported})")]
    UnsupportedMgmtVersion { found: u16, supported: u16 },
    /// The management message body does not decode.
    #[error("malformed management message: {reason}")]
    Malformed { reason: String },
    /// Trailing bytes after a complete management message.
    #[error("{extra} trailing bytes after the management message")]
    TrailingBytes { extra: usize },
    /// A map's partitions are out of order or overlap.
    #[error(
        "partition {index} (pages {first_page}..{end_page}) ends before it starts or overlaps the one before"
    )]
    PartitionOrder {
        index: usize,
        first_page: u64,
        end_page: u64,
    },
    /// The message could not be encoded (a bug or an over-large message).
    #[error("cannot encode message: {reason}")]
    Encode { reason: String },
}

impl ProtoError {
    /// The reply status the data service answers this rejection with.
    pub fn status(&self) -> Status {
        match self {
            ProtoError::ChecksumMismatch { .. } => Status::ChecksumMismatch,
            _ => Status::BadRequest,
        }
    }
}
