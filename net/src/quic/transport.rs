//! QUIC and TLS configuration shared by every Tessera endpoint.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};

use super::{QuicError, TlsIdentity};
use crate::proto::{MAX_IO_LEN, REQUEST_HEADER_LEN};

/// The two application protocols, negotiated by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// Block I/O between drivers and storage servers, and between servers.
    Data,
    /// The configuration map: admin commands, registration, map fetches and pushes.
    Mgmt,
}

impl Alpn {
    pub const ALL: [Alpn; 2] = [Alpn::Data, Alpn::Mgmt];

    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Alpn::Data => b"tessera-data/1",
            Alpn::Mgmt => b"tessera-mgmt/1",
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_bytes() == bytes)
    }
}

/// Transport settings, chosen for storage traffic: many small requests in
/// flight at once plus bulk transfers of up to [`MAX_IO_LEN`] per request.
/// Every field may be set in a server's TOML config; missing ones take these defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportTuning {
    /// Bidirectional streams a peer may have open at once. Each request is one
    /// stream, so this caps the queue depth of one connection; 4096 leaves room
    /// for a QD32 workload from 100+ parallel tasks on one connection.
    pub max_concurrent_streams: u32,
    /// Receive window of one stream. It holds a whole maximal request
    /// (header + 4 MiB payload) so a write never waits for window updates mid-request.
    pub stream_window: u64,
    /// Receive window of a whole connection: bytes in flight over all streams.
    /// 64 MiB keeps 32 × 1 MiB writes plus their replies moving without stalls.
    pub connection_window: u64,
    /// Bytes this side may send before acknowledgement, over all streams.
    pub send_window: u64,
    /// Ping an idle connection this often (ms) so that it stays open and a dead
    /// peer is noticed; well under `idle_timeout_ms`.
    pub keep_alive_ms: u64,
    /// A connection that hears nothing for this long (ms) is closed. It bounds how
    /// long a vanished peer can hold requests; failover detection builds on it.
    pub idle_timeout_ms: u64,
    /// UDP receive buffer requested from the kernel (capped by `net.core.rmem_max`).
    /// Larger buffers cut packet drops under bursts, which cost retransmits.
    pub socket_recv_buffer: usize,
    /// UDP send buffer requested from the kernel (capped by `net.core.wmem_max`).
    pub socket_send_buffer: usize,
    /// First UDP payload size tried; path MTU discovery raises it from there.
    pub initial_mtu: u16,
    /// The largest UDP payload path MTU discovery tries. Bigger packets move
    /// bulk data with fewer packets where the path allows them (loopback,
    /// jumbo frames); on a 1500-byte network discovery stays at ~1452.
    /// At 6500 a 4 KiB request or reply fits one packet, so the peer does
    /// not answer each with an ACK of its own. Capped at [`MAX_MTU`].
    pub max_mtu: u16,
    /// Connections a server keeps open at once (both directions); a peer
    /// knocking beyond that is refused before its handshake.
    pub max_connections: u32,
    /// The longest (ms) an incoming connection may take to finish its handshake.
    pub handshake_timeout_ms: u64,
}

/// quinn sends up to 10 packets in one GSO datagram, which must stay under
/// UDP's 65 507-byte limit: larger packets made bulk transfers stall.
pub const MAX_MTU: u16 = 6500;

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning {
            max_concurrent_streams: 4096,
            stream_window: 2 * (REQUEST_HEADER_LEN as u64 + u64::from(MAX_IO_LEN)),
            connection_window: 64 << 20,
            send_window: 64 << 20,
            keep_alive_ms: 2_000,
            idle_timeout_ms: 10_000,
            socket_recv_buffer: 8 << 20,
            socket_send_buffer: 8 << 20,
            initial_mtu: 1452,
            max_mtu: MAX_MTU,
            max_connections: 4096,
            handshake_timeout_ms: 10_000,
        }
    }
}

impl TransportTuning {
    /// Check the settings quinn would otherwise refuse or misread.
    pub fn validate(&self) -> Result<(), QuicError> {
        let invalid = |setting: &'static str, value: u64, reason: String| {
            Err(QuicError::InvalidSetting {
                setting,
                value: value.to_string(),
                reason,
            })
        };
        for (setting, value) in [
            (
                "transport.max_concurrent_streams",
                u64::from(self.max_concurrent_streams),
            ),
            ("transport.stream_window", self.stream_window),
            ("transport.connection_window", self.connection_window),
            ("transport.send_window", self.send_window),
            ("transport.keep_alive_ms", self.keep_alive_ms),
            ("transport.max_connections", u64::from(self.max_connections)),
            ("transport.handshake_timeout_ms", self.handshake_timeout_ms),
        ] {
            if value == 0 {
                return invalid(setting, value, "must be at least 1".into());
            }
        }
        if self.idle_timeout_ms <= self.keep_alive_ms || self.idle_timeout_ms > u64::from(u32::MAX)
        {
            return invalid(
                "transport.idle_timeout_ms",
                self.idle_timeout_ms,
                format!(
                    "must be more than keep_alive_ms ({}) and at most {}",
                    self.keep_alive_ms,
                    u32::MAX
                ),
            );
        }
        Ok(())
    }

    pub(crate) fn transport_config(&self) -> Arc<TransportConfig> {
        let mut config = TransportConfig::default();
        config
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(varint(self.stream_window))
            .receive_window(varint(self.connection_window))
            .send_window(self.send_window)
            .keep_alive_interval(Some(Duration::from_millis(self.keep_alive_ms)))
            .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
                u32::try_from(self.idle_timeout_ms).unwrap_or(u32::MAX),
            ))))
            .initial_mtu(self.initial_mtu.clamp(1200, MAX_MTU))
            .mtu_discovery_config(Some({
                let mut discovery = quinn::MtuDiscoveryConfig::default();
                discovery.upper_bound(self.max_mtu.max(self.initial_mtu).clamp(1200, MAX_MTU));
                discovery
            }))
            .datagram_receive_buffer_size(None);
        Arc::new(config)
    }
}

fn varint(value: u64) -> VarInt {
    VarInt::from_u64(value).unwrap_or(VarInt::MAX)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(identity: &TlsIdentity) -> Result<Arc<RootCertStore>, QuicError> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca.clone())?;
    Ok(Arc::new(roots))
}

/// Server side: TLS 1.3, client certificates required and verified against the cluster CA.
pub(crate) fn server_config(
    identity: &TlsIdentity,
    tuning: &TransportTuning,
    alpns: &[Alpn],
) -> Result<quinn::ServerConfig, QuicError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(identity)?, provider()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = alpns.iter().map(|a| a.as_bytes().to_vec()).collect();
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| QuicError::Tls(rustls::Error::General(e.to_string())))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(tuning.transport_config());
    Ok(config)
}

/// Client side: verifies the server against the cluster CA and presents our certificate.
pub(crate) fn client_config(
    identity: &TlsIdentity,
    tuning: &TransportTuning,
    alpn: Alpn,
) -> Result<quinn::ClientConfig, QuicError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(identity)?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![alpn.as_bytes().to_vec()];
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| QuicError::Tls(rustls::Error::General(e.to_string())))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(tuning.transport_config());
    Ok(config)
}
