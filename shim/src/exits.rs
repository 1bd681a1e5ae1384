//! Exits: containerd-shim's exit monitor reports every child's exit (the shim is a
//! subreaper); [`ExitRouting`] says which process a pid is, and keeps the exits of pids not
//! recorded yet for the start that is about to claim them. An exit is published as TaskExit
//! once the process's output has been drained, and only then does Wait return.

use std::{collections::HashMap, time::Duration};

use containerd_shim::{
    monitor::{monitor_subscribe, Subject, Topic},
    protos::{
        events::task::TaskExit,
        protobuf::{well_known_types::timestamp::Timestamp, MessageField},
    },
};
use log::debug;

use crate::{
    container::{ProcStatus, Process},
    error::Result,
    events::{now, send},
    task::{TaskService, IO_DRAIN_LIMIT},
};

/// How long an exit of an unknown pid is kept.
const ORPHAN_EXIT_TTL: Duration = Duration::from_secs(60);
/// Exits of unknown pids kept for processes whose pid is not recorded yet.
const MAX_ORPHAN_EXITS: usize = 1024;
/// Above this many kept exits, those older than [`ORPHAN_EXIT_TTL`] are dropped.
const ORPHAN_PRUNE_AT: usize = 64;

/// Which process a pid is, and the exits of pids not known yet. One lock for both, so an exit
/// is either routed to its process or kept for the start that is about to claim its pid.
#[derive(Default)]
pub(crate) struct ExitRouting {
    /// Pids of started processes: (container id, exec id).
    pub(crate) owners: HashMap<u32, (String, String)>,
    /// Exits of unknown pids: (code, time, when recorded).
    pub(crate) orphans: HashMap<u32, (u32, Timestamp, std::time::Instant)>,
}

impl TaskService {
    /// Subscribe to the exit monitor (now) and handle exits (in a task).
    pub async fn watch_exits(&self) -> Result<()> {
        let mut sub = monitor_subscribe(Topic::Pid).await?;
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(ev) = sub.rx.recv().await {
                if let Subject::Pid(pid) = ev.subject {
                    if let Ok(pid) = u32::try_from(pid) {
                        me.handle_exit(pid, ev.exit_code).await;
                    }
                }
            }
        });
        Ok(())
    }

    /// Record an exit and publish it once the output is drained. The exit is handled in a task
    /// of its own: a container busy in a long RPC (a checkpoint's upload) delays its own exits
    /// only, not the next exit the monitor reports.
    pub async fn handle_exit(&self, pid: u32, code: i32) {
        let code = u32::try_from(code).unwrap_or(255);
        let at = now();
        let owner = {
            let mut r = self.inner.exits.lock().expect("exit routing lock");
            match r.owners.remove(&pid) {
                Some(o) => o,
                None => {
                    // Mostly runc's, CRIU's and keepers' own exits. Only an exit recorded while
                    // a start is under way can be claimed (see `claim_pid`), so old entries are
                    // useless: a shim serving many containers for long would otherwise keep
                    // them until the pid is reused.
                    if r.orphans.len() >= ORPHAN_PRUNE_AT {
                        r.orphans.retain(|_, e| e.2.elapsed() < ORPHAN_EXIT_TTL);
                    }
                    if r.orphans.len() < MAX_ORPHAN_EXITS {
                        r.orphans.insert(pid, (code, at, std::time::Instant::now()));
                    }
                    return;
                }
            }
        };
        let (id, exec_id) = owner;
        let Some(slot) = self.slot(&id) else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let mut g = slot.lock().await;
            let Some(c) = g.as_mut() else { return };
            if let Some(p) = c.process_mut(&exec_id) {
                if p.pid == pid && p.status != ProcStatus::Stopped {
                    me.mark_exited(&id, p, code, at);
                }
            }
        });
    }

    pub(crate) fn mark_exited(&self, id: &str, p: &mut Process, code: u32, at: Timestamp) {
        debug!(
            "process {:?} of {id} (pid {}) exited {code}",
            p.exec_id, p.pid
        );
        p.status = ProcStatus::Stopped;
        p.exit_status = code;
        p.exited_at = Some(at.clone());
        let ev = TaskExit {
            container_id: id.to_owned(),
            id: if p.exec_id.is_empty() {
                id.to_owned()
            } else {
                p.exec_id.clone()
            },
            pid: p.pid,
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        };
        let done = p.io_done.take();
        let exited = p.exited.clone();
        let events = self.inner.events.clone();
        tokio::spawn(async move {
            if let Some(d) = done {
                d.wait(IO_DRAIN_LIMIT).await;
            }
            send(events.as_ref(), ev);
            // send_replace: `send` drops the value when no Wait is subscribed yet.
            exited.send_replace(true);
        });
    }

    /// Route the exits of `pid` to process `exec_id` of container `id` from now on, or return
    /// its exit if it arrived before, during the start that began at `since`. An older exit of
    /// the same pid is a previous process's (pids wrap around; a grouped shim lives through
    /// many of them) and is dropped, not claimed.
    pub(crate) fn claim_pid(
        &self,
        id: &str,
        exec_id: &str,
        pid: u32,
        since: std::time::Instant,
    ) -> Option<(u32, Timestamp)> {
        let mut r = self.inner.exits.lock().expect("exit routing lock");
        match r.orphans.remove(&pid) {
            Some((code, at, recorded)) if recorded >= since => Some((code, at)),
            _ => {
                r.owners.insert(pid, (id.to_owned(), exec_id.to_owned()));
                None
            }
        }
    }

    /// Forget the pids of a deleted container's processes.
    pub(crate) fn release_pids(&self, id: &str) {
        self.inner
            .exits
            .lock()
            .expect("exit routing lock")
            .owners
            .retain(|_, o| o.0 != id);
    }
}
