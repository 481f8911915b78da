//! QUIC transport with mutual TLS from the cluster CA.
//!
//! * [`certs`]: the cluster CA (`tessera cluster init`) and the certificates it issues.
//! * [`PeerIdentity`]: role and name read from a peer's verified certificate.
//! * [`TransportTuning`]: documented QUIC settings for storage traffic.
//! * [`Endpoint`], [`PeerConnection`], [`Connector`]: connect, accept, one
//!   stream per request, one connection per peer.

pub mod certs;
mod endpoint;
mod error;
mod identity;
mod transport;

pub use endpoint::{
    Connector, Endpoint, Handshake, PeerConnection, read_frame, read_reply, read_request,
    serve_mgmt_stream, write_frame, write_reply,
};
pub use error::QuicError;
pub use identity::TlsPaths;
pub use identity::{PeerIdentity, TlsIdentity};
pub use quinn::{ConnectError, ReadExactError, RecvStream, SendStream, VarInt};
pub use transport::{Alpn, TransportTuning};
