//! A test host: a network namespace reached over a veth pair the test creates.
//!
//! Host side `10.<subnet>.<n>.1/30`, namespace side `10.<subnet>.<n>.2/30`, `lo` up inside.
//! Link and namespace are removed by name on drop. Names carry the test process's pid so
//! concurrent test binaries do not collide; `subnet` keeps different suites apart.

use std::process::Command;

use anyhow::{ensure, Context, Result};

/// Runs `ip ARGS...`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A network namespace with a veth pair into it.
#[derive(Debug)]
pub struct NetNs {
    /// The namespace's name (`ip netns exec NAME ...`).
    pub name: String,
    /// The veth end on the host.
    pub host_if: String,
    /// The veth end inside the namespace.
    pub ns_if: String,
    /// The namespace side's address.
    pub ns_addr: String,
}

impl NetNs {
    /// Creates namespace `<prefix>-<pid>-<n>` and the veth pair `<prefix>h/<prefix>n<pid><n>`
    /// on `10.<subnet>.<n>.0/30`. `prefix` is at most 3 characters (interface names are short).
    pub fn create(prefix: &str, subnet: u8, n: u8) -> Result<NetNs> {
        let pid = std::process::id();
        let ns = NetNs {
            name: format!("{prefix}-{pid}-{n}"),
            host_if: format!("{prefix}h{}{n}", pid % 100_000),
            ns_if: format!("{prefix}n{}{n}", pid % 100_000),
            ns_addr: format!("10.{subnet}.{n}.2"),
        };
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("10.{subnet}.{n}.1/30"),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let inside = format!("{}/30", ns.ns_addr);
        for args in [
            ["addr", "add", inside.as_str(), "dev", ns.ns_if.as_str()].as_slice(),
            &["link", "set", &ns.ns_if, "up"],
            &["link", "set", "lo", "up"],
        ] {
            let mut v = vec!["netns", "exec", &ns.name, "ip"];
            v.extend_from_slice(args);
            ip(&v)?;
        }
        Ok(ns)
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it creates live there).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || -> Result<T> {
            let fd = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
