//! Durable state: the command log and the state after the last command, in redb.
//!
//! Each applied command is one write transaction holding the command (keyed
//! by the epoch it produced) and the resulting state; redb commits with
//! fsync, so a command acknowledged to an admin survives SIGKILL and power
//! loss, and the epoch never goes back across restarts.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::MgmtError;
use crate::state::{ClusterState, Command};

const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
const STATE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("state");
const CURRENT: &str = "current";
pub const DB_FILE: &str = "mgmt.redb";

#[derive(Debug)]
pub struct Db {
    db: Database,
    path: PathBuf,
}

impl Db {
    /// Open (or create) the database in `dir` and load the current state.
    pub fn open(dir: &Path) -> Result<(Self, ClusterState), MgmtError> {
        std::fs::create_dir_all(dir).map_err(|source| MgmtError::Io {
            op: "create",
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let db = Database::create(&path).map_err(|e| MgmtError::Db {
            path: path.clone(),
            source: e.into(),
        })?;
        let this = Db { db, path };
        let state = this.load()?;
        Ok((this, state))
    }

    fn db_err(&self) -> impl Fn(redb::Error) -> MgmtError + '_ {
        |source| MgmtError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn load(&self) -> Result<ClusterState, MgmtError> {
        let err = self.db_err();
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = match txn.open_table(STATE) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(ClusterState::default()),
            Err(e) => return Err(err(e.into())),
        };
        let Some(bytes) = table.get(CURRENT).map_err(|e| err(e.into()))? else {
            return Ok(ClusterState::default());
        };
        postcard::from_bytes(bytes.value()).map_err(|e| MgmtError::Corrupt {
            path: self.path.clone(),
            reason: format!("state does not decode: {e}"),
        })
    }

    /// Durably record `command` and the `state` it produced.
    pub fn commit(&self, command: &Command, state: &ClusterState) -> Result<(), MgmtError> {
        let err = self.db_err();
        let encode = |e: postcard::Error| MgmtError::Corrupt {
            path: self.path.clone(),
            reason: format!("cannot encode: {e}"),
        };
        let command_bytes = postcard::to_allocvec(command).map_err(encode)?;
        let state_bytes = postcard::to_allocvec(state).map_err(encode)?;
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut log = txn.open_table(LOG).map_err(|e| err(e.into()))?;
            log.insert(state.epoch.0, command_bytes.as_slice())
                .map_err(|e| err(e.into()))?;
            let mut current = txn.open_table(STATE).map_err(|e| err(e.into()))?;
            current
                .insert(CURRENT, state_bytes.as_slice())
                .map_err(|e| err(e.into()))?;
        }
        txn.commit().map_err(|e| err(e.into()))
    }

    /// The commands applied so far, oldest first (for audits and replay).
    pub fn log(&self) -> Result<Vec<(u64, Command)>, MgmtError> {
        let err = self.db_err();
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = match txn.open_table(LOG) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e.into())),
        };
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (epoch, bytes) = entry.map_err(|e| err(e.into()))?;
            let command = postcard::from_bytes(bytes.value()).map_err(|e| MgmtError::Corrupt {
                path: self.path.clone(),
                reason: format!("log entry {} does not decode: {e}", epoch.value()),
            })?;
            out.push((epoch.value(), command));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn state_and_log_survive_reopen_and_replay_to_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut state) = Db::open(dir.path()).unwrap();
        assert_eq!(state, ClusterState::default());
        let commands = [
            Command::RegisterServer {
                name: "s1".into(),
                data_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
                capacity: 1 << 30,
                incarnation: 9,
            },
            Command::CreateVolume {
                name: "v".into(),
                size: 1 << 20,
                page_size: 1 << 20,
                replicas: 1,
                servers: None,
            },
        ];
        for c in &commands {
            state.apply(c).unwrap();
            db.commit(c, &state).unwrap();
        }
        drop(db);
        let (db, loaded) = Db::open(dir.path()).unwrap();
        assert_eq!(loaded, state);
        let mut replayed = ClusterState::default();
        for (epoch, command) in db.log().unwrap() {
            assert_eq!(replayed.apply(&command).unwrap().epoch.0, epoch);
        }
        assert_eq!(replayed, state);
    }
}
