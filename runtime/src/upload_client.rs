//! The client side of an upload ([`crate::protocol::upload`]): whole files, or files streamed
//! in parts while they are still being written (protocol v5), then the server's receipt.
//!
//! [`upload_checkpoint`] sends a finished images directory. [`Upload`] is the same session
//! step by step, for a caller that sends the pages CRIU is still dumping
//! ([`Upload::send_part`]) and the rest once the dump is over.

use std::collections::BTreeSet;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::upload::{FileHeader, FileKind, MemoryDigest, ParentRef};
use crate::protocol::{
    read_response_header, ProtocolError, RequestStatus, HELLO_UPLOAD, VERSION, VERSION_LAYERS,
    VERSION_PARTS, VERSION_UPLOAD,
};
use crate::remote::{open_session, Endpoint, RemoteError, RemoteOptions, Stream};

/// Bytes per read and write of an upload (io::copy's 8 KiB costs a syscall pair per 2 pages).
const UPLOAD_CHUNK: usize = 1 << 20;
/// How long a client whose send failed waits for the server's answer (why it closed).
const ANSWER_AFTER_RESET: Duration = Duration::from_secs(2);
/// Least time the receipt is waited for (the server fsyncs everything before it answers).
const RECEIPT_WAIT: Duration = Duration::from_secs(120);

/// An upload session: the hello is answered, the parent (if any) sent.
pub struct Upload {
    r: BufReader<Stream>,
    endpoint: String,
    checkpoint: String,
    version: u16,
    io_timeout: Duration,
    head: Vec<u8>,
    chunk: Vec<u8>,
    /// Names sent, whole or in parts.
    sent: BTreeSet<String>,
}

impl Upload {
    /// Opens an upload of the new checkpoint `opts.checkpoint`, a layer over `parent` if given
    /// (protocol v3).
    pub fn begin(
        endpoint: &Endpoint,
        opts: &RemoteOptions,
        parent: Option<&ParentRef>,
    ) -> Result<Upload, RemoteError> {
        let (r, reply) = open_session(endpoint, opts, false, HELLO_UPLOAD)?;
        let mut up = Upload {
            r,
            endpoint: endpoint.to_string(),
            checkpoint: opts.checkpoint.clone(),
            version: reply.version,
            io_timeout: opts.io_timeout,
            head: Vec::with_capacity(256),
            chunk: Vec::new(),
            sent: BTreeSet::new(),
        };
        let need = if parent.is_some() {
            VERSION_LAYERS
        } else {
            VERSION_UPLOAD
        };
        if reply.version < need {
            return Err(up.protocol(ProtocolError::UnsupportedVersion {
                ours: VERSION,
                theirs: reply.version,
            }));
        }
        if let Some(p) = parent {
            up.head.clear();
            p.encode(&mut up.head).map_err(|e| up.protocol(e))?;
            up.write_head("send upload parent")?;
        }
        Ok(up)
    }

    /// Whether the server takes files in parts ([`Upload::send_part`]).
    pub fn takes_parts(&self) -> bool {
        self.version >= VERSION_PARTS
    }

    /// The checkpoint being uploaded.
    pub fn checkpoint(&self) -> &str {
        &self.checkpoint
    }

    /// Sends the file `name` of `dir` whole.
    pub fn send_file(&mut self, dir: &Path, name: &str) -> Result<(), RemoteError> {
        let path = dir.join(name);
        let file_err = |source| RemoteError::Upload {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::open(&path).map_err(file_err)?;
        let size = f.metadata().map_err(file_err)?.len();
        self.header(FileKind::File, name, size)?;
        self.copy(&mut f, size, &path)?;
        self.sent.insert(name.to_string());
        Ok(())
    }

    /// Appends `len` bytes of `f`, from `offset`, to the file `name` at the server (which
    /// creates it at its first part). `len` 0 only keeps the session alive.
    pub fn send_part(
        &mut self,
        name: &str,
        path: &Path,
        f: &mut std::fs::File,
        offset: u64,
        len: u64,
    ) -> Result<(), RemoteError> {
        if !self.takes_parts() {
            return Err(self.protocol(ProtocolError::UnsupportedVersion {
                ours: VERSION,
                theirs: self.version,
            }));
        }
        f.seek(SeekFrom::Start(offset))
            .map_err(|source| RemoteError::Upload {
                path: path.to_path_buf(),
                source,
            })?;
        self.header(FileKind::Part, name, len)?;
        self.copy(f, len, path)?;
        self.sent.insert(name.to_string());
        Ok(())
    }

    /// Ends the upload and waits for the receipt: what the server computed over what it
    /// stored (up to `max(io_timeout, 120 s)`: the server fsyncs first).
    pub fn finish(mut self) -> Result<MemoryDigest, RemoteError> {
        let files = self.sent.len() as u64;
        self.header(FileKind::End, "", files)?;
        let _ = self
            .r
            .get_ref()
            .set_timeouts(self.io_timeout.max(RECEIPT_WAIT));
        let h = read_response_header(&mut self.r).map_err(|e| self.protocol(e))?;
        if h.status != RequestStatus::Ok {
            return Err(self.protocol(ProtocolError::RequestFailed {
                request_id: h.request_id,
                status: h.status,
                message: h.message,
            }));
        }
        MemoryDigest::from_message(&h.message).ok_or_else(|| {
            self.protocol(ProtocolError::Invalid {
                what: "upload receipt",
                value: h.message.len() as u64,
            })
        })
    }

    fn protocol(&self, source: ProtocolError) -> RemoteError {
        RemoteError::Protocol {
            endpoint: self.endpoint.clone(),
            checkpoint: self.checkpoint.clone(),
            source,
        }
    }

    /// The error for a failed send: the server's answer when it refused the upload part-way
    /// (a deleted parent, a full disk: it answers and closes, and the rest of the data meets
    /// a reset), else the send error.
    fn send_failed(&mut self, what: &'static str, source: io::Error) -> RemoteError {
        let _ = self.r.get_ref().set_timeouts(ANSWER_AFTER_RESET);
        if let Ok(h) = read_response_header(&mut self.r) {
            if h.status != RequestStatus::Ok {
                return self.protocol(ProtocolError::RequestFailed {
                    request_id: h.request_id,
                    status: h.status,
                    message: h.message,
                });
            }
        }
        self.protocol(ProtocolError::Io { what, source })
    }

    fn header(&mut self, kind: FileKind, name: &str, size: u64) -> Result<(), RemoteError> {
        self.head.clear();
        FileHeader {
            kind,
            name: name.to_string(),
            size,
        }
        .encode(&mut self.head)
        .map_err(|e| self.protocol(e))?;
        self.write_head(match kind {
            FileKind::End => "send upload end",
            _ => "send upload file header",
        })
    }

    fn write_head(&mut self, what: &'static str) -> Result<(), RemoteError> {
        let head = std::mem::take(&mut self.head);
        let res = self.r.get_mut().write_all(&head);
        self.head = head;
        res.map_err(|e| self.send_failed(what, e))
    }

    /// Sends exactly `size` bytes of `f` from its position, in [`UPLOAD_CHUNK`] pieces.
    fn copy(&mut self, f: &mut std::fs::File, size: u64, path: &Path) -> Result<(), RemoteError> {
        if self.chunk.is_empty() {
            self.chunk = vec![0u8; UPLOAD_CHUNK];
        }
        let mut chunk = std::mem::take(&mut self.chunk);
        let res = self.copy_with(f, size, path, &mut chunk);
        self.chunk = chunk;
        res
    }

    fn copy_with(
        &mut self,
        f: &mut std::fs::File,
        size: u64,
        path: &Path,
        chunk: &mut [u8],
    ) -> Result<(), RemoteError> {
        let mut sent = 0u64;
        while sent < size {
            let want = usize::try_from(size - sent).map_or(chunk.len(), |n| n.min(chunk.len()));
            let n = f
                .read(&mut chunk[..want])
                .map_err(|source| RemoteError::Upload {
                    path: path.to_path_buf(),
                    source,
                })?;
            if n == 0 {
                return Err(RemoteError::Upload {
                    path: PathBuf::from(path),
                    source: io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while sent"),
                });
            }
            if let Err(e) = self.r.get_mut().write_all(&chunk[..n]) {
                return Err(self.send_failed("send upload file", e));
            }
            sent += n as u64;
        }
        Ok(())
    }
}

/// Uploads `files` (plain names) of the images directory `dir` as the new checkpoint
/// `opts.checkpoint` ([`crate::protocol::upload`]). Returns what the server computed over
/// what it stored. With `parent`, the new checkpoint is a layer over that stored checkpoint
/// (protocol v3; its `PE_PARENT` pages resolve there). Every step has the options' timeouts;
/// the final answer (after the server's fsync) may take up to `max(io_timeout, 120 s)`.
pub fn upload_checkpoint(
    endpoint: &Endpoint,
    opts: &RemoteOptions,
    dir: &Path,
    files: &[String],
    parent: Option<&ParentRef>,
) -> Result<MemoryDigest, RemoteError> {
    let mut up = Upload::begin(endpoint, opts, parent)?;
    for name in files {
        up.send_file(dir, name)?;
    }
    up.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::testutil::{pm, write_inventory, write_pagemap};
    use crate::images::{PE_LAZY, PE_PRESENT};
    use crate::remote::RemotePages;
    use crate::source::PageSource;
    use distriproc_pageserver::{Server, ServerOptions};

    #[test]
    fn files_in_parts_interleaved_with_whole_files() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("store");
        let img = d.path().join("img");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::create_dir_all(&img).unwrap();
        write_inventory(&img).unwrap();
        write_pagemap(&img, 1, 1, &[pm(0x10000, 4, PE_LAZY | PE_PRESENT)]).unwrap();
        let pages: Vec<u8> = (1..=4u8).flat_map(|i| [i; 4096]).collect();
        let pages_path = img.join("pages-1.img");
        std::fs::write(&pages_path, &pages).unwrap();
        let srv = Server::start(ServerOptions::for_store(store.clone())).unwrap();
        let ep: Endpoint = srv.addrs()[0].parse().unwrap();

        let mut up = Upload::begin(&ep, &RemoteOptions::new("parts"), None).unwrap();
        assert!(up.takes_parts());
        let mut f = std::fs::File::open(&pages_path).unwrap();
        up.send_part("pages-1.img", &pages_path, &mut f, 0, 4096)
            .unwrap();
        up.send_file(&img, "inventory.img").unwrap();
        up.send_part("pages-1.img", &pages_path, &mut f, 4096, 8192)
            .unwrap();
        up.send_part("pages-1.img", &pages_path, &mut f, 12288, 0)
            .unwrap();
        up.send_file(&img, "pagemap-1.img").unwrap();
        up.send_part("pages-1.img", &pages_path, &mut f, 12288, 4096)
            .unwrap();
        let got = up.finish().unwrap();
        assert_eq!(
            got,
            crate::protocol::upload::pagemap_checksum(&img).unwrap()
        );
        assert_eq!(
            std::fs::read(store.join("parts/pages-1.img")).unwrap(),
            pages
        );
        let rp = RemotePages::connect(ep.clone(), RemoteOptions::new("parts")).unwrap();
        let mut buf = vec![0u8; 4 * 4096];
        rp.read_pages(1, 0x10000, &mut buf).unwrap();
        assert_eq!(buf, pages);

        // A part past the end of the local file is an error of the file, not a short upload.
        let mut up = Upload::begin(&ep, &RemoteOptions::new("short"), None).unwrap();
        let e = up
            .send_part("pages-1.img", &pages_path, &mut f, 12288, 8192)
            .unwrap_err();
        assert!(e.to_string().contains("pages-1.img"), "{e}");
        drop(up);
        // One name whole and in parts: refused, nothing published.
        let mut up = Upload::begin(&ep, &RemoteOptions::new("both"), None).unwrap();
        up.send_file(&img, "pages-1.img").unwrap();
        let e = up
            .send_part("pages-1.img", &pages_path, &mut f, 0, 4096)
            .and_then(|()| up.finish().map(|_| ()))
            .unwrap_err();
        assert!(
            crate::error_chain(&e).contains("both whole and in parts"),
            "{}",
            crate::error_chain(&e)
        );
        assert!(!store.join("both").exists() && !store.join("short").exists());
        srv.shutdown();
    }
}
