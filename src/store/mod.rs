//! Durable state in sled, split by job over one database: [`StateStore`] holds the engine state
//! and the source offsets, [`SnapshotStore`] the versioned snapshots, [`Catalogue`] the item
//! titles. [`open`] opens the database once, checks its format and hands out the three.
//!
//! Every state commit is one atomic sled batch followed by a flush, so offsets are never
//! recorded for work that is not persisted, and a restart resumes exactly where the last commit
//! left off. The three share one tree with prefixed keys, so such a batch can span every key
//! the state needs; each key prefix has one writer:
//!
//! - [`StateStore`]: `m/<name>` metadata (identity, counters, offsets, labels, model; the
//!   format is written by [`open`]),
//!   `n/<u32>` user ids, `i/<u32>` item ids, `v/<u32>` the vectors of users
//!   `1024·i .. 1024·(i+1)` as of the last checkpoint (`u/<u32>`, one user per key, in state
//!   dirs written before chunks; read, and removed at the next checkpoint), `l/<u64>` the cells
//!   (user, item, value) each commit changed since that checkpoint, `k/<u64>` the labels each
//!   commit changed since the labels were last written whole. A commit appends one log record
//!   (what changed, not whole vectors); every `[state] checkpoint_cells` logged cells, the
//!   chunks of the changed users are rewritten and the log dropped, in the same atomic batch (a
//!   chunk is one sled key: a checkpoint of 100k users is about 100 inserts, not 100k). Loading
//!   replays the log over the checkpoint. What changed since the last commit is kept by a
//!   [`ChangeTracker`] that the engine reports to, not by the engine.
//! - [`SnapshotStore`]: `s/<u64>` snapshot JSON, `h/<u64>` its summary, `a/<u64>` its
//!   assignments (read with the user ids of `n/`), `m/latest_snapshot`; beside sled's files,
//!   the file `snapshot-versions`: the highest version that ever left the process, which a
//!   sled reopened at an earlier commit cannot take back (see `versions`).
//! - [`Catalogue`]: `c/<item>` titles.

mod catalogue;
mod cells;
mod changes;
mod snapshots;
mod state;
mod versions;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::engine::{EngineParams, ValueTransform};
use crate::event::Mode;

pub use catalogue::Catalogue;
pub use changes::ChangeTracker;
pub use snapshots::{
    AssignmentChunks, FeedRecord, FeedRow, HistoryEntry, SnapshotInfo, SnapshotStore,
};
pub use state::{DEFAULT_CHECKPOINT_CELLS, LoadedEngine, PreparedCommit, StateStore};
pub use versions::{Rollback, VERSION_MARK_FILE};

/// Version of the on-disk layout; a state dir written by a newer version is refused. Format 2
/// checkpoints user vectors in 1024-user chunks (`v/`); format 3 writes chunks and cell-log
/// records in a compact encoding (varints and one-byte values, see `cells`). Older dirs are
/// read as they are (format 1: one `u/` key per user; 16-byte log cells and 12-byte chunk
/// cells) and marked with this format by the first write, so an older build refuses them from
/// then on (a dir only read stays the older build's).
pub const STATE_FORMAT: u32 = 3;

/// The format of a state dir whose values are scaled by a half-life (`[events] half_life`):
/// builds from before forgetting existed must refuse it rather than read scaled values as
/// ratings.
pub const DECAYING_STATE_FORMAT: u32 = 4;

/// Formats this build reads.
const READABLE_FORMATS: [u32; 4] = [1, 2, 3, 4];

/// What to do about a state dir whose data cannot be read back (named by the errors below).
const CORRUPT_FIX: &str = "restore the state dir from a backup (keep its newer snapshot-versions \
     file), or move it aside and replay the events into a new one";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "state dir {path} is in use by another process (it holds the dir's lock); stop that \
         process or give this one another [state] dir"
    )]
    Locked { path: PathBuf },
    #[error(
        "cannot open state dir {path}: {source} (check that the directory exists and is writable)"
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error("state dir {path} is corrupt and cannot be opened: {source}; {CORRUPT_FIX}")]
    Unreadable { path: PathBuf, source: sled::Error },
    #[error("state dir I/O failed: {0} (is the disk full or read-only?)")]
    Io(sled::Error),
    #[error("state dir holds corrupt data ({0}); {CORRUPT_FIX}")]
    Damaged(sled::Error),
    #[error("state dir holds corrupt data under key {key}: {detail}; {CORRUPT_FIX}")]
    Corrupt { key: String, detail: String },
    #[error(
        "the snapshot version mark {path} is corrupt: {detail}. It holds the highest snapshot \
         version ever served or published from this dir, so that no version is reused: write \
         `version <n>` with n at least the last version readers saw, or delete the file if none \
         beyond what the dir holds was"
    )]
    CorruptVersionMark { path: PathBuf, detail: String },
    #[error(
        "cannot read or write the snapshot version mark {path}: {source} (is the disk full or read-only?)"
    )]
    VersionMarkIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state dir {path} was built with {field} = {stored}, but the config says {configured}; \
         use a new [state] dir or set {field} back to {stored}"
    )]
    Mismatch {
        path: PathBuf,
        field: &'static str,
        stored: String,
        configured: String,
    },
    #[error(
        "state dir format {found} is not supported (this build reads formats 1 to {DECAYING_STATE_FORMAT}); it was written by a newer segmenter"
    )]
    Format { found: u32 },
    #[error(
        "an earlier write to the state dir failed (its error was reported then); nothing more is \
         written: restart once its cause is fixed, the state dir resumes at the last successful commit"
    )]
    Failed,
    #[error(
        "state dir {path} was built with [events] half_life = {stored}, but the config says \
         {configured}; its stored values are scaled by that half-life, so set events.half_life \
         back to {stored} (SEGMENTER_EVENTS__HALF_LIFE) or use a new [state] dir"
    )]
    HalfLifeMismatch {
        path: PathBuf,
        stored: String,
        configured: String,
    },
    #[error(
        "state dir {path} was built with [events] transform = \"{stored}\", but the config says \
         \"{configured}\"; its model, segments and snapshots are of the \"{stored}\" values \
         (an unset transform is the mode's default), so set events.transform = \"{stored}\" \
         (SEGMENTER_EVENTS__TRANSFORM) or use a new [state] dir (replay the events into it to \
         segment them with \"{configured}\")"
    )]
    TransformMismatch {
        path: PathBuf,
        stored: ValueTransform,
        configured: ValueTransform,
    },
}

impl From<sled::Error> for StoreError {
    /// sled's own corruption reports name corrupt data, not a failing disk.
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => StoreError::Damaged(e),
            e => StoreError::Io(e),
        }
    }
}

/// The model settings that must not change under an existing state dir.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Identity {
    mode: Mode,
    components: usize,
    clusters: usize,
    /// `[events] half_life` in seconds: the stored values are scaled by it. Absent (off) in
    /// state dirs written before forgetting existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    half_life_seconds: Option<u64>,
    /// `[events] transform`: the model, labels and snapshots were computed on the values it
    /// gives. Absent (none) in state dirs written before transforms existed.
    #[serde(default, skip_serializing_if = "ValueTransform::is_identity")]
    transform: ValueTransform,
}

/// The three stores of one state dir, opened together by [`open`].
pub struct Stores {
    pub state: StateStore,
    pub snapshots: SnapshotStore,
    pub catalogue: Catalogue,
}

/// Opens (creating if needed) the state dir and checks its format.
pub fn open(path: &Path) -> Result<Stores, StoreError> {
    let database = Arc::new(Database::open(path)?);
    // The format first: a newer build's records may not even parse here.
    match database.get_json::<u32>("format")? {
        Some(f) if !READABLE_FORMATS.contains(&f) => {
            return Err(StoreError::Format { found: f });
        }
        Some(f) if f >= STATE_FORMAT => {}
        // Marked with the first write, not here: a dir only read (`snapshot list --state-dir`)
        // stays readable by the build that wrote it.
        _ => database.mark_format(STATE_FORMAT),
    }
    let state = StateStore::new(database.clone())?;
    Ok(Stores {
        state,
        snapshots: SnapshotStore::open(database.clone())?,
        catalogue: Catalogue::new(database),
    })
}

/// The sled database the three stores share.
struct Database {
    db: sled::Db,
    tree: sled::Tree,
    path: PathBuf,
    /// A write failed (full disk, I/O error): what sled holds in memory can never be made
    /// durable, and its flush on drop would wait for ever. Shared by the three stores, since
    /// they write to the same database.
    failed: AtomicBool,
    /// The format the next write records (0: the dir says it already).
    unmarked: AtomicU32,
}

impl Drop for Database {
    fn drop(&mut self) {
        if self.failed.load(Ordering::Relaxed) {
            // Keep sled's handles alive past the process's end instead of letting their drop
            // block on a flush that cannot succeed; the state dir holds every earlier commit.
            std::mem::forget(self.db.clone());
            std::mem::forget(self.tree.clone());
        }
    }
}

fn key(prefix: u8, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + id.len());
    k.push(prefix);
    k.push(b'/');
    k.extend_from_slice(id);
    k
}

fn meta(name: &str) -> Vec<u8> {
    key(b'm', name.as_bytes())
}

fn corrupt(key: &[u8], detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        detail: detail.into(),
    }
}

impl Database {
    /// Has the next write record `format`, unless a higher one is already due.
    fn mark_format(&self, format: u32) {
        self.unmarked.fetch_max(format, Ordering::Relaxed);
    }

    fn open(path: &Path) -> Result<Database, StoreError> {
        // sled releases its file lock from a background thread shortly after the previous
        // holder drops it; a lock held by a live process stays "busy" past the deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let db = loop {
            match sled::Config::new()
                .path(path)
                .mode(sled::Mode::HighThroughput)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    return Err(StoreError::Locked {
                        path: path.to_path_buf(),
                    });
                }
                Err(source) => return Err(open_error(path, source)),
            }
        };
        let tree = db.open_tree("state").map_err(|e| open_error(path, e))?;
        Ok(Database {
            db,
            tree,
            path: path.to_path_buf(),
            failed: AtomicBool::new(false),
            unmarked: AtomicU32::new(0),
        })
    }

    /// Applies `batch` atomically and flushes it to disk; the first write also marks the dir
    /// with this build's format. A failure marks the database failed: nothing more is written
    /// and dropping it does not block.
    fn write(&self, mut batch: sled::Batch) -> Result<(), StoreError> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(StoreError::Failed);
        }
        let format = self.unmarked.swap(0, Ordering::Relaxed);
        if format != 0 {
            batch.insert(
                meta("format"),
                serde_json::to_vec(&format).unwrap_or_default(),
            );
        }
        let written = self
            .tree
            .apply_batch(batch)
            .and_then(|()| self.db.flush().map(|_| ()));
        if written.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        Ok(written?)
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        let k = meta(name);
        match self.tree.get(&k)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| corrupt(&k, e.to_string())),
        }
    }

    /// Checks the stored model identity against the config (or records it on first use).
    fn check_identity(&self, params: &EngineParams) -> Result<(), StoreError> {
        if params.half_life_seconds.is_some()
            && self.get_json::<u32>("format")?.unwrap_or(0) < DECAYING_STATE_FORMAT
        {
            self.mark_format(DECAYING_STATE_FORMAT);
        }
        let configured = Identity {
            mode: params.mode,
            components: params.components,
            clusters: params.clusters,
            half_life_seconds: params.half_life_seconds,
            transform: params.transform,
        };
        let Some(stored) = self.get_json::<Identity>("identity")? else {
            self.tree.insert(
                meta("identity"),
                serde_json::to_vec(&configured).unwrap_or_default(),
            )?;
            self.db.flush()?;
            return Ok(());
        };
        let mismatch = |field, stored: String, configured: String| StoreError::Mismatch {
            path: self.path.clone(),
            field,
            stored,
            configured,
        };
        if stored.mode != configured.mode {
            return Err(mismatch(
                "[events] mode",
                stored.mode.to_string(),
                configured.mode.to_string(),
            ));
        }
        if stored.components != configured.components {
            return Err(mismatch(
                "[model] components",
                stored.components.to_string(),
                configured.components.to_string(),
            ));
        }
        if stored.clusters != configured.clusters {
            return Err(mismatch(
                "[model] clusters",
                stored.clusters.to_string(),
                configured.clusters.to_string(),
            ));
        }
        if stored.half_life_seconds != configured.half_life_seconds {
            let describe = |h: Option<u64>| {
                h.map_or("off (unset)".to_string(), |h| {
                    format!("\"{}\"", crate::engine::decay::format_half_life(h))
                })
            };
            return Err(StoreError::HalfLifeMismatch {
                path: self.path.clone(),
                stored: describe(stored.half_life_seconds),
                configured: describe(configured.half_life_seconds),
            });
        }
        if stored.transform != configured.transform {
            return Err(StoreError::TransformMismatch {
                path: self.path.clone(),
                stored: stored.transform,
                configured: configured.transform,
            });
        }
        Ok(())
    }
}

/// Why sled could not open `path`: what it found corrupt is named as such, not as a permission
/// or disk problem.
fn open_error(path: &Path, source: sled::Error) -> StoreError {
    let path = path.to_path_buf();
    let unreadable = match &source {
        sled::Error::Corruption { .. } => true,
        // A truncated or garbled file reads as an unexpected end or invalid data.
        sled::Error::Io(e) => matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
        ),
        _ => false,
    };
    if unreadable {
        StoreError::Unreadable { path, source }
    } else {
        StoreError::Open { path, source }
    }
}

fn index_u32(k: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(k.get(2..6)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruption_sled_reports_is_named_corruption_not_a_disk_or_another_process() {
        let corruption = || sled::Error::Corruption { at: None, bt: () };
        for error in [
            StoreError::from(corruption()),
            open_error(Path::new("/data/state"), corruption()),
            open_error(
                Path::new("/data/state"),
                sled::Error::Io(std::io::ErrorKind::UnexpectedEof.into()),
            ),
        ] {
            let message = error.to_string();
            assert!(message.contains("corrupt"), "{message}");
            assert!(
                message.contains("restore the state dir from a backup"),
                "{message}"
            );
            for misleading in ["disk", "another", "writable"] {
                assert!(!message.contains(misleading), "{misleading}: {message}");
            }
        }
        // What is a disk problem still says so.
        let io = StoreError::from(sled::Error::Io(std::io::ErrorKind::StorageFull.into()));
        assert!(io.to_string().contains("disk full"), "{io}");
    }

    #[test]
    fn a_dir_held_by_another_holder_is_named_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _held = open(dir.path()).unwrap();
        let error = open(dir.path()).err().expect("the lock is held");
        assert!(matches!(error, StoreError::Locked { .. }), "{error}");
        assert!(
            error.to_string().contains("in use by another process"),
            "{error}"
        );
    }
}
