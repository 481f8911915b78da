//! Tessera's transport.
//!
//! [`proto`] is the sans-IO protocol crate `tessera-proto`, re-exported (it
//! cannot import quinn or tokio: its manifest does not have them); [`quic`]
//! carries it over QUIC with mutual TLS.

pub mod log_limit;
pub use tessera_proto as proto;
pub mod quic;
pub use tessera_proto::units;
