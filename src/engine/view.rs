//! What a snapshot reads: a frozen view of the engine's data and online model, and the
//! snapshot's own model solved from it (the PCA to `eigen_tolerance`, the clustering
//! continued or solved cold).

use super::kmeans::ClusteringParams;
use super::model::{Continuation, DataView};
use super::stats::CovarianceStats;
use super::{Counters, CowVec, DecayClock, EngineParams, Ids, Model, SparseVec, WarmStart};

/// What a snapshot reads: the engine's data and model at one moment (see [`Engine::view`]).
#[derive(Debug, Clone)]
pub struct EngineView {
    pub(super) params: EngineParams,
    pub(super) users: Ids,
    pub(super) items: Ids,
    pub(super) vectors: CowVec<SparseVec>,
    pub(super) stats: CovarianceStats,
    pub(super) ratings: u64,
    pub(super) counters: Counters,
    pub(super) decay: DecayClock,
    pub(super) model: Model,
    pub(super) sorted_users: Vec<u32>,
}

impl EngineView {
    /// See [`Engine::decay`].
    pub fn decay(&self) -> DecayClock {
        self.decay
    }
    /// See [`Engine::value_scale`].
    pub fn value_scale(&self) -> f64 {
        self.decay.value_scale(self.params.half_life_seconds)
    }
    pub fn params(&self) -> &EngineParams {
        &self.params
    }
    pub fn users(&self) -> &Ids {
        &self.users
    }
    pub fn items(&self) -> &Ids {
        &self.items
    }
    pub fn vectors(&self) -> &CowVec<SparseVec> {
        &self.vectors
    }
    pub fn model(&self) -> &Model {
        &self.model
    }
    /// Starts the snapshot's PCA solve from `previous` (the last snapshot's model) rather than
    /// from the online basis: after a small delta it is the closer start.
    pub fn warm_start_from(&mut self, previous: &WarmStart) {
        self.model.warm_start_from(previous);
    }
    pub fn counters(&self) -> Counters {
        self.counters
    }
    /// Users with at least one rating.
    pub fn active_users(&self) -> u64 {
        self.stats.users()
    }
    /// Non-zero (user, item) cells.
    pub fn ratings(&self) -> u64 {
        self.ratings
    }
    pub fn canonical_user_order(&self) -> Vec<u32> {
        self.sorted_users.clone()
    }

    /// A copy of the model with the PCA re-solved to `eigen_tolerance` on the current data and
    /// the users clustered, as `previous` says: continuing the previous snapshot's segments
    /// (Lloyd to convergence from them, replaced only by a clustering better by more than
    /// `snapshot_stability_margin`: the online one or one of `snapshot_fresh_starts` fresh
    /// k-means++ starts), or solved cold (`snapshot_kmeans_starts` fresh starts on a sample,
    /// polished on everyone) with ids matched to the previous segments when given. The engine
    /// itself is not changed, so when snapshots are taken never alters the online trajectory.
    /// `with_curve` also settles the diagnostics curve's further eigenvalues
    /// (`curve_components`), which costs most of the solve on a flat spectrum tail: only
    /// snapshots that report diagnostics ask for it.
    pub fn snapshot_model(
        &self,
        with_curve: bool,
        previous: PreviousSegments<'_>,
    ) -> Option<Model> {
        if self.items.len() < self.params.components || self.stats.users() < 2 {
            return None;
        }
        let seed = self.params.seed
            ^ self
                .counters
                .events_applied
                .wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut model = self.model.clone();
        let order = self.canonical_user_order();
        let data = DataView {
            stats: &self.stats,
            vectors: &self.vectors,
            canonical_order: &order,
            items: self.items.len(),
        };
        let (labels, continuing) = match previous {
            PreviousSegments::None => (None, false),
            PreviousSegments::MatchIds(labels) => (Some(labels), false),
            PreviousSegments::Continue(labels) => (Some(labels), true),
        };
        if !continuing {
            // A cold solve depends on today's data only, not on the online clustering.
            model.forget_clustering();
        }
        model.refresh(
            &data,
            // Warm from the online basis: the solve converges to `eigen_tolerance` whatever it
            // starts from, so the result depends on today's data only, and starts close.
            true,
            &self.params.eigen(self.params.seed, true, with_curve),
            &ClusteringParams {
                k: self.params.clusters,
                max_passes: self.params.snapshot_max_passes,
                restarts: if continuing {
                    self.params.snapshot_fresh_starts
                } else {
                    self.params.snapshot_kmeans_starts
                },
                keep_current: true,
                seed,
            },
            labels.map(|labels| Continuation {
                labels,
                margin: continuing.then_some(self.params.snapshot_stability_margin),
                stickiness: self.params.snapshot_stickiness,
                stickiness_budget: self.params.snapshot_stickiness_budget,
            }),
        );
        Some(model)
    }
}

/// The segments a snapshot is built against (labels by user index, as stored with the
/// previous snapshot).
#[derive(Debug, Clone, Copy)]
pub enum PreviousSegments<'a> {
    /// None: a first snapshot.
    None,
    /// Solve cold, then renumber the segments to overlap most with these (a replay into a
    /// state dir that already has snapshots keeps their ids).
    MatchIds(&'a [u32]),
    /// Continue these segments (the service's snapshots).
    Continue(&'a [u32]),
}
