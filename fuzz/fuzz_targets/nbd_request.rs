//! What an NBD client sends: option headers, INFO/GO option data and
//! transmission request headers never panic, and lengths are bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_driver::nbd::proto::{
    MAX_OPTION_LEN, MAX_REQUEST_LEN, REQUEST_LEN, parse_info_request, parse_option_header,
    parse_request, Command,
};

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.first_chunk::<16>() {
        if let Ok(h) = parse_option_header(header) {
            assert!(h.length <= MAX_OPTION_LEN);
        }
    }
    if let Some(header) = data.first_chunk::<REQUEST_LEN>() {
        if let Ok(r) = parse_request(header) {
            if matches!(r.command, Command::Read | Command::Write) {
                assert!(r.length <= MAX_REQUEST_LEN);
            }
        }
    }
    if let Ok(info) = parse_info_request(data) {
        assert!(info.name.len() + 2 * info.infos.len() + 6 <= data.len());
    }
});
