//! The client's side of the native protocol (`remote::RemotePages`): everything a page server
//! can send back.
//!
//! Input byte 0 sets the pages requested per range (1..=64, so buffers stay small), byte 1 the
//! number of ranges expected per response; the rest is the stream: `HelloReply`, then responses
//! (header, then per range a range reply header, the kind bitmap and the data pages), read the
//! way `RemotePages::read_range` reads them.
#![no_main]

use std::io::Read;

use distriproc_runtime::protocol::{
    bitmap_get, check_bitmap, read_range_reply_header, read_response_header, HelloReply,
    HelloStatus, RangeStatus, RequestStatus, PAGE_SIZE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let requested = u32::from(data[0] % 64) + 1;
    let expect_ranges = usize::from(data[1] % 8) + 1;
    let mut r = &data[2..];
    let Ok(reply) = HelloReply::read(&mut r) else {
        return;
    };
    if reply.status != HelloStatus::Ok {
        return;
    }
    assert!(reply.max_ranges > 0 && reply.max_request_pages > 0);
    let mut buf = vec![0u8; requested as usize * PAGE_SIZE];
    let mut bitmap = Vec::new();
    loop {
        let Ok(h) = read_response_header(&mut r) else {
            return;
        };
        if h.status != RequestStatus::Ok || usize::from(h.nr_ranges) != expect_ranges {
            return;
        }
        for _ in 0..expect_ranges {
            let Ok(rh) = read_range_reply_header(&mut r, requested) else {
                return;
            };
            if rh.status != RangeStatus::Ok {
                continue;
            }
            assert!(rh.nr_pages >= 1 && rh.nr_pages <= requested);
            assert!(rh.data_pages <= rh.nr_pages);
            bitmap.clear();
            bitmap.resize(rh.bitmap_len(), 0);
            if r.read_exact(&mut bitmap).is_err() {
                return;
            }
            if check_bitmap(&bitmap, rh.nr_pages, rh.data_pages).is_err() {
                return;
            }
            let n = rh.nr_pages as usize;
            let mut i = 0;
            while i < n {
                if !bitmap_get(&bitmap, i) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < n && bitmap_get(&bitmap, i) {
                    i += 1;
                }
                if r.read_exact(&mut buf[start * PAGE_SIZE..i * PAGE_SIZE])
                    .is_err()
                {
                    return;
                }
            }
        }
    }
});
