//! A primary cut off from the management server but not from its clients,
//! on network namespaces: each storage server, the management server and
//! the clients in a namespace of their own, joined by veth pairs to one
//! bridge. The cut is a pair of blackhole routes between the primary and
//! the management server. Needs root (it skips, saying why, without).
#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tessera_driver::{Client, MgmtServer, Volume};
use tessera_net::proto::{
    AdminCommand, ClusterStatus, MgmtReply, MgmtRequest, MirrorState, Opcode, Role, Status,
};
use tessera_net::quic::{Alpn, Endpoint, PeerConnection, TransportTuning};

/// The management server's heartbeat timeout: leases of 1 s.
const HEARTBEAT_TIMEOUT_MS: u64 = 2_000;

/// Network namespaces joined by a bridge, removed when dropped.
struct Lab {
    prefix: String,
    names: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

impl Lab {
    /// Namespaces `hosts` (each gets 10.199.X.Y from `addr`), on one bridge.
    fn new(hosts: &[(&str, &str)]) -> Result<Lab, String> {
        let prefix = format!("tsr{}", std::process::id() % 100_000);
        let mut lab = Lab {
            prefix: prefix.clone(),
            names: Vec::new(),
        };
        let switch = lab.add("sw")?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for (i, (host, addr)) in hosts.iter().enumerate() {
            let ns = lab.add(host)?;
            let (inner, outer) = (format!("{prefix}i{i}"), format!("{prefix}o{i}"));
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "netns", &switch])?;
            ip(&["-n", &switch, "link", "set", &outer, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &inner,
            ])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    fn add(&mut self, host: &str) -> Result<String, String> {
        let name = self.ns(host);
        ip(&["netns", "add", &name])?;
        self.names.push(name.clone());
        Ok(name)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Cut `a` and `b` apart (both ways), or join them again.
    fn cut(&self, a: (&str, &str), b: (&str, &str), cut: bool) {
        let verb = if cut { "add" } else { "del" };
        for ((from, _), (_, to)) in [(a, b), (b, a)] {
            let route = format!("{to}/32");
            ip(&["-n", &self.ns(from), "route", verb, "blackhole", &route]).unwrap();
        }
    }

    /// Run `f` with this thread in `host`'s namespace: sockets it makes stay there.
    fn inside<T>(&self, host: &str, f: impl FnOnce() -> T) -> T {
        let home = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        let there = std::fs::File::open(format!("/var/run/netns/{}", self.ns(host))).unwrap();
        // SAFETY: plain syscalls on open namespace descriptors, for this thread only.
        let entered = unsafe { libc::setns(there.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns into {host}");
        let out = f();
        // SAFETY: as above, back to where the thread was.
        let left = unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(left, 0, "setns back from {host}");
        out
    }

    /// `tessera ARGS` in `host`'s namespace, waiting for its "serving on" line.
    fn spawn(&self, host: &str, args: &[String], log: &std::path::Path) -> Child {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(host),
                env!("CARGO_BIN_EXE_tessera"),
            ])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert!(
            line.contains("serving on"),
            "{host} did not start: {line}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        // Keep draining its stdout so a later line never meets a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        child
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const MGMT: (&str, &str) = ("mg", "10.199.0.2");
const S1: (&str, &str) = ("s1", "10.199.0.11");
const S2: (&str, &str) = ("s2", "10.199.0.12");
const S3: (&str, &str) = ("s3", "10.199.0.13");
const CLIENT: (&str, &str) = ("cl", "10.199.0.100");

fn mgmt_addr() -> std::net::SocketAddr {
    format!("{}:7001", MGMT.1).parse().unwrap()
}

async fn open(lab: &Lab, cluster: &TestCluster, name: &str) -> Volume {
    let identity = cluster.identity(Role::Client, name);
    let servers = [MgmtServer {
        addr: mgmt_addr(),
        name: "mgmt".into(),
    }];
    // The client's socket is made by the first poll: make it in the client's namespace.
    let mut connect = Box::pin(Client::connect(&servers, &identity));
    let first = lab.inside(CLIENT.0, || {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        connect.as_mut().poll(&mut cx)
    });
    let client = match first {
        std::task::Poll::Ready(client) => client,
        std::task::Poll::Pending => connect.await,
    }
    .unwrap();
    client.open_volume("p").await.unwrap()
}

use std::future::Future;

/// A dial-only endpoint in the clients' namespace.
fn client_endpoint(lab: &Lab, cluster: &TestCluster, role: Role, name: &str) -> Endpoint {
    let identity = cluster.identity(role, name);
    lab.inside(CLIENT.0, || {
        Endpoint::client(mgmt_addr(), &identity, &TransportTuning::default()).unwrap()
    })
}

async fn admin_conn(lab: &Lab, cluster: &TestCluster) -> PeerConnection {
    let endpoint = client_endpoint(lab, cluster, Role::Admin, "admin");
    endpoint
        .connect(mgmt_addr(), "mgmt", Alpn::Mgmt, Role::Mgmt)
        .await
        .unwrap()
}

async fn status_of(admin: &PeerConnection) -> ClusterStatus {
    match admin.mgmt(&MgmtRequest::Status).await.unwrap() {
        MgmtReply::Status(s) => s,
        other => panic!("{other:?}"),
    }
}

async fn wait_for(admin: &PeerConnection, what: &str, check: impl Fn(&ClusterStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status_of(admin).await;
        if check(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn primary(s: &ClusterStatus) -> Option<String> {
    s.volumes
        .iter()
        .find(|v| v.name == "p")?
        .partitions
        .first()?
        .replicas
        .first()
        .map(|r| r.server.clone())
}

#[tokio::test]
async fn a_primary_cut_off_from_management_stops_serving_before_it_is_replaced() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: network namespaces need root");
        return;
    }
    let lab = match Lab::new(&[MGMT, S1, S2, S3, CLIENT]) {
        Ok(lab) => lab,
        Err(e) => {
            println!("skipped: cannot make network namespaces here: {e}");
            return;
        }
    };
    let cluster = TestCluster::new();
    let dir = cluster.dir.path().to_str().unwrap().to_string();
    cluster.issue(Role::Mgmt, "mgmt");
    let mut children = Killed(Vec::new());
    let mgmt_args: Vec<String> = [
        "mgmt",
        "--listen",
        &mgmt_addr().to_string(),
        "--state",
        &format!("{dir}/mgmt-state"),
        "--cluster-dir",
        &dir,
        "--name",
        "mgmt",
        "--heartbeat-timeout-ms",
        &HEARTBEAT_TIMEOUT_MS.to_string(),
    ]
    .map(String::from)
    .to_vec();
    children
        .0
        .push(lab.spawn(MGMT.0, &mgmt_args, &cluster.path("mgmt.log")));
    for (name, addr) in [S1, S2, S3] {
        cluster.issue(Role::Storage, name);
        let args: Vec<String> = [
            "storage",
            "--listen",
            &format!("{addr}:7000"),
            "--data",
            &format!("{dir}/{name}.img"),
            "--size",
            "256M",
            "--cluster-dir",
            &dir,
            "--name",
            name,
            "--mgmt",
            &mgmt_addr().to_string(),
        ]
        .map(String::from)
        .to_vec();
        children
            .0
            .push(lab.spawn(name, &args, &cluster.path(&format!("{name}.log"))));
    }
    let admin = admin_conn(&lab, &cluster).await;
    wait_for(&admin, "3 servers up", |s| {
        s.servers.iter().filter(|s| s.up).count() == 3
    })
    .await;
    for command in [
        create("p", 64, 2, Some(&["s1", "s2"])),
        AdminCommand::SetPartition {
            volume: "p".into(),
            first_page: 0,
            end_page: 64,
            servers: vec!["s1".into(), "s2".into()],
        },
    ] {
        let reply = admin.mgmt(&MgmtRequest::Admin(command)).await.unwrap();
        assert!(matches!(reply, MgmtReply::Applied { .. }), "{reply:?}");
    }
    wait_for(&admin, "in sync", |s| {
        s.volumes
            .iter()
            .flat_map(|v| &v.partitions)
            .flat_map(|p| &p.replicas)
            .all(|r| r.state == MirrorState::InSync)
    })
    .await;
    let writer = open(&lab, &cluster, "writer").await;
    let reader = open(&lab, &cluster, "reader").await;
    for block in 0..16u64 {
        writer
            .write_at(block * 4096, &pattern(block, 4096))
            .await
            .unwrap();
    }
    let mut read = vec![0; 4096];
    reader.read_at(0, &mut read).await.unwrap();
    assert_eq!(read, pattern(0, 4096));

    // The cut: s1 still reaches its clients and its mirror, not the management server.
    let raw = client_endpoint(&lab, &cluster, Role::Client, "raw");
    let s1 = raw
        .connect(
            format!("{}:7000", S1.1).parse().unwrap(),
            "s1",
            Alpn::Data,
            Role::Storage,
        )
        .await
        .unwrap();
    let before = status_of(&admin).await;
    let volume = before.volumes.iter().find(|v| v.name == "p").unwrap();
    let (id, epoch) = (volume.id.0, volume.epoch.0);
    assert_eq!(
        op(&s1, Opcode::Read, id, epoch, 0, 4096).await.status,
        Status::Ok
    );
    lab.cut(S1, MGMT, true);
    let cut = Instant::now();
    let stopped = loop {
        let status = op(&s1, Opcode::Read, id, epoch, 0, 4096).await.status;
        if status != Status::Ok {
            break status;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(10),
            "s1 went on serving"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stopped_after = cut.elapsed();
    assert_eq!(stopped, Status::Unavailable);
    wait_for(&admin, "s2 promoted", |s| {
        primary(s).as_deref() == Some("s2")
    })
    .await;
    let promoted_after = cut.elapsed();
    println!(
        "s1 stopped serving {stopped_after:?} after the cut; s2 was promoted after {promoted_after:?}"
    );
    assert!(
        stopped_after < promoted_after,
        "two primaries could serve: s1 stopped at {stopped_after:?}, s2 led at {promoted_after:?}"
    );

    // Through the new primary, and read by a client whose map still names
    // s1: never data older than an acknowledged write.
    writer.write_at(0, &pattern(100, 4096)).await.unwrap();
    reader.read_at(0, &mut read).await.unwrap();
    assert_eq!(
        read,
        pattern(100, 4096),
        "a read returned data older than an acknowledged write"
    );
    assert_eq!(
        op(&s1, Opcode::Read, id, epoch, 0, 4096).await.status,
        Status::Unavailable
    );

    // The link returns: s1 comes back as a mirror and is resynced from the bits.
    lab.cut(S1, MGMT, false);
    wait_for(&admin, "s1 back in sync", |s| {
        s.servers.iter().all(|s| s.up)
            && s.volumes
                .iter()
                .flat_map(|v| &v.partitions)
                .flat_map(|p| &p.replicas)
                .all(|r| r.state == MirrorState::InSync)
    })
    .await;
    let after = status_of(&admin).await;
    let copied = after
        .servers
        .iter()
        .find(|s| s.name == "s2")
        .map_or(0, |s| s.resynced_bytes);
    println!("resync after the partition copied {copied} bytes");
    assert!(
        copied <= 4 * 64 * 1024,
        "the resync copied {copied} bytes for one block written meanwhile"
    );
    for block in 0..16u64 {
        reader.read_at(block * 4096, &mut read).await.unwrap();
        let tag = if block == 0 { 100 } else { block };
        assert_eq!(read, pattern(tag, 4096), "block {block}");
    }
}
