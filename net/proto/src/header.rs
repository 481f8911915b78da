//! Fixed-size data-path headers, parsed in place with zerocopy.
//!
//! Layouts are frozen by golden-byte tests; any change is a new
//! [`PROTOCOL_VERSION`]. All integers are little-endian.

use std::fmt;

use serde::{Deserialize, Serialize};
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub use super::epoch::Epoch;
use super::error::ProtoError;

/// `b"TSRQ"` read as a little-endian u32.
pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"TSRQ");
/// `b"TSRP"` read as a little-endian u32.
pub const REPLY_MAGIC: u32 = u32::from_le_bytes(*b"TSRP");
/// Data protocol version carried in every header.
pub const PROTOCOL_VERSION: u16 = 2;
/// Every offset and length on the data path is a multiple of this.
pub const BLOCK_SIZE: u32 = 4096;
/// The largest range one request may cover (drivers split larger I/O).
pub const MAX_IO_LEN: u32 = 4 << 20;
/// The largest volume: keeps every byte offset computation far from overflow.
pub const MAX_VOLUME_SIZE: u64 = 1 << 60;
/// The longest error message an error reply may carry.
pub const MAX_ERROR_MESSAGE: u32 = 1024;
/// Size of [`RequestHeader`] on the wire.
pub const REQUEST_HEADER_LEN: usize = 64;
/// Size of [`ReplyHeader`] on the wire.
pub const REPLY_HEADER_LEN: usize = 32;

/// Force unit access: the write is durable when acknowledged.
pub const FLAG_FUA: u8 = 0x01;
/// Forwarded by a partition's primary to a mirror: apply here, do not forward
/// (storage role only).
pub const FLAG_REPLICA: u8 = 0x02;
/// With [`FLAG_REPLICA`]: a resync copy of the primary's version of a region,
/// not a client write.
pub const FLAG_RESYNC: u8 = 0x04;
const KNOWN_FLAGS: u8 = FLAG_FUA | FLAG_REPLICA | FLAG_RESYNC;

/// What a primary forwards to a mirror: a client's request, or a resync copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// A client's write, trim, zeroing or flush: the mirror sets its bits first.
    Client,
    /// The primary's version of a region, copied by resync.
    Resync,
}

/// A volume's identity, assigned by the management server.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct VolumeId(pub u64);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vol-{}", self.0)
    }
}

/// Operations on the data path.
///
/// Values `0x40..=0x7f` are reserved for server-to-server traffic
/// (replication, resync, migration) and are added as those features land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Read = 0x01,
    Write = 0x02,
    Flush = 0x03,
    Trim = 0x04,
    WriteZeroes = 0x05,
    Ping = 0x06,
}

impl Opcode {
    pub const ALL: [Opcode; 6] = [
        Opcode::Read,
        Opcode::Write,
        Opcode::Flush,
        Opcode::Trim,
        Opcode::WriteZeroes,
        Opcode::Ping,
    ];

    pub fn from_u8(value: u8) -> Result<Self, ProtoError> {
        Self::ALL
            .into_iter()
            .find(|op| *op as u8 == value)
            .ok_or(ProtoError::UnknownOpcode { found: value })
    }

    /// Whether the request carries `length` payload bytes after its header.
    pub fn carries_payload(self) -> bool {
        self == Opcode::Write
    }

    /// Whether the request addresses a block range (else offset and length are 0).
    pub fn has_range(self) -> bool {
        matches!(
            self,
            Opcode::Read | Opcode::Write | Opcode::Trim | Opcode::WriteZeroes
        )
    }
}

/// Reply status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// The request's epoch is not the server's; the reply's epoch is the server's.
    StaleEpoch = 1,
    /// The client is fenced from this volume. Reserved for lock-manager
    /// fencing: no server sends it yet (the driver already handles it).
    Fenced = 2,
    /// The server does not hold this volume or page.
    NotOwner = 3,
    /// The range lies past the end of the volume.
    OutOfRange = 4,
    /// The request is malformed (the message says how).
    BadRequest = 5,
    /// The payload does not match its checksum.
    ChecksumMismatch = 6,
    /// The disk failed the operation.
    IoError = 7,
    /// The server cannot serve now (starting, shutting down, overloaded).
    Unavailable = 8,
    /// The peer's role may not make this request.
    Forbidden = 9,
}

impl Status {
    pub const ALL: [Status; 10] = [
        Status::Ok,
        Status::StaleEpoch,
        Status::Fenced,
        Status::NotOwner,
        Status::OutOfRange,
        Status::BadRequest,
        Status::ChecksumMismatch,
        Status::IoError,
        Status::Unavailable,
        Status::Forbidden,
    ];

    pub fn from_u8(value: u8) -> Result<Self, ProtoError> {
        Self::ALL
            .into_iter()
            .find(|s| *s as u8 == value)
            .ok_or(ProtoError::UnknownStatus { found: value })
    }
}

/// The 64-byte request header as it lies on the wire.
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestHeader {
    pub magic: U32,
    pub version: U16,
    pub opcode: u8,
    pub flags: u8,
    pub volume: U64,
    pub epoch: U64,
    pub offset: U64,
    pub length: U32,
    pub checksum: U32,
    pub request_id: U64,
    pub session: U64,
    pub sequence: U64,
}
const _: () = assert!(size_of::<RequestHeader>() == REQUEST_HEADER_LEN);

/// The 32-byte reply header as it lies on the wire.
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReplyHeader {
    pub magic: U32,
    pub version: U16,
    pub status: u8,
    pub flags: u8,
    pub epoch: U64,
    pub request_id: U64,
    pub length: U32,
    pub checksum: U32,
}
const _: () = assert!(size_of::<ReplyHeader>() == REPLY_HEADER_LEN);

/// crc32c of a payload; the empty payload has checksum 0.
pub fn checksum(payload: &[u8]) -> u32 {
    crc32c::crc32c(payload)
}

fn verify(expected_len: usize, expected_sum: u32, payload: &[u8]) -> Result<(), ProtoError> {
    if payload.len() != expected_len {
        return Err(ProtoError::PayloadLength {
            declared: expected_len,
            actual: payload.len(),
        });
    }
    let actual = checksum(payload);
    if actual != expected_sum {
        return Err(ProtoError::ChecksumMismatch {
            expected: expected_sum,
            actual,
        });
    }
    Ok(())
}

/// A validated data request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub opcode: Opcode,
    pub flags: u8,
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub offset: u64,
    pub length: u32,
    /// crc32c of the payload (0 when the opcode carries none).
    pub checksum: u32,
    pub request_id: u64,
    /// The client's session (random per driver), 0 for none: with
    /// `sequence` it names one request across retries, so a server takes a
    /// write only once however many copies of it arrive, and late.
    pub session: u64,
    /// Strictly increasing per session, the same in every retry of a request.
    pub sequence: u64,
}

impl Request {
    /// A request without payload.
    pub fn new(
        opcode: Opcode,
        volume: VolumeId,
        epoch: Epoch,
        offset: u64,
        length: u32,
        request_id: u64,
    ) -> Self {
        Request {
            opcode,
            flags: 0,
            volume,
            epoch,
            offset,
            length,
            checksum: 0,
            request_id,
            session: 0,
            sequence: 0,
        }
    }

    /// A WRITE of `payload` at `offset`, with its checksum filled in.
    pub fn write(
        volume: VolumeId,
        epoch: Epoch,
        offset: u64,
        payload: &[u8],
        request_id: u64,
    ) -> Result<Self, ProtoError> {
        let length = u32::try_from(payload.len()).map_err(|_| ProtoError::LengthTooLarge {
            length: u32::MAX,
            max: MAX_IO_LEN,
        })?;
        let request = Request {
            checksum: checksum(payload),
            ..Request::new(Opcode::Write, volume, epoch, offset, length, request_id)
        };
        request.validate()?;
        Ok(request)
    }

    pub fn fua(&self) -> bool {
        self.flags & FLAG_FUA != 0
    }

    /// Bytes of payload that follow the header on the wire.
    pub fn payload_len(&self) -> usize {
        if self.opcode.carries_payload() {
            self.length as usize
        } else {
            0
        }
    }

    /// The end of the addressed range (validated not to overflow).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.length))
    }

    /// Check the payload against the length and checksum in the header.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), ProtoError> {
        verify(self.payload_len(), self.checksum, payload)
    }

    /// The request a primary forwards to a mirror for this one: its flags
    /// are built anew (FUA kept, REPLICA set, RESYNC only for `Forward::Resync`),
    /// so nothing a client sets can change how a mirror treats the copy.
    pub fn forwarded(&self, kind: Forward, request_id: u64) -> Request {
        let resync = match kind {
            Forward::Client => 0,
            Forward::Resync => FLAG_RESYNC,
        };
        // A primary does not retry a forward it cannot judge: its mirror
        // needs no window for it.
        Request {
            flags: (self.flags & FLAG_FUA) | FLAG_REPLICA | resync,
            request_id,
            session: 0,
            sequence: 0,
            ..*self
        }
    }

    /// Field checks that need no payload; `parse_request` runs them on every header.
    pub fn validate(&self) -> Result<(), ProtoError> {
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(ProtoError::UnknownFlags { found: self.flags });
        }
        if self.flags & FLAG_RESYNC != 0 && self.flags & FLAG_REPLICA == 0 {
            return Err(ProtoError::ResyncWithoutReplica { flags: self.flags });
        }
        if !self.opcode.carries_payload() && self.checksum != 0 {
            return Err(ProtoError::UnexpectedChecksum {
                found: self.checksum,
            });
        }
        if !self.opcode.has_range() {
            if self.offset != 0 || self.length != 0 {
                return Err(ProtoError::BadRange {
                    opcode: self.opcode,
                    offset: self.offset,
                    length: self.length,
                });
            }
            return Ok(());
        }
        if self.length > MAX_IO_LEN {
            return Err(ProtoError::LengthTooLarge {
                length: self.length,
                max: MAX_IO_LEN,
            });
        }
        if !self.offset.is_multiple_of(u64::from(BLOCK_SIZE))
            || !self.length.is_multiple_of(BLOCK_SIZE)
        {
            return Err(ProtoError::Misaligned {
                offset: self.offset,
                length: self.length,
                block: BLOCK_SIZE,
            });
        }
        if self.length == 0 {
            return Err(ProtoError::BadRange {
                opcode: self.opcode,
                offset: self.offset,
                length: self.length,
            });
        }
        if self.offset.checked_add(u64::from(self.length)).is_none() {
            return Err(ProtoError::RangeOverflow {
                offset: self.offset,
                length: self.length,
            });
        }
        Ok(())
    }

    /// The wire form of this request's header.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let header = RequestHeader {
            magic: REQUEST_MAGIC.into(),
            version: PROTOCOL_VERSION.into(),
            opcode: self.opcode as u8,
            flags: self.flags,
            volume: self.volume.0.into(),
            epoch: self.epoch.0.into(),
            offset: self.offset.into(),
            length: self.length.into(),
            checksum: self.checksum.into(),
            request_id: self.request_id.into(),
            session: self.session.into(),
            sequence: self.sequence.into(),
        };
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out.copy_from_slice(header.as_bytes());
        out
    }
}

/// Parse and validate a request header in place; returns the request and the
/// bytes after the header (where a WRITE's payload starts).
///
/// Nothing is allocated: the caller sizes the payload buffer from
/// [`Request::payload_len`], which is bounded by [`MAX_IO_LEN`] once this
/// returns `Ok`.
pub fn parse_request(buf: &[u8]) -> Result<(Request, &[u8]), ProtoError> {
    let (header, rest) =
        RequestHeader::ref_from_prefix(buf).map_err(|_| ProtoError::Truncated {
            needed: REQUEST_HEADER_LEN,
            available: buf.len(),
        })?;
    check_magic_version(header.magic.get(), REQUEST_MAGIC, header.version.get())?;
    let request = Request {
        opcode: Opcode::from_u8(header.opcode)?,
        flags: header.flags,
        volume: VolumeId(header.volume.get()),
        epoch: Epoch(header.epoch.get()),
        offset: header.offset.get(),
        length: header.length.get(),
        checksum: header.checksum.get(),
        request_id: header.request_id.get(),
        session: header.session.get(),
        sequence: header.sequence.get(),
    };
    request.validate()?;
    Ok((request, rest))
}

fn check_magic_version(found: u32, expected: u32, version: u16) -> Result<(), ProtoError> {
    if found != expected {
        return Err(ProtoError::BadMagic { found, expected });
    }
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::UnsupportedVersion {
            found: version,
            supported: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// A validated reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    /// The server's epoch for the volume (on STALE_EPOCH: the value to refresh to).
    pub epoch: Epoch,
    pub request_id: u64,
    /// Payload bytes after the header: read data, or a UTF-8 error message.
    pub length: u32,
    pub checksum: u32,
}

impl Reply {
    /// A reply header for `payload` (read data or an error message).
    pub fn new(status: Status, epoch: Epoch, request_id: u64, payload: &[u8]) -> Self {
        Reply {
            status,
            epoch,
            request_id,
            // Payloads are bounded by MAX_IO_LEN, which fits in u32.
            length: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            checksum: checksum(payload),
        }
    }

    pub fn payload_len(&self) -> usize {
        self.length as usize
    }

    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), ProtoError> {
        verify(self.payload_len(), self.checksum, payload)
    }

    pub fn encode(&self) -> [u8; REPLY_HEADER_LEN] {
        let header = ReplyHeader {
            magic: REPLY_MAGIC.into(),
            version: PROTOCOL_VERSION.into(),
            status: self.status as u8,
            flags: 0,
            epoch: self.epoch.0.into(),
            request_id: self.request_id.into(),
            length: self.length.into(),
            checksum: self.checksum.into(),
        };
        let mut out = [0u8; REPLY_HEADER_LEN];
        out.copy_from_slice(header.as_bytes());
        out
    }
}

/// Parse and validate a reply header in place; returns the reply and the rest.
pub fn parse_reply(buf: &[u8]) -> Result<(Reply, &[u8]), ProtoError> {
    let (header, rest) = ReplyHeader::ref_from_prefix(buf).map_err(|_| ProtoError::Truncated {
        needed: REPLY_HEADER_LEN,
        available: buf.len(),
    })?;
    check_magic_version(header.magic.get(), REPLY_MAGIC, header.version.get())?;
    if header.flags != 0 {
        return Err(ProtoError::UnknownFlags {
            found: header.flags,
        });
    }
    let reply = Reply {
        status: Status::from_u8(header.status)?,
        epoch: Epoch(header.epoch.get()),
        request_id: header.request_id.get(),
        length: header.length.get(),
        checksum: header.checksum.get(),
    };
    let max = if reply.status == Status::Ok {
        MAX_IO_LEN
    } else {
        MAX_ERROR_MESSAGE
    };
    if reply.length > max {
        return Err(if reply.status == Status::Ok {
            ProtoError::LengthTooLarge {
                length: reply.length,
                max,
            }
        } else {
            ProtoError::ErrorMessageTooLong {
                status: reply.status,
                length: reply.length,
                max,
            }
        });
    }
    Ok((reply, rest))
}
