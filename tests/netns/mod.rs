//! Simulated hosts for multi-host tests: N network namespaces on one
//! bridge, each a "host" with its own address in 198.18.0.0/15 (the range set
//! aside for benchmarking), its own hostname and a hosts file that names
//! every host, so `cohort launch` on each behaves as on separate machines.
//!
//! ```ignore
//! mod netns;
//! let Some(net) = netns::Net::new(2) else { return }; // skipped: says why
//! let host0 = net.host(0); // "host0", 198.18.0.1
//! let child = host0.inside(some_command).spawn();     // runs on host0
//! net.host(1).link_down();                            // unplug host1
//! net.host(1).limit("100mbit");                       // tc tbf, both ways
//! // dropping `net` kills what runs on the hosts and removes every
//! // namespace, veth and bridge it made, also when the test panics
//! ```
//!
//! Layout (`scripts/netns-hosts.sh` makes the same one from a shell): the
//! switch is namespace `<prefix>-sw` holding bridge `br0`; host i is
//! namespace `<prefix>-h<i>` with `eth0` (its address, /15, and a default
//! route through it), wired by a veth pair to port `h<i>` of the bridge.
//! Nothing touches this machine's own network namespace, so traffic stays
//! between the hosts and names can't clash with anything there. The prefix is
//! `cohort-<pid>-<n>`: unique per test process and per net; nets left behind
//! by a killed test process are removed by the next one.
//!
//! Namespaces share the kernel, the filesystem and /dev/shm: a test about
//! same-host shortcuts must not take two namespace hosts for one host.

#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The nets of this process, for unique names.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A set of hosts on one switch; removed on drop.
pub struct Net {
    switch: String,
    hosts: Vec<Host>,
}

/// One simulated host of a [`Net`].
pub struct Host {
    name: String,
    ns: String,
    switch: String,
    port: String,
    addr: Ipv4Addr,
}

/// Host i's address: 198.18.0.1, 198.18.0.2, ... (198.18.1.0 after .255).
fn addr_of(i: usize) -> Ipv4Addr {
    let n = u32::try_from(i + 1).expect("too many hosts");
    assert!(n < 1 << 17, "198.18.0.0/15 holds at most 131071 hosts");
    Ipv4Addr::from((198 << 24) | (18 << 16) | n)
}

/// Runs `ip ARGS`, returning its stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    tool("ip", args)
}

fn tool(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Kills every process in namespace `ns`, deletes it and its /etc/netns files.
fn remove_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory-safety preconditions; the
                // processes in a namespace this harness made are the test's.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    let _ = ip(&["netns", "delete", ns]);
    let _ = std::fs::remove_dir_all(etc_dir(ns));
}

/// Where `ip netns exec` finds the files it mounts over /etc.
fn etc_dir(ns: &str) -> PathBuf {
    Path::new("/etc/netns").join(ns)
}

/// Removes the namespaces of nets whose test process is gone (killed before
/// its nets were dropped).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("cohort-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let ours = name.split('-').count() == 4
            && (name.ends_with("-sw")
                || name.rsplit('-').next().is_some_and(|h| h.starts_with('h')));
        if ours && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_namespace(&name);
        }
    }
}

impl Net {
    /// `n` hosts named host0..host{n-1}; `None` (after printing why the
    /// test is skipped) where this process may not make network namespaces.
    pub fn new(n: usize) -> Option<Self> {
        let names: Vec<String> = (0..n).map(|i| format!("host{i}")).collect();
        Self::with_names(&names)
    }

    /// Hosts with these names (each resolves on every host), in order. A
    /// name with dots is a full name (`pod-0.svc.ns.svc.cluster.local`): the
    /// host's hostname is its first label, and both resolve.
    pub fn with_names<S: AsRef<str>>(names: &[S]) -> Option<Self> {
        Self::build(names, false)
    }

    /// As [`Net::new`], but each host's hosts file names the host itself at
    /// 127.0.1.1 (as Debian's installer writes it): a program that finds its
    /// own address by looking up its host name (Gloo, NCCL) gets a loopback
    /// address, which the other hosts can't reach.
    pub fn with_loopback_names(n: usize) -> Option<Self> {
        let names: Vec<String> = (0..n).map(|i| format!("host{i}")).collect();
        Self::build(&names, true)
    }

    fn build<S: AsRef<str>>(names: &[S], loopback_names: bool) -> Option<Self> {
        assert!(!names.is_empty(), "a net needs at least one host");
        remove_stale();
        let prefix = format!(
            "cohort-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{prefix}-sw");
        if let Err(why) = ip(&["netns", "add", &switch]) {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            let denied = why.contains("Permission denied")
                || why.contains("Operation not permitted")
                || why.contains("cannot run ip");
            if !root || denied {
                println!(
                    "skipped: this test needs network namespaces, which this process can't make \
                     (root or CAP_NET_ADMIN + CAP_SYS_ADMIN, and iproute2): {why}"
                );
                return None;
            }
            panic!("cannot make a network namespace: {why}");
        }
        let mut net = Self {
            switch,
            hosts: Vec::new(),
        };
        let line = |addr: &str, name: &str| match name.split_once('.') {
            Some((short, _)) => format!("{addr} {name} {short}\n"),
            None => format!("{addr} {name}\n"),
        };
        let mut hosts_file = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (i, name) in names.iter().enumerate() {
            hosts_file.push_str(&line(&addr_of(i).to_string(), name.as_ref()));
        }
        for (i, name) in names.iter().enumerate() {
            let host = Host {
                name: name.as_ref().to_owned(),
                ns: format!("{prefix}-h{i}"),
                switch: net.switch.clone(),
                port: format!("h{i}"),
                addr: addr_of(i),
            };
            // Pushed before it is built, so a failure half-way still removes it.
            net.hosts.push(host);
            let host = net.hosts.last().expect("just pushed");
            // The first line naming a host wins.
            let own = if loopback_names {
                format!("{}{hosts_file}", line("127.0.1.1", name.as_ref()))
            } else {
                hosts_file.clone()
            };
            if let Err(why) = host.build(&own) {
                panic!("cannot make host {} ({}): {why}", host.name, host.ns);
            }
        }
        ip(&["-n", &net.switch, "link", "add", "br0", "type", "bridge"])
            .and_then(|()| ip(&["-n", &net.switch, "link", "set", "br0", "up"]))
            .unwrap_or_else(|why| panic!("cannot make the bridge: {why}"));
        for host in &net.hosts {
            ip(&[
                "-n",
                &net.switch,
                "link",
                "set",
                &host.port,
                "master",
                "br0",
                "up",
            ])
            .unwrap_or_else(|why| panic!("cannot wire {} to the bridge: {why}", host.name));
        }
        Some(net)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in &self.hosts {
            remove_namespace(&host.ns);
        }
        remove_namespace(&self.switch);
    }
}

impl Host {
    /// Its namespace, files, veth pair and address (the bridge comes later).
    fn build(&self, hosts_file: &str) -> Result<(), String> {
        ip(&["netns", "add", &self.ns])?;
        let etc = etc_dir(&self.ns);
        std::fs::create_dir_all(&etc)
            .and_then(|()| std::fs::write(etc.join("hosts"), hosts_file))
            // No name server: a name that is not a host fails at once
            // instead of waiting for a DNS server it can't reach.
            .and_then(|()| {
                std::fs::write(etc.join("resolv.conf"), "options attempts:1 timeout:1\n")
            })
            .map_err(|e| format!("cannot write {}: {e}", etc.display()))?;
        let ns = self.ns.as_str();
        ip(&[
            "-n",
            &self.switch,
            "link",
            "add",
            &self.port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/15", self.addr),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "dev", "eth0"])
    }

    /// Its name as given to [`Net::with_names`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its hostname: the name's first label.
    pub fn hostname(&self) -> &str {
        self.name.split('.').next().unwrap_or(&self.name)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The network namespace's name (for `ip -n`, `tc -n`).
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// `cmd` (program, arguments, environment, working directory) as a
    /// command that runs on this host: in its network namespace, with its
    /// hosts file as /etc/hosts and its hostname. Stdio is set on
    /// the returned command; the pid it spawns is `cmd`'s program itself.
    pub fn inside(&self, cmd: Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &self.ns, "unshare", "--uts", "sh", "-c"])
            .arg(r#"echo "$0" > /proc/sys/kernel/hostname && exec "$@""#)
            .arg(self.hostname())
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    /// `program args...` on this host (see [`Host::inside`]).
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.inside(cmd)
    }

    /// Takes the host's link down: it can reach no other host (as a pulled
    /// cable; its processes see "network unreachable").
    pub fn link_down(&self) {
        ip(&["-n", &self.ns, "link", "set", "eth0", "down"])
            .unwrap_or_else(|why| panic!("cannot take {}'s link down: {why}", self.name));
    }

    /// Brings the link back (with the default route the kernel dropped).
    pub fn link_up(&self) {
        ip(&["-n", &self.ns, "link", "set", "eth0", "up"])
            .and_then(|()| ip(&["-n", &self.ns, "route", "replace", "default", "dev", "eth0"]))
            .unwrap_or_else(|why| panic!("cannot bring {}'s link up: {why}", self.name));
    }

    /// Limits the host's link to `rate` (tc syntax: `1gbit`, `100mbit`) in
    /// both directions, with a token bucket (`tbf`) on each end of its veth:
    /// `eth0` shapes what the host sends, the switch port what it receives.
    pub fn limit(&self, rate: &str) {
        for (ns, dev) in [(&self.ns, "eth0"), (&self.switch, self.port.as_str())] {
            let args = [
                "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst",
                "256kb", "latency", "100ms",
            ];
            tool("tc", &args)
                .unwrap_or_else(|why| panic!("cannot limit {}'s link: {why}", self.name));
        }
    }

    /// Removes the limit set by [`Host::limit`].
    pub fn unlimit(&self) {
        for (ns, dev) in [(&self.ns, "eth0"), (&self.switch, self.port.as_str())] {
            tool("tc", &["-n", ns, "qdisc", "del", "dev", dev, "root"])
                .unwrap_or_else(|why| panic!("cannot remove {}'s limit: {why}", self.name));
        }
    }
}
