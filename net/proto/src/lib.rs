//! The wire protocol, sans-IO: no sockets, no async runtime.
//!
//! * [`epoch`]: the configuration epoch and its one judge, [`EpochVerdict`].
//! * [`header`]: the fixed data-path request and reply headers (zerocopy),
//!   opcodes, statuses, crc32c payload checks and their validation.
//! * [`mgmt`]: management messages (serde) in versioned, length-prefixed frames.
//! * [`units`]: human-readable byte sizes, as configs and messages use them.
//!
//! Everything here reads untrusted bytes and returns a typed [`ProtoError`];
//! nothing panics and nothing allocates from an unchecked length.

pub mod epoch;
pub mod error;
pub mod header;
pub mod mgmt;
pub mod units;

pub use epoch::EpochVerdict;
pub use error::ProtoError;
pub use header::{
    BLOCK_SIZE, Epoch, FLAG_FUA, FLAG_REPLICA, FLAG_RESYNC, Forward, MAX_ERROR_MESSAGE, MAX_IO_LEN,
    MAX_VOLUME_SIZE, Opcode, REPLY_HEADER_LEN, REQUEST_HEADER_LEN, Reply, Request, Status,
    VolumeId, checksum, parse_reply, parse_request,
};
pub use mgmt::{
    AdminCommand, ClusterStatus, MAX_CHECKSUM_REGIONS, MAX_FRAME_LEN, MgmtReply, MgmtRequest,
    MirrorReport, MirrorState, MirrorStatus, Partition, Refusal, Replica, ResyncProgress, Role,
    ServerStatus, VolumeMap, decode_frame, decode_frame_body, encode_frame, frame_len, region_runs,
};

#[cfg(test)]
mod tests;
