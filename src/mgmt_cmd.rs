//! `tessera mgmt`: run the management server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use tessera_mgmt::server::{self, MgmtConfig};
use tessera_net::proto::Role;

use crate::runtime::Shutdown;
use crate::tls::TlsArgs;

/// Run the management server: `tessera mgmt --state DIR --listen ADDR ...`.
#[derive(Debug, Args)]
pub struct MgmtCommand {
    /// TOML config file; flags given here override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory of the state database (created if missing).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Address to serve on (QUIC/UDP); port 0 picks a free port [default: 127.0.0.1:7400].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Mark a storage server down after this long without a heartbeat (ms) [default: 5000].
    #[arg(long, value_name = "MS")]
    heartbeat_timeout_ms: Option<u64>,
    #[command(flatten)]
    tls: TlsArgs,
}

pub fn run(command: MgmtCommand) -> anyhow::Result<()> {
    let mut config = match &command.config {
        Some(path) => MgmtConfig::load(path)?,
        None => MgmtConfig::default(),
    };
    if let Some(state) = command.state {
        config.state = state;
    }
    if let Some(listen) = command.listen {
        config.listen = listen;
    }
    if let Some(ms) = command.heartbeat_timeout_ms {
        config.heartbeat_timeout_ms = ms;
    }
    command.tls.apply(&mut config.tls)?;
    let identity = config.tls.load().context("cannot load TLS certificates")?;
    if identity.me().role != Role::Mgmt {
        bail!(
            "certificate {} has role {}, a management server needs role mgmt",
            config.tls.cert.display(),
            identity.me().role
        );
    }
    let runtime = crate::runtime::current_thread()?;
    runtime.block_on(async {
        let shutdown = Shutdown::watch()?;
        server::run(config, identity, shutdown.wait()).await?;
        Ok(())
    })
}
