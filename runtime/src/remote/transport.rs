//! Connections to the page server: TCP, unix sockets and TLS ([`Stream`]), with the hello
//! that opens a session (a native one, or `HELLO_CRIU` for `criu lazy-pages`).

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::protocol::tls::{rustls, TlsClient, TlsError};
use crate::protocol::{Hello, HelloReply, HelloStatus, ProtocolError, VERSION};

use super::*;

pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
            Stream::Tls(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
            Stream::Tls(s) => {
                let n = s.write(b)?;
                s.flush()?;
                Ok(n)
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

impl Stream {
    fn set_no_timeouts(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)
            }
            Stream::Tls(s) => {
                s.sock.set_read_timeout(None)?;
                s.sock.set_write_timeout(None)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)
            }
        }
    }

    pub(crate) fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Stream::Tls(s) => {
                s.sock.set_read_timeout(Some(t))?;
                s.sock.set_write_timeout(Some(t))
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }
}

/// A TLS configuration error with its causes, for a config error's message.
pub(crate) fn tls_error_text(e: &TlsError) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Connects to `endpoint` (TCP with `timeout` per address tried, TCP_NODELAY; or unix). With
/// `tls`, a TCP connection completes the TLS handshake (within `timeout`) before returning, so
/// a certificate the client does not trust fails here, as a connect error.
pub(crate) fn dial(
    endpoint: &Endpoint,
    timeout: Duration,
    tls: Option<&TlsClient>,
) -> io::Result<Stream> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            let addrs: Vec<_> = addr.to_socket_addrs()?.collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address resolved");
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        let Some(tls) = tls else {
                            return Ok(Stream::Tcp(s));
                        };
                        s.set_read_timeout(Some(timeout))?;
                        s.set_write_timeout(Some(timeout))?;
                        let conn = rustls::ClientConnection::new(
                            tls.config.clone(),
                            tls.server_name.clone(),
                        )
                        .map_err(io::Error::other)?;
                        let mut t = rustls::StreamOwned::new(conn, s);
                        while t.conn.is_handshaking() {
                            t.conn.complete_io(&mut t.sock).map_err(|e| {
                                if e.kind() == io::ErrorKind::UnexpectedEof {
                                    io::Error::new(
                                        e.kind(),
                                        "tls handshake: the server closed the connection \
                                         (does it speak TLS, does it want a client certificate?)",
                                    )
                                } else {
                                    io::Error::new(e.kind(), format!("tls handshake: {e}"))
                                }
                            })?;
                        }
                        return Ok(Stream::Tls(Box::new(t)));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        Endpoint::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p)?)),
    }
}

/// Opens a session with `flags` (e.g. [`crate::protocol::HELLO_CRIU`]) and returns the
/// connected, authenticated socket after an `Ok` hello reply, with `io_timeout` set on it.
pub(crate) fn open_session(
    endpoint: &Endpoint,
    opts: &RemoteOptions,
    criu_mode: bool,
    flags: u16,
) -> Result<(BufReader<Stream>, HelloReply), RemoteError> {
    let ep = endpoint.to_string();
    let cerr = |source| RemoteError::Connect {
        endpoint: ep.clone(),
        source,
    };
    let proto = |source| RemoteError::Protocol {
        endpoint: ep.clone(),
        checkpoint: opts.checkpoint.clone(),
        source,
    };
    let stream = dial(endpoint, opts.connect_timeout, opts.tls.as_ref()).map_err(cerr)?;
    stream.set_timeouts(opts.connect_timeout).map_err(cerr)?;
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    let hello = Hello {
        version: VERSION,
        checkpoint: opts.checkpoint.clone(),
        token: opts.token.clone(),
        client: opts.client.clone(),
        criu_mode,
    }
    .encode_with_flags(flags)
    .map_err(proto)?;
    r.get_mut().write_all(&hello).map_err(|source| {
        proto(ProtocolError::Io {
            what: "send hello",
            source,
        })
    })?;
    let reply = HelloReply::read(&mut r).map_err(proto)?;
    if reply.status != HelloStatus::Ok {
        return Err(proto(ProtocolError::Refused {
            status: reply.status,
            message: reply.message,
        }));
    }
    r.get_ref().set_timeouts(opts.io_timeout).map_err(cerr)?;
    Ok((r, reply))
}

/// Opens a `HELLO_CRIU` session for `opts.checkpoint` and returns its socket, for
/// `criu lazy-pages --page-server --ps-socket FD` (the socket is blocking, without timeouts).
pub fn open_criu_session(
    endpoint: &Endpoint,
    opts: &RemoteOptions,
) -> Result<std::os::fd::OwnedFd, RemoteError> {
    if opts.tls.is_some() && matches!(endpoint, Endpoint::Tcp(_)) {
        return Err(RemoteError::BadOption {
            name: "tls",
            why: "criu lazy-pages cannot speak TLS: use the native fetcher mode with a TLS \
                  page server (or a unix socket)"
                .into(),
        });
    }
    let (r, _) = open_session(endpoint, opts, true, 0)?;
    if !r.buffer().is_empty() {
        return Err(RemoteError::Protocol {
            endpoint: endpoint.to_string(),
            checkpoint: opts.checkpoint.clone(),
            source: ProtocolError::Invalid {
                what: "bytes after the hello reply",
                value: r.buffer().len() as u64,
            },
        });
    }
    let s = r.into_inner();
    let _ = s.set_no_timeouts();
    Ok(match s {
        Stream::Tcp(t) => t.into(),
        Stream::Unix(u) => u.into(),
        // Refused above (TLS is only used on TCP endpoints); never hand criu an encrypted socket.
        Stream::Tls(_) => {
            return Err(RemoteError::BadOption {
                name: "tls",
                why: "criu lazy-pages cannot speak TLS".into(),
            })
        }
    })
}
