//! The cleaner: clears bits of regions that are on every in-sync mirror and flushed there.

use bytes::Bytes;
use futures_util::future::join_all;
use tessera_net::proto::{
    Epoch, Forward, MgmtReply, MgmtRequest, MirrorState, Opcode, Partition, Request, VolumeId,
    region_runs,
};
use tracing::{debug, warn};

use super::Replication;
use crate::disk::io::BlockDevice;
use crate::store::Store;

/// Whether `region` may be cleared for `peer`: quiet since `stamp`, and not
/// owed a copy.
fn clearable(repl: &Replication, volume: VolumeId, peer: &str, region: u64, stamp: u64) -> bool {
    repl.quiet(volume, region) == Some(stamp) && !repl.state(|s| s.owes(volume, peer, region))
}

/// One cleaning pass: flush here and on the mirrors, then clear the bits of
/// regions that no write touched meanwhile, here and on the mirrors.
pub(super) async fn clean<D: BlockDevice>(store: &Store<D>, repl: &Replication) {
    repl.next_pass();
    let _watch = repl.watch();
    let mut work = Vec::new();
    for (volume, p, range) in repl.led(store) {
        for peer in p.replicas.iter().skip(1) {
            // Only in-sync mirrors: a resyncing one may still lack regions
            // whose bits are set (its resync clears them as it copies).
            if peer.state != MirrorState::InSync
                || repl.written_off(volume.id, &peer.server, p.first_page)
            {
                continue;
            }
            let mut snapshot = Vec::new();
            for r in store.dirty_regions(volume.id, &peer.server) {
                if !range.contains(&r) {
                    continue;
                }
                // Recently written regions keep their bits: the next write
                // would only set them again, at the cost of a metadata write.
                if !repl.region_cold(volume.id, r) {
                    continue;
                }
                if let Some(stamp) = repl.quiet(volume.id, r) {
                    snapshot.push((r, stamp));
                }
            }
            if !snapshot.is_empty() {
                work.push((volume.clone(), p.clone(), peer.clone(), snapshot));
            }
        }
    }
    if work.is_empty() {
        return;
    }
    if let Err(e) = store.flush().await {
        warn!(error = %e, "flush before cleaning bits failed");
        return;
    }
    for (volume, partition, peer, snapshot) in work {
        let epoch = volume.epoch();
        let flush = Request::new(Opcode::Flush, volume.id, epoch, 0, 0, 0);
        let key = (volume.id, partition.first_page);
        if repl
            .forward(key, &peer, &flush, Forward::Client, Bytes::new())
            .await
            .is_err()
        {
            continue;
        }
        let clean: Vec<u64> = snapshot
            .iter()
            .filter(|(r, stamp)| clearable(repl, volume.id, &peer.server, *r, *stamp))
            .map(|(r, _)| *r)
            .collect();
        if clean.is_empty() {
            continue;
        }
        if let Err(e) = store.clear_dirty(volume.id, &peer.server, &clean).await {
            warn!(error = %e, "cannot clear bits");
            continue;
        }
        let holders = [repl.me.clone(), peer.server.clone()];
        tell_clean(repl, volume.id, epoch, &partition, &holders, &clean).await;
    }
}

/// Tell the other replicas of `partition` that `regions` are equal on `holders`.
pub(super) async fn tell_clean(
    repl: &Replication,
    volume: VolumeId,
    epoch: Epoch,
    partition: &Partition,
    holders: &[String],
    regions: &[u64],
) {
    let request = MgmtRequest::Clean {
        volume,
        epoch,
        first_page: partition.first_page,
        peers: holders.to_vec(),
        regions: region_runs(regions),
        region_size: repl.region_size(),
    };
    let others = partition
        .replicas
        .iter()
        .filter(|r| r.server != repl.me && r.state != MirrorState::OutOfSync);
    let sent =
        join_all(others.map(|r| async { (r.server.clone(), repl.call_peer(r, &request).await) }))
            .await;
    for (server, reply) in sent {
        if !matches!(reply, Ok(MgmtReply::Applied { .. })) {
            debug!(peer = %server, ?reply, "clean not applied; its bits stay set");
        }
    }
}
