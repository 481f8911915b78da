//! The fuzz seed corpus was written by an independent (Python) encoder: every
//! seed must parse, which cross-checks the byte layout of the data protocol
//! (version 2: the request's last 16 bytes became the session and
//! sequence, zero in these seeds) and of management frames (version 2; the seeds hold
//! messages whose body did not change with it).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use tessera_proto::{MgmtReply, MgmtRequest, decode_frame, parse_reply, parse_request};

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (path.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

#[test]
fn request_seeds_parse_and_verify() {
    for (name, bytes) in seeds("request_header") {
        let (request, payload) = parse_request(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        request
            .verify_payload(payload)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn reply_seeds_parse_and_verify() {
    for (name, bytes) in seeds("reply_header") {
        let (reply, payload) = parse_reply(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        reply
            .verify_payload(payload)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn mgmt_seeds_decode() {
    for (name, bytes) in seeds("mgmt_frame") {
        let request = decode_frame::<MgmtRequest>(&bytes).map(|_| ());
        let reply = decode_frame::<MgmtReply>(&bytes).map(|_| ());
        assert!(
            request.is_ok() || reply.is_ok(),
            "{name}: {request:?} {reply:?}"
        );
    }
}
