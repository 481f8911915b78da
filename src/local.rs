//! A cluster on loopback for `tessera demo` and `tessera bench`: a CA and
//! certificates in a directory, one management server and storage servers
//! on file-backed disks, as child processes that die with this one.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use anyhow::{Context, bail};
use tessera_net::proto::{MgmtReply, MgmtRequest, Role};
use tessera_net::quic::certs::{CA_CERT_FILE, ClusterCa};
use tessera_net::quic::{Alpn, Endpoint, PeerConnection, TlsIdentity, TransportTuning};
use tessera_net::units::ByteSize;

const CERT_DAYS: u32 = 825;

/// A storage server of a local cluster.
pub struct LocalStorage {
    pub name: String,
    /// Its data address.
    pub addr: String,
    /// Where it serves Prometheus metrics.
    pub metrics: String,
}

/// A running local cluster; its processes stop (SIGTERM, then waited for)
/// when it is dropped.
pub struct LocalCluster {
    pub mgmt: SocketAddr,
    pub storage: Vec<LocalStorage>,
    children: Vec<(String, Child)>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for (_, child) in &self.children {
            // SAFETY: plain syscall with our child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for (name, child) in &mut self.children {
            match child.wait() {
                Ok(status) if !status.success() => eprintln!("  {name} exited with {status}"),
                Ok(_) => {}
                Err(e) => eprintln!("  {name}: {e}"),
            }
        }
    }
}

impl LocalCluster {
    /// Start (or restart, reusing `dir`) a management server and the
    /// `storage` servers with disks of `disk_size`; certificates for the
    /// admin `admin` and the clients `clients` are made if missing.
    pub fn start(
        dir: &Path,
        storage: &[&str],
        clients: &[&str],
        disk_size: ByteSize,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        ensure_certificates(dir, storage, clients)?;
        let d = dir
            .to_str()
            .context("the cluster directory must be valid UTF-8")?;
        let mut cluster = LocalCluster {
            mgmt: SocketAddr::from(([127, 0, 0, 1], 0)),
            storage: Vec::new(),
            children: Vec::new(),
        };
        let state = format!("{d}/mgmt-state");
        let (mgmt, _) = cluster.spawn(
            "mgmt",
            &[
                "mgmt",
                "--state",
                &state,
                "--listen",
                "127.0.0.1:0",
                "--cluster-dir",
                d,
                "--name",
                "mgmt",
            ],
            &dir.join("mgmt.log"),
        )?;
        cluster.mgmt = mgmt.parse().context("management server address")?;
        // In bytes: exact whatever the size, and what --size parses.
        let size = disk_size.0.to_string();
        for name in storage {
            let data = format!("{d}/{name}.img");
            let (addr, output) = cluster.spawn(
                name,
                &[
                    "storage",
                    "--metrics",
                    "127.0.0.1:0",
                    "--data",
                    &data,
                    "--size",
                    &size,
                    "--listen",
                    "127.0.0.1:0",
                    "--mgmt",
                    &mgmt,
                    "--cluster-dir",
                    d,
                    "--name",
                    name,
                ],
                &dir.join(format!("{name}.log")),
            )?;
            let metrics = output
                .recv_timeout(Duration::from_secs(10))
                .ok()
                .and_then(|line| Some(line.trim().rsplit_once("metrics on ")?.1.to_string()))
                .with_context(|| format!("{name} did not say where its metrics are"))?;
            cluster.storage.push(LocalStorage {
                name: name.to_string(),
                addr,
                metrics,
            });
        }
        Ok(cluster)
    }

    /// An admin connection to the management server, once all storage
    /// servers have registered (waits up to 30 s). Close the endpoint when done.
    pub async fn admin(&self, dir: &Path) -> anyhow::Result<(Endpoint, PeerConnection)> {
        let identity = TlsIdentity::load_dir(dir, "admin")?;
        let endpoint = Endpoint::client(self.mgmt, &identity, &TransportTuning::default())?;
        let admin = endpoint
            .connect(self.mgmt, "mgmt", Alpn::Mgmt, Role::Mgmt)
            .await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let MgmtReply::Status(status) = admin.mgmt(&MgmtRequest::Status).await? else {
                bail!("unexpected status reply");
            };
            let up = status.servers.iter().filter(|s| s.up).count();
            if up >= self.storage.len() {
                return Ok((endpoint, admin));
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "only {up} of {} storage servers registered",
                    self.storage.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Process ids of the servers (for CPU accounting).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }

    /// Start `tessera ARGS`, wait for its "serving on ADDR" line; return
    /// ADDR and the lines it prints after that. Its stdout is read until it
    /// exits, so a later line never meets a closed pipe.
    fn spawn(
        &mut self,
        name: &str,
        args: &[&str],
        log: &Path,
    ) -> anyhow::Result<(String, Receiver<String>)> {
        let exe = std::env::current_exe().context("cannot find the tessera binary")?;
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(exe);
        command.args(args).stdout(Stdio::piped()).stderr(log_file);
        // SAFETY: prctl is async-signal-safe; it makes the child die with us.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        self.children.push((name.to_string(), child));
        match line.trim().rsplit_once("serving on ") {
            Some((_, addr)) => Ok((addr.to_string(), rx)),
            None => {
                let log_text = std::fs::read_to_string(log).unwrap_or_default();
                let last = log_text.lines().last().unwrap_or("(no output)");
                bail!(
                    "{name} did not start; its log {} ends with: {last}",
                    log.display()
                )
            }
        }
    }
}

fn ensure_certificates(dir: &Path, storage: &[&str], clients: &[&str]) -> anyhow::Result<()> {
    let ca = if dir.join(CA_CERT_FILE).exists() {
        ClusterCa::load(dir)?
    } else {
        let ca = ClusterCa::generate("tessera-local", 3650)?;
        ca.save(dir)?;
        ca
    };
    let mut wanted = vec![(Role::Mgmt, "mgmt"), (Role::Admin, "admin")];
    wanted.extend(clients.iter().map(|c| (Role::Client, *c)));
    wanted.extend(storage.iter().map(|s| (Role::Storage, *s)));
    for (role, name) in wanted {
        if !dir.join(format!("{name}.crt")).exists() {
            ca.issue(role, name, CERT_DAYS)?.save(dir, name)?;
        }
    }
    Ok(())
}
