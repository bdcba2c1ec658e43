//! The online model on top of the statistics: the PCA basis, every user's projection, and the
//! K-Means clustering of the projections with exact member-mean centroids.
//!
//! Projections are kept *uncentred* (`z = Uᵀx`): the mean `Uᵀμ` is the same shift for every
//! user and every centroid, so distances, assignments and inertia do not depend on it, and a
//! rating change moves `z` by `δ·U[j,:]` in O(k) without touching anyone else.

use ndarray::{Array2, Axis};

use super::eigen::{EigenParams, EigenResult, top_eigenpairs};
use super::kmeans::{self, ClusteringParams, DensePoints, Points};
use super::matching::match_labels;
use super::stats::CovarianceStats;
use super::{ChangeSink, CowVec, SparseVec};

/// Users the fresh k-means++ starts of a cold solve or a refresh run on (an evenly spread
/// sample of the canonical order; the winner is then polished on everyone): 200 a cluster, at
/// least 5,000. Measured on the 5M-rating realistic sets (k = 25) against a 20,000-user sample:
/// half the clustering time (0.58 s against 1.43 s explicit, 0.63 against 1.27 implicit), the
/// inertia 0.05% higher explicit and 0.16% lower implicit, within the spread of the starts'
/// seeds either way.
pub fn clustering_sample_users(clusters: usize) -> usize {
    clusters.saturating_mul(200).max(5_000)
}

/// The sample of a continued snapshot's challengers: they only need to show that a clearly
/// better clustering exists (the winner is still polished on everyone), and a snapshot after a
/// small delta must stay cheap.
pub const CHALLENGER_SAMPLE_USERS: usize = 5_000;

/// A fresh clustering replaces the current one only when its inertia is lower by more than
/// this share: equally good local optima must not make segments hop.
pub const STABILITY_MARGIN: f64 = 0.005;

/// A user changes cluster only for a centroid closer than `1 − STICKINESS` times its squared
/// distance to its own (online, at refreshes and in snapshots): with more clusters than the data
/// has segments, users on the boundary between two sub-clusters of one segment would otherwise
/// flip back and forth as their vectors change.
pub const STICKINESS: f64 = 0.05;

/// Users from which re-projecting everyone is spread over the cores (below, a thread costs
/// more than it saves).
const PARALLEL_REPROJECT_USERS: usize = 20_000;

/// No cluster: the user has no ratings, or the model is not initialised yet.
pub const NO_CLUSTER: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub struct Model {
    components: usize,
    clusters: usize,
    /// `components x d_basis`, one unit principal axis per row (scikit-learn's `components_`).
    basis: Array2<f64>,
    /// The same basis transposed and flat (`d_basis x components`), for O(k) event updates.
    loadings: Vec<f64>,
    /// The eigensolver's last Ritz block, kept to warm-start the next refresh (not persisted:
    /// after a restart the solver starts from the basis alone and converges to the same result).
    warm_block: Array2<f64>,
    /// Eigenvalues of the population covariance, descending (the diagnostics curve length).
    eigenvalues: Vec<f64>,
    /// Trace of the population covariance at the last refresh.
    total_variance: f64,
    /// Column means `μ` at the last refresh.
    mean: Vec<f64>,
    users_at_refresh: u64,
    eigen_iterations: usize,
    eigen_converged: bool,
    /// `users x components`, uncentred projections `z = Uᵀx`.
    projections: Vec<f64>,
    labels: Vec<u32>,
    /// `clusters x components`: sums of member projections, counts and means.
    sums: Vec<f64>,
    counts: Vec<u64>,
    means: Vec<f64>,
    initialised: bool,
    /// How the last recluster relates to the segments it was given to continue.
    segmentation: Segmentation,
    /// The Lloyd optimum a continued clustering reached before users were held in place (by
    /// user index, in the published ids; empty when the last clustering was not continued):
    /// where the next continued snapshot's Lloyd starts, closer to its optimum than the held
    /// segments are.
    lloyd_optimum: Vec<u32>,
}

/// How a snapshot's clustering relates to the previous snapshot's segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Segmentation {
    /// Solved without segments to continue (the first snapshot, a replay's cold solve): ids
    /// are still matched to the previous snapshot's when there is one.
    #[default]
    Fresh,
    /// The previous segments, followed by Lloyd to convergence on today's data.
    Continued,
    /// Another clustering was better than continuing by more than the stability margin and
    /// replaced it (ids matched by overlap), or segments the data left behind were re-seeded:
    /// many users may change segment at once.
    Resegmented,
}

/// A solved basis and its Ritz block, kept to start the next snapshot's solve from.
#[derive(Debug, Clone)]
pub struct WarmStart {
    components: usize,
    basis: Array2<f64>,
    block: Array2<f64>,
}

/// What a refresh did, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefreshOutcome {
    pub eigen_iterations: usize,
    pub eigen_converged: bool,
    pub max_relative_residual: f64,
    pub lloyd_passes: usize,
    pub inertia: f64,
    /// Wall time of the refresh.
    pub seconds: f64,
}

impl Model {
    pub fn new(components: usize, clusters: usize) -> Self {
        Model {
            components,
            clusters,
            basis: Array2::zeros((0, 0)),
            loadings: vec![],
            warm_block: Array2::zeros((0, 0)),
            eigenvalues: vec![],
            total_variance: 0.0,
            mean: vec![],
            users_at_refresh: 0,
            eigen_iterations: 0,
            eigen_converged: false,
            projections: vec![],
            labels: vec![],
            sums: vec![0.0; clusters * components],
            counts: vec![0; clusters],
            means: vec![0.0; clusters * components],
            initialised: false,
            segmentation: Segmentation::Fresh,
            lloyd_optimum: vec![],
        }
    }

    pub fn components(&self) -> usize {
        self.components
    }
    pub fn clusters(&self) -> usize {
        self.clusters
    }
    pub fn has_basis(&self) -> bool {
        self.basis.nrows() > 0
    }
    /// See the field: the optimum a continued snapshot's Lloyd reached, before holding.
    pub fn lloyd_optimum(&self) -> &[u32] {
        &self.lloyd_optimum
    }

    /// How the last recluster relates to the segments it was asked to continue.
    pub fn segmentation(&self) -> Segmentation {
        self.segmentation
    }
    pub fn is_clustered(&self) -> bool {
        self.initialised
    }
    pub fn basis(&self) -> &Array2<f64> {
        &self.basis
    }
    pub fn eigenvalues(&self) -> &[f64] {
        &self.eigenvalues
    }
    pub fn total_variance(&self) -> f64 {
        self.total_variance
    }
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }
    pub fn users_at_refresh(&self) -> u64 {
        self.users_at_refresh
    }
    pub fn eigen_converged(&self) -> bool {
        self.eigen_converged
    }
    pub fn eigen_iterations(&self) -> usize {
        self.eigen_iterations
    }
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }
    pub fn label(&self, user: usize) -> u32 {
        self.labels.get(user).copied().unwrap_or(NO_CLUSTER)
    }
    pub fn sizes(&self) -> &[u64] {
        &self.counts
    }
    /// Where user `user`'s projection starts (for a prefetch hint; never dereferenced).
    pub(crate) fn projection_ptr(&self, user: usize) -> *const f64 {
        self.projections
            .as_ptr()
            .wrapping_add(user * self.components)
    }

    /// Uncentred projection of one user.
    pub fn projection(&self, user: usize) -> &[f64] {
        let k = self.components;
        &self.projections[user * k..(user + 1) * k]
    }
    /// Centroids in uncentred projection space (`clusters x components`).
    pub fn uncentred_centroids(&self) -> &[f64] {
        &self.means
    }
    /// The projection of the mean user, `Uᵀμ`: subtract it to get scikit-learn's `transform`.
    pub fn projected_mean(&self) -> Vec<f64> {
        let k = self.components;
        let mut out = vec![0.0; k];
        for (j, &m) in self.mean.iter().enumerate() {
            if m != 0.0 {
                for (o, &l) in out.iter_mut().zip(&self.loadings[j * k..(j + 1) * k]) {
                    *o += m * l;
                }
            }
        }
        out
    }

    /// Each user's squared distance to its cluster's centroid (`None` without a cluster), in
    /// user order.
    fn own_squared_distances(&self) -> impl Iterator<Item = Option<f64>> + '_ {
        let k = self.components;
        self.labels.iter().enumerate().map(move |(u, &l)| {
            (l != NO_CLUSTER).then(|| {
                let c = &self.means[l as usize * k..(l as usize + 1) * k];
                squared_distance(&self.projections[u * k..(u + 1) * k], c)
            })
        })
    }

    /// Sum of squared distances of the clustered users to their centroids.
    pub fn inertia(&self) -> f64 {
        self.own_squared_distances().flatten().sum()
    }

    /// Each user's distance to its cluster's centroid in the PCA space, times `scale` (the
    /// factor from stored to decayed values, see `engine::decay`); NaN for users without a
    /// cluster. By user index.
    pub fn distances_to_centroids(&self, scale: f64) -> Vec<f32> {
        self.own_squared_distances()
            .map(|d| d.map_or(f32::NAN, |d| (d.sqrt() * scale) as f32))
            .collect()
    }

    pub(crate) fn add_user_slot(&mut self) {
        self.projections
            .extend(std::iter::repeat_n(0.0, self.components));
        self.labels.push(NO_CLUSTER);
    }

    /// The user's values changed by `deltas` (`(item, delta)`): re-projects the user and keeps
    /// its cluster's sum and mean in step, the mean once for the whole row (a normalised row
    /// changes all its cells at once). [`Model::reassign`] then moves the user.
    pub(crate) fn shift(&mut self, user: usize, deltas: &[(u32, f64)]) {
        let k = self.components;
        let label = self.labels[user];
        let mut moved = false;
        for &(j, delta) in deltas {
            let j = j as usize;
            if j >= self.basis.ncols() {
                continue;
            }
            let row = &self.loadings[j * k..(j + 1) * k];
            let z = &mut self.projections[user * k..(user + 1) * k];
            for (zi, &l) in z.iter_mut().zip(row) {
                *zi += delta * l;
            }
            if label != NO_CLUSTER {
                let s = &mut self.sums[label as usize * k..(label as usize + 1) * k];
                for (si, &l) in s.iter_mut().zip(row) {
                    *si += delta * l;
                }
                moved = true;
            }
        }
        if moved {
            self.update_mean(label as usize);
        }
    }

    /// Re-assigns a user whose row changed (it had ratings before: `was_active`; has now:
    /// `now_active`); centroids stay the exact means of their members. Label changes go to
    /// `changes`.
    pub(crate) fn reassign(
        &mut self,
        user: usize,
        was_active: bool,
        now_active: bool,
        changes: &mut impl ChangeSink,
    ) {
        let label = self.labels[user];
        if !self.initialised {
            return;
        }
        match (was_active, now_active) {
            (true, true) => {
                let best = self.nearest(user);
                if best != label && self.clearly_closer(user, best, label) {
                    self.move_user(user, Some(label), Some(best), changes);
                }
            }
            (false, true) => {
                let best = self.nearest(user);
                self.move_user(user, None, Some(best), changes);
            }
            (true, false) => {
                self.move_user(user, Some(label), None, changes);
                // Only a leaving user can empty a cluster: re-seed it at once, so the result
                // never depends on batch boundaries.
                if self.counts[label as usize] == 0 {
                    self.reseed_empty_clusters(changes);
                }
            }
            (false, false) => {}
        }
    }

    fn nearest(&self, user: usize) -> u32 {
        let k = self.components;
        let z = &self.projections[user * k..(user + 1) * k];
        let mut best = (0u32, f64::INFINITY);
        for c in 0..self.clusters {
            let d = squared_distance(z, &self.means[c * k..(c + 1) * k]);
            if d < best.1 {
                best = (c as u32, d);
            }
        }
        best.0
    }

    /// Whether `user` is closer to cluster `to` than `1 − STICKINESS` times its squared
    /// distance to `from`.
    fn clearly_closer(&self, user: usize, to: u32, from: u32) -> bool {
        let k = self.components;
        let z = &self.projections[user * k..(user + 1) * k];
        let at = |c: u32| squared_distance(z, &self.means[c as usize * k..(c as usize + 1) * k]);
        at(to) < (1.0 - STICKINESS) * at(from)
    }

    fn move_user(
        &mut self,
        user: usize,
        from: Option<u32>,
        to: Option<u32>,
        changes: &mut impl ChangeSink,
    ) {
        let k = self.components;
        if let Some(from) = from.filter(|&f| f != NO_CLUSTER) {
            let f = from as usize;
            for i in 0..k {
                self.sums[f * k + i] -= self.projections[user * k + i];
            }
            self.counts[f] -= 1;
            self.update_mean(f);
        }
        match to {
            Some(to) => {
                let t = to as usize;
                for i in 0..k {
                    self.sums[t * k + i] += self.projections[user * k + i];
                }
                self.counts[t] += 1;
                self.update_mean(t);
                self.labels[user] = to;
            }
            None => self.labels[user] = NO_CLUSTER,
        }
        changes.label_changed(user as u32);
    }

    fn update_mean(&mut self, c: usize) {
        let k = self.components;
        // An empty cluster keeps its last centroid until it is re-seeded.
        if self.counts[c] > 0 {
            let inv = 1.0 / self.counts[c] as f64;
            for i in 0..k {
                self.means[c * k + i] = self.sums[c * k + i] * inv;
            }
        }
    }

    /// Re-seeds every empty cluster with the worst-fit user of a cluster that has more than
    /// one member, so no cluster silently dies between refreshes.
    pub(crate) fn reseed_empty_clusters(&mut self, changes: &mut impl ChangeSink) {
        if !self.initialised || !self.counts.contains(&0) {
            return;
        }
        let k = self.components;
        let mut fits: Vec<(f64, usize)> = self
            .labels
            .iter()
            .enumerate()
            .filter(|(_, l)| **l != NO_CLUSTER)
            .map(|(u, &l)| {
                let c = &self.means[l as usize * k..(l as usize + 1) * k];
                (
                    squared_distance(&self.projections[u * k..(u + 1) * k], c),
                    u,
                )
            })
            .collect();
        fits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut worst = fits.into_iter();
        for c in 0..self.clusters {
            if self.counts[c] != 0 {
                continue;
            }
            for (_, u) in worst.by_ref() {
                let from = self.labels[u];
                if self.counts[from as usize] > 1 {
                    self.move_user(u, Some(from), Some(c as u32), changes);
                    break;
                }
            }
        }
    }

    /// Every user vector was multiplied by `factor` (a power of two, so exactly; see
    /// `engine::decay`): projections, cluster sums, centroids and the mean scale by it, the
    /// eigenvalues and the total variance by its square (applied as two factors). Directions,
    /// labels and every comparison between distances stay as they were.
    pub(crate) fn rescale(&mut self, factor: f64) {
        for values in [
            &mut self.projections,
            &mut self.sums,
            &mut self.means,
            &mut self.mean,
        ] {
            values.iter_mut().for_each(|v| *v *= factor);
        }
        self.eigenvalues
            .iter_mut()
            .for_each(|v| *v = *v * factor * factor);
        self.total_variance = self.total_variance * factor * factor;
    }

    /// Re-solves the PCA on the current statistics (warm-started from the current basis, signs
    /// kept), re-projects every user, then re-clusters: k-means++ the first time there are
    /// enough users, otherwise Lloyd passes from the current memberships (plus `restarts` fresh
    /// starts). Cluster ids are matched to the previous ones by member overlap.
    pub(crate) fn refresh(
        &mut self,
        data: &DataView<'_>,
        warm_start: bool,
        eigen: &EigenParams,
        clustering: &ClusteringParams,
        prior: Option<Continuation<'_>>,
    ) -> RefreshOutcome {
        let DataView {
            stats,
            vectors,
            canonical_order,
            items: d,
        } = *data;
        let started = std::time::Instant::now();
        let total_variance = stats.covariance_trace(d);
        let warm = if !warm_start {
            None
        } else if self.warm_block.nrows() >= self.basis.nrows() && self.warm_block.nrows() > 0 {
            Some(self.warm_block.view())
        } else {
            self.has_basis().then(|| self.basis.view())
        };
        let mut result = top_eigenpairs(&stats.operator(vectors, d), warm, eigen);
        self.warm_block = std::mem::replace(&mut result.block, Array2::zeros((0, 0)));
        self.adopt_basis(
            result.clone_basis_with_signs(&self.basis),
            &result,
            total_variance,
        );
        self.users_at_refresh = stats.users();
        let n = stats.users() as f64;
        self.mean = (0..d)
            .map(|j| {
                if n > 0.0 {
                    stats.sums().get(j).copied().unwrap_or(0.0) / n
                } else {
                    0.0
                }
            })
            .collect();
        let eigen_seconds = started.elapsed().as_secs_f64();
        self.reproject(vectors);
        let lloyd_passes = self.recluster(vectors, canonical_order, clustering, prior);
        tracing::debug!(
            eigen_seconds,
            eigen_iterations = result.iterations,
            residual = result.max_relative_residual,
            clustering_seconds = started.elapsed().as_secs_f64() - eigen_seconds,
            lloyd_passes,
            "model refresh timing"
        );
        RefreshOutcome {
            eigen_iterations: result.iterations,
            eigen_converged: result.converged,
            max_relative_residual: result.max_relative_residual,
            lloyd_passes,
            inertia: self.inertia(),
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    fn adopt_basis(&mut self, basis: Array2<f64>, result: &EigenResult, total_variance: f64) {
        self.loadings = loadings_of(&basis);
        self.basis = basis;
        self.eigenvalues = result.eigenvalues.clone();
        self.total_variance = total_variance;
        self.eigen_iterations = result.iterations;
        self.eigen_converged = result.converged;
    }

    /// Recomputes every projection from scratch with the current basis.
    pub(crate) fn reproject(&mut self, vectors: &CowVec<SparseVec>) {
        self.projections = project_with_loadings(vectors, &self.loadings, self.components);
        self.labels.resize(vectors.len(), NO_CLUSTER);
    }

    /// Rebuilds cluster sums and means from the labels (after a restart or a basis change).
    pub(crate) fn rebuild_sums(&mut self) {
        let k = self.components;
        self.sums.iter_mut().for_each(|s| *s = 0.0);
        self.counts.iter_mut().for_each(|c| *c = 0);
        for (u, &l) in self.labels.iter().enumerate() {
            if l != NO_CLUSTER && (l as usize) < self.clusters {
                let l = l as usize;
                self.counts[l] += 1;
                for i in 0..k {
                    self.sums[l * k + i] += self.projections[u * k + i];
                }
            }
        }
        for c in 0..self.clusters {
            self.update_mean(c);
        }
    }

    fn recluster(
        &mut self,
        vectors: &CowVec<SparseVec>,
        canonical_order: &[u32],
        params: &ClusteringParams,
        prior: Option<Continuation<'_>>,
    ) -> usize {
        let k = self.components;
        let active = rated_users(vectors, canonical_order);
        if active.len() < self.clusters {
            // Too few users to cluster: keep everyone unassigned until there are enough.
            self.unassign_all();
            return 0;
        }
        let data = self.gather_projections(&active);
        let points = DensePoints {
            data: &data,
            dim: k,
        };
        let online: Vec<u32> = active.iter().map(|&u| self.labels[u]).collect();
        let prior_labels: Option<Vec<u32>> = prior.as_ref().map(|p| {
            active
                .iter()
                .map(|&u| p.labels.get(u).copied().unwrap_or(NO_CLUSTER))
                .collect()
        });
        let current_labels = (self.initialised && params.keep_current).then_some(online);
        let continuing = prior.as_ref().and_then(|p| {
            p.margin
                .map(|margin| (margin, p.stickiness, p.stickiness_budget))
        });
        let mut optimum_labels: Option<Vec<u32>> = None;
        let (result, segmentation) = match (continuing, prior_labels.clone()) {
            (Some((margin, stickiness, stickiness_budget)), Some(labels)) => {
                // The previous snapshot's segments followed by Lloyd to a local optimum of
                // today's data. With stickiness, users near a boundary stay put, but only
                // while that costs at most `stickiness_budget` of the optimum's inertia. The
                // optimum is challenged by the online clustering and fresh starts (each run to
                // convergence): a clearly better one replaces the segments, openly.
                let t = std::time::Instant::now();
                let start: Vec<u32> = match prior.as_ref().and_then(|p| p.start) {
                    Some(start) => active
                        .iter()
                        .map(|&u| start.get(u).copied().unwrap_or(NO_CLUSTER))
                        .collect(),
                    None => labels.clone(),
                };
                let followed =
                    kmeans::lloyd_sticky(&points, self.clusters, start, params.max_passes, 0.0);
                optimum_labels = Some(followed.labels.clone());
                let followed_seconds = t.elapsed().as_secs_f64();
                let optimum = followed.inertia;
                // Users near a boundary go back to their previous segment, cheapest first,
                // while that costs at most the budget of the optimum's inertia: the most users
                // kept in place at that cost, in one pass.
                let continued = kmeans::hold_within_budget(
                    &points,
                    followed,
                    &labels,
                    stickiness,
                    stickiness_budget,
                );
                let held_seconds = t.elapsed().as_secs_f64();
                // The challengers: the online clustering (itself challenged by fresh starts
                // at every refresh) and a budget of fresh starts, run on the sample, the best
                // polished on everyone. A service runs them after each snapshot is served
                // (`prior.challenge`): here only a candidate that already won is followed to
                // convergence on today's data.
                let (fresh, smallest) = match prior.as_ref().and_then(|p| p.challenge) {
                    Some(challenge) => (
                        challenge
                            .better
                            .clone()
                            .map(|centroids| kmeans::lloyd(&points, centroids, params.max_passes)),
                        challenge.smallest,
                    ),
                    None => {
                        let fresh = (params.restarts > 0 || current_labels.is_some())
                            .then(|| best_challenger(&points, params, current_labels));
                        let smallest = fresh
                            .as_ref()
                            .and_then(|f| f.sizes.iter().min().copied())
                            .unwrap_or(0);
                        (fresh, smallest)
                    }
                };
                let fresh_seconds = t.elapsed().as_secs_f64();
                // Segments the data left behind (a handful of users around an old centroid,
                // under half the size of a fresh solve's smallest, or a single user) are
                // re-seeded where a cold solve would put them, at a bounded cost, and said so.
                // With a challenge, the challenger thread tried that already (off the critical
                // path) and hands over its result: only a re-seeding that helped is followed.
                let min_size = degenerate_floor(smallest, points.len(), self.clusters);
                let (continued, reseeded) = match prior.as_ref().and_then(|p| p.challenge) {
                    Some(challenge) => match &challenge.reseeded {
                        Some(centroids) => {
                            let candidate =
                                kmeans::lloyd(&points, centroids.clone(), params.max_passes);
                            if kmeans::reseeding_helps(
                                &continued,
                                &candidate,
                                min_size,
                                stickiness_budget,
                            ) {
                                (candidate, true)
                            } else {
                                (continued, false)
                            }
                        }
                        None => (continued, false),
                    },
                    None => kmeans::reseed_degenerate(
                        &points,
                        continued,
                        min_size,
                        params.max_passes,
                        stickiness_budget,
                        params.seed,
                    ),
                };
                let reference_inertia = optimum.min(continued.inertia);
                tracing::debug!(
                    followed_seconds,
                    held_seconds,
                    fresh_seconds,
                    reseed_seconds = t.elapsed().as_secs_f64(),
                    "continued clustering timing"
                );

                match fresh {
                    Some(c) if c.inertia < reference_inertia * (1.0 - margin) => {
                        // The better clustering, with the users it would move for next to
                        // nothing held where they were (within the same budget), so that a
                        // re-segmentation moves only the users it is for.
                        let to_fresh = match_labels(&c.labels, &labels, self.clusters);
                        let mut from_previous = vec![NO_CLUSTER; self.clusters];
                        for (fresh_id, &previous_id) in to_fresh.iter().enumerate() {
                            if let Some(slot) = from_previous.get_mut(previous_id as usize) {
                                *slot = fresh_id as u32;
                            }
                        }
                        let previous_in_fresh: Vec<u32> = labels
                            .iter()
                            .map(|&l| from_previous.get(l as usize).copied().unwrap_or(NO_CLUSTER))
                            .collect();
                        let held = kmeans::hold_within_budget(
                            &points,
                            c,
                            &previous_in_fresh,
                            stickiness,
                            (1.0 + stickiness_budget) / (1.0 - margin) - 1.0,
                        );
                        (held, Segmentation::Resegmented)
                    }
                    _ if reseeded => (continued, Segmentation::Resegmented),
                    _ => (continued, Segmentation::Continued),
                }
            }
            _ => {
                let current = current_labels.map(|labels| {
                    kmeans::lloyd_sticky(
                        &points,
                        self.clusters,
                        labels,
                        params.max_passes,
                        STICKINESS,
                    )
                });
                let fresh = (params.restarts > 0 || current.is_none()).then(|| {
                    fresh_clustering(&points, params, None, clustering_sample_users(params.k))
                });

                let Some(result) = choose_clustering(current, fresh) else {
                    return 0;
                };
                (result, Segmentation::Fresh)
            }
        };
        let reference =
            prior_labels.unwrap_or_else(|| active.iter().map(|&u| self.labels[u]).collect());
        let mapping = self.adopt_labels(&active, &result.labels, &reference);
        self.segmentation = segmentation;
        self.lloyd_optimum.clear();
        if let (Segmentation::Continued, Some(optimum)) = (segmentation, optimum_labels) {
            self.lloyd_optimum = vec![NO_CLUSTER; self.labels.len()];
            for (&u, &l) in active.iter().zip(&optimum) {
                self.lloyd_optimum[u] = mapping.get(l as usize).copied().unwrap_or(NO_CLUSTER);
            }
        }
        result.passes
    }

    /// Challenges this (served) clustering: the online clustering `online` (labels by user
    /// index) and `params.restarts` fresh starts on a sample, the best polished on everyone;
    /// a candidate whose inertia beats this one's by more than `margin` is kept.
    pub(crate) fn challenge(
        &self,
        version: u64,
        canonical_order: &[u32],
        online: &[u32],
        between_steps: &dyn Fn(),
        params: &ClusteringParams,
        bounds: ChallengeBounds,
    ) -> Option<Challenge> {
        let ChallengeBounds {
            margin,
            stickiness_budget,
        } = bounds;
        let active: Vec<usize> = canonical_order
            .iter()
            .map(|&u| u as usize)
            .filter(|&u| self.labels.get(u).is_some_and(|&l| l != NO_CLUSTER))
            .collect();
        if !self.initialised || active.len() < self.clusters {
            return None;
        }
        let data = self.gather_projections(&active);
        let points = DensePoints {
            data: &data,
            dim: self.components,
        };
        let online_labels: Vec<u32> = active
            .iter()
            .map(|&u| online.get(u).copied().unwrap_or(NO_CLUSTER))
            .collect();
        let fresh = best_challenger(&points, params, Some(online_labels));
        between_steps();
        let smallest = fresh.sizes.iter().min().copied().unwrap_or(0);
        // The served segments the data left behind, re-seeded here rather than while the next
        // snapshot is built: each try is a Lloyd run over everyone.
        let served_labels: Vec<u32> = active.iter().map(|&u| self.labels[u]).collect();
        let min_size = degenerate_floor(smallest, points.len(), self.clusters);
        let reseeded = kmeans::keep(&points, self.clusters, served_labels)
            .filter(|served| served.sizes.iter().any(|&s| s < min_size))
            .and_then(|served| {
                let (reseeded, changed) = kmeans::reseed_degenerate(
                    &points,
                    served,
                    min_size,
                    params.max_passes,
                    stickiness_budget,
                    params.seed,
                );
                changed.then_some(reseeded.centroids)
            });
        let served = self.inertia();
        let ratio = if served > 0.0 {
            fresh.inertia / served
        } else {
            1.0
        };
        Some(Challenge {
            version,
            smallest,
            reseeded,
            better: (fresh.inertia < served * (1.0 - margin)).then_some(fresh.centroids),
            ratio,
        })
    }

    /// Replaces the eigenvalues with `params.values` of them (the diagnostics curve) solved on
    /// `data`, warm from this basis; the basis, projections and clustering stay as they are.
    pub(crate) fn solve_curve(
        &mut self,
        stats: &CovarianceStats,
        vectors: &CowVec<SparseVec>,
        d: usize,
        params: &EigenParams,
    ) {
        let warm = self.has_basis().then(|| self.basis.view());
        let result = top_eigenpairs(&stats.operator(vectors, d), warm, params);
        self.eigenvalues = result.eigenvalues;
    }

    /// What the next solve can start from: this model's basis and last Ritz block (O(items ·
    /// block), not the users' projections).
    pub fn warm_start(&self) -> WarmStart {
        WarmStart {
            components: self.components,
            basis: self.basis.clone(),
            block: self.warm_block.clone(),
        }
    }

    /// Starts the next solve from `warm` (a previous snapshot's, converged on nearly the same
    /// data: fewer iterations than from the online basis, and signs kept from that snapshot).
    pub fn warm_start_from(&mut self, warm: &WarmStart) {
        if warm.basis.nrows() > 0 && warm.components == self.components {
            self.basis = warm.basis.clone();
            self.warm_block = warm.block.clone();
        }
    }

    /// Drops the clustering (every user unassigned), keeping the basis: what is clustered next
    /// is solved from the data alone.
    pub(crate) fn forget_clustering(&mut self) {
        self.unassign_all();
    }

    /// Leaves every user unassigned and the model uninitialised.
    fn unassign_all(&mut self) {
        self.labels.iter_mut().for_each(|l| *l = NO_CLUSTER);
        self.initialised = false;
        self.rebuild_sums();
    }

    /// The projections of `users`, row-major in that order.
    fn gather_projections(&self, users: &[usize]) -> Vec<f64> {
        let k = self.components;
        let mut data = Vec::with_capacity(users.len() * k);
        for &u in users {
            data.extend_from_slice(&self.projections[u * k..(u + 1) * k]);
        }
        data
    }

    /// Makes `labels` (one per `active` user) the clustering, its cluster ids renumbered to
    /// overlap most with `reference` (the clustering it replaces) once the model is initialised.
    /// Returns the renaming it applied (`mapping[label] = id`).
    fn adopt_labels(&mut self, active: &[usize], labels: &[u32], reference: &[u32]) -> Vec<u32> {
        let mapping = if reference.iter().any(|&l| (l as usize) < self.clusters) {
            match_labels(labels, reference, self.clusters)
        } else {
            (0..self.clusters as u32).collect()
        };
        self.labels.iter_mut().for_each(|l| *l = NO_CLUSTER);
        for (&u, &l) in active.iter().zip(labels) {
            self.labels[u] = mapping[l as usize];
        }
        self.initialised = true;
        self.rebuild_sums();
        mapping
    }

    /// Restores a persisted model: basis and labels; projections and sums are recomputed.
    pub(crate) fn restore(
        &mut self,
        persisted: PersistedModel,
        vectors: &CowVec<SparseVec>,
        d: usize,
    ) {
        let k = self.components;
        let cols = persisted.basis_items;
        let basis = if persisted.basis.len() == k * cols && cols > 0 {
            Array2::from_shape_vec((k, cols), persisted.basis)
                .unwrap_or_else(|_| Array2::zeros((0, 0)))
        } else {
            Array2::zeros((0, 0))
        };
        let result = EigenResult {
            eigenvalues: persisted.eigenvalues,
            eigenvectors: Array2::zeros((0, 0)),
            iterations: persisted.eigen_iterations,
            converged: persisted.eigen_converged,
            max_relative_residual: 0.0,
            block: Array2::zeros((0, 0)),
        };
        self.adopt_basis(basis, &result, persisted.total_variance);
        let rows = persisted.warm_rows;
        if rows > 0 && cols > 0 && persisted.warm_block.len() == rows * cols {
            self.warm_block = Array2::from_shape_vec((rows, cols), persisted.warm_block)
                .unwrap_or_else(|_| Array2::zeros((0, 0)));
        }
        self.mean = persisted.mean;
        self.mean.resize(d.max(self.mean.len()), 0.0);
        self.users_at_refresh = persisted.users_at_refresh;
        self.labels = persisted.labels;
        self.reproject(vectors);
        self.initialised = persisted.initialised;
        self.rebuild_sums();
    }

    /// The parts of the model that cannot be derived from the user vectors.
    pub fn persisted(&self) -> PersistedModel {
        PersistedModel {
            basis_items: self.basis.ncols(),
            basis: self.basis.iter().copied().collect(),
            eigenvalues: self.eigenvalues.clone(),
            total_variance: self.total_variance,
            mean: self.mean.clone(),
            users_at_refresh: self.users_at_refresh,
            eigen_iterations: self.eigen_iterations,
            eigen_converged: self.eigen_converged,
            initialised: self.initialised,
            warm_rows: self.warm_block.nrows(),
            warm_block: self.warm_block.iter().copied().collect(),
            labels: vec![],
        }
    }
}

/// The engine's data as a refresh sees it.
#[derive(Clone, Copy)]
pub(crate) struct DataView<'a> {
    pub stats: &'a CovarianceStats,
    pub vectors: &'a CowVec<SparseVec>,
    /// User indices in an order that does not depend on arrival (sorted by user id):
    /// clustering visits users in it, so the seeds a start picks, and hence the result, are
    /// the same whatever order the events came in.
    pub canonical_order: &'a [u32],
    pub items: usize,
}

/// The model state that is persisted (labels are stored with the user records).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PersistedModel {
    pub basis_items: usize,
    /// Stored as raw floats beside the JSON (see the store).
    #[serde(skip)]
    pub basis: Vec<f64>,
    #[serde(deserialize_with = "crate::nullable::floats")]
    pub eigenvalues: Vec<f64>,
    #[serde(deserialize_with = "crate::nullable::float")]
    pub total_variance: f64,
    #[serde(deserialize_with = "crate::nullable::floats")]
    pub mean: Vec<f64>,
    pub users_at_refresh: u64,
    pub eigen_iterations: usize,
    pub eigen_converged: bool,
    pub initialised: bool,
    /// Rows of the eigensolver's last Ritz block (`warm_rows x basis_items`, stored beside
    /// the basis): a restarted engine warm-starts exactly as an uninterrupted one would, so a
    /// restart never changes the result.
    #[serde(default)]
    pub warm_rows: usize,
    #[serde(skip)]
    pub warm_block: Vec<f64>,
    #[serde(skip)]
    pub labels: Vec<u32>,
}

impl EigenResult {
    /// The converged vectors with each sign chosen to agree with the same component of the
    /// previous basis (so components do not flip between snapshots), or, for a first basis,
    /// scikit-learn's convention: the largest-magnitude loading is positive.
    fn clone_basis_with_signs(&self, previous: &Array2<f64>) -> Array2<f64> {
        let mut basis = self.eigenvectors.clone();
        for (c, mut row) in basis.axis_iter_mut(Axis(0)).enumerate() {
            let flip = if c < previous.nrows() {
                let overlap = previous.ncols().min(row.len());
                let dot: f64 = (0..overlap).map(|j| previous[[c, j]] * row[j]).sum();
                dot < 0.0
            } else {
                let largest = row
                    .iter()
                    .copied()
                    .max_by(|a, b| a.abs().total_cmp(&b.abs()))
                    .unwrap_or(0.0);
                largest < 0.0
            };
            if flip {
                row.mapv_inplace(|v| -v);
            }
        }
        basis
    }
}

/// Users with at least one rating, in canonical order.
fn rated_users(vectors: &CowVec<SparseVec>, canonical_order: &[u32]) -> Vec<usize> {
    canonical_order
        .iter()
        .map(|&u| u as usize)
        .filter(|&u| !vectors[u].idx.is_empty())
        .collect()
}

/// Best of fresh k-means++ starts (and Lloyd from `initial` centroids, when given), polished on
/// every point. The starts converge on an evenly spread sample of about `sample_users` users
/// (canonical order, so the same users whatever the arrival order).
/// The best challenger of a continued clustering: the online clustering (`online`, labels of
/// the points, when there is one) and `params.restarts` fresh starts on a sample, the best
/// polished on everyone.
fn best_challenger(
    points: &DensePoints<'_>,
    params: &ClusteringParams,
    online: Option<Vec<u32>>,
) -> kmeans::Clustering {
    let online = online
        .and_then(|labels| kmeans::keep(points, params.k, labels))
        .map(|kept| kept.centroids);
    fresh_clustering(points, params, online, CHALLENGER_SAMPLE_USERS)
}

fn fresh_clustering(
    points: &DensePoints<'_>,
    params: &ClusteringParams,
    initial: Option<Vec<f64>>,
    sample_users: usize,
) -> kmeans::Clustering {
    let k = points.dim;
    let stride = points.len().div_ceil(sample_users.max(1)).max(1);
    let mut sample = Vec::with_capacity(points.len() / stride * k + k);
    for point in points.data.chunks_exact(k).step_by(stride) {
        sample.extend_from_slice(point);
    }
    let sampled = kmeans::cluster(
        &DensePoints {
            data: &sample,
            dim: k,
        },
        initial,
        &ClusteringParams {
            restarts: params.restarts.max(1),
            ..*params
        },
    );
    kmeans::lloyd(points, sampled.centroids, params.max_passes)
}

/// The previous snapshot's segments (`labels` by user index). A snapshot that continues them
/// (`margin` set) follows them with Lloyd to convergence on today's data, and replaces them
/// only with a clustering whose inertia is lower than that optimum's by more than `margin`,
/// reported as [`Segmentation::Resegmented`]. With `stickiness` > 0 a user moves only to a
/// centroid closer than `1 − stickiness` times its squared distance to its own, as long as the
/// inertia stays within `stickiness_budget` of the optimum (else the optimum is taken): the
/// published clustering is then at most `(1 + stickiness_budget) / (1 − margin)` times the best
/// candidate's inertia. Without `margin` the clustering is solved cold and only its ids are
/// matched to these segments.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Continuation<'a> {
    pub labels: &'a [u32],
    pub margin: Option<f64>,
    pub stickiness: f64,
    /// The sticky continuation is kept only while its inertia is within this share of the
    /// plain Lloyd optimum from the same segments.
    pub stickiness_budget: f64,
    /// Where Lloyd starts (labels by user index, in the ids of `labels`): the Lloyd optimum of
    /// the build that produced `labels`, before users were held; `labels` themselves when
    /// `None`.
    pub start: Option<&'a [u32]>,
    /// What the challenge of a previous snapshot found: with it, no fresh start runs while
    /// the snapshot is built; without it (the first snapshot a process continues), they run
    /// inline.
    pub challenge: Option<&'a Challenge>,
}

/// What challenging a served snapshot found: the online clustering and a budget of fresh
/// k-means++ starts (on a sample, the best polished on everyone), run *after* the snapshot is
/// served, so they never delay one. The next snapshot that continues the segments compares
/// itself with the kept candidate instead of running starts of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Challenge {
    /// The snapshot version challenged.
    pub version: u64,
    /// The smallest segment of the best candidate: segments under half of it (or of one user)
    /// are degenerate and re-seeded.
    pub smallest: u64,
    /// The best candidate's centroids (`clusters x components`, in the challenged snapshot's
    /// projection space) when its inertia beat the served snapshot's by more than the
    /// stability margin; `None` when the served segments held.
    pub better: Option<Vec<f64>>,
    /// The candidate's inertia over the served snapshot's.
    pub ratio: f64,
    /// The served segments with their degenerate ones re-seeded (centroids, as `better`),
    /// when that left fewer degenerate segments within the stickiness budget.
    pub reseeded: Option<Vec<f64>>,
}

/// What a challenger must beat the served inertia by (`margin`, a share) to be kept, and what a
/// re-seeding of the served segments may add to it (`stickiness_budget`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChallengeBounds {
    pub margin: f64,
    pub stickiness_budget: f64,
}

/// Segments under this many users are degenerate: under half of a fresh solve's smallest
/// (`smallest`), or under an eighth of the mean segment (what a single draw of starts can
/// miss), or of one user, which is never a segment a business can use.
fn degenerate_floor(smallest: u64, users: usize, clusters: usize) -> u64 {
    smallest
        .div_ceil(2)
        .max((users as u64).div_ceil(8 * clusters.max(1) as u64))
        .max(2)
}

/// The basis (`components x items`) item-major (`items x components`): each rating then reads
/// one contiguous row of loadings.
fn loadings_of(basis: &Array2<f64>) -> Vec<f64> {
    let (k, d) = basis.dim();
    let mut loadings = vec![0.0; d * k];
    for (c, row) in basis.axis_iter(Axis(0)).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            loadings[j * k + c] = v;
        }
    }
    loadings
}

/// Every row of `vectors` projected on `basis` (`components x items`), row-major.
pub(crate) fn project_rows(vectors: &CowVec<SparseVec>, basis: &Array2<f64>) -> Vec<f64> {
    project_with_loadings(vectors, &loadings_of(basis), basis.nrows())
}

/// Every row projected through item-major `loadings` of `k` components: O(ratings x k), one
/// contiguous range of users per core from [`PARALLEL_REPROJECT_USERS`] users up.
fn project_with_loadings(vectors: &CowVec<SparseVec>, loadings: &[f64], k: usize) -> Vec<f64> {
    let d = loadings.len() / k.max(1);
    let mut projections = vec![0.0; vectors.len() * k];
    if k == 0 {
        return projections;
    }
    let project = |first_user: usize, out: &mut [f64]| {
        for (offset, z) in out.chunks_exact_mut(k).enumerate() {
            let x = &vectors[first_user + offset];
            for (&j, &v) in x.idx.iter().zip(&x.val) {
                let j = j as usize;
                if j < d {
                    for (zi, &l) in z.iter_mut().zip(&loadings[j * k..(j + 1) * k]) {
                        *zi += v * l;
                    }
                }
            }
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = vectors.len().div_ceil(threads.max(1)).max(1);
    if threads > 1 && vectors.len() >= PARALLEL_REPROJECT_USERS {
        std::thread::scope(|scope| {
            for (t, out) in projections.chunks_mut(per_thread * k).enumerate() {
                let project = &project;
                scope.spawn(move || project(t * per_thread, out));
            }
        });
    } else {
        project(0, &mut projections);
    }
    projections
}

/// Picks between the online clustering (polished) and fresh starts at a refresh or a cold
/// solve: the current one stays unless a fresh one is better by more than
/// [`STABILITY_MARGIN`], so equally good local optima do not make segments hop.
fn choose_clustering(
    current: Option<kmeans::Clustering>,
    fresh: Option<kmeans::Clustering>,
) -> Option<kmeans::Clustering> {
    match (current, fresh) {
        (Some(current), Some(fresh))
            if fresh.inertia < current.inertia * (1.0 - STABILITY_MARGIN) =>
        {
            Some(fresh)
        }
        (Some(current), _) => Some(current),
        (None, fresh) => fresh,
    }
}

pub fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}
