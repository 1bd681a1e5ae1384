//! A connected stream, TCP, TLS over TCP or unix, with the few operations the sessions need.
//!
//! A TLS stream is shared by the session's reader and writer halves behind a mutex (a session
//! reads and writes from one thread, so the lock is never contended); `sock` is the raw TCP
//! socket for timeouts, shutdown and the peer address.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distriproc_runtime::protocol::tls::rustls;

/// A poll iteration longer than this means the yield ran another thread: stop polling.
const POLL_CONTENDED: Duration = Duration::from_micros(20);

pub(crate) type TlsStream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls {
        tls: Arc<Mutex<TlsStream>>,
        sock: TcpStream,
    },
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls { tls, sock } => Stream::Tls {
                tls: tls.clone(),
                sock: sock.try_clone()?,
            },
        })
    }

    pub(crate) fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) | Stream::Tls { sock: s, .. } => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Stream::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    /// For sessions whose client cannot reconnect (CRIU): no idle limit on reads, but TCP
    /// keepalive (idle 30 s, then 3 probes 10 s apart) so a vanished peer is still noticed.
    pub(crate) fn wait_forever_with_keepalive(&self) -> io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        match self {
            Stream::Tcp(s) | Stream::Tls { sock: s, .. } => {
                s.set_read_timeout(None)?;
                setsockopt(s, sockopt::KeepAlive, &true)?;
                setsockopt(s, sockopt::TcpKeepIdle, &30)?;
                setsockopt(s, sockopt::TcpKeepInterval, &10)?;
                setsockopt(s, sockopt::TcpKeepCount, &3)?;
                Ok(())
            }
            Stream::Unix(s) => s.set_read_timeout(None),
        }
    }

    /// Polls the socket for up to `limit` until something (data, EOF, an error) can be read,
    /// yielding the CPU between polls, so that a request arriving soon is read without the
    /// thread going to sleep and being woken. Stops early once a yield actually gave the CPU
    /// away (an iteration longer than [`POLL_CONTENDED`]): with other threads wanting this
    /// CPU, polling would only take time from them.
    pub(crate) fn poll_readable(&self, limit: Duration) {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Tcp(s) | Stream::Tls { sock: s, .. } => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        };
        let mut last = std::time::Instant::now();
        let until = last + limit;
        let mut b = 0u8;
        loop {
            // SAFETY: a 1-byte recv into a local on our own connected socket; MSG_PEEK leaves
            // the data queued, MSG_DONTWAIT never blocks.
            let n = unsafe {
                libc::recv(
                    fd,
                    (&raw mut b).cast::<libc::c_void>(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                return;
            }
            let now = std::time::Instant::now();
            if now >= until || now - last > POLL_CONTENDED {
                return;
            }
            last = now;
            std::thread::yield_now();
        }
    }

    /// Whether bytes written go to the socket as they are (not TLS).
    pub(crate) fn is_plain(&self) -> bool {
        !matches!(self, Stream::Tls { .. })
    }

    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) | Stream::Tls { sock: s, .. } => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub(crate) fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
            Stream::Tls { sock, .. } => sock
                .peer_addr()
                .map_or_else(|_| "tls:?".into(), |a| format!("tls:{a}")),
            Stream::Unix(s) => {
                match nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials) {
                    Ok(c) => format!("unix:pid={}", c.pid()),
                    Err(_) => "unix:?".into(),
                }
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
            Stream::Tls { tls, .. } => tls.lock().unwrap_or_else(|e| e.into_inner()).read(b),
        }
    }
}

impl Write for Stream {
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tls { .. } => {
                let b = bufs
                    .iter()
                    .find(|b| !b.is_empty())
                    .map_or(&[][..], |b| &**b);
                self.write(b)
            }
        }
    }
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
            Stream::Tls { tls, .. } => {
                let mut t = tls.lock().unwrap_or_else(|e| e.into_inner());
                let n = t.write(b)?;
                t.flush()?;
                Ok(n)
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls { tls, .. } => tls.lock().unwrap_or_else(|e| e.into_inner()).flush(),
            _ => Ok(()),
        }
    }
}
