//! Management frame decode, both directions: never panics, never allocates
//! past the frame limit, and what decodes encodes back to an equal message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_proto::{MgmtReply, MgmtRequest, decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    if let Ok((request, _)) = decode_frame::<MgmtRequest>(data) {
        let again = encode_frame(&request).expect("a decoded message encodes");
        assert_eq!(decode_frame::<MgmtRequest>(&again).expect("re-decodes").0, request);
    }
    if let Ok((reply, _)) = decode_frame::<MgmtReply>(data) {
        let again = encode_frame(&reply).expect("a decoded message encodes");
        assert_eq!(decode_frame::<MgmtReply>(&again).expect("re-decodes").0, reply);
    }
});
