#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use proptest::prelude::*;

use super::header::{REPLY_MAGIC, REQUEST_MAGIC};
use super::mgmt::MGMT_VERSION;
use super::*;

fn sample_write() -> (Request, Vec<u8>) {
    let payload = vec![0xabu8; 4096];
    let req = Request::write(VolumeId(7), Epoch(42), 8192, &payload, 99).unwrap();
    (req, payload)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- golden bytes: these freeze the wire layout of protocol version 2 ----

#[test]
fn request_header_golden_bytes() {
    let req = Request {
        opcode: Opcode::Write,
        flags: FLAG_FUA,
        volume: VolumeId(0x0102_0304_0506_0708),
        epoch: Epoch(0x1112_1314_1516_1718),
        offset: 0x0000_0000_0001_0000,
        length: 0x2000,
        checksum: 0xdead_beef,
        request_id: 0x2122_2324_2526_2728,
        session: 0x3132_3334_3536_3738,
        sequence: 0x4142_4344_4546_4748,
    };
    let expected = concat!(
        "54535251",         // magic "TSRQ"
        "0200",             // version 2
        "02",               // opcode WRITE
        "01",               // flags FUA
        "0807060504030201", // volume
        "1817161514131211", // epoch
        "0000010000000000", // offset 65536
        "00200000",         // length 8192
        "efbeadde",         // checksum
        "2827262524232221", // request id
        "3837363534333231", // session
        "4847464544434241", // sequence
    );
    assert_eq!(hex(&req.encode()), expected);
    assert_eq!(parse_request(&req.encode()).unwrap().0, req);
}

#[test]
fn reply_header_golden_bytes() {
    let reply = Reply {
        status: Status::StaleEpoch,
        epoch: Epoch(0x0102_0304_0506_0708),
        request_id: 0x1112_1314_1516_1718,
        length: 0,
        checksum: 0,
    };
    let expected = concat!(
        "54535250",         // magic "TSRP"
        "0200",             // version 2
        "01",               // status STALE_EPOCH
        "00",               // flags
        "0807060504030201", // epoch
        "1817161514131211", // request id
        "00000000",         // length
        "00000000",         // checksum
    );
    assert_eq!(hex(&reply.encode()), expected);
}

#[test]
fn opcode_and_status_values_are_frozen() {
    let ops: Vec<u8> = Opcode::ALL.iter().map(|o| *o as u8).collect();
    assert_eq!(ops, [1, 2, 3, 4, 5, 6]);
    let statuses: Vec<u8> = Status::ALL.iter().map(|s| *s as u8).collect();
    assert_eq!(statuses, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
}

#[test]
fn mgmt_frame_golden_bytes() {
    // length 3 (version + 1 body byte), version 2, variant 0 (Ping).
    assert_eq!(
        hex(&encode_frame(&MgmtRequest::Ping).unwrap()),
        "030000000200".to_string() + "00"
    );
    let reply = MgmtReply::Pong { epoch: Epoch(300) };
    // variant 0, epoch 300 as a postcard varint (0xac 0x02).
    assert_eq!(
        hex(&encode_frame(&reply).unwrap()),
        "050000000200".to_string() + "00ac02"
    );
}

// ---- round trips ----

#[test]
fn every_opcode_round_trips() {
    for op in Opcode::ALL {
        let req = if op == Opcode::Write {
            sample_write().0
        } else if op.has_range() {
            Request::new(op, VolumeId(1), Epoch(2), 4096, 8192, 3)
        } else {
            Request::new(op, VolumeId(1), Epoch(2), 0, 0, 3)
        };
        let bytes = req.encode();
        let (parsed, rest) = parse_request(&bytes).unwrap();
        assert_eq!(parsed, req, "{op:?}");
        assert!(rest.is_empty());
    }
}

#[test]
fn every_status_round_trips() {
    for status in Status::ALL {
        let payload: &[u8] = if status == Status::Ok {
            &[7u8; 4096]
        } else {
            b"why"
        };
        let reply = Reply::new(status, Epoch(5), 11, payload);
        let mut wire = reply.encode().to_vec();
        wire.extend_from_slice(payload);
        let (parsed, rest) = parse_reply(&wire).unwrap();
        assert_eq!(parsed, reply);
        parsed.verify_payload(rest).unwrap();
    }
}

#[test]
fn write_payload_is_verified() {
    let (req, payload) = sample_write();
    let mut wire = req.encode().to_vec();
    wire.extend_from_slice(&payload);
    let (parsed, rest) = parse_request(&wire).unwrap();
    assert_eq!(parsed.payload_len(), 4096);
    parsed.verify_payload(rest).unwrap();
}

fn sample_map() -> VolumeMap {
    let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    VolumeMap {
        id: VolumeId(3),
        name: "db".into(),
        epoch: Epoch(9),
        size: 10 << 30,
        page_size: 1 << 20,
        partitions: vec![Partition {
            first_page: 0,
            end_page: 10240,
            replicas: vec![
                Replica {
                    server: "s1".into(),
                    addr,
                    state: MirrorState::InSync,
                },
                Replica {
                    server: "s2".into(),
                    addr,
                    state: MirrorState::Resyncing,
                },
            ],
        }],
    }
}

fn all_requests() -> Vec<MgmtRequest> {
    let s = |v: &str| v.to_string();
    vec![
        MgmtRequest::Ping,
        MgmtRequest::Register {
            data_addr: "10.0.0.1:9000".parse().unwrap(),
            capacity: 1 << 40,
            incarnation: 77,
            boot: 78,
        },
        MgmtRequest::Heartbeat {
            held: vec![(VolumeId(1), Epoch(2))],
        },
        MgmtRequest::GetMap { volume: s("db") },
        MgmtRequest::Admin(AdminCommand::CreateVolume {
            name: s("db"),
            size: 1 << 30,
            page_size: 1 << 20,
            replicas: 2,
            servers: Some(vec![s("a"), s("b")]),
        }),
        MgmtRequest::Admin(AdminCommand::DeleteVolume { name: s("db") }),
        MgmtRequest::Admin(AdminCommand::ResizeVolume {
            name: s("db"),
            size: 2 << 30,
        }),
        MgmtRequest::Admin(AdminCommand::RemoveServer {
            name: s("a"),
            force: true,
        }),
        MgmtRequest::Admin(AdminCommand::SetPartition {
            volume: s("db"),
            first_page: 0,
            end_page: 8,
            servers: vec![s("a"), s("b")],
        }),
        MgmtRequest::Status,
        MgmtRequest::PushMap { map: sample_map() },
        MgmtRequest::CheckMap { map: sample_map() },
        MgmtRequest::DropVolume { id: VolumeId(4) },
        MgmtRequest::MirrorFailed {
            volume: VolumeId(4),
            epoch: Epoch(8),
            first_page: 16,
            server: s("b"),
        },
        MgmtRequest::ResyncDone {
            volume: VolumeId(4),
            epoch: Epoch(9),
            first_page: 16,
            server: s("b"),
        },
        MgmtRequest::ReportMirrors {
            mirrors: vec![sample_report()],
            resynced_bytes: 1 << 20,
        },
        MgmtRequest::DirtyRegions {
            volume: VolumeId(4),
            peer: s("a"),
        },
        MgmtRequest::Clean {
            volume: VolumeId(4),
            epoch: Epoch(9),
            first_page: 16,
            peers: vec![s("a"), s("b")],
            regions: vec![(0, 4), (9, 10)],
            region_size: 65536,
        },
        MgmtRequest::RegionChecksums {
            volume: VolumeId(4),
            offset: 0,
            length: 1 << 20,
            region_size: 65536,
        },
        MgmtRequest::MirrorStatus,
    ]
}

fn sample_report() -> MirrorReport {
    MirrorReport {
        reporter: "a".into(),
        volume: VolumeId(4),
        first_page: 16,
        peer: "b".into(),
        dirty_regions: 12,
        region_size: 65536,
        resync: Some(ResyncProgress {
            total_regions: 12,
            copied_regions: 3,
            bytes_per_sec: 1 << 24,
        }),
    }
}

fn all_replies() -> Vec<MgmtReply> {
    let s = |v: &str| v.to_string();
    vec![
        MgmtReply::Pong { epoch: Epoch(1) },
        MgmtReply::Registered {
            epoch: Epoch(2),
            lease_ms: 2500,
        },
        MgmtReply::Map(sample_map()),
        MgmtReply::Applied { epoch: Epoch(3) },
        MgmtReply::Maps {
            epoch: Epoch(4),
            maps: vec![sample_map()],
            dropped: vec![VolumeId(2)],
        },
        MgmtReply::Status(ClusterStatus {
            epoch: Epoch(5),
            servers: vec![ServerStatus {
                name: s("s1"),
                addr: "127.0.0.1:1".parse().unwrap(),
                capacity: 1 << 30,
                up: true,
                held: vec![(VolumeId(3), Epoch(9))],
                resynced_bytes: 4096,
            }],
            volumes: vec![sample_map()],
            mirrors: vec![sample_report()],
        }),
        MgmtReply::Refused(Refusal::Forbidden {
            role: Role::Client,
            operation: s("admin"),
        }),
        MgmtReply::Refused(Refusal::NotFound {
            kind: s("volume"),
            name: s("x"),
        }),
        MgmtReply::Refused(Refusal::AlreadyExists {
            kind: s("volume"),
            name: s("x"),
        }),
        MgmtReply::Refused(Refusal::Invalid { reason: s("no") }),
        MgmtReply::Refused(Refusal::Fenced {
            volume: s("v"),
            client: s("c"),
        }),
        MgmtReply::Refused(Refusal::Unavailable {
            reason: s("starting"),
        }),
        MgmtReply::Refused(Refusal::BadRequest { reason: s("junk") }),
        MgmtReply::Refused(Refusal::WouldLoseData {
            detail: s("pages 1, 2"),
        }),
        MgmtReply::Refused(Refusal::StaleEpoch {
            request: Epoch(3),
            current: Epoch(4),
        }),
        MgmtReply::Regions {
            all: false,
            regions: vec![(3, 5)],
            region_size: 65536,
        },
        MgmtReply::Checksums {
            sums: vec![1, 2, 3],
        },
        MgmtReply::MirrorStatus(vec![MirrorStatus {
            volume: s("v"),
            first_page: 0,
            end_page: 8,
            primary: s("s1"),
            mirror: s("s2"),
            state: MirrorState::Resyncing,
            differing_regions: 3,
            differing_bytes: 3 << 16,
            resync_total_regions: 3,
            resync_copied_regions: 1,
            resync_bytes_per_sec: 1 << 16,
            eta_secs: Some(2),
            primary_up: true,
            mirror_up: false,
            primary_heard_ms: Some(250),
            mirror_heard_ms: None,
        }]),
    ]
}

#[test]
fn region_runs_merge_neighbours() {
    assert_eq!(region_runs(&[]), vec![]);
    assert_eq!(
        region_runs(&[1, 2, 3, 7, 9, 10]),
        vec![(1, 4), (7, 8), (9, 11)]
    );
}

#[test]
fn every_mgmt_message_round_trips() {
    for request in all_requests() {
        let frame = encode_frame(&request).unwrap();
        let (decoded, used) = decode_frame::<MgmtRequest>(&frame).unwrap();
        assert_eq!(decoded, request);
        assert_eq!(used, frame.len());
    }
    for reply in all_replies() {
        let frame = encode_frame(&reply).unwrap();
        assert_eq!(decode_frame::<MgmtReply>(&frame).unwrap().0, reply);
    }
}

#[test]
fn role_policy() {
    for request in all_requests() {
        for role in Role::ALL {
            let expected = match &request {
                MgmtRequest::Ping | MgmtRequest::GetMap { .. } => true,
                MgmtRequest::Register { .. }
                | MgmtRequest::Heartbeat { .. }
                | MgmtRequest::MirrorFailed { .. }
                | MgmtRequest::ResyncDone { .. }
                | MgmtRequest::ReportMirrors { .. }
                | MgmtRequest::DirtyRegions { .. }
                | MgmtRequest::Clean { .. } => role == Role::Storage,
                MgmtRequest::RegionChecksums { .. } => role == Role::Admin,
                MgmtRequest::Admin(_) => role == Role::Admin,
                MgmtRequest::Status | MgmtRequest::MirrorStatus => {
                    matches!(role, Role::Admin | Role::Mgmt)
                }
                MgmtRequest::PushMap { .. }
                | MgmtRequest::CheckMap { .. }
                | MgmtRequest::DropVolume { .. } => role == Role::Mgmt,
            };
            assert_eq!(request.permits(role), expected, "{request:?} by {role}");
        }
    }
}

#[test]
fn role_names_parse() {
    for role in Role::ALL {
        assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
    }
    assert!("root".parse::<Role>().is_err());
}

// ---- one test per rejection ----

fn mutate(f: impl FnOnce(&mut [u8; REQUEST_HEADER_LEN])) -> Result<Request, ProtoError> {
    let mut bytes = Request::new(Opcode::Read, VolumeId(1), Epoch(1), 4096, 4096, 1).encode();
    f(&mut bytes);
    parse_request(&bytes).map(|(r, _)| r)
}

#[test]
fn rejects_truncated_header() {
    let bytes = sample_write().0.encode();
    assert_eq!(
        parse_request(&bytes[..63]).unwrap_err(),
        ProtoError::Truncated {
            needed: 64,
            available: 63
        }
    );
    assert!(matches!(
        parse_reply(&[0; 31]),
        Err(ProtoError::Truncated { .. })
    ));
}

#[test]
fn rejects_bad_magic() {
    let err = mutate(|b| b[0] = b'X').unwrap_err();
    assert!(
        matches!(
            err,
            ProtoError::BadMagic {
                expected: REQUEST_MAGIC,
                ..
            }
        ),
        "{err}"
    );
    let mut reply = Reply::new(Status::Ok, Epoch(1), 1, &[]).encode();
    reply[3] = 0;
    assert!(matches!(
        parse_reply(&reply),
        Err(ProtoError::BadMagic {
            expected: REPLY_MAGIC,
            ..
        })
    ));
}

#[test]
fn rejects_unsupported_version() {
    assert_eq!(
        mutate(|b| b[4] = 1).unwrap_err(),
        ProtoError::UnsupportedVersion {
            found: 1,
            supported: 2
        }
    );
}

#[test]
fn rejects_unknown_opcode() {
    assert_eq!(
        mutate(|b| b[6] = 0x41).unwrap_err(),
        ProtoError::UnknownOpcode { found: 0x41 }
    );
}

#[test]
fn rejects_unknown_flags() {
    assert_eq!(
        mutate(|b| b[7] = 0x80).unwrap_err(),
        ProtoError::UnknownFlags { found: 0x80 }
    );
}

/// Every flag byte a client can send: only known bits, and RESYNC only
/// with REPLICA, pass the parser; and whatever passed, the copy a primary
/// forwards for a client carries REPLICA and the client's FUA, never RESYNC,
/// so a mirror always sets its write-intent bits before applying it.
#[test]
fn flags_a_client_sends_never_reach_a_mirror_as_a_resync_copy() {
    let mut accepted = Vec::new();
    for flags in 0..=u8::MAX {
        match mutate(|b| b[7] = flags) {
            Ok(request) => {
                accepted.push(flags);
                let copy = request.forwarded(Forward::Client, 7);
                assert_eq!(
                    copy.flags,
                    FLAG_REPLICA | (flags & FLAG_FUA),
                    "flags {flags:#04x}"
                );
                assert_eq!(copy.request_id, 7);
                let resync = request.forwarded(Forward::Resync, 8);
                assert_eq!(
                    resync.flags,
                    FLAG_REPLICA | FLAG_RESYNC | (flags & FLAG_FUA),
                    "flags {flags:#04x}"
                );
                assert_eq!(parse_request(&copy.encode()).unwrap().0, copy);
            }
            Err(ProtoError::UnknownFlags { found }) => {
                assert_eq!(found, flags);
                assert_ne!(flags & !(FLAG_FUA | FLAG_REPLICA | FLAG_RESYNC), 0);
            }
            Err(ProtoError::ResyncWithoutReplica { flags: found }) => {
                assert_eq!(found, flags);
                assert_eq!(flags & (FLAG_REPLICA | FLAG_RESYNC), FLAG_RESYNC);
            }
            Err(other) => panic!("flags {flags:#04x}: {other}"),
        }
    }
    assert_eq!(accepted, [0, 1, 2, 3, 6, 7]);
}

#[test]
fn rejects_misaligned_offset_and_length() {
    let err = mutate(|b| b[24] = 1).unwrap_err();
    assert!(
        matches!(err, ProtoError::Misaligned { offset: 4097, .. }),
        "{err}"
    );
    let err = mutate(|b| b[32] = 1).unwrap_err();
    assert!(
        matches!(err, ProtoError::Misaligned { length: 4097, .. }),
        "{err}"
    );
}

#[test]
fn rejects_length_over_maximum() {
    let err = mutate(|b| b[32..36].copy_from_slice(&(MAX_IO_LEN + 4096).to_le_bytes()));
    assert_eq!(
        err.unwrap_err(),
        ProtoError::LengthTooLarge {
            length: MAX_IO_LEN + 4096,
            max: MAX_IO_LEN
        }
    );
}

#[test]
fn rejects_overflowing_range() {
    let offset = u64::MAX - 4095;
    let err = mutate(|b| b[24..32].copy_from_slice(&offset.to_le_bytes())).unwrap_err();
    assert_eq!(
        err,
        ProtoError::RangeOverflow {
            offset,
            length: 4096
        }
    );
}

#[test]
fn rejects_range_unsuited_to_opcode() {
    let err = mutate(|b| b[32..36].copy_from_slice(&0u32.to_le_bytes())).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::BadRange {
            opcode: Opcode::Read,
            length: 0,
            ..
        }
    ));
    let err = mutate(|b| b[6] = Opcode::Flush as u8).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::BadRange {
            opcode: Opcode::Flush,
            ..
        }
    ));
}

#[test]
fn rejects_checksum_without_payload() {
    let err = mutate(|b| b[36] = 1).unwrap_err();
    assert_eq!(err, ProtoError::UnexpectedChecksum { found: 1 });
}

#[test]
fn rejects_payload_checksum_mismatch() {
    let (req, mut payload) = sample_write();
    payload[100] ^= 1;
    let err = req.verify_payload(&payload).unwrap_err();
    assert!(matches!(err, ProtoError::ChecksumMismatch { .. }));
    assert_eq!(err.status(), Status::ChecksumMismatch);
}

#[test]
fn rejects_short_payload() {
    let (req, payload) = sample_write();
    assert_eq!(
        req.verify_payload(&payload[..4095]).unwrap_err(),
        ProtoError::PayloadLength {
            declared: 4096,
            actual: 4095
        }
    );
}

#[test]
fn rejects_unknown_status() {
    let mut reply = Reply::new(Status::Ok, Epoch(1), 1, &[]).encode();
    reply[6] = 200;
    assert_eq!(
        parse_reply(&reply).unwrap_err(),
        ProtoError::UnknownStatus { found: 200 }
    );
}

#[test]
fn rejects_reply_flags() {
    let mut reply = Reply::new(Status::Ok, Epoch(1), 1, &[]).encode();
    reply[7] = 1;
    assert_eq!(
        parse_reply(&reply).unwrap_err(),
        ProtoError::UnknownFlags { found: 1 }
    );
}

#[test]
fn rejects_long_error_message_and_oversized_reply() {
    let mut reply = Reply::new(Status::IoError, Epoch(1), 1, &[]).encode();
    reply[24..28].copy_from_slice(&(MAX_ERROR_MESSAGE + 1).to_le_bytes());
    assert!(matches!(
        parse_reply(&reply),
        Err(ProtoError::ErrorMessageTooLong { .. })
    ));
    let mut reply = Reply::new(Status::Ok, Epoch(1), 1, &[]).encode();
    reply[24..28].copy_from_slice(&(MAX_IO_LEN + 1).to_le_bytes());
    assert!(matches!(
        parse_reply(&reply),
        Err(ProtoError::LengthTooLarge { .. })
    ));
}

#[test]
fn rejects_oversized_frame_before_allocating() {
    let prefix = (MAX_FRAME_LEN + 1).to_le_bytes();
    assert_eq!(
        frame_len(prefix).unwrap_err(),
        ProtoError::FrameTooLarge {
            length: MAX_FRAME_LEN + 1,
            max: MAX_FRAME_LEN
        }
    );
    // decode_frame refuses on the prefix alone, without the announced bytes.
    let err = decode_frame::<MgmtRequest>(&u32::MAX.to_le_bytes()).unwrap_err();
    assert!(matches!(err, ProtoError::FrameTooLarge { .. }));
}

#[test]
fn rejects_short_frame() {
    assert_eq!(
        frame_len(1u32.to_le_bytes()).unwrap_err(),
        ProtoError::FrameTooShort { length: 1 }
    );
}

#[test]
fn reports_truncated_frame() {
    let frame = encode_frame(&MgmtRequest::GetMap {
        volume: "abc".into(),
    })
    .unwrap();
    let err = decode_frame::<MgmtRequest>(&frame[..frame.len() - 1]).unwrap_err();
    assert!(matches!(err, ProtoError::Truncated { .. }));
}

#[test]
fn rejects_other_mgmt_version() {
    let mut frame = encode_frame(&MgmtRequest::Ping).unwrap();
    frame[4] = 9;
    assert_eq!(
        decode_frame::<MgmtRequest>(&frame).unwrap_err(),
        ProtoError::UnsupportedMgmtVersion {
            found: 9,
            supported: MGMT_VERSION
        }
    );
}

#[test]
fn rejects_malformed_body() {
    // Variant 200 does not exist.
    let frame = [3, 0, 0, 0, 2, 0, 200];
    assert!(matches!(
        decode_frame::<MgmtRequest>(&frame),
        Err(ProtoError::Malformed { .. })
    ));
}

#[test]
fn rejects_trailing_bytes() {
    let frame = [4, 0, 0, 0, 2, 0, 0, 0];
    assert_eq!(
        decode_frame::<MgmtRequest>(&frame).unwrap_err(),
        ProtoError::TrailingBytes { extra: 1 }
    );
}

#[test]
fn huge_vec_length_in_body_does_not_allocate_it() {
    // Heartbeat (variant 2) claiming 2^35 entries in a 12-byte frame.
    let mut frame = vec![0u8, 0, 0, 0, 2, 0, 2, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01];
    let len = u32::try_from(frame.len() - 4).unwrap();
    frame[..4].copy_from_slice(&len.to_le_bytes());
    assert!(matches!(
        decode_frame::<MgmtRequest>(&frame),
        Err(ProtoError::Malformed { .. })
    ));
}

// ---- properties ----

fn arb_request() -> impl Strategy<Value = Request> {
    (
        prop::sample::select(Opcode::ALL.to_vec()),
        any::<bool>(),
        any::<u64>(),
        any::<u64>(),
        0u64..(1 << 40),
        1u32..=(MAX_IO_LEN / BLOCK_SIZE),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(|(opcode, fua, volume, epoch, block, blocks, sum, id)| {
            let (offset, length) = if opcode.has_range() {
                (block * u64::from(BLOCK_SIZE), blocks * BLOCK_SIZE)
            } else {
                (0, 0)
            };
            Request {
                opcode,
                flags: if fua { FLAG_FUA } else { 0 },
                volume: VolumeId(volume),
                epoch: Epoch(epoch),
                offset,
                length,
                checksum: if opcode.carries_payload() { sum } else { 0 },
                request_id: id,
                session: id.rotate_left(7),
                sequence: id.rotate_left(13),
            }
        })
}

proptest! {
    #[test]
    fn request_decode_encode(req in arb_request()) {
        prop_assert_eq!(parse_request(&req.encode()).unwrap().0, req);
    }

    #[test]
    fn reply_decode_encode(
        status in prop::sample::select(Status::ALL.to_vec()),
        epoch in any::<u64>(),
        id in any::<u64>(),
        payload in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        let reply = Reply::new(status, Epoch(epoch), id, &payload);
        let mut wire = reply.encode().to_vec();
        wire.extend_from_slice(&payload);
        let (parsed, rest) = parse_reply(&wire).unwrap();
        prop_assert_eq!(parsed, reply);
        prop_assert!(parsed.verify_payload(rest).is_ok());
    }

    #[test]
    fn mgmt_decode_encode(
        volume in "[a-z0-9-]{0,40}",
        size in any::<u64>(),
        held in prop::collection::vec((any::<u64>(), any::<u64>()), 0..20),
    ) {
        let messages = [
            MgmtRequest::GetMap { volume: volume.clone() },
            MgmtRequest::Heartbeat { held: held.iter().map(|(v, e)| (VolumeId(*v), Epoch(*e))).collect() },
            MgmtRequest::Admin(AdminCommand::ResizeVolume { name: volume, size }),
        ];
        for message in messages {
            let frame = encode_frame(&message).unwrap();
            prop_assert_eq!(decode_frame::<MgmtRequest>(&frame).unwrap().0, message);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_request(&bytes);
        let _ = parse_reply(&bytes);
        let _ = decode_frame::<MgmtRequest>(&bytes);
        let _ = decode_frame::<MgmtReply>(&bytes);
    }
}

/// A map of partitions with the given page lengths (0 allowed), each after
/// a gap of the given pages (cycled) and held by one of three servers.
fn layout(lengths: &[u64], gaps: &[u64], holders: &[u8]) -> VolumeMap {
    let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let mut first = 0;
    let partitions = lengths
        .iter()
        .zip(gaps.iter().cycle())
        .zip(holders.iter().cycle())
        .map(|((len, gap), holder)| {
            first += gap;
            let p = Partition {
                first_page: first,
                end_page: first + len,
                replicas: vec![Replica {
                    server: format!("s{}", holder % 3),
                    addr,
                    state: MirrorState::InSync,
                }],
            };
            first += len;
            p
        })
        .collect();
    VolumeMap {
        partitions,
        ..sample_map()
    }
}

#[test]
fn a_disordered_layout_is_refused() {
    let mut map = layout(&[4, 4, 4], &[0], &[0]);
    map.check_layout().unwrap();
    map.partitions.swap(0, 2);
    assert_eq!(
        map.check_layout().unwrap_err(),
        ProtoError::PartitionOrder {
            index: 1,
            first_page: 4,
            end_page: 8
        }
    );
    let mut backwards = layout(&[4], &[0], &[0]);
    backwards.partitions[0].first_page = 5;
    assert!(backwards.check_layout().is_err());
}

proptest! {
    /// The binary searches find what a scan of every partition finds.
    #[test]
    fn lookups_agree_with_a_scan(
        lengths in prop::collection::vec(0u64..20, 0..40),
        gaps in prop::collection::vec(prop_oneof![Just(0u64), 1u64..5], 1..40),
        holders in prop::collection::vec(any::<u8>(), 1..40),
        page in 0u64..1100,
    ) {
        let map = layout(&lengths, &gaps, &holders);
        prop_assert!(map.check_layout().is_ok());
        let scanned = map.partitions.iter().find(|p| p.first_page <= page && page < p.end_page);
        prop_assert_eq!(map.partition_at(page), scanned);
        let starting = map.partitions.iter().find(|p| p.first_page == page && p.first_page < p.end_page);
        prop_assert_eq!(map.partition_starting_at(page), starting);
        for server in ["s0", "s1", "s2"] {
            let mut pages: Vec<u64> = map
                .partitions
                .iter()
                .filter(|p| p.replicas.iter().any(|r| r.server == server))
                .flat_map(|p| p.first_page..p.end_page)
                .collect();
            pages.sort_unstable();
            let ranges = map.owned_ranges(server);
            let from_ranges: Vec<u64> = ranges.iter().flat_map(|(a, b)| *a..*b).collect();
            prop_assert_eq!(from_ranges, pages);
            prop_assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0), "unmerged {:?}", ranges);
        }
    }

    /// After random swaps, check_layout refuses exactly the maps in which
    /// some partition starts before the end of the one before it.
    #[test]
    fn check_layout_refuses_exactly_the_disordered(
        lengths in prop::collection::vec(0u64..6, 0..12),
        gaps in prop::collection::vec(0u64..3, 1..12),
        swaps in prop::collection::vec((0usize..12, 0usize..12), 0..3),
    ) {
        let mut map = layout(&lengths, &gaps, &[0]);
        let n = map.partitions.len();
        for (a, b) in swaps {
            if n > 0 {
                map.partitions.swap(a % n, b % n);
            }
        }
        let ordered = map
            .partitions
            .windows(2)
            .all(|w| w[0].end_page <= w[1].first_page);
        prop_assert_eq!(map.check_layout().is_ok(), ordered);
    }
}
