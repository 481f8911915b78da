//! `tessera nbd`: serve a volume over NBD.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tessera_driver::nbd::{Export, Limits, Listen, Listener};
use tessera_driver::{Client, MgmtServer};
use tessera_net::proto::Role;
use tessera_net::quic::TlsPaths;

use crate::runtime::Shutdown;
use crate::tls::TlsArgs;

/// Serve a volume over NBD (to qemu, nbdcopy, nbdinfo, fio, nbd-client).
#[derive(Debug, Args)]
pub struct NbdCommand {
    /// The volume to export (also the NBD export name).
    #[arg(long)]
    volume: String,
    /// Where NBD clients connect: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "unix:PATH|tcp:ADDR")]
    listen: Listen,
    /// Management server address.
    #[arg(long, env = "TESSERA_MGMT", default_value = "127.0.0.1:7400")]
    mgmt: SocketAddr,
    /// The management server's certificate name.
    #[arg(long, env = "TESSERA_MGMT_NAME", default_value = "mgmt")]
    mgmt_name: String,
    /// Threads serving NBD clients and talking to the cluster. One avoids
    /// handing each request between threads; more help when many clients
    /// share this frontend on a machine with cores to spare.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Clients served at once; more are closed as soon as they connect.
    /// Keep it below the open-file limit (ulimit -n).
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    max_connections: usize,
    /// Milliseconds a client may take from connecting to choosing an export.
    #[arg(long, value_name = "MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    handshake_timeout_ms: u64,
    /// Milliseconds a reply may wait for a client that has stopped reading;
    /// then its connection is closed and the memory it held freed.
    #[arg(long, value_name = "MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    reply_timeout_ms: u64,
    #[command(flatten)]
    tls: TlsArgs,
}

pub fn run(command: NbdCommand) -> anyhow::Result<()> {
    let mut paths = TlsPaths::default();
    command.tls.apply(&mut paths)?;
    let identity = paths.load().context("cannot load TLS certificates")?;
    if identity.me().role != Role::Client {
        bail!(
            "certificate {} has role {}, the NBD frontend needs role client",
            paths.cert.display(),
            identity.me().role
        );
    }
    let runtime = crate::runtime::threads(command.threads)?;
    runtime.block_on(async {
        let mgmt = [MgmtServer {
            addr: command.mgmt,
            name: command.mgmt_name,
        }];
        let client = Client::connect(&mgmt, &identity)
            .await
            .context("cannot reach the cluster")?;
        let volume = client
            .open_volume(&command.volume)
            .await
            .with_context(|| format!("cannot open volume {}", command.volume))?;
        let listener = Listener::bind(&command.listen)
            .await
            .with_context(|| format!("cannot listen on {}", command.listen))?;
        let shutdown = Shutdown::watch()?;
        println!(
            "tessera nbd {} serving on {}",
            command.volume,
            listener.uri(&command.volume)?
        );
        let export = Arc::new(Export::new(command.volume, volume));
        let limits = Limits {
            handshake_timeout: Duration::from_millis(command.handshake_timeout_ms),
            max_connections: command.max_connections,
            reply_timeout: Duration::from_millis(command.reply_timeout_ms),
        };
        tokio::select! {
            () = listener.run(export, limits) => {}
            () = shutdown.wait() => {}
        }
        Ok(())
    })
}
