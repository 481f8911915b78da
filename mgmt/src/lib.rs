//! The Tessera management server.
//!
//! * [`state`]: the configuration map as a deterministic state machine.
//! * [`db`]: its durable form (command log and current state) in redb.
//! * [`monitor`]: each mirror's state, what may differ, resync progress.
//! * [`server`]: the QUIC service, one task owning the state, config push.

pub mod db;
pub mod error;
pub mod monitor;
pub mod server;
pub mod state;

pub use error::MgmtError;
