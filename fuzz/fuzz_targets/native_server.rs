//! The page server's side of the native protocol: everything a client can send.
//!
//! Input byte 0 picks the session kind; the rest is the byte stream the server reads:
//! - even: a read session — `Hello`, then requests (header + ranges) until the stream ends or
//!   a decoder refuses (the server closes the connection on the first refusal);
//! - odd: an upload session — `Hello`, then upload file headers (`FileHeader`), each file's
//!   bytes skipped (bounded), until `End` or a refusal.
#![no_main]

use std::io::Read;

use distriproc_runtime::protocol::upload::{FileHeader, FileKind};
use distriproc_runtime::protocol::{
    read_ranges, read_request_header, Hello, RequestKind, MAX_RANGES, MAX_REQUEST_PAGES,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut r = rest;
    let Ok(hello) = Hello::read(&mut r) else {
        return;
    };
    assert!(!hello.checkpoint.is_empty());
    assert!(hello.checkpoint.len() <= distriproc_runtime::protocol::MAX_CHECKPOINT_ID_LEN);
    if mode % 2 == 0 {
        let mut ranges = Vec::new();
        loop {
            let h = match read_request_header(&mut r, MAX_RANGES) {
                Ok(Some(h)) => h,
                _ => return,
            };
            if h.kind == RequestKind::Goodbye {
                return;
            }
            if read_ranges(&mut r, h.nr_ranges, MAX_REQUEST_PAGES, &mut ranges).is_err() {
                return;
            }
            assert_eq!(ranges.len(), usize::from(h.nr_ranges));
            let total: u64 = ranges.iter().map(|x| u64::from(x.nr_pages)).sum();
            assert!(total <= u64::from(MAX_REQUEST_PAGES));
            for x in &ranges {
                if x.check().is_ok() {
                    let end = x.vaddr + u64::from(x.nr_pages) * 4096;
                    assert!(end <= distriproc_runtime::protocol::MAX_USER_ADDRESS);
                }
            }
        }
    } else {
        loop {
            let h = match FileHeader::read(&mut r) {
                Ok(h) => h,
                Err(_) => return,
            };
            if h.kind == FileKind::End {
                return;
            }
            assert!(!h.name.is_empty() && !h.name.contains('/') && !h.name.starts_with('.'));
            // Skip the file's bytes as the server would store them (bounded by the input).
            let mut sink = std::io::sink();
            let _ = std::io::copy(&mut (&mut r).take(h.size), &mut sink);
        }
    }
});
