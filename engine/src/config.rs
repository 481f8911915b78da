//! Storage server configuration: a TOML file, every field optional.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tessera_net::quic::{TlsPaths, TransportTuning};
use tessera_net::units::ByteSize;

use crate::error::EngineError;
use crate::format::{DEFAULT_MAX_VOLUMES, DEFAULT_REGION_SIZE, DEFAULT_SLOT_SIZE};
use crate::io::IoEngine;

/// Settings of `tessera storage`; the file is TOML, command-line flags override it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Data file or block device.
    pub data: PathBuf,
    /// Size of a data file created or extended on first start (devices keep their size).
    pub size: ByteSize,
    /// Where the data and management service listens (QUIC, UDP).
    pub listen: SocketAddr,
    /// Data address announced to the management server (default: the bound address).
    pub advertise: Option<SocketAddr>,
    /// Where Prometheus scrapes `GET /metrics` (plain HTTP over TCP); none
    /// serves no metrics. Port 0 picks a free port.
    pub metrics_listen: Option<SocketAddr>,
    /// Management server to register with; none runs the server standalone.
    pub mgmt: Option<SocketAddr>,
    /// The management server's certificate name.
    pub mgmt_name: String,
    /// Heartbeat interval (ms); the management server marks a server down
    /// after its own timeout without one.
    pub heartbeat_ms: u64,
    /// `uring` (io_uring, O_DIRECT) or `std` (page cache; only for tmpfs and the like).
    pub io_engine: IoEngine,
    /// Allocation unit of thin provisioning, set at format time.
    pub slot_size: ByteSize,
    /// Capacity of the volume table, set at format time.
    pub max_volumes: u32,
    /// Unit of the per-peer bitmasks and of resync copies, set at format time.
    pub region_size: ByteSize,
    /// How long (ms) a primary waits for a mirror before it stops forwarding
    /// to it and has it marked out of sync: the longest stall a lost mirror
    /// causes a write is about this plus one management round trip.
    pub forward_timeout_ms: u64,
    /// Resync copies at most this many bytes per second (one region at a
    /// time), so client I/O keeps the rest of the disk.
    pub resync_rate: ByteSize,
    /// How often (ms) a primary clears the bits of regions every mirror holds.
    pub clean_interval_ms: u64,
    /// A region's bits clear only once no write has touched it for about
    /// this long (ms; counted in cleaning passes, so up to one
    /// `clean_interval_ms` less). Clearing a bit that the next write sets again costs a
    /// metadata write on that write's path; keeping recently written
    /// regions set makes a lost mirror's resync copy them too, which is the
    /// cheaper side of the trade (Linux md's write-intent bitmap makes the
    /// same one).
    pub clean_after_ms: u64,
    pub tls: TlsPaths,
    pub transport: TransportTuning,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data: PathBuf::from("tessera-data.img"),
            size: ByteSize(10 << 30),
            listen: SocketAddr::from(([127, 0, 0, 1], 7401)),
            advertise: None,
            metrics_listen: None,
            mgmt: None,
            mgmt_name: "mgmt".into(),
            heartbeat_ms: 1000,
            io_engine: IoEngine::Uring,
            slot_size: ByteSize(u64::from(DEFAULT_SLOT_SIZE)),
            max_volumes: DEFAULT_MAX_VOLUMES,
            region_size: ByteSize(u64::from(DEFAULT_REGION_SIZE)),
            forward_timeout_ms: 1_500,
            resync_rate: ByteSize(128 << 20),
            clean_interval_ms: 1_000,
            clean_after_ms: 5_000,
            tls: TlsPaths::default(),
            transport: TransportTuning::default(),
        }
    }
}

impl StorageConfig {
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            op: "read config",
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| EngineError::Config {
            reason: format!("{}: {}", path.display(), e.message()),
        })
    }

    pub fn region_size(&self) -> Result<u32, EngineError> {
        u32::try_from(self.region_size.0).map_err(|_| EngineError::Config {
            reason: format!("region size {} is too large", self.region_size),
        })
    }

    pub fn slot_size(&self) -> Result<u32, EngineError> {
        u32::try_from(self.slot_size.0).map_err(|_| EngineError::Config {
            reason: format!("slot size {} is too large", self.slot_size),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn partial_file_takes_defaults() {
        let config: StorageConfig = toml::from_str(
            "data = \"/srv/t.img\"\nsize = \"20G\"\nio_engine = \"std\"\n[transport]\nidle_timeout_ms = 5000\n",
        )
        .unwrap();
        assert_eq!(config.size, ByteSize(20 << 30));
        assert_eq!(config.io_engine, IoEngine::Std);
        assert_eq!(config.transport.idle_timeout_ms, 5000);
        assert_eq!(config.max_volumes, DEFAULT_MAX_VOLUMES);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<StorageConfig>("sise = \"1G\"").unwrap_err();
        assert!(err.message().contains("unknown field"), "{err}");
    }
}
