//! The page-server wire protocols, defined once and shared by `distriproc-pageserver` and its
//! clients ([`crate::remote::RemotePages`]).
//!
//! This module is the native protocol; [`criu`] is the codec of CRIU's own page-server header,
//! which the page server also speaks so that unmodified `criu lazy-pages` and
//! `criu dump --page-server` can use it. Codecs only: no sockets are opened here. Every reader
//! checks each length against a named limit *before* allocating, and every wire enum reserves
//! the value 0 (a zeroed or truncated buffer never decodes as a valid value).
//!
//! # Native protocol, version 1
//!
//! All integers are little-endian. One stream connection (TCP or unix) per session; the session
//! is bound to one checkpoint. The first four bytes, `DPPS`, tell the page server it is not a
//! CRIU client (a CRIU header never starts with them).
//!
//! ```text
//! client                                             page server
//!   Hello {magic, version, checkpoint, token, client} ─▶  checks version, token, checkpoint id
//!   ◀─ HelloReply {magic, version, status, limits, message}
//!      (status != Ok: the server closes after the reply)
//!   Request {id=1, ranges..}  ─▶
//!   Request {id=2, ranges..}  ─▶      (pipelined: any number may be outstanding)
//!   ◀─ Response {id=1, status, RangeReply{bitmap, data pages}..}
//!   ◀─ Response {id=2, ...}            (strictly in request order)
//!   Request {kind=Goodbye}     ─▶
//!   ◀─ Response {Ok, 0 ranges}, close
//! ```
//!
//! ## Hello (client → server), [`HELLO_LEN`] = 16 bytes, then the variable parts
//!
//! | offset | size | field | notes |
//! |---|---|---|---|
//! | 0 | 4 | magic | [`MAGIC`] `b"DPPS"` |
//! | 4 | 2 | version | highest version the client speaks ([`VERSION`]) |
//! | 6 | 2 | flags | [`HELLO_CRIU`], [`HELLO_UPLOAD`], [`HELLO_RESUME`]; other bits must be 0 |
//! | 8 | 2 | checkpoint_len | 1..=[`MAX_CHECKPOINT_ID_LEN`] |
//! | 10 | 2 | token_len | 0..=[`MAX_TOKEN_LEN`] |
//! | 12 | 2 | client_len | 0..=[`MAX_CLIENT_LABEL_LEN`] |
//! | 14 | 2 | reserved | 0 |
//! | 16 | .. | checkpoint id, token, client label | UTF-8, in that order |
//!
//! ## HelloReply (server → client), [`HELLO_REPLY_LEN`] = 16 bytes, then the message
//!
//! | offset | size | field | notes |
//! |---|---|---|---|
//! | 0 | 4 | magic | [`MAGIC`] |
//! | 4 | 2 | version | accepted version; on `UnsupportedVersion` the server's highest |
//! | 6 | 2 | status | [`HelloStatus`] (0 reserved) |
//! | 8 | 2 | max_ranges | ranges per request the server accepts (≤ [`MAX_RANGES`]) |
//! | 10 | 2 | message_len | 0..=[`MAX_MESSAGE_LEN`] |
//! | 12 | 4 | max_request_pages | pages per request the server accepts (≤ [`MAX_REQUEST_PAGES`]) |
//! | 16 | .. | message | UTF-8, why the hello was refused |
//!
//! ## Request (client → server), [`REQUEST_HEADER_LEN`] = 16 bytes, then `nr_ranges` ranges
//!
//! | offset | size | field | notes |
//! |---|---|---|---|
//! | 0 | 4 | request_id | chosen by the client, echoed in the response |
//! | 4 | 2 | kind | [`RequestKind`] (0 reserved) |
//! | 6 | 2 | nr_ranges | 0..=[`MAX_RANGES`] (0 for `Goodbye`) |
//! | 8 | 4 | flags | [`REQ_FIRST_RUN`]; other bits must be 0 |
//! | 12 | 4 | reserved | 0 |
//!
//! Range, [`RANGE_LEN`] = 16 bytes: `pid u32 | nr_pages u32 | vaddr u64` (virtual pid, page
//! count 1..=[`MAX_RANGE_PAGES`], page-aligned dump-time address). The sum of `nr_pages` of a
//! request is at most [`MAX_REQUEST_PAGES`].
//!
//! ## Response (server → client), [`RESPONSE_HEADER_LEN`] = 16 bytes
//!
//! | offset | size | field | notes |
//! |---|---|---|---|
//! | 0 | 4 | request_id | of the request answered |
//! | 4 | 2 | status | [`RequestStatus`] (0 reserved) |
//! | 6 | 2 | nr_ranges | = the request's when `Ok`, else 0 |
//! | 8 | 2 | message_len | 0..=[`MAX_MESSAGE_LEN`] |
//! | 10 | 6 | reserved | 0 |
//! | 16 | .. | message, then `nr_ranges` range replies | |
//!
//! A request-level error (`Malformed`, `TooLarge`) means the server could not trust the stream:
//! it closes the connection after the response.
//!
//! ## RangeReply, [`RANGE_REPLY_HEADER_LEN`] = 16 bytes, then the bitmap and the data
//!
//! | offset | size | field | notes |
//! |---|---|---|---|
//! | 0 | 2 | status | [`RangeStatus`] (0 reserved); not `Ok`: no bitmap or data follow |
//! | 2 | 2 | reserved | 0 |
//! | 4 | 4 | nr_pages | pages answered from the range start: 1..=requested (0 on error) |
//! | 8 | 4 | data_pages | number of set bits in the bitmap |
//! | 12 | 4 | reserved | 0 |
//! | 16 | ⌈nr_pages/8⌉ | kind bitmap | bit `i` (byte `i/8`, LSB first): 1 = data, 0 = zero page |
//! | .. | data_pages × 4096 | data | the data pages, in address order; zero pages carry no bytes |
//!
//! The server answers the whole range unless the request has [`REQ_FIRST_RUN`], in which case
//! it stops at the first change of kind (data → zero or zero → data): what
//! [`crate::source::PageSource::read_pages`] needs, without moving bytes it would drop.
//!
//! Over TCP the whole session may run inside TLS ([`tls`]): the TLS handshake comes first and
//! the hello (token included) travels encrypted; the byte layouts below do not change.
//!
//! # Version policy
//!
//! The client sends the highest version it speaks; the server answers with the highest version
//! both speak, or `UnsupportedVersion` with its own highest. A version changes whenever any
//! layout above changes; new kinds and statuses also need a new version (receivers refuse
//! unknown values). Reserved fields must be 0 and are checked, so that a later version can give
//! them meaning.
//!
//! - Version 1: reads (`ReadPages`, `Goodbye`), `HELLO_CRIU`.
//! - Version 2 adds uploads: the hello flag [`HELLO_UPLOAD`] and the file messages of
//!   [`upload`], the request kind [`RequestKind::Info`] (the stored checkpoint's page bytes and
//!   pagemap checksum, so that a client detects a store that does not hold what it expects),
//!   [`HelloStatus::Exists`] and [`RequestStatus::StoreFailed`]. A server refuses them on a
//!   session that negotiated version 1; v1 clients are served as before.
//! - Version 3 adds layered uploads: the upload message [`upload::FileKind::Parent`] (the new
//!   checkpoint leaves pages to a stored parent) and [`RequestStatus::BadParent`]. A server
//!   refuses a `Parent` message on a session that negotiated version 2.
//! - Version 4 adds the hello flag [`HELLO_RESUME`]: a further session of a client that is
//!   already reading the checkpoint (a reconnect, another connection of its pool). A deleted
//!   checkpoint whose pages are still stored is served to such sessions only, so a container
//!   running from it keeps its memory while new restores of it are refused. A client sends
//!   the flag only to a server that answered its first hello with version 4 or later.
//! - Version 5 adds the upload message [`upload::FileKind::Part`]: a file sent in pieces
//!   while it is still being written (the pages CRIU is dumping), so an upload overlaps the
//!   dump. A server refuses it on a session that negotiated an older version.
//!
//! # Limits
//!
//! [`MAX_CHECKPOINT_ID_LEN`], [`MAX_TOKEN_LEN`], [`MAX_CLIENT_LABEL_LEN`], [`MAX_MESSAGE_LEN`],
//! [`MAX_RANGES`], [`MAX_RANGE_PAGES`], [`MAX_REQUEST_PAGES`]: a peer that exceeds one gets
//! [`ProtocolError::Limit`], before anything is allocated.

pub mod criu;
pub mod tls;

use std::io::{self, Read};

/// Page size of the protocol: the page size of the images ([`crate::images::PAGE_SIZE`]), as a
/// length.
pub const PAGE_SIZE: usize = 4096;
const _: () = assert!(PAGE_SIZE as u64 == crate::images::PAGE_SIZE);
/// First four bytes of every hello and hello reply.
pub const MAGIC: [u8; 4] = *b"DPPS";
/// The protocol version this build speaks (and the highest).
pub const VERSION: u16 = 5;
/// The first version with [`HELLO_UPLOAD`], [`RequestKind::Info`], [`HelloStatus::Exists`] and
/// [`RequestStatus::StoreFailed`].
pub const VERSION_UPLOAD: u16 = 2;
/// The first version with layered uploads ([`upload::FileKind::Parent`],
/// [`RequestStatus::BadParent`]).
pub const VERSION_LAYERS: u16 = 3;
/// The first version with [`HELLO_RESUME`].
pub const VERSION_RESUME: u16 = 4;
/// The first version with streamed uploads ([`upload::FileKind::Part`]).
pub const VERSION_PARTS: u16 = 5;
/// Longest checkpoint id.
pub const MAX_CHECKPOINT_ID_LEN: usize = 128;
/// Longest credential token.
pub const MAX_TOKEN_LEN: usize = 1024;
/// Longest client label (who is restoring; goes to the access log).
pub const MAX_CLIENT_LABEL_LEN: usize = 128;
/// Longest error message.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Most ranges in one request.
pub const MAX_RANGES: usize = 256;
/// Most pages in one range (4 MiB).
pub const MAX_RANGE_PAGES: u32 = 1024;
/// Most pages in one request, all ranges together (16 MiB).
pub const MAX_REQUEST_PAGES: u32 = 4096;
/// Highest user-space address + 1 accepted in a range (x86_64 with 5-level paging).
pub const MAX_USER_ADDRESS: u64 = 1 << 57;

/// Hello flag: after an `Ok` reply the connection speaks CRIU's page-server protocol (GET
/// requests, [`criu`]) for the named checkpoint, so that `criu lazy-pages --page-server
/// --ps-socket FD` can run on a connection the shim opened and authenticated.
pub const HELLO_CRIU: u16 = 1;
/// Hello flag (version 2): the session uploads a new checkpoint under the hello's id
/// ([`upload`]) instead of reading one.
pub const HELLO_UPLOAD: u16 = 2;
/// Hello flag (version 4): the client already reads this checkpoint through another session
/// (see the version policy).
pub const HELLO_RESUME: u16 = 4;
const HELLO_KNOWN_FLAGS: u16 = HELLO_CRIU | HELLO_UPLOAD | HELLO_RESUME;

/// Request flag: answer only the first run of one kind of each range.
pub const REQ_FIRST_RUN: u32 = 1;
const REQ_KNOWN_FLAGS: u32 = REQ_FIRST_RUN;

/// Size of [`Hello`]'s fixed part.
pub const HELLO_LEN: usize = 16;
/// Size of [`HelloReply`]'s fixed part.
pub const HELLO_REPLY_LEN: usize = 16;
/// Size of a request header.
pub const REQUEST_HEADER_LEN: usize = 16;
/// Size of a [`Range`] on the wire.
pub const RANGE_LEN: usize = 16;
/// Size of a response header.
pub const RESPONSE_HEADER_LEN: usize = 16;
/// Size of a range reply header.
pub const RANGE_REPLY_HEADER_LEN: usize = 16;

/// The fixed part of a hello as it is laid out on the wire (sizes asserted at compile time).
#[repr(C)]
struct RawHello {
    magic: [u8; 4],
    version: u16,
    flags: u16,
    checkpoint_len: u16,
    token_len: u16,
    client_len: u16,
    reserved: u16,
}
#[repr(C)]
struct RawHelloReply {
    magic: [u8; 4],
    version: u16,
    status: u16,
    max_ranges: u16,
    message_len: u16,
    max_request_pages: u32,
}
#[repr(C)]
struct RawRequestHeader {
    request_id: u32,
    kind: u16,
    nr_ranges: u16,
    flags: u32,
    reserved: u32,
}
#[repr(C)]
struct RawRange {
    pid: u32,
    nr_pages: u32,
    vaddr: u64,
}
#[repr(C)]
struct RawResponseHeader {
    request_id: u32,
    status: u16,
    nr_ranges: u16,
    message_len: u16,
    reserved: [u8; 6],
}
#[repr(C)]
struct RawRangeReply {
    status: u16,
    reserved: u16,
    nr_pages: u32,
    data_pages: u32,
    reserved2: u32,
}
const _: () = assert!(std::mem::size_of::<RawHello>() == HELLO_LEN);
const _: () = assert!(std::mem::size_of::<RawHelloReply>() == HELLO_REPLY_LEN);
const _: () = assert!(std::mem::size_of::<RawRequestHeader>() == REQUEST_HEADER_LEN);
const _: () = assert!(std::mem::size_of::<RawRange>() == RANGE_LEN);
const _: () = assert!(std::mem::size_of::<RawResponseHeader>() == RESPONSE_HEADER_LEN);
const _: () = assert!(std::mem::size_of::<RawRangeReply>() == RANGE_REPLY_HEADER_LEN);
const _: () = assert!(MAX_RANGE_PAGES <= MAX_REQUEST_PAGES);
const _: () = assert!(MAX_RANGES <= u16::MAX as usize);

/// Errors of the wire protocols: what was wrong with which field, or which I/O step failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading or writing the stream failed.
    #[error("{what} failed")]
    Io {
        /// The step (e.g. "read response header").
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection where a message was expected.
    #[error("connection closed by peer while waiting for {what}")]
    Closed {
        /// What was awaited.
        what: &'static str,
    },
    /// The peer is not speaking this protocol.
    #[error("bad magic {found:02x?}, expected {MAGIC:02x?} (not a distriproc page server?)")]
    BadMagic {
        /// The first bytes received.
        found: [u8; 4],
    },
    /// No version both sides speak.
    #[error("protocol version {theirs} not supported (this side speaks up to {ours})")]
    UnsupportedVersion {
        /// Ours.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// A length or count is over its limit (checked before allocating).
    #[error("{what} is {value}, limit is {limit}")]
    Limit {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A field holds a value that is not allowed (reserved zero, unknown enum value, bad flag).
    #[error("invalid {what}: {value:#x}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A text field is not UTF-8.
    #[error("{what} is not UTF-8")]
    NotUtf8 {
        /// The field.
        what: &'static str,
    },
    /// The server refused the hello.
    #[error("page server refused the session ({status}): {message}")]
    Refused {
        /// Why.
        status: HelloStatus,
        /// The server's explanation.
        message: String,
    },
    /// A response answered another request than the one expected.
    #[error("response for request {got}, expected {expected}")]
    OutOfOrder {
        /// The request awaited.
        expected: u32,
        /// The request answered.
        got: u32,
    },
    /// The server answered a request with a request-level error.
    #[error("page server failed request {request_id} ({status}): {message}")]
    RequestFailed {
        /// The request.
        request_id: u32,
        /// The status.
        status: RequestStatus,
        /// The server's explanation.
        message: String,
    },
}

impl ProtocolError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> ProtocolError {
        move |source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                ProtocolError::Closed { what }
            } else {
                ProtocolError::Io { what, source }
            }
        }
    }

    /// Whether the error came from the transport (the connection is unusable, a retry on a new
    /// connection may succeed) rather than from what the peer said.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            ProtocolError::Io { .. } | ProtocolError::Closed { .. }
        )
    }

    /// Whether the error is a timeout of a socket read or write.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProtocolError::Io { source, .. }
            if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $n:expr => $text:expr,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum $name {
            $($(#[$vm])* $v = $n,)+
        }
        impl $name {
            /// Decodes a wire value; 0 (reserved) and unknown values are refused.
            pub fn from_wire(v: u16) -> Result<Self, ProtocolError> {
                match v {
                    $($n => Ok(Self::$v),)+
                    _ => Err(ProtocolError::Invalid { what: stringify!($name), value: u64::from(v) }),
                }
            }
            /// The wire value.
            pub fn to_wire(self) -> u16 {
                self as u16
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self { $(Self::$v => $text,)+ })
            }
        }
    };
}

pub mod upload;

wire_enum! {
    /// Outcome of a hello. 0 is reserved.
    HelloStatus {
        /// Session open.
        Ok = 1 => "ok",
        /// No common protocol version.
        UnsupportedVersion = 2 => "unsupported version",
        /// Missing or wrong token.
        Unauthorized = 3 => "unauthorized",
        /// The store has no such checkpoint.
        UnknownCheckpoint = 4 => "unknown checkpoint",
        /// The id is not a valid checkpoint name (e.g. it would escape the store).
        BadCheckpointId = 5 => "bad checkpoint id",
        /// The checkpoint exists but its images cannot be read.
        BadCheckpoint = 6 => "unreadable checkpoint",
        /// The hello itself is malformed.
        Malformed = 7 => "malformed hello",
        /// The server is at its connection limit.
        Busy = 8 => "busy",
        /// Upload (v2): the store already has a checkpoint with this id.
        Exists = 9 => "checkpoint exists",
    }
}

wire_enum! {
    /// Kind of a request. 0 is reserved.
    RequestKind {
        /// Read the pages of the ranges that follow.
        ReadPages = 1 => "read pages",
        /// End the session: the server answers `Ok` with no ranges and closes.
        Goodbye = 2 => "goodbye",
        /// (v2) No ranges; the server answers `Ok` with no ranges and the message
        /// `pages_bytes=<n> pagemap_checksum=<16 hex>` ([`upload::pagemap_checksum`]).
        Info = 3 => "info",
    }
}

wire_enum! {
    /// Request-level outcome. 0 is reserved.
    RequestStatus {
        /// Each range has its own reply.
        Ok = 1 => "ok",
        /// The request is malformed (bad kind, flags, reserved field); the server closes.
        Malformed = 2 => "malformed request",
        /// The request exceeds the server's limits; the server closes.
        TooLarge = 3 => "request too large",
        /// (v2) An upload could not be stored (disk error, id taken meanwhile); the server
        /// closes.
        StoreFailed = 4 => "store failed",
        /// (v3) An upload's parent is missing, holds other memory than named, or would make
        /// the chain too deep; the server closes.
        BadParent = 5 => "parent refused",
    }
}

wire_enum! {
    /// Outcome of one range. 0 is reserved.
    RangeStatus {
        /// Bitmap and data follow.
        Ok = 1 => "ok",
        /// The checkpoint has no pages for this pid.
        UnknownPid = 2 => "unknown pid",
        /// The range is empty, unaligned, too long or outside the user address space.
        OutOfRange = 3 => "address out of range",
        /// The pages were dumped but their data is not in the store (a `dump --lazy-pages`
        /// range).
        NotHere = 4 => "pages not in the store",
        /// The range covers pages that were not dumped as lazy.
        NotLazy = 5 => "pages not lazy",
        /// The server could not read its images.
        ReadFailed = 6 => "read failed on the server",
    }
}

/// The client's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Highest version the client speaks.
    pub version: u16,
    /// The checkpoint (a subdirectory name of the store).
    pub checkpoint: String,
    /// Credentials: the shared token.
    pub token: String,
    /// Who is restoring (container id, host): recorded in the access log.
    pub client: String,
    /// [`HELLO_CRIU`]: switch to CRIU's protocol after the reply.
    pub criu_mode: bool,
}

/// The server's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// Accepted version (or the server's highest when refusing for version).
    pub version: u16,
    /// Outcome.
    pub status: HelloStatus,
    /// Ranges per request the server accepts.
    pub max_ranges: u16,
    /// Pages per request the server accepts.
    pub max_request_pages: u32,
    /// Why the hello was refused (empty on success).
    pub message: String,
}

/// One range of a read request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Virtual pid (as in pstree.img).
    pub pid: u32,
    /// Page-aligned dump-time address.
    pub vaddr: u64,
    /// Number of pages.
    pub nr_pages: u32,
}

impl Range {
    /// Checks alignment, length and address space; `Err` carries the status to answer.
    pub fn check(&self) -> Result<(), RangeStatus> {
        let end = u64::from(self.nr_pages)
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|len| self.vaddr.checked_add(len));
        if self.nr_pages == 0
            || self.nr_pages > MAX_RANGE_PAGES
            || !self.vaddr.is_multiple_of(PAGE_SIZE as u64)
            || end.is_none_or(|e| e > MAX_USER_ADDRESS)
        {
            return Err(RangeStatus::OutOfRange);
        }
        Ok(())
    }
}

/// A decoded request header (the ranges follow separately).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Echoed in the response.
    pub request_id: u32,
    /// What to do.
    pub kind: RequestKind,
    /// Number of ranges that follow.
    pub nr_ranges: u16,
    /// `REQ_*` bits.
    pub flags: u32,
}

/// A decoded response header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHeader {
    /// The request answered.
    pub request_id: u32,
    /// Request-level outcome.
    pub status: RequestStatus,
    /// Number of range replies that follow.
    pub nr_ranges: u16,
    /// Why the request failed (empty on success).
    pub message: String,
}

/// A decoded range reply header (bitmap and data follow when `status` is `Ok`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeReplyHeader {
    /// Outcome.
    pub status: RangeStatus,
    /// Pages answered from the range start.
    pub nr_pages: u32,
    /// Data pages among them (set bits of the bitmap).
    pub data_pages: u32,
}

impl RangeReplyHeader {
    /// Length of the kind bitmap that follows.
    pub fn bitmap_len(&self) -> usize {
        bitmap_len(self.nr_pages)
    }
}

/// Bytes of a kind bitmap for `pages` pages.
pub fn bitmap_len(pages: u32) -> usize {
    usize::try_from(pages.div_ceil(8)).unwrap_or(usize::MAX)
}

/// Whether page `i` of a kind bitmap is data.
pub fn bitmap_get(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Marks page `i` of a kind bitmap as data.
pub fn bitmap_set(bitmap: &mut [u8], i: usize) {
    if let Some(b) = bitmap.get_mut(i / 8) {
        *b |= 1 << (i % 8);
    }
}

fn limit(what: &'static str, value: usize, max: usize) -> Result<(), ProtocolError> {
    if value > max {
        return Err(ProtocolError::Limit {
            what,
            value: value as u64,
            limit: max as u64,
        });
    }
    Ok(())
}

fn zero(what: &'static str, value: u64) -> Result<(), ProtocolError> {
    if value != 0 {
        return Err(ProtocolError::Invalid { what, value });
    }
    Ok(())
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn read_text<R: Read>(
    r: &mut R,
    len: usize,
    what: &'static str,
    max: usize,
) -> Result<String, ProtocolError> {
    limit(what, len, max)?;
    let mut v = vec![0u8; len];
    r.read_exact(&mut v).map_err(ProtocolError::io(what))?;
    String::from_utf8(v).map_err(|_| ProtocolError::NotUtf8 { what })
}

fn text_len(what: &'static str, s: &str, max: usize) -> Result<u16, ProtocolError> {
    limit(what, s.len(), max)?;
    u16::try_from(s.len()).map_err(|_| ProtocolError::Limit {
        what,
        value: s.len() as u64,
        limit: u64::from(u16::MAX),
    })
}

impl Hello {
    /// Encodes the whole hello (fixed part and strings).
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        self.encode_with_flags(0)
    }

    /// Encodes the hello with `extra` flags (e.g. [`HELLO_UPLOAD`]) besides `criu_mode`.
    pub fn encode_with_flags(&self, extra: u16) -> Result<Vec<u8>, ProtocolError> {
        if extra & !HELLO_KNOWN_FLAGS != 0 {
            return Err(ProtocolError::Invalid {
                what: "hello flags",
                value: u64::from(extra),
            });
        }
        if self.checkpoint.is_empty() {
            return Err(ProtocolError::Invalid {
                what: "checkpoint id length",
                value: 0,
            });
        }
        let c = text_len("checkpoint id", &self.checkpoint, MAX_CHECKPOINT_ID_LEN)?;
        let t = text_len("token", &self.token, MAX_TOKEN_LEN)?;
        let l = text_len("client label", &self.client, MAX_CLIENT_LABEL_LEN)?;
        let mut b = Vec::with_capacity(HELLO_LEN + self.checkpoint.len() + self.token.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        let flags = extra | if self.criu_mode { HELLO_CRIU } else { 0 };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&c.to_le_bytes());
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&l.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(self.checkpoint.as_bytes());
        b.extend_from_slice(self.token.as_bytes());
        b.extend_from_slice(self.client.as_bytes());
        Ok(b)
    }

    /// Reads a hello whose 4 magic bytes were already consumed (the server peeks them to tell
    /// native clients from CRIU). Lengths are checked before the strings are read.
    pub fn read_after_magic<R: Read>(r: &mut R) -> Result<Hello, ProtocolError> {
        Self::read_after_magic_with_flags(r).map(|(h, _)| h)
    }

    /// As [`Hello::read_after_magic`], also returning all the hello's flags.
    pub fn read_after_magic_with_flags<R: Read>(r: &mut R) -> Result<(Hello, u16), ProtocolError> {
        let mut b = [0u8; HELLO_LEN];
        b[..4].copy_from_slice(&MAGIC);
        r.read_exact(&mut b[4..])
            .map_err(ProtocolError::io("read hello"))?;
        let flags = u16_at(&b, 6);
        Self::read_rest(&b, r).map(|h| (h, flags))
    }

    /// Reads a whole hello.
    pub fn read<R: Read>(r: &mut R) -> Result<Hello, ProtocolError> {
        let mut b = [0u8; HELLO_LEN];
        r.read_exact(&mut b)
            .map_err(ProtocolError::io("read hello"))?;
        Self::read_rest(&b, r)
    }

    fn read_rest<R: Read>(b: &[u8; HELLO_LEN], r: &mut R) -> Result<Hello, ProtocolError> {
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&b[..4]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        let version = u16_at(b, 4);
        if version == 0 {
            return Err(ProtocolError::Invalid {
                what: "hello version",
                value: 0,
            });
        }
        let flags = u16_at(b, 6);
        if flags & !HELLO_KNOWN_FLAGS != 0 {
            return Err(ProtocolError::Invalid {
                what: "hello flags",
                value: u64::from(flags),
            });
        }
        zero("hello reserved field", u64::from(u16_at(b, 14)))?;
        let clen = usize::from(u16_at(b, 8));
        let tlen = usize::from(u16_at(b, 10));
        let llen = usize::from(u16_at(b, 12));
        if clen == 0 {
            return Err(ProtocolError::Invalid {
                what: "checkpoint id length",
                value: 0,
            });
        }
        limit("checkpoint id length", clen, MAX_CHECKPOINT_ID_LEN)?;
        limit("token length", tlen, MAX_TOKEN_LEN)?;
        limit("client label length", llen, MAX_CLIENT_LABEL_LEN)?;
        let checkpoint = read_text(r, clen, "checkpoint id", MAX_CHECKPOINT_ID_LEN)?;
        let token = read_text(r, tlen, "token", MAX_TOKEN_LEN)?;
        let client = read_text(r, llen, "client label", MAX_CLIENT_LABEL_LEN)?;
        Ok(Hello {
            version,
            checkpoint,
            token,
            client,
            criu_mode: flags & HELLO_CRIU != 0,
        })
    }
}

impl HelloReply {
    /// A successful reply with the given limits.
    pub fn ok(version: u16, max_ranges: u16, max_request_pages: u32) -> HelloReply {
        HelloReply {
            version,
            status: HelloStatus::Ok,
            max_ranges,
            max_request_pages,
            message: String::new(),
        }
    }

    /// A refusal; the message is cut to [`MAX_MESSAGE_LEN`].
    pub fn refuse(status: HelloStatus, message: &str) -> HelloReply {
        HelloReply {
            version: VERSION,
            status,
            max_ranges: 0,
            max_request_pages: 0,
            message: truncate(message, MAX_MESSAGE_LEN).to_string(),
        }
    }

    /// Encodes the reply.
    pub fn encode(&self) -> Vec<u8> {
        let msg = truncate(&self.message, MAX_MESSAGE_LEN);
        let mut b = Vec::with_capacity(HELLO_REPLY_LEN + msg.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.status.to_wire().to_le_bytes());
        b.extend_from_slice(&self.max_ranges.to_le_bytes());
        b.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_le_bytes());
        b.extend_from_slice(&self.max_request_pages.to_le_bytes());
        b.extend_from_slice(msg.as_bytes());
        b
    }

    /// Reads a reply.
    pub fn read<R: Read>(r: &mut R) -> Result<HelloReply, ProtocolError> {
        let mut b = [0u8; HELLO_REPLY_LEN];
        r.read_exact(&mut b)
            .map_err(ProtocolError::io("read hello reply"))?;
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&b[..4]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        let version = u16_at(&b, 4);
        let status = HelloStatus::from_wire(u16_at(&b, 6))?;
        let max_ranges = u16_at(&b, 8);
        let mlen = usize::from(u16_at(&b, 10));
        let max_request_pages = u32_at(&b, 12);
        let message = read_text(r, mlen, "hello reply message", MAX_MESSAGE_LEN)?;
        if status == HelloStatus::Ok {
            if version == 0 || version > VERSION {
                return Err(ProtocolError::UnsupportedVersion {
                    ours: VERSION,
                    theirs: version,
                });
            }
            if max_ranges == 0 || max_request_pages == 0 {
                return Err(ProtocolError::Invalid {
                    what: "hello reply limits",
                    value: u64::from(max_ranges.min(1)) * u64::from(max_request_pages),
                });
            }
        }
        Ok(HelloReply {
            version,
            status,
            max_ranges,
            max_request_pages,
            message,
        })
    }
}

/// Encodes a request: header and ranges.
pub fn encode_request(
    request_id: u32,
    kind: RequestKind,
    flags: u32,
    ranges: &[Range],
    out: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    limit("ranges per request", ranges.len(), MAX_RANGES)?;
    if flags & !REQ_KNOWN_FLAGS != 0 {
        return Err(ProtocolError::Invalid {
            what: "request flags",
            value: u64::from(flags),
        });
    }
    let total: u64 = ranges.iter().map(|r| u64::from(r.nr_pages)).sum();
    if total > u64::from(MAX_REQUEST_PAGES) {
        return Err(ProtocolError::Limit {
            what: "pages per request",
            value: total,
            limit: u64::from(MAX_REQUEST_PAGES),
        });
    }
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&kind.to_wire().to_le_bytes());
    out.extend_from_slice(&u16::try_from(ranges.len()).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for r in ranges {
        out.extend_from_slice(&r.pid.to_le_bytes());
        out.extend_from_slice(&r.nr_pages.to_le_bytes());
        out.extend_from_slice(&r.vaddr.to_le_bytes());
    }
    Ok(())
}

/// Reads a request header; `max_ranges` is the server's own limit (≤ [`MAX_RANGES`]).
/// `Ok(None)` on a clean end of stream before the first byte.
pub fn read_request_header<R: Read>(
    r: &mut R,
    max_ranges: usize,
) -> Result<Option<RequestHeader>, ProtocolError> {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    if !read_exact_or_eof(r, &mut b).map_err(ProtocolError::io("read request header"))? {
        return Ok(None);
    }
    let request_id = u32_at(&b, 0);
    let kind = RequestKind::from_wire(u16_at(&b, 4))?;
    let nr_ranges = u16_at(&b, 6);
    let flags = u32_at(&b, 8);
    if flags & !REQ_KNOWN_FLAGS != 0 {
        return Err(ProtocolError::Invalid {
            what: "request flags",
            value: u64::from(flags),
        });
    }
    zero("request reserved field", u64::from(u32_at(&b, 12)))?;
    limit(
        "ranges per request",
        usize::from(nr_ranges),
        max_ranges.min(MAX_RANGES),
    )?;
    if matches!(kind, RequestKind::Goodbye | RequestKind::Info) {
        zero("goodbye/info range count", u64::from(nr_ranges))?;
    }
    Ok(Some(RequestHeader {
        request_id,
        kind,
        nr_ranges,
        flags,
    }))
}

/// Reads the ranges of a request into `out` (cleared first; the count was checked against the
/// limit by [`read_request_header`]). Checks the page total against `max_pages`.
pub fn read_ranges<R: Read>(
    r: &mut R,
    nr_ranges: u16,
    max_pages: u32,
    out: &mut Vec<Range>,
) -> Result<(), ProtocolError> {
    let n = usize::from(nr_ranges);
    limit("ranges per request", n, MAX_RANGES)?;
    out.clear();
    out.reserve(n);
    let mut total = 0u64;
    for _ in 0..n {
        let mut b = [0u8; RANGE_LEN];
        r.read_exact(&mut b)
            .map_err(ProtocolError::io("read range"))?;
        let range = Range {
            pid: u32_at(&b, 0),
            nr_pages: u32_at(&b, 4),
            vaddr: u64_at(&b, 8),
        };
        total += u64::from(range.nr_pages);
        out.push(range);
    }
    let max = u64::from(max_pages.min(MAX_REQUEST_PAGES));
    if total > max {
        return Err(ProtocolError::Limit {
            what: "pages per request",
            value: total,
            limit: max,
        });
    }
    Ok(())
}

/// Encodes a response header (message cut to [`MAX_MESSAGE_LEN`]).
pub fn encode_response_header(
    request_id: u32,
    status: RequestStatus,
    nr_ranges: u16,
    message: &str,
    out: &mut Vec<u8>,
) {
    let msg = truncate(message, MAX_MESSAGE_LEN);
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&status.to_wire().to_le_bytes());
    out.extend_from_slice(&nr_ranges.to_le_bytes());
    out.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&[0u8; 6]);
    out.extend_from_slice(msg.as_bytes());
}

/// Reads a response header and its message.
pub fn read_response_header<R: Read>(r: &mut R) -> Result<ResponseHeader, ProtocolError> {
    let mut b = [0u8; RESPONSE_HEADER_LEN];
    r.read_exact(&mut b)
        .map_err(ProtocolError::io("read response header"))?;
    let request_id = u32_at(&b, 0);
    let status = RequestStatus::from_wire(u16_at(&b, 4))?;
    let nr_ranges = u16_at(&b, 6);
    let mlen = usize::from(u16_at(&b, 8));
    zero(
        "response reserved field",
        u64_at(&[b[10], b[11], b[12], b[13], b[14], b[15], 0, 0], 0),
    )?;
    limit("ranges per response", usize::from(nr_ranges), MAX_RANGES)?;
    let message = read_text(r, mlen, "response message", MAX_MESSAGE_LEN)?;
    Ok(ResponseHeader {
        request_id,
        status,
        nr_ranges,
        message,
    })
}

/// Encodes a range reply header. For `Ok`, the bitmap and data follow (the caller writes them).
pub fn encode_range_reply_header(h: &RangeReplyHeader, out: &mut Vec<u8>) {
    out.extend_from_slice(&h.status.to_wire().to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&h.nr_pages.to_le_bytes());
    out.extend_from_slice(&h.data_pages.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

/// Reads a range reply header and checks it against the range it answers: `nr_pages` within
/// 1..=requested on `Ok` (0 otherwise), `data_pages` ≤ `nr_pages`.
pub fn read_range_reply_header<R: Read>(
    r: &mut R,
    requested: u32,
) -> Result<RangeReplyHeader, ProtocolError> {
    let mut b = [0u8; RANGE_REPLY_HEADER_LEN];
    r.read_exact(&mut b)
        .map_err(ProtocolError::io("read range reply"))?;
    let status = RangeStatus::from_wire(u16_at(&b, 0))?;
    zero("range reply reserved field", u64::from(u16_at(&b, 2)))?;
    zero("range reply reserved field", u64::from(u32_at(&b, 12)))?;
    let nr_pages = u32_at(&b, 4);
    let data_pages = u32_at(&b, 8);
    if status == RangeStatus::Ok {
        if nr_pages == 0 {
            return Err(ProtocolError::Invalid {
                what: "range reply page count",
                value: 0,
            });
        }
        limit(
            "range reply page count",
            nr_pages as usize,
            requested.min(MAX_RANGE_PAGES) as usize,
        )?;
        limit(
            "range reply data pages",
            data_pages as usize,
            nr_pages as usize,
        )?;
    } else {
        zero("failed range page count", u64::from(nr_pages))?;
        zero("failed range data pages", u64::from(data_pages))?;
    }
    Ok(RangeReplyHeader {
        status,
        nr_pages,
        data_pages,
    })
}

/// Counts the data pages of a bitmap of `pages` pages and checks it matches `data_pages` and has
/// no bits set past the end.
pub fn check_bitmap(bitmap: &[u8], pages: u32, data_pages: u32) -> Result<(), ProtocolError> {
    if bitmap.len() != bitmap_len(pages) {
        return Err(ProtocolError::Invalid {
            what: "bitmap length",
            value: bitmap.len() as u64,
        });
    }
    let ones: u32 = bitmap.iter().map(|b| b.count_ones()).sum();
    let tail = pages % 8;
    if tail != 0 {
        if let Some(last) = bitmap.last() {
            if last >> tail != 0 {
                return Err(ProtocolError::Invalid {
                    what: "bitmap bits past the range",
                    value: u64::from(*last),
                });
            }
        }
    }
    if ones != data_pages {
        return Err(ProtocolError::Invalid {
            what: "bitmap data page count",
            value: u64::from(ones),
        });
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `read_exact` that returns `Ok(false)` when the stream ends before the first byte.
pub fn read_exact_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn hello() -> Hello {
        Hello {
            version: VERSION,
            checkpoint: "ckpt-1".into(),
            token: "s3cret".into(),
            client: "node-a/ctr-1".into(),
            criu_mode: false,
        }
    }

    #[test]
    fn hello_round_trip() {
        let b = hello().encode().unwrap();
        assert_eq!(&b[..4], b"DPPS");
        assert_eq!(b.len(), HELLO_LEN + 6 + 6 + 12);
        assert_eq!(Hello::read(&mut Cursor::new(&b)).unwrap(), hello());
        assert_eq!(
            Hello::read_after_magic(&mut Cursor::new(&b[4..])).unwrap(),
            hello()
        );
    }

    #[test]
    fn hello_refuses_hostile_lengths_before_allocating() {
        let mut b = hello().encode().unwrap();
        b[10..12].copy_from_slice(&u16::MAX.to_le_bytes()); // token_len 65535
        let e = Hello::read(&mut Cursor::new(&b[..HELLO_LEN])).unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::Limit {
                    what: "token length",
                    value: 65535,
                    ..
                }
            ),
            "{e}"
        );
        let mut b = hello().encode().unwrap();
        b[8..10].copy_from_slice(&0u16.to_le_bytes());
        assert!(matches!(
            Hello::read(&mut Cursor::new(&b)).unwrap_err(),
            ProtocolError::Invalid { .. }
        ));
        let mut b = hello().encode().unwrap();
        b[0] = b'X';
        assert!(matches!(
            Hello::read(&mut Cursor::new(&b)).unwrap_err(),
            ProtocolError::BadMagic { .. }
        ));
        let mut b = hello().encode().unwrap();
        b[4..6].copy_from_slice(&0u16.to_le_bytes());
        assert!(Hello::read(&mut Cursor::new(&b)).is_err());
        let mut b = hello().encode().unwrap();
        b[14] = 1;
        assert!(Hello::read(&mut Cursor::new(&b)).is_err());
        let mut b = hello().encode().unwrap();
        b[6] = 8; // an unknown flag (1 = HELLO_CRIU, 2 = HELLO_UPLOAD, 4 = HELLO_RESUME)
        assert!(Hello::read(&mut Cursor::new(&b)).is_err());
        let b = hello().encode_with_flags(HELLO_UPLOAD).unwrap();
        let (_, flags) = Hello::read_after_magic_with_flags(&mut Cursor::new(&b[4..])).unwrap();
        assert_eq!(flags, HELLO_UPLOAD);
        let h = Hello {
            criu_mode: true,
            ..hello()
        };
        assert_eq!(
            Hello::read(&mut Cursor::new(h.encode().unwrap())).unwrap(),
            h
        );
        let b = hello().encode().unwrap();
        for cut in 0..b.len() {
            assert!(
                Hello::read(&mut Cursor::new(&b[..cut])).is_err(),
                "cut {cut}"
            );
        }
        let mut b = hello().encode().unwrap();
        let n = b.len();
        b[n - 1] = 0xff;
        assert!(matches!(
            Hello::read(&mut Cursor::new(&b)).unwrap_err(),
            ProtocolError::NotUtf8 { .. }
        ));
    }

    #[test]
    fn hello_encode_checks_limits() {
        let mut h = hello();
        h.token = "x".repeat(MAX_TOKEN_LEN + 1);
        assert!(h.encode().is_err());
        h.token.clear();
        h.checkpoint.clear();
        assert!(h.encode().is_err());
    }

    #[test]
    fn hello_reply_round_trip_and_checks() {
        let ok = HelloReply::ok(1, 64, 1024);
        assert_eq!(HelloReply::read(&mut Cursor::new(ok.encode())).unwrap(), ok);
        let no = HelloReply::refuse(HelloStatus::UnknownCheckpoint, "no checkpoint \"x\"");
        assert_eq!(HelloReply::read(&mut Cursor::new(no.encode())).unwrap(), no);
        let long = HelloReply::refuse(HelloStatus::Malformed, &"é".repeat(MAX_MESSAGE_LEN));
        let got = HelloReply::read(&mut Cursor::new(long.encode())).unwrap();
        assert!(got.message.len() <= MAX_MESSAGE_LEN);
        let mut b = ok.encode();
        b[6..8].copy_from_slice(&0u16.to_le_bytes());
        assert!(HelloReply::read(&mut Cursor::new(&b)).is_err());
        let mut b = ok.encode();
        b[10..12].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            HelloReply::read(&mut Cursor::new(&b)).unwrap_err(),
            ProtocolError::Limit { .. }
        ));
        let mut b = ok.encode();
        b[4..6].copy_from_slice(&9u16.to_le_bytes());
        assert!(matches!(
            HelloReply::read(&mut Cursor::new(&b)).unwrap_err(),
            ProtocolError::UnsupportedVersion { .. }
        ));
    }

    #[test]
    fn enums_reserve_zero() {
        assert!(HelloStatus::from_wire(0).is_err());
        assert!(RequestKind::from_wire(0).is_err());
        assert!(RequestStatus::from_wire(0).is_err());
        assert!(RangeStatus::from_wire(0).is_err());
        assert!(RangeStatus::from_wire(99).is_err());
        for s in [
            RangeStatus::Ok,
            RangeStatus::UnknownPid,
            RangeStatus::OutOfRange,
            RangeStatus::NotHere,
            RangeStatus::NotLazy,
            RangeStatus::ReadFailed,
        ] {
            assert_eq!(RangeStatus::from_wire(s.to_wire()).unwrap(), s);
        }
    }

    #[test]
    fn request_round_trip() {
        let ranges = [
            Range {
                pid: 7,
                vaddr: 0x7f00_0000_0000,
                nr_pages: 16,
            },
            Range {
                pid: 8,
                vaddr: 0x1000,
                nr_pages: 1,
            },
        ];
        let mut b = Vec::new();
        encode_request(42, RequestKind::ReadPages, REQ_FIRST_RUN, &ranges, &mut b).unwrap();
        assert_eq!(b.len(), REQUEST_HEADER_LEN + 2 * RANGE_LEN);
        let mut c = Cursor::new(&b);
        let h = read_request_header(&mut c, MAX_RANGES).unwrap().unwrap();
        assert_eq!(
            h,
            RequestHeader {
                request_id: 42,
                kind: RequestKind::ReadPages,
                nr_ranges: 2,
                flags: REQ_FIRST_RUN
            }
        );
        let mut got = Vec::new();
        read_ranges(&mut c, h.nr_ranges, MAX_REQUEST_PAGES, &mut got).unwrap();
        assert_eq!(got, ranges);
        assert!(read_request_header(&mut Cursor::new(&[][..]), 1)
            .unwrap()
            .is_none());
        for cut in 1..REQUEST_HEADER_LEN {
            assert!(read_request_header(&mut Cursor::new(&b[..cut]), MAX_RANGES).is_err());
        }
        let mut c = Cursor::new(&b[..REQUEST_HEADER_LEN + RANGE_LEN + 3]);
        read_request_header(&mut c, MAX_RANGES).unwrap();
        assert!(read_ranges(&mut c, 2, MAX_REQUEST_PAGES, &mut got).is_err());
    }

    #[test]
    fn request_limits_and_hostile_headers() {
        let mut b = Vec::new();
        encode_request(1, RequestKind::ReadPages, 0, &[], &mut b).unwrap();
        b[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            read_request_header(&mut Cursor::new(&b), MAX_RANGES).unwrap_err(),
            ProtocolError::Limit { .. }
        ));
        b[6..8].copy_from_slice(&10u16.to_le_bytes());
        assert!(read_request_header(&mut Cursor::new(&b), 4).is_err());
        let mut b2 = b.clone();
        b2[4..6].copy_from_slice(&0u16.to_le_bytes());
        assert!(read_request_header(&mut Cursor::new(&b2), MAX_RANGES).is_err());
        let mut b2 = b.clone();
        b2[8] = 0x80;
        assert!(read_request_header(&mut Cursor::new(&b2), MAX_RANGES).is_err());
        let mut b2 = b.clone();
        b2[12] = 1;
        assert!(read_request_header(&mut Cursor::new(&b2), MAX_RANGES).is_err());
        // Page total over the limit.
        let many: Vec<Range> = (0..5)
            .map(|i| Range {
                pid: 1,
                vaddr: i * 0x40_0000,
                nr_pages: MAX_RANGE_PAGES,
            })
            .collect();
        assert!(encode_request(1, RequestKind::ReadPages, 0, &many, &mut Vec::new()).is_err());
        let mut b = Vec::new();
        encode_request(1, RequestKind::ReadPages, 0, &many[..2], &mut b).unwrap();
        let mut c = Cursor::new(&b);
        let h = read_request_header(&mut c, MAX_RANGES).unwrap().unwrap();
        assert!(read_ranges(&mut c, h.nr_ranges, MAX_RANGE_PAGES, &mut Vec::new()).is_err());
        let mut b = Vec::new();
        encode_request(3, RequestKind::Goodbye, 0, &[], &mut b).unwrap();
        b[6] = 1;
        assert!(read_request_header(&mut Cursor::new(&b), MAX_RANGES).is_err());
    }

    #[test]
    fn range_checks() {
        let ok = Range {
            pid: 1,
            vaddr: 0x1000,
            nr_pages: 1,
        };
        assert!(ok.check().is_ok());
        for bad in [
            Range { nr_pages: 0, ..ok },
            Range {
                vaddr: 0x1001,
                ..ok
            },
            Range {
                nr_pages: MAX_RANGE_PAGES + 1,
                ..ok
            },
            Range {
                vaddr: u64::MAX - 0xfff,
                ..ok
            },
            Range {
                vaddr: MAX_USER_ADDRESS,
                ..ok
            },
        ] {
            assert_eq!(bad.check(), Err(RangeStatus::OutOfRange), "{bad:?}");
        }
    }

    #[test]
    fn response_round_trip() {
        let mut b = Vec::new();
        encode_response_header(9, RequestStatus::Ok, 2, "", &mut b);
        let mut bitmap = vec![0u8; bitmap_len(10)];
        bitmap_set(&mut bitmap, 0);
        bitmap_set(&mut bitmap, 9);
        encode_range_reply_header(
            &RangeReplyHeader {
                status: RangeStatus::Ok,
                nr_pages: 10,
                data_pages: 2,
            },
            &mut b,
        );
        b.extend_from_slice(&bitmap);
        b.extend_from_slice(&[7u8; 2 * PAGE_SIZE]);
        encode_range_reply_header(
            &RangeReplyHeader {
                status: RangeStatus::UnknownPid,
                nr_pages: 0,
                data_pages: 0,
            },
            &mut b,
        );
        let mut c = Cursor::new(&b);
        let h = read_response_header(&mut c).unwrap();
        assert_eq!(
            (h.request_id, h.status, h.nr_ranges),
            (9, RequestStatus::Ok, 2)
        );
        let r = read_range_reply_header(&mut c, 10).unwrap();
        assert_eq!(r.bitmap_len(), 2);
        let mut bm = vec![0u8; r.bitmap_len()];
        c.read_exact(&mut bm).unwrap();
        check_bitmap(&bm, r.nr_pages, r.data_pages).unwrap();
        assert!(bitmap_get(&bm, 0) && bitmap_get(&bm, 9) && !bitmap_get(&bm, 5));
        let mut data = vec![0u8; 2 * PAGE_SIZE];
        c.read_exact(&mut data).unwrap();
        let r = read_range_reply_header(&mut c, 4).unwrap();
        assert_eq!(r.status, RangeStatus::UnknownPid);

        let mut e = Vec::new();
        encode_response_header(3, RequestStatus::TooLarge, 0, "too many pages", &mut e);
        let h = read_response_header(&mut Cursor::new(&e)).unwrap();
        assert_eq!(h.message, "too many pages");
    }

    #[test]
    fn range_reply_refuses_lies() {
        let enc = |status, nr_pages, data_pages| {
            let mut b = Vec::new();
            encode_range_reply_header(
                &RangeReplyHeader {
                    status,
                    nr_pages,
                    data_pages,
                },
                &mut b,
            );
            b
        };
        // More pages than requested would desynchronise the stream.
        assert!(read_range_reply_header(&mut Cursor::new(enc(RangeStatus::Ok, 5, 0)), 4).is_err());
        assert!(read_range_reply_header(&mut Cursor::new(enc(RangeStatus::Ok, 0, 0)), 4).is_err());
        assert!(read_range_reply_header(&mut Cursor::new(enc(RangeStatus::Ok, 2, 3)), 4).is_err());
        assert!(
            read_range_reply_header(&mut Cursor::new(enc(RangeStatus::NotHere, 1, 0)), 4).is_err()
        );
        let mut b = enc(RangeStatus::Ok, 2, 1);
        b[0] = 0;
        assert!(read_range_reply_header(&mut Cursor::new(b), 4).is_err());
        assert!(check_bitmap(&[0b0000_0101], 3, 2).is_ok());
        assert!(check_bitmap(&[0b0000_1101], 3, 3).is_err());
        assert!(check_bitmap(&[0b0000_0101], 3, 1).is_err());
        assert!(check_bitmap(&[0, 0], 3, 0).is_err());
        let mut h = Vec::new();
        encode_response_header(1, RequestStatus::Ok, 1, "", &mut h);
        h[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            read_response_header(&mut Cursor::new(&h)).unwrap_err(),
            ProtocolError::Limit { .. }
        ));
        let mut h = Vec::new();
        encode_response_header(1, RequestStatus::Ok, 1, "", &mut h);
        h[15] = 1;
        assert!(read_response_header(&mut Cursor::new(&h)).is_err());
    }
}
