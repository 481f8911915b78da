//! The configuration map as a deterministic state machine of commands.
//!
//! `ClusterState::apply` is pure: the same commands in the same order give
//! the same state on any machine, which is what a replicated log (openraft)
//! needs later. Every applied command advances the cluster epoch by one and
//! sets the epoch of each volume it affects to the new cluster epoch; other
//! volumes keep theirs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tessera_proto::units::ByteSize;
use tessera_proto::{
    BLOCK_SIZE, Epoch, MAX_VOLUME_SIZE, MirrorState, Partition, Refusal, Replica, VolumeId,
    VolumeMap,
};

/// Largest page size a volume may have (a request covers at most one page).
pub const MAX_PAGE_SIZE: u32 = tessera_proto::MAX_IO_LEN;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub data_addr: SocketAddr,
    pub capacity: u64,
    pub up: bool,
    /// Random per format of the server's disk; a change means its data is gone.
    pub incarnation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub server: String,
    pub state: MirrorState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    pub first_page: u64,
    pub end_page: u64,
    /// First = primary.
    pub replicas: Vec<ReplicaRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub size: u64,
    pub page_size: u32,
    pub replicas: u8,
    pub epoch: Epoch,
    pub partitions: Vec<PartitionRecord>,
}

impl VolumeRecord {
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(u64::from(self.page_size))
    }

    /// Every server holding a replica of any partition.
    pub fn servers(&self) -> BTreeSet<String> {
        self.partitions
            .iter()
            .flat_map(|p| p.replicas.iter().map(|r| r.server.clone()))
            .collect()
    }
}

/// A change to the configuration map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A server registers; one whose disk has a new incarnation lost its
    /// replicas, which go out of sync (and need a full copy).
    RegisterServer {
        name: String,
        data_addr: SocketAddr,
        capacity: u64,
        incarnation: u64,
    },
    MarkServer {
        name: String,
        up: bool,
    },
    RemoveServer {
        name: String,
        force: bool,
    },
    CreateVolume {
        name: String,
        size: u64,
        page_size: u32,
        replicas: u8,
        servers: Option<Vec<String>>,
    },
    DeleteVolume {
        name: String,
    },
    ResizeVolume {
        name: String,
        size: u64,
    },
    /// Give pages `[first_page, end_page)` to `servers` (first = primary).
    /// The range either covers whole partitions or lies inside one (which is
    /// split); a range straddling a partition boundary is refused.
    SetPartition {
        volume: String,
        first_page: u64,
        end_page: u64,
        servers: Vec<String>,
    },
    /// Change the state of `server`'s replica of the partition starting at
    /// `first_page` (the mirror machinery marks mirrors out of sync, resyncing
    /// and in sync with it).
    SetMirrorState {
        volume: String,
        first_page: u64,
        server: String,
        state: MirrorState,
    },
    /// Put back a volume's size and layout as they were (undoes a change the
    /// storage servers refused).
    SetLayout {
        volume: String,
        size: u64,
        partitions: Vec<PartitionRecord>,
    },
}

/// What an applied command changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The cluster epoch after the command.
    pub epoch: Epoch,
    /// Volumes whose map changed, with the servers of their old and new layout.
    pub changed: BTreeMap<String, BTreeSet<String>>,
    /// Volumes deleted, with the servers that held them.
    pub deleted: BTreeMap<VolumeId, BTreeSet<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterState {
    pub epoch: Epoch,
    pub next_volume_id: u64,
    pub servers: BTreeMap<String, ServerRecord>,
    pub volumes: BTreeMap<String, VolumeRecord>,
}

fn invalid(reason: impl Into<String>) -> Refusal {
    Refusal::Invalid {
        reason: reason.into(),
    }
}

fn not_found(kind: &str, name: &str) -> Refusal {
    Refusal::NotFound {
        kind: kind.into(),
        name: name.into(),
    }
}

impl ClusterState {
    /// Apply `command`. On `Err` the state is unchanged and the epoch stays.
    pub fn apply(&mut self, command: &Command) -> Result<Outcome, Refusal> {
        let mut next = self.clone();
        let mut outcome = Outcome::default();
        next.epoch = self.epoch.next();
        next.apply_inner(command, &mut outcome)?;
        for name in outcome.changed.keys() {
            if let Some(volume) = next.volumes.get_mut(name) {
                volume.epoch = next.epoch;
            }
            // Servers and drivers refuse a map they cannot search: never commit one.
            if let Some(map) = next.volume_map(name) {
                map.check_layout()
                    .map_err(|e| invalid(format!("volume {name}: {e}")))?;
            }
        }
        outcome.epoch = next.epoch;
        *self = next;
        Ok(outcome)
    }

    fn volumes_on(&self, server: &str) -> Vec<String> {
        self.volumes
            .iter()
            .filter(|(_, v)| v.servers().contains(server))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// `server` no longer takes writes (it is down, or its disk was wiped):
    /// wherever another replica is in sync on a server that is up, its
    /// replica goes out of sync, and if it was the primary that replica is
    /// promoted. A partition with no such replica keeps its layout: it waits
    /// for this server, which holds every write it acknowledged, unless the
    /// server's disk was `wiped`: then its replicas are out of sync in any
    /// case (the partition's data is lost if no other copy is in sync).
    fn lose_replicas(&mut self, server: &str, wiped: bool) {
        let up: BTreeSet<String> = self
            .servers
            .iter()
            .filter(|(_, r)| r.up)
            .map(|(n, _)| n.clone())
            .collect();
        for volume in self.volumes.values_mut() {
            for p in &mut volume.partitions {
                let Some(at) = p.replicas.iter().position(|r| r.server == server) else {
                    continue;
                };
                let successor = p.replicas.iter().position(|r| {
                    r.server != server && r.state == MirrorState::InSync && up.contains(&r.server)
                });
                if successor.is_some() || wiped {
                    p.replicas[at].state = MirrorState::OutOfSync;
                }
                let Some(successor) = successor else {
                    continue;
                };
                if at == 0 {
                    let promoted = p.replicas.remove(successor);
                    p.replicas.insert(0, promoted);
                }
            }
        }
    }

    fn mark_changed(&self, outcome: &mut Outcome, volume: &str, old_servers: BTreeSet<String>) {
        let mut servers = old_servers;
        if let Some(v) = self.volumes.get(volume) {
            servers.extend(v.servers());
        }
        outcome
            .changed
            .entry(volume.to_string())
            .or_default()
            .extend(servers);
    }

    fn apply_inner(&mut self, command: &Command, outcome: &mut Outcome) -> Result<(), Refusal> {
        match command {
            Command::RegisterServer {
                name,
                data_addr,
                capacity,
                incarnation,
            } => {
                let record = ServerRecord {
                    data_addr: *data_addr,
                    capacity: *capacity,
                    up: true,
                    incarnation: *incarnation,
                };
                let previous = self.servers.get(name).cloned();
                if previous.as_ref() == Some(&record) {
                    return Err(invalid(format!(
                        "server {name} is already registered as it is"
                    )));
                }
                let wiped = previous.is_some_and(|p| p.incarnation != *incarnation);
                if wiped {
                    // Its data is gone: not a copy of anything any more.
                    if let Some(server) = self.servers.get_mut(name) {
                        server.up = false;
                    }
                    self.lose_replicas(name, true);
                }
                self.servers.insert(name.clone(), record);
                for volume in self.volumes_on(name) {
                    self.mark_changed(outcome, &volume, BTreeSet::new());
                }
            }
            Command::MarkServer { name, up } => {
                let server = self
                    .servers
                    .get_mut(name)
                    .ok_or_else(|| not_found("server", name))?;
                if server.up == *up {
                    return Err(invalid(format!(
                        "server {name} is already {}",
                        if *up { "up" } else { "down" }
                    )));
                }
                server.up = *up;
                if !*up {
                    self.lose_replicas(name, false);
                }
                for volume in self.volumes_on(name) {
                    self.mark_changed(outcome, &volume, BTreeSet::new());
                }
            }
            Command::RemoveServer { name, force } => {
                if !self.servers.contains_key(name) {
                    return Err(not_found("server", name));
                }
                let holding = self.volumes_on(name);
                if !holding.is_empty() && self.servers.get(name).is_some_and(|s| s.up) {
                    // It would go on serving its old layout: it must be down (stopped) first.
                    return Err(invalid(format!(
                        "server {name} is up and holds partitions of {}; stop it first (it is marked down after the heartbeat timeout)",
                        holding.join(", ")
                    )));
                }
                if !holding.is_empty() && !force {
                    return Err(invalid(format!(
                        "server {name} holds partitions of {}; move them first, or remove with --force to mark them lost",
                        holding.join(", ")
                    )));
                }
                for volume in holding {
                    let old = self
                        .volumes
                        .get(&volume)
                        .map(VolumeRecord::servers)
                        .unwrap_or_default();
                    if let Some(v) = self.volumes.get_mut(&volume) {
                        for p in &mut v.partitions {
                            p.replicas.retain(|r| &r.server != name);
                        }
                    }
                    self.mark_changed(outcome, &volume, old);
                }
                self.servers.remove(name);
            }
            Command::CreateVolume {
                name,
                size,
                page_size,
                replicas,
                servers,
            } => {
                if self.volumes.contains_key(name) {
                    return Err(Refusal::AlreadyExists {
                        kind: "volume".into(),
                        name: name.clone(),
                    });
                }
                validate_volume_name(name)?;
                if *page_size == 0 || page_size % BLOCK_SIZE != 0 || *page_size > MAX_PAGE_SIZE {
                    return Err(invalid(format!(
                        "page size {page_size} must be a multiple of {BLOCK_SIZE} up to {MAX_PAGE_SIZE}"
                    )));
                }
                check_size(*size)?;
                if *replicas == 0 {
                    return Err(invalid("a volume needs at least one replica"));
                }
                let candidates: Vec<String> = match servers {
                    Some(list) => {
                        let mut seen = BTreeSet::new();
                        for s in list {
                            let record =
                                self.servers.get(s).ok_or_else(|| not_found("server", s))?;
                            if !record.up {
                                return Err(invalid(format!("server {s} is down")));
                            }
                            if !seen.insert(s) {
                                return Err(invalid(format!("server {s} is listed twice")));
                            }
                        }
                        list.clone()
                    }
                    None => self
                        .servers
                        .iter()
                        .filter(|(_, r)| r.up)
                        .map(|(n, _)| n.clone())
                        .collect(),
                };
                if candidates.len() < usize::from(*replicas) {
                    return Err(invalid(format!(
                        "{replicas} replicas need {replicas} servers that are up; {} available",
                        candidates.len()
                    )));
                }
                let pages = size.div_ceil(u64::from(*page_size));
                let id = VolumeId(self.next_volume_id.max(1));
                self.next_volume_id = id.0 + 1;
                let volume = VolumeRecord {
                    id,
                    size: *size,
                    page_size: *page_size,
                    replicas: *replicas,
                    epoch: Epoch(0),
                    partitions: spread(pages, &candidates, usize::from(*replicas)),
                };
                self.volumes.insert(name.clone(), volume);
                self.mark_changed(outcome, name, BTreeSet::new());
            }
            Command::DeleteVolume { name } => {
                let volume = self
                    .volumes
                    .remove(name)
                    .ok_or_else(|| not_found("volume", name))?;
                outcome.deleted.insert(volume.id, volume.servers());
            }
            Command::ResizeVolume { name, size } => {
                let volume = self
                    .volumes
                    .get_mut(name)
                    .ok_or_else(|| not_found("volume", name))?;
                check_size(*size)?;
                if *size == volume.size {
                    return Err(invalid(format!(
                        "volume {name} already has size {}",
                        ByteSize(*size)
                    )));
                }
                // Whether a shrink drops written data is the storage servers'
                // to say: the management server asks them before committing.
                let old = volume.servers();
                volume.size = *size;
                let pages = volume.pages();
                volume.partitions.retain(|p| p.first_page < pages);
                if let Some(last) = volume.partitions.last_mut() {
                    last.end_page = pages;
                }
                self.mark_changed(outcome, name, old);
            }
            Command::SetPartition {
                volume: name,
                first_page,
                end_page,
                servers,
            } => {
                for s in servers {
                    let record = self.servers.get(s).ok_or_else(|| not_found("server", s))?;
                    if !record.up {
                        return Err(invalid(format!("server {s} is down")));
                    }
                }
                if servers.is_empty()
                    || servers.iter().collect::<BTreeSet<_>>().len() != servers.len()
                {
                    return Err(invalid("a partition needs one or more distinct servers"));
                }
                let volume = self
                    .volumes
                    .get_mut(name)
                    .ok_or_else(|| not_found("volume", name))?;
                let (first, end) = (*first_page, *end_page);
                if first >= end || end > volume.pages() {
                    return Err(invalid(format!(
                        "pages {first}..{end} are not a range inside the volume's {} pages",
                        volume.pages()
                    )));
                }
                let old = volume.servers();
                volume.partitions = set_partition(&volume.partitions, first, end, servers)?;
                self.mark_changed(outcome, name, old);
            }
            Command::SetMirrorState {
                volume: name,
                first_page,
                server,
                state,
            } => {
                let volume = self
                    .volumes
                    .get_mut(name)
                    .ok_or_else(|| not_found("volume", name))?;
                let partition = volume
                    .partitions
                    .iter_mut()
                    .find(|p| p.first_page == *first_page);
                let missing = || {
                    not_found(
                        "replica",
                        &format!("{name} pages {first_page}.. on {server}"),
                    )
                };
                let partition = partition.ok_or_else(missing)?;
                if partition
                    .replicas
                    .first()
                    .is_some_and(|r| &r.server == server)
                    && *state != MirrorState::InSync
                {
                    return Err(invalid(format!(
                        "{server} is the primary of {name} pages {first_page}..: it holds every acknowledged write"
                    )));
                }
                // A mirror is copied from its primary: while the primary
                // itself may lack writes, no mirror can be (or become) in sync.
                if let Some(primary) = partition.replicas.first()
                    && &primary.server != server
                    && primary.state != MirrorState::InSync
                    && *state != MirrorState::OutOfSync
                {
                    return Err(invalid(format!(
                        "the primary {} of {name} pages {first_page}.. is out of sync: {server} cannot be {state:?}",
                        primary.server
                    )));
                }
                let replica = partition
                    .replicas
                    .iter_mut()
                    .find(|r| &r.server == server)
                    .ok_or_else(missing)?;
                if replica.state == *state {
                    return Err(invalid(format!("replica is already {state:?}")));
                }
                replica.state = *state;
                self.mark_changed(outcome, name, BTreeSet::new());
            }
            Command::SetLayout {
                volume: name,
                size,
                partitions,
            } => {
                let volume = self
                    .volumes
                    .get_mut(name)
                    .ok_or_else(|| not_found("volume", name))?;
                let old = volume.servers();
                volume.size = *size;
                volume.partitions = partitions.clone();
                self.mark_changed(outcome, name, old);
            }
        }
        Ok(())
    }

    /// The map slice of one volume, with current server addresses; a replica
    /// on a server that is down is shown out of sync.
    pub fn volume_map(&self, name: &str) -> Option<VolumeMap> {
        let v = self.volumes.get(name)?;
        Some(VolumeMap {
            id: v.id,
            name: name.to_string(),
            epoch: v.epoch,
            size: v.size,
            page_size: v.page_size,
            partitions: v
                .partitions
                .iter()
                .map(|p| Partition {
                    first_page: p.first_page,
                    end_page: p.end_page,
                    replicas: p
                        .replicas
                        .iter()
                        .filter_map(|r| {
                            let server = self.servers.get(&r.server)?;
                            Some(Replica {
                                server: r.server.clone(),
                                addr: server.data_addr,
                                state: if server.up {
                                    r.state
                                } else {
                                    MirrorState::OutOfSync
                                },
                            })
                        })
                        .collect(),
                })
                .collect(),
        })
    }

    pub fn volume_by_id(&self, id: VolumeId) -> Option<&str> {
        self.volumes
            .iter()
            .find(|(_, v)| v.id == id)
            .map(|(n, _)| n.as_str())
    }
}

fn check_size(size: u64) -> Result<(), Refusal> {
    if size == 0 || !size.is_multiple_of(u64::from(BLOCK_SIZE)) || size > MAX_VOLUME_SIZE {
        return Err(invalid(format!(
            "size {} must be a positive multiple of {} up to {}",
            ByteSize(size),
            ByteSize(u64::from(BLOCK_SIZE)),
            ByteSize(MAX_VOLUME_SIZE)
        )));
    }
    Ok(())
}

fn validate_volume_name(name: &str) -> Result<(), Refusal> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "volume name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// The partitions after giving `[first, end)` to `servers`; adjacent
/// partitions with the same replicas are merged.
fn set_partition(
    partitions: &[PartitionRecord],
    first: u64,
    end: u64,
    servers: &[String],
) -> Result<Vec<PartitionRecord>, Refusal> {
    let inside_one = partitions
        .iter()
        .any(|p| p.first_page <= first && end <= p.end_page);
    let whole = partitions
        .iter()
        .filter(|p| p.first_page < end && first < p.end_page)
        .all(|p| first <= p.first_page && p.end_page <= end);
    if !inside_one && !whole {
        return Err(invalid(format!(
            "pages {first}..{end} overlap a partition boundary: cover whole partitions, or split one"
        )));
    }
    let mut out: Vec<PartitionRecord> = Vec::new();
    let mut push = |p: PartitionRecord| match out.last_mut() {
        Some(last) if last.end_page == p.first_page && last.replicas == p.replicas => {
            last.end_page = p.end_page
        }
        _ => out.push(p),
    };
    let replicas: Vec<ReplicaRecord> = servers
        .iter()
        .map(|s| ReplicaRecord {
            server: s.clone(),
            state: MirrorState::InSync,
        })
        .collect();
    let mut placed = false;
    for p in partitions {
        if p.end_page <= first || end <= p.first_page {
            if !placed && p.first_page >= end {
                push(PartitionRecord {
                    first_page: first,
                    end_page: end,
                    replicas: replicas.clone(),
                });
                placed = true;
            }
            push(p.clone());
            continue;
        }
        if p.first_page < first {
            push(PartitionRecord {
                end_page: first,
                ..p.clone()
            });
        }
        if !placed {
            push(PartitionRecord {
                first_page: first,
                end_page: end,
                replicas: replicas.clone(),
            });
            placed = true;
        }
        if end < p.end_page {
            push(PartitionRecord {
                first_page: end,
                ..p.clone()
            });
        }
    }
    if !placed {
        push(PartitionRecord {
            first_page: first,
            end_page: end,
            replicas,
        });
    }
    Ok(out)
}

/// Lay `pages` out in one partition per server (fewer if there are fewer
/// pages), each with `replicas` distinct servers; primaries rotate so that
/// every server leads about the same number of partitions.
fn spread(pages: u64, servers: &[String], replicas: usize) -> Vec<PartitionRecord> {
    let n = (servers.len() as u64).min(pages).max(1);
    (0..n)
        .map(|i| PartitionRecord {
            first_page: i * pages / n,
            end_page: (i + 1) * pages / n,
            replicas: (0..replicas)
                .map(|k| ReplicaRecord {
                    server: servers[(i as usize + k) % servers.len()].clone(),
                    state: MirrorState::InSync,
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests;
