//! Endpoints, authenticated connections, a connection pool and per-request streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;

use quinn::{RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use serde::de::DeserializeOwned;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, warn};

use super::transport::{client_config, server_config};
use super::{Alpn, PeerIdentity, QuicError, TlsIdentity, TransportTuning};
use crate::log_limit::LogLimit;
use crate::proto::{
    self, MgmtReply, MgmtRequest, REPLY_HEADER_LEN, REQUEST_HEADER_LEN, Refusal, Reply, Request,
    Role, Status,
};

/// A QUIC endpoint with the cluster's TLS identity: it accepts connections
/// (when bound with server ALPNs) and dials peers.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    data_client: quinn::ClientConfig,
    mgmt_client: quinn::ClientConfig,
    max_connections: usize,
    handshake_timeout: Duration,
}

impl Endpoint {
    /// Bind a UDP socket at `addr` (port 0 picks a free one). With `serve`
    /// empty the endpoint only dials out.
    pub fn bind(
        addr: SocketAddr,
        identity: &TlsIdentity,
        tuning: &TransportTuning,
        serve: &[Alpn],
    ) -> Result<Self, QuicError> {
        tuning.validate()?;
        let socket = udp_socket(addr, tuning)?;
        let server = if serve.is_empty() {
            None
        } else {
            Some(server_config(identity, tuning, serve)?)
        };
        let (reset_key, cid_key) = restart_keys(identity);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        endpoint_config
            .max_udp_payload_size(tuning.max_mtu.clamp(1200, super::transport::MAX_MTU))
            .map_err(|e| QuicError::Socket {
                action: "endpoint setup",
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
            })?;
        let inner = quinn::Endpoint::new(
            endpoint_config,
            server,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| QuicError::Socket {
            action: "endpoint setup",
            source,
        })?;
        Ok(Endpoint {
            inner,
            data_client: client_config(identity, tuning, Alpn::Data)?,
            mgmt_client: client_config(identity, tuning, Alpn::Mgmt)?,
            max_connections: tuning.max_connections as usize,
            handshake_timeout: Duration::from_millis(tuning.handshake_timeout_ms),
        })
    }

    /// A dial-only endpoint on an ephemeral port of the address family that
    /// reaches `peer` (clients and admin tools).
    pub fn client(
        peer: SocketAddr,
        identity: &TlsIdentity,
        tuning: &TransportTuning,
    ) -> Result<Self, QuicError> {
        let local = if peer.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        Self::bind(local, identity, tuning, &[])
    }

    pub fn local_addr(&self) -> Result<SocketAddr, QuicError> {
        self.inner.local_addr().map_err(|source| QuicError::Socket {
            action: "local_addr",
            source,
        })
    }

    /// The next incoming connection; `None` once the endpoint is closed.
    /// Finish the handshake in its own task so that one slow peer holds up no other.
    /// Beyond `max_connections` open connections a peer is refused at once.
    pub async fn accept(&self) -> Option<Handshake> {
        loop {
            let incoming = self.inner.accept().await?;
            let open = self.inner.open_connections();
            // Past half the limit, a peer must prove its address first, so
            // spoofed Initial packets cannot take the places of real peers.
            if open >= self.max_connections / 2 && !incoming.remote_address_validated() {
                if let Err(e) = incoming.retry() {
                    debug!(error = %e, "address validation not possible");
                }
                continue;
            }
            if open < self.max_connections {
                return Some(Handshake {
                    incoming,
                    timeout: self.handshake_timeout,
                });
            }
            if let Some(suppressed) = CONNECTIONS_FULL.allow() {
                warn!(
                    remote = %incoming.remote_address(),
                    max = self.max_connections,
                    suppressed,
                    "connection refused: the server has its maximum open"
                );
            }
            incoming.refuse();
        }
    }

    /// Dial `server_name` at `addr` and check that it holds `expected_role`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
        alpn: Alpn,
        expected_role: Role,
    ) -> Result<PeerConnection, QuicError> {
        let config = match alpn {
            Alpn::Data => self.data_client.clone(),
            Alpn::Mgmt => self.mgmt_client.clone(),
        };
        let conn = self.inner.connect_with(config, addr, server_name)?.await?;
        let peer = peer_identity(&conn)?;
        if peer.role != expected_role {
            conn.close(CLOSE_WRONG_ROLE, b"wrong role");
            return Err(QuicError::WrongPeerRole {
                name: peer.name,
                found: peer.role,
                expected: expected_role,
            });
        }
        Ok(PeerConnection { conn, peer, alpn })
    }

    /// Close every connection and stop accepting.
    pub fn close(&self) {
        self.inner.close(CLOSE_SHUTDOWN, b"shutdown");
    }

    /// Wait until every connection has been closed cleanly.
    pub async fn wait_idle(&self) {
        self.inner.wait_idle().await;
    }
}

/// The key of stateless resets (RFC 9000, 10.3) and the key that checks
/// connection ids, derived from the identity's private key so that they stay
/// the same across restarts. A server restarted on its address then knows
/// the ids its previous process handed out and resets those connections, so
/// their peers see them fail at their next packet instead of waiting for an
/// answer until they time out. Only a holder of the private key can forge a
/// reset.
fn restart_keys(identity: &TlsIdentity) -> (ring::hmac::Key, u64) {
    let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, identity.key.secret_der());
    let derive = |label: &[u8]| ring::hmac::sign(&secret, label);
    let reset = derive(b"tessera quic stateless reset v1");
    let cid = derive(b"tessera quic connection id v1");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    (
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref()),
        u64::from_le_bytes(cid_key),
    )
}

/// Warnings any peer can cause at will, limited (`suppressed` counts the
/// lines held back since the last one).
static CONNECTIONS_FULL: LogLimit = LogLimit::new(5, Duration::from_secs(10));
static HANDSHAKE_REFUSED: LogLimit = LogLimit::new(10, Duration::from_secs(10));
static MALFORMED_MGMT: LogLimit = LogLimit::new(10, Duration::from_secs(10));

const CLOSE_SHUTDOWN: quinn::VarInt = quinn::VarInt::from_u32(0);
const CLOSE_WRONG_ROLE: quinn::VarInt = quinn::VarInt::from_u32(1);

fn udp_socket(
    addr: SocketAddr,
    tuning: &TransportTuning,
) -> Result<std::net::UdpSocket, QuicError> {
    let sock_err = |action| move |source| QuicError::Socket { action, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(sock_err("create"))?;
    // The kernel caps these at net.core.{r,w}mem_max; a smaller buffer still works.
    if let Err(e) = socket.set_recv_buffer_size(tuning.socket_recv_buffer) {
        warn!(error = %e, "cannot set UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(tuning.socket_send_buffer) {
        warn!(error = %e, "cannot set UDP send buffer");
    }
    socket.bind(&addr.into()).map_err(sock_err("bind"))?;
    socket
        .set_nonblocking(true)
        .map_err(sock_err("set_nonblocking"))?;
    debug!(
        %addr,
        recv = socket.recv_buffer_size().unwrap_or(0),
        send = socket.send_buffer_size().unwrap_or(0),
        "UDP socket buffers"
    );
    Ok(socket.into())
}

fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, QuicError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| QuicError::BadIdentity {
            reason: "peer presented no certificate".into(),
        })?;
    let leaf = certs.first().ok_or_else(|| QuicError::BadIdentity {
        reason: "empty certificate chain".into(),
    })?;
    PeerIdentity::from_der(leaf)
}

/// An incoming connection whose TLS handshake has not finished yet.
#[derive(Debug)]
pub struct Handshake {
    incoming: quinn::Incoming,
    timeout: Duration,
}

impl Handshake {
    pub fn remote_address(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Complete the handshake. A peer without a certificate from the cluster
    /// CA fails here and never reaches a service.
    /// A refusal is logged here (rate-limited: any peer can cause it).
    pub async fn finish(self) -> Result<PeerConnection, QuicError> {
        let remote = self.incoming.remote_address();
        let finished = self.complete().await;
        if let Err(e) = &finished
            && let Some(suppressed) = HANDSHAKE_REFUSED.allow()
        {
            warn!(%remote, error = %e, suppressed, "handshake refused");
        }
        finished
    }

    async fn complete(self) -> Result<PeerConnection, QuicError> {
        let conn = tokio::time::timeout(self.timeout, self.incoming)
            .await
            .map_err(|_| QuicError::HandshakeTimeout {
                after: self.timeout,
            })??;
        let peer = peer_identity(&conn)?;
        let alpn = conn
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol.as_deref().and_then(Alpn::from_bytes))
            .ok_or_else(|| QuicError::BadIdentity {
                reason: "no Tessera ALPN negotiated".into(),
            })?;
        Ok(PeerConnection { conn, peer, alpn })
    }
}

/// An established, mutually authenticated connection.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    conn: quinn::Connection,
    peer: PeerIdentity,
    alpn: Alpn,
}

impl PeerConnection {
    /// Who is on the other end, read from its verified certificate.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    pub fn alpn(&self) -> Alpn {
        self.alpn
    }

    /// Whether the connection has ended (closed by either side, reset by a
    /// restarted peer, or timed out): no request on it can complete.
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Stable per-connection id (to tell whether two handles share one connection).
    pub fn id(&self) -> usize {
        self.conn.stable_id()
    }

    pub fn close(&self) {
        self.conn.close(CLOSE_SHUTDOWN, b"closed");
    }

    /// Wait for the peer's next request stream; `None` when the connection ends.
    pub async fn accept_stream(&self) -> Option<(SendStream, RecvStream)> {
        match self.conn.accept_bi().await {
            Ok(streams) => Some(streams),
            Err(e) => {
                debug!(peer = %self.peer, reason = %e, "connection ended");
                None
            }
        }
    }

    /// Open a stream for one request.
    pub async fn open_stream(&self) -> Result<(SendStream, RecvStream), QuicError> {
        Ok(self.conn.open_bi().await?)
    }

    /// One management request and its reply, on a stream of its own.
    pub async fn mgmt(&self, request: &MgmtRequest) -> Result<MgmtReply, QuicError> {
        let (mut send, mut recv) = self.open_stream().await?;
        write_frame(&mut send, request).await?;
        read_frame(&mut recv).await
    }

    /// One data request and its reply, on a stream of its own. The reply
    /// payload (read data or an error message) is checked against its crc32c.
    pub async fn data(
        &self,
        request: &Request,
        payload: &[u8],
    ) -> Result<(Reply, Vec<u8>), QuicError> {
        self.data_into(request, payload, &mut []).await
    }

    /// As [`data`](Self::data), but a successful reply whose payload is
    /// exactly `out.len()` bytes is read straight into `out` (and the
    /// returned vector is empty): a read lands in the caller's buffer
    /// without an allocation or a second copy.
    pub async fn data_into(
        &self,
        request: &Request,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<(Reply, Vec<u8>), QuicError> {
        // Header and payload in one chunk: one pass through the connection's lock.
        let mut message = Vec::with_capacity(REQUEST_HEADER_LEN + payload.len());
        message.extend_from_slice(&request.encode());
        message.extend_from_slice(payload);
        self.exchange(request, &mut [message.into()], out).await
    }

    /// As [`data`](Self::data), for a payload already shared as `Bytes`
    /// (a primary forwarding one write to several mirrors): the header and
    /// the payload go out as two chunks of one write, the payload uncopied.
    pub async fn data_shared(
        &self,
        request: &Request,
        payload: Bytes,
    ) -> Result<(Reply, Vec<u8>), QuicError> {
        let header = Bytes::copy_from_slice(&request.encode());
        self.exchange(request, &mut [header, payload], &mut [])
            .await
    }

    /// Send a request's chunks on a stream of its own and read the reply.
    async fn exchange(
        &self,
        request: &Request,
        chunks: &mut [Bytes],
        out: &mut [u8],
    ) -> Result<(Reply, Vec<u8>), QuicError> {
        let (mut send, mut recv) = self.open_stream().await?;
        match send.write_all_chunks(chunks).await {
            Ok(()) => send.finish()?,
            // A server refusing a request (stale epoch, bad header) answers at
            // once and stops reading; its reply is still waiting.
            Err(quinn::WriteError::Stopped(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let (reply, data) = read_reply_into(&mut recv, out).await?;
        if reply.request_id != request.request_id {
            return Err(QuicError::RequestIdMismatch {
                sent: request.request_id,
                received: reply.request_id,
            });
        }
        Ok((reply, data))
    }
}

/// Write one management frame and finish the stream.
pub async fn write_frame<T: Serialize>(
    send: &mut SendStream,
    message: &T,
) -> Result<(), QuicError> {
    send.write_all(&proto::encode_frame(message)?).await?;
    send.finish()?;
    Ok(())
}

/// Read one management frame; the size is checked before the buffer is allocated.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut RecvStream) -> Result<T, QuicError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await?;
    let mut body = vec![0u8; proto::frame_len(prefix)?];
    recv.read_exact(&mut body).await?;
    Ok(proto::decode_frame_body(&body)?)
}

/// Read and validate a data request header (the payload, if any, follows on `recv`).
pub async fn read_request(recv: &mut RecvStream) -> Result<Request, QuicError> {
    let mut header = [0u8; REQUEST_HEADER_LEN];
    recv.read_exact(&mut header).await?;
    Ok(proto::parse_request(&header)?.0)
}

/// Read a reply header and its payload, verifying the checksum.
pub async fn read_reply(recv: &mut RecvStream) -> Result<(Reply, Vec<u8>), QuicError> {
    read_reply_into(recv, &mut []).await
}

/// Read a reply; a successful one with exactly `out.len()` payload bytes
/// fills `out`, any other payload comes back as a vector.
async fn read_reply_into(
    recv: &mut RecvStream,
    out: &mut [u8],
) -> Result<(Reply, Vec<u8>), QuicError> {
    let mut header = [0u8; REPLY_HEADER_LEN];
    recv.read_exact(&mut header).await?;
    let (reply, _) = proto::parse_reply(&header)?;
    if reply.status == Status::Ok && !out.is_empty() && reply.payload_len() == out.len() {
        recv.read_exact(out).await?;
        reply.verify_payload(out)?;
        return Ok((reply, Vec::new()));
    }
    // Bounded by parse_reply: MAX_IO_LEN for data, MAX_ERROR_MESSAGE otherwise.
    let mut payload = vec![0u8; reply.payload_len()];
    recv.read_exact(&mut payload).await?;
    reply.verify_payload(&payload)?;
    Ok((reply, payload))
}

/// Write a reply header and payload and finish the stream.
pub async fn write_reply(
    send: &mut SendStream,
    reply: &Reply,
    payload: &[u8],
) -> Result<(), QuicError> {
    send.write_all(&reply.encode()).await?;
    send.write_all(payload).await?;
    send.finish()?;
    Ok(())
}

/// Serve one management stream: read the request, refuse it unless the peer's
/// role permits it, otherwise answer with `handler`. Every management service
/// goes through here, so the role policy ([`MgmtRequest::permits`]) is applied
/// in one place.
pub async fn serve_mgmt_stream<F, Fut>(
    peer: &PeerIdentity,
    mut send: SendStream,
    mut recv: RecvStream,
    handler: F,
) -> Result<(), QuicError>
where
    F: FnOnce(MgmtRequest) -> Fut,
    Fut: Future<Output = MgmtReply>,
{
    let reply = match read_frame::<MgmtRequest>(&mut recv).await {
        Ok(request) if request.permits(peer.role) => handler(request).await,
        Ok(request) => {
            if let Some(suppressed) = MALFORMED_MGMT.allow() {
                warn!(%peer, operation = request.operation(), suppressed, "refused: role not permitted");
            }
            MgmtReply::Refused(Refusal::Forbidden {
                role: peer.role,
                operation: request.operation().to_string(),
            })
        }
        Err(QuicError::Proto(e)) => {
            if let Some(suppressed) = MALFORMED_MGMT.allow() {
                warn!(%peer, error = %e, suppressed, "malformed management request");
            }
            MgmtReply::Refused(Refusal::BadRequest {
                reason: e.to_string(),
            })
        }
        Err(e) => return Err(e),
    };
    write_frame(&mut send, &reply).await
}

/// Reuses one connection per peer; many requests share it, each on its own stream.
#[derive(Debug, Clone)]
pub struct Connector {
    endpoint: Endpoint,
    alpn: Alpn,
    role: Role,
    /// Read on every request without a lock; replaced whole (copy on write)
    /// when a connection is added, which happens once per peer.
    connections: Arc<ArcSwap<HashMap<SocketAddr, PeerConnection>>>,
}

impl Connector {
    /// Connections over `alpn` to peers that must hold `role`.
    pub fn new(endpoint: Endpoint, alpn: Alpn, role: Role) -> Self {
        Connector {
            endpoint,
            alpn,
            role,
            connections: Arc::default(),
        }
    }

    /// The open connection to `addr`, or a new one.
    pub async fn get(&self, addr: SocketAddr, name: &str) -> Result<PeerConnection, QuicError> {
        if let Some(conn) = self.cached(addr, name) {
            return Ok(conn);
        }
        let fresh = self
            .endpoint
            .connect(addr, name, self.alpn, self.role)
            .await?;
        let mut kept = fresh.clone();
        self.connections.rcu(|current| {
            let mut next = HashMap::clone(current);
            // Another task may have connected meanwhile: keep one connection per peer.
            match current
                .get(&addr)
                .filter(|c| !c.is_closed() && c.peer.name == name)
            {
                Some(existing) => kept = existing.clone(),
                None => {
                    kept = fresh.clone();
                    next.insert(addr, fresh.clone());
                }
            }
            next
        });
        if kept.id() != fresh.id() {
            fresh.close();
        }
        Ok(kept)
    }

    /// Close and drop the connection to `addr` (its peer stopped answering),
    /// so that the next `get` dials afresh.
    pub fn forget(&self, addr: SocketAddr) {
        let mut dropped = None;
        self.connections.rcu(|current| {
            let mut next = HashMap::clone(current);
            dropped = next.remove(&addr);
            next
        });
        if let Some(conn) = dropped {
            conn.close();
        }
    }

    fn cached(&self, addr: SocketAddr, name: &str) -> Option<PeerConnection> {
        self.connections
            .load()
            .get(&addr)
            .filter(|c| !c.is_closed() && c.peer.name == name)
            .cloned()
    }
}
