//! The storage service: QUIC connections, dispatch to the data and
//! management handlers, and [`run`], a whole storage server in-process.

mod data;
pub mod metrics;
mod mgmt;
pub mod report;
mod sessions;

use std::io::Write;
use std::rc::Rc;

use tessera_net::proto::BLOCK_SIZE;
use tessera_net::quic::{Alpn, Endpoint, PeerConnection, TlsIdentity, serve_mgmt_stream};
use tracing::{debug, info};

use crate::config::StorageConfig;
use crate::disk::io::AnyDevice;
use crate::error::EngineError;
use crate::repl::{self, Replication};
use crate::service::metrics::Metrics;
use crate::store::Store;
use crate::store::open::{FormatPolicy, open_store};
use data::serve_data_stream;
use mgmt::serve_mgmt_request;

/// The storage service: the store, and a signal to the report loop that a
/// client knows a newer epoch than this server (so its map is out of date).
#[derive(Debug)]
pub struct Service {
    pub store: Rc<Store<AnyDevice>>,
    pub replication: Rc<Replication>,
    pub refresh: tokio::sync::Notify,
    /// Counters for `GET /metrics`.
    pub metrics: Metrics,
    /// Payload bytes in memory across all requests, in blocks: taken before
    /// a buffer is allocated, so many headers without payloads cannot
    /// exhaust memory; requests over the budget wait.
    budget: tokio::sync::Semaphore,
    /// Random per process start: a PING of volume 0 answers with it, so a
    /// client can tell this process from the one before a restart.
    boot: u64,
    /// Per client session, the writes it has sent: each is taken once.
    sessions: sessions::Sessions,
}

/// Payload memory all requests together may hold.
const IO_BUDGET: usize = 256 << 20;
impl Service {
    /// Random per start of this process (see [`MgmtRequest::Register`]).
    pub fn boot(&self) -> u64 {
        self.boot
    }

    pub fn new(store: Store<AnyDevice>, replication: Replication) -> Self {
        Service {
            store: Rc::new(store),
            replication: Rc::new(replication),
            refresh: tokio::sync::Notify::new(),
            metrics: Metrics::default(),
            budget: tokio::sync::Semaphore::new(IO_BUDGET / BLOCK_SIZE as usize),
            boot: rand::random::<u64>().max(1),
            sessions: sessions::Sessions::default(),
        }
    }
}

/// Serve on `endpoint` until it is closed.
pub async fn serve(service: Rc<Service>, endpoint: Endpoint) {
    while let Some(handshake) = endpoint.accept().await {
        let store = service.clone();
        tokio_uring::spawn(async move {
            // A refusal is logged by `finish`.
            if let Ok(conn) = handshake.finish().await {
                debug!(peer = %conn.peer(), remote = %conn.remote_address(), alpn = ?conn.alpn(), "connected");
                serve_connection(store, conn).await;
            }
        });
    }
}

async fn serve_connection(service: Rc<Service>, conn: PeerConnection) {
    while let Some((send, recv)) = conn.accept_stream().await {
        let service = service.clone();
        let peer = conn.peer().clone();
        match conn.alpn() {
            Alpn::Data => {
                tokio_uring::spawn(serve_data_stream(service, peer, send, recv));
            }
            Alpn::Mgmt => {
                tokio_uring::spawn(async move {
                    let sender = peer.clone();
                    let handled = serve_mgmt_stream(&peer, send, recv, |request| {
                        serve_mgmt_request(&service, &sender, request)
                    })
                    .await;
                    if let Err(e) = handled {
                        debug!(%peer, error = %e, "management stream failed");
                    }
                });
            }
        }
    }
}

/// Print a line scripts and tests wait for (`tessera storage NAME WHAT
/// ADDR`), then flush stdout. A reader that has gone away is no error.
pub fn announce(name: &str, what: &str, addr: std::net::SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "tessera storage {name} {what} {addr}");
    let _ = out.flush();
}

/// Run a storage server for `config` until `shutdown` completes: bind its
/// sockets, open (or format) its data file, serve, replicate, report to the
/// management server, then flush. Must run inside a tokio-uring runtime;
/// prints `tessera storage NAME serving on ADDR` once it serves.
pub async fn run(
    config: &StorageConfig,
    identity: &TlsIdentity,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EngineError> {
    // Sockets first: a start that fails on them creates no data file.
    let endpoint = Endpoint::bind(config.listen, identity, &config.transport, &Alpn::ALL).map_err(
        |error| EngineError::ServeData {
            addr: config.listen,
            error,
        },
    )?;
    let metrics_listener = match config.metrics_listen {
        Some(listen) => Some(
            tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|error| EngineError::ServeMetrics {
                    addr: listen,
                    error,
                })?,
        ),
        None => None,
    };
    let store = open_store(config, identity, FormatPolicy::IfBlank).await?;
    if config.mgmt.is_some() {
        store.lease().require();
    }
    let replication = Replication::new(
        identity.me().name.clone(),
        store.superblock().geometry.region_size,
        &endpoint,
        repl::ReplicationSettings {
            forward_timeout: std::time::Duration::from_millis(config.forward_timeout_ms),
            resync_rate: config.resync_rate.0,
            clean_interval: std::time::Duration::from_millis(config.clean_interval_ms),
            clean_after: std::time::Duration::from_millis(config.clean_after_ms),
            mgmt: config.mgmt.map(|addr| (addr, config.mgmt_name.clone())),
        },
    );
    let service = Rc::new(Service::new(store, replication));
    let addr = endpoint.local_addr()?;
    let name = &identity.me().name;
    info!(%name, %addr, data = %config.data.display(), "serving");
    announce(name, "serving on", addr);
    if let Some(listener) = metrics_listener {
        let bound = listener
            .local_addr()
            .map_err(|error| EngineError::ServeMetrics {
                addr: config.metrics_listen.unwrap_or(addr),
                error,
            })?;
        info!(addr = %bound, "metrics at http://{bound}/metrics");
        // After the "serving on" line, which scripts wait for first.
        announce(name, "metrics on", bound);
        tokio_uring::spawn(metrics::serve_metrics(service.clone(), listener));
    }
    tokio_uring::spawn(serve(service.clone(), endpoint.clone()));
    tokio_uring::spawn(repl::replication_loop(
        service.store.clone(),
        service.replication.clone(),
    ));
    if let Some(mgmt) = config.mgmt {
        let target = report::ReportTarget {
            addr: mgmt,
            name: config.mgmt_name.clone(),
            advertise: config.advertise.unwrap_or(addr),
            interval: std::time::Duration::from_millis(config.heartbeat_ms),
        };
        tokio_uring::spawn(report::report_loop(
            service.clone(),
            endpoint.clone(),
            target,
        ));
    }
    shutdown.await;
    info!("shutting down");
    endpoint.close();
    service.store.flush().await
}
