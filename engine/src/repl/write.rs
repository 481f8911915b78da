//! The write path: a primary's write and flush, and a mirror's write.

use bytes::Bytes;
use futures_util::future::join_all;
use tessera_net::proto::{FLAG_RESYNC, Forward, MirrorState, Opcode, Replica, Request};
use tracing::warn;

use super::Replication;
use super::forward::settle;
use super::regions::RegionLocks;
use crate::disk::aligned::AlignedBuf;
use crate::disk::io::BlockDevice;
use crate::store::Store;
use crate::store::{Admission, Part, Refusal, Refused, Volume};

/// Execute an admitted write, trim or write-zeroes as the partition's
/// primary: intent bits, local I/O and forwarding in parallel. The epoch
/// gate (`admission`) is let go once the I/O is done: waiting for the
/// management server to record a lost mirror must not hold up a map push.
pub async fn primary_write<D: BlockDevice>(
    store: &Store<D>,
    repl: &Replication,
    volume: &Volume,
    admission: Admission<'_>,
    request: &Request,
    payload: Option<AlignedBuf>,
) -> Result<(), Refusal> {
    let epoch = admission.epoch;
    let Some(partition) = admission.partition(Part::Primary) else {
        return Err(Refusal::new(epoch, Refused::NotAdmittedAsPrimary));
    };
    let first_page = partition.first_page;
    let peers: Vec<&Replica> = partition.replicas.iter().skip(1).collect();
    if peers.is_empty() {
        return apply_local(store, volume, request, payload).await;
    }
    let regions = repl.regions_of(request.offset, u64::from(request.length));
    let in_flight = repl.begin(volume.id, regions.clone());
    let locks = RegionLocks::new(repl, volume.id, regions.clone());
    let mut guards = Vec::with_capacity(locks.locks.len());
    for lock in &locks.locks {
        guards.push(lock.read().await);
    }
    let names: Vec<&str> = peers.iter().map(|r| r.server.as_str()).collect();
    store
        .mark_dirty(volume.id, &names, regions.clone())
        .await
        .map_err(|e| io_refusal(volume, &e))?;
    let (targets, skipped): (Vec<&Replica>, Vec<&Replica>) = peers.iter().copied().partition(|r| {
        r.state != MirrorState::OutOfSync && !repl.written_off(volume.id, &r.server, first_page)
    });
    // The local write owns the aligned buffer; the forwards share one copy.
    let bytes = match &payload {
        Some(p) if !targets.is_empty() => Bytes::copy_from_slice(p),
        _ => Bytes::new(),
    };
    let local = apply_local(store, volume, request, payload);
    let remote = join_all(targets.iter().map(|t| {
        repl.forward(
            (volume.id, first_page),
            t,
            request,
            Forward::Client,
            bytes.clone(),
        )
    }));
    let (local, remote) = futures_util::future::join(local, remote).await;
    // Replicas that did not take the write get this region copied before its
    // bits may clear (all of them, with our version, if ours failed).
    let missed = targets
        .iter()
        .zip(&remote)
        .filter(|(_, outcome)| local.is_err() || outcome.is_err())
        .map(|(t, _)| *t)
        .chain(skipped);
    for replica in missed {
        repl.owe(volume.id, &replica.server, regions.clone());
    }
    drop(guards);
    drop(locks);
    drop(in_flight);
    drop(admission);
    let pages = [first_page];
    let outcomes = targets.iter().zip(remote).map(|(t, o)| (*t, &pages[..], o));
    settle(repl, volume.id, epoch, outcomes).await?;
    local
}

/// FLUSH as a primary: locally and on every mirror this server forwards to.
pub async fn primary_flush<D: BlockDevice>(
    store: &Store<D>,
    repl: &Replication,
    volume: &Volume,
    admission: Admission<'_>,
) -> Result<(), Refusal> {
    let epoch = admission.epoch;
    // Each mirror once, with every partition it mirrors for us (a failure
    // is reported for each of them).
    let mut targets: Vec<(Replica, Vec<u64>)> = Vec::new();
    if let Some(map) = admission.placement.map() {
        for p in map.partitions.iter().filter(|p| repl.leads(p)) {
            for r in p.replicas.iter().skip(1) {
                if r.state == MirrorState::OutOfSync
                    || repl.written_off(volume.id, &r.server, p.first_page)
                {
                    continue;
                }
                match targets.iter_mut().find(|(t, _)| t.server == r.server) {
                    Some((_, pages)) => pages.push(p.first_page),
                    None => targets.push((r.clone(), vec![p.first_page])),
                }
            }
        }
    }
    let request = Request::new(Opcode::Flush, volume.id, epoch, 0, 0, 0);
    let local = store.flush();
    let remote = join_all(targets.iter().map(|(t, pages)| {
        repl.forward(
            (volume.id, pages[0]),
            t,
            &request,
            Forward::Client,
            Bytes::new(),
        )
    }));
    let (local, remote) = futures_util::future::join(local, remote).await;
    drop(admission);
    local.map_err(|e| io_refusal(volume, &e))?;
    let outcomes = targets
        .iter()
        .zip(remote)
        .map(|((t, pages), o)| (t, pages.as_slice(), o));
    settle(repl, volume.id, epoch, outcomes).await
}

/// Apply a write forwarded by the primary: set bits for every other replica
/// (unless it is a resync copy), then write.
pub async fn mirror_write<D: BlockDevice>(
    store: &Store<D>,
    repl: &Replication,
    volume: &Volume,
    admission: &Admission<'_>,
    request: &Request,
    payload: Option<AlignedBuf>,
) -> Result<(), Refusal> {
    if request.flags & FLAG_RESYNC == 0
        && let Some(p) = admission.partition(Part::Mirror)
    {
        let others: Vec<&str> = p
            .replicas
            .iter()
            .map(|r| r.server.as_str())
            .filter(|s| *s != repl.me)
            .collect();
        let regions = repl.regions_of(request.offset, u64::from(request.length));
        store
            .mark_dirty(volume.id, &others, regions)
            .await
            .map_err(|e| io_refusal(volume, &e))?;
    }
    apply_local(store, volume, request, payload).await
}

async fn apply_local<D: BlockDevice>(
    store: &Store<D>,
    volume: &Volume,
    request: &Request,
    payload: Option<AlignedBuf>,
) -> Result<(), Refusal> {
    match (request.opcode, payload) {
        (Opcode::Write, Some(data)) => {
            store
                .write(volume, request.offset, data, request.fua())
                .await
        }
        (Opcode::Trim | Opcode::WriteZeroes, _) => {
            store.zero(volume, request.offset, request.length).await
        }
        _ => Ok(()),
    }
}

fn io_refusal(volume: &Volume, e: &crate::error::EngineError) -> Refusal {
    warn!(volume = %volume.id, error = %e, "replication I/O failed");
    Refusal::new(
        volume.epoch(),
        Refused::Io {
            error: e.to_string(),
        },
    )
}
