//! Engine state and source positions: ids, user vectors (chunked checkpoints plus the cell
//! log), labels (array plus label log), the model, counters and offsets. A commit encodes all
//! of them into one atomic batch, so they live together.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::engine::{Counters, Engine, EngineParams, PersistedModel, RestoredState, SparseVec};

use super::changes::{ChangeTracker, Changes, UserSet};
use super::{Database, StoreError, cells, corrupt, index_u32, key, meta};

/// The engine state and the source offsets. Commits are prepared on the thread that applies
/// and written, in the order they were prepared, by a writer (see [`StateStore::write_commit`]).
pub struct StateStore {
    db: Arc<Database>,
    log: Mutex<LogState>,
    checkpoint_cells: AtomicU64,
}

/// One commit's atomic batch, encoded but not yet written (see [`StateStore::prepare_commit`]).
pub struct PreparedCommit {
    batch: sled::Batch,
    /// The cell-log record to add to the batch (key, cells): encoded by the thread that writes
    /// the commit, not by the one applying events.
    log_record: Option<LogRecord>,
}

impl PreparedCommit {
    /// Records, in the same atomic batch, the partition each of `users` (index, partition)
    /// came from: whom to drop or restore when a partition moves.
    pub fn record_user_partitions(&mut self, users: &[(u32, i32)]) {
        for &(u, partition) in users {
            self.batch.insert(
                key(b'q', &u.to_be_bytes()),
                partition.to_be_bytes().to_vec(),
            );
        }
    }
}

/// A cell-log record not yet encoded: its key and its cells (user, item, value).
type LogRecord = (Vec<u8>, Vec<(u32, u32, f64)>);

/// The engine as the state dir holds it, and the tracker its changes are reported to from
/// there on (the one to hand to [`StateStore::prepare_commit`]).
pub struct LoadedEngine {
    pub engine: Engine,
    pub changes: ChangeTracker,
}

/// Where the change log stands: the next record number and the cells logged since the last
/// checkpoint.
#[derive(Debug, Default)]
struct LogState {
    next_seq: u64,
    cells: u64,
    /// Next sequence number of the label log (`k/…`: changed labels over the stored array).
    next_label_seq: u64,
}

/// Label-log records kept before the whole label array is rewritten instead.
const LABEL_LOG_RECORDS: u64 = 1_000;

/// Default `[state] checkpoint_cells`.
pub const DEFAULT_CHECKPOINT_CELLS: u64 = 4_000_000;

/// The sequence number of a log record's key (`l/…` cells, `k/…` labels).
fn log_sequence(key: &[u8]) -> Result<u64, StoreError> {
    key.get(2..10)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt(key, "bad log key"))
}

impl LogState {
    /// The key of the next cell-log record (`l/<seq>`), counting its `cells` as logged; the
    /// record holds their current values in the compact encoding (about 4 bytes a cell).
    fn next_record(&mut self, cells: Vec<(u32, u32, f64)>) -> LogRecord {
        let key = key(b'l', &self.next_seq.to_be_bytes());
        self.next_seq += 1;
        self.cells += cells.len() as u64;
        (key, cells)
    }

    /// Where the logs stand in `tree`: the next record numbers and the cells logged.
    fn scan(tree: &sled::Tree) -> Result<LogState, StoreError> {
        let mut log = LogState::default();
        for entry in tree.scan_prefix(b"l/") {
            let (k, v) = entry?;
            log.next_seq = log.next_seq.max(log_sequence(&k)? + 1);
            log.cells += if cells::is_compact(&v) {
                cells::log_cell_count(&v).ok_or_else(|| corrupt(&k, "bad log record"))?
            } else {
                (v.len() / LOG_CELL_BYTES) as u64
            };
        }
        for entry in tree.scan_prefix(b"k/") {
            let (k, _) = entry?;
            log.next_label_seq = log.next_label_seq.max(log_sequence(&k)? + 1);
        }
        Ok(log)
    }
}

impl StateStore {
    pub(super) fn new(db: Arc<Database>) -> Result<StateStore, StoreError> {
        let log = LogState::scan(&db.tree)?;
        Ok(StateStore {
            db,
            log: Mutex::new(log),
            checkpoint_cells: AtomicU64::new(DEFAULT_CHECKPOINT_CELLS),
        })
    }

    /// The state dir.
    pub fn path(&self) -> &std::path::Path {
        &self.db.path
    }

    /// Sets `[state] checkpoint_cells`.
    pub fn set_checkpoint_cells(&self, cells: u64) {
        self.checkpoint_cells.store(cells.max(1), Ordering::Relaxed);
    }

    /// Loads the engine state (an empty engine for a new state dir) and its change tracker.
    pub fn load_engine(&self, params: EngineParams) -> Result<LoadedEngine, StoreError> {
        self.db.check_identity(&params)?;
        let items = self.load_ids(b"i/", "item")?;
        let users = self.load_ids(b"n/", "user")?;
        let mut state = RestoredState {
            vectors: vec![SparseVec::default(); users.len()],
            items,
            users,
            ..RestoredState::default()
        };
        // Users whose checkpoint record is older than their vector: the next checkpoint
        // rewrites them.
        let mut stale = UserSet::default();
        if self.restore_legacy_vectors(&mut state)? {
            // The next checkpoint writes every user in chunks and drops the per-user records.
            (0..state.users.len() as u32).for_each(|u| stale.insert(u));
        }
        self.restore_chunked_vectors(&mut state)?;
        self.replay_cell_log(&mut state, &mut stale)?;
        self.restore_labels(&mut state, params.clusters)?;
        state.counters = self
            .db
            .get_json::<Counters>("counters")?
            .unwrap_or_default();
        state.decay = self.load_decay()?;
        if let Some(model) = self.load_model(params.components, state.items.len())? {
            state.model = model;
        }
        let engine = Engine::restore(params, state);
        let changes = ChangeTracker::loaded(&engine, stale);
        Ok(LoadedEngine { engine, changes })
    }

    /// The ids stored under `prefix` (`i/` items, `n/` users), in index order; `what` names
    /// them in errors.
    fn load_ids(&self, prefix: &[u8], what: &str) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        for entry in self.db.tree.scan_prefix(prefix) {
            let (k, v) = entry?;
            let index = index_u32(&k).ok_or_else(|| corrupt(&k, format!("bad {what} key")))?;
            if index as usize != ids.len() {
                return Err(corrupt(&k, format!("{what} ids are not contiguous")));
            }
            ids.push(
                String::from_utf8(v.to_vec())
                    .map_err(|_| corrupt(&k, format!("{what} id is not UTF-8")))?,
            );
        }
        Ok(ids)
    }

    /// Restores the per-user vector records (`u/…`) of a state dir written before chunks;
    /// returns whether there were any.
    fn restore_legacy_vectors(&self, state: &mut RestoredState) -> Result<bool, StoreError> {
        let mut legacy_records = false;
        for entry in self.db.tree.scan_prefix(b"u/") {
            legacy_records = true;
            let (k, v) = entry?;
            let u = index_u32(&k).ok_or_else(|| corrupt(&k, "bad user key"))? as usize;
            let x = decode_vector(&v).ok_or_else(|| corrupt(&k, "bad user vector"))?;
            if u >= state.vectors.len() || names_unknown_item(&x, state.items.len()) {
                return Err(corrupt(&k, "vector of an unknown user or item"));
            }
            state.vectors[u] = x;
        }
        Ok(legacy_records)
    }

    /// Restores the checkpointed vectors from their 1024-user chunks (`v/…`).
    fn restore_chunked_vectors(&self, state: &mut RestoredState) -> Result<(), StoreError> {
        for entry in self.db.tree.scan_prefix(b"v/") {
            let (k, v) = entry?;
            let chunk = index_u32(&k).ok_or_else(|| corrupt(&k, "bad chunk key"))? as usize;
            let vectors = decode_chunk(&v).ok_or_else(|| corrupt(&k, "bad user vectors"))?;
            let first = chunk * CHECKPOINT_CHUNK_USERS;
            if vectors.len() > CHECKPOINT_CHUNK_USERS
                || first + vectors.len() > state.vectors.len()
                || vectors
                    .iter()
                    .any(|x| names_unknown_item(x, state.items.len()))
            {
                return Err(corrupt(&k, "vectors of an unknown user or item"));
            }
            for (i, x) in vectors.into_iter().enumerate() {
                state.vectors[first + i] = x;
            }
        }
        Ok(())
    }

    /// Replays the cell log (`l/…`), oldest first, over the checkpoint; the users it names are
    /// added to `stale`.
    fn replay_cell_log(
        &self,
        state: &mut RestoredState,
        stale: &mut UserSet,
    ) -> Result<(), StoreError> {
        for entry in self.db.tree.scan_prefix(b"l/") {
            let (k, v) = entry?;
            let logged = decode_log_record(&v).ok_or_else(|| corrupt(&k, "bad log record"))?;
            for (u, j, value) in logged {
                let x = state
                    .vectors
                    .get_mut(u as usize)
                    .ok_or_else(|| corrupt(&k, "log names an unknown user"))?;
                stale.insert(u);
                if j as usize >= state.items.len() || !value.is_finite() {
                    return Err(corrupt(
                        &k,
                        "log names an unknown item or a non-finite value",
                    ));
                }
                set_cell(x, j, value);
            }
        }
        Ok(())
    }

    /// Restores the label array (`m/labels`) and applies the label log (`k/…`) over it. Every
    /// label must name one of `clusters` segments (or none): an index past them would only
    /// fail later, deep in the model.
    fn restore_labels(&self, state: &mut RestoredState, clusters: usize) -> Result<(), StoreError> {
        let valid = |label: u32| label == crate::engine::NO_CLUSTER || (label as usize) < clusters;
        let k = meta("labels");
        if let Some(bytes) = self.db.tree.get(&k)? {
            let (labels, rest) = bytes.as_chunks::<4>();
            if !rest.is_empty() {
                return Err(corrupt(&k, "trailing bytes after the last label"));
            }
            if labels.len() > state.users.len() {
                return Err(corrupt(&k, "labels of unknown users"));
            }
            state.labels = labels.iter().map(|&b| u32::from_le_bytes(b)).collect();
            if let Some(u) = state.labels.iter().position(|&l| !valid(l)) {
                return Err(corrupt(
                    &k,
                    format!(
                        "user {u} has label {}, but there are {clusters} segments",
                        state.labels[u]
                    ),
                ));
            }
        }
        // Changed labels since the array was written, oldest first.
        for entry in self.db.tree.scan_prefix(b"k/") {
            let (k, v) = entry?;
            let (pairs, rest) = v.as_chunks::<8>();
            if !rest.is_empty() {
                return Err(corrupt(&k, "bad label log record"));
            }
            for pair in pairs {
                let u = u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]) as usize;
                let label = u32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]);
                if u >= state.users.len() {
                    return Err(corrupt(&k, "label log names an unknown user"));
                }
                if !valid(label) {
                    return Err(corrupt(
                        &k,
                        format!("user {u} has label {label}, but there are {clusters} segments"),
                    ));
                }
                if state.labels.len() <= u {
                    state.labels.resize(u + 1, crate::engine::NO_CLUSTER);
                }
                state.labels[u] = label;
            }
        }
        Ok(())
    }

    /// The persisted model (`m/model`) with its basis and warm block (stored as raw floats),
    /// checked against the shape it claims: `components` rows over at most `items` items.
    fn load_model(
        &self,
        components: usize,
        items: usize,
    ) -> Result<Option<PersistedModel>, StoreError> {
        let Some(mut model) = self.db.get_json::<PersistedModel>("model")? else {
            return Ok(None);
        };
        let floats = |name: &str| -> Result<Vec<f64>, StoreError> {
            let k = meta(name);
            let Some(bytes) = self.db.tree.get(&k)? else {
                return Ok(vec![]);
            };
            let (values, rest) = bytes.as_chunks::<8>();
            if !rest.is_empty() {
                return Err(corrupt(&k, "trailing bytes after the last value"));
            }
            let values: Vec<f64> = values.iter().map(|&b| f64::from_le_bytes(b)).collect();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(corrupt(&k, "a non-finite value"));
            }
            Ok(values)
        };
        model.basis = floats("basis")?;
        model.warm_block = floats("warm_block")?;
        let misshapen = |name: &str, detail: String| Err(corrupt(&meta(name), detail));
        if model.basis_items > items || model.mean.len() > items {
            return misshapen(
                "model",
                format!(
                    "a model over {} items (mean over {}), but the state has {items}",
                    model.basis_items,
                    model.mean.len()
                ),
            );
        }
        if !model.basis.is_empty() && model.basis.len() != components * model.basis_items {
            return misshapen(
                "basis",
                format!(
                    "{} values for {components} components over {} items",
                    model.basis.len(),
                    model.basis_items
                ),
            );
        }
        if !model.warm_block.is_empty()
            && model.warm_block.len() != model.warm_rows * model.basis_items
        {
            return misshapen(
                "warm_block",
                format!(
                    "{} values for {} rows over {} items",
                    model.warm_block.len(),
                    model.warm_rows,
                    model.basis_items
                ),
            );
        }
        Ok(Some(model))
    }

    /// Where event time stands (`m/decay`); its event weight scales every figure, so it must
    /// be a finite, non-negative number.
    fn load_decay(&self) -> Result<crate::engine::decay::DecayClock, StoreError> {
        let decay: crate::engine::decay::DecayClock =
            self.db.get_json("decay")?.unwrap_or_default();
        if !(decay.scaled_events.is_finite() && decay.scaled_events >= 0.0) {
            return Err(corrupt(
                &meta("decay"),
                format!("event weight {}", decay.scaled_events),
            ));
        }
        Ok(decay)
    }

    /// The source partition of each user whose events came from Kafka with a changelog on
    /// (user index → partition), as commits recorded them (see
    /// [`PreparedCommit::record_user_partitions`]).
    pub fn user_partitions(&self) -> Result<rustc_hash::FxHashMap<u32, i32>, StoreError> {
        let mut partitions = rustc_hash::FxHashMap::default();
        for entry in self.db.tree.scan_prefix(b"q/") {
            let (k, v) = entry?;
            let user = index_u32(&k).ok_or_else(|| corrupt(&k, "bad user-partition key"))?;
            let partition = v
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map(i32::from_be_bytes)
                .ok_or_else(|| corrupt(&k, "bad user-partition value"))?;
            partitions.insert(user, partition);
        }
        Ok(partitions)
    }

    /// Source offsets (`topic/partition` → next offset) of the last commit.
    pub fn offsets(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let offsets: BTreeMap<String, i64> = self.db.get_json("offsets")?.unwrap_or_default();
        if let Some((source, offset)) = offsets.iter().find(|(_, offset)| **offset < 0) {
            return Err(corrupt(
                &meta("offsets"),
                format!("negative position {offset} for {source}"),
            ));
        }
        Ok(offsets)
    }

    /// Persists everything `engine` reported to `tracker` since the last commit, plus
    /// `offsets`, in one atomic batch, then flushes to disk. Only after this returns may offsets
    /// be acknowledged.
    pub fn commit(
        &self,
        engine: &Engine,
        tracker: &mut ChangeTracker,
        offsets: Option<&BTreeMap<String, i64>>,
    ) -> Result<(), StoreError> {
        let commit = self.prepare_commit(engine, tracker, offsets)?;
        self.write_commit(commit)
    }

    /// Writes and flushes a commit from [`StateStore::prepare_commit`]. Commits must be written in
    /// the order they were prepared (each may drop log records the previous ones wrote).
    pub fn write_commit(&self, commit: PreparedCommit) -> Result<(), StoreError> {
        let mut batch = commit.batch;
        if let Some((key, cells)) = commit.log_record {
            batch.insert(key, cells::encode_log_cells(cells.into_iter()));
        }
        self.db.write(batch)
    }

    /// The first half of [`StateStore::commit`]: takes the changes `engine` reported to
    /// `tracker` and encodes them into one atomic batch, without writing it. A replay hands its
    /// batches to a writer thread, so the disk works while the next events are applied.
    pub fn prepare_commit(
        &self,
        engine: &Engine,
        tracker: &mut ChangeTracker,
        offsets: Option<&BTreeMap<String, i64>>,
    ) -> Result<PreparedCommit, StoreError> {
        let mut changes = tracker.take(engine);
        let mut batch = sled::Batch::default();
        for i in changes.new_items.clone() {
            batch.insert(key(b'i', &i.to_be_bytes()), engine.items().id(i).as_bytes());
        }
        for u in changes.new_users.clone() {
            batch.insert(key(b'n', &u.to_be_bytes()), engine.users().id(u).as_bytes());
        }
        let mut log = self
            .log
            .lock()
            .map_err(|_| corrupt(b"l/", "log state poisoned"))?;
        let mut log_record = None;
        // A checkpoint rewrites every user changed since the last one, up to the whole data:
        // letting the log grow to the size of the ratings first keeps the bytes written per
        // change bounded (at most about twice the log) however large the data is.
        let threshold = self
            .checkpoint_cells
            .load(Ordering::Relaxed)
            .max(engine.ratings());
        if log.cells + changes.cells.len() as u64 >= threshold {
            let users = tracker.take_checkpoint_users();
            self.encode_checkpoint(engine, &users, &mut log, &mut batch)?;
        } else if !changes.cells.is_empty() {
            log_record = Some(log.next_record(std::mem::take(&mut changes.cells)));
        }
        encode_labels(engine, &changes, &mut log, &mut batch);
        if changes.model {
            encode_model(engine, &mut batch);
        }
        batch.insert(
            meta("counters"),
            serde_json::to_vec(&engine.counters()).unwrap_or_default(),
        );
        if engine.params().half_life_seconds.is_some() {
            // The scale of the stored values: with the cells in one batch, so a rebase (every
            // cell rescaled) is durable together with the origin it moved.
            batch.insert(
                meta("decay"),
                serde_json::to_vec(&engine.decay()).unwrap_or_default(),
            );
        }
        if let Some(offsets) = offsets {
            batch.insert(
                meta("offsets"),
                serde_json::to_vec(offsets).unwrap_or_default(),
            );
        }
        Ok(PreparedCommit { batch, log_record })
    }

    /// Checkpoint: rewrites the chunks of `users` (every user changed since the last one,
    /// ascending) and drops the cell log (and any per-user records of a state dir written
    /// before chunks).
    fn encode_checkpoint(
        &self,
        engine: &Engine,
        users: &[u32],
        log: &mut LogState,
        batch: &mut sled::Batch,
    ) -> Result<(), StoreError> {
        let mut chunks: Vec<usize> = users
            .iter()
            .map(|&u| u as usize / CHECKPOINT_CHUNK_USERS)
            .collect();
        chunks.dedup();
        let users = engine.users().len();
        let mut record = Vec::new();
        for chunk in chunks {
            let first = chunk * CHECKPOINT_CHUNK_USERS;
            let end = (first + CHECKPOINT_CHUNK_USERS).min(users);
            encode_chunk(
                (first..end).map(|u| engine.stored_vector(u as u32)),
                &mut record,
            );
            batch.insert(key(b'v', &(chunk as u32).to_be_bytes()), record.as_slice());
        }
        // Vectors of a state dir written before chunks: superseded by the chunks above
        // (every user of such a dir was restored from them, so every chunk is rewritten).
        for legacy in self.db.tree.scan_prefix(b"u/").keys() {
            batch.remove(legacy?);
        }
        for seq in 0..log.next_seq {
            batch.remove(key(b'l', &seq.to_be_bytes()));
        }
        log.next_seq = 0;
        log.cells = 0;
        Ok(())
    }
}

/// Whether `x` names an item index at or past `items` (its indices are ascending).
fn names_unknown_item(x: &SparseVec, items: usize) -> bool {
    x.idx.last().is_some_and(|&j| j as usize >= items)
}

/// Sets cell `j` of `x` to `value` (zero removes it), keeping the indices ascending.
fn set_cell(x: &mut SparseVec, j: u32, value: f64) {
    match (x.idx.binary_search(&j), value == 0.0) {
        (Ok(p), true) => {
            x.idx.remove(p);
            x.val.remove(p);
        }
        (Ok(p), false) => x.val[p] = value,
        (Err(_), true) => {}
        (Err(p), false) => {
            x.idx.insert(p, j);
            x.val.insert(p, value);
        }
    }
}

/// The cells of a log record, compact or (written before compact records) 16 bytes a cell.
fn decode_log_record(record: &[u8]) -> Option<Vec<(u32, u32, f64)>> {
    if cells::is_compact(record) {
        return cells::decode_log_cells(record);
    }
    if !record.len().is_multiple_of(LOG_CELL_BYTES) {
        return None;
    }
    record
        .chunks_exact(LOG_CELL_BYTES)
        .map(|cell| {
            let (u, rest) = cell.split_first_chunk::<4>()?;
            let (j, value) = rest.split_first_chunk::<4>()?;
            Some((
                u32::from_le_bytes(*u),
                u32::from_le_bytes(*j),
                f64::from_le_bytes(value.try_into().ok()?),
            ))
        })
        .collect()
}

/// Writes the changed labels: a label-log record (`k/<seq>`) for a few users, or the whole
/// array (dropping the label log) at model changes (re-clusterings among them) or after a long
/// label log.
fn encode_labels(engine: &Engine, changes: &Changes, log: &mut LogState, batch: &mut sled::Batch) {
    let rewrite_labels = changes.model || log.next_label_seq >= LABEL_LOG_RECORDS;
    if !rewrite_labels && !changes.labels.is_empty() {
        // Only the labels that changed: the whole array is rewritten at re-clusterings.
        let labels = engine.model().labels();
        let mut record = Vec::with_capacity(changes.labels.len() * 8);
        for &u in &changes.labels {
            record.extend_from_slice(&u.to_le_bytes());
            record.extend_from_slice(&labels[u as usize].to_le_bytes());
        }
        batch.insert(key(b'k', &log.next_label_seq.to_be_bytes()), record);
        log.next_label_seq += 1;
    }
    if rewrite_labels {
        for seq in 0..log.next_label_seq {
            batch.remove(key(b'k', &seq.to_be_bytes()));
        }
        log.next_label_seq = 0;
        let labels: Vec<u8> = engine
            .model()
            .labels()
            .iter()
            .flat_map(|l| l.to_le_bytes())
            .collect();
        batch.insert(meta("labels"), labels);
    }
}

/// Writes the model: its basis and warm block as raw floats, the rest as JSON.
fn encode_model(engine: &Engine, batch: &mut sled::Batch) {
    let persisted = engine.model().persisted();
    let floats =
        |values: &[f64]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
    batch.insert(meta("basis"), floats(&persisted.basis));
    batch.insert(meta("warm_block"), floats(&persisted.warm_block));
    batch.insert(
        meta("model"),
        serde_json::to_vec(&persisted).unwrap_or_default(),
    );
}

/// Users per checkpoint record (`v/<chunk>`).
const CHECKPOINT_CHUNK_USERS: usize = 1024;

/// A chunk in the compact encoding: `[magic][users]` then each user's vector (see
/// [`cells::put_vector`]): about 2-3 bytes a rating.
fn encode_chunk(
    vectors: impl ExactSizeIterator<Item = impl std::ops::Deref<Target = SparseVec>>,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(&cells::COMPACT_MAGIC);
    cells::put_varint(out, vectors.len() as u64);
    for x in vectors {
        cells::put_vector(out, &x.idx, &x.val);
    }
}

/// A chunk's vectors, compact or (written before compact chunks) `[users u32]` then each
/// vector as [`decode_vector`] reads it.
fn decode_chunk(bytes: &[u8]) -> Option<Vec<SparseVec>> {
    if cells::is_compact(bytes) {
        return decode_compact_chunk(&bytes[cells::COMPACT_MAGIC.len()..]);
    }
    let users = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let mut at = 4;
    let mut out = Vec::with_capacity(users.min(CHECKPOINT_CHUNK_USERS));
    for _ in 0..users {
        let nnz = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
        let len = 4 + 12 * nnz;
        out.push(decode_vector(bytes.get(at..at + len)?)?);
        at += len;
    }
    (at == bytes.len()).then_some(out)
}

fn decode_compact_chunk(bytes: &[u8]) -> Option<Vec<SparseVec>> {
    let mut r = cells::Reader::new(bytes);
    let users = r.varint()?;
    if users > CHECKPOINT_CHUNK_USERS as u64 {
        return None;
    }
    let mut out = Vec::with_capacity(users as usize);
    for _ in 0..users {
        let (idx, val) = r.vector()?;
        if val.iter().any(|v| !v.is_finite()) {
            return None;
        }
        out.push(SparseVec { idx, val });
    }
    r.is_empty().then_some(out)
}

/// A log cell: user u32, item u32, value f64 (0 = removed), little-endian.
const LOG_CELL_BYTES: usize = 16;

/// `[nnz u32][idx u32 x nnz][val f64 x nnz]`, little-endian (per-user records and chunks
/// written before compact chunks).
fn decode_vector(bytes: &[u8]) -> Option<SparseVec> {
    let read_u32 = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let nnz = read_u32(0)? as usize;
    let idx: Vec<u32> = (0..nnz)
        .map(|i| read_u32(4 + 4 * i))
        .collect::<Option<_>>()?;
    let at = 4 + 4 * nnz;
    let val: Vec<f64> = (0..nnz)
        .map(|i| {
            Some(f64::from_le_bytes(
                bytes.get(at + 8 * i..at + 8 * i + 8)?.try_into().ok()?,
            ))
        })
        .collect::<Option<_>>()?;
    if at + 8 * nnz != bytes.len()
        || idx.windows(2).any(|w| w[0] >= w[1])
        || val.iter().any(|v| !v.is_finite())
    {
        return None;
    }
    Some(SparseVec { idx, val })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SourceIds;
    use crate::event::RatingEvent;

    /// Opens the state dir at `dir` and loads its engine, checkpointing after `checkpoint_cells`
    /// logged cells (`None`: the default).
    fn reopen(
        dir: &std::path::Path,
        params: &crate::engine::EngineParams,
        checkpoint_cells: Option<u64>,
    ) -> (StateStore, Engine, ChangeTracker) {
        let store = super::super::open(dir).unwrap().state;
        if let Some(cells) = checkpoint_cells {
            store.set_checkpoint_cells(cells);
        }
        let LoadedEngine { engine, changes } = store.load_engine(params.clone()).unwrap();
        (store, engine, changes)
    }

    /// Applies `events`, reporting the changes to `changes` (as the pipeline does).
    fn apply(engine: &mut Engine, changes: &mut ChangeTracker, events: &[RatingEvent]) {
        engine.apply_with_source_ids(events, &mut SourceIds::default(), changes);
    }

    /// A vector as state dirs before compact chunks wrote it (see [`decode_vector`]).
    fn encode_vector(x: &SparseVec, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&(x.nnz() as u32).to_le_bytes());
        for j in &x.idx {
            out.extend_from_slice(&j.to_le_bytes());
        }
        for v in &x.val {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    #[test]
    fn a_state_dir_with_records_written_before_compact_ones_reads_and_continues() {
        use crate::engine::EngineParams;
        let dir = tempfile::tempdir().unwrap();
        let event = |i: usize| RatingEvent {
            user: format!("u{}", i % 1_500),
            item: format!("i{}", (i * 7) % 40),
            value: Some([1.0, 2.5, 0.3, 4.0, 5.0][i % 5]),
            ts: i as i64,
        };
        let params = EngineParams::default();
        let mut reference = Engine::new(params.clone());
        let (store, mut engine, mut changes) = reopen(dir.path(), &params, Some(1));
        let events: Vec<RatingEvent> = (0..9_000).map(event).collect();
        for (i, batch) in events.chunks(1_000).enumerate() {
            apply(&mut engine, &mut changes, batch);
            reference.apply(batch);
            // A checkpoint first, then log records on top of it.
            store.set_checkpoint_cells(if i == 0 { 1 } else { u64::MAX });
            store.commit(&engine, &mut changes, None).unwrap();
        }
        // Rewrite every chunk and log record as the earlier encoding had them.
        let mut batch = sled::Batch::default();
        let mut logged = 0;
        for entry in store.db.tree.scan_prefix(b"v/") {
            let (k, v) = entry.unwrap();
            assert!(cells::is_compact(&v));
            let vectors = decode_chunk(&v).unwrap();
            let mut legacy = (vectors.len() as u32).to_le_bytes().to_vec();
            let mut one = vec![];
            for x in &vectors {
                encode_vector(x, &mut one);
                legacy.extend_from_slice(&one);
            }
            batch.insert(k, legacy);
        }
        for entry in store.db.tree.scan_prefix(b"l/") {
            let (k, v) = entry.unwrap();
            let mut legacy = vec![];
            for (u, j, value) in decode_log_record(&v).unwrap() {
                legacy.extend_from_slice(&u.to_le_bytes());
                legacy.extend_from_slice(&j.to_le_bytes());
                legacy.extend_from_slice(&value.to_le_bytes());
                logged += 1;
            }
            batch.insert(k, legacy);
        }
        assert!(logged > 0, "the state dir holds log records");
        store.db.write(batch).unwrap();
        // As the earlier build left it: marked format 2.
        store
            .db
            .tree
            .insert(super::super::meta("format"), b"2".to_vec())
            .unwrap();
        store.db.db.flush().unwrap();
        drop(engine);
        drop(store);
        let (store, mut engine, mut changes) = reopen(dir.path(), &params, None);
        assert_eq!(
            engine.vectors(),
            reference.vectors(),
            "earlier records read"
        );
        let format = || store.db.get_json::<u32>("format").unwrap();
        assert_eq!(
            format(),
            Some(2),
            "reading leaves the dir to the build that wrote it"
        );
        let more: Vec<RatingEvent> = (9_000..12_000).map(event).collect();
        apply(&mut engine, &mut changes, &more);
        reference.apply(&more);
        store.commit(&engine, &mut changes, None).unwrap();
        assert_eq!(
            format(),
            Some(super::super::STATE_FORMAT),
            "marked by the first write"
        );
        drop(engine);
        drop(store);
        let (_, reopened, _) = reopen(dir.path(), &params, None);
        assert_eq!(
            reopened.vectors(),
            reference.vectors(),
            "continued over them"
        );
    }

    #[test]
    fn a_transformed_state_dir_keeps_the_summed_values_and_refuses_another_transform() {
        use crate::engine::{EngineParams, ValueTransform};
        use crate::event::Mode;
        let dir = tempfile::tempdir().unwrap();
        let params = EngineParams {
            mode: Mode::Implicit,
            max_value: 100.0,
            transform: ValueTransform::parse("sqrt+l2").unwrap(),
            components: 2,
            clusters: 2,
            ..EngineParams::default()
        };
        let event = |i: usize| RatingEvent {
            user: format!("u{}", i % 300),
            item: format!("i{}", (i * 7) % 40),
            value: Some([1.0, 2.0, 7.0, 3.0][i % 4]),
            ts: i as i64,
        };
        let mut reference = Engine::new(params.clone());
        let (store, mut engine, mut changes) = reopen(dir.path(), &params, Some(1));
        let events: Vec<RatingEvent> = (0..6_000).map(event).collect();
        for (i, batch) in events.chunks(1_000).enumerate() {
            apply(&mut engine, &mut changes, batch);
            reference.apply(batch);
            // Checkpoints (whole rows) and log records (cells) both.
            store.set_checkpoint_cells(if i % 2 == 0 { 1 } else { u64::MAX });
            store.commit(&engine, &mut changes, None).unwrap();
        }
        drop(engine);
        drop(store);
        let (store, mut engine, mut changes) = reopen(dir.path(), &params, None);
        assert_eq!(engine.vectors(), reference.vectors(), "transformed rows");
        assert_eq!(
            engine.stored_vectors(),
            reference.stored_vectors(),
            "summed plays, not their transform, are stored"
        );
        assert!(engine.stored_vector(0).val.iter().any(|&v| v > 1.0));
        // Plays keep adding up on the stored sums after the restart.
        let more: Vec<RatingEvent> = (6_000..9_000).map(event).collect();
        apply(&mut engine, &mut changes, &more);
        reference.apply(&more);
        assert_eq!(engine.vectors(), reference.vectors(), "continued");
        store.commit(&engine, &mut changes, None).unwrap();
        drop(engine);
        drop(store);
        let other = EngineParams {
            transform: ValueTransform::parse("log1p+l2").unwrap(),
            ..params
        };
        let refused = super::super::open(dir.path())
            .unwrap()
            .state
            .load_engine(other)
            .err()
            .expect("refused under another transform");
        let text = refused.to_string();
        assert!(
            text.contains("[events] transform = \"sqrt+l2\"") && text.contains("\"log1p+l2\""),
            "{text}"
        );
    }

    #[test]
    fn a_decaying_state_dir_is_marked_so_builds_without_forgetting_refuse_it() {
        use crate::event::RatingEvent;
        let dir = tempfile::tempdir().unwrap();
        let params = EngineParams {
            half_life_seconds: Some(86_400),
            components: 2,
            clusters: 2,
            ..EngineParams::default()
        };
        let (store, mut engine, mut changes) = reopen(dir.path(), &params, None);
        let events: Vec<RatingEvent> = (0..50)
            .map(|i| RatingEvent {
                user: format!("u{}", i % 9),
                item: format!("i{}", i % 5),
                value: Some(3.0),
                ts: 1_700_000_000 + i,
            })
            .collect();
        apply(&mut engine, &mut changes, &events);
        store.commit(&engine, &mut changes, None).unwrap();
        assert_eq!(
            store.db.get_json::<u32>("format").unwrap(),
            Some(super::super::DECAYING_STATE_FORMAT)
        );
        drop(engine);
        drop(store);
        // This build reads it back (and never marks it down); one without the half-life refuses.
        let (store, engine, _) = reopen(dir.path(), &params, None);
        assert_eq!(engine.ratings(), 45);
        drop(engine);
        drop(store);
        let plain = EngineParams {
            half_life_seconds: None,
            ..params
        };
        let refused = super::super::open(dir.path())
            .unwrap()
            .state
            .load_engine(plain)
            .err()
            .expect("refused without the half-life");
        assert!(refused.to_string().contains("half_life"), "{refused}");
    }

    #[test]
    fn vectors_round_trip_and_garbage_is_refused() {
        let x = SparseVec {
            idx: vec![1, 5, 9],
            val: vec![1.5, -2.0, 4.0],
        };
        let mut buf = vec![];
        encode_vector(&x, &mut buf);
        assert_eq!(decode_vector(&buf), Some(x));
        assert_eq!(decode_vector(&buf[..buf.len() - 1]), None);
        assert_eq!(decode_vector(b"\xff\xff\xff\xff"), None);
    }

    #[test]
    fn chunked_checkpoints_restore_many_users_and_replace_per_user_records() {
        use crate::engine::EngineParams;
        let dir = tempfile::tempdir().unwrap();
        // 2,600 users (three chunks) with three items each: the ratings stop growing after
        // 7,800 events, so the log catches up with them and checkpoints happen.
        let event = |i: usize| RatingEvent {
            user: format!("u{}", i % 2_600),
            item: format!("i{}", (i / 2_600) % 3),
            value: Some((i % 7 % 5 + 1) as f64),
            ts: i as i64,
        };
        let params = EngineParams::default();
        let mut reference = Engine::new(params.clone());
        let (store, mut engine, mut changes) = reopen(dir.path(), &params, Some(1));
        let first: Vec<RatingEvent> = (0..24_000).map(event).collect();
        for batch in first.chunks(1_000) {
            apply(&mut engine, &mut changes, batch);
            reference.apply(batch);
            store.commit(&engine, &mut changes, None).unwrap();
        }
        let chunks = store.db.tree.scan_prefix(b"v/").count();
        assert!(
            chunks >= 3,
            "users span several chunks: {chunks} chunks for {} users",
            engine.users().len()
        );
        // Rewrite the checkpoint as a state dir written before chunks had it: one key per user.
        let mut batch = sled::Batch::default();
        for k in store.db.tree.scan_prefix(b"v/").keys() {
            batch.remove(k.unwrap());
        }
        let mut record = Vec::new();
        for u in 0..reference.users().len() as u32 {
            encode_vector(reference.vector(u), &mut record);
            batch.insert(key(b'u', &u.to_be_bytes()), record.as_slice());
        }
        store.db.write(batch).unwrap();
        drop(engine);
        drop(store);
        let (store, mut engine, mut changes) = reopen(dir.path(), &params, None);
        assert_eq!(
            engine.vectors(),
            reference.vectors(),
            "per-user records restore"
        );
        store.set_checkpoint_cells(1);
        // Enough changes for the log to reach the data's size: a checkpoint.
        let second: Vec<RatingEvent> = (24_000..56_000).map(event).collect();
        for batch in second.chunks(4_000) {
            apply(&mut engine, &mut changes, batch);
            reference.apply(batch);
            store.commit(&engine, &mut changes, None).unwrap();
        }
        assert_eq!(
            store.db.tree.scan_prefix(b"u/").count(),
            0,
            "per-user records replaced"
        );
        drop(engine);
        drop(store);
        let (_, reopened, _) = reopen(dir.path(), &params, None);
        assert_eq!(
            reopened.vectors(),
            reference.vectors(),
            "after the chunked checkpoint"
        );
    }

    #[test]
    fn checkpoints_and_log_replay_restore_the_same_vectors() {
        use crate::engine::EngineParams;
        let dir = tempfile::tempdir().unwrap();
        let events: Vec<RatingEvent> = (0..500)
            .map(|i| RatingEvent {
                user: format!("u{}", i % 37),
                item: format!("i{}", (i * 7) % 53),
                value: if i % 11 == 0 {
                    None
                } else {
                    Some((i % 5 + 1) as f64)
                },
                ts: i,
            })
            .collect();
        let params = EngineParams::default();
        let mut reference = Engine::new(params.clone());
        // Reopen every few batches, so checkpoints happen after restarts with a pending log.
        for (round, chunk) in events.chunks(75).enumerate() {
            let (store, mut engine, mut changes) =
                reopen(dir.path(), &params, Some(40 + round as u64 * 7));
            assert_eq!(engine.vectors(), reference.vectors(), "round {round}");
            for batch in chunk.chunks(25) {
                apply(&mut engine, &mut changes, batch);
                reference.apply(batch);
                store.commit(&engine, &mut changes, None).unwrap();
            }
        }
        let (_, reopened, _) = reopen(dir.path(), &params, None);
        assert_eq!(reopened.vectors(), reference.vectors());
        assert_eq!(reopened.users().ids(), reference.users().ids());
    }

    /// A state dir with a few users and a clustered model (2 segments), closed.
    fn written_state(dir: &std::path::Path) -> EngineParams {
        let params = EngineParams {
            components: 2,
            clusters: 2,
            refresh_every_events: 100,
            ..EngineParams::default()
        };
        let (store, mut engine, mut changes) = reopen(dir, &params, None);
        let events: Vec<RatingEvent> = (0..300)
            .map(|i| RatingEvent {
                user: format!("u{}", i % 12),
                item: format!("i{}", (i * 7) % 9),
                value: Some((i % 5 + 1) as f64),
                ts: i,
            })
            .collect();
        apply(&mut engine, &mut changes, &events);
        store.commit(&engine, &mut changes, None).unwrap();
        assert!(
            engine.model().labels().iter().any(|&l| l < 2),
            "the model clustered the users"
        );
        params
    }

    /// Reopens `dir` after `damage` changed its database, and returns the load's error.
    fn load_error_after(
        dir: &std::path::Path,
        params: &EngineParams,
        damage: impl FnOnce(&sled::Tree),
    ) -> StoreError {
        {
            let stores = super::super::open(dir).unwrap();
            damage(&stores.state.db.tree);
            stores.state.db.db.flush().unwrap();
        }
        super::super::open(dir)
            .and_then(|stores| stores.state.load_engine(params.clone()).map(|_| ()))
            .expect_err("damage refused")
    }

    #[test]
    fn a_label_past_the_segments_is_refused_as_corruption_not_a_later_panic() {
        let dir = tempfile::tempdir().unwrap();
        let params = written_state(dir.path());
        // In the label array.
        let error = load_error_after(dir.path(), &params, |tree| {
            let mut labels = tree.get(meta("labels")).unwrap().unwrap().to_vec();
            labels[..4].copy_from_slice(&7u32.to_le_bytes());
            tree.insert(meta("labels"), labels).unwrap();
        });
        let message = error.to_string();
        assert!(
            matches!(error, StoreError::Corrupt { .. })
                && message.contains("m/labels")
                && message.contains("label 7, but there are 2 segments")
                && message.contains("restore the state dir from a backup"),
            "{message}"
        );
        // In the label log (the array itself repaired).
        let dir = tempfile::tempdir().unwrap();
        let params = written_state(dir.path());
        let error = load_error_after(dir.path(), &params, |tree| {
            let mut record = 3u32.to_le_bytes().to_vec();
            record.extend_from_slice(&2u32.to_le_bytes());
            tree.insert(key(b'k', &0u64.to_be_bytes()), record).unwrap();
        });
        assert!(error.to_string().contains("user 3 has label 2"), "{error}");
    }

    #[test]
    fn trailing_bytes_after_labels_or_model_floats_are_refused() {
        for name in ["labels", "basis", "warm_block"] {
            let dir = tempfile::tempdir().unwrap();
            let params = written_state(dir.path());
            let error = load_error_after(dir.path(), &params, |tree| {
                let mut bytes = tree.get(meta(name)).unwrap().unwrap_or_default().to_vec();
                bytes.push(0);
                tree.insert(meta(name), bytes).unwrap();
            });
            assert!(
                error.to_string().contains(&format!("m/{name}"))
                    && error.to_string().contains("trailing bytes"),
                "{name}: {error}"
            );
        }
    }

    #[test]
    fn a_model_whose_shape_or_values_do_not_fit_the_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let params = written_state(dir.path());
        // Eight bytes short: a whole value missing.
        let error = load_error_after(dir.path(), &params, |tree| {
            let bytes = tree.get(meta("basis")).unwrap().unwrap().to_vec();
            tree.insert(meta("basis"), &bytes[8..]).unwrap();
        });
        assert!(
            error.to_string().contains("values for 2 components"),
            "{error}"
        );
        let dir = tempfile::tempdir().unwrap();
        let params = written_state(dir.path());
        let error = load_error_after(dir.path(), &params, |tree| {
            let mut bytes = tree.get(meta("basis")).unwrap().unwrap().to_vec();
            bytes[..8].copy_from_slice(&f64::NAN.to_le_bytes());
            tree.insert(meta("basis"), bytes).unwrap();
        });
        assert!(error.to_string().contains("non-finite"), "{error}");
    }

    #[test]
    fn a_negative_source_position_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        written_state(dir.path());
        let stores = super::super::open(dir.path()).unwrap();
        stores
            .state
            .db
            .tree
            .insert(meta("offsets"), br#"{"ratings/0":-5}"#.to_vec())
            .unwrap();
        let error = stores.state.offsets().expect_err("refused");
        assert!(
            error
                .to_string()
                .contains("negative position -5 for ratings/0"),
            "{error}"
        );
    }
}
