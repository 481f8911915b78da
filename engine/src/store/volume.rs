//! A volume this server holds: its record, its map slice and its epoch gate.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use tessera_net::proto::{Epoch, VolumeId, VolumeMap};
use tokio::sync::{RwLock, RwLockReadGuard};

use crate::disk::format::{VOLUME_NEEDS_FULL_COPY, VolumeRecord};

/// A volume this server holds a part of.
#[derive(Debug)]
pub struct Volume {
    pub id: VolumeId,
    pub(super) record_index: u64,
    pub(super) record: RefCell<VolumeRecord>,
    /// The whole map slice (replica sets and states), from the management
    /// server; `None` after a restart until it has been fetched again.
    pub(super) map: RefCell<Option<Rc<VolumeMap>>>,
    /// Created by a map push in this process (not loaded from the device):
    /// nothing was written to it before this process knew its map.
    pub(super) assigned_here: Cell<bool>,
    pub(super) gate: RwLock<()>,
}

impl Volume {
    pub(super) fn new(id: VolumeId, record_index: u64, record: VolumeRecord) -> Self {
        Volume {
            id,
            record_index,
            record: RefCell::new(record),
            map: RefCell::new(None),
            assigned_here: Cell::new(false),
            gate: RwLock::new(()),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.record.borrow().epoch
    }

    /// The map slice this server enforces, once known.
    pub fn map(&self) -> Option<Rc<VolumeMap>> {
        self.map.borrow().clone()
    }

    /// Whether this volume was assigned by a map push in this process.
    pub fn assigned_here(&self) -> bool {
        self.assigned_here.get()
    }

    /// Whether this replica was created empty and still needs a full copy.
    pub fn needs_full_copy(&self) -> bool {
        self.record.borrow().flags & VOLUME_NEEDS_FULL_COPY != 0
    }

    /// Hold the epoch gate shared: the epoch does not change until dropped.
    pub async fn hold(&self) -> Admitted<'_> {
        Admitted {
            _gate: self.gate.read().await,
        }
    }

    pub fn record(&self) -> VolumeRecord {
        self.record.borrow().clone()
    }
}

/// Admission to a volume: holding it keeps the volume's epoch fixed.
#[derive(Debug)]
pub struct Admitted<'a> {
    pub(super) _gate: RwLockReadGuard<'a, ()>,
}
