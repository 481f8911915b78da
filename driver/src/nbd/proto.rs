//! The NBD protocol (fixed newstyle), sans-IO: constants, parsing of what a
//! client sends, encoding of what the server answers. Written from the
//! protocol document (NetworkBlockDevice/nbd, doc/proto.md).

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: starts the handshake and every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TX_HAS_FLAGS: u16 = 1 << 0;
pub const TX_SEND_FLUSH: u16 = 1 << 2;
pub const TX_SEND_FUA: u16 = 1 << 3;
pub const TX_SEND_TRIM: u16 = 1 << 5;
pub const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Flushes on one connection cover writes of all (our flush reaches every server).
pub const TX_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// The longest option a client may send (names, info lists); checked before allocating.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The largest read or write one request may carry.
pub const MAX_REQUEST_LEN: u32 = 32 << 20;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// What a client sent that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    #[error("bad magic {found:#x}")]
    BadMagic { found: u64 },
    #[error("client does not speak fixed newstyle (flags {flags:#x})")]
    NotFixedNewstyle { flags: u32 },
    #[error("client sent unknown handshake flags {unknown:#x}")]
    UnknownClientFlags { unknown: u32 },
    #[error("option of {length} bytes is over the limit of {MAX_OPTION_LEN}")]
    OptionTooLong { length: u32 },
    #[error("malformed option data: {reason}")]
    BadOption { reason: &'static str },
    #[error("unknown command {found}")]
    UnknownCommand { found: u16 },
    #[error("request of {length} bytes is over the limit of {MAX_REQUEST_LEN}")]
    RequestTooLarge { length: u32 },
}

/// The client's handshake flags; `Ok(true)` when it asked for no zero
/// padding. Unknown bits end the connection, as the protocol requires.
pub fn parse_client_flags(flags: u32) -> Result<bool, NbdError> {
    let unknown = flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
    if unknown != 0 {
        return Err(NbdError::UnknownClientFlags { unknown });
    }
    if flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::NotFixedNewstyle { flags });
    }
    Ok(flags & CLIENT_NO_ZEROES != 0)
}

/// A client option header (the data follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn parse_option_header(bytes: &[u8; 16]) -> Result<OptionHeader, NbdError> {
    let magic = u64::from_be_bytes(bytes[..8].try_into().unwrap_or_default());
    if magic != IHAVEOPT {
        return Err(NbdError::BadMagic { found: magic });
    }
    let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap_or_default());
    let length = u32::from_be_bytes(bytes[12..16].try_into().unwrap_or_default());
    if length > MAX_OPTION_LEN {
        return Err(NbdError::OptionTooLong { length });
    }
    Ok(OptionHeader { option, length })
}

/// The data of NBD_OPT_INFO and NBD_OPT_GO: an export name and the information requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, NbdError> {
    let bad = |reason| NbdError::BadOption { reason };
    let name_len = data.get(..4).ok_or(bad("truncated name length"))?;
    let name_len = u32::from_be_bytes(name_len.try_into().unwrap_or_default()) as usize;
    let name = data
        .get(4..4usize.saturating_add(name_len))
        .ok_or(bad("truncated name"))?;
    let name = std::str::from_utf8(name)
        .map_err(|_| bad("name is not UTF-8"))?
        .to_string();
    let rest = &data[4 + name_len..];
    let count = rest.get(..2).ok_or(bad("truncated info count"))?;
    let count = u16::from_be_bytes(count.try_into().unwrap_or_default()) as usize;
    let list = &rest[2..];
    if list.len() != 2 * count {
        return Err(bad("info count does not match the data"));
    }
    let infos = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, infos })
}

pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = INFO_EXPORT.to_be_bytes().to_vec();
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut out = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

/// Transmission-phase commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
}

/// A transmission-phase request header (a WRITE's payload follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

pub fn parse_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request, NbdError> {
    let magic = u32::from_be_bytes(bytes[..4].try_into().unwrap_or_default());
    if magic != REQUEST_MAGIC {
        return Err(NbdError::BadMagic {
            found: u64::from(magic),
        });
    }
    let flags = u16::from_be_bytes([bytes[4], bytes[5]]);
    let kind = u16::from_be_bytes([bytes[6], bytes[7]]);
    let command = match kind {
        0 => Command::Read,
        1 => Command::Write,
        2 => Command::Disconnect,
        3 => Command::Flush,
        4 => Command::Trim,
        6 => Command::WriteZeroes,
        found => return Err(NbdError::UnknownCommand { found }),
    };
    let cookie = u64::from_be_bytes(bytes[8..16].try_into().unwrap_or_default());
    let offset = u64::from_be_bytes(bytes[16..24].try_into().unwrap_or_default());
    let length = u32::from_be_bytes(bytes[24..28].try_into().unwrap_or_default());
    if matches!(command, Command::Read | Command::Write) && length > MAX_REQUEST_LEN {
        return Err(NbdError::RequestTooLarge { length });
    }
    Ok(Request {
        flags,
        command,
        cookie,
        offset,
        length,
    })
}

pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn client_flags_with_unknown_bits_are_refused() {
        assert_eq!(parse_client_flags(CLIENT_FIXED_NEWSTYLE), Ok(false));
        assert_eq!(
            parse_client_flags(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES),
            Ok(true)
        );
        assert_eq!(
            parse_client_flags(CLIENT_FIXED_NEWSTYLE | 1 << 2),
            Err(NbdError::UnknownClientFlags { unknown: 1 << 2 })
        );
        assert_eq!(
            parse_client_flags(u32::MAX),
            Err(NbdError::UnknownClientFlags { unknown: !3 })
        );
        assert_eq!(
            parse_client_flags(CLIENT_NO_ZEROES),
            Err(NbdError::NotFixedNewstyle { flags: 2 })
        );
    }

    fn request(kind: u16, length: u32) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..].copy_from_slice(&length.to_be_bytes());
        b
    }

    #[test]
    fn parses_requests() {
        let r = parse_request(&request(1, 8192)).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                command: Command::Write,
                cookie: 7,
                offset: 4096,
                length: 8192
            }
        );
        assert_eq!(
            parse_request(&request(9, 0)).unwrap_err(),
            NbdError::UnknownCommand { found: 9 }
        );
        assert!(matches!(
            parse_request(&request(0, MAX_REQUEST_LEN + 1)),
            Err(NbdError::RequestTooLarge { .. })
        ));
        // TRIM may cover more than a payload could.
        assert!(parse_request(&request(4, u32::MAX)).is_ok());
        let mut bad = request(0, 0);
        bad[0] = 0;
        assert!(matches!(
            parse_request(&bad),
            Err(NbdError::BadMagic { .. })
        ));
    }

    #[test]
    fn parses_options() {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&h).unwrap(),
            OptionHeader {
                option: OPT_GO,
                length: 10
            }
        );
        h[12..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            parse_option_header(&h),
            Err(NbdError::OptionTooLong { .. })
        ));

        let mut go = 2u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"db");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&go).unwrap(),
            InfoRequest {
                name: "db".into(),
                infos: vec![INFO_BLOCK_SIZE]
            }
        );
        assert!(parse_info_request(&go[..go.len() - 1]).is_err());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(b"x");
        assert!(parse_info_request(&huge).is_err());
    }

    #[test]
    fn encodes_replies() {
        let r = simple_reply(EIO, 9);
        assert_eq!(&r[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), EIO);
        let o = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(info_block_size(1, 4096, 1 << 25).len(), 14);
        assert_eq!(info_export(1 << 30, TX_HAS_FLAGS).len(), 12);
    }
}
