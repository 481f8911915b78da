//! Membership: register with the management server, heartbeat, and apply the
//! map slices it answers with (so a server that was away catches up).

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tessera_net::proto::{Epoch, MgmtReply, MgmtRequest, Role};
use tessera_net::quic::{Alpn, ConnectError, Endpoint, PeerConnection, QuicError};
use tracing::{debug, info, warn};

use crate::error::EngineError;
use crate::service::Service;

/// Where the management server is and how often to report.
#[derive(Debug, Clone)]
pub struct ReportTarget {
    pub addr: SocketAddr,
    /// The management server's certificate name.
    pub name: String,
    /// The data address clients should dial.
    pub advertise: SocketAddr,
    pub interval: Duration,
}

/// Register, then heartbeat every `interval` (or at once when a client shows
/// a newer epoch) until the endpoint closes; reconnects after failures.
pub async fn report_loop(service: Rc<Service>, endpoint: Endpoint, target: ReportTarget) {
    loop {
        match endpoint
            .connect(target.addr, &target.name, Alpn::Mgmt, Role::Mgmt)
            .await
        {
            Ok(conn) => {
                if let Err(e) = session(&service, &conn, &target).await {
                    warn!(mgmt = %target.addr, error = %e, "lost the management server");
                }
                // A silent connection may still look open: the next session dials afresh.
                conn.close();
            }
            Err(QuicError::Connect(ConnectError::EndpointStopping)) => return,
            Err(e) => warn!(mgmt = %target.addr, error = %e, "cannot reach the management server"),
        }
        tokio::time::sleep(target.interval).await;
    }
}

/// How long one call to the management server may take. A management server
/// killed without closing its connections leaves calls hanging until QUIC's
/// idle timeout; a restarted one marks down only servers silent for its
/// heartbeat timeout (5 s by default), so they must reconnect well before.
fn call_timeout(interval: Duration) -> Duration {
    (2 * interval).clamp(Duration::from_secs(1), Duration::from_secs(2))
}

/// One call, within `call_timeout`.
async fn call(
    conn: &PeerConnection,
    request: &MgmtRequest,
    interval: Duration,
) -> Result<MgmtReply, EngineError> {
    let after = call_timeout(interval);
    match tokio::time::timeout(after, conn.mgmt(request)).await {
        Ok(reply) => Ok(reply?),
        Err(_) => Err(EngineError::MgmtSilent { after }),
    }
}

async fn session(
    service: &Service,
    conn: &PeerConnection,
    target: &ReportTarget,
) -> Result<(), EngineError> {
    let (_, slots) = service.store.slot_usage();
    let slot_size = u64::from(service.store.superblock().geometry.slot_size);
    let register = MgmtRequest::Register {
        data_addr: target.advertise,
        capacity: slots * slot_size,
        incarnation: service.store.superblock().incarnation,
        boot: service.boot(),
    };
    let reply = call(conn, &register, target.interval).await?;
    match reply {
        MgmtReply::Registered { epoch } => info!(mgmt = %target.addr, %epoch, "registered"),
        other => warn!(?other, "registration refused"),
    }
    loop {
        // A volume whose map is not known yet (after a restart) is reported
        // at epoch 0, so the answer carries its map.
        let held = service
            .store
            .volumes()
            .iter()
            .map(|v| {
                (
                    v.id,
                    if v.map().is_some() {
                        v.epoch()
                    } else {
                        Epoch(0)
                    },
                )
            })
            .collect();
        match call(conn, &MgmtRequest::Heartbeat { held }, target.interval).await? {
            MgmtReply::Maps { maps, dropped, .. } => {
                for map in maps {
                    if let MgmtReply::Refused(refusal) = service.store.handle_push(&map).await {
                        warn!(volume = %map.id, %refusal, "map from heartbeat not applied");
                    }
                    service.replication.map_changed(&service.store, map.id);
                }
                for id in dropped {
                    if let Err(e) = service.store.drop_volume(id).await {
                        warn!(volume = %id, error = %e, "cannot drop volume");
                    }
                }
            }
            MgmtReply::Refused(refusal) => {
                warn!(%refusal, "heartbeat refused; registering again");
                return Ok(());
            }
            other => warn!(?other, "unexpected heartbeat reply"),
        }
        let report = MgmtRequest::ReportMirrors {
            mirrors: service.replication.reports(&service.store),
            resynced_bytes: service.replication.resynced_bytes(),
        };
        if let MgmtReply::Refused(refusal) = call(conn, &report, target.interval).await? {
            debug!(%refusal, "mirror report refused");
        }
        tokio::select! {
            () = tokio::time::sleep(target.interval) => {}
            () = service.refresh.notified() => {}
        }
    }
}
