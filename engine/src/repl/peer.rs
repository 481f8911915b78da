//! Management calls to peers and the management server, and the peer
//! requests a storage server answers (`DirtyRegions`, `Clean`).

use std::net::SocketAddr;
use std::time::Duration;

use tessera_net::proto::{
    Epoch, EpochVerdict, MgmtReply, MgmtRequest, Refusal as MgmtRefusal, Replica, VolumeId,
    region_runs,
};
use tessera_net::quic::{Connector, PeerIdentity};

use super::Replication;
use super::runs::{Cover, MAX_REGION_RUNS, coarsen, convert_runs};
use crate::disk::io::BlockDevice;
use crate::store::Store;

impl Replication {
    pub(super) async fn call_mgmt(&self, request: &MgmtRequest) -> Result<MgmtReply, CallError> {
        let (addr, name) = self.settings.mgmt.as_ref().ok_or(CallError::NoManagement)?;
        call(&self.mgmt, *addr, name, Duration::from_secs(10), request).await
    }

    pub(super) async fn call_peer(
        &self,
        peer: &Replica,
        request: &MgmtRequest,
    ) -> Result<MgmtReply, CallError> {
        let timeout = self.settings.forward_timeout * 2;
        call(&self.peers, peer.addr, &peer.server, timeout, request).await
    }
}

/// Why a management request to a peer or the management server got no reply.
#[derive(Debug, thiserror::Error)]
pub(super) enum CallError {
    /// The server runs without a management server.
    #[error("no management server configured")]
    NoManagement,
    /// Connecting or the exchange failed.
    #[error("{name}: {error}")]
    Transport {
        name: String,
        error: tessera_net::quic::QuicError,
    },
    /// No reply within the call's timeout.
    #[error("{name} did not answer within {timeout:?}")]
    Timeout { name: String, timeout: Duration },
}

/// One management request over `connector`, within `timeout`; a connection
/// that failed or went silent is dropped so that the next call dials afresh.
async fn call(
    connector: &Connector,
    addr: SocketAddr,
    name: &str,
    timeout: Duration,
    request: &MgmtRequest,
) -> Result<MgmtReply, CallError> {
    let reply = tokio::time::timeout(timeout, async {
        let conn = connector.get(addr, name).await?;
        conn.mgmt(request).await
    })
    .await;
    match reply {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(error)) => {
            connector.forget(addr);
            Err(CallError::Transport {
                name: name.to_string(),
                error,
            })
        }
        Err(_) => {
            connector.forget(addr);
            Err(CallError::Timeout {
                name: name.to_string(),
                timeout,
            })
        }
    }
}

/// The management-protocol requests storage servers send each other.
pub async fn handle_peer_request<D: BlockDevice>(
    store: &Store<D>,
    repl: &Replication,
    sender: &PeerIdentity,
    request: MgmtRequest,
) -> MgmtReply {
    match request {
        MgmtRequest::DirtyRegions { volume, peer } => {
            let all = store.volume(volume).is_none_or(|v| v.needs_full_copy());
            // What `peer` may lack of ours, and what this replica itself lacks.
            let mut regions = store.dirty_regions(volume, &peer);
            regions.extend(store.dirty_regions(volume, &repl.me));
            regions.sort_unstable();
            regions.dedup();
            MgmtReply::Regions {
                all,
                regions: coarsen(region_runs(&regions), MAX_REGION_RUNS),
                region_size: repl.region_size(),
            }
        }
        MgmtRequest::Clean {
            volume,
            epoch,
            first_page,
            peers,
            regions,
            region_size,
        } => match clean_for(
            store,
            repl,
            sender,
            volume,
            epoch,
            first_page,
            &peers,
            &regions,
            region_size,
        )
        .await
        {
            Ok(()) => MgmtReply::Applied { epoch },
            Err(refusal) => MgmtReply::Refused(refusal),
        },
        other => MgmtReply::Refused(MgmtRefusal::Invalid {
            reason: format!("a storage server does not serve {}", other.operation()),
        }),
    }
}

/// Apply a `Clean` from `sender`: only from the partition's primary, at the
/// volume's current epoch (under its gate), and only inside the partition.
#[allow(clippy::too_many_arguments)]
async fn clean_for<D: BlockDevice>(
    store: &Store<D>,
    repl: &Replication,
    sender: &PeerIdentity,
    volume: VolumeId,
    epoch: Epoch,
    first_page: u64,
    peers: &[String],
    regions: &[(u64, u64)],
    region_size: u32,
) -> Result<(), MgmtRefusal> {
    let held = store.volume(volume).ok_or_else(|| MgmtRefusal::NotFound {
        kind: "volume".into(),
        name: volume.to_string(),
    })?;
    let _gate = held.hold().await;
    if !EpochVerdict::judge(held.epoch(), epoch).is_current() {
        return Err(MgmtRefusal::StaleEpoch {
            request: epoch,
            current: held.epoch(),
        });
    }
    let map = held.map().ok_or_else(|| MgmtRefusal::Unavailable {
        reason: "no map yet".into(),
    })?;
    let partition = map
        .partition_starting_at(first_page)
        .filter(|p| p.replicas.first().is_some_and(|r| r.server == sender.name))
        .ok_or_else(|| MgmtRefusal::Invalid {
            reason: format!("{} is not the primary of pages {first_page}..", sender.name),
        })?;
    // Ours wholly inside the sender's regions and inside the partition: a
    // region shared with a neighbour partition keeps its bits.
    let page = u64::from(map.page_size);
    let start = first_page.saturating_mul(page);
    let end = partition.end_page.saturating_mul(page).min(map.size);
    let limit = start.div_ceil(repl.region_size)..end / repl.region_size;
    let mine = convert_runs(
        regions,
        region_size,
        repl.region_size,
        &limit,
        Cover::Inside,
    );
    // Bits under this server's own name are what it lacks itself.
    for peer in peers {
        store
            .clear_dirty_runs(volume, peer, &mine)
            .await
            .map_err(|e| MgmtRefusal::Unavailable {
                reason: e.to_string(),
            })?;
    }
    Ok(())
}
