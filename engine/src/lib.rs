//! The Tessera storage server.
//!
//! * [`format`]: the on-disk format (pure encode and decode).
//! * [`io`]: the switchable I/O engine (io_uring with O_DIRECT, or plain files).
//! * [`store`]: volumes, epochs, thin-provisioned chunks and data I/O.
//! * [`bitmask`]: per-peer bitmasks of regions a peer replica may lack.
//! * [`replication`]: forwarding writes to mirrors, cleaning bits, resync.
//! * [`server`]: opening a device, the QUIC data and management service,
//!   and [`run`], a whole storage server in-process.

pub mod aligned;
pub mod bitmask;
pub mod config;
pub mod error;
pub mod format;
pub mod io;
pub mod metrics;
pub mod replication;
pub mod report;
pub mod server;
pub mod store;

pub use error::EngineError;
pub use server::run;

// Offsets and lengths convert between u64 and usize freely: io_uring storage
// servers run on 64-bit Linux only.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("tessera-engine needs a 64-bit target");
