//! The stdio of a process runc is about to start: pipes set up before runc runs, or a
//! console socket on which runc sends the pty master while it runs.

use std::{path::PathBuf, time::Duration};

use crate::{
    container::Process,
    error::{Result, ShimError},
    io::{self, ConsoleSocket},
};

/// How long to wait for runc to send a pty master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The stdio of a process runc is about to start: pipes (set up now and recorded in the
/// process), or a console socket on which runc sends the pty master while it runs.
pub(crate) enum PendingStdio {
    Pipes(Option<io::ContainerStdio>),
    Console(ConsoleSocket),
}

impl PendingStdio {
    /// Pipes or a console socket, as the process's stdio asks.
    pub(crate) fn new(p: &mut Process) -> Result<Self> {
        if p.stdio.terminal {
            return Ok(PendingStdio::Console(ConsoleSocket::new()?));
        }
        let (cs, ss, done) = io::setup_pipes(&p.stdio)?;
        p.shim_io = ss;
        p.io_done = Some(done);
        Ok(PendingStdio::Pipes(Some(cs)))
    }

    /// The console socket to give runc (`--console-socket`).
    pub(crate) fn console_path(&self) -> Option<PathBuf> {
        match self {
            PendingStdio::Console(s) => Some(s.path()),
            PendingStdio::Pipes(_) => None,
        }
    }

    /// The container's ends of the pipes, to give runc as its stdio.
    pub(crate) fn take_pipes(&mut self) -> Option<io::ContainerStdio> {
        match self {
            PendingStdio::Pipes(cs) => cs.take(),
            PendingStdio::Console(_) => None,
        }
    }

    /// Start waiting for the pty master (call right before runc runs).
    pub(crate) fn receive(self) -> Option<PendingConsole> {
        match self {
            PendingStdio::Console(s) => {
                Some(PendingConsole(tokio::task::spawn_blocking(move || {
                    s.receive(CONSOLE_TIMEOUT)
                })))
            }
            PendingStdio::Pipes(_) => None,
        }
    }
}

/// A pty master on its way from runc.
pub(crate) struct PendingConsole(tokio::task::JoinHandle<Result<std::fs::File>>);

impl PendingConsole {
    /// runc failed: stop waiting.
    pub(crate) fn abort(self) {
        self.0.abort();
    }

    /// Take the pty master and copy the process's stdio through it.
    pub(crate) async fn finish(self, p: &mut Process, what: &str) -> Result<()> {
        let master = self.0.await.map_err(|source| ShimError::Background {
            what: format!("receiving the console of {what}"),
            source,
        })??;
        let (ss, done) = io::setup_console(&p.stdio, master)?;
        p.shim_io = ss;
        p.io_done = Some(done);
        Ok(())
    }
}
