//! Reply header parse: never panics; what parses re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_proto::{REPLY_HEADER_LEN, parse_reply};

fuzz_target!(|data: &[u8]| {
    if let Ok((reply, rest)) = parse_reply(data) {
        assert_eq!(reply.encode()[..], data[..REPLY_HEADER_LEN]);
        let _ = reply.verify_payload(rest);
    }
});
