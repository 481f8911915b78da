//! `tessera demo`: a whole cluster on loopback with file-backed disks, a
//! volume written and verified through the driver, served over NBD.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use tessera_driver::nbd::{Export, Listen, Listener};
use tessera_driver::{Client, MgmtServer};
use tessera_net::proto::{AdminCommand, MgmtReply, MgmtRequest, Refusal, Role};
use tessera_net::quic::certs::{CA_CERT_FILE, ClusterCa};
use tessera_net::quic::{Alpn, Endpoint, TlsIdentity, TransportTuning};
use tessera_net::units::ByteSize;

use crate::runtime::shutdown_signal;

const STORAGE: [&str; 3] = ["store-1", "store-2", "store-3"];
const VOLUME: &str = "demo";
const CERT_DAYS: u32 = 825;

/// Run a local cluster on loopback: a management server, three storage
/// servers on file-backed disks, one volume, served over NBD until Ctrl-C.
#[derive(Debug, Args)]
pub struct DemoCommand {
    /// Where the cluster lives; a second run reuses it.
    #[arg(long, default_value = "tessera-demo")]
    dir: PathBuf,
    /// Size of each storage server's data file.
    #[arg(long, default_value = "1G")]
    disk_size: ByteSize,
    /// Size of the demo volume (created on the first run).
    #[arg(long, default_value = "1G")]
    volume_size: ByteSize,
    /// Where NBD clients connect: tcp:HOST:PORT or unix:PATH.
    #[arg(long, default_value = "tcp:127.0.0.1:10809")]
    nbd: Listen,
    /// Verify, shut down cleanly and exit 0 or 1 (for CI) instead of serving.
    #[arg(long)]
    check: bool,
}

/// Child processes, stopped (SIGTERM, then waited for) when dropped.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &self.0 {
            // SAFETY: plain syscall with our child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for (name, child) in &mut self.0 {
            match child.wait() {
                Ok(status) if !status.success() => eprintln!("  {name} exited with {status}"),
                Ok(_) => {}
                Err(e) => eprintln!("  {name}: {e}"),
            }
        }
    }
}

impl Children {
    /// Start `tessera ARGS`, wait for its "serving on ADDR" line, return ADDR.
    fn spawn(&mut self, name: &str, args: &[&str], log: &Path) -> anyhow::Result<String> {
        let exe = std::env::current_exe().context("cannot find the tessera binary")?;
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(exe);
        command.args(args).stdout(Stdio::piped()).stderr(log_file);
        // SAFETY: prctl is async-signal-safe; it makes the child die with the demo.
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
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        self.0.push((name.to_string(), child));
        match line.trim().rsplit_once("serving on ") {
            Some((_, addr)) => Ok(addr.to_string()),
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

fn ensure_certificates(dir: &Path) -> anyhow::Result<()> {
    let ca = if dir.join(CA_CERT_FILE).exists() {
        ClusterCa::load(dir)?
    } else {
        let ca = ClusterCa::generate("tessera-demo", 3650)?;
        ca.save(dir)?;
        ca
    };
    let mut wanted = vec![
        (Role::Mgmt, "mgmt"),
        (Role::Admin, "admin"),
        (Role::Client, "demo"),
    ];
    wanted.extend(STORAGE.iter().map(|s| (Role::Storage, *s)));
    for (role, name) in wanted {
        if !dir.join(format!("{name}.crt")).exists() {
            ca.issue(role, name, CERT_DAYS)?.save(dir, name)?;
        }
    }
    Ok(())
}

pub fn run(command: DemoCommand) -> anyhow::Result<()> {
    let dir = &command.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let fresh = !dir.join(CA_CERT_FILE).exists();
    println!(
        "Tessera demo in {} ({})",
        dir.display(),
        if fresh {
            "new cluster"
        } else {
            "reusing the cluster there"
        }
    );
    ensure_certificates(dir)?;
    let d = dir
        .to_str()
        .context("the demo directory must be valid UTF-8")?;

    let mut children = Children(Vec::new());
    let state = format!("{d}/mgmt-state");
    let mgmt = children.spawn(
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
    println!("  management server   {mgmt}   (log {d}/mgmt.log)");
    let size = command.disk_size.to_string().replace(' ', "");
    for name in STORAGE {
        let data = format!("{d}/{name}.img");
        let addr = children.spawn(
            name,
            &[
                "storage",
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
        println!(
            "  storage server      {addr}   {name}, disk {data} ({})",
            command.disk_size
        );
    }

    let runtime = crate::runtime::multi_thread()?;
    let result = runtime.block_on(demo(&command, dir, mgmt.parse()?));
    drop(children);
    match &result {
        Ok(()) if command.check => println!("demo check passed; cluster stopped cleanly"),
        Ok(()) => println!("stopped"),
        Err(_) => {}
    }
    result
}

async fn demo(command: &DemoCommand, dir: &Path, mgmt: std::net::SocketAddr) -> anyhow::Result<()> {
    let admin_id = TlsIdentity::load_dir(dir, "admin")?;
    let endpoint = Endpoint::client(mgmt, &admin_id, &TransportTuning::default())?;
    let admin = endpoint
        .connect(mgmt, "mgmt", Alpn::Mgmt, Role::Mgmt)
        .await?;

    // Wait for the storage servers to register.
    let deadline = Instant::now() + Duration::from_secs(30);
    let up = loop {
        let MgmtReply::Status(status) = admin.mgmt(&MgmtRequest::Status).await? else {
            bail!("unexpected status reply");
        };
        let up = status.servers.iter().filter(|s| s.up).count();
        if up == STORAGE.len() {
            break up;
        }
        if Instant::now() > deadline {
            bail!("only {up} of {} storage servers registered", STORAGE.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Every page on two servers: a primary and one mirror.
    let replicas = 2.min(up as u8);
    let create = AdminCommand::CreateVolume {
        name: VOLUME.into(),
        size: command.volume_size.0,
        page_size: 1 << 20,
        replicas,
        servers: None,
    };
    match admin.mgmt(&MgmtRequest::Admin(create)).await? {
        MgmtReply::Applied { epoch } => println!(
            "created volume {VOLUME}: {} over {up} servers, {replicas} replicas (epoch {})",
            command.volume_size, epoch.0
        ),
        MgmtReply::Refused(Refusal::AlreadyExists { .. }) => {
            println!("volume {VOLUME} exists: reusing it")
        }
        other => bail!("cannot create the volume: {other:?}"),
    }

    let client_id = TlsIdentity::load_dir(dir, "demo")?;
    let client = Client::connect(
        &[MgmtServer {
            addr: mgmt,
            name: "mgmt".into(),
        }],
        &client_id,
    )
    .await?;
    let volume = client.open_volume(VOLUME).await?;
    let map = volume.map();
    for p in &map.partitions {
        let servers: Vec<&str> = p.replicas.iter().map(|r| r.server.as_str()).collect();
        println!(
            "  pages {:>5}..{:<5} on {}",
            p.first_page,
            p.end_page,
            servers.join(", ")
        );
    }

    // Write a pattern across every partition and read it back.
    let chunk = 4 << 20;
    let mut offsets = vec![0u64];
    offsets.extend(
        map.partitions
            .iter()
            .skip(1)
            .map(|p| p.first_page * u64::from(map.page_size) - (1 << 20)),
    );
    let started = Instant::now();
    for (i, offset) in offsets.iter().enumerate() {
        let data: Vec<u8> = (0..chunk)
            .map(|b| (b as u64 * 31 + i as u64 * 7 + (b as u64 >> 12)) as u8)
            .collect();
        volume.write_at(*offset, &data).await?;
        volume.flush().await?;
        let mut back = vec![0u8; chunk];
        volume.read_at(*offset, &mut back).await?;
        if back != data {
            bail!("verification failed at offset {offset}");
        }
    }
    println!(
        "wrote and verified {} in {} pieces across partitions ({:.0} ms)",
        ByteSize((chunk * offsets.len()) as u64),
        offsets.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );

    if let MgmtReply::Status(status) = admin.mgmt(&MgmtRequest::Status).await?
        && let Some(v) = status.volumes.iter().find(|v| v.name == VOLUME)
    {
        let rows = crate::mirror_cmd::rows(&status, v);
        let in_sync = rows.iter().filter(|r| r.state == "in sync").count();
        println!("mirrors: {in_sync} of {} in sync", rows.len());
    }

    let listener = Listener::bind(&command.nbd)
        .await
        .with_context(|| format!("cannot listen on {}", command.nbd))?;
    let uri = listener.uri(VOLUME)?;
    let export = Arc::new(Export::new(VOLUME.into(), volume));
    let serving = tokio::spawn(listener.run(export));
    println!("\nvolume {VOLUME} is served over NBD at {uri}");
    println!("  nbdinfo {uri}");
    println!("  qemu-img info {uri}");
    println!(
        "  fio --name=t --ioengine=nbd --uri={uri} --rw=randread --bs=4k --iodepth=32 --size=256M --runtime=10 --time_based"
    );
    println!(
        "admin: TESSERA_CLUSTER_DIR={} TESSERA_MGMT={mgmt} tessera status",
        dir.display()
    );

    if command.check {
        // Where nbdinfo is installed, check the export as a client sees it.
        if let Ok(out) = Command::new("nbdinfo").args(["--size", &uri]).output() {
            let size = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() || size.trim() != map.size.to_string() {
                bail!(
                    "nbdinfo did not see the volume: {size} {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            println!("nbdinfo sees {} bytes", size.trim());
        }
        // Every replica holds the same bytes.
        let verify = Command::new(std::env::current_exe()?)
            .args(["volume", "verify", VOLUME, "--mgmt", &mgmt.to_string()])
            .arg("--cluster-dir")
            .arg(dir)
            .output()?;
        print!("{}", String::from_utf8_lossy(&verify.stdout));
        if !verify.status.success() {
            bail!(
                "replicas differ: {}",
                String::from_utf8_lossy(&verify.stderr)
            );
        }
        serving.abort();
        endpoint.close();
        return Ok(());
    }
    println!("\nserving until Ctrl-C");
    tokio::select! {
        served = serving => served.context("NBD server stopped")?.context("NBD listener failed")?,
        signal = shutdown_signal() => signal?,
    }
    endpoint.close();
    Ok(())
}
