//! TaskOOM events: watch a container's memory cgroup for OOM kills.
//!
//! cgroup v1: an eventfd registered on `memory.oom_control` through `cgroup.event_control`
//! (the kernel also signals it when the cgroup is removed, which ends the watch).
//! cgroup v2: `memory.events` polled once a second for a growing `oom_kill` count.
//! One OS thread per container; failures only log (OOM events are a SHOULD).

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use containerd_shim::protos::events::task::TaskOOM;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::{
    error::{Result, ShimError},
    events::EventSink,
};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The memory cgroup directory of `pid` and whether it is cgroup v2.
pub fn memory_cgroup(pid: u32) -> Result<(PathBuf, bool)> {
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).map_err(|e| ShimError::io("read", &path, e))?;
    parse_memory_cgroup(&text, Path::new(CGROUP_ROOT))
        .ok_or_else(|| ShimError::NoMemoryCgroup { pid, path })
}

fn parse_memory_cgroup(text: &str, root: &Path) -> Option<(PathBuf, bool)> {
    let mut unified = None;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, p) = (f.next()?, f.next()?, f.next()?);
        let rel = p.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            return Some((root.join("memory").join(rel), false));
        }
        if controllers.is_empty() {
            unified = Some((root.join(rel), true));
        }
    }
    unified.filter(|(d, _)| d.join("memory.events").exists())
}

/// Start watching the memory cgroup of `pid`; TaskOOM{container_id: id} on every OOM kill.
pub fn watch(id: String, pid: u32, events: Arc<dyn EventSink>) -> Result<()> {
    let (dir, v2) = memory_cgroup(pid)?;
    if v2 {
        return watch_v2(id, dir, events);
    }
    let control = dir.join("memory.oom_control");
    let ocf = std::fs::File::open(&control).map_err(|e| ShimError::io("open", &control, e))?;
    let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
        .map_err(|e| ShimError::io("create eventfd for", &control, e.into()))?;
    let reg = dir.join("cgroup.event_control");
    std::fs::write(&reg, format!("{} {}", efd.as_raw_fd(), ocf.as_raw_fd()))
        .map_err(|e| ShimError::io("register oom eventfd in", &reg, e))?;
    std::thread::Builder::new()
        .name(format!("oom-{id}"))
        .spawn(move || {
            let _keep = ocf;
            while efd.read().is_ok() {
                if !dir.exists() {
                    break;
                }
                publish(&id, events.as_ref());
            }
        })
        .map_err(|e| ShimError::io("spawn oom watcher for", "memory cgroup", e))?;
    Ok(())
}

fn oom_kills(events_file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(events_file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

fn watch_v2(id: String, dir: PathBuf, events: Arc<dyn EventSink>) -> Result<()> {
    let file = dir.join("memory.events");
    let mut seen = oom_kills(&file).unwrap_or(0);
    std::thread::Builder::new()
        .name(format!("oom-{id}"))
        .spawn(move || {
            while let Some(n) = oom_kills(&file) {
                if n > seen {
                    seen = n;
                    publish(&id, events.as_ref());
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .map_err(|e| ShimError::io("spawn oom watcher for", "memory cgroup", e))?;
    Ok(())
}

fn publish(id: &str, events: &dyn EventSink) {
    log::info!("container {id} hit its memory limit (oom)");
    let ev = TaskOOM {
        container_id: id.to_owned(),
        ..Default::default()
    };
    events.publish("/tasks/oom".to_owned(), Box::new(ev));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v1_memory_controller() {
        let text = "12:pids:/ns/c\n5:memory:/ns/c\n0::/\n";
        let (d, v2) = parse_memory_cgroup(text, Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(d, Path::new("/sys/fs/cgroup/memory/ns/c"));
        assert!(!v2);
    }

    #[test]
    fn finds_v2_unified_only_with_memory_events() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("ns/c")).unwrap();
        assert!(parse_memory_cgroup("0::/ns/c\n", dir.path()).is_none());
        std::fs::write(dir.path().join("ns/c/memory.events"), "oom 0\noom_kill 2\n").unwrap();
        let (d, v2) = parse_memory_cgroup("0::/ns/c\n", dir.path()).unwrap();
        assert!(v2);
        assert_eq!(oom_kills(&d.join("memory.events")), Some(2));
    }
}
