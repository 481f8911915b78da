//! `tessera storage`: run or format a storage server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tessera_engine::config::StorageConfig;
use tessera_engine::disk::io::IoEngine;
use tessera_engine::store::open::{self, FormatPolicy};
use tessera_net::proto::Role;
use tessera_net::quic::TlsIdentity;
use tessera_net::units::ByteSize;

use crate::tls::TlsArgs;

/// Run a storage server: `tessera storage --data PATH --size SIZE --listen ADDR ...`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct StorageCommand {
    #[command(subcommand)]
    sub: Option<StorageSub>,
    #[command(flatten)]
    args: StorageArgs,
}

#[derive(Debug, Subcommand)]
enum StorageSub {
    /// Format the data file or device (refuses data it does not recognize unless --force).
    Format(FormatArgs),
}

#[derive(Debug, Args)]
struct FormatArgs {
    #[command(flatten)]
    args: StorageArgs,
    /// Overwrite whatever the file or device holds, Tessera data included.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct StorageArgs {
    /// TOML config file; flags given here override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data file (created if missing) or block device.
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
    /// Size of a new data file, e.g. 10G [config default: 10 GiB].
    #[arg(long, value_name = "SIZE")]
    size: Option<ByteSize>,
    /// Address to serve on (QUIC/UDP); port 0 picks a free port [default: 127.0.0.1:7401].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// I/O engine: uring (io_uring, O_DIRECT) or std (page cache, for tmpfs).
    #[arg(long, value_name = "ENGINE")]
    io_engine: Option<IoEngine>,
    /// Management server to register with and report to.
    #[arg(long, value_name = "ADDR")]
    mgmt: Option<SocketAddr>,
    /// The management server's certificate name [default: mgmt].
    #[arg(long, value_name = "NAME")]
    mgmt_name: Option<String>,
    /// Data address to announce to the management server [default: the bound address].
    #[arg(long, value_name = "ADDR")]
    advertise: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics; port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    #[command(flatten)]
    tls: TlsArgs,
}

impl StorageArgs {
    fn resolve(self) -> anyhow::Result<StorageConfig> {
        let mut config = match &self.config {
            Some(path) => StorageConfig::load(path)?,
            None => StorageConfig::default(),
        };
        if let Some(data) = self.data {
            config.data = data;
        }
        if let Some(size) = self.size {
            config.size = size;
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(engine) = self.io_engine {
            config.io_engine = engine;
        }
        if let Some(mgmt) = self.mgmt {
            config.mgmt = Some(mgmt);
        }
        if let Some(name) = self.mgmt_name {
            config.mgmt_name = name;
        }
        if let Some(advertise) = self.advertise {
            config.advertise = Some(advertise);
        }
        if let Some(metrics) = self.metrics {
            config.metrics_listen = Some(metrics);
        }
        self.tls.apply(&mut config.tls)?;
        config.validate().with_context(|| match &self.config {
            Some(path) => format!("invalid setting in {} or its flag", path.display()),
            None => "invalid setting".to_string(),
        })?;
        Ok(config)
    }
}

fn storage_identity(config: &StorageConfig) -> anyhow::Result<TlsIdentity> {
    let identity = config.tls.load().context("cannot load TLS certificates")?;
    if identity.me().role != Role::Storage {
        bail!(
            "certificate {} has role {}, a storage server needs role storage",
            config.tls.cert.display(),
            identity.me().role
        );
    }
    Ok(identity)
}

pub fn run(command: StorageCommand) -> anyhow::Result<()> {
    match command.sub {
        Some(StorageSub::Format(format)) => run_format(format),
        None => run_server(command.args),
    }
}

fn run_format(args: FormatArgs) -> anyhow::Result<()> {
    let config = args.args.resolve()?;
    let identity = storage_identity(&config)?;
    let policy = if args.force {
        FormatPolicy::Force
    } else {
        FormatPolicy::IfBlank
    };
    tokio_uring::start(async {
        let store = open::open_store(&config, &identity, policy).await?;
        let g = store.superblock().geometry;
        println!(
            "{}: formatted for {}: {} data slots of {} ({} usable)",
            config.data.display(),
            identity.me().name,
            g.slot_count,
            ByteSize(u64::from(g.slot_size)),
            ByteSize(g.slot_count * u64::from(g.slot_size)),
        );
        Ok(())
    })
}

fn run_server(args: StorageArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let identity = storage_identity(&config)?;
    tokio_uring::start(async {
        // Watched before the server announces itself: a SIGTERM right after
        // the announcement is a clean stop.
        let shutdown = crate::runtime::Shutdown::watch()?;
        tessera_engine::run(&config, &identity, shutdown.wait()).await?;
        Ok(())
    })
}
