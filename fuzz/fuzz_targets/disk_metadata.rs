//! On-disk decoders (a damaged data file is untrusted input): the superblock,
//! metadata block copies, volume records, bitmask blocks and slot-table
//! entries never panic, and what decodes re-encodes to an equal value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_engine::disk::format::{
    BitmaskBlock, MetaCopy, Superblock, VolumeRecord, decode_meta, decode_slot_entries,
    encode_meta, SLOTS_PER_BLOCK,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(sb) = Superblock::decode(data) {
        let again = sb.encode().expect("a decoded superblock encodes");
        assert_eq!(Superblock::decode(&again), Ok(sb));
    }
    if let MetaCopy::Valid { seq, payload } = decode_meta(data, 2, 1) {
        let mut again = vec![0u8; 4096];
        encode_meta(seq, 2, payload, &mut again);
        assert_eq!(&again[..], data);
        let _ = decode_slot_entries(payload, SLOTS_PER_BLOCK as usize);
    }
    if let Ok(Some(record)) = VolumeRecord::decode(data) {
        let again = record.encode().expect("a decoded record encodes");
        assert_eq!(VolumeRecord::decode(&again), Ok(Some(record)));
    }
    if let Ok(Some(block)) = BitmaskBlock::decode(data) {
        let again = block.encode().expect("a decoded bitmask block encodes");
        assert_eq!(BitmaskBlock::decode(&again), Ok(Some(block)));
    }
});
