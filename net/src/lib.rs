//! Tessera's wire protocol and transport.
//!
//! [`proto`] is sans-IO (it imports neither quinn nor tokio) so that it can be
//! fuzzed and tested byte for byte; [`quic`] carries it over QUIC with mutual TLS.

pub mod log_limit;
pub mod proto;
pub mod quic;
pub mod units;
