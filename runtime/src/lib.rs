//! DistriProc's restore engine, below the shim: CRIU image reading (`images`), page sources
//! (`source`: local images; `remote`: the page server), the userfaultfd fetcher (`fetcher`),
//! working-set profiles (`profile`), the page-server wire protocol (`protocol`), restore
//! statistics (`stats`), and eviction by a system call run inside the task (`evict`).
pub mod evict;
pub mod fetcher;
pub mod images;
pub mod layer;
pub mod profile;
pub mod protocol;
pub mod remote;
pub mod residency;
pub mod source;
pub mod stats;
pub mod upload_client;

/// An error and its sources on one line, joined with ": " (for logs and messages that must carry
/// the cause, e.g. an `io::Error` under a protocol error).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_joins_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("open /x")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(super::error_chain(&e), "open /x: inner");
    }
}
