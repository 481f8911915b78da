//! Request header parse: never panics; what parses re-encodes to the same bytes
//! and its payload check never panics either; and whatever flags it carries,
//! the copy a primary forwards for it is a plain replica write (the client's
//! FUA and REPLICA, never RESYNC), which parses too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_proto::{FLAG_FUA, FLAG_REPLICA, Forward, REQUEST_HEADER_LEN, parse_request};

fuzz_target!(|data: &[u8]| {
    if let Ok((request, rest)) = parse_request(data) {
        assert_eq!(request.encode()[..], data[..REQUEST_HEADER_LEN]);
        assert!(request.payload_len() <= tessera_proto::MAX_IO_LEN as usize);
        let _ = request.verify_payload(rest);
        let copy = request.forwarded(Forward::Client, request.request_id);
        assert_eq!(copy.flags, FLAG_REPLICA | (request.flags & FLAG_FUA));
        assert_eq!(parse_request(&copy.encode()).map(|(r, _)| r), Ok(copy));
    }
});
