//! Admission: the one place a data request is judged (epoch, range, role)
//! before any I/O, and the typed refusals it answers with.

use std::rc::Rc;

use tessera_net::proto::{
    Epoch, EpochVerdict, FLAG_REPLICA, FLAG_RESYNC, MirrorState, Partition, Refusal as MgmtRefusal,
    Request, Role, Status, VolumeId, VolumeMap,
};
use tessera_net::quic::PeerIdentity;

use super::{Admitted, NoLease, Store, Volume};
use crate::disk::io::BlockDevice;

/// Why a data request is answered without being executed, with the
/// server's epoch for the volume (0 if it does not hold the volume). The
/// reply's status comes from the reason; its text is rendered only when
/// the reply is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub epoch: Epoch,
    pub reason: Refused,
}

impl Refusal {
    pub fn new(epoch: Epoch, reason: Refused) -> Self {
        Refusal { epoch, reason }
    }

    /// The status the reply carries.
    pub fn status(&self) -> Status {
        self.reason.status()
    }
}

/// The reasons a data request is refused, each with the fields that say
/// what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The request's epoch is not the volume's.
    #[error("{0}")]
    Epoch(EpochVerdict),
    /// A new epoch is being applied right now.
    #[error("an epoch change is in progress")]
    EpochChanging,
    /// A mirror is applying a newer epoch: the sender retries under it.
    #[error("mirror {mirror} is changing epoch")]
    MirrorChangingEpoch { mirror: String },
    /// A mirror failed, and the map changed before its loss was recorded.
    #[error("mirror {mirror} failed and the map changed meanwhile")]
    MirrorLostMapChanged { mirror: String },
    /// A mirror failed, and the management server did not record it.
    #[error("mirror {mirror} failed and its loss is not recorded: {refusal}")]
    MirrorLossUnrecorded {
        mirror: String,
        refusal: MgmtRefusal,
    },
    /// The header, payload or stream is malformed.
    #[error("{0}")]
    Malformed(tessera_net::proto::ProtoError),
    /// The payload did not arrive.
    #[error("payload not received: {error}")]
    PayloadNotReceived { error: String },
    /// The request's stream did not end after its payload in time.
    #[error("request stream not finished within {after:?}")]
    StreamNotFinished { after: std::time::Duration },
    /// The payload did not arrive in time.
    #[error("payload not received within {after:?}")]
    PayloadTimeout { after: std::time::Duration },
    /// A role that may not send data requests.
    #[error("role {role} may not send data requests")]
    RoleMayNotSendData { role: Role },
    /// A replica request from a peer that is not a storage server.
    #[error("role {role} may not send replica requests")]
    ReplicaFromRole { role: Role },
    /// The range ends past the volume.
    #[error("range ends at {end} past the volume size {size}")]
    PastEnd { end: u64, size: u64 },
    /// The volume is not held here.
    #[error("volume {volume} is not held by this server")]
    UnknownVolume { volume: VolumeId },
    /// The pages are not held here.
    #[error("pages {first}..={last} are not held by this server")]
    PagesNotHeld { first: u64, last: u64 },
    /// The range spans two partitions.
    #[error("pages {first}..={last} are not one partition")]
    AcrossPartitions { first: u64, last: u64 },
    /// A replica request from a peer that is not the partition's primary,
    /// or to a mirror that is out of sync.
    #[error("{sender} is not the primary of pages {first}..={last}, or this mirror is out of sync")]
    NotFromPrimary {
        sender: String,
        first: u64,
        last: u64,
    },
    /// A client request to a server that does not lead the pages.
    #[error("this server is not the primary of pages {first}..={last}")]
    NotPrimary { first: u64, last: u64 },
    /// The path needs a primary's admission and was not given one.
    #[error("not admitted as the partition's primary")]
    NotAdmittedAsPrimary,
    /// The volume's map has not been fetched since a restart.
    #[error("this server is fetching the volume's map after a restart")]
    NoMapYet,
    /// The server's lease from the management server does not hold: it may
    /// have been replaced, so it serves nothing until a heartbeat is acknowledged.
    #[error("{0}")]
    NoLease(NoLease),
    /// A metadata write failed earlier: the store serves nothing more.
    #[error("the store stopped after a metadata write error; restart the server")]
    Stopped,
    /// The disk failed the operation.
    #[error("{error}")]
    Io { error: String },
    /// A copy of a write waited for the first copy, whose stream went away
    /// before it had an answer: whether it took effect is not known here.
    #[error("the first copy of this write went away unanswered; send it again")]
    CopyAbandoned,
    /// A write's sequence number is at or below the newest its session's
    /// window let go of: it may have been taken, so it is not run.
    #[error("sequence {sequence} is not above {floor}, which the session's window no longer holds")]
    SequenceBehind { sequence: u64, floor: u64 },
}

impl Refused {
    /// The one status each reason is answered with.
    pub fn status(&self) -> Status {
        match self {
            Refused::Epoch(_)
            | Refused::EpochChanging
            | Refused::MirrorChangingEpoch { .. }
            | Refused::MirrorLostMapChanged { .. } => Status::StaleEpoch,
            Refused::Malformed(e) => e.status(),
            Refused::PayloadNotReceived { .. }
            | Refused::StreamNotFinished { .. }
            | Refused::PayloadTimeout { .. } => Status::BadRequest,
            Refused::RoleMayNotSendData { .. } | Refused::ReplicaFromRole { .. } => {
                Status::Forbidden
            }
            Refused::PastEnd { .. } => Status::OutOfRange,
            Refused::UnknownVolume { .. }
            | Refused::PagesNotHeld { .. }
            | Refused::AcrossPartitions { .. }
            | Refused::NotFromPrimary { .. }
            | Refused::NotPrimary { .. }
            | Refused::NotAdmittedAsPrimary => Status::NotOwner,
            Refused::NoMapYet
            | Refused::NoLease(_)
            | Refused::MirrorLossUnrecorded { .. }
            | Refused::CopyAbandoned => Status::Unavailable,
            Refused::SequenceBehind { .. } => Status::BadRequest,
            Refused::Stopped | Refused::Io { .. } => Status::IoError,
        }
    }
}

/// This server's part in the partition a request falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// It leads the partition: client requests come here and are forwarded.
    Primary,
    /// It mirrors the partition for the sender, the partition's primary.
    Mirror,
}

/// One partition of a shared map slice; cheap to clone and keep.
#[derive(Debug, Clone)]
pub struct PartitionRef {
    map: Rc<VolumeMap>,
    /// Always a valid index of `map.partitions`: it comes from `Store::check`,
    /// which found it in this very map.
    index: usize,
}

impl std::ops::Deref for PartitionRef {
    type Target = Partition;
    fn deref(&self) -> &Partition {
        &self.map.partitions[self.index]
    }
}

/// Where `Store::check` found a request to fall: the map it was judged
/// against and, for a request with a range, the index of its partition in
/// that map and this server's part in it.
#[derive(Debug, Clone)]
pub struct Placement {
    map: Option<Rc<VolumeMap>>,
    at: Option<(usize, Part)>,
}

impl Placement {
    /// The map the request was judged against (none for a request without
    /// a range on a server that has not fetched its map since a restart).
    pub fn map(&self) -> Option<&Rc<VolumeMap>> {
        self.map.as_ref()
    }
}

/// An admitted request: what admission found, and the volume's epoch gate,
/// held until the request's I/O is done. The paths that serve the request
/// take this and look none of it up again.
#[derive(Debug)]
pub struct Admission<'a> {
    /// The volume's epoch, fixed while this is held.
    pub epoch: Epoch,
    pub placement: Placement,
    _gate: Admitted<'a>,
}

impl Admission<'_> {
    /// The partition of a ranged request, if this server has `part` in it.
    pub fn partition(&self, part: Part) -> Option<PartitionRef> {
        let (index, found) = self.placement.at?;
        let map = self.placement.map.clone()?;
        (found == part).then_some(PartitionRef { map, index })
    }
}

impl<D: BlockDevice> Store<D> {
    /// The checks every data request passes before any disk I/O: the volume
    /// is held, the epoch matches, the range lies inside the volume and in
    /// pages this server holds, and the sender may send it here: a client
    /// only to the partition's primary, a forwarded (replica) request only
    /// from that primary to an in-sync or resyncing mirror. Does not wait;
    /// see [`Store::admit`].
    pub fn check(
        &self,
        volume: &Volume,
        request: &Request,
        peer: &PeerIdentity,
    ) -> Result<Placement, Refusal> {
        if self.failed.get() {
            return Err(Refusal::new(volume.epoch(), Refused::Stopped));
        }
        self.lease
            .check(std::time::Instant::now())
            .map_err(|e| Refusal::new(volume.epoch(), Refused::NoLease(e)))?;
        let record = volume.record.borrow();
        let verdict = EpochVerdict::judge(record.epoch, request.epoch);
        if !verdict.is_current() {
            return Err(Refusal::new(record.epoch, Refused::Epoch(verdict)));
        }
        let replica = request.flags & FLAG_REPLICA != 0;
        if request.flags & (FLAG_REPLICA | FLAG_RESYNC) != 0 && peer.role != Role::Storage {
            return Err(Refusal::new(
                record.epoch,
                Refused::ReplicaFromRole { role: peer.role },
            ));
        }
        if !request.opcode.has_range() {
            return Ok(Placement {
                map: volume.map(),
                at: None,
            });
        }
        if request.end() > record.size {
            return Err(Refusal::new(
                record.epoch,
                Refused::PastEnd {
                    end: request.end(),
                    size: record.size,
                },
            ));
        }
        let page = u64::from(record.page_size);
        let (first, last) = (request.offset / page, (request.end() - 1) / page);
        if !record.ranges.iter().any(|(a, b)| *a <= first && last < *b) {
            return Err(Refusal::new(
                record.epoch,
                Refused::PagesNotHeld { first, last },
            ));
        }
        let Some(map) = volume.map() else {
            return Err(Refusal::new(record.epoch, Refused::NoMapYet));
        };
        let me = &self.superblock.server_name;
        let Some(index) = map
            .partition_index_at(first)
            .filter(|i| last < map.partitions[*i].end_page)
        else {
            return Err(Refusal::new(
                record.epoch,
                Refused::AcrossPartitions { first, last },
            ));
        };
        let partition = &map.partitions[index];
        let primary = partition.replicas.first().map(|r| r.server.as_str());
        if replica {
            let mirror = partition.replicas.iter().skip(1).find(|r| &r.server == me);
            let receiving = mirror.is_some_and(|r| r.state != MirrorState::OutOfSync);
            if primary != Some(peer.name.as_str()) || !receiving {
                return Err(Refusal::new(
                    record.epoch,
                    Refused::NotFromPrimary {
                        sender: peer.name.clone(),
                        first,
                        last,
                    },
                ));
            }
        } else if primary != Some(me.as_str()) {
            return Err(Refusal::new(
                record.epoch,
                Refused::NotPrimary { first, last },
            ));
        }
        let part = if replica { Part::Mirror } else { Part::Primary };
        drop(record);
        Ok(Placement {
            map: Some(map),
            at: Some((index, part)),
        })
    }

    /// Look up the volume of a request, failing with NOT_OWNER.
    pub fn lookup(&self, request: &Request) -> Result<Rc<Volume>, Refusal> {
        self.volume(request.volume).ok_or_else(|| {
            Refusal::new(
                Epoch(0),
                Refused::UnknownVolume {
                    volume: request.volume,
                },
            )
        })
    }

    /// Admit a request: hold the volume's epoch gate and check the request.
    /// Keep the returned admission until the request's I/O is complete.
    pub async fn admit<'v>(
        &self,
        volume: &'v Volume,
        request: &Request,
        peer: &PeerIdentity,
    ) -> Result<Admission<'v>, Refusal> {
        let gate = volume.gate.read().await;
        let placement = self.check(volume, request, peer)?;
        Ok(Admission {
            epoch: volume.epoch(),
            placement,
            _gate: Admitted { _gate: gate },
        })
    }

    /// Admit a request without waiting: while a new epoch is being applied
    /// the request is refused with STALE_EPOCH at the current epoch (the
    /// sender retries once its own map has moved on).
    pub fn try_admit<'v>(
        &self,
        volume: &'v Volume,
        request: &Request,
        peer: &PeerIdentity,
    ) -> Result<Admission<'v>, Refusal> {
        let gate = volume
            .gate
            .try_read()
            .map_err(|_| Refusal::new(volume.epoch(), Refused::EpochChanging))?;
        let placement = self.check(volume, request, peer)?;
        Ok(Admission {
            epoch: volume.epoch(),
            placement,
            _gate: Admitted { _gate: gate },
        })
    }
}
