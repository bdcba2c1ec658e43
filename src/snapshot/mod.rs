//! Versioned segment snapshots: the public JSON contract (documented field by field in
//! `docs/snapshot.md`), built from the engine's state and a freshly refreshed model copy, with
//! Naive Bayes validation, TF-IDF cluster profiles, diagnostics and drift, plus the seed-style
//! text report.

pub mod group;
pub mod report;
pub mod validation;

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::engine::kmeans::{self, ClusteringParams, DensePoints};
use crate::engine::matching::adjusted_rand_index_of_table;
use crate::engine::{
    Engine, EngineView, Model, NO_CLUSTER, PreviousSegments, Segmentation, SparseVec,
    ValueTransform, held_out,
};
use crate::event::Mode;
use validation::{
    NaiveBayesReport, Profiles, naive_bayes_from_sums, stable_hash, tfidf_profiles_from_sums,
};

/// Version of the snapshot JSON layout; bumped on any incompatible change.
pub const SNAPSHOT_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub version: u64,
    pub created_at: String,
    pub mode: Mode,
    /// `[events] transform`: every figure below is one of the transformed matrix (`"none"`:
    /// the values as summed; snapshots from before transforms existed read `"none"`).
    #[serde(default)]
    pub transform: ValueTransform,
    pub counts: Counts,
    /// Next offset per `topic/partition` this snapshot reflects (empty for file replays).
    pub offsets: BTreeMap<String, i64>,
    pub pca: PcaSummary,
    pub kmeans: KmeansSummary,
    pub clusters: Vec<ClusterProfile>,
    pub validation: Validation,
    pub diagnostics: Option<Diagnostics>,
    pub drift: Option<Drift>,
    /// Forgetting (`[events] half_life`): `null` when ratings never fade. Every figure in
    /// rating units above is one of the decayed matrix.
    #[serde(default)]
    pub decay: Option<DecaySummary>,
}

/// How old ratings were weighed in a snapshot: each by `2^(−age/half_life)`, its age in event
/// time up to `as_of_ts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecaySummary {
    /// `[events] half_life` in its largest whole unit, e.g. `"30d"` (`"7d"` reads `"1w"`).
    pub half_life: String,
    pub half_life_seconds: u64,
    /// The event time the weights are computed at: the largest `ts` applied (`null` before
    /// the first event).
    pub as_of_ts: Option<i64>,
    /// The weight of an event at the decay origin, which the stored values are scaled
    /// against (internal, for checking: the decayed matrix is this times the stored one).
    #[serde(deserialize_with = "crate::nullable::float")]
    pub scale: f64,
    /// The applied events, each counted with its weight `2^(−age/half_life)`.
    #[serde(deserialize_with = "crate::nullable::float")]
    pub effective_events: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub users: u64,
    pub items: u64,
    pub ratings: u64,
    pub events_applied: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PcaSummary {
    pub n_components: usize,
    #[serde(deserialize_with = "crate::nullable::floats")]
    pub explained_variance: Vec<f64>,
    #[serde(deserialize_with = "crate::nullable::floats")]
    pub explained_variance_ratio: Vec<f64>,
    #[serde(deserialize_with = "crate::nullable::floats")]
    pub singular_values: Vec<f64>,
    #[serde(deserialize_with = "crate::nullable::float")]
    pub total_variance: f64,
    pub eigen_iterations: usize,
    pub converged: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KmeansSummary {
    pub k: usize,
    #[serde(deserialize_with = "crate::nullable::float")]
    pub inertia: f64,
    pub sizes: Vec<u64>,
    /// `fresh` (solved without segments to continue), `continued` (the previous snapshot's
    /// segments followed to convergence) or `resegmented` (replaced by a clearly better
    /// clustering: many users may have moved at once). Absent in snapshots of older builds.
    #[serde(default)]
    pub segmentation: Segmentation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterProfile {
    pub id: u32,
    pub size: u64,
    /// Centroid in PCA coordinates (centred, as scikit-learn's `transform`).
    #[serde(deserialize_with = "crate::nullable::floats")]
    pub centroid: Vec<f64>,
    /// Items with a non-zero profile score (rated by at least one member).
    pub n_items: u64,
    pub top_items: Vec<TopItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopItem {
    pub item: String,
    pub title: Option<String>,
    /// Mean l2-normalised TF-IDF weight of the item over the cluster's members.
    #[serde(deserialize_with = "crate::nullable::float")]
    pub score: f64,
    /// Mean rating of the item among the members who rated it.
    pub mean_rating: Option<f64>,
    /// Members who rated the item.
    pub raters: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub naive_bayes: NaiveBayesReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diagnostics {
    /// The snapshot version whose data these diagnostics describe: the service computes them
    /// in the background after a snapshot is served and carries the latest into the following
    /// snapshots (`None` in snapshots stored before this field existed).
    #[serde(default)]
    pub as_of_version: Option<u64>,
    /// Explained-variance ratio of the first `curve_components` components.
    #[serde(deserialize_with = "crate::nullable::floats")]
    pub explained_variance_ratio_curve: Vec<f64>,
    pub inertia_by_k: InertiaByK,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InertiaByK {
    pub k: Vec<usize>,
    /// Best K-Means inertia on the PCA projection, per k.
    #[serde(deserialize_with = "crate::nullable::floats")]
    pub projected: Vec<f64>,
    /// Best K-Means inertia on the full rating vectors of the same users, per k.
    #[serde(deserialize_with = "crate::nullable::floats")]
    pub full: Vec<f64>,
    /// Users in both curves: a seeded sample of at most `diagnostics_max_users`.
    pub full_users: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    pub previous_version: u64,
    /// Users present in both snapshots.
    pub users_compared: u64,
    /// Of those, users whose segment changed.
    pub users_moved: u64,
    #[serde(deserialize_with = "crate::nullable::float")]
    pub adjusted_rand_index: f64,
    /// Users by (previous cluster, cluster), for every pair with any, ascending: who moved
    /// where (`from == to`: stayed). Empty in snapshots stored before flows were kept.
    #[serde(default)]
    pub flows: Vec<Flow>,
    /// This snapshot replaced the previous segments by a clearly better clustering instead of
    /// continuing them (see `kmeans.segmentation`).
    #[serde(default)]
    pub resegmented: bool,
}

/// Users that were in cluster `from` at the previous snapshot and are in `to` now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    pub from: u32,
    pub to: u32,
    pub users: u64,
}

/// The few fields of a snapshot that listings and charts over time read, stored beside it so
/// they never parse whole snapshots (a snapshot holds every cluster's profile and centroid).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub version: u64,
    pub created_at: String,
    pub counts: Counts,
    /// Cluster sizes, by cluster id.
    pub sizes: Vec<u64>,
    pub drift: Option<Drift>,
    /// Whether the snapshot carries diagnostics (they are computed every few snapshots).
    pub has_diagnostics: bool,
}

impl From<&Snapshot> for SnapshotSummary {
    fn from(s: &Snapshot) -> Self {
        SnapshotSummary {
            version: s.version,
            created_at: s.created_at.clone(),
            counts: s.counts.clone(),
            sizes: s.kmeans.sizes.clone(),
            // Without flows (up to k² of them): summaries stay small.
            drift: s.drift.as_ref().map(|d| Drift {
                flows: vec![],
                ..d.clone()
            }),
            has_diagnostics: s.diagnostics.is_some(),
        }
    }
}

/// `user id → cluster id` of one snapshot, in user order.
pub type Assignments = Vec<(String, u32)>;

/// Settings of snapshot building (from `[snapshot]` in the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotParams {
    /// Items kept per cluster profile.
    pub profile_items: usize,
    /// Percentage of users held out of the Naive Bayes fit for the holdout agreement.
    pub holdout_percent: u64,
    /// Values of k for the inertia diagnostics.
    pub diagnostics_k: Vec<usize>,
    /// At most this many users (a seeded sample) in the full-data inertia diagnostics.
    pub diagnostics_max_users: usize,
    /// K-Means starts per k in the diagnostics.
    pub diagnostics_starts: usize,
}

impl Default for SnapshotParams {
    fn default() -> Self {
        SnapshotParams {
            profile_items: 50,
            holdout_percent: 20,
            diagnostics_k: vec![2, 5, 10, 15, 20, 25, 30, 40, 50],
            diagnostics_max_users: 2000,
            diagnostics_starts: 3,
        }
    }
}

/// What the builder needs besides the engine.
pub struct BuildInput<'a> {
    pub version: u64,
    pub created_at: String,
    pub titles: &'a FxHashMap<String, String>,
    pub offsets: BTreeMap<String, i64>,
    /// The previous snapshot: its version and its clusters by user index. Its clustering is
    /// where this one continues from (segments stay put unless the data moved them), and what
    /// drift is measured against.
    pub previous: Option<(u64, &'a [u32])>,
    /// Continue the previous snapshot's segments (the service's periodic snapshots) rather
    /// than take the lowest inertia found (a replay's final snapshot, whatever came before).
    pub continue_previous: bool,
    pub with_diagnostics: bool,
    /// Without `with_diagnostics`: the latest diagnostics computed in the background, carried
    /// into this snapshot as they are (their `as_of_version` says which data they describe).
    pub carried_diagnostics: Option<Diagnostics>,
}

impl<'a> BuildInput<'a> {
    /// A first snapshot with no history: version 1, no offsets, nothing to drift from.
    pub fn standalone(titles: &'a FxHashMap<String, String>, with_diagnostics: bool) -> Self {
        BuildInput {
            version: 1,
            created_at: now_rfc3339(),
            titles,
            offsets: BTreeMap::new(),
            previous: None,
            continue_previous: false,
            with_diagnostics,
            carried_diagnostics: None,
        }
    }
}

/// Builds a snapshot of the engine's current state. Returns `None` while there is not enough
/// data for a model (fewer items than components, or fewer users than clusters).
pub fn build(
    engine: &Engine,
    params: &SnapshotParams,
    input: BuildInput<'_>,
) -> Option<(Snapshot, Assignments)> {
    build_with_model(&engine.view(), params, input).map(|b| (b.snapshot, b.assignments))
}

/// A built snapshot with the refreshed model it was computed from (for serving lookups).
pub struct Built {
    pub snapshot: Snapshot,
    pub assignments: Assignments,
    pub model: Model,
}

pub fn build_with_model(
    engine: &EngineView,
    params: &SnapshotParams,
    input: BuildInput<'_>,
) -> Option<Built> {
    let previous = match input.previous {
        None => PreviousSegments::None,
        Some((_, labels)) if input.continue_previous => PreviousSegments::Continue(labels),
        Some((_, labels)) => PreviousSegments::MatchIds(labels),
    };
    let model = engine.snapshot_model(input.with_diagnostics, previous)?;
    if !model.is_clustered() {
        return None;
    }
    let (snapshot, assignments) = build_from_model(engine, &model, params, input);
    Some(Built {
        snapshot,
        assignments,
        model,
    })
}

pub fn build_from_model(
    engine: &EngineView,
    model: &Model,
    params: &SnapshotParams,
    input: BuildInput<'_>,
) -> (Snapshot, Assignments) {
    let vectors = engine.vectors();
    let k_clusters = model.clusters();
    let d = engine.items().len();
    let labels = model.labels();
    let n = engine.active_users();
    let seed = engine.params().seed;
    // Stored values are the decayed ones divided by `scale` (1 without a half-life): every
    // figure in rating units is scaled back, squared ones by its square.
    let scale = engine.value_scale();

    let started = std::time::Instant::now();
    let pca = pca_summary(model, n, scale);
    // The segments' sums: moved from the previous snapshot's (kept in step by the engine) for
    // the users that changed segment, or summed from scratch.
    let sums = engine.segment_sums(labels, params.holdout_percent);
    let sums_seconds = started.elapsed().as_secs_f64();
    let profiles = tfidf_profiles_from_sums(vectors, labels, &sums, d);
    let profiles_seconds = started.elapsed().as_secs_f64() - sums_seconds;
    let clusters = cluster_profiles(engine, model, &profiles, params, input.titles, scale);

    let user_ids = engine.users();
    let holdout = |u: usize| held_out(user_ids.id(u as u32), seed, params.holdout_percent);
    let naive_bayes = naive_bayes_from_sums(vectors, labels, &sums, d, scale, holdout);
    let naive_bayes_seconds = started.elapsed().as_secs_f64() - profiles_seconds - sums_seconds;
    let assignments = user_assignments(engine, labels);
    tracing::debug!(
        sums_seconds,
        profiles_seconds,
        naive_bayes_seconds,
        assignments_seconds =
            started.elapsed().as_secs_f64() - sums_seconds - profiles_seconds - naive_bayes_seconds,
        "snapshot build timing"
    );
    let segmentation = model.segmentation();
    let drift = input.previous.map(|(previous_version, previous)| Drift {
        resegmented: segmentation == Segmentation::Resegmented,
        ..drift_from(previous_version, previous, labels)
    });
    let diagnostics = timed_diagnostics(input.with_diagnostics, engine, model, params, scale)
        .map(|d| Diagnostics {
            as_of_version: Some(input.version),
            ..d
        })
        .or(input.carried_diagnostics);

    let snapshot = Snapshot {
        format: SNAPSHOT_FORMAT,
        version: input.version,
        created_at: input.created_at,
        mode: engine.params().mode,
        transform: engine.params().transform,
        counts: Counts {
            users: n,
            items: profiles.rated_items,
            ratings: engine.ratings(),
            events_applied: engine.counters().events_applied,
        },
        offsets: input.offsets,
        pca,
        kmeans: KmeansSummary {
            k: k_clusters,
            inertia: model.inertia() * (scale * scale),
            sizes: model.sizes().to_vec(),
            segmentation,
        },
        clusters,
        validation: Validation { naive_bayes },
        diagnostics,
        drift,
        decay: decay_summary(engine),
    };
    (snapshot, assignments)
}

/// The snapshot's `decay` field: `None` without a half-life.
fn decay_summary(engine: &EngineView) -> Option<DecaySummary> {
    let half_life = engine.params().half_life_seconds?;
    let clock = engine.decay();
    Some(DecaySummary {
        half_life: crate::engine::decay::format_half_life(half_life),
        half_life_seconds: half_life,
        as_of_ts: clock.clock_ts,
        scale: clock.scale(half_life),
        effective_events: clock.effective_events(half_life),
    })
}

/// The kept components of the model's PCA over `n` users, in scikit-learn's terms (sample
/// variances, singular values of the centred data), for the model's values times `scale`.
fn pca_summary(model: &Model, n: u64, scale: f64) -> PcaSummary {
    let kept = model.components();
    pca_summary_of(
        &model.eigenvalues()[..kept],
        model.total_variance(),
        n,
        scale,
        (model.eigen_iterations(), model.eigen_converged()),
    )
}

/// [`pca_summary`] from the kept eigenvalues and the total variance (population, over `n`
/// users) and the eigensolver's `(iterations, converged)`.
pub(crate) fn pca_summary_of(
    eigen: &[f64],
    total: f64,
    n: u64,
    scale: f64,
    (eigen_iterations, converged): (usize, bool),
) -> PcaSummary {
    let squared = scale * scale;
    let sample_scale = if n > 1 {
        n as f64 / (n as f64 - 1.0)
    } else {
        1.0
    };
    let ratio = |v: f64| if total > 0.0 { v / total } else { 0.0 };
    PcaSummary {
        n_components: eigen.len(),
        explained_variance: eigen.iter().map(|v| v * sample_scale * squared).collect(),
        explained_variance_ratio: eigen.iter().map(|&v| ratio(v)).collect(),
        singular_values: eigen
            .iter()
            .map(|v| (v.max(0.0) * n as f64).sqrt() * scale)
            .collect(),
        total_variance: total * sample_scale * squared,
        eigen_iterations,
        converged,
    }
}

/// Every cluster's size, centred centroid and top items by TF-IDF profile score.
fn cluster_profiles(
    engine: &EngineView,
    model: &Model,
    profiles: &Profiles,
    params: &SnapshotParams,
    titles: &FxHashMap<String, String>,
    scale: f64,
) -> Vec<ClusterProfile> {
    let segments = Segments {
        uncentred_centroids: model.uncentred_centroids(),
        projected_mean: &model.projected_mean(),
        sizes: model.sizes(),
        components: model.components(),
    };
    cluster_profiles_of(&segments, profiles, params, titles, scale, |j| {
        engine.items().id(j as u32).to_string()
    })
}

/// What a clustering says of its segments, for their profiles: centroids in the projection of
/// the uncentred rows (`clusters x components`), the projected mean, the sizes.
pub(crate) struct Segments<'a> {
    pub uncentred_centroids: &'a [f64],
    pub projected_mean: &'a [f64],
    pub sizes: &'a [u64],
    pub components: usize,
}

/// [`cluster_profiles`] of `segments`, `item(j)` naming item `j`.
pub(crate) fn cluster_profiles_of(
    segments: &Segments<'_>,
    profiles: &Profiles,
    params: &SnapshotParams,
    titles: &FxHashMap<String, String>,
    scale: f64,
    item: impl Fn(usize) -> String,
) -> Vec<ClusterProfile> {
    let kept = segments.components;
    (0..segments.sizes.len())
        .map(|c| {
            let ranked = profiles.ranked(c);
            ClusterProfile {
                id: c as u32,
                size: segments.sizes[c],
                centroid: (0..kept)
                    .map(|i| {
                        (segments.uncentred_centroids[c * kept + i] - segments.projected_mean[i])
                            * scale
                    })
                    .collect(),
                n_items: ranked.len() as u64,
                top_items: ranked
                    .iter()
                    .take(params.profile_items)
                    .map(|&j| {
                        let item = item(j);
                        TopItem {
                            title: titles.get(&item).cloned(),
                            item,
                            score: profiles.score(c, j),
                            mean_rating: profiles.mean_rating(c, j).map(|m| m * scale),
                            raters: profiles.raters[c * profiles.d + j],
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

/// `user id → cluster id` of every clustered user, in user order.
fn user_assignments(engine: &EngineView, labels: &[u32]) -> Assignments {
    let user_ids = engine.users();
    labels
        .iter()
        .enumerate()
        .filter(|(_, l)| **l != NO_CLUSTER)
        .map(|(u, &l)| (user_ids.id(u as u32).to_string(), l))
        .collect()
}

/// How the clustering moved since the `previous` snapshot, over the users clustered in both.
pub(crate) fn drift_from(previous_version: u64, previous: &[u32], labels: &[u32]) -> Drift {
    let mut pairs: BTreeMap<(u32, u32), u64> = Default::default();
    for (&from, &to) in previous.iter().zip(labels) {
        if from != NO_CLUSTER && to != NO_CLUSTER {
            *pairs.entry((from, to)).or_default() += 1;
        }
    }
    drift_of_flows(previous_version, pairs)
}

/// How the clustering moved since the previous snapshot, from the users counted by
/// `(previous cluster, cluster)` (sums over disjoint sets of users add up).
pub(crate) fn drift_of_flows(previous_version: u64, pairs: BTreeMap<(u32, u32), u64>) -> Drift {
    let cells: Vec<((u32, u32), u64)> = pairs.into_iter().filter(|&(_, n)| n > 0).collect();
    Drift {
        previous_version,
        users_compared: cells.iter().map(|(_, n)| n).sum(),
        users_moved: cells
            .iter()
            .filter(|((from, to), _)| from != to)
            .map(|(_, n)| n)
            .sum(),
        adjusted_rand_index: adjusted_rand_index_of_table(&cells),
        flows: cells
            .into_iter()
            .map(|((from, to), users)| Flow { from, to, users })
            .collect(),
        resegmented: false,
    }
}

/// The [`diagnostics`] when `wanted`, with the time they took logged (also when not wanted).
fn timed_diagnostics(
    wanted: bool,
    engine: &EngineView,
    model: &Model,
    params: &SnapshotParams,
    scale: f64,
) -> Option<Diagnostics> {
    let profiled = std::time::Instant::now();
    let diagnostics = wanted.then(|| diagnostics(engine, model, params, scale, &|| {}));
    tracing::debug!(
        diagnostics_seconds = profiled.elapsed().as_secs_f64(),
        "snapshot diagnostics timing"
    );
    diagnostics
}

/// Lloyd passes at most for a full-data inertia in the diagnostics, started from the best
/// projected clustering of the same k (it is close already: usually 2-5 passes suffice).
const FULL_DIAGNOSTIC_PASSES: usize = 20;

/// K-Means inertia of sparse rating rows, by Lloyd from the clustering `labels` (all `< k`) until
/// no label changes or `max_passes`. Centroids are kept item-major (`d x k`) so one sweep over a
/// row's ratings gives its dot product with every centroid. A cluster that empties keeps its
/// last centroid (it stays available to the next pass).
fn sparse_lloyd_inertia(
    rows: &[&SparseVec],
    norms: &[f64],
    d: usize,
    k: usize,
    mut labels: Vec<u32>,
    max_passes: usize,
) -> f64 {
    let mut centroids = vec![0.0; d * k];
    let mut centroid_norms = vec![0.0; k];
    let mut dots = vec![0.0; k];
    let update = |labels: &[u32], centroids: &mut [f64], centroid_norms: &mut [f64]| {
        let mut sums = vec![0.0; d * k];
        let mut sizes = vec![0u64; k];
        for (x, &l) in rows.iter().zip(labels) {
            let l = l as usize;
            sizes[l] += 1;
            for (j, v) in x.iter() {
                sums[j as usize * k + l] += v;
            }
        }
        for j in 0..d {
            for c in 0..k {
                if sizes[c] > 0 {
                    centroids[j * k + c] = sums[j * k + c] / sizes[c] as f64;
                }
            }
        }
        centroid_norms.iter_mut().for_each(|n| *n = 0.0);
        for j in 0..d {
            for c in 0..k {
                centroid_norms[c] += centroids[j * k + c] * centroids[j * k + c];
            }
        }
    };
    update(&labels, &mut centroids, &mut centroid_norms);
    for _ in 0..max_passes {
        let mut changed = false;
        for ((x, norm), label) in rows.iter().zip(norms).zip(labels.iter_mut()) {
            dots.iter_mut().for_each(|t| *t = 0.0);
            for (j, v) in x.iter() {
                for (t, c) in dots
                    .iter_mut()
                    .zip(&centroids[j as usize * k..(j as usize + 1) * k])
                {
                    *t += v * c;
                }
            }
            let mut best = (*label, f64::INFINITY);
            for (c, (t, cn)) in dots.iter().zip(&centroid_norms).enumerate() {
                let distance = norm - 2.0 * t + cn;
                if distance < best.1 {
                    best = (c as u32, distance);
                }
            }
            if best.0 != *label {
                *label = best.0;
                changed = true;
            }
        }
        if !changed {
            break;
        }
        update(&labels, &mut centroids, &mut centroid_norms);
    }
    rows.iter()
        .zip(norms)
        .zip(&labels)
        .map(|((x, norm), &l)| {
            let l = l as usize;
            let dot: f64 = x
                .iter()
                .map(|(j, v)| v * centroids[j as usize * k + l])
                .sum();
            (norm - 2.0 * dot + centroid_norms[l]).max(0.0)
        })
        .sum()
}

/// The seed's two decision aids: the explained-variance-ratio curve, and K-Means inertia for a
/// range of k on the projection and on the full vectors (of a seeded user sample), the
/// inertias for the stored values times `scale`.
pub fn diagnostics(
    engine: &EngineView,
    model: &Model,
    params: &SnapshotParams,
    scale: f64,
    between_steps: &(dyn Fn() + Sync),
) -> Diagnostics {
    let total = model.total_variance();
    let curve = model
        .eigenvalues()
        .iter()
        .map(|v| if total > 0.0 { v / total } else { 0.0 })
        .collect();
    let seed = engine.params().seed;
    let kept = model.components();
    // Both inertia curves use the same seeded sample of users (all of them when few enough),
    // in an order that depends only on the user ids, never on event arrival.
    let users = engine.users();
    let mut sample: Vec<usize> = engine
        .canonical_user_order()
        .into_iter()
        .map(|u| u as usize)
        .filter(|&u| engine.vectors()[u].nnz() > 0)
        .collect();
    if sample.len() > params.diagnostics_max_users {
        sample.sort_by_cached_key(|&u| stable_hash(users.id(u as u32).as_bytes(), seed ^ 0x5eed));
        sample.truncate(params.diagnostics_max_users);
    }
    let mut projected_data = Vec::with_capacity(sample.len() * kept);
    for &u in &sample {
        projected_data.extend_from_slice(model.projection(u));
    }
    let projected = DensePoints {
        data: &projected_data,
        dim: kept,
    };
    let rows: Vec<&SparseVec> = sample.iter().map(|&u| &engine.vectors()[u]).collect();
    let norms: Vec<f64> = rows
        .iter()
        .map(|x| x.val.iter().map(|v| v * v).sum())
        .collect();
    let d = engine.items().len();
    let ks: Vec<usize> = params
        .diagnostics_k
        .iter()
        .copied()
        .filter(|&k| k >= 1 && k <= rows.len())
        .collect();
    // Per k: the best of `diagnostics_starts` K-Means runs on the projection, then Lloyd on the
    // full vectors started from that clustering (the projected optimum is close to the full
    // one, so a few passes replace as many fresh starts on the costly full data).
    let inertia_at = |k: usize| -> (f64, f64) {
        between_steps();
        let settings = ClusteringParams {
            k,
            max_passes: 100,
            restarts: params.diagnostics_starts,
            keep_current: false,
            seed: seed ^ k as u64,
        };
        let best = kmeans::cluster(&projected, None, &settings);
        let full = sparse_lloyd_inertia(&rows, &norms, d, k, best.labels, FULL_DIAGNOSTIC_PASSES);
        let squared = scale * scale;
        (best.inertia * squared, full * squared)
    };
    // The values of k are independent: spread over the cores (larger k cost more).
    let by_k = crate::engine::parallel::map_interleaved(ks.len(), |i| inertia_at(ks[i]));
    let (projected_inertia, full_inertia): (Vec<f64>, Vec<f64>) = by_k.into_iter().unzip();
    Diagnostics {
        as_of_version: None,
        explained_variance_ratio_curve: curve,
        inertia_by_k: InertiaByK {
            k: ks,
            projected: projected_inertia,
            full: full_inertia,
            full_users: rows.len() as u64,
        },
    }
}

/// `created_at` value for now, RFC 3339 in UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A small engine (20 users, 13 items, 2 components, 2 clusters) and its snapshots, for the
/// tests of readers (store, HTTP) that need real snapshots without a workload of their own.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::engine::{Engine, EngineParams};
    use crate::event::RatingEvent;

    pub(crate) fn small_engine() -> Engine {
        let mut engine = Engine::new(EngineParams {
            components: 2,
            clusters: 2,
            ..EngineParams::default()
        });
        let events: Vec<RatingEvent> = (0..200)
            .map(|i| RatingEvent {
                user: format!("u{}", i % 20),
                item: format!("i{}", (i * 7) % 13),
                value: Some((i % 5 + 1) as f64),
                ts: i,
            })
            .collect();
        engine.apply(&events);
        engine
    }

    /// [`small_engine`]'s snapshot as version `version`, with or without diagnostics.
    pub(crate) fn small_snapshot(version: u64, with_diagnostics: bool) -> super::Snapshot {
        let titles = rustc_hash::FxHashMap::default();
        let mut input = super::BuildInput::standalone(&titles, with_diagnostics);
        input.version = version;
        super::build(&small_engine(), &Default::default(), input)
            .expect("enough data for a snapshot")
            .0
    }
}
