use std::path::PathBuf;

use tessera_net::quic::QuicError;

/// Everything the management server can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    /// The state database failed.
    #[error("state database {}: {source}", path.display())]
    Db { path: PathBuf, source: redb::Error },
    /// The state database holds bytes this build cannot decode.
    #[error("state database {}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// A file could not be read or written.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Invalid configuration.
    #[error("invalid configuration: {reason}")]
    Config { reason: String },
    /// The transport failed.
    /// The management endpoint could not be set up (the address is taken, say).
    #[error("cannot serve on {addr}: {error}")]
    Serve {
        addr: std::net::SocketAddr,
        error: QuicError,
    },
    #[error(transparent)]
    Net(#[from] QuicError),
}
