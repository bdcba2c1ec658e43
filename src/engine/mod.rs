//! The segmentation engine: pure state and maths, no I/O. It applies batches of rating events
//! to sparse user vectors, keeps the exact covariance statistics, the PCA basis and the K-Means
//! clustering online, and refreshes the model every `refresh_every_events` events. Kafka, file
//! replay and tests all drive it through [`Engine::apply`]. It reports what it changes to a
//! [`ChangeSink`] and keeps no record of what was persisted.

mod admission;
pub mod cluster;
pub mod cow;
pub mod decay;
pub mod eigen;
mod ids;
pub mod kmeans;
pub mod matching;
pub mod model;
pub mod parallel;
mod params;
pub mod segment_sums;
pub mod stats;
pub mod transform;
mod view;

use serde::{Deserialize, Serialize};

use crate::event::{Mode, Rating, RejectReason, ValuePolicy};
pub use admission::{AdmissionGate, catalogue_full, population_full};
pub use cow::CowVec;
pub use decay::DecayClock;
pub use ids::{IdMap, Ids, SourceIds, SparseVec, stable_hash};
use kmeans::ClusteringParams;
use model::DataView;
pub use model::{
    Challenge, Model, NO_CLUSTER, PersistedModel, RefreshOutcome, Segmentation, WarmStart,
};
pub use params::{DEFAULT_MAX_ITEMS, DEFAULT_MAX_USERS, EngineParams};
pub use segment_sums::SegmentSums;
use stats::CovarianceStats;
pub use transform::{CellTransform, ValueTransform};
pub use view::{EngineView, PreviousSegments};

/// Fresh k-means++ starts competing with the online clustering at each periodic refresh.
const REFRESH_STARTS: usize = 2;

/// How many events ahead [`Engine::apply_with_source_ids`] asks for a user's data.
const PREFETCH_AHEAD: usize = 16;

/// k-means++ starts of the online model's first clustering.
const ONLINE_INIT_STARTS: usize = 3;

/// What one call to [`Engine::apply`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyOutcome {
    /// Events that passed the checks (including ones that changed nothing, e.g. a re-rating
    /// with the same value).
    pub applied: u64,
    pub rejected: Vec<(usize, RejectReason)>,
    pub refreshes: Vec<RefreshOutcome>,
}

/// Where the engine reports each change to the state that outlives it, as it makes it: whoever
/// persists the state (the store's `ChangeTracker`) keeps the record, so the engine needs no
/// notion of what was saved. Ids are only ever appended, so new users and items need no report:
/// they are those past the ones already saved.
pub trait ChangeSink {
    /// The value of `(user, item)` changed to `value` (zero: removed). Called once per changed
    /// cell, on the hot path: keep it to a push.
    fn cell_changed(&mut self, user: u32, item: u32, value: f64);
    /// `user`'s cluster label changed (online, between refreshes).
    fn label_changed(&mut self, user: u32);
    /// The model was refreshed or replaced: its basis, every projection and possibly every
    /// label changed.
    fn model_changed(&mut self);
}

/// An engine nobody persists (tests, benchmarks, [`Engine::apply`]) reports to nowhere.
impl ChangeSink for () {
    fn cell_changed(&mut self, _user: u32, _item: u32, _value: f64) {}
    fn label_changed(&mut self, _user: u32) {}
    fn model_changed(&mut self) {}
}

/// Counters persisted alongside the state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub events_applied: u64,
    pub events_since_refresh: u64,
    pub refreshes: u64,
}

#[derive(Debug, Clone)]
pub struct Engine {
    params: EngineParams,
    policy: ValuePolicy,
    users: IdMap,
    items: IdMap,
    /// The rows the recipe segments: the stored values transformed by `[events] transform`
    /// (the stored values themselves without one).
    vectors: CowVec<SparseVec>,
    /// The stored values (what events accumulate into and the store persists) when a
    /// transform is set; empty without one, where `vectors` holds them.
    raw: CowVec<SparseVec>,
    /// Users whose stored row changed since their transformed row was last computed (l2 rows
    /// only: one row rewrite per user per batch, not per event).
    unsettled: Vec<u32>,
    stats: CovarianceStats,
    ratings: u64,
    counters: Counters,
    model: Model,
    /// Event time and the scale of the stored values, when a half-life is set (see `decay`).
    decay: DecayClock,
    /// User indices sorted by id, as of the last refresh (users are only ever appended, so
    /// later ones are merged in rather than everything sorted again).
    sorted_users: Vec<u32>,
    /// The last snapshot's segments and the sums under them, kept in step with every change
    /// so the next snapshot pays only for what changed (the service; `None` for a replay,
    /// whose one snapshot computes them from scratch).
    segments: Option<TrackedSegments>,
}

/// Segments by user index and the [`SegmentSums`] of their members under them.
#[derive(Debug, Clone)]
pub struct TrackedSegments {
    pub labels: Vec<u32>,
    /// `[snapshot] holdout_percent`: who is held out of the Naive Bayes fit.
    pub holdout_percent: u64,
    pub sums: SegmentSums,
}

impl TrackedSegments {
    /// User `u`'s segment ([`NO_CLUSTER`] when in none, or past the labels).
    fn segment_of(&self, u: u32) -> u32 {
        self.labels.get(u as usize).copied().unwrap_or(NO_CLUSTER)
    }
}

/// Whether the user with id `id` is held out of the Naive Bayes fit (`percent` of the users,
/// chosen by a seeded hash of the id: the same users in every snapshot and on every instance).
pub fn held_out(id: &str, seed: u64, percent: u64) -> bool {
    stable_hash(id.as_bytes(), seed) % 100 < percent
}

impl Engine {
    pub fn new(params: EngineParams) -> Self {
        Engine {
            policy: params.policy(),
            model: Model::new(params.components, params.clusters),
            params,
            users: IdMap::default(),
            items: IdMap::default(),
            vectors: CowVec::default(),
            raw: CowVec::default(),
            unsettled: Vec::new(),
            stats: CovarianceStats::default(),
            ratings: 0,
            counters: Counters::default(),
            decay: DecayClock::default(),
            sorted_users: Vec::new(),
            segments: None,
        }
    }

    /// Keeps the sums of the segments `labels` (by user index; users past it in none) from now
    /// on, updated by every change and moved by [`Engine::adopt_segments`]. O(ratings), once.
    pub fn track_segments(&mut self, labels: &[u32], holdout_percent: u64) {
        let mut labels = labels.to_vec();
        labels.resize(self.vectors.len(), NO_CLUSTER);
        let (users, seed) = (&self.users, self.params.seed);
        let sums = SegmentSums::from_scratch(
            &self.vectors,
            &labels,
            self.params.clusters,
            self.items.len(),
            |u| held_out(users.id(u as u32), seed, holdout_percent),
        );
        self.segments = Some(TrackedSegments {
            labels,
            holdout_percent,
            sums,
        });
    }

    /// A new snapshot's segments replace the tracked ones: only the users whose segment
    /// changed are moved, O(their ratings). Nothing without [`Engine::track_segments`].
    pub fn adopt_segments(&mut self, labels: &[u32]) {
        let Some(tracked) = &mut self.segments else {
            return;
        };
        let (users, seed, percent) = (&self.users, self.params.seed, tracked.holdout_percent);
        tracked
            .sums
            .follow(&tracked.labels, labels, &self.vectors, |u| {
                held_out(users.id(u as u32), seed, percent)
            });
        tracked.labels = labels.to_vec();
        tracked.labels.resize(self.vectors.len(), NO_CLUSTER);
    }

    /// The tracked segments, if any.
    pub fn tracked_segments(&self) -> Option<&TrackedSegments> {
        self.segments.as_ref()
    }

    /// Rebuilds an engine from persisted state: statistics and projections are recomputed
    /// from the user vectors, so nothing but vectors, ids, labels, basis and counters is stored.
    pub fn restore(params: EngineParams, state: RestoredState) -> Self {
        let mut engine = Engine::new(params);
        let d = state.items.len();
        let transform = engine.params.transform;
        let vectors = if transform.is_identity() {
            state.vectors
        } else {
            let rows = state.vectors.iter().map(|x| transform.row(x)).collect();
            engine.raw = state.vectors.into();
            rows
        };
        engine.stats = CovarianceStats::from_vectors(&vectors, d);
        engine.ratings = vectors.iter().map(|v| v.nnz() as u64).sum();
        engine.users = IdMap::from_ids(state.users);
        engine.items = IdMap::from_ids(state.items);
        engine.vectors = vectors.into();
        engine.counters = state.counters;
        engine.decay = state.decay;
        let mut model = state.model;
        model.labels = state.labels;
        model.labels.resize(engine.vectors.len(), NO_CLUSTER);
        engine.model.restore(model, &engine.vectors, d);
        engine
    }

    pub fn params(&self) -> &EngineParams {
        &self.params
    }
    pub fn users(&self) -> &IdMap {
        &self.users
    }
    pub fn items(&self) -> &IdMap {
        &self.items
    }
    /// The rows the recipe segments (transformed, see [`transform`]).
    pub fn vectors(&self) -> &CowVec<SparseVec> {
        &self.vectors
    }
    /// `user`'s stored values, as events left them and the store persists them (before any
    /// transform).
    pub fn stored_vector(&self, user: u32) -> &SparseVec {
        &self.stored_vectors()[user as usize]
    }
    /// Every user's stored values (see [`Engine::stored_vector`]).
    pub fn stored_vectors(&self) -> &CowVec<SparseVec> {
        if self.params.transform.is_identity() {
            &self.vectors
        } else {
            &self.raw
        }
    }
    pub fn vector(&self, user: u32) -> &SparseVec {
        &self.vectors[user as usize]
    }
    pub fn stats(&self) -> &CovarianceStats {
        &self.stats
    }
    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn counters(&self) -> Counters {
        self.counters
    }
    /// Where event time stands and how the stored values are scaled (all defaults when no
    /// half-life is set).
    pub fn decay(&self) -> DecayClock {
        self.decay
    }
    /// The factor turning stored values into decayed ones (1 without a half-life): the true
    /// matrix is this times the stored vectors, see [`decay`].
    pub fn value_scale(&self) -> f64 {
        self.params
            .transform
            .scale_of(self.decay.value_scale(self.params.half_life_seconds))
    }
    /// Users with at least one rating.
    pub fn active_users(&self) -> u64 {
        self.stats.users()
    }
    /// Non-zero (user, item) cells.
    pub fn ratings(&self) -> u64 {
        self.ratings
    }

    /// Applies events in order. Events failing the value policy are skipped and reported;
    /// the rest change the state exactly as the mode says. Refreshes happen at exact event
    /// counts, so the result does not depend on how events are split into batches. The
    /// changes are not reported: for an engine nobody persists.
    pub fn apply(&mut self, events: &[impl Rating]) -> ApplyOutcome {
        self.apply_with_source_ids(events, &mut SourceIds::default(), &mut ())
    }

    /// [`Engine::apply`] reporting every change to `changes`, for a source that interned its
    /// ids itself: events with [`Rating::source_keys`] resolve them through `ids` (filled as ids
    /// are first seen; a source without its own keys passes an empty one).
    pub fn apply_with_source_ids(
        &mut self,
        events: &[impl Rating],
        ids: &mut SourceIds,
        changes: &mut impl ChangeSink,
    ) -> ApplyOutcome {
        let mut outcome = ApplyOutcome::default();
        // The users already known, resolved up front (through the source's keys, else one
        // lookup by id that the loop then reuses): events arrive for users all over memory, and
        // knowing who comes next lets the loop ask for their data before it is needed.
        let known_users: Vec<Option<u32>> = events
            .iter()
            .map(|e| match e.source_keys() {
                Some((user, _)) => SourceIds::lookup(&ids.users, user),
                None => self.users.get(e.user()),
            })
            .collect();
        for (i, event) in events.iter().enumerate() {
            if let Some(&Some(u)) = known_users.get(i + PREFETCH_AHEAD) {
                self.prefetch_user(u);
            }
            if let Err(rejection) = self.policy.check(event) {
                outcome.rejected.push((i, rejection.reason));
                continue;
            }
            if let Some(half_life) = self.params.half_life_seconds
                && let Some(rejection) = self.decay.refuses(event.ts(), event.value(), half_life)
            {
                outcome.rejected.push((i, rejection.reason));
                continue;
            }
            let keys = event.source_keys();
            let known_item = keys.and_then(|(_, item)| SourceIds::lookup(&ids.items, item));
            if known_item.is_none() && !self.admits_item(event.item()) {
                outcome.rejected.push((i, RejectReason::CatalogueFull));
                continue;
            }
            let known_user = known_users[i]
                .or_else(|| keys.and_then(|(user, _)| SourceIds::lookup(&ids.users, user)))
                .or_else(|| self.users.get(event.user()));
            if known_user.is_none() && self.users.len() >= self.params.max_users {
                outcome.rejected.push((i, RejectReason::PopulationFull));
                continue;
            }
            let user = match known_user {
                Some(u) => u,
                None => {
                    let u = self.intern_user(event.user());
                    if let Some((key, _)) = keys {
                        SourceIds::remember(&mut ids.users, key, u);
                    }
                    u
                }
            };
            let item = match known_item {
                Some(j) => j,
                None => {
                    let (j, _) = self.items.intern(event.item());
                    if let Some((_, key)) = keys {
                        SourceIds::remember(&mut ids.items, key, j);
                    }
                    j
                }
            };
            let weight = match self.params.half_life_seconds {
                None => 1.0,
                Some(half_life) => self.decay_weight(event.ts(), half_life, changes),
            };
            self.apply_one(user, item, event.value(), weight, changes);
            outcome.applied += 1;
            self.counters.events_applied += 1;
            self.counters.events_since_refresh += 1;
            if self.refresh_due() {
                self.settle_rows(changes);
                if let Some(r) = self.refresh(changes) {
                    outcome.refreshes.push(r);
                }
            }
        }
        self.settle_rows(changes);
        outcome
    }

    /// Whether the periodic refresh is due: a function of event counts only, so the result
    /// never depends on how events are split into batches.
    fn refresh_due(&self) -> bool {
        let since = self.counters.events_since_refresh;
        since >= self.params.refresh_every_events
            && since as f64 >= self.params.refresh_changed_share * self.ratings as f64
    }

    /// Whether an event for `item` fits the catalogue: a known item, or room for a new one.
    pub fn admits_item(&self, item: &str) -> bool {
        self.items.len() < self.params.max_items || self.items.get(item).is_some()
    }

    /// Whether an event of `user` fits the population: a known user, or room for a new one.
    pub fn admits_user(&self, user: &str) -> bool {
        self.users.len() < self.params.max_users || self.users.get(user).is_some()
    }

    /// Sets user `id`'s stored row to `cells` (item id, stored value), as a restore from a
    /// changelog does: items missing from `cells` are removed, new ids interned. The
    /// statistics, tracked segments and online model follow as they follow events. Refused,
    /// changing nothing, when a new user or item would not fit `max_users` / `max_items`.
    pub fn set_stored_row<S: AsRef<str>>(
        &mut self,
        id: &str,
        cells: &[(S, f64)],
        changes: &mut impl ChangeSink,
    ) -> Result<(), RejectReason> {
        if !self.admits_user(id) {
            return Err(RejectReason::PopulationFull);
        }
        let new_items = cells
            .iter()
            .filter(|(item, _)| self.items.get(item.as_ref()).is_none())
            .count();
        if self.items.len() + new_items > self.params.max_items {
            return Err(RejectReason::CatalogueFull);
        }
        let u = self.intern_user(id);
        let mut target: Vec<(u32, f64)> = cells
            .iter()
            .map(|(item, value)| (self.items.intern(item.as_ref()).0, *value))
            .collect();
        target.sort_unstable_by_key(|&(j, _)| j);
        let current: Vec<u32> = self.stored_vector(u).idx.clone();
        for j in current {
            if target.binary_search_by_key(&j, |&(t, _)| t).is_err() {
                self.store_cell(u, j, |_| 0.0, changes);
            }
        }
        for (j, value) in target {
            self.store_cell(u, j, |_| value, changes);
        }
        self.settle_rows(changes);
        Ok(())
    }

    /// Removes every rating of `users` (they stay known, with no ratings, as a user whose
    /// every cell was retracted): a partition that moved to another instance leaves this one.
    pub fn clear_users(&mut self, users: &[u32], changes: &mut impl ChangeSink) {
        for &u in users {
            let Some(row) = self.stored_vectors().get(u as usize) else {
                continue;
            };
            for j in row.idx.clone() {
                self.store_cell(u, j, |_| 0.0, changes);
            }
        }
        self.settle_rows(changes);
    }

    /// Hints the CPU to load what applying an event for user `u` reads: the vector's ratings
    /// and the user's projection.
    #[inline]
    fn prefetch_user(&self, u: u32) {
        #[cfg(target_arch = "x86_64")]
        if let Some(x) = self.vectors.get(u as usize) {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            // SAFETY: SSE is part of every x86_64 CPU, and a prefetch never faults, whatever
            // the address (it only hints the cache).
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(x.idx.as_ptr().cast());
                _mm_prefetch::<_MM_HINT_T0>(x.val.as_ptr().cast());
                _mm_prefetch::<_MM_HINT_T0>(self.model.projection_ptr(u as usize).cast());
            }
        }
    }

    fn intern_user(&mut self, id: &str) -> u32 {
        let (u, new_user) = self.users.intern(id);
        if new_user {
            self.vectors.push(SparseVec::default());
            if !self.params.transform.is_identity() {
                self.raw.push(SparseVec::default());
            }
            self.model.add_user_slot();
        }
        u
    }

    /// The scaled weight of an event at `ts` (see [`decay`]), rebasing the stored values first
    /// when `ts` is more than [`decay::REBASE_HALF_LIVES`] half-lives past the origin.
    fn decay_weight(&mut self, ts: i64, half_life: u64, changes: &mut impl ChangeSink) -> f64 {
        let spans = self.decay.spans_due(ts, half_life);
        if spans > 0 {
            self.rebase_decay(spans, half_life, changes);
        }
        self.decay.weigh(ts, half_life)
    }

    /// Moves the decay origin forward by `spans` rebase spans: every stored value, the
    /// statistics and the model's scale-carrying state are multiplied by the exact power of two
    /// `2^(−64·spans)`, so nothing but the scale changes (labels stay as they are). A cell the
    /// factor would take below `2^−FORGOTTEN_BELOW_EXPONENT` (a weight no figure can see any
    /// more) is removed first, as a retraction would remove it. O(ratings),
    /// once per 64 half-lives of event time; every cell is reported to `changes`.
    fn rebase_decay(&mut self, spans: i64, half_life: u64, changes: &mut impl ChangeSink) {
        let exponent = spans.saturating_mul(decay::REBASE_HALF_LIVES);
        let factor = decay::power_of_two(-exponent);
        // Cells that would fall below the floor are retracted first: the rest, and their
        // squares, stay normal floating-point numbers, so the rescale stays exact.
        let floor = decay::power_of_two(-decay::FORGOTTEN_BELOW_EXPONENT);
        let stored = self.stored_vectors();
        let flushed: Vec<(u32, u32)> = (0..stored.len() as u32)
            .flat_map(|u| {
                let x = &stored[u as usize];
                x.iter()
                    .filter(|&(_, v)| (v * factor).abs() < floor)
                    .map(move |(j, _)| (u, j))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (u, j) in flushed {
            self.store_cell(u, j, |_| 0.0, changes);
        }
        self.settle_rows(changes);
        let identity = self.params.transform.is_identity();
        let stored = if identity {
            &mut self.vectors
        } else {
            &mut self.raw
        };
        for u in 0..stored.len() {
            if stored[u].idx.is_empty() {
                continue;
            }
            let x = &mut stored[u];
            x.val.iter_mut().for_each(|v| *v *= factor);
            for (j, v) in x.iter() {
                changes.cell_changed(u as u32, j, v);
            }
        }
        // A homogeneous transform of degree a turns the factor into factor^a (exactly: the
        // factor is an even power of two); log1p is refused with a half-life by the config.
        let transformed = self.params.transform.scale_of(factor);
        if !identity && transformed != 1.0 {
            for u in 0..self.vectors.len() {
                if !self.vectors[u].idx.is_empty() {
                    let x = &mut self.vectors[u];
                    x.val.iter_mut().for_each(|v| *v *= transformed);
                }
            }
        }
        if transformed != 1.0 {
            self.stats.rescale(transformed);
            self.model.rescale(transformed);
            if let Some(tracked) = &mut self.segments {
                tracked.sums.rescale(transformed);
            }
        }
        self.decay.scaled_events *= factor;
        self.decay.advance(spans, half_life);
        changes.model_changed();
    }

    fn apply_one(
        &mut self,
        u: u32,
        j: u32,
        value: Option<f64>,
        weight: f64,
        changes: &mut impl ChangeSink,
    ) {
        let mode = self.params.mode;
        // Without a half-life the weight is 1 and `v * 1.0` is `v` exactly.
        self.store_cell(
            u,
            j,
            |old| match (mode, value) {
                (Mode::Explicit, Some(v)) => v * weight,
                (Mode::Explicit, None) => 0.0,
                (Mode::Implicit, Some(v)) => old + v * weight,
                (Mode::Implicit, None) => old,
            },
            changes,
        );
    }

    /// Sets the stored value of `(u, j)` to `new(old)` and reports it to `changes`; the
    /// transformed cell follows at once, or the whole row at the next
    /// [`Engine::settle_rows`] when rows are normalised.
    #[inline]
    fn store_cell(
        &mut self,
        u: u32,
        j: u32,
        new: impl FnOnce(f64) -> f64,
        changes: &mut impl ChangeSink,
    ) {
        let transform = self.params.transform;
        if transform.is_identity() {
            let x = &self.vectors[u as usize];
            let pos = x.idx.binary_search(&j);
            let old = pos.map(|p| x.val[p]).unwrap_or(0.0);
            let new = new(old);
            if new != old {
                self.write_cell(u, j, pos, old, new, changes);
                changes.cell_changed(u, j, new);
            }
            return;
        }
        let x = &mut self.raw[u as usize];
        let pos = x.idx.binary_search(&j);
        let old = pos.map(|p| x.val[p]).unwrap_or(0.0);
        let new = new(old);
        if new == old {
            return;
        }
        match pos {
            Ok(p) if new == 0.0 => {
                x.idx.remove(p);
                x.val.remove(p);
            }
            Ok(p) => x.val[p] = new,
            Err(p) => {
                x.idx.insert(p, j);
                x.val.insert(p, new);
            }
        }
        changes.cell_changed(u, j, new);
        if transform.l2_rows {
            // A replay of an item already played changes no binary value, so no row.
            if transform.cell_value(new) != transform.cell_value(old) {
                self.unsettled.push(u);
            }
        } else {
            // The transformed row has the stored row's items, so `pos` is the cell's
            // position there too.
            let old = pos.map(|p| self.vectors[u as usize].val[p]).unwrap_or(0.0);
            self.write_cell(u, j, pos, old, transform.cell_value(new), changes);
        }
    }

    /// Rewrites the transformed rows of the users whose stored rows changed since the last
    /// call (l2 rows: a row's norm moves every cell of it), each once: O(their ratings).
    fn settle_rows(&mut self, changes: &mut impl ChangeSink) {
        if self.unsettled.is_empty() {
            return;
        }
        let mut users = std::mem::take(&mut self.unsettled);
        users.sort_unstable();
        users.dedup();
        let transform = self.params.transform;
        let mut row = SparseVec::default();
        let mut deltas: Vec<(u32, f64)> = Vec::new();
        let mut cells: Vec<(u32, f64, f64)> = Vec::new();
        for &u in &users {
            transform.row_into(&self.raw[u as usize], &mut row);
            self.settle_row(u, &row, &mut cells, &mut deltas, changes);
        }
        users.clear();
        self.unsettled = users;
    }

    /// Sets the transformed cell `(u, j)` (at `pos` in the user's row, holding `old`) to
    /// `new`, keeping the statistics, the rating count, the tracked segments and the online
    /// model in step. The stored value is the caller's to report.
    #[inline]
    fn write_cell(
        &mut self,
        u: u32,
        j: u32,
        pos: Result<usize, usize>,
        old: f64,
        new: f64,
        changes: &mut impl ChangeSink,
    ) {
        let mut held = None;
        if let Some((was_active, now_active)) = self.set_cell(u, j, pos, old, new, &mut held) {
            self.model.shift(u as usize, &[(j, new - old)]);
            self.model
                .reassign(u as usize, was_active, now_active, changes);
        }
    }

    /// Replaces `u`'s transformed row by `row`: one merge of the two rows finds the cells that
    /// changed, then the statistics, the tracked segments and the online model move for those
    /// (the model once for the whole row). `cells` and `deltas` are scratch space.
    fn settle_row(
        &mut self,
        u: u32,
        row: &SparseVec,
        cells: &mut Vec<(u32, f64, f64)>,
        deltas: &mut Vec<(u32, f64)>,
        changes: &mut impl ChangeSink,
    ) {
        cells.clear();
        deltas.clear();
        let x = &self.vectors[u as usize];
        let (mut a, mut b) = (0, 0);
        while a < x.idx.len() || b < row.idx.len() {
            let (ja, jb) = (
                x.idx.get(a).copied().unwrap_or(u32::MAX),
                row.idx.get(b).copied().unwrap_or(u32::MAX),
            );
            let (j, old, new) = match ja.cmp(&jb) {
                std::cmp::Ordering::Less => {
                    a += 1;
                    (ja, x.val[a - 1], 0.0)
                }
                std::cmp::Ordering::Greater => {
                    b += 1;
                    (jb, 0.0, row.val[b - 1])
                }
                std::cmp::Ordering::Equal => {
                    a += 1;
                    b += 1;
                    (ja, x.val[a - 1], row.val[b - 1])
                }
            };
            if old != new {
                cells.push((j, old, new));
                deltas.push((j, new - old));
            }
        }
        if cells.is_empty() {
            return;
        }
        let (was_active, now_active) = (!x.idx.is_empty(), !row.idx.is_empty());
        self.ratings = self.ratings - x.nnz() as u64 + row.nnz() as u64;
        let x = &mut self.vectors[u as usize];
        if x.idx != row.idx {
            x.idx.clone_from(&row.idx);
        }
        x.val.clone_from(&row.val);
        if !was_active {
            self.stats.user_entered();
        }
        for &(j, old, new) in cells.iter() {
            self.stats.apply_change(j as usize, old, new);
        }
        if !now_active {
            self.stats.user_left();
        }
        if let Some(tracked) = &mut self.segments {
            let label = tracked.segment_of(u);
            if label != NO_CLUSTER {
                let held = held_out(self.users.id(u), self.params.seed, tracked.holdout_percent);
                // The user enters (or leaves) the segment with the first (or last) cell.
                let last = cells.len() - 1;
                for (i, &(j, old, new)) in cells.iter().enumerate() {
                    let before = i > 0 || was_active;
                    let after = i < last || now_active;
                    tracked
                        .sums
                        .cell_changed(label, held, j, old, new, before, after);
                }
            }
        }
        self.model.shift(u as usize, deltas);
        self.model
            .reassign(u as usize, was_active, now_active, changes);
    }

    /// [`Engine::write_cell`] but for the online model, which the caller moves once the
    /// user's row is complete. Whether the user had ratings before and has now; `None` when
    /// nothing changed. `held` caches whether the user is held out (computed on first need).
    #[inline]
    fn set_cell(
        &mut self,
        u: u32,
        j: u32,
        pos: Result<usize, usize>,
        old: f64,
        new: f64,
        held: &mut Option<bool>,
    ) -> Option<(bool, bool)> {
        let x = &self.vectors[u as usize];
        let delta = new - old;
        if delta == 0.0 {
            return None;
        }
        let was_active = !x.idx.is_empty();
        if !was_active {
            self.stats.user_entered();
        }
        self.stats.apply_change(j as usize, old, new);
        let x = &mut self.vectors[u as usize];
        match pos {
            Ok(p) if new == 0.0 => {
                x.idx.remove(p);
                x.val.remove(p);
                self.ratings -= 1;
            }
            Ok(p) => x.val[p] = new,
            Err(p) => {
                x.idx.insert(p, j);
                x.val.insert(p, new);
                self.ratings += 1;
            }
        }
        let now_active = !x.idx.is_empty();
        if !now_active {
            self.stats.user_left();
        }
        if let Some(tracked) = &mut self.segments {
            let label = tracked.segment_of(u);
            if label != NO_CLUSTER {
                let (users, seed) = (&self.users, self.params.seed);
                let held = *held
                    .get_or_insert_with(|| held_out(users.id(u), seed, tracked.holdout_percent));
                tracked
                    .sums
                    .cell_changed(label, held, j, old, new, was_active, now_active);
            }
        }
        Some((was_active, now_active))
    }

    /// Refreshes the PCA and polishes the clustering now (the periodic refresh; the service
    /// also calls it on a timer), reporting the new model to `changes`. Returns `None` when
    /// there is not enough data for a PCA yet (nothing changed then).
    pub fn refresh(&mut self, changes: &mut impl ChangeSink) -> Option<RefreshOutcome> {
        self.counters.events_since_refresh = 0;
        if self.items.len() < self.params.components || self.stats.users() < 2 {
            return None;
        }
        self.counters.refreshes += 1;
        let seed = self.params.seed ^ self.counters.refreshes.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let eigen = self.params.eigen(seed, params::EigenSolve::Refresh, false);
        let first = !self.model.is_clustered();
        let clustering = ClusteringParams {
            k: self.params.clusters,
            max_passes: if first {
                self.params.snapshot_max_passes
            } else {
                self.params.polish_passes
            },
            // A few fresh starts each time (on a sample): the online clustering moves to a
            // clearly better optimum when the data has one.
            restarts: if first {
                ONLINE_INIT_STARTS.min(self.params.snapshot_kmeans_starts)
            } else {
                REFRESH_STARTS
            },
            keep_current: true,
            seed,
        };
        self.sorted_users = self.canonical_user_order();
        let order = std::mem::take(&mut self.sorted_users);
        // The model is refreshed from the engine's data: take it out while the data is borrowed.
        let mut model = std::mem::replace(
            &mut self.model,
            Model::new(self.params.components, self.params.clusters),
        );
        let outcome = model.refresh(&self.data_view(&order), true, &eigen, &clustering, None);
        self.model = model;
        changes.model_changed();
        self.sorted_users = order;
        Some(outcome)
    }

    /// Drops the online model (basis, projections, clustering), keeping the data: what
    /// follows is then computed from the data alone, whatever the history of the state dir.
    /// A replay starts with this, so its result depends only on the ratings it ends with.
    pub fn forget_model(&mut self, changes: &mut impl ChangeSink) {
        self.model = Model::new(self.params.components, self.params.clusters);
        for _ in 0..self.users.ids.len() {
            self.model.add_user_slot();
        }
        changes.model_changed();
    }

    /// Takes a model built from this engine's current data (a snapshot's, see
    /// [`EngineView::snapshot_model`]) as the online model, as if a refresh had produced it.
    /// A replay does this at its end instead of refreshing along the way: nobody observes the
    /// intermediate models of a file, and the final snapshot's model is the better one.
    pub fn adopt_model(&mut self, model: Model, changes: &mut impl ChangeSink) {
        debug_assert_eq!(model.labels().len(), self.users.ids.len());
        self.model = model;
        changes.model_changed();
        self.counters.events_since_refresh = 0;
        self.counters.refreshes += 1;
    }

    /// See [`EngineView::snapshot_model`].
    pub fn snapshot_model(
        &self,
        with_curve: bool,
        previous: PreviousSegments<'_>,
    ) -> Option<Model> {
        self.view().snapshot_model(with_curve, previous)
    }

    fn data_view<'a>(&'a self, canonical_order: &'a [u32]) -> DataView<'a> {
        DataView {
            stats: &self.stats,
            vectors: &self.vectors,
            canonical_order,
            items: self.items.len(),
        }
    }

    /// User indices sorted by user id: an order independent of event arrival, for every
    /// computation whose result could depend on the order it visits users in.
    pub fn canonical_user_order(&self) -> Vec<u32> {
        let ids = self.users.ids();
        let known = self.sorted_users.len();
        let mut added: Vec<u32> = (known as u32..ids.len() as u32).collect();
        if added.len() == ids.len() {
            return ids.sorted_order();
        }
        added.sort_unstable_by(|&a, &b| ids.id(a).cmp(ids.id(b)));
        let mut order = Vec::with_capacity(ids.len());
        let (mut a, mut b) = (self.sorted_users.iter().peekable(), added.iter().peekable());
        while let (Some(&&x), Some(&&y)) = (a.peek(), b.peek()) {
            if ids.id(x) <= ids.id(y) {
                order.push(x);
                a.next();
            } else {
                order.push(y);
                b.next();
            }
        }
        order.extend(a);
        order.extend(b);
        order
    }

    /// A read-only view of the data and the model as they are now, for building a snapshot
    /// while the engine goes on: user vectors and ids are shared copy-on-write (a later event
    /// copies only the 1024-user chunk it writes to), the statistics (O(items)) and the online
    /// model (O(users · components)) are copied.
    pub fn view(&self) -> EngineView {
        EngineView {
            params: self.params.clone(),
            users: self.users.ids.clone(),
            items: self.items.ids.clone(),
            vectors: self.vectors.clone(),
            stats: self.stats.clone(),
            ratings: self.ratings,
            counters: self.counters,
            decay: self.decay,
            model: self.model.clone(),
            sorted_users: self.canonical_user_order(),
            segments: self.segments.clone(),
            challenge: None,
            lloyd_start: None,
        }
    }
}

/// Everything needed to rebuild an [`Engine`] after a restart.
#[derive(Debug, Clone, Default)]
pub struct RestoredState {
    pub users: Vec<String>,
    pub items: Vec<String>,
    pub vectors: Vec<SparseVec>,
    pub labels: Vec<u32>,
    pub model: PersistedModel,
    pub counters: Counters,
    pub decay: DecayClock,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jump_of_many_half_lives_forgets_the_old_cells_and_keeps_the_statistics_exact() {
        use crate::event::RatingEvent;
        let mut engine = Engine::new(EngineParams {
            half_life_seconds: Some(1),
            components: 2,
            clusters: 2,
            ..EngineParams::default()
        });
        let at = |user: usize, item: usize, ts: i64| RatingEvent {
            user: format!("u{user}"),
            item: format!("i{item}"),
            value: Some(4.0),
            ts,
        };
        let early: Vec<RatingEvent> = (0..200)
            .map(|i| at(i % 20, i % 7, 1_000 + i as i64 / 4))
            .collect();
        engine.apply(&early);
        assert_eq!(engine.active_users(), 20);
        // 600 half-lives later (9 rebase spans): the early cells weigh 2^-550 or less.
        let late = [at(99, 1, 1_650), at(98, 2, 1_650), at(98, 1, 1_651)];
        engine.apply(&late);
        assert_eq!(engine.active_users(), 2, "only the late users remain");
        assert_eq!(engine.ratings(), 3);
        let d = engine.items().len();
        let rebuilt = CovarianceStats::from_vectors(engine.vectors().iter(), d);
        assert_eq!(engine.stats().sums(), rebuilt.sums());
        assert_eq!(engine.stats().squares(), rebuilt.squares());
        assert!(engine.stats().squares().iter().any(|&s| s > 0.0));
        assert!(
            engine
                .vectors()
                .iter()
                .flat_map(|x| x.val.iter())
                .all(|v| v.is_normal()),
            "every stored value a normal float"
        );
    }

    /// A restored row (every cell of another engine's user set at once) leaves the engine as
    /// if it had applied that user's events; clearing those users leaves it as if it never had.
    #[test]
    fn restored_rows_equal_applied_events_and_cleared_users_leave_no_trace() {
        use crate::event::RatingEvent;
        use rand::{Rng, SeedableRng};
        use rand_chacha::ChaCha8Rng;
        for transform in ["none", "log1p", "binary+l2"] {
            let params = EngineParams {
                mode: Mode::Implicit,
                transform: ValueTransform::parse(transform).expect("transform"),
                components: 2,
                clusters: 3,
                refresh_every_events: 50,
                ..EngineParams::default()
            };
            let mut rng = ChaCha8Rng::seed_from_u64(17);
            let events: Vec<RatingEvent> = (0..600)
                .map(|_| RatingEvent {
                    user: format!("u{}", rng.random_range(0..40)),
                    item: format!("i{}", rng.random_range(0..25)),
                    value: Some(f64::from(rng.random_range(1..4))),
                    ts: 0,
                })
                .collect();
            let moved = |id: &str| id.ends_with('3') || id.ends_with('7');
            let (kept, leaving): (Vec<_>, Vec<_>) =
                events.iter().cloned().partition(|e| !moved(&e.user));
            let mut whole = Engine::new(params.clone());
            whole.apply(&events);
            let mut only_kept = Engine::new(params.clone());
            only_kept.apply(&kept);
            let mut restored = Engine::new(params.clone());
            restored.apply(&kept);
            let mut source = Engine::new(params.clone());
            source.apply(&leaving);
            for u in 0..source.users().len() as u32 {
                let row = source.stored_vector(u);
                let cells: Vec<(&str, f64)> =
                    row.iter().map(|(j, v)| (source.items().id(j), v)).collect();
                restored
                    .set_stored_row(source.users().id(u), &cells, &mut ())
                    .expect("fits");
            }
            let row_of = |e: &Engine, id: &str| -> Vec<(String, f64)> {
                let u = e.users().get(id).expect("known");
                let mut row: Vec<(String, f64)> = e
                    .stored_vector(u)
                    .iter()
                    .map(|(j, v)| (e.items().id(j).to_string(), v))
                    .collect();
                row.sort_by(|a, b| a.0.cmp(&b.0));
                row
            };
            for id in (0..40).map(|i| format!("u{i}")) {
                if whole.users().get(&id).is_some() {
                    assert_eq!(
                        row_of(&restored, &id),
                        row_of(&whole, &id),
                        "{transform} {id}"
                    );
                }
            }
            assert_eq!(restored.active_users(), whole.active_users(), "{transform}");
            assert_eq!(restored.ratings(), whole.ratings(), "{transform}");
            let close = |a: &[f64], b: &[f64]| {
                a.iter()
                    .zip(b)
                    .all(|(x, y)| (x - y).abs() <= 1e-9 * (1.0 + y.abs()))
            };
            // Item indices differ between the engines: compare by item id.
            let by_item = |e: &Engine, v: &[f64]| -> Vec<f64> {
                (0..25)
                    .map(|i| {
                        e.items()
                            .get(&format!("i{i}"))
                            .map_or(0.0, |j| v[j as usize])
                    })
                    .collect()
            };
            assert!(close(
                &by_item(&restored, restored.stats().sums()),
                &by_item(&whole, whole.stats().sums())
            ));
            assert!(close(
                &by_item(&restored, restored.stats().squares()),
                &by_item(&whole, whole.stats().squares())
            ));
            let leavers: Vec<u32> = (0..restored.users().len() as u32)
                .filter(|&u| moved(restored.users().id(u)))
                .collect();
            restored.clear_users(&leavers, &mut ());
            assert_eq!(restored.active_users(), only_kept.active_users());
            assert_eq!(restored.ratings(), only_kept.ratings());
            assert!(close(
                &by_item(&restored, restored.stats().sums()),
                &by_item(&only_kept, only_kept.stats().sums())
            ));
        }
    }

    /// The tracked segment sums after random ratings, re-ratings, retractions, decay rebases
    /// (each a rescale by 2^-64) and segment changes, against the sums from scratch.
    fn tracked_sums_stay_exact(mode: Mode, half_life: Option<u64>, seed: u64, transform: &str) {
        use rand::{Rng, SeedableRng};
        use rand_chacha::ChaCha8Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut engine = Engine::new(EngineParams {
            mode,
            half_life_seconds: half_life,
            transform: ValueTransform::parse(transform).expect("transform"),
            components: 3,
            clusters: 4,
            refresh_every_events: 700,
            ..EngineParams::default()
        });
        let random_labels = |rng: &mut ChaCha8Rng, n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| {
                    if rng.random_bool(0.05) {
                        NO_CLUSTER
                    } else {
                        rng.random_range(0..4)
                    }
                })
                .collect()
        };
        let mut ts = 1_000;
        let mut rebases = 0;
        for round in 0..12 {
            let events: Vec<RatingEvent> = (0..400)
                .map(|_| {
                    ts += rng.random_range(0..3);
                    RatingEvent {
                        user: format!("u{}", rng.random_range(0..120)),
                        item: format!("i{}", rng.random_range(0..40)),
                        value: (!rng.random_bool(0.15)).then(|| rng.random_range(1..=5) as f64),
                        ts,
                    }
                })
                .collect();
            engine.apply(&events);
            if round == 0 {
                let labels = random_labels(&mut rng, engine.users().len());
                engine.track_segments(&labels, 20);
            } else if round % 3 == 0 {
                let labels = random_labels(&mut rng, engine.users().len());
                engine.adopt_segments(&labels);
            }
            if round % 4 == 3 && half_life.is_some() {
                // Past a rebase span: every stored value and the sums are rescaled.
                ts += 70 * half_life.unwrap_or(1) as i64;
                rebases += 1;
            }
        }
        let tracked = engine.tracked_segments().expect("tracking");
        let seed = engine.params().seed;
        let fresh = SegmentSums::from_scratch(
            engine.vectors(),
            &tracked.labels,
            4,
            engine.items().len(),
            |u| held_out(engine.users().id(u as u32), seed, 20),
        );
        assert!(fresh.sizes().iter().sum::<u64>() > 0);
        assert!(
            fresh.held_sizes().iter().sum::<u64>() > 0,
            "some users held out"
        );
        let difference = tracked.sums.max_relative_difference(&fresh);
        assert!(
            difference <= 1e-9,
            "{mode:?}, {transform}, half-life {half_life:?}, {rebases} rebases: {difference}"
        );
        // And the view's sums for new segments (moved from the tracked ones) are exact too.
        let labels = random_labels(&mut rng, engine.users().len());
        let moved = engine.view().segment_sums(&labels, 20);
        let fresh =
            SegmentSums::from_scratch(engine.vectors(), &labels, 4, engine.items().len(), |u| {
                held_out(engine.users().id(u as u32), seed, 20)
            });
        assert!(moved.max_relative_difference(&fresh) <= 1e-9);
    }

    #[test]
    fn tracked_segment_sums_equal_their_values_from_scratch() {
        for seed in [1, 2, 3] {
            for transform in ["none", "sqrt+l2", "binary"] {
                tracked_sums_stay_exact(Mode::Explicit, None, seed, transform);
                tracked_sums_stay_exact(Mode::Implicit, None, seed, transform);
                tracked_sums_stay_exact(Mode::Explicit, Some(1), seed, transform);
                tracked_sums_stay_exact(Mode::Implicit, Some(1), seed, transform);
            }
            tracked_sums_stay_exact(Mode::Implicit, None, seed, "log1p+l2");
        }
    }

    /// `count` events over the hour before `now` (seeded), for 300 users and 50 items.
    fn events_before(now: i64, count: usize, seed: u64) -> Vec<RatingEvent> {
        use rand::{Rng, SeedableRng};
        use rand_chacha::ChaCha8Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut events: Vec<RatingEvent> = (0..count)
            .map(|_| RatingEvent {
                user: format!("u{}", rng.random_range(0..300)),
                item: format!("i{}", rng.random_range(0..50)),
                value: Some(rng.random_range(1..=5) as f64),
                ts: now - rng.random_range(0..3_600),
            })
            .collect();
        events.sort_by_key(|e| e.ts);
        events
    }

    /// What a source does: its value checks (with its clock), then the engine.
    fn as_a_source_hands_them(engine: &mut Engine, events: &[RatingEvent]) -> Vec<RejectReason> {
        let source = engine.params().policy().for_source();
        let (good, bad): (Vec<_>, Vec<_>) = events
            .iter()
            .cloned()
            .partition(|e| source.check(e).is_ok());
        let mut reasons: Vec<RejectReason> = bad
            .iter()
            .map(|e| source.check(e).map_err(|r| r.reason).unwrap_err())
            .collect();
        let outcome = engine.apply(&good);
        reasons.extend(outcome.rejected.iter().map(|&(_, reason)| reason));
        reasons
    }

    /// Everything an event could change, as bits.
    fn fingerprint(engine: &Engine) -> (Vec<u64>, Vec<u64>, DecayClock, u64, u64, Vec<SparseVec>) {
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        (
            bits(engine.stats().sums()),
            bits(engine.stats().squares()),
            engine.decay(),
            engine.active_users(),
            engine.ratings(),
            engine.vectors().iter().cloned().collect(),
        )
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    #[test]
    fn an_event_far_ahead_of_the_decay_clock_is_rejected_and_changes_nothing() {
        let half_life = 600;
        let mut engine = Engine::new(EngineParams {
            half_life_seconds: Some(half_life),
            components: 3,
            clusters: 4,
            refresh_every_events: 2_000,
            ..EngineParams::default()
        });
        let now = now();
        let around_now = events_before(now, 10_000, 7);
        assert_eq!(as_a_source_hands_them(&mut engine, &around_now), []);
        let before = fingerprint(&engine);
        let effective = engine.decay().effective_events(half_life);
        assert!(effective > 100.0, "{effective}");
        // 20 h ahead: inside a day, but 120 half-lives; it would weigh 2^120 times the rest.
        let ahead = RatingEvent {
            user: "u1".into(),
            item: "i1".into(),
            value: Some(5.0),
            ts: now + 20 * 3_600,
        };
        assert_eq!(
            as_a_source_hands_them(&mut engine, &[ahead]),
            [RejectReason::BadTimestamp]
        );
        assert!(
            fingerprint(&engine) == before,
            "the statistics are unchanged"
        );
        assert_eq!(engine.decay().effective_events(half_life), effective);
    }

    #[test]
    fn ratings_re_sent_thousands_of_half_lives_late_are_rejected_and_the_user_kept() {
        for mode in [Mode::Explicit, Mode::Implicit] {
            let half_life = 600;
            let mut engine = Engine::new(EngineParams {
                mode,
                half_life_seconds: Some(half_life),
                components: 3,
                clusters: 4,
                ..EngineParams::default()
            });
            let now = 1_700_000_000;
            let events = events_before(now, 2_000, 3);
            assert_eq!(engine.apply(&events).applied, 2_000);
            let before = fingerprint(&engine);
            let user = engine.users().get("u7").expect("u7 rated");
            // The same user's ratings again, 3,000 half-lives back: weighed 2^-3000, that is 0.
            let re_sent: Vec<RatingEvent> = events
                .iter()
                .filter(|e| e.user == "u7")
                .map(|e| RatingEvent {
                    ts: e.ts - 3_000 * half_life as i64,
                    ..e.clone()
                })
                .collect();
            let outcome = engine.apply(&re_sent);
            assert_eq!(outcome.applied, 0, "{mode}");
            assert!(
                outcome
                    .rejected
                    .iter()
                    .all(|&(_, r)| r == RejectReason::BadTimestamp)
                    && outcome.rejected.len() == re_sent.len(),
                "{mode}: {:?}",
                outcome.rejected
            );
            assert!(
                !engine.vector(user).idx.is_empty(),
                "{mode}: the user is kept"
            );
            assert!(fingerprint(&engine) == before, "{mode}: nothing changed");
        }
    }

    #[test]
    fn the_gate_refuses_exactly_the_events_the_engine_refuses_for_their_age() {
        let half_life = 600;
        let params = EngineParams {
            half_life_seconds: Some(half_life),
            max_items: 40,
            components: 3,
            clusters: 4,
            ..EngineParams::default()
        };
        let mut engine = Engine::new(params.clone());
        engine.apply(&events_before(1_700_000_000, 500, 5));
        let first_origin = engine.decay().origin_ts;
        let mut gate = AdmissionGate::new(&engine);
        // Later events crossing two rebases, with re-sends far behind among them.
        let mut stream = Vec::new();
        for (n, mut e) in events_before(1_700_000_000, 3_000, 9)
            .into_iter()
            .enumerate()
        {
            e.ts += (n as i64) * 30;
            if n % 7 == 0 {
                e.ts -= 250 * half_life as i64;
            }
            stream.push(e);
        }
        let admitted: Vec<bool> = stream.iter().map(|e| gate.admit_event(e).is_ok()).collect();
        let outcome = engine.apply(&stream);
        let refused: Vec<bool> = {
            let mut refused = vec![false; stream.len()];
            outcome
                .rejected
                .iter()
                .for_each(|&(i, _)| refused[i] = true);
            refused
        };
        assert!(admitted.iter().any(|a| !a), "some events are refused");
        let span = decay::REBASE_HALF_LIVES * half_life as i64;
        assert!(
            engine.decay().origin_ts >= first_origin.map(|o| o + 2 * span),
            "two rebases"
        );
        for (i, (a, r)) in admitted.iter().zip(&refused).enumerate() {
            assert_eq!(*a, !r, "event {i}: {:?}", stream[i]);
        }
        assert_eq!(gate.decay.origin_ts, engine.decay().origin_ts);
    }

    #[test]
    fn ids_short_and_long_intern_once_and_survive_a_rebuild() {
        let ids = [
            "u1",
            "",
            "exactly15bytes!",
            "sixteen-bytes-id",
            "a much longer id than that",
            "u1\0",
        ];
        let mut map = IdMap::default();
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(map.intern(id), (n as u32, true), "{id:?}");
        }
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(map.intern(id), (n as u32, false), "{id:?}");
            assert_eq!(map.id(n as u32), *id);
        }
        assert_eq!(map.get("u2"), None);
        let rebuilt = IdMap::from_ids(ids.iter().map(|s| s.to_string()).collect());
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(rebuilt.get(id), Some(n as u32), "{id:?}");
        }
    }

    use crate::event::RatingEvent;

    fn ev(user: &str, item: &str, value: Option<f64>) -> RatingEvent {
        RatingEvent {
            user: user.into(),
            item: item.into(),
            value,
            ts: 0,
        }
    }

    #[test]
    fn explicit_mode_replaces_and_retracts() {
        let mut e = Engine::new(EngineParams::default());
        e.apply(&[
            ev("a", "x", Some(3.0)),
            ev("a", "x", Some(5.0)),
            ev("a", "y", Some(1.0)),
            ev("a", "y", None),
        ]);
        let a = e.users().get("a").unwrap();
        assert_eq!(e.vector(a).iter().collect::<Vec<_>>(), vec![(0, 5.0)]);
        assert_eq!(e.ratings(), 1);
        e.apply(&[ev("a", "x", None)]);
        assert_eq!(e.active_users(), 0);
        assert_eq!(e.stats().sums(), &[0.0, 0.0]);
    }

    #[test]
    fn implicit_mode_adds_up() {
        let params = EngineParams {
            mode: Mode::Implicit,
            max_value: 1e6,
            ..EngineParams::default()
        };
        let mut e = Engine::new(params);
        e.apply(&[ev("a", "x", Some(2.0)), ev("a", "x", Some(3.0))]);
        assert_eq!(e.vector(0).get(0), 5.0);
        let out = e.apply(&[ev("a", "x", None), ev("a", "x", Some(f64::NAN))]);
        assert_eq!(out.rejected.len(), 2);
        assert_eq!(e.vector(0).get(0), 5.0);
    }

    #[test]
    fn items_past_max_items_are_refused_and_known_items_still_apply() {
        let mut e = Engine::new(EngineParams {
            max_items: 2,
            ..EngineParams::default()
        });
        let out = e.apply(&[
            ev("a", "x", Some(3.0)),
            ev("a", "y", Some(4.0)),
            ev("a", "z", Some(5.0)),
            ev("b", "x", Some(1.0)),
        ]);
        assert_eq!(out.applied, 3);
        assert_eq!(out.rejected, vec![(2, RejectReason::CatalogueFull)]);
        assert_eq!(e.items().len(), 2);
        assert_eq!(e.ratings(), 3);
        let mut gate = AdmissionGate::new(&Engine::new(EngineParams {
            max_items: 1,
            ..EngineParams::default()
        }));
        assert!(gate.admit("a", "x").is_ok() && gate.admit("b", "x").is_ok());
        assert_eq!(
            gate.admit("a", "y").map_err(|r| r.reason),
            Err(RejectReason::CatalogueFull)
        );
    }

    #[test]
    fn users_past_max_users_are_refused_and_known_users_still_apply() {
        let params = EngineParams {
            max_users: 2,
            max_items: 3,
            ..EngineParams::default()
        };
        let events = [
            ev("a", "x", Some(3.0)),
            ev("b", "y", Some(4.0)),
            // A new user past the cap, with a new item: neither is taken in.
            ev("c", "z", Some(5.0)),
            ev("a", "y", Some(1.0)),
            ev("c", "x", Some(2.0)),
            // A known user with a new item still applies.
            ev("b", "w", Some(2.0)),
        ];
        let mut e = Engine::new(params.clone());
        let out = e.apply(&events);
        assert_eq!(out.applied, 4);
        assert_eq!(
            out.rejected,
            vec![
                (2, RejectReason::PopulationFull),
                (4, RejectReason::PopulationFull)
            ]
        );
        assert_eq!(e.users().len(), 2);
        assert_eq!(e.users().get("c"), None);
        assert_eq!(e.items().get("z"), None, "a refused event interns nothing");
        assert_eq!(e.items().len(), 3);
        assert_eq!(e.ratings(), 4);
        assert!(e.admits_user("a") && !e.admits_user("c"));

        // The gate decides as the engine does, event by event, starting from a loaded engine.
        let mut gate = AdmissionGate::new(&Engine::new(params.clone()));
        let decided: Vec<Option<RejectReason>> = events
            .iter()
            .map(|x| gate.admit(&x.user, &x.item).err().map(|r| r.reason))
            .collect();
        let mut refused = vec![None; events.len()];
        for &(i, reason) in &out.rejected {
            refused[i] = Some(reason);
        }
        assert_eq!(decided, refused);
        let mut reloaded = AdmissionGate::new(&e);
        assert!(reloaded.admit("b", "x").is_ok());
        let refusal = reloaded.admit("d", "x").unwrap_err();
        assert_eq!(refusal.reason, RejectReason::PopulationFull);
        assert!(
            refusal.detail.contains("`d`") && refusal.detail.contains("max_users = 2"),
            "{}",
            refusal.detail
        );
        // Full catalogue and full population: the item is checked first, as the engine does.
        let mut full = AdmissionGate::new(&e);
        assert_eq!(
            full.admit("d", "v").map_err(|r| r.reason),
            Err(RejectReason::CatalogueFull)
        );
    }

    #[test]
    fn a_view_keeps_its_moment_while_the_engine_goes_on() {
        let data = crate::generator::generate(&crate::generator::GeneratorParams {
            users: 400,
            items: 150,
            events: 30_000,
            segments: 4,
            seed: 11,
            ..Default::default()
        });
        let params = EngineParams {
            clusters: 4,
            refresh_every_events: 5_000,
            ..EngineParams::default()
        };
        let mut engine = Engine::new(params);
        let (first, second) = data.events.split_at(20_000);
        engine.apply(first);
        let view = engine.view();
        let frozen = engine.clone();
        engine.apply(second);
        // The sorted user order is kept across refreshes and merged with later users.
        assert!(engine.counters().refreshes > 0);
        assert_eq!(
            engine.canonical_user_order(),
            engine.users().ids().sorted_order()
        );
        assert_eq!(
            view.canonical_user_order(),
            frozen.users().ids().sorted_order()
        );
        assert_ne!(engine.vectors(), frozen.vectors(), "the engine went on");
        assert!(view.vectors() == frozen.vectors());
        assert!(view.users() == frozen.users().ids());
        assert_eq!(view.ratings(), frozen.ratings());
        let from_view = view
            .snapshot_model(false, PreviousSegments::None)
            .expect("a model");
        let from_frozen = frozen
            .snapshot_model(false, PreviousSegments::None)
            .expect("a model");
        assert_eq!(from_view.labels(), from_frozen.labels());
        assert_eq!(from_view.eigenvalues(), from_frozen.eigenvalues());
    }
}
