//! What a snapshot reads: a frozen view of the engine's data and online model, and the
//! snapshot's own model solved from it (the PCA to `eigen_tolerance`, the clustering
//! continued or solved cold).

use super::kmeans::ClusteringParams;
use super::model::{Challenge, ChallengeBounds, Continuation, DataView};
use super::params::EigenSolve;
use super::stats::CovarianceStats;
use super::{
    Counters, CowVec, DecayClock, EngineParams, Ids, Model, SegmentSums, SparseVec, WarmStart,
    held_out,
};

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
    pub(super) segments: Option<super::TrackedSegments>,
    /// What challenging the previous snapshot found (see [`Challenge`]).
    pub(super) challenge: Option<Challenge>,
    /// Where the next continued clustering's Lloyd starts (see [`Continuation::start`]).
    pub(super) lloyd_start: Option<Vec<u32>>,
}

impl EngineView {
    /// See [`Engine::decay`].
    pub fn decay(&self) -> DecayClock {
        self.decay
    }
    /// See [`Engine::value_scale`].
    pub fn value_scale(&self) -> f64 {
        self.params
            .transform
            .scale_of(self.decay.value_scale(self.params.half_life_seconds))
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
    /// The [`SegmentSums`] of segments `labels` (by user index), held out as
    /// `holdout_percent` says. From the tracked sums when the engine keeps them: only users
    /// whose segment differs from the tracked one are moved, O(their ratings + users);
    /// otherwise from scratch, O(ratings).
    pub fn segment_sums(&self, labels: &[u32], holdout_percent: u64) -> SegmentSums {
        let seed = self.params.seed;
        let held = |u: usize| held_out(self.users.id(u as u32), seed, holdout_percent);
        match &self.segments {
            Some(tracked)
                if tracked.holdout_percent == holdout_percent
                    && tracked.sums.k() == self.params.clusters =>
            {
                let mut sums = tracked.sums.clone();
                sums.follow(&tracked.labels, labels, &self.vectors, held);
                sums
            }
            _ => SegmentSums::from_scratch(
                &self.vectors,
                labels,
                self.params.clusters,
                self.items.len(),
                held,
            ),
        }
    }

    /// `served` (a snapshot model built from this view) with the diagnostics curve's
    /// `curve_components` eigenvalues, solved on this view's data warm from its basis: what
    /// diagnostics computed after the snapshot is served need.
    pub fn with_curve(&self, served: &Model) -> Model {
        let mut model = served.clone();
        model.solve_curve(
            &self.stats,
            &self.vectors,
            self.items.len(),
            &self
                .params
                .eigen(self.params.seed, EigenSolve::Continued, true),
        );
        model
    }

    /// The next snapshot compares itself with what challenging a previous one found, instead
    /// of running fresh starts while it is built.
    pub fn set_challenge(&mut self, challenge: Challenge) {
        self.challenge = Some(challenge);
    }

    /// The next snapshot continues segments whose build reached this Lloyd optimum (by user
    /// index) before holding users: its Lloyd starts there.
    pub fn set_lloyd_start(&mut self, labels: Vec<u32>) {
        self.lloyd_start = Some(labels);
    }

    /// Challenges `served`, the snapshot model built from this view as `version` (see
    /// [`Challenge`]): O(users · components · starts), meant to run after it is served.
    pub fn challenge(&self, served: &Model, version: u64) -> Option<Challenge> {
        let order = self.canonical_user_order();
        Self::challenge_with(
            &self.params,
            served,
            version,
            &order,
            self.model.labels(),
            &|| {},
        )
    }

    /// [`EngineView::challenge`] from what it needs of a view: the parameters, the canonical
    /// user order and the online clustering's labels; `between_steps` runs between its steps
    /// (the service waits there while a snapshot is built).
    pub fn challenge_with(
        params: &EngineParams,
        served: &Model,
        version: u64,
        canonical_order: &[u32],
        online: &[u32],
        between_steps: &dyn Fn(),
    ) -> Option<Challenge> {
        served.challenge(
            version,
            canonical_order,
            online,
            between_steps,
            &ClusteringParams {
                k: params.clusters,
                max_passes: params.snapshot_max_passes,
                restarts: params.snapshot_fresh_starts,
                keep_current: true,
                seed: params.seed ^ version.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            },
            ChallengeBounds {
                margin: params.snapshot_stability_margin,
                stickiness_budget: params.snapshot_stickiness_budget,
            },
        )
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
            &self.params.eigen(
                self.params.seed,
                if continuing {
                    EigenSolve::Continued
                } else {
                    EigenSolve::Cold
                },
                with_curve,
            ),
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
                challenge: self.challenge.as_ref(),
                start: self.lloyd_start.as_deref(),
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
