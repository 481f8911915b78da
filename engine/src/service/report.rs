//! Membership: register with the management server, heartbeat, and apply the
//! map slices it answers with (so a server that was away catches up).

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

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
    // Back at once after a failure, then less often: a management server
    // that restarted is found within its first second.
    let mut retry = RETRY_FIRST;
    loop {
        match endpoint
            .connect(target.addr, &target.name, Alpn::Mgmt, Role::Mgmt)
            .await
        {
            Ok(conn) => {
                match session(&service, &conn, &target).await {
                    Err(SessionEnd::Failed(e)) => {
                        warn!(mgmt = %target.addr, error = %e, "lost the management server");
                    }
                    // It served us: the next failure is retried at once again.
                    Err(SessionEnd::AfterHeartbeats(e)) => {
                        warn!(mgmt = %target.addr, error = %e, "lost the management server");
                        retry = RETRY_FIRST;
                    }
                    Ok(()) => retry = RETRY_FIRST,
                }
                // A silent connection may still look open: the next session dials afresh.
                conn.close();
            }
            Err(QuicError::Connect(ConnectError::EndpointStopping)) => return,
            Err(e) => warn!(mgmt = %target.addr, error = %e, "cannot reach the management server"),
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(target.interval);
    }
}

/// The first pause before dialing the management server again.
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// How a session with the management server ended.
enum SessionEnd {
    /// Before any heartbeat was acknowledged.
    Failed(EngineError),
    /// After at least one.
    AfterHeartbeats(EngineError),
}

/// How long a heartbeat may take: one heartbeat interval (at least 0.5 s).
/// A management server killed without closing its connections leaves calls
/// hanging until QUIC's idle timeout; the lease, three intervals long, must
/// outlast a heartbeat that hangs, the pause and a new registration.
/// Heartbeats are answered without waiting for the management server's
/// owner loop, so they are quick when it is alive.
fn heartbeat_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_millis(500), Duration::from_secs(2))
}

/// How long a call the owner loop answers may take (registering, the mirror
/// report): it may be busy with a push for its push timeout (2 s).
const OWNER_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// One call, within `after`.
async fn call(
    conn: &PeerConnection,
    request: &MgmtRequest,
    after: Duration,
) -> Result<MgmtReply, EngineError> {
    match tokio::time::timeout(after, conn.mgmt(request)).await {
        Ok(reply) => Ok(reply?),
        Err(_) => Err(EngineError::MgmtSilent { after }),
    }
}

async fn session(
    service: &Service,
    conn: &PeerConnection,
    target: &ReportTarget,
) -> Result<(), SessionEnd> {
    let mut acknowledged = false;
    let result = heartbeats(service, conn, target, &mut acknowledged).await;
    result.map_err(|e| match acknowledged {
        true => SessionEnd::AfterHeartbeats(e),
        false => SessionEnd::Failed(e),
    })
}

/// Register, then heartbeat until a call fails; every heartbeat the
/// management server acknowledges renews the lease, counted from when it was
/// sent, once the maps it carried are applied.
async fn heartbeats(
    service: &Service,
    conn: &PeerConnection,
    target: &ReportTarget,
    acknowledged: &mut bool,
) -> Result<(), EngineError> {
    let (_, slots) = service.store.slot_usage();
    let slot_size = u64::from(service.store.superblock().geometry.slot_size);
    let register = MgmtRequest::Register {
        data_addr: target.advertise,
        capacity: slots * slot_size,
        incarnation: service.store.superblock().incarnation,
        boot: service.boot(),
    };
    let reply = call(conn, &register, OWNER_CALL_TIMEOUT).await?;
    let lease = match reply {
        MgmtReply::Registered { epoch, lease_ms } => {
            info!(mgmt = %target.addr, %epoch, lease_ms, "registered");
            Duration::from_millis(lease_ms)
        }
        other => {
            warn!(?other, "registration refused");
            return Ok(());
        }
    };
    // Three heartbeats to a lease: one lost or late answer does not end it.
    let interval = target
        .interval
        .min(lease / 3)
        .max(Duration::from_millis(10));
    let reporting = Rc::new(std::cell::Cell::new(false));
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
        let sent = Instant::now();
        match call(
            conn,
            &MgmtRequest::Heartbeat { held },
            heartbeat_timeout(interval),
        )
        .await?
        {
            MgmtReply::Maps { maps, dropped, .. } => {
                // The lease is renewed only once this server holds what the
                // management server holds: a server back from a partition
                // must not serve its old layout on a fresh lease.
                let mut current = true;
                for map in maps {
                    if let MgmtReply::Refused(refusal) = service.store.handle_push(&map).await {
                        warn!(volume = %map.id, %refusal, "map from heartbeat not applied");
                        current = false;
                    }
                    service.replication.map_changed(&service.store, map.id);
                }
                for id in dropped {
                    if let Err(e) = service.store.drop_volume(id).await {
                        warn!(volume = %id, error = %e, "cannot drop volume");
                    }
                }
                if current {
                    service.store.lease().renew(sent, lease);
                    *acknowledged = true;
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
        // A busy owner loop may take long to take the report: it goes in a
        // task of its own, one at a time, so the heartbeats (and the lease)
        // never wait for it.
        if !reporting.get() {
            reporting.set(true);
            let (conn, reporting) = (conn.clone(), reporting.clone());
            tokio_uring::spawn(async move {
                match call(&conn, &report, OWNER_CALL_TIMEOUT).await {
                    Ok(MgmtReply::Refused(refusal)) => debug!(%refusal, "mirror report refused"),
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "mirror report not taken"),
                }
                reporting.set(false);
            });
        }
        tokio::select! {
            () = tokio::time::sleep(interval.saturating_sub(sent.elapsed())) => {}
            () = service.refresh.notified() => {}
        }
    }
}
