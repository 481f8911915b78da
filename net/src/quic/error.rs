use std::path::PathBuf;

use crate::proto::{ProtoError, Role};

/// Failures of the transport: certificates, TLS, QUIC, and protocol bytes on a stream.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// A file could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Refused to overwrite existing key material.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    AlreadyExists { path: PathBuf },
    /// A socket operation failed.
    #[error("socket {action} failed: {source}")]
    Socket {
        action: &'static str,
        source: std::io::Error,
    },
    /// A PEM file held no usable certificate or key.
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// TLS configuration was rejected.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A client certificate verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A name is not usable as a certificate and server name.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A certificate does not carry a Tessera identity (role and name).
    #[error("certificate carries no Tessera identity: {reason}")]
    BadIdentity { reason: String },
    /// The peer's certificate has a role this connection does not accept.
    #[error("peer {name:?} has role {found}, expected {expected}")]
    WrongPeerRole {
        name: String,
        found: Role,
        expected: Role,
    },
    /// A transport setting has a value that cannot be used.
    #[error("{setting} = {value}: {reason}")]
    InvalidSetting {
        setting: &'static str,
        value: String,
        reason: String,
    },
    /// The private key does not belong to the certificate.
    #[error("the key {} does not belong to the certificate {}; issue a new pair with `tessera cert issue`", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// The certificate is not one the cluster CA vouches for now.
    #[error("{} is not a valid certificate of the cluster CA {}: {reason}; issue one with `tessera cert issue` from that cluster directory", cert.display(), ca.display())]
    UntrustedCertificate {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    /// An incoming connection did not finish its handshake in time.
    #[error("handshake not finished within {after:?}")]
    HandshakeTimeout { after: std::time::Duration },
    /// A connection could not be started.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (this includes TLS handshake refusals).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing a stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading a stream failed.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// Reading a stream to its end failed.
    #[error("stream read: {0}")]
    ReadToEnd(#[from] quinn::ReadToEndError),
    /// The stream was already closed.
    #[error("stream closed: {0}")]
    ClosedStream(#[from] quinn::ClosedStream),
    /// The peer sent bytes that do not parse.
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    /// A reply answered another request.
    #[error("reply for request {received} on the stream of request {sent}")]
    RequestIdMismatch { sent: u64, received: u64 },
}
