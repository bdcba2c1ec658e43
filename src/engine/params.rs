//! The engine's parameters: the `[model]` section of the config file, deserialised straight
//! into [`EngineParams`], with the defaults every other place refers to.

use serde::{Deserialize, Serialize};

use super::eigen::EigenParams;
use super::transform::ValueTransform;
use crate::event::{Mode, ValuePolicy};

/// Default `[model] max_items`: a 60k-item catalogue and more within a 2 GB budget (memory is
/// O(ratings + items·components), see the README's memory model).
pub const DEFAULT_MAX_ITEMS: usize = 100_000;

/// Default `[model] max_users`: measured with 2M users of one rating each, a user costs about
/// 730 bytes of memory at rest and 1.3 KB while a snapshot is built (plus its ratings), so ten
/// million users fit a 24 GB machine.
pub const DEFAULT_MAX_USERS: usize = 10_000_000;

/// Model and schedule settings, and the one definition of the config's `[model]` section:
/// it deserialises straight into this struct (keys are the field names, defaults those of
/// `Default`), so a model parameter is added here only. The config layer checks the values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineParams {
    /// The value rules belong to `[events]`, not `[model]`: `Config::engine_params` copies
    /// them in.
    #[serde(skip)]
    pub mode: Mode,
    #[serde(skip)]
    pub min_value: f64,
    #[serde(skip)]
    pub max_value: f64,
    /// `[events] half_life` in seconds: a rating's weight decays as `2^(−age/half_life)`, its
    /// age measured in event time. `None`: no forgetting.
    #[serde(skip)]
    pub half_life_seconds: Option<u64>,
    /// `[events] transform`: what the recipe segments, computed from the stored values
    /// (resolved to the mode's default when unset).
    #[serde(skip)]
    pub transform: ValueTransform,
    /// PCA components kept.
    pub components: usize,
    /// K-Means clusters.
    pub clusters: usize,
    /// Eigenvalues computed for the explained-variance diagnostics curve (≥ components).
    pub curve_components: usize,
    /// Refresh the PCA and polish the clustering after this many applied events at least.
    pub refresh_every_events: u64,
    /// ... and once the events since the last refresh reach this share of the current ratings
    /// (non-zero cells), so refreshes, each O(ratings), stay a bounded share of the work as
    /// the data grows. 0 = every `refresh_every_events` events.
    pub refresh_changed_share: f64,
    /// Lloyd passes over all users at each periodic refresh.
    pub polish_passes: usize,
    /// Fresh k-means++ starts of a cold snapshot (the first one, a replay's).
    pub snapshot_kmeans_starts: usize,
    /// Fresh k-means++ starts that challenge each served snapshot, after it is served (each
    /// snapshot draws new ones): a rotating budget off the snapshots' critical path.
    pub snapshot_fresh_starts: usize,
    /// Lloyd passes at most per start at snapshot time.
    pub snapshot_max_passes: usize,
    /// A snapshot continues the previous snapshot's segments (Lloyd to convergence from them)
    /// unless another clustering (the online one or a fresh start) has an inertia lower by
    /// more than this share; then it re-segments openly (`kmeans.segmentation`).
    pub snapshot_stability_margin: f64,
    /// When a snapshot continues the previous one, a user the Lloyd optimum moves may be held in
    /// its previous segment if that segment's centroid is within `1 / (1 − snapshot_stickiness)`
    /// times its squared distance to its new one (0: plain Lloyd, a true local optimum) ...
    pub snapshot_stickiness: f64,
    /// ... cheapest first, while the held users add at most this share to the optimum's
    /// inertia (a re-segmentation: up to `(1 + this) / (1 − margin)` of the better
    /// clustering's, the same bound a continued snapshot has).
    pub snapshot_stickiness_budget: f64,
    /// Eigensolver tolerance at snapshot time (exact parity with batch PCA).
    pub eigen_tolerance: f64,
    /// Eigensolver tolerance of a snapshot that continues the previous one (warm from its
    /// basis). Eigenvalues converge as the square of the residual, so explained variance
    /// still agrees with a cold solve to about `tolerance²`; the components to `tolerance`.
    pub continued_eigen_tolerance: f64,
    /// Eigensolver tolerance of the periodic refresh (the online model only needs a good basis).
    pub refresh_eigen_tolerance: f64,
    pub eigen_max_iterations: usize,
    /// Iteration cap of the periodic (warm-started) refresh: the online model needs a good
    /// basis, not a converged one; snapshots always converge.
    pub refresh_max_iterations: usize,
    pub eigen_oversample: usize,
    /// Distinct items at most: an event for a new item past the cap is rejected
    /// ([`RejectReason::CatalogueFull`]), so memory stays bounded whatever producers send.
    pub max_items: usize,
    /// Distinct users at most: an event of a new user past the cap is rejected
    /// ([`RejectReason::PopulationFull`]) while known users' events still apply, so memory stays
    /// bounded whatever ids producers send.
    pub max_users: usize,
    /// Also refresh when this many milliseconds passed since the last refresh (0 = by event
    /// count only). The engine has no clock: the service applies it, replays ignore it.
    pub refresh_interval_ms: u64,
    pub seed: u64,
}

impl Default for EngineParams {
    fn default() -> Self {
        EngineParams {
            mode: Mode::Explicit,
            min_value: 0.0,
            max_value: 5.0,
            half_life_seconds: None,
            transform: ValueTransform::NONE,
            components: 10,
            clusters: 25,
            curve_components: 30,
            refresh_every_events: 100_000,
            refresh_changed_share: 0.25,
            polish_passes: 3,
            snapshot_kmeans_starts: 25,
            snapshot_fresh_starts: 10,
            snapshot_max_passes: 300,
            snapshot_stability_margin: 0.01,
            snapshot_stickiness: 0.75,
            snapshot_stickiness_budget: 0.01,
            eigen_tolerance: 1e-9,
            continued_eigen_tolerance: 1e-6,
            refresh_eigen_tolerance: 1e-4,
            eigen_max_iterations: 500,
            refresh_max_iterations: 10,
            eigen_oversample: 10,
            max_items: DEFAULT_MAX_ITEMS,
            max_users: DEFAULT_MAX_USERS,
            refresh_interval_ms: 0,
            seed: 42,
        }
    }
}

impl EngineParams {
    pub fn policy(&self) -> ValuePolicy {
        ValuePolicy {
            mode: self.mode,
            min_value: self.min_value,
            max_value: self.max_value,
            half_life_seconds: self.half_life_seconds,
            future_tolerance_seconds: None,
        }
    }

    /// Eigen solve settings: a snapshot's (to `eigen_tolerance`, or `continued_eigen_tolerance`
    /// when it continues the previous one; with the diagnostics curve's eigenvalues when
    /// `with_curve`) or a periodic refresh's (`refresh_eigen_tolerance`).
    pub(super) fn eigen(&self, seed: u64, solve: EigenSolve, with_curve: bool) -> EigenParams {
        let snapshot = solve != EigenSolve::Refresh;
        EigenParams {
            vectors: self.components,
            values: if with_curve {
                self.curve_components.max(self.components)
            } else {
                self.components
            },
            oversample: self.eigen_oversample,
            tolerance: match solve {
                EigenSolve::Cold => self.eigen_tolerance,
                EigenSolve::Continued => self.continued_eigen_tolerance,
                EigenSolve::Refresh => self.refresh_eigen_tolerance,
            },
            max_iterations: if snapshot {
                self.eigen_max_iterations
            } else {
                self.refresh_max_iterations
            },
            seed,
        }
    }
}

/// Which solve an eigen problem is for (see [`EngineParams::eigen`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EigenSolve {
    /// A snapshot solved from the data alone (a replay's, the first one).
    Cold,
    /// A snapshot continuing the previous one, warm from its basis.
    Continued,
    /// The online model's periodic refresh.
    Refresh,
}
