//! Network namespaces for cluster members, and real partitions between them and the
//! cluster's Postgres and Redis.
//!
//! The fault proxy ([`crate::proxy`]) fakes a partition in user space: it can hold a
//! socket silent, but the member's kernel still sees a healthy peer, and only what goes
//! through the proxy is cut. Here the kernel drops the packets, as a real network
//! does: a member runs in a namespace of its own (`ip netns exec`, which execs in
//! place, so the harness's signals reach the server itself), connected to the host by
//! a veth pair with a private /30 (host end `.1`, namespace end `.2`); Postgres and
//! Redis also listen on the host end's address. A cut is an nftables `netdev` ingress
//! table on each end of the pair (this kernel has no `netem` and no tc actions):
//! - the host end's ingress sees what the member sends (requests);
//! - the namespace end's ingress sees what it receives (replies).
//!
//! so a cut can drop Postgres, Redis or both, in both directions or in one. Only
//! packets to and from those ports are dropped: a replica's gRPC clients still reach
//! it, which is how a replica cut from Postgres shows what it answers.
//!
//! Names carry the creating process's pid (`tpn<pid>x<n>`: the namespace and its host
//! table; `...h` and `...n`: the veth ends, within the 15-character limit), so
//! parallel tests never collide, and whatever a killed run left behind is found and
//! removed by the next one (its pid is dead). Addresses come from 10.213.0.0/16, a /30
//! not yet on any interface or route, chosen under a file lock. Dropping a [`Netns`]
//! removes its table, its veth pair and its namespace, panics included; the cluster
//! drops its members (which live in it) first.
//!
//! Everything needs root, `ip` and `nft` (Debian's `nftables`, which
//! `scripts/services.sh` installs): [`Netns::create`] fails with a message that says
//! which is missing, so a test that needs a partition fails rather than passes
//! without one.

use std::fmt;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};
use tokio::io::AsyncWriteExt as _;

use crate::os;

/// Every name this module creates starts with it.
const PREFIX: &str = "tpn";
/// The range /30s are taken from: 10.213.0.0/16.
const RANGE: (u8, u8) = (10, 213);
/// Serialises address choice and leftover removal among concurrent test processes.
const LOCK_FILE: &str = "taskpod-netns.lock";

/// Which traffic a cut drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CutKind {
    /// Postgres and Redis, both directions.
    Full,
    /// Postgres only, both directions (Redis still works).
    Postgres,
    /// Redis only, both directions (Postgres still works).
    Redis,
    /// What the member sends to Postgres is dropped; Postgres's packets still arrive
    /// (requests lost).
    ToPostgres,
    /// What Postgres sends the member is dropped; the member's packets still arrive, so
    /// Postgres acts on requests whose answers are lost (replies lost).
    FromPostgres,
}

impl CutKind {
    pub const ALL: [CutKind; 5] = [
        CutKind::Full,
        CutKind::Postgres,
        CutKind::Redis,
        CutKind::ToPostgres,
        CutKind::FromPostgres,
    ];

    /// A short stable label: `full`, `postgres`, `redis`, `to-postgres`,
    /// `from-postgres`.
    pub fn label(self) -> &'static str {
        match self {
            CutKind::Full => "full",
            CutKind::Postgres => "postgres",
            CutKind::Redis => "redis",
            CutKind::ToPostgres => "to-postgres",
            CutKind::FromPostgres => "from-postgres",
        }
    }

    /// Whether Postgres packets are dropped at all (the member loses its store).
    pub fn cuts_postgres(self) -> bool {
        !matches!(self, CutKind::Redis)
    }

    /// Whether Redis packets are dropped.
    pub fn cuts_redis(self) -> bool {
        matches!(self, CutKind::Full | CutKind::Redis)
    }

    /// Whether what the member sends is dropped (for the services cut).
    fn drops_outbound(self) -> bool {
        !matches!(self, CutKind::FromPostgres)
    }

    /// Whether what the member receives is dropped (for the services cut).
    fn drops_inbound(self) -> bool {
        !matches!(self, CutKind::ToPostgres)
    }
}

impl fmt::Display for CutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CutKind::Full => "full cut (Postgres and Redis, both ways)",
            CutKind::Postgres => "Postgres cut (both ways)",
            CutKind::Redis => "Redis cut (both ways)",
            CutKind::ToPostgres => "one way: member -> Postgres dropped",
            CutKind::FromPostgres => "one way: Postgres -> member dropped",
        })
    }
}

/// The ports a cut acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub postgres: u16,
    pub redis: Option<u16>,
}

/// One member's namespace: its veth pair, its addresses, the cut in force.
#[derive(Debug)]
pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_addr: Ipv4Addr,
    ns_addr: Ipv4Addr,
    cut: Mutex<Option<CutKind>>,
}

impl Netns {
    /// Creates a namespace with a veth pair to the host and a fresh /30, after removing
    /// whatever killed runs left behind.
    ///
    /// # Errors
    /// When not root, when `ip` or `nft` is missing, or when the kernel refuses: the
    /// message says which, and what is half made is removed.
    pub fn create() -> anyhow::Result<Self> {
        preflight()?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}x{n}", std::process::id());
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join(LOCK_FILE))
            .context("open the netns lock file")?;
        lock.lock().context("lock the netns lock file")?;
        sweep_leftovers();
        // A leftover of a dead process that had our pid would collide by name.
        remove(&name);
        let (host_addr, ns_addr) = free_subnet()?;
        let netns = Self {
            host_if: format!("{name}h"),
            ns_if: format!("{name}n"),
            name,
            host_addr,
            ns_addr,
            cut: Mutex::new(None),
        };
        // From here on, a failure drops `netns`, which removes what was made.
        netns.build()?;
        drop(lock);
        Ok(netns)
    }

    fn build(&self) -> anyhow::Result<()> {
        let (name, host, inside) = (&self.name, &self.host_if, &self.ns_if);
        let host_cidr = format!("{}/30", self.host_addr);
        let ns_cidr = format!("{}/30", self.ns_addr);
        let steps: [&[&str]; 7] = [
            &["netns", "add", name],
            &[
                "link", "add", host, "type", "veth", "peer", "name", inside, "netns", name,
            ],
            &["addr", "add", &host_cidr, "dev", host],
            &["link", "set", host, "up"],
            &["-n", name, "addr", "add", &ns_cidr, "dev", inside],
            &["-n", name, "link", "set", inside, "up"],
            &["-n", name, "link", "set", "lo", "up"],
        ];
        for args in steps {
            run_sync("ip", args).with_context(|| {
                format!("could not set up network namespace {name} (needs root and CAP_NET_ADMIN)")
            })?;
        }
        Ok(())
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host end's address: where the member reaches Postgres and Redis.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// The member's own address, inside the namespace: where it listens.
    pub fn ns_addr(&self) -> Ipv4Addr {
        self.ns_addr
    }

    /// The host end's /30 in `pg_hba.conf` form.
    pub fn subnet(&self) -> String {
        let [a, b, c, d] = self.host_addr.octets();
        format!("{}/30", Ipv4Addr::new(a, b, c, d & !3))
    }

    /// How a process is started inside: `ip netns exec <name>` before its command.
    pub fn launcher(&self) -> Vec<String> {
        vec![
            "ip".to_owned(),
            "netns".to_owned(),
            "exec".to_owned(),
            self.name.clone(),
        ]
    }

    /// The cut in force, if any.
    pub fn current_cut(&self) -> Option<CutKind> {
        *self.cut.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops `kind`'s packets on both ends from now on (replacing any cut in force).
    /// Both ends' tables are loaded at once, each in one nft transaction.
    ///
    /// # Errors
    /// When nft refuses.
    pub async fn cut(&self, kind: CutKind, ports: Ports) -> anyhow::Result<()> {
        let mut services = Vec::new();
        if kind.cuts_postgres() {
            services.push(ports.postgres);
        }
        if kind.cuts_redis() {
            services.push(
                ports
                    .redis
                    .context("a Redis cut in a cluster without Redis")?,
            );
        }
        let set = services
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        // Host end: what the member sends, to the services' ports.
        let outbound = kind.drops_outbound().then(|| {
            format!(
                "ip saddr {} ip daddr {} tcp dport {{ {set} }} drop",
                self.ns_addr, self.host_addr
            )
        });
        // Namespace end: what it receives, from the services' ports.
        let inbound = kind.drops_inbound().then(|| {
            format!(
                "ip saddr {} ip daddr {} tcp sport {{ {set} }} drop",
                self.host_addr, self.ns_addr
            )
        });
        let host_script = table_script(&self.name, &self.host_if, outbound.as_deref());
        let ns_script = table_script(&self.name, &self.ns_if, inbound.as_deref());
        let (host, inside) =
            tokio::join!(nft(None, &host_script), nft(Some(&self.name), &ns_script),);
        host.context("load the host end's nft table")?;
        inside.context("load the namespace end's nft table")?;
        *self.cut.lock().unwrap_or_else(|e| e.into_inner()) = Some(kind);
        Ok(())
    }

    /// Removes the cut: both ends' tables go, at once.
    ///
    /// # Errors
    /// When nft refuses.
    pub async fn heal(&self) -> anyhow::Result<()> {
        let script = heal_script(&self.name);
        let (host, inside) = tokio::join!(nft(None, &script), nft(Some(&self.name), &script));
        host.context("remove the host end's nft table")?;
        inside.context("remove the namespace end's nft table")?;
        *self.cut.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

/// An nft script that (re)creates `table` with an ingress chain on `device` holding
/// `rule` (none: an empty chain, nothing dropped), in one transaction.
fn table_script(table: &str, device: &str, rule: Option<&str>) -> String {
    let mut script = format!(
        "add table netdev {table}\n\
         add chain netdev {table} ingress {{ type filter hook ingress device \"{device}\" priority -500 ; policy accept ; }}\n\
         flush chain netdev {table} ingress\n"
    );
    if let Some(rule) = rule {
        script.push_str(&format!("add rule netdev {table} ingress {rule}\n"));
    }
    script
}

/// Removes `table` whether or not it exists (adding an existing table is a no-op).
fn heal_script(table: &str) -> String {
    format!("add table netdev {table}\ndelete table netdev {table}\n")
}

/// Runs `nft -f -` with `script`, in namespace `ns` or on the host.
async fn nft(ns: Option<&str>, script: &str) -> anyhow::Result<()> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut cmd = tokio::process::Command::new("ip");
            cmd.args(["netns", "exec", ns, "nft", "-f", "-"]);
            cmd
        }
        None => {
            let mut cmd = tokio::process::Command::new("nft");
            cmd.args(["-f", "-"]);
            cmd
        }
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn nft (apt-get install nftables)")?;
    let mut stdin = child.stdin.take().context("nft has no stdin")?;
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "nft failed ({}): {}\nscript:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Fails with what to do when this machine cannot make namespaces or cuts.
fn preflight() -> anyhow::Result<()> {
    if !os::is_root() {
        bail!("network partitions need root (network namespaces, veth pairs, nftables)");
    }
    run_sync("ip", &["-V"]).context("`ip` is missing (apt-get install iproute2)")?;
    run_sync("nft", &["--version"])
        .context("`nft` is missing (apt-get install nftables; scripts/services.sh installs it)")?;
    Ok(())
}

/// Runs a command to completion; its stdout, or an error with its stderr.
fn run_sync(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes everything named `name`: its host table, its veth pair, its namespace.
/// Each step may find nothing; none fails loudly (this runs in `Drop`).
fn remove(name: &str) {
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "netdev", name])
        .stderr(Stdio::null())
        .status();
    // Deleting one end deletes the pair, even while a process still holds the
    // namespace open (then the namespace itself lingers until it exits).
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &format!("{name}h")])
        .stderr(Stdio::null())
        .status();
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// The pid in one of our names, `tpn<pid>x<n>` with any suffix.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('x')?;
    pid.parse().ok()
}

/// Names of namespaces, links and host tables whose creator is dead.
fn leftovers(netns: &str, links: &str, tables: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    names.extend(
        netns
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned),
    );
    // `12: tpn1x0h@if2: <...>`
    names.extend(links.lines().filter_map(|l| {
        let name = l.split(": ").nth(1)?.split('@').next()?;
        Some(name.trim_end_matches(['h', 'n']).to_owned())
    }));
    // `table netdev tpn1x0`
    names.extend(tables.lines().filter_map(|l| {
        let mut words = l.split_whitespace();
        (words.next()? == "table" && words.next()? == "netdev")
            .then(|| words.next().map(str::to_owned))
            .flatten()
    }));
    names.retain(|n| owner_pid(n).is_some_and(|pid| !os::alive(pid)));
    names.sort();
    names.dedup();
    names
}

/// Removes what dead processes left behind.
fn sweep_leftovers() {
    let netns = run_sync("ip", &["netns", "list"]).unwrap_or_default();
    let links = run_sync("ip", &["-o", "link", "show"]).unwrap_or_default();
    let tables = run_sync("nft", &["list", "tables"]).unwrap_or_default();
    for name in leftovers(&netns, &links, &tables) {
        eprintln!("netns: removing {name}, left behind by a dead test process");
        remove(&name);
    }
}

/// An IPv4 prefix.
fn parse_prefix(text: &str) -> Option<(u32, u32)> {
    let (addr, len) = text.split_once('/').unwrap_or((text, "32"));
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - len.min(32))
    };
    Some((u32::from(addr) & mask, mask))
}

/// A /30 of [`RANGE`] that overlaps no address or route on the host: `(.1, .2)`.
fn free_subnet() -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let addrs = run_sync("ip", &["-o", "-4", "addr", "show"])?;
    let routes = run_sync("ip", &["-4", "route", "show", "table", "all"])?;
    let taken = taken_prefixes(&addrs, &routes);
    let base = u32::from(Ipv4Addr::new(RANGE.0, RANGE.1, 0, 0));
    (0..(1u32 << 14))
        .map(|i| base + i * 4)
        .find(|net| {
            taken
                .iter()
                .all(|(prefix, mask)| (net & mask) != *prefix && (*prefix & !3) != *net)
        })
        .map(|net| (Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2)))
        .context("no free /30 left in 10.213.0.0/16")
}

/// Every prefix in use: addresses (`inet a.b.c.d/n`) and routes, but not the default
/// route or ones wider than a /16 (they would cover the whole range).
fn taken_prefixes(addrs: &str, routes: &str) -> Vec<(u32, u32)> {
    let mut taken = Vec::new();
    for line in addrs.lines() {
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            if word == "inet"
                && let Some((addr, mask)) = words.next().and_then(parse_prefix)
            {
                // The address itself and its subnet.
                taken.push((addr, mask));
            }
        }
    }
    for line in routes.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        let first = if matches!(first, "local" | "broadcast" | "unicast") {
            line.split_whitespace().nth(1).unwrap_or_default()
        } else {
            first
        };
        if let Some((prefix, mask)) = parse_prefix(first)
            && mask.leading_ones() >= 16
        {
            taken.push((prefix, mask));
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_an_interface_name_and_carry_the_pid() {
        let name = format!("{PREFIX}{}x{}h", 4_194_304, 999);
        assert!(name.len() <= 15, "{name}");
        assert_eq!(owner_pid("tpn1234x7h"), Some(1234));
        assert_eq!(owner_pid("tpn1234x7"), Some(1234));
        assert_eq!(owner_pid("eth0"), None);
    }

    #[test]
    fn leftovers_of_dead_processes_are_found_and_live_ones_kept() {
        let me = std::process::id();
        let dead = u32::MAX - 7;
        let netns = format!("{PREFIX}{dead}x0 (id: 3)\n{PREFIX}{me}x0 (id: 4)\nother\n");
        let links = format!(
            "1: lo: <LOOPBACK> mtu 65536\n7: {PREFIX}{dead}x1h@if2: <BROADCAST>\n8: {PREFIX}{me}x0h@if2: <UP>\n"
        );
        let tables = format!("table inet filter\ntable netdev {PREFIX}{dead}x2\n");
        assert_eq!(
            leftovers(&netns, &links, &tables),
            [
                format!("{PREFIX}{dead}x0"),
                format!("{PREFIX}{dead}x1"),
                format!("{PREFIX}{dead}x2")
            ]
        );
    }

    #[test]
    fn a_subnet_in_use_is_skipped() {
        let addrs = "1: lo    inet 127.0.0.1/8 scope host lo\n9: tpn1x0h    inet 10.213.0.1/30 scope global\n";
        let routes = "default via 172.16.0.1 dev eth0\n10.213.0.4/30 dev x proto kernel\nlocal 10.213.0.9 dev y table local\n";
        let taken = taken_prefixes(addrs, routes);
        let base = u32::from(Ipv4Addr::new(10, 213, 0, 0));
        let free: Vec<u32> = (0..4)
            .map(|i| base + i * 4)
            .filter(|net| {
                taken
                    .iter()
                    .all(|(prefix, mask)| (net & mask) != *prefix && (*prefix & !3) != *net)
            })
            .collect();
        assert_eq!(free, [base + 12]);
    }

    #[test]
    fn cut_kinds_drop_what_they_say() {
        assert!(CutKind::Full.cuts_postgres() && CutKind::Full.cuts_redis());
        assert!(!CutKind::Redis.cuts_postgres());
        assert!(!CutKind::Postgres.cuts_redis());
        assert!(CutKind::ToPostgres.drops_outbound() && !CutKind::ToPostgres.drops_inbound());
        assert!(!CutKind::FromPostgres.drops_outbound() && CutKind::FromPostgres.drops_inbound());
        let script = table_script("t", "d", Some("tcp dport { 1 } drop"));
        assert!(script.contains("hook ingress device \"d\""), "{script}");
        assert!(script.ends_with("add rule netdev t ingress tcp dport { 1 } drop\n"));
    }
}
