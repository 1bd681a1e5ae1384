//! Native protocol version 2: uploading a checkpoint into the page server's store.
//!
//! A remote checkpoint (the shim's Checkpoint with a page server configured) sends its CRIU
//! images directory to the page server, which stores it atomically under the id the client
//! chose; the client then keeps only the metadata images locally.
//!
//! ```text
//! client                                                 page server
//!   Hello {flags=HELLO_UPLOAD, version ≥ 2, checkpoint=ID, token} ─▶ token, id valid, unused
//!   ◀─ HelloReply {Ok | Unauthorized | BadCheckpointId | Exists | ...}
//!   (v3, optional, first) FileHeader {Parent, name_len, 16} parent id, its digest
//!                                                               ─▶  parent exists, digest, depth
//!   FileHeader {File, name_len, size} name bytes, `size` bytes  ─▶  (any number of files)
//!   (v5) FileHeader {Part, name_len, size} name, `size` bytes   ─▶  appended to that file
//!   FileHeader {End, 0, size = number of files}                 ─▶  index, fsync, rename
//!   ◀─ Response header {request_id 0, Ok | Malformed | TooLarge | StoreFailed | BadParent, msg}
//!      Ok message: `pages_bytes=<n> pagemap_checksum=<16 hex>` (see [`pagemap_checksum`])
//! ```
//!
//! ## Layers (version 3)
//!
//! An upload may name a parent: a checkpoint already in the store whose pages the new one
//! leaves to it (`PE_PARENT` pagemap entries, as CRIU's own `parent` chains). The `Parent`
//! message carries the parent's id and its [`MemoryDigest`] as the client knows it (16 bytes:
//! `pages_bytes` u64 LE, `pagemap_checksum` u64 LE). The server refuses with `BadParent` a
//! parent that is missing, that holds other memory than the digest says, that is the new
//! checkpoint itself or whose chain would be deeper than
//! [`MAX_PARENT_DEPTH`](crate::images::MAX_PARENT_DEPTH) layers; it checks that the new layer
//! indexes through its parents (every `PE_PARENT` page held by a layer below) before it
//! publishes it with a `parent -> ../<parent id>` link. The new layer's digest covers its own
//! files only.
//!
//! ## Streamed files (version 5)
//!
//! A file still being written (a `pages-*.img` while CRIU dumps) is sent as `Part` messages:
//! each appends its `size` bytes to the named file, the first creates it. Parts of several
//! files may interleave with each other and with whole files; a name sent whole is never sent
//! in parts or the other way round. A part of 0 bytes only shows the client is alive (the
//! server's idle timeout applies between messages). `End` counts each file once, however it
//! was sent. The receipt's digest is what the client compares with its own, so a file the
//! client cut short or sent twice is caught there.
//!
//! ## FileHeader, [`FILE_HEADER_LEN`] = 16 bytes
//!
//! | offset | size | field | notes |
//! |---|---|---|---|
//! | 0 | 2 | kind | [`FileKind`] (0 reserved) |
//! | 2 | 2 | name_len | `File`, `Part`: 1..=[`MAX_FILE_NAME_LEN`]; `End`: 0 |
//! | 4 | 4 | reserved | 0 |
//! | 8 | 8 | size | `File`, `Part`: bytes that follow the name, ≤ [`MAX_FILE_BYTES`]; `End`: file count |
//!
//! A file name is a plain name of `A-Z a-z 0-9 . _ -` that does not start with `.` (no
//! directories, no `parent` links: the server makes the link from the `Parent` message). Limits:
//! [`MAX_FILES`] files, [`MAX_FILE_BYTES`] per file, [`MAX_UPLOAD_BYTES`] in all; a server may
//! set a lower total. Everything is checked before anything is allocated or written.

use std::io::{self, Read};
use std::path::Path;

use super::{u16_at, u32_at, u64_at, zero, ProtocolError};

/// Size of a [`FileHeader`] on the wire.
pub const FILE_HEADER_LEN: usize = 16;
/// Longest file name.
pub const MAX_FILE_NAME_LEN: usize = 128;
/// Most files in one upload.
pub const MAX_FILES: u64 = 65_536;
/// Largest single file (1 TiB).
pub const MAX_FILE_BYTES: u64 = 1 << 40;
/// Largest upload, all files together (4 TiB).
pub const MAX_UPLOAD_BYTES: u64 = 1 << 42;

#[repr(C)]
struct RawFileHeader {
    kind: u16,
    name_len: u16,
    reserved: u32,
    size: u64,
}
const _: () = assert!(std::mem::size_of::<RawFileHeader>() == FILE_HEADER_LEN);

wire_enum! {
    /// Kind of an upload message. 0 is reserved.
    FileKind {
        /// A file: the name, then `size` bytes.
        File = 1 => "file",
        /// The end of the upload; `size` is the number of files sent.
        End = 2 => "end",
        /// (v3) The parent layer: its id as the name, then its digest ([`PARENT_BODY_LEN`]
        /// bytes). At most once, before any file.
        Parent = 3 => "parent",
        /// (v5) A piece of a file streamed while it is written: the name, then `size` bytes
        /// appended to it.
        Part = 4 => "part",
    }
}

/// Bytes after a `Parent` header's name: the parent's [`MemoryDigest`].
pub const PARENT_BODY_LEN: u64 = PARENT_BODY.len() as u64;
const PARENT_BODY: [u8; 16] = [0; 16];

/// The parent an upload names ([`FileKind::Parent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// The parent checkpoint's id in the store.
    pub checkpoint: String,
    /// Its digest as the client recorded it.
    pub digest: MemoryDigest,
}

impl ParentRef {
    /// Encodes the `Parent` message: header, id, digest.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        FileHeader {
            kind: FileKind::Parent,
            name: self.checkpoint.clone(),
            size: PARENT_BODY_LEN,
        }
        .encode(out)?;
        out.extend_from_slice(&self.digest.pages_bytes.to_le_bytes());
        out.extend_from_slice(&self.digest.pagemap_checksum.to_le_bytes());
        Ok(())
    }

    /// Reads the digest that follows a `Parent` header `h`.
    pub fn read_body<R: Read>(h: &FileHeader, r: &mut R) -> Result<ParentRef, ProtocolError> {
        let mut b = PARENT_BODY;
        r.read_exact(&mut b)
            .map_err(super::ProtocolError::io("read upload parent digest"))?;
        Ok(ParentRef {
            checkpoint: h.name.clone(),
            digest: MemoryDigest {
                pages_bytes: u64_at(&b, 0),
                pagemap_checksum: u64_at(&b, 8),
            },
        })
    }
}

/// One upload message header and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    /// File or end.
    pub kind: FileKind,
    /// The file name (empty for `End`).
    pub name: String,
    /// Bytes of the file, or the file count for `End`.
    pub size: u64,
}

/// Checks an uploaded file name (see the module documentation).
pub fn check_file_name(name: &str) -> Result<(), ProtocolError> {
    let bad = |value| ProtocolError::Invalid {
        what: "upload file name",
        value,
    };
    if name.is_empty() || name.len() > MAX_FILE_NAME_LEN {
        return Err(bad(name.len() as u64));
    }
    if name.starts_with('.') {
        return Err(bad(u64::from(b'.')));
    }
    if let Some(c) = name
        .bytes()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')))
    {
        return Err(bad(u64::from(c)));
    }
    Ok(())
}

impl FileHeader {
    /// Encodes the header and the name.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        match self.kind {
            FileKind::File | FileKind::Part => {
                check_file_name(&self.name)?;
                if self.size > MAX_FILE_BYTES {
                    return Err(ProtocolError::Limit {
                        what: "upload file size",
                        value: self.size,
                        limit: MAX_FILE_BYTES,
                    });
                }
            }
            FileKind::End => zero("end name length", self.name.len() as u64)?,
            FileKind::Parent => {
                check_file_name(&self.name)?;
                if self.size != PARENT_BODY_LEN {
                    return Err(ProtocolError::Invalid {
                        what: "upload parent body length",
                        value: self.size,
                    });
                }
            }
        }
        out.extend_from_slice(&self.kind.to_wire().to_le_bytes());
        out.extend_from_slice(&u16::try_from(self.name.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(self.name.as_bytes());
        Ok(())
    }

    /// Reads a header and its name; lengths and the name are checked before reading on.
    pub fn read<R: Read>(r: &mut R) -> Result<FileHeader, ProtocolError> {
        let mut b = [0u8; FILE_HEADER_LEN];
        r.read_exact(&mut b)
            .map_err(super::ProtocolError::io("read upload file header"))?;
        let kind = FileKind::from_wire(u16_at(&b, 0))?;
        let name_len = usize::from(u16_at(&b, 2));
        zero("upload reserved field", u64::from(u32_at(&b, 4)))?;
        let size = u64_at(&b, 8);
        match kind {
            FileKind::File | FileKind::Part | FileKind::Parent => {
                if name_len == 0 || name_len > MAX_FILE_NAME_LEN {
                    return Err(ProtocolError::Limit {
                        what: "upload file name length",
                        value: name_len as u64,
                        limit: MAX_FILE_NAME_LEN as u64,
                    });
                }
                if kind == FileKind::Parent && size != PARENT_BODY_LEN {
                    return Err(ProtocolError::Invalid {
                        what: "upload parent body length",
                        value: size,
                    });
                }
                if size > MAX_FILE_BYTES {
                    return Err(ProtocolError::Limit {
                        what: "upload file size",
                        value: size,
                        limit: MAX_FILE_BYTES,
                    });
                }
            }
            FileKind::End => {
                zero("end name length", name_len as u64)?;
                if size > MAX_FILES {
                    return Err(ProtocolError::Limit {
                        what: "upload file count",
                        value: size,
                        limit: MAX_FILES,
                    });
                }
            }
        }
        let name = super::read_text(r, name_len, "upload file name", MAX_FILE_NAME_LEN)?;
        if kind != FileKind::End {
            check_file_name(&name)?;
        }
        Ok(FileHeader { kind, name, size })
    }
}

/// FNV-1a, 64 bits.
#[derive(Debug, Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// What identifies a checkpoint's memory: the bytes of its `pages-*.img` files and a checksum
/// of its `pagemap-*.img` files (FNV-1a 64 over, for each file in name order: the name, a 0
/// byte, the length as u64 LE, the contents). Both the shim (before the upload and in its
/// reference file) and the page server ([`super::RequestKind::Info`]) compute it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryDigest {
    /// Total bytes of `pages-*.img`.
    pub pages_bytes: u64,
    /// The pagemap checksum.
    pub pagemap_checksum: u64,
}

impl MemoryDigest {
    /// The text of an `Info` answer or an upload receipt.
    pub fn to_message(&self) -> String {
        format!(
            "pages_bytes={} pagemap_checksum={:016x}",
            self.pages_bytes, self.pagemap_checksum
        )
    }

    /// Parses [`MemoryDigest::to_message`]'s text.
    pub fn from_message(s: &str) -> Option<MemoryDigest> {
        let mut pages_bytes = None;
        let mut sum = None;
        for kv in s.split_whitespace() {
            match kv.split_once('=') {
                Some(("pages_bytes", v)) => pages_bytes = v.parse().ok(),
                Some(("pagemap_checksum", v)) => sum = u64::from_str_radix(v, 16).ok(),
                _ => {}
            }
        }
        Some(MemoryDigest {
            pages_bytes: pages_bytes?,
            pagemap_checksum: sum?,
        })
    }
}

/// The [`MemoryDigest`] of an images directory.
pub fn pagemap_checksum(dir: &Path) -> io::Result<MemoryDigest> {
    let mut names = Vec::new();
    let mut pages_bytes = 0u64;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        if !name.ends_with(".img") {
            continue;
        }
        if name.starts_with("pagemap-") {
            names.push(name);
        } else if name.starts_with("pages-") {
            pages_bytes += e.metadata()?.len();
        }
    }
    names.sort();
    let mut h = Fnv::new();
    for n in &names {
        let data = std::fs::read(dir.join(n))?;
        h.update(n.as_bytes());
        h.update(&[0]);
        h.update(&(data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    Ok(MemoryDigest {
        pages_bytes,
        pagemap_checksum: h.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_header_round_trip_and_limits() {
        let mut b = Vec::new();
        FileHeader {
            kind: FileKind::File,
            name: "pages-1.img".into(),
            size: 8192,
        }
        .encode(&mut b)
        .unwrap();
        FileHeader {
            kind: FileKind::End,
            name: String::new(),
            size: 1,
        }
        .encode(&mut b)
        .unwrap();
        let mut r = &b[..];
        let h = FileHeader::read(&mut r).unwrap();
        assert_eq!(
            (h.kind, h.name.as_str(), h.size),
            (FileKind::File, "pages-1.img", 8192)
        );
        let e = FileHeader::read(&mut r).unwrap();
        assert_eq!((e.kind, e.size), (FileKind::End, 1));
        for bad in ["", "../x", ".hidden", "a/b", "parent link"] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
        // A huge size is refused before anything is read.
        let mut h = Vec::new();
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&(MAX_FILE_BYTES + 1).to_le_bytes());
        h.push(b'x');
        assert!(matches!(
            FileHeader::read(&mut &h[..]),
            Err(ProtocolError::Limit { .. })
        ));
        // A parent: id and digest round-trip; a wrong body length is refused.
        let p = ParentRef {
            checkpoint: "base-1".into(),
            digest: MemoryDigest {
                pages_bytes: 4096,
                pagemap_checksum: 0xfeed,
            },
        };
        let mut b = Vec::new();
        p.encode(&mut b).unwrap();
        let mut r = &b[..];
        let h = FileHeader::read(&mut r).unwrap();
        assert_eq!(h.kind, FileKind::Parent);
        assert_eq!(ParentRef::read_body(&h, &mut r).unwrap(), p);
        assert!(r.is_empty());
        b[8] = 17;
        assert!(FileHeader::read(&mut &b[..]).is_err());
        // Kind 0 is reserved.
        let z = [0u8; FILE_HEADER_LEN];
        assert!(FileHeader::read(&mut &z[..]).is_err());
    }

    #[test]
    fn digest_covers_pagemaps_and_pages_bytes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("pagemap-1.img"), b"abc").unwrap();
        std::fs::write(d.path().join("pages-1.img"), vec![0u8; 8192]).unwrap();
        std::fs::write(d.path().join("mm-1.img"), b"zzz").unwrap();
        let a = pagemap_checksum(d.path()).unwrap();
        assert_eq!(a.pages_bytes, 8192);
        assert_eq!(MemoryDigest::from_message(&a.to_message()), Some(a));
        std::fs::write(d.path().join("pagemap-1.img"), b"abd").unwrap();
        let b = pagemap_checksum(d.path()).unwrap();
        assert_ne!(a.pagemap_checksum, b.pagemap_checksum);
    }
}
