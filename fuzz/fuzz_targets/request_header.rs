//! Request header parse: never panics; what parses re-encodes to the same bytes
//! and its payload check never panics either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_net::proto::{REQUEST_HEADER_LEN, parse_request};

fuzz_target!(|data: &[u8]| {
    if let Ok((request, rest)) = parse_request(data) {
        assert_eq!(request.encode()[..], data[..REQUEST_HEADER_LEN]);
        assert!(request.payload_len() <= tessera_net::proto::MAX_IO_LEN as usize);
        let _ = request.verify_payload(rest);
    }
});
