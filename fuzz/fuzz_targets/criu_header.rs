//! CRIU's page-server header (`protocol::criu`): layout detection on the first 24 bytes, then
//! a stream of headers of that layout, each decoded and its `dst_id` split into type and id.
#![no_main]

use distriproc_runtime::protocol::criu::{
    decode_pm, detect_layout, encode_pm, looks_like_criu, PsIov, V41_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < V41_LEN {
        return;
    }
    let mut first4 = [0u8; 4];
    first4.copy_from_slice(&data[..4]);
    let _ = looks_like_criu(&first4);
    let mut first = [0u8; V41_LEN];
    first.copy_from_slice(&data[..V41_LEN]);
    let layout = detect_layout(&first);
    let len = layout.len();
    for chunk in data.chunks(len) {
        let Ok(iov) = PsIov::decode(layout, chunk) else {
            continue;
        };
        assert!(iov.nr_pages <= distriproc_runtime::protocol::criu::MAX_HEADER_PAGES);
        // What decodes re-encodes to the same bytes (the flags are kept).
        let mut out = vec![0u8; len];
        if let Ok(n) = iov.encode(layout, &mut out) {
            assert_eq!(n, len);
            assert_eq!(
                PsIov::decode(layout, &out).ok().map(|p| p.cmd()),
                Some(iov.cmd())
            );
        }
        if let Ok((ty, id)) = decode_pm(iov.dst_id) {
            // Aliased types (CRIU's shifted PS_TYPE_* values) fold to PID or SHMEM; the id stays.
            assert_eq!(encode_pm(ty, id) >> 8, iov.dst_id >> 8);
        }
    }
});
