//! The Tessera storage server, in layers whose imports run one way (each
//! uses only those listed before it):
//!
//! * [`error`]: [`EngineError`], the one error type of the crate.
//! * [`disk`]: aligned buffers, block devices and the on-disk format.
//! * [`config`]: the storage server's TOML config and its validation.
//! * [`store`]: volumes, epochs, admission, thin-provisioned chunks,
//!   metadata and bitmask persistence, opening a data file.
//! * [`repl`]: forwarding writes to mirrors, region tracking, the cleaner,
//!   resync and the peer protocol.
//! * [`service`]: QUIC streams and dispatch, reports to the management
//!   server, metrics, and [`run`], a whole storage server in-process.
//!
//! `docs/storage-server.md` has who owns what and the path of one write.

pub mod config;
pub mod disk;
pub mod error;
pub mod repl;
pub mod service;
pub mod store;

pub use error::EngineError;
pub use service::run;

// Offsets and lengths convert between u64 and usize freely: io_uring storage
// servers run on 64-bit Linux only.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("tessera-engine needs a 64-bit target");
