//! Opening a data file by config: locking it, sizing it, and formatting a blank one.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use tessera_net::proto::BLOCK_SIZE;
use tessera_net::quic::TlsIdentity;
use tessera_net::units::ByteSize;
use tracing::{debug, info, warn};

use crate::config::StorageConfig;
use crate::disk::format::{Geometry, Superblock, SuperblockFault};
use crate::disk::io::{AnyDevice, IoEngine, StdDevice, UringDevice};
use crate::error::EngineError;
use crate::store::{self, Store};

/// What to do with a device that does not hold this server's superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatPolicy {
    /// Format only a blank device (a new file, or one of zeroes): the default on start.
    IfBlank,
    /// Format whatever is there (`tessera storage format --force`).
    Force,
}

/// Open (creating if missing) and lock the data file, so that a second server
/// on the same file fails instead of corrupting it; the lock lasts as long as
/// the returned file is open.
fn open_locked(path: &Path) -> Result<(std::fs::File, RemoveOnFailure), EngineError> {
    let open = |create_new| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create_new)
            .mode(0o600)
            .open(path)
    };
    let (file, created) = match open(true) {
        Ok(file) => (Ok(file), true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (open(false), false),
        Err(e) => (Err(e), false),
    };
    let file = file.map_err(|source| EngineError::Io {
        op: "open",
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(EngineError::InUse {
            path: path.to_path_buf(),
        });
    }
    // The guard keeps a descriptor of its own, and with it the lock, until
    // it has removed the file: no other start can take the path meanwhile.
    let guard = match created {
        true => file.try_clone().ok().map(|held| (path.to_path_buf(), held)),
        false => None,
    };
    Ok((file, RemoveOnFailure(guard)))
}

/// Removes a data file this start created unless disarmed once the store
/// is open: a failed start leaves nothing behind.
struct RemoveOnFailure(Option<(std::path::PathBuf, std::fs::File)>);

impl RemoveOnFailure {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnFailure {
    fn drop(&mut self) {
        if let Some((path, _locked)) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Extend a blank data file to `size`; returns the device size.
fn prepare(file: &std::fs::File, path: &Path, size: u64) -> Result<u64, EngineError> {
    let err = |op| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { op, path, source }
    };
    let meta = file.metadata().map_err(err("stat"))?;
    if !meta.file_type().is_file() {
        // A block device keeps its size.
        let mut file = file;
        return std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(err("size"));
    }
    if meta.len() < size && superblock_is_blank(file) {
        file.set_len(size).map_err(err("extend"))?;
        // Reserve the space now so the server cannot run out of it later;
        // filesystems without fallocate keep a sparse file.
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
                debug!(%error, "fallocate unavailable; the file stays sparse");
            } else {
                // Give back what was taken: the file as it was, the space free.
                let _ = file.set_len(meta.len());
                return Err(err("reserve space for")(error));
            }
        }
        return Ok(size);
    }
    Ok(meta.len())
}

fn superblock_is_blank(file: &std::fs::File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut first = vec![0u8; 2 * crate::disk::format::BLOCK as usize];
    match file.read_at(&mut first, 0) {
        Ok(n) => first[..n].iter().all(|b| *b == 0),
        Err(_) => false,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Open (and on first start format) the store for `identity`. Must run
/// inside a tokio-uring runtime.
pub async fn open_store(
    config: &StorageConfig,
    identity: &TlsIdentity,
    policy: FormatPolicy,
) -> Result<Store<AnyDevice>, EngineError> {
    config.validate()?;
    let path = &config.data;
    let (lock, created) = open_locked(path)?;
    let device_size = prepare(&lock, path, config.size.0)?;
    let minimum = 2 * u64::from(BLOCK_SIZE);
    if device_size < minimum {
        return Err(EngineError::TooSmall {
            path: path.clone(),
            size: device_size,
            minimum,
        });
    }
    let dev = open_device(path, config.io_engine)?;
    let cluster_id = identity.cluster_id();
    let me = &identity.me().name;
    let fresh = |dev_size| -> Result<Superblock, EngineError> {
        let geometry = Geometry::compute(
            dev_size,
            config.slot_size()?,
            config.region_size()?,
            config.max_volumes,
        )?;
        Ok(Superblock {
            geometry,
            cluster_id,
            server_name: me.clone(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            incarnation: rand::random::<u64>().max(1),
        })
    };
    let found = store::read_superblock(&dev, path).await?;
    let superblock = match (found, policy) {
        (Ok(sb), FormatPolicy::IfBlank) => {
            if sb.cluster_id != cluster_id {
                return Err(EngineError::ClusterMismatch {
                    path: path.clone(),
                    expected: hex(&cluster_id),
                    found: hex(&sb.cluster_id),
                });
            }
            if &sb.server_name != me {
                return Err(EngineError::ServerMismatch {
                    path: path.clone(),
                    expected: me.clone(),
                    found: sb.server_name,
                });
            }
            if device_size < sb.geometry.device_size {
                return Err(EngineError::DeviceShrunk {
                    path: path.clone(),
                    formatted: sb.geometry.device_size,
                    now: device_size,
                });
            }
            if sb.geometry.device_size != device_size {
                warn!(
                    formatted = sb.geometry.device_size,
                    now = device_size,
                    "device size differs from the formatted size; using the formatted layout"
                );
            }
            note_format_wins(config, path, &sb.geometry);
            sb
        }
        (Err(SuperblockFault::Version(found)), FormatPolicy::IfBlank) => {
            return Err(EngineError::FormatVersion {
                path: path.clone(),
                found,
                supported: crate::disk::format::FORMAT_VERSION,
            });
        }
        (Err(SuperblockFault::NoMagic), FormatPolicy::IfBlank) => {
            return Err(EngineError::ForeignData { path: path.clone() });
        }
        (Err(SuperblockFault::Damaged), FormatPolicy::IfBlank) => {
            return Err(EngineError::SuperblockDamaged { path: path.clone() });
        }
        (Err(SuperblockFault::Blank), _) | (_, FormatPolicy::Force) => {
            let sb = fresh(device_size)?;
            info!(
                path = %path.display(),
                size = device_size,
                slots = sb.geometry.slot_count,
                "formatting"
            );
            store::format(&dev, path, &sb).await?;
            sb
        }
    };
    let store = Store::open(dev, lock, path, superblock).await?;
    created.disarm();
    Ok(store)
}

/// Settings fixed at format time that differ from the data file's: the
/// file's values are used, and the log says so.
fn note_format_wins(config: &StorageConfig, path: &Path, formatted: &Geometry) {
    let size = |bytes: u32| ByteSize(u64::from(bytes)).to_string();
    let fixed = [
        (
            "slot_size",
            config.slot_size.to_string(),
            size(formatted.slot_size),
        ),
        (
            "region_size",
            config.region_size.to_string(),
            size(formatted.region_size),
        ),
        (
            "max_volumes",
            config.max_volumes.to_string(),
            formatted.max_volumes.to_string(),
        ),
    ];
    for (setting, configured, used) in fixed {
        if configured != used {
            info!(
                path = %path.display(),
                "{setting}: the data file was formatted with {used}, which is used; the setting ({configured}) applies to new data files only"
            );
        }
    }
    if config.size.0 != formatted.device_size {
        info!(
            path = %path.display(),
            "size: the data file holds {}; the setting ({}) applies to new data files only",
            ByteSize(formatted.device_size),
            config.size
        );
    }
}

/// Open the device at `path` with `engine`; O_DIRECT refused by the
/// filesystem is a config error that says what to do.
fn open_device(path: &Path, engine: IoEngine) -> Result<AnyDevice, EngineError> {
    let result = match engine {
        IoEngine::Uring => UringDevice::open(path).map(AnyDevice::Uring),
        IoEngine::Std => StdDevice::open(path).map(AnyDevice::Std),
    };
    result.map_err(|source| {
        if source.raw_os_error() == Some(libc::EINVAL) && engine == IoEngine::Uring {
            EngineError::Config {
                reason: format!(
                    "{}: O_DIRECT is not supported on this filesystem (tmpfs?); put the data on a disk or set io_engine = \"std\"",
                    path.display()
                ),
            }
        } else {
            EngineError::Io {
                op: "open",
                path: path.to_path_buf(),
                source,
            }
        }
    })
}
