//! `tessera demo`: a whole cluster on loopback with file-backed disks, a
//! volume written and verified through the driver, served over NBD.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use tessera_driver::nbd::{Export, Limits, Listen, Listener};
use tessera_driver::{Client, MgmtServer};
use tessera_net::proto::{AdminCommand, MgmtReply, MgmtRequest, Refusal};
use tessera_net::quic::TlsIdentity;
use tessera_net::quic::certs::CA_CERT_FILE;
use tessera_net::units::ByteSize;

use crate::local::LocalCluster;
use crate::runtime::Shutdown;

const STORAGE: [&str; 3] = ["store-1", "store-2", "store-3"];
const VOLUME: &str = "demo";

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
    /// Copies of every page of the demo volume (on distinct servers, 1 to 3).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=3))]
    replicas: u8,
    /// Where NBD clients connect: tcp:HOST:PORT or unix:PATH.
    #[arg(long, default_value = "tcp:127.0.0.1:10809")]
    nbd: Listen,
    /// Verify, shut down cleanly and exit 0 or 1 (for CI) instead of serving.
    #[arg(long)]
    check: bool,
    /// Threads serving NBD clients and talking to the cluster. One avoids
    /// handing each request between threads; more help when many clients
    /// share this frontend on a machine with cores to spare.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
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
    let cluster = LocalCluster::start(dir, &STORAGE, &["demo"], command.disk_size)?;
    let mgmt = cluster.mgmt;
    println!(
        "  management server   {mgmt}   (log {}/mgmt.log)",
        dir.display()
    );
    for server in &cluster.storage {
        println!(
            "  storage server      {}   {}, disk {}/{}.img ({}), metrics http://{}/metrics",
            server.addr,
            server.name,
            dir.display(),
            server.name,
            command.disk_size,
            server.metrics
        );
    }

    let runtime = crate::runtime::threads(command.threads)?;
    let result = runtime.block_on(demo(&command, dir, &cluster));
    drop(cluster);
    match &result {
        Ok(()) if command.check => println!("demo check passed; cluster stopped cleanly"),
        Ok(()) => println!("stopped"),
        Err(_) => {}
    }
    result
}

async fn demo(command: &DemoCommand, dir: &Path, cluster: &LocalCluster) -> anyhow::Result<()> {
    let mgmt = cluster.mgmt;
    let (endpoint, admin) = cluster.admin(dir).await?;
    let up = cluster.storage.len();

    // By default every page is on two servers: a primary and one mirror.
    let replicas = command.replicas.min(up as u8);
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

    if let MgmtReply::MirrorStatus(mirrors) = admin.mgmt(&MgmtRequest::MirrorStatus).await? {
        let rows = crate::mirror_cmd::rows(&mirrors, VOLUME);
        let in_sync = rows.iter().filter(|r| r.state == "in sync").count();
        println!("mirrors: {in_sync} of {} in sync", rows.len());
    }

    let listener = Listener::bind(&command.nbd)
        .await
        .with_context(|| format!("cannot listen on {}", command.nbd))?;
    let uri = listener.uri(VOLUME)?;
    let export = Arc::new(Export::new(VOLUME.into(), volume));
    let serving = tokio::spawn(listener.run(export, Limits::default()));
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
        let mut nbdinfo = Command::new("nbdinfo");
        nbdinfo.args(["--size", &uri]);
        if let Ok(out) = output(nbdinfo).await {
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
        let mut verify = Command::new(std::env::current_exe()?);
        verify
            .args(["volume", "verify", VOLUME, "--mgmt", &mgmt.to_string()])
            .arg("--cluster-dir")
            .arg(dir);
        let verify = output(verify).await?;
        print!("{}", String::from_utf8_lossy(&verify.stdout));
        if !verify.status.success() {
            bail!(
                "replicas differ: {}",
                String::from_utf8_lossy(&verify.stderr)
            );
        }
        // The servers count what the demo wrote, as Prometheus sees it.
        let mut writes = 0.0;
        for server in &cluster.storage {
            let body = scrape(&server.metrics).await?;
            writes += body
                .lines()
                .find_map(|l| l.strip_prefix("tessera_requests_total{op=\"write\"} "))
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("{} metrics lack the write counter", server.name))?;
        }
        if writes < 1.0 {
            bail!("the storage servers' metrics count no writes");
        }
        println!("metrics: the storage servers counted {writes} writes");
        serving.abort();
        endpoint.close();
        return Ok(());
    }
    let shutdown = Shutdown::watch()?;
    println!("\nserving until Ctrl-C");
    tokio::select! {
        served = serving => served.context("NBD server stopped")?,
        () = shutdown.wait() => {}
    }
    endpoint.close();
    Ok(())
}

/// Run a command to completion off the runtime's thread, which meanwhile
/// keeps serving (nbdinfo talks to this very process's NBD server).
async fn output(mut command: Command) -> anyhow::Result<std::process::Output> {
    let program = command.get_program().to_string_lossy().into_owned();
    tokio::task::spawn_blocking(move || command.output())
        .await
        .context("command runner failed")?
        .with_context(|| format!("cannot run {program}"))
}

/// GET http://`addr`/metrics and return the body.
async fn scrape(addr: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach metrics at {addr}"))?;
    stream
        .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => bail!("metrics at {addr} answered: {response:.200}"),
    }
}
