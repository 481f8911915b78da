//! Helpers for tests that run real `tessera` processes on loopback, with
//! certificates made per test and data files on disk under the target dir.
#![allow(clippy::unwrap_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tessera_net::proto::{
    AdminCommand, ClusterStatus, Epoch, MgmtReply, MgmtRequest, MirrorState, Opcode, Partition,
    Replica, Reply, Request, Role, VolumeId, VolumeMap,
};
use tessera_net::quic::certs::ClusterCa;
use tessera_net::quic::{Alpn, Endpoint, PeerConnection, TlsIdentity, TransportTuning};

pub const MIB: u64 = 1 << 20;

/// A cluster directory with its CA; certificates are issued on demand.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    ca: ClusterCa,
}

impl TestCluster {
    pub fn new() -> Self {
        // O_DIRECT needs a real filesystem: the target dir is on disk, /tmp may be tmpfs.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let ca = ClusterCa::generate("test", 2).unwrap();
        ca.save(dir.path()).unwrap();
        TestCluster { dir, ca }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn issue(&self, role: Role, name: &str) {
        if !self.path(&format!("{name}.crt")).exists() {
            self.ca
                .issue(role, name, 2)
                .unwrap()
                .save(self.dir.path(), name)
                .unwrap();
        }
    }

    pub fn identity(&self, role: Role, name: &str) -> TlsIdentity {
        self.issue(role, name);
        TlsIdentity::load_dir(self.dir.path(), name).unwrap()
    }

    /// A client-only endpoint holding `name`'s certificate in `role`.
    pub fn endpoint(&self, role: Role, name: &str) -> Endpoint {
        let id = self.identity(role, name);
        Endpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            &id,
            &TransportTuning::default(),
            &[],
        )
        .unwrap()
    }
}

pub fn tessera() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    cmd
}

/// Run the admin CLI (`tessera ARGS --mgmt ... --cluster-dir ...`) as `admin`.
pub fn admin_cli(cluster: &TestCluster, mgmt: &MgmtProc, args: &[&str]) -> std::process::Output {
    cluster.issue(Role::Admin, "admin");
    tessera()
        .args(args)
        .arg("--mgmt")
        .arg(mgmt.addr.to_string())
        .arg("--cluster-dir")
        .arg(cluster.dir.path())
        .output()
        .unwrap()
}

/// Spawn `tessera` with `args`, wait for its "serving on ADDR" line.
pub fn spawn_server(args: &[std::ffi::OsString], log: &Path) -> Result<(Child, String), String> {
    spawn_server_with_output(args, log).map(|(child, addr, _)| (child, addr))
}

/// As [`spawn_server`], also handing back the lines the process prints
/// after its first. Its stdout is drained until it exits, whether or not
/// anyone reads the lines, so a later print never meets a closed pipe.
pub fn spawn_server_with_output(
    args: &[std::ffi::OsString],
    log: &Path,
) -> Result<(Child, String, mpsc::Receiver<String>), String> {
    let mut child = tessera()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    match line.trim().rsplit_once("serving on ") {
        Some((_, addr)) => Ok((child, addr.to_string(), rx)),
        None => {
            let _ = child.kill();
            let status = child.wait().unwrap();
            Err(format!(
                "did not start ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ))
        }
    }
}

/// A `tessera mgmt` process; killed when dropped.
pub struct MgmtProc {
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl MgmtProc {
    pub fn start(cluster: &TestCluster, heartbeat_timeout_ms: u64) -> Self {
        Self::start_at(
            cluster,
            heartbeat_timeout_ms,
            "127.0.0.1:0".parse().unwrap(),
        )
    }

    /// Start on a given address (to restart where storage servers expect it).
    pub fn start_at(cluster: &TestCluster, heartbeat_timeout_ms: u64, listen: SocketAddr) -> Self {
        cluster.issue(Role::Mgmt, "mgmt");
        let log = cluster.path("mgmt.log");
        let args: Vec<std::ffi::OsString> = vec![
            "mgmt".into(),
            "--listen".into(),
            listen.to_string().into(),
            "--state".into(),
            cluster.path("mgmt-state").into(),
            "--cluster-dir".into(),
            cluster.dir.path().into(),
            "--name".into(),
            "mgmt".into(),
            "--heartbeat-timeout-ms".into(),
            heartbeat_timeout_ms.to_string().into(),
        ];
        let (child, addr) = spawn_server(&args, &log).unwrap_or_else(|e| panic!("mgmt {e}"));
        MgmtProc {
            addr: addr.parse().unwrap(),
            child,
            log,
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Send `signal` (SIGSTOP freezes it: a management server that stops
    /// answering without closing anything).
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain syscall with our child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGTERM and wait for it to exit.
    pub fn stop(&mut self) {
        // SAFETY: plain syscall with our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A connection to it holding `name`'s certificate in `role`.
    pub async fn connect(&self, cluster: &TestCluster, role: Role, name: &str) -> PeerConnection {
        cluster
            .endpoint(role, name)
            .connect(self.addr, "mgmt", Alpn::Mgmt, Role::Mgmt)
            .await
            .unwrap()
    }
}

impl Drop for MgmtProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `tessera storage` process; killed when dropped.
pub struct StorageProc {
    pub name: String,
    pub data: PathBuf,
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
    /// What it printed after its "serving on" line.
    output: mpsc::Receiver<String>,
}

impl StorageProc {
    pub fn start(cluster: &TestCluster, name: &str, size: &str, extra: &[&str]) -> Self {
        Self::try_start(cluster, name, size, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start and wait for its "serving on ADDR" line; `Err` carries its log if it exits.
    pub fn try_start(
        cluster: &TestCluster,
        name: &str,
        size: &str,
        extra: &[&str],
    ) -> Result<Self, String> {
        Self::try_start_at(cluster, name, size, "127.0.0.1:0".parse().unwrap(), extra)
    }

    /// Start listening on `listen` (to restart where the cluster knows it).
    pub fn start_at(
        cluster: &TestCluster,
        name: &str,
        size: &str,
        listen: SocketAddr,
        extra: &[&str],
    ) -> Self {
        Self::try_start_at(cluster, name, size, listen, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_at(
        cluster: &TestCluster,
        name: &str,
        size: &str,
        listen: SocketAddr,
        extra: &[&str],
    ) -> Result<Self, String> {
        cluster.issue(Role::Storage, name);
        let data = cluster.path(&format!("{name}.img"));
        let log = cluster.path(&format!("{name}.log"));
        let mut args: Vec<std::ffi::OsString> = vec![
            "storage".into(),
            "--listen".into(),
            listen.to_string().into(),
        ];
        args.extend([
            "--size".into(),
            size.into(),
            "--data".into(),
            data.clone().into(),
        ]);
        args.extend([
            "--cluster-dir".into(),
            cluster.dir.path().into(),
            "--name".into(),
            name.into(),
        ]);
        args.extend(extra.iter().map(Into::into));
        let (child, addr, output) =
            spawn_server_with_output(&args, &log).map_err(|e| format!("{name} {e}"))?;
        let addr = addr.parse().unwrap();
        Ok(StorageProc {
            name: name.to_string(),
            data,
            addr,
            child,
            log,
            output,
        })
    }

    /// The next line it printed that contains `needle` (waiting up to 10 s).
    pub fn printed(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("{} printed no line with {needle:?}: {e}", self.name),
            }
        }
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: plain syscall with our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn connect(&self, endpoint: &Endpoint) -> PeerConnection {
        endpoint
            .connect(self.addr, &self.name, Alpn::Data, Role::Storage)
            .await
            .unwrap()
    }
}

impl Drop for StorageProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A map slice with one partition covering the whole volume, held by `servers`.
pub fn whole_volume(id: u64, epoch: u64, size: u64, servers: &[&StorageProc]) -> VolumeMap {
    let page_size = MIB as u32;
    VolumeMap {
        id: VolumeId(id),
        name: format!("vol{id}"),
        epoch: Epoch(epoch),
        size,
        page_size,
        partitions: vec![Partition {
            first_page: 0,
            end_page: size.div_ceil(u64::from(page_size)),
            replicas: servers
                .iter()
                .map(|s| Replica {
                    server: s.name.clone(),
                    addr: s.addr,
                    state: MirrorState::InSync,
                })
                .collect(),
        }],
    }
}

/// Push a map slice as the management server would; returns the reply.
pub async fn push(mgmt: &Endpoint, server: &StorageProc, map: &VolumeMap) -> MgmtReply {
    let conn = mgmt
        .connect(server.addr, &server.name, Alpn::Mgmt, Role::Storage)
        .await
        .unwrap();
    conn.mgmt(&MgmtRequest::PushMap { map: map.clone() })
        .await
        .unwrap()
}

pub async fn write(conn: &PeerConnection, vol: u64, epoch: u64, offset: u64, data: &[u8]) -> Reply {
    let req = Request::write(VolumeId(vol), Epoch(epoch), offset, data, next_id()).unwrap();
    conn.data(&req, data).await.unwrap().0
}

pub async fn read(
    conn: &PeerConnection,
    vol: u64,
    epoch: u64,
    offset: u64,
    len: u32,
) -> (Reply, Vec<u8>) {
    let req = Request::new(
        Opcode::Read,
        VolumeId(vol),
        Epoch(epoch),
        offset,
        len,
        next_id(),
    );
    conn.data(&req, &[]).await.unwrap()
}

pub async fn op(
    conn: &PeerConnection,
    opcode: Opcode,
    vol: u64,
    epoch: u64,
    offset: u64,
    len: u32,
) -> Reply {
    let req = Request::new(opcode, VolumeId(vol), Epoch(epoch), offset, len, next_id());
    conn.data(&req, &[]).await.unwrap().0
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Deterministic test data for `len` bytes, distinct per `tag`.
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn file_digest(path: &Path) -> u32 {
    crc32c::crc32c(&std::fs::read(path).unwrap())
}

/// Admin requests, status polling, and a cluster of one management and three storage servers.
pub async fn admin(mgmt: &MgmtProc, cluster: &TestCluster, command: AdminCommand) -> MgmtReply {
    mgmt.connect(cluster, Role::Admin, "admin")
        .await
        .mgmt(&MgmtRequest::Admin(command))
        .await
        .unwrap()
}

pub async fn status(mgmt: &MgmtProc, cluster: &TestCluster) -> ClusterStatus {
    match mgmt
        .connect(cluster, Role::Admin, "admin")
        .await
        .mgmt(&MgmtRequest::Status)
        .await
        .unwrap()
    {
        MgmtReply::Status(s) => s,
        other => panic!("{other:?}"),
    }
}

/// Wait (up to 30 s) until `check` holds for the cluster status.
pub async fn wait_status(
    mgmt: &MgmtProc,
    cluster: &TestCluster,
    what: &str,
    check: impl Fn(&ClusterStatus) -> bool,
) -> ClusterStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(mgmt, cluster).await;
        if check(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:#?}\n{}",
            mgmt.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn three_servers(
    heartbeat_timeout_ms: u64,
    disk: &str,
) -> (TestCluster, MgmtProc, Vec<StorageProc>) {
    let cluster = TestCluster::new();
    let mgmt = MgmtProc::start(&cluster, heartbeat_timeout_ms);
    let addr = mgmt.addr.to_string();
    let servers: Vec<_> = ["s1", "s2", "s3"]
        .iter()
        .map(|name| StorageProc::start(&cluster, name, disk, &["--mgmt", &addr]))
        .collect();
    wait_status(&mgmt, &cluster, "3 servers up", |s| {
        s.servers.iter().filter(|s| s.up).count() == 3
    })
    .await;
    (cluster, mgmt, servers)
}

/// A CreateVolume command with 1 MiB pages.
pub fn create(name: &str, mib: u64, replicas: u8, servers: Option<&[&str]>) -> AdminCommand {
    AdminCommand::CreateVolume {
        name: name.into(),
        size: mib * MIB,
        page_size: MIB as u32,
        replicas,
        servers: servers.map(|s| s.iter().map(|n| n.to_string()).collect()),
    }
}
