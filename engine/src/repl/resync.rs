//! Resync: copying to a mirror the regions it may lack, at a limited rate.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_net::proto::{
    Forward, MgmtReply, MgmtRequest, MirrorState, Opcode, Partition, Replica, Request, VolumeId,
    VolumeMap,
};
use tracing::{debug, info, warn};

use super::MirrorKey;
use super::Replication;
use super::cleaner::tell_clean;
use super::forward::ForwardError;
use super::regions::RegionLocks;
use super::runs::{Cover, convert_runs, merge_runs, runs_of};
use crate::disk::io::BlockDevice;
use crate::store::Store;
use crate::store::{ReadPiece, Volume};

/// Regions copied between two cleaning steps of a resync.
const RESYNC_BATCH: usize = 64;

/// Progress of one running resync.
#[derive(Debug)]
pub(super) struct Resync {
    pub(super) total: Cell<u64>,
    pub(super) copied: Cell<u64>,
    pub(super) started: Instant,
}

/// Start the resyncs that are due: mirrors being resynced, and in-sync
/// mirrors with regions to copy or bits to ask for.
pub(super) fn schedule<D: BlockDevice + 'static>(store: &Rc<Store<D>>, repl: &Rc<Replication>) {
    for (volume, p, range) in repl.led(store) {
        for peer in p.replicas.iter().skip(1) {
            let key = (volume.id, peer.server.clone(), p.first_page);
            let pending = repl.state(|s| {
                s.owes_any_in(volume.id, &peer.server, range.clone()) || s.probing(&key)
            });
            let due = peer.state == MirrorState::Resyncing
                || (peer.state == MirrorState::InSync && pending);
            if due && !repl.resyncs.borrow().contains_key(&key) {
                let resync = Rc::new(Resync {
                    total: Cell::new(0),
                    copied: Cell::new(0),
                    started: Instant::now(),
                });
                repl.resyncs
                    .borrow_mut()
                    .insert(key.clone(), resync.clone());
                let (store, repl) = (store.clone(), repl.clone());
                tokio_uring::spawn(async move {
                    resync_partition(&store, &repl, &key, &resync).await;
                    repl.resyncs.borrow_mut().remove(&key);
                });
            }
        }
    }
}

/// The current map, if this server still leads partition `first_page` and
/// `peer` still is a mirror of it that is not out of sync.
fn still_leading<D: BlockDevice>(
    store: &Store<D>,
    repl: &Replication,
    volume: VolumeId,
    first_page: u64,
    peer: &str,
) -> Option<(Rc<Volume>, Rc<VolumeMap>, Partition, Replica)> {
    let v = store.volume(volume)?;
    let map = v.map()?;
    let p = map.partition_starting_at(first_page)?.clone();
    if !repl.leads(&p) {
        return None;
    }
    let r = p
        .replicas
        .iter()
        .skip(1)
        .find(|r| r.server == peer)?
        .clone();
    if r.state == MirrorState::OutOfSync {
        return None;
    }
    Some((v, map, p, r))
}

/// Copy to `peer` every region it may lack in one partition.
async fn resync_partition<D: BlockDevice>(
    store: &Store<D>,
    repl: &Replication,
    key: &MirrorKey,
    progress: &Resync,
) {
    let (volume_id, peer_name, first_page) = (key.0, key.1.as_str(), key.2);
    let Some((_, map, partition, peer)) =
        still_leading(store, repl, volume_id, first_page, peer_name)
    else {
        return;
    };
    let resyncing = peer.state == MirrorState::Resyncing;
    let range = repl.partition_regions(&map, &partition);
    let mut todo = runs_of(repl.state(|s| s.owed_in(volume_id, peer_name, range.clone())));
    let probing = repl.state(|s| s.probing(key));
    if resyncing || probing {
        // Ours for the mirror (while it was away), and the mirror's for us
        // or for itself (writes that reached it only; what a wiped disk lacks).
        if resyncing {
            todo.extend(runs_of(
                store
                    .dirty_regions(volume_id, peer_name)
                    .into_iter()
                    .filter(|r| range.contains(r)),
            ));
        }
        let ask = MgmtRequest::DirtyRegions {
            volume: volume_id,
            peer: repl.me.clone(),
        };
        match repl.call_peer(&peer, &ask).await {
            Ok(MgmtReply::Regions {
                all,
                regions,
                region_size,
            }) => {
                if all {
                    todo.push(range.clone());
                } else {
                    todo.extend(convert_runs(
                        &regions,
                        region_size,
                        repl.region_size,
                        &range,
                        Cover::Touching,
                    ));
                }
                repl.state(|s| s.probed(key));
            }
            other => {
                debug!(
                    peer = peer_name,
                    ?other,
                    "cannot fetch the mirror's bits; retrying later"
                );
                return;
            }
        }
    }
    let todo = merge_runs(todo);
    let total: u64 = todo.iter().map(|r| r.end - r.start).sum();
    progress.total.set(total);
    if total == 0 && !resyncing {
        return;
    }
    info!(volume = %volume_id, mirror = peer_name, first_page, regions = total, "resync started");
    let started = Instant::now();
    let mut copied_bytes = 0u64;
    let mut regions = todo.into_iter().flatten().peekable();
    while regions.peek().is_some() {
        let _watch = repl.watch();
        let mut copied = Vec::with_capacity(RESYNC_BATCH);
        for region in regions.by_ref().take(RESYNC_BATCH) {
            // Rate limit: never ahead of the configured bytes per second.
            let due = Duration::from_secs_f64(
                copied_bytes as f64 / repl.settings.resync_rate.max(1) as f64,
            );
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            match copy_region(store, repl, volume_id, first_page, peer_name, region).await {
                Ok((bytes, stamp)) => {
                    copied_bytes += bytes;
                    repl.state(|s| s.resynced(bytes));
                    progress.copied.set(progress.copied.get() + 1);
                    copied.push((region, stamp));
                }
                Err(ForwardError::Behind(epoch)) => {
                    debug!(volume = %volume_id, mirror = peer_name, %epoch, "resync paused: an epoch change is under way");
                    return;
                }
                Err(reason) => {
                    warn!(volume = %volume_id, mirror = peer_name, region, %reason, "resync stopped");
                    if let Some((v, _, _, _)) =
                        still_leading(store, repl, volume_id, first_page, peer_name)
                    {
                        let _ = repl
                            .mirror_failed(volume_id, v.epoch(), first_page, peer_name)
                            .await;
                    }
                    return;
                }
            }
        }
        if !finish_batch(store, repl, key, &copied).await {
            return;
        }
    }
    if resyncing {
        report_resync_done(store, repl, volume_id, first_page, peer_name).await;
    }
    info!(volume = %volume_id, mirror = peer_name, first_page, bytes = copied_bytes, secs = started.elapsed().as_secs_f64(), "resync finished");
}

/// Copy one region (its part inside the partition) to `peer`; returns the
/// bytes copied and the region's write stamp at the copy (`None` if a write
/// was waiting on it: then its bits must not clear).
async fn copy_region<D: BlockDevice>(
    store: &Store<D>,
    repl: &Replication,
    volume_id: VolumeId,
    first_page: u64,
    peer_name: &str,
    region: u64,
) -> Result<(u64, Option<u64>), ForwardError> {
    let (volume, map, partition, peer) =
        still_leading(store, repl, volume_id, first_page, peer_name)
            .ok_or(ForwardError::NotLeading)?;
    let _gate = volume.hold().await;
    let locks = RegionLocks::new(repl, volume_id, region..region + 1);
    let _exclusive = locks.locks[0].write().await;
    let page = u64::from(map.page_size);
    let start = (region * repl.region_size).max(partition.first_page * page);
    let end = ((region + 1) * repl.region_size)
        .min(partition.end_page * page)
        .min(volume.record().size);
    let stamp = repl.quiet(volume_id, region);
    if start >= end {
        return Ok((0, stamp));
    }
    let len = (end - start) as u32;
    let pieces = store
        .read(&volume, start, len)
        .await
        .map_err(|r| ForwardError::LocalRead(r.reason.to_string()))?;
    let zero = pieces.iter().all(|piece| match piece {
        ReadPiece::Data(buf) => buf.iter().all(|b| *b == 0),
        ReadPiece::Zeroes(_) => true,
    });
    let mut data = Vec::new();
    let request = if zero {
        Request::new(
            Opcode::WriteZeroes,
            volume_id,
            volume.epoch(),
            start,
            len,
            0,
        )
    } else {
        for piece in &pieces {
            match piece {
                ReadPiece::Data(buf) => data.extend_from_slice(buf),
                ReadPiece::Zeroes(n) => data.resize(data.len() + n, 0),
            }
        }
        Request::write(volume_id, volume.epoch(), start, &data, 0)
            .map_err(ForwardError::InvalidCopy)?
    };
    repl.forward(
        (volume_id, first_page),
        &peer,
        &request,
        Forward::Resync,
        Bytes::from(data),
    )
    .await?;
    Ok((u64::from(len), stamp))
}

/// After a batch: flush the mirror, then clear the bits of the copied
/// regions that no write touched since, here and on the other replicas.
/// False if the mirror is gone.
async fn finish_batch<D: BlockDevice>(
    store: &Store<D>,
    repl: &Replication,
    key: &MirrorKey,
    copied: &[(u64, Option<u64>)],
) -> bool {
    let (volume_id, peer_name, first_page) = (key.0, key.1.as_str(), key.2);
    let Some((volume, _, partition, peer)) =
        still_leading(store, repl, volume_id, first_page, peer_name)
    else {
        return false;
    };
    let epoch = volume.epoch();
    let flush = Request::new(Opcode::Flush, volume_id, epoch, 0, 0, 0);
    if let Err(reason) = repl
        .forward(
            (volume_id, first_page),
            &peer,
            &flush,
            Forward::Client,
            Bytes::new(),
        )
        .await
    {
        warn!(mirror = peer_name, %reason, "flush after resync batch failed");
        return false;
    }
    // The copy paid the debt only where no write came after it.
    let clean: Vec<u64> = copied
        .iter()
        .filter_map(|(r, stamp)| Some((*r, (*stamp)?)))
        .filter(|(r, stamp)| repl.quiet(volume_id, *r) == Some(*stamp))
        .map(|(r, _)| r)
        .collect();
    repl.state(|s| s.paid(volume_id, peer_name, &clean));
    if let Err(e) = store.clear_dirty(volume_id, peer_name, &clean).await {
        warn!(error = %e, "cannot clear bits after resync");
        return false;
    }
    let holders = [repl.me.clone(), peer_name.to_string()];
    tell_clean(repl, volume_id, epoch, &partition, &holders, &clean).await;
    true
}

/// Tell the management server the mirror is in sync; retried until it is
/// recorded or the map moves on.
async fn report_resync_done<D: BlockDevice>(
    store: &Store<D>,
    repl: &Replication,
    volume_id: VolumeId,
    first_page: u64,
    peer: &str,
) {
    for attempt in 0..20u32 {
        let Some((volume, _, _, r)) = still_leading(store, repl, volume_id, first_page, peer)
        else {
            return;
        };
        if r.state != MirrorState::Resyncing {
            return;
        }
        let request = MgmtRequest::ResyncDone {
            volume: volume_id,
            epoch: volume.epoch(),
            first_page,
            server: peer.to_string(),
        };
        match repl.call_mgmt(&request).await {
            Ok(MgmtReply::Applied { .. }) => return,
            other => debug!(attempt, ?other, "resync completion not recorded yet"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
