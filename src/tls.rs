//! Command-line flags naming a process's TLS material.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use tessera_net::quic::TlsPaths;

#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Cluster directory: uses DIR/ca.crt, DIR/NAME.crt and DIR/NAME.key (with --name).
    #[arg(long, value_name = "DIR", requires = "name")]
    pub cluster_dir: Option<PathBuf>,
    /// Certificate name inside --cluster-dir.
    #[arg(long, value_name = "NAME", requires = "cluster_dir")]
    pub name: Option<String>,
    /// Cluster CA certificate (instead of --cluster-dir).
    #[arg(long, value_name = "FILE", conflicts_with = "cluster_dir")]
    pub ca: Option<PathBuf>,
    /// This process's certificate (instead of --cluster-dir).
    #[arg(long, value_name = "FILE", conflicts_with = "cluster_dir")]
    pub cert: Option<PathBuf>,
    /// This process's private key (instead of --cluster-dir).
    #[arg(long, value_name = "FILE", conflicts_with = "cluster_dir")]
    pub key: Option<PathBuf>,
}

impl TlsArgs {
    /// Override `paths` with whatever the flags name; all three must end up set.
    pub fn apply(self, paths: &mut TlsPaths) -> anyhow::Result<()> {
        if let (Some(dir), Some(name)) = (&self.cluster_dir, &self.name) {
            *paths = TlsPaths::in_dir(dir, name);
        }
        if let Some(ca) = self.ca {
            paths.ca = ca;
        }
        if let Some(cert) = self.cert {
            paths.cert = cert;
        }
        if let Some(key) = self.key {
            paths.key = key;
        }
        if paths.ca.as_os_str().is_empty()
            || paths.cert.as_os_str().is_empty()
            || paths.key.as_os_str().is_empty()
        {
            bail!(
                "no TLS certificates: give --cluster-dir DIR --name NAME, or --ca, --cert and --key, or [tls] in the config file"
            );
        }
        Ok(())
    }
}
