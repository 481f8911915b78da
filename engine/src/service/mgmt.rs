//! Management requests a storage server answers: map pushes, checks, drops, checksums.

use tessera_net::proto::{
    self, BLOCK_SIZE, Epoch, MAX_CHECKSUM_REGIONS, MgmtReply, MgmtRequest, Refusal as MgmtRefusal,
    VolumeId,
};
use tessera_net::quic::PeerIdentity;

use super::Service;
use super::data::piece_bytes;
use crate::disk::io::AnyDevice;
use crate::repl::{self};
use crate::store::Store;

pub(super) async fn serve_mgmt_request(
    service: &Service,
    sender: &PeerIdentity,
    request: MgmtRequest,
) -> MgmtReply {
    let store = &service.store;
    match request {
        MgmtRequest::PushMap { map } => {
            let reply = store.handle_push(&map).await;
            service.replication.map_changed(&service.store, map.id);
            reply
        }
        MgmtRequest::CheckMap { map } => match store.check_map(&map) {
            Ok(()) => MgmtReply::Applied { epoch: map.epoch },
            Err(e) => MgmtReply::Refused(e.to_mgmt_refusal()),
        },
        MgmtRequest::DropVolume { id } => match store.drop_volume(id).await {
            Ok(()) => MgmtReply::Applied { epoch: Epoch(0) },
            Err(e) => MgmtReply::Refused(MgmtRefusal::Invalid {
                reason: e.to_string(),
            }),
        },
        MgmtRequest::Ping => MgmtReply::Pong {
            epoch: store
                .volumes()
                .iter()
                .map(|v| v.epoch())
                .max()
                .unwrap_or(Epoch(0)),
        },
        request @ (MgmtRequest::DirtyRegions { .. } | MgmtRequest::Clean { .. }) => {
            repl::handle_peer_request(&service.store, &service.replication, sender, request).await
        }
        MgmtRequest::RegionChecksums {
            volume,
            offset,
            length,
            region_size,
        } => region_checksums(store, volume, offset, length, region_size).await,
        other => MgmtReply::Refused(MgmtRefusal::Invalid {
            reason: format!("a storage server does not serve {}", other.operation()),
        }),
    }
}

/// crc32c of each region of a range as this replica holds it, for `volume verify`.
async fn region_checksums(
    store: &Store<AnyDevice>,
    id: VolumeId,
    offset: u64,
    length: u64,
    region_size: u32,
) -> MgmtReply {
    let invalid = |reason: String| MgmtReply::Refused(MgmtRefusal::Invalid { reason });
    let Some(volume) = store.volume(id) else {
        return MgmtReply::Refused(MgmtRefusal::NotFound {
            kind: "volume".into(),
            name: id.to_string(),
        });
    };
    let region = u64::from(region_size);
    let record = volume.record();
    let page = u64::from(record.page_size);
    let end = offset.checked_add(length);
    let valid = region_size.is_power_of_two()
        && region >= u64::from(BLOCK_SIZE)
        && region <= u64::from(proto::MAX_IO_LEN)
        && offset.is_multiple_of(region)
        && end.is_some_and(|end| end <= record.size)
        && length.div_ceil(region) <= MAX_CHECKSUM_REGIONS;
    let Some(end) = end.filter(|_| valid && length > 0) else {
        return invalid(format!(
            "range {offset}+{length} in regions of {region_size} bytes is not one this server can check"
        ));
    };
    let (first, last) = (offset / page, (end - 1) / page);
    if !record.ranges.iter().any(|(a, b)| *a <= first && last < *b) {
        return invalid(format!(
            "pages {first}..={last} are not held by this server"
        ));
    }
    let mut sums = Vec::new();
    let mut at = offset;
    while at < end {
        let len = (end - at).min(region) as u32;
        let _admitted = volume.hold().await;
        let pieces = match store.read(&volume, at, len).await {
            Ok(pieces) => pieces,
            Err(refusal) => return invalid(refusal.reason.to_string()),
        };
        let mut sum = 0u32;
        for bytes in pieces.iter().flat_map(piece_bytes) {
            sum = crc32c::crc32c_append(sum, bytes);
        }
        sums.push(sum);
        at += u64::from(len);
    }
    MgmtReply::Checksums { sums }
}
