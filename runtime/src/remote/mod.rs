//! [`RemotePages`]: a [`PageSource`](crate::source::PageSource) that fetches pages from `distriproc-pageserver` over the
//! native protocol ([`crate::protocol`]), on TCP or a unix socket.
//!
//! It owns the client side of sessions: connecting, the hello (checkpoint id and token), a
//! small pool of connections so that concurrent callers (fault threads, several restores
//! sharing one source) do not wait on each other, pipelining of batched requests on one
//! connection, timeouts on every step, and reconnection with exponential backoff when a
//! connection breaks. It does not install pages (that is the fetcher) and does not cache them.
//!
//! Errors that come from what the server said (unknown checkpoint, wrong token, unknown pid,
//! address out of range) are final and reported at once. Transport errors (reset, EOF,
//! timeout) close that connection and the request is retried on a new one, with backoff,
//! until [`RemoteOptions::retry_timeout`] has passed since the first failure; then the call
//! fails with [`RemoteError::GaveUp`] naming the endpoint, the attempts and the last error.
//! A call therefore never blocks longer than about `io_timeout + retry_timeout`.
//!
//! Through the [`PageSource`](crate::source::PageSource) trait, errors map onto [`SourceError`](crate::source::SourceError): `UnknownPid`, `NotHere`
//! (also for not-lazy pages), `BadRequest` (out of range), and `Io` for everything else, with
//! `path` naming the endpoint and checkpoint and the [`RemoteError`] as the source.

//! Files by role: `endpoint` (address and options), `transport` (TCP, unix and TLS streams, the
//! hello), `pages` (the pool of sessions, reads and retries, the [`PageSource`](crate::source::PageSource)), `error`;
//! uploads are `crate::upload_client`.

mod endpoint;
mod error;
mod pages;
#[cfg(test)]
mod tests;
mod transport;

pub use crate::upload_client::upload_checkpoint;
pub use endpoint::*;
pub use error::*;
pub use pages::*;
pub use transport::*;
