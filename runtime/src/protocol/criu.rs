//! Codec of CRIU's page-server header (`struct page_server_iov`, criu/include/page-xfer.h),
//! as spoken by `criu lazy-pages --page-server` (GET) and `criu dump --page-server` (OPEN2,
//! ADD_F, PARENT, CLOSE). Wire format as in criu/page-xfer.c.
//!
//! # Byte layouts (host order = little-endian; no version negotiation exists)
//!
//! CRIU ≤ 4.1, [`HeaderLayout::V41`], 24 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | `cmd` = `flags << 16 \| command` |
//! | 4 | 4 | `nr_pages` (u32) |
//! | 8 | 8 | `vaddr` (dump-time address) |
//! | 16 | 8 | `dst_id` |
//!
//! CRIU ≥ 4.2, [`HeaderLayout::V42`], 32 bytes (`nr_pages` became u64):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | `cmd` |
//! | 4 | 4 | padding (0 on the wire) |
//! | 8 | 8 | `nr_pages` (u64) |
//! | 16 | 8 | `vaddr` |
//! | 24 | 8 | `dst_id` |
//!
//! `dst_id` is `id << 8 | type` ([`PS_TYPE_PID`], [`PS_TYPE_SHMEM`]) for OPEN/OPEN2/PARENT/ADD*,
//! but the **bare virtual pid** for GET.
//!
//! # Replies
//!
//! | request | reply |
//! |---|---|
//! | GET(N pages) | header `cmd = ADD_F \| PE_PRESENT << 16`, `n ≤ N`, same vaddr and dst_id, then `n × 4096` bytes |
//! | OPEN2 | 1 byte `has_parent` |
//! | PARENT | 4-byte int `has_parent` |
//! | CLOSE, FORCE_CLOSE | int32 status 0, then the session ends |
//! | OPEN, ADD, ADD_F, HOLE | nothing (ADD_F with PE_PRESENT is followed by `nr × 4096` data bytes) |
//!
//! There is no "not found" reply: a server that cannot answer a GET can only close.
//!
//! # Telling 4.1 from 4.2
//!
//! [`detect_layout`] looks at the first 24 bytes of a connection. Bytes 4..8 are the 4.2 padding
//! (always 0) or the 4.1 `nr_pages` (non-zero for GET and ADD); when they are 0, bytes 16..24 are
//! the 4.2 `vaddr` (0 for OPEN2/PARENT/CLOSE) or the 4.1 `dst_id` (non-zero for OPEN2/PARENT,
//! which carry a type byte). Anything else is read as 4.2, the format of CRIU on these machines.

use super::ProtocolError;

/// Legacy add (means `PE_PRESENT`).
pub const PS_IOV_ADD: u16 = 1;
/// Legacy hole (means `PE_PARENT`).
pub const PS_IOV_HOLE: u16 = 2;
/// Open a pagemap for writing (no reply).
pub const PS_IOV_OPEN: u16 = 3;
/// Open a pagemap for writing; reply 1 byte `has_parent`.
pub const PS_IOV_OPEN2: u16 = 4;
/// Ask whether a parent exists; reply 4-byte int.
pub const PS_IOV_PARENT: u16 = 5;
/// Add a range with flags in the high 16 bits of `cmd`.
pub const PS_IOV_ADD_F: u16 = 6;
/// Lazy page request.
pub const PS_IOV_GET: u16 = 7;
/// End of session; reply int32 0.
pub const PS_IOV_CLOSE: u16 = 0x1023;
/// End of session (`--ps-socket`); reply int32 0.
pub const PS_IOV_FORCE_CLOSE: u16 = 0x1024;
/// Bits of `cmd` that hold the command.
pub const PS_CMD_BITS: u32 = 16;
/// `dst_id` type byte: a task pagemap (id = virtual pid).
pub const PS_TYPE_PID: u8 = 1;
/// `dst_id` type byte: a shmem pagemap (id = shmid).
pub const PS_TYPE_SHMEM: u8 = 2;
/// Largest page count accepted in one header (a sane bound well above what CRIU sends: its
/// page pipes hold at most a few thousand pages per iov).
pub const MAX_HEADER_PAGES: u64 = 1 << 20;

/// Size of a 4.1 header.
pub const V41_LEN: usize = 24;
/// Size of a 4.2 header.
pub const V42_LEN: usize = 32;

#[repr(C)]
struct RawV41 {
    cmd: u32,
    nr_pages: u32,
    vaddr: u64,
    dst_id: u64,
}
#[repr(C)]
struct RawV42 {
    cmd: u32,
    pad: u32,
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}
const _: () = assert!(std::mem::size_of::<RawV41>() == V41_LEN);
const _: () = assert!(std::mem::size_of::<RawV42>() == V42_LEN);

/// Which header layout a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderLayout {
    /// CRIU ≤ 4.1: 24 bytes, u32 `nr_pages`.
    V41,
    /// CRIU ≥ 4.2: 32 bytes, u64 `nr_pages`.
    V42,
}

impl HeaderLayout {
    /// Bytes of one header.
    pub fn len(self) -> usize {
        match self {
            HeaderLayout::V41 => V41_LEN,
            HeaderLayout::V42 => V42_LEN,
        }
    }
    /// Never empty; for clippy's `len_without_is_empty`.
    pub fn is_empty(self) -> bool {
        false
    }
}

impl std::fmt::Display for HeaderLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HeaderLayout::V41 => "criu-4.1 (24-byte header)",
            HeaderLayout::V42 => "criu-4.2 (32-byte header)",
        })
    }
}

/// A page-server command. Values are CRIU's; 0 is not one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// [`PS_IOV_ADD`].
    Add,
    /// [`PS_IOV_HOLE`].
    Hole,
    /// [`PS_IOV_OPEN`].
    Open,
    /// [`PS_IOV_OPEN2`].
    Open2,
    /// [`PS_IOV_PARENT`].
    Parent,
    /// [`PS_IOV_ADD_F`].
    AddF,
    /// [`PS_IOV_GET`].
    Get,
    /// [`PS_IOV_CLOSE`].
    Close,
    /// [`PS_IOV_FORCE_CLOSE`].
    ForceClose,
}

impl Command {
    /// Decodes the low 16 bits of `cmd`.
    pub fn from_wire(v: u16) -> Result<Command, ProtocolError> {
        Ok(match v {
            PS_IOV_ADD => Command::Add,
            PS_IOV_HOLE => Command::Hole,
            PS_IOV_OPEN => Command::Open,
            PS_IOV_OPEN2 => Command::Open2,
            PS_IOV_PARENT => Command::Parent,
            PS_IOV_ADD_F => Command::AddF,
            PS_IOV_GET => Command::Get,
            PS_IOV_CLOSE => Command::Close,
            PS_IOV_FORCE_CLOSE => Command::ForceClose,
            _ => {
                return Err(ProtocolError::Invalid {
                    what: "criu page-server command",
                    value: u64::from(v),
                })
            }
        })
    }
    /// The wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Add => PS_IOV_ADD,
            Command::Hole => PS_IOV_HOLE,
            Command::Open => PS_IOV_OPEN,
            Command::Open2 => PS_IOV_OPEN2,
            Command::Parent => PS_IOV_PARENT,
            Command::AddF => PS_IOV_ADD_F,
            Command::Get => PS_IOV_GET,
            Command::Close => PS_IOV_CLOSE,
            Command::ForceClose => PS_IOV_FORCE_CLOSE,
        }
    }
}

/// A decoded header, independent of the layout it came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsIov {
    /// The command.
    pub command: Command,
    /// `PE_*` flags (high 16 bits of `cmd`; meaningful for ADD_F and replies).
    pub flags: u16,
    /// Page count.
    pub nr_pages: u64,
    /// Dump-time address.
    pub vaddr: u64,
    /// Target: `id << 8 | type`, or the bare pid for GET.
    pub dst_id: u64,
}

impl PsIov {
    /// A header with no flags.
    pub fn new(command: Command, nr_pages: u64, vaddr: u64, dst_id: u64) -> PsIov {
        PsIov {
            command,
            flags: 0,
            nr_pages,
            vaddr,
            dst_id,
        }
    }

    /// The raw `cmd` word.
    pub fn cmd(&self) -> u32 {
        u32::from(self.flags) << PS_CMD_BITS | u32::from(self.command.to_wire())
    }

    /// Encodes in `layout`; `buf` must be at least `layout.len()` bytes. Fails when `nr_pages`
    /// does not fit a 4.1 header.
    pub fn encode(&self, layout: HeaderLayout, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        let len = layout.len();
        if buf.len() < len {
            return Err(ProtocolError::Limit {
                what: "criu header buffer",
                value: buf.len() as u64,
                limit: len as u64,
            });
        }
        buf[0..4].copy_from_slice(&self.cmd().to_le_bytes());
        match layout {
            HeaderLayout::V41 => {
                let n = u32::try_from(self.nr_pages).map_err(|_| ProtocolError::Limit {
                    what: "criu-4.1 nr_pages",
                    value: self.nr_pages,
                    limit: u64::from(u32::MAX),
                })?;
                buf[4..8].copy_from_slice(&n.to_le_bytes());
                buf[8..16].copy_from_slice(&self.vaddr.to_le_bytes());
                buf[16..24].copy_from_slice(&self.dst_id.to_le_bytes());
            }
            HeaderLayout::V42 => {
                buf[4..8].copy_from_slice(&[0; 4]);
                buf[8..16].copy_from_slice(&self.nr_pages.to_le_bytes());
                buf[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
                buf[24..32].copy_from_slice(&self.dst_id.to_le_bytes());
            }
        }
        Ok(len)
    }

    /// Decodes a header of `layout` from exactly `layout.len()` bytes. Unknown commands and page
    /// counts over [`MAX_HEADER_PAGES`] are refused.
    pub fn decode(layout: HeaderLayout, b: &[u8]) -> Result<PsIov, ProtocolError> {
        if b.len() != layout.len() {
            return Err(ProtocolError::Invalid {
                what: "criu header length",
                value: b.len() as u64,
            });
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let cmd = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let (nr_pages, vaddr, dst_id) = match layout {
            HeaderLayout::V41 => (
                u64::from(u32::from_le_bytes([b[4], b[5], b[6], b[7]])),
                u64_at(8),
                u64_at(16),
            ),
            HeaderLayout::V42 => (u64_at(8), u64_at(16), u64_at(24)),
        };
        let command = Command::from_wire((cmd & 0xffff) as u16)?;
        if nr_pages > MAX_HEADER_PAGES {
            return Err(ProtocolError::Limit {
                what: "criu header nr_pages",
                value: nr_pages,
                limit: MAX_HEADER_PAGES,
            });
        }
        Ok(PsIov {
            command,
            flags: (cmd >> PS_CMD_BITS) as u16,
            nr_pages,
            vaddr,
            dst_id,
        })
    }
}

/// Guesses the layout of a connection from its first 24 bytes (see the module doc).
pub fn detect_layout(first: &[u8; V41_LEN]) -> HeaderLayout {
    let word = u32::from_le_bytes([first[4], first[5], first[6], first[7]]);
    if word != 0 {
        return HeaderLayout::V41;
    }
    let cmd = u16::from_le_bytes([first[0], first[1]]);
    let at16 = first[16..24].iter().any(|&b| b != 0);
    match cmd {
        // 4.1 OPEN/OPEN2/PARENT carry a typed dst_id at 16; in 4.2 vaddr (0) is there.
        PS_IOV_OPEN | PS_IOV_OPEN2 | PS_IOV_PARENT if at16 => HeaderLayout::V41,
        _ => HeaderLayout::V42,
    }
}

/// Whether the first bytes of a connection look like a CRIU header at all (a known command in
/// the low 16 bits of the first word).
pub fn looks_like_criu(first4: &[u8; 4]) -> bool {
    Command::from_wire(u16::from_le_bytes([first4[0], first4[1]])).is_ok()
}

/// Splits a typed `dst_id` into (type, id), mapping CRIU's legacy type bytes (10, 11, 16, 17 →
/// pid; 27, 28, 29, 32, 33, 34 → shmem) like `decode_pm`.
pub fn decode_pm(dst_id: u64) -> Result<(u8, u64), ProtocolError> {
    let ty = (dst_id & 0xff) as u8;
    let id = dst_id >> 8;
    let ty = match ty {
        PS_TYPE_PID | 10 | 11 | 16 | 17 => PS_TYPE_PID,
        PS_TYPE_SHMEM | 27 | 28 | 29 | 32 | 33 | 34 => PS_TYPE_SHMEM,
        other => {
            return Err(ProtocolError::Invalid {
                what: "criu dst_id type",
                value: u64::from(other),
            })
        }
    };
    Ok((ty, id))
}

/// `id << 8 | type`.
pub fn encode_pm(ty: u8, id: u64) -> u64 {
    id << 8 | u64::from(ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn decodes_observed_41_get_and_reply() {
        // A raw GET as CRIU 4.1.1 sends it, and its reply.
        let get = hex("07000000 01000000 00c046d6e87f0000 724f000000000000");
        let first: [u8; 24] = get[..].try_into().unwrap();
        assert_eq!(detect_layout(&first), HeaderLayout::V41);
        let h = PsIov::decode(HeaderLayout::V41, &get).unwrap();
        assert_eq!(h.command, Command::Get);
        assert_eq!(h.nr_pages, 1);
        assert_eq!(h.vaddr, 0x7fe8_d646_c000);
        assert_eq!(h.dst_id, 0x4f72);
        let mut reply = PsIov {
            command: Command::AddF,
            flags: 4,
            ..h
        };
        reply.nr_pages = 1;
        let mut b = [0u8; 32];
        let n = reply.encode(HeaderLayout::V41, &mut b).unwrap();
        assert_eq!(
            b[..n],
            hex("06000400 01000000 00c046d6e87f0000 724f000000000000")[..]
        );
    }

    #[test]
    fn decodes_observed_42_get() {
        // A GET as CRIU 4.2 sends it.
        let get = hex("07000000 00000000 0100000000000000 00708457ad7f0000 0100000000000000");
        let first: [u8; 24] = get[..24].try_into().unwrap();
        assert_eq!(detect_layout(&first), HeaderLayout::V42);
        let h = PsIov::decode(HeaderLayout::V42, &get).unwrap();
        assert_eq!(
            (h.command, h.nr_pages, h.vaddr, h.dst_id),
            (Command::Get, 1, 0x7fad_5784_7000, 1)
        );
        let mut b = [0u8; 32];
        h.encode(HeaderLayout::V42, &mut b).unwrap();
        assert_eq!(b[..], get[..]);
    }

    #[test]
    fn detects_push_sessions() {
        let open2 = PsIov::new(Command::Open2, 0, 0, encode_pm(PS_TYPE_PID, 42));
        let mut b = [0u8; 32];
        open2.encode(HeaderLayout::V41, &mut b).unwrap();
        assert_eq!(
            detect_layout(&b[..24].try_into().unwrap()),
            HeaderLayout::V41
        );
        open2.encode(HeaderLayout::V42, &mut b).unwrap();
        assert_eq!(
            detect_layout(&b[..24].try_into().unwrap()),
            HeaderLayout::V42
        );
        let mut add = PsIov::new(Command::AddF, 3, 0x1000, encode_pm(PS_TYPE_PID, 42));
        add.flags = 6;
        add.encode(HeaderLayout::V41, &mut b).unwrap();
        assert_eq!(
            detect_layout(&b[..24].try_into().unwrap()),
            HeaderLayout::V41
        );
        add.encode(HeaderLayout::V42, &mut b).unwrap();
        assert_eq!(
            detect_layout(&b[..24].try_into().unwrap()),
            HeaderLayout::V42
        );
        assert_eq!(PsIov::decode(HeaderLayout::V42, &b).unwrap(), add);
        assert_eq!(add.cmd(), 0x0006_0006);
    }

    #[test]
    fn refuses_hostile_headers() {
        let mut b = [0u8; 32];
        assert!(PsIov::decode(HeaderLayout::V42, &b).is_err()); // cmd 0
        b[0] = 0x99;
        assert!(PsIov::decode(HeaderLayout::V42, &b).is_err());
        let mut h = PsIov::new(Command::Get, 1, 0, 1);
        h.nr_pages = u64::MAX;
        h.encode(HeaderLayout::V42, &mut b).unwrap();
        assert!(matches!(
            PsIov::decode(HeaderLayout::V42, &b).unwrap_err(),
            ProtocolError::Limit { .. }
        ));
        assert!(h.encode(HeaderLayout::V41, &mut b).is_err());
        assert!(PsIov::decode(HeaderLayout::V42, &b[..24]).is_err());
        assert!(h.encode(HeaderLayout::V42, &mut [0u8; 8]).is_err());
        assert!(!looks_like_criu(b"DPPS"));
        assert!(looks_like_criu(&[7, 0, 0, 0]));
    }

    #[test]
    fn pm_ids() {
        assert_eq!(
            decode_pm(encode_pm(PS_TYPE_PID, 77)).unwrap(),
            (PS_TYPE_PID, 77)
        );
        assert_eq!(decode_pm(77 << 8 | 10).unwrap(), (PS_TYPE_PID, 77));
        assert_eq!(decode_pm(5 << 8 | 33).unwrap(), (PS_TYPE_SHMEM, 5));
        assert!(decode_pm(5 << 8 | 99).is_err());
        assert!(decode_pm(5 << 8).is_err());
    }
}
