//! Storage server configuration: a TOML file, every field optional.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tessera_net::quic::{TlsPaths, TransportTuning};
use tessera_net::units::ByteSize;

use crate::disk::format::{
    BLOCK, DEFAULT_MAX_VOLUMES, DEFAULT_REGION_SIZE, DEFAULT_SLOT_SIZE, Geometry, GeometryError,
    MAX_REGION_SIZE,
};
use crate::disk::io::IoEngine;
use crate::error::EngineError;

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

/// The most volumes a data file's table may be formatted for.
pub const MAX_MAX_VOLUMES: u32 = 1 << 16;

impl StorageConfig {
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            op: "read config",
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| {
            let at = e.span().map_or(0, |span| span.start);
            let before = text.get(..at).unwrap_or(&text);
            EngineError::ConfigFile {
                path: path.to_path_buf(),
                line: before.matches('\n').count() + 1,
                column: before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1,
                reason: e.message().trim().replace('\n', "; "),
            }
        })
    }

    /// Check every setting before anything is created or opened, so that
    /// a bad value leaves no file behind.
    pub fn validate(&self) -> Result<(), EngineError> {
        let invalid = |setting: &'static str, value: String, reason: String| {
            Err(EngineError::InvalidSetting {
                setting,
                value,
                reason,
            })
        };
        if !(1..=MAX_MAX_VOLUMES).contains(&self.max_volumes) {
            return invalid(
                "max_volumes",
                self.max_volumes.to_string(),
                format!("must be from 1 to {MAX_MAX_VOLUMES}"),
            );
        }
        // The geometry holds the rules for the format-time settings; each
        // of its refusals is named here by the setting it is about.
        let (slot, region) = (self.slot_size()?, self.region_size()?);
        match Geometry::compute(self.size.0, slot, region, self.max_volumes) {
            Ok(_) => {}
            Err(GeometryError::SlotSize { .. }) => {
                return invalid(
                    "slot_size",
                    self.slot_size.to_string(),
                    format!(
                        "must be a power of two of at least {}, such as \"1M\"",
                        ByteSize(BLOCK)
                    ),
                );
            }
            Err(GeometryError::RegionSize { .. }) => {
                return invalid(
                    "region_size",
                    self.region_size.to_string(),
                    format!(
                        "must be a power of two from {} to {}, such as \"64K\"",
                        ByteSize(BLOCK),
                        ByteSize(u64::from(MAX_REGION_SIZE))
                    ),
                );
            }
            Err(e @ GeometryError::TooSmall { .. }) => {
                return invalid(
                    "size",
                    self.size.to_string(),
                    format!("{e}; give a larger size, or a smaller slot_size or max_volumes"),
                );
            }
            Err(e @ GeometryError::TooManySlots { .. }) => {
                return invalid(
                    "slot_size",
                    self.slot_size.to_string(),
                    format!("{e} for a size of {}", self.size),
                );
            }
            Err(e @ GeometryError::NoVolumes) => return Err(e.into()),
        }
        for (setting, value) in [
            ("heartbeat_ms", self.heartbeat_ms),
            ("forward_timeout_ms", self.forward_timeout_ms),
            ("clean_interval_ms", self.clean_interval_ms),
        ] {
            if value == 0 {
                return invalid(setting, "0".into(), "must be at least 1".into());
            }
        }
        if self.resync_rate.0 < BLOCK {
            return invalid(
                "resync_rate",
                self.resync_rate.to_string(),
                format!("must be at least {} per second", ByteSize(BLOCK)),
            );
        }
        self.transport.validate()?;
        Ok(())
    }

    pub fn region_size(&self) -> Result<u32, EngineError> {
        u32::try_from(self.region_size.0).map_err(|_| EngineError::InvalidSetting {
            setting: "region_size",
            value: self.region_size.to_string(),
            reason: format!("must be at most {}", ByteSize(u64::from(MAX_REGION_SIZE))),
        })
    }

    pub fn slot_size(&self) -> Result<u32, EngineError> {
        u32::try_from(self.slot_size.0).map_err(|_| EngineError::InvalidSetting {
            setting: "slot_size",
            value: self.slot_size.to_string(),
            reason: "must be under 4 GiB".into(),
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
    fn every_bad_value_is_named_with_its_setting() {
        let defaults = StorageConfig::default();
        defaults.validate().unwrap();
        type Spoil = fn(&mut StorageConfig);
        let cases: [(&str, Spoil); 10] = [
            ("slot_size", |c| c.slot_size = ByteSize(3 << 10)),
            ("slot_size", |c| c.slot_size = ByteSize(8 << 30)),
            ("region_size", |c| c.region_size = ByteSize(1 << 10)),
            ("region_size", |c| c.region_size = ByteSize(32 << 20)),
            ("max_volumes", |c| c.max_volumes = 0),
            ("max_volumes", |c| c.max_volumes = u32::MAX),
            ("size", |c| c.size = ByteSize(4096)),
            ("heartbeat_ms", |c| c.heartbeat_ms = 0),
            ("resync_rate", |c| c.resync_rate = ByteSize(0)),
            ("transport.keep_alive_ms", |c| c.transport.keep_alive_ms = 0),
        ];
        for (setting, spoil) in cases {
            let mut config = defaults.clone();
            spoil(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("{setting} = ")),
                "{setting}: {err}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<StorageConfig>("sise = \"1G\"").unwrap_err();
        assert!(err.message().contains("unknown field"), "{err}");
    }
}
