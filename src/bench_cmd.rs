//! `tessera bench`: the standard workloads through the driver, against a
//! running cluster or a local one started for the run, as a table or JSON.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tessera_bench::{Progress, Report, STANDARD, Workload};
use tessera_driver::{Client, MgmtServer, Volume};
use tessera_net::proto::{AdminCommand, MgmtReply, MgmtRequest, Refusal};
use tessera_net::quic::TlsIdentity;
use tessera_net::units::ByteSize;

use crate::local::LocalCluster;

const VOLUME: &str = "bench";

/// Run block workloads through the driver and report IOPS, MB/s, latency
/// percentiles and CPU seconds per GiB.
#[derive(Debug, Args)]
pub struct BenchCommand {
    /// Benchmark this running cluster's management server (with --volume);
    /// without it, a local cluster is started in --dir for the run.
    #[arg(long, value_name = "ADDR", requires = "volume")]
    mgmt: Option<SocketAddr>,
    /// The management server's certificate name.
    #[arg(long, default_value = "mgmt")]
    mgmt_name: String,
    /// The volume to benchmark on a running cluster (its data is overwritten).
    #[arg(long)]
    volume: Option<String>,
    /// With --mgmt: directory holding ca.crt and the client certificate.
    #[arg(long, default_value = ".")]
    cluster_dir: PathBuf,
    /// With --mgmt: the client certificate's name.
    #[arg(long, default_value = "bench")]
    name: String,
    /// Local cluster: its directory (reused across runs).
    #[arg(long, default_value = "tessera-bench")]
    dir: PathBuf,
    /// Local cluster: replicas of every page (one storage server per replica).
    #[arg(long, default_value_t = 1)]
    replicas: u8,
    /// Local cluster: size of each storage server's data file.
    #[arg(long, default_value = "4G")]
    disk_size: ByteSize,
    /// Bytes of the volume the workloads touch (written once first, so reads read data).
    #[arg(long, default_value = "1G")]
    span: ByteSize,
    /// Seconds per workload.
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Workloads to run (comma-separated) [default: all]: randread-4k-qd1,
    /// randread-4k-qd32, randwrite-4k-qd1, randwrite-4k-qd32, seqread-1m-qd4,
    /// seqwrite-1m-qd4, randrw70-4k-qd32.
    #[arg(long, value_delimiter = ',')]
    workloads: Option<Vec<String>>,
    /// Seed of the random offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    let workloads = match &command.workloads {
        Some(names) => tessera_bench::select(names).map_err(anyhow::Error::msg)?,
        None => STANDARD.to_vec(),
    };
    if command.span.0 < 1 << 20 || !command.span.0.is_multiple_of(1 << 20) {
        bail!("--span must be a positive multiple of 1 MiB");
    }
    if !(1..=3).contains(&command.replicas) {
        bail!("--replicas must be 1, 2 or 3");
    }
    let runtime = crate::runtime::multi_thread()?;
    let (reports, setup) = match command.mgmt {
        Some(mgmt) => {
            let identity = TlsIdentity::load_dir(&command.cluster_dir, &command.name)
                .context("cannot load the client certificate (--cluster-dir, --name)")?;
            let volume_name = command
                .volume
                .clone()
                .context("--volume is required with --mgmt")?;
            let reports = runtime.block_on(async {
                let volume = open(mgmt, &command.mgmt_name, &identity, &volume_name).await?;
                measure(&command, &volume, &workloads, &[]).await
            })?;
            (
                reports,
                format!("volume {volume_name} of the cluster at {mgmt}"),
            )
        }
        None => {
            let names: Vec<String> = (1..=command.replicas)
                .map(|i| format!("bench-{i}"))
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let cluster = LocalCluster::start(&command.dir, &names, &["bench"], command.disk_size)?;
            let dir = command.dir.clone();
            let pids = cluster.pids();
            let reports = runtime.block_on(async {
                let volume = local_volume(&command, &dir, &cluster).await?;
                measure(&command, &volume, &workloads, &pids).await
            });
            drop(cluster);
            (
                reports?,
                format!(
                    "local cluster in {}: {} storage server(s), {} replica(s), disks of {}",
                    command.dir.display(),
                    names.len(),
                    command.replicas,
                    command.disk_size
                ),
            )
        }
    };
    if command.json {
        let out = serde_json::json!({
            "setup": setup,
            "span": command.span.0,
            "runtime_secs": command.runtime,
            "results": reports,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{setup}; span {}, {} s per workload",
            command.span, command.runtime
        );
        print!("{}", tessera_bench::table(&reports));
    }
    Ok(())
}

async fn open(
    mgmt: SocketAddr,
    mgmt_name: &str,
    identity: &TlsIdentity,
    volume: &str,
) -> anyhow::Result<Volume> {
    let servers = [MgmtServer {
        addr: mgmt,
        name: mgmt_name.to_string(),
    }];
    let client = Client::connect(&servers, identity).await?;
    Ok(client.open_volume(volume).await?)
}

/// Create (or reuse) the bench volume on the local cluster, once every
/// storage server has registered.
async fn local_volume(
    command: &BenchCommand,
    dir: &std::path::Path,
    cluster: &LocalCluster,
) -> anyhow::Result<Volume> {
    let (endpoint, admin) = cluster.admin(dir).await?;
    let create = AdminCommand::CreateVolume {
        name: VOLUME.into(),
        size: command.span.0,
        page_size: 1 << 20,
        replicas: command.replicas,
        servers: None,
    };
    match admin.mgmt(&MgmtRequest::Admin(create)).await? {
        MgmtReply::Applied { .. } | MgmtReply::Refused(Refusal::AlreadyExists { .. }) => {}
        other => bail!("cannot create the bench volume: {other:?}"),
    }
    endpoint.close();
    let identity = TlsIdentity::load_dir(dir, "bench")?;
    let volume = open(cluster.mgmt, "mgmt", &identity, VOLUME).await?;
    if volume.size() < command.span.0 {
        bail!(
            "the bench volume in {} is smaller than --span; remove the directory",
            dir.display()
        );
    }
    Ok(volume)
}

fn bar(label: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:<20} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_prefix(label.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn measure(
    command: &BenchCommand,
    volume: &Volume,
    workloads: &[Workload],
    servers: &[u32],
) -> anyhow::Result<Vec<Report>> {
    let span = command.span.0;
    let progress = Arc::new(Progress::default());
    let filling = bar("prefill");
    filling.set_message(format!("writing {}", command.span));
    tessera_bench::prefill(volume, span, &progress).await?;
    filling.finish_and_clear();
    let mut reports = Vec::new();
    for workload in workloads {
        let progress = Arc::new(Progress::default());
        let line = bar(workload.name);
        let ticker = {
            let (line, progress) = (line.clone(), progress.clone());
            let started = Instant::now();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    let ops = progress.ops.load(Ordering::Relaxed);
                    let bytes = progress.bytes.load(Ordering::Relaxed);
                    line.set_message(format!(
                        "{:>9.0} IOPS {:>8.1} MB/s",
                        ops as f64 / secs,
                        bytes as f64 / secs / 1e6
                    ));
                }
            })
        };
        let report = tessera_bench::run(
            volume,
            workload,
            span,
            Duration::from_secs(command.runtime),
            command.seed,
            servers,
            progress,
        )
        .await;
        ticker.abort();
        line.finish_and_clear();
        reports.push(report.with_context(|| format!("workload {}", workload.name))?);
    }
    Ok(reports)
}
