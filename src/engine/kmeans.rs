//! K-Means pieces shared by the online model, the snapshot polish and the diagnostics: greedy
//! k-means++ seeding, Lloyd passes with empty clusters re-seeded from the worst-fit points,
//! and best-of-n restarts. Works on any [`Points`]: dense projections or sparse user rows.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::model::squared_distance;

/// A set of points K-Means can cluster. Centroids are always dense `dim()`-vectors.
pub trait Points {
    fn len(&self) -> usize;
    fn dim(&self) -> usize;
    /// Squared distance from point `i` to `centroid`, given `centroid_norm2 = ‖centroid‖²`.
    fn distance2(&self, i: usize, centroid: &[f64], centroid_norm2: f64) -> f64;
    /// `acc += point i`.
    fn add_to(&self, i: usize, acc: &mut [f64]);
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Dense points stored row-major, `len x dim`.
pub struct DensePoints<'a> {
    pub data: &'a [f64],
    pub dim: usize,
}

impl Points for DensePoints<'_> {
    fn len(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn distance2(&self, i: usize, centroid: &[f64], _centroid_norm2: f64) -> f64 {
        let p = &self.data[i * self.dim..(i + 1) * self.dim];
        p.iter().zip(centroid).map(|(a, b)| (a - b) * (a - b)).sum()
    }
    fn add_to(&self, i: usize, acc: &mut [f64]) {
        let p = &self.data[i * self.dim..(i + 1) * self.dim];
        for (a, x) in acc.iter_mut().zip(p) {
            *a += x;
        }
    }
}

/// Settings of a clustering run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClusteringParams {
    pub k: usize,
    /// Lloyd passes at most per start; stops earlier when no assignment changes.
    pub max_passes: usize,
    /// Fresh k-means++ starts tried besides the given assignment (if any); best inertia wins.
    pub restarts: usize,
    /// Whether the current clustering competes with the fresh starts (kept unless a fresh
    /// start is clearly better) or is ignored.
    pub keep_current: bool,
    pub seed: u64,
}

/// A clustering: labels per point, centroids (`k x dim`), sizes and inertia.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    pub labels: Vec<u32>,
    pub centroids: Vec<f64>,
    pub sizes: Vec<u64>,
    pub inertia: f64,
    pub passes: usize,
}

impl Clustering {
    pub fn k(&self) -> usize {
        self.sizes.len()
    }
}

/// Greedy k-means++ (as scikit-learn: `2 + ln k` candidates per step, keep the one that lowers
/// the potential most). Returns `k x dim` centroids.
pub fn kmeans_plus_plus<P: Points>(points: &P, k: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let n = points.len();
    let dim = points.dim();
    let mut centroids = vec![0.0; k * dim];
    if n == 0 || k == 0 {
        return centroids;
    }
    let trials = 2 + (k as f64).ln() as usize;
    let point_vec = |i: usize| {
        let mut v = vec![0.0; dim];
        points.add_to(i, &mut v);
        v
    };
    let first = rng.random_range(0..n);
    centroids[..dim].copy_from_slice(&point_vec(first));
    let norm2 = |c: &[f64]| c.iter().map(|x| x * x).sum::<f64>();
    let mut closest: Vec<f64> = (0..n)
        .map(|i| points.distance2(i, &centroids[..dim], norm2(&centroids[..dim])))
        .collect();
    for c in 1..k {
        let potential: f64 = closest.iter().sum();
        let mut best: Option<(f64, Vec<f64>, Vec<f64>)> = None;
        for _ in 0..trials {
            let candidate = if potential > 0.0 {
                let mut target = rng.random::<f64>() * potential;
                let mut pick = n - 1;
                for (i, d) in closest.iter().enumerate() {
                    if target < *d {
                        pick = i;
                        break;
                    }
                    target -= d;
                }
                pick
            } else {
                rng.random_range(0..n)
            };
            let cv = point_vec(candidate);
            let cn = norm2(&cv);
            let updated: Vec<f64> = (0..n)
                .map(|i| closest[i].min(points.distance2(i, &cv, cn)))
                .collect();
            let pot: f64 = updated.iter().sum();
            if best.as_ref().is_none_or(|(p, _, _)| pot < *p) {
                best = Some((pot, cv, updated));
            }
        }
        if let Some((_, cv, updated)) = best {
            centroids[c * dim..(c + 1) * dim].copy_from_slice(&cv);
            closest = updated;
        }
    }
    centroids
}

fn nearest<P: Points>(points: &P, i: usize, centroids: &[f64], norms: &[f64]) -> (u32, f64) {
    let dim = points.dim();
    let mut best = (0u32, f64::INFINITY);
    for (c, norm) in norms.iter().enumerate() {
        let d = points.distance2(i, &centroids[c * dim..(c + 1) * dim], *norm);
        if d < best.1 {
            best = (c as u32, d);
        }
    }
    best
}

fn centroid_norms(centroids: &[f64], dim: usize) -> Vec<f64> {
    centroids
        .chunks(dim.max(1))
        .map(|c| c.iter().map(|x| x * x).sum())
        .collect()
}

/// Recomputes centroids as member means; an empty cluster takes the point farthest from its
/// own centroid (out of a cluster with more than one member), so no cluster silently dies.
fn update_centroids<P: Points>(points: &P, labels: &mut [u32], k: usize, centroids: &mut [f64]) {
    let dim = points.dim();
    let mut sums = vec![0.0; k * dim];
    let mut sizes = vec![0u64; k];
    for (i, &l) in labels.iter().enumerate() {
        let l = l as usize;
        points.add_to(i, &mut sums[l * dim..(l + 1) * dim]);
        sizes[l] += 1;
    }
    for c in 0..k {
        if sizes[c] > 0 {
            for x in 0..dim {
                centroids[c * dim + x] = sums[c * dim + x] / sizes[c] as f64;
            }
        }
    }
    let empties: Vec<usize> = (0..k).filter(|&c| sizes[c] == 0).collect();
    if empties.is_empty() {
        return;
    }
    let norms = centroid_norms(centroids, dim);
    let mut fits: Vec<(f64, usize)> = labels
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let l = l as usize;
            (
                points.distance2(i, &centroids[l * dim..(l + 1) * dim], norms[l]),
                i,
            )
        })
        .collect();
    fits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut worst = fits.into_iter();
    for c in empties {
        for (_, i) in worst.by_ref() {
            let from = labels[i] as usize;
            if sizes[from] > 1 {
                sizes[from] -= 1;
                sizes[c] = 1;
                labels[i] = c as u32;
                let mut v = vec![0.0; dim];
                points.add_to(i, &mut v);
                centroids[c * dim..(c + 1) * dim].copy_from_slice(&v);
                break;
            }
        }
    }
}

/// Lloyd iterations from the given centroids until no label changes or `max_passes`, with
/// Hamerly's bounds: per point an upper bound on the distance to its own centroid and a lower
/// bound on the distance to any other, moved by how far centroids move, so a point whose bounds
/// prove it stays is skipped without computing a distance (most points after the first passes).
/// The assignments are Lloyd's own; only the work differs.
pub fn lloyd<P: Points>(points: &P, mut centroids: Vec<f64>, max_passes: usize) -> Clustering {
    let n = points.len();
    let dim = points.dim();
    let k = centroids.len() / dim.max(1);
    let mut labels = vec![u32::MAX; n];
    let mut bounds = HamerlyBounds::new(n, k);
    // Member sums and counts kept in step with the moves: a pass that moves few points (the
    // long tail of a run from nearly converged segments) costs O(points) for the bounds, not
    // O(points x dim) for the means.
    let mut sums = vec![0.0; k * dim];
    let mut sizes = vec![0u64; k];
    let mut moves = Vec::new();
    let mut point = vec![0.0; dim];
    let mut passes = 0;
    while passes < max_passes.max(1) {
        passes += 1;
        moves.clear();
        bounds.assign(points, &centroids, &mut labels, &mut moves);
        if moves.is_empty() {
            break;
        }
        for &(i, from) in &moves {
            point.iter_mut().for_each(|x| *x = 0.0);
            points.add_to(i, &mut point);
            if (from as usize) < k {
                let f = from as usize;
                sizes[f] -= 1;
                for (sum, x) in sums[f * dim..(f + 1) * dim].iter_mut().zip(&point) {
                    *sum -= x;
                }
            }
            let to = labels[i] as usize;
            sizes[to] += 1;
            for (sum, x) in sums[to * dim..(to + 1) * dim].iter_mut().zip(&point) {
                *sum += x;
            }
        }
        let before = centroids.clone();
        if sizes.contains(&0) {
            // An empty cluster is re-seeded from the worst-fit points: the full update, then
            // the sums again from the labels it leaves.
            let labels_before = labels.clone();
            update_centroids(points, &mut labels, k, &mut centroids);
            let moved = centroid_shifts(&before, &centroids, dim, k);
            bounds.loosen(&labels, Some(&labels_before), &moved);
            sums.iter_mut().for_each(|x| *x = 0.0);
            sizes.iter_mut().for_each(|x| *x = 0);
            for (i, &l) in labels.iter().enumerate() {
                let l = l as usize;
                points.add_to(i, &mut sums[l * dim..(l + 1) * dim]);
                sizes[l] += 1;
            }
        } else {
            for c in 0..k {
                let size = sizes[c] as f64;
                for x in 0..dim {
                    centroids[c * dim + x] = sums[c * dim + x] / size;
                }
            }
            let moved = centroid_shifts(&before, &centroids, dim, k);
            bounds.loosen(&labels, None, &moved);
        }
        bounds.update_half_gaps(&centroids, dim);
    }
    if passes > 1 {
        // The exact member means (the running sums carry the rounding of every move).
        update_centroids(points, &mut labels, k, &mut centroids);
    }
    finish(points, labels, centroids, passes)
}

/// One instance's share of a Lloyd pass over points it holds: each point assigned to the
/// nearest of the broadcast centroids, with the per-cluster sums, counts and squared error of
/// that assignment. Shares over disjoint points add up ([`LloydPartial::merge`]); the merged
/// one gives the next centroids, so a coordinator runs Lloyd over every instance's users
/// without gathering them.
#[derive(Debug, Clone, PartialEq)]
pub struct LloydPartial {
    /// `k x dim`, row-major.
    pub sums: Vec<f64>,
    pub counts: Vec<u64>,
    pub inertia: f64,
    /// Points whose nearest centroid is not the one `previous` gave them.
    pub moved: u64,
}

impl LloydPartial {
    /// Assigns `points` to the nearest of `centroids` (`k x dim`); `labels` holds each point's
    /// previous label (any value `>= k` = none) and receives the new one.
    pub fn assign<P: Points>(points: &P, centroids: &[f64], labels: &mut [u32]) -> LloydPartial {
        let dim = points.dim();
        let k = centroids.len() / dim.max(1);
        let norms = centroid_norms(centroids, dim);
        let mut partial = LloydPartial {
            sums: vec![0.0; k * dim],
            counts: vec![0; k],
            inertia: 0.0,
            moved: 0,
        };
        for (i, label) in labels.iter_mut().enumerate().take(points.len()) {
            let (best, best_d) = nearest(points, i, centroids, &norms);
            if *label != best {
                partial.moved += 1;
                *label = best;
            }
            let c = best as usize;
            points.add_to(i, &mut partial.sums[c * dim..(c + 1) * dim]);
            partial.counts[c] += 1;
            partial.inertia += best_d;
        }
        partial
    }

    /// Adds the share of other points.
    pub fn merge(&mut self, other: &LloydPartial) {
        for (s, o) in self.sums.iter_mut().zip(&other.sums) {
            *s += o;
        }
        for (c, o) in self.counts.iter_mut().zip(&other.counts) {
            *c += o;
        }
        self.inertia += other.inertia;
        self.moved += other.moved;
    }

    /// The member means (a cluster left empty keeps its centroid from `previous`).
    pub fn centroids(&self, previous: &[f64]) -> Vec<f64> {
        let k = self.counts.len();
        let dim = self.sums.len() / k.max(1);
        let mut centroids = previous.to_vec();
        for c in 0..k {
            if self.counts[c] > 0 {
                for x in 0..dim {
                    centroids[c * dim + x] = self.sums[c * dim + x] / self.counts[c] as f64;
                }
            }
        }
        centroids
    }
}

/// Hamerly's per-point distance bounds (see [`lloyd`]), valid for the current centroids.
struct HamerlyBounds {
    /// Per point, an upper bound on the distance to its own centroid.
    upper: Vec<f64>,
    /// Per point, a lower bound on the distance to any other centroid.
    lower: Vec<f64>,
    /// Half the distance from each centroid to its nearest other one: a point closer than that
    /// to its own centroid cannot be closer to another.
    half_gap: Vec<f64>,
}

impl HamerlyBounds {
    fn new(n: usize, k: usize) -> Self {
        HamerlyBounds {
            upper: vec![f64::INFINITY; n],
            lower: vec![0.0f64; n],
            half_gap: vec![0.0f64; k],
        }
    }

    /// One assignment pass: each point whose bounds do not prove it stays goes to its nearest
    /// centroid, and its bounds are made exact. Each point that changed label is pushed to
    /// `moves` with its previous label.
    fn assign<P: Points>(
        &mut self,
        points: &P,
        centroids: &[f64],
        labels: &mut [u32],
        moves: &mut Vec<(usize, u32)>,
    ) {
        let dim = points.dim();
        let k = self.half_gap.len();
        let norms = centroid_norms(centroids, dim);
        for (i, label) in labels.iter_mut().enumerate() {
            let own = *label as usize;
            if own < k {
                let bound = self.half_gap[own].max(self.lower[i]);
                if self.upper[i] <= bound {
                    continue;
                }
                self.upper[i] = points
                    .distance2(i, &centroids[own * dim..(own + 1) * dim], norms[own])
                    .sqrt();
                if self.upper[i] <= bound {
                    continue;
                }
            }
            let (best, best_d, second_d) = nearest_two(points, i, centroids, &norms);
            if *label != best {
                moves.push((i, *label));
                *label = best;
            }
            self.upper[i] = best_d.sqrt();
            self.lower[i] = second_d.sqrt();
        }
    }

    /// Keeps the bounds valid after the centroids moved by `moved` (per cluster);
    /// `labels_before` when the update may have re-seeded points into empty clusters.
    fn loosen(&mut self, labels: &[u32], labels_before: Option<&[u32]>, moved: &[f64]) {
        let max_moved = moved.iter().copied().fold(0.0f64, f64::max);
        for i in 0..labels.len() {
            if labels_before.is_some_and(|before| labels[i] != before[i]) {
                // Re-seeded into an empty cluster: no bound holds any more.
                self.upper[i] = f64::INFINITY;
                self.lower[i] = 0.0;
            } else {
                self.upper[i] += moved[labels[i] as usize];
                self.lower[i] = (self.lower[i] - max_moved).max(0.0);
            }
        }
    }

    fn update_half_gaps(&mut self, centroids: &[f64], dim: usize) {
        let k = self.half_gap.len();
        for c in 0..k {
            self.half_gap[c] = 0.5
                * (0..k)
                    .filter(|&o| o != c)
                    .map(|o| {
                        squared_distance(
                            &centroids[c * dim..(c + 1) * dim],
                            &centroids[o * dim..(o + 1) * dim],
                        )
                        .sqrt()
                    })
                    .fold(f64::INFINITY, f64::min);
            if !self.half_gap[c].is_finite() {
                self.half_gap[c] = 0.0;
            }
        }
    }
}

/// The nearest centroid to point `i` with its squared distance, and the squared distance to
/// the second nearest.
fn nearest_two<P: Points>(
    points: &P,
    i: usize,
    centroids: &[f64],
    norms: &[f64],
) -> (u32, f64, f64) {
    let dim = points.dim();
    let (mut best, mut best_d, mut second_d) = (0u32, f64::INFINITY, f64::INFINITY);
    for (c, norm) in norms.iter().enumerate() {
        let d = points.distance2(i, &centroids[c * dim..(c + 1) * dim], *norm);
        if d < best_d {
            second_d = best_d;
            best = c as u32;
            best_d = d;
        } else if d < second_d {
            second_d = d;
        }
    }
    (best, best_d, second_d)
}

/// How far each of the `k` centroids moved from `before` to `after`.
fn centroid_shifts(before: &[f64], after: &[f64], dim: usize, k: usize) -> Vec<f64> {
    (0..k)
        .map(|c| {
            squared_distance(
                &before[c * dim..(c + 1) * dim],
                &after[c * dim..(c + 1) * dim],
            )
            .sqrt()
        })
        .collect()
}

/// The member means of an assignment (`labels`, any value `>= k` = unassigned), after the
/// unassigned points join the nearest of them; clusters left empty are re-seeded from the
/// worst-fit points. `None` when no point is assigned.
fn centroids_of_labels<P: Points>(points: &P, k: usize, labels: &mut [u32]) -> Option<Vec<f64>> {
    let dim = points.dim();
    // Start from the member means of the assigned points; unassigned ones join the nearest of
    // those (clusters left empty are re-seeded from the worst-fit points, as in every pass).
    let mut centroids = vec![0.0; k * dim];
    let mut sizes = vec![0u64; k];
    for (i, &l) in labels.iter().enumerate() {
        if (l as usize) < k {
            points.add_to(i, &mut centroids[l as usize * dim..(l as usize + 1) * dim]);
            sizes[l as usize] += 1;
        }
    }
    for c in 0..k {
        if sizes[c] > 0 {
            centroids[c * dim..(c + 1) * dim]
                .iter_mut()
                .for_each(|x| *x /= sizes[c] as f64);
        }
    }
    let filled: Vec<usize> = (0..k).filter(|&c| sizes[c] > 0).collect();
    if filled.is_empty() {
        return None;
    }
    let norms = centroid_norms(&centroids, dim);
    for (i, l) in labels.iter_mut().enumerate() {
        if (*l as usize) >= k {
            let c = filled
                .iter()
                .copied()
                .min_by(|&a, &b| {
                    let da = points.distance2(i, &centroids[a * dim..(a + 1) * dim], norms[a]);
                    let db = points.distance2(i, &centroids[b * dim..(b + 1) * dim], norms[b]);
                    da.total_cmp(&db)
                })
                .unwrap_or(0);
            *l = c as u32;
        }
    }
    update_centroids(points, labels, k, &mut centroids);
    Some(centroids)
}

/// An assignment kept as it is (unassigned points at the nearest member mean), with its
/// member-mean centroids and inertia: what a snapshot holding its previous segments serves.
pub fn keep<P: Points>(points: &P, k: usize, mut labels: Vec<u32>) -> Option<Clustering> {
    let centroids = centroids_of_labels(points, k, &mut labels)?;
    Some(finish(points, labels, centroids, 0))
}

/// Lloyd passes from a given assignment (`labels`, any value `>= k` = unassigned; centroids start
/// as the member means), with hysteresis: an assigned point moves only to a centroid closer than
/// `(1 − stickiness)` times its squared distance to its own. Points near a boundary between two
/// equally good sub-clusters then stay where they were instead of flipping with every small
/// change of their vectors; every move still lowers the inertia, so the passes converge. With no
/// point assigned at all, it is plain Lloyd from a seeded k-means++ start.
pub fn lloyd_sticky<P: Points>(
    points: &P,
    k: usize,
    mut labels: Vec<u32>,
    max_passes: usize,
    stickiness: f64,
) -> Clustering {
    let Some(mut centroids) = centroids_of_labels(points, k, &mut labels) else {
        return lloyd(
            points,
            kmeans_plus_plus(points, k, &mut ChaCha8Rng::seed_from_u64(0)),
            max_passes,
        );
    };
    let dim = points.dim();
    if stickiness <= 0.0 {
        // Plain Lloyd from the member means: the bounded passes find the same assignments.
        return lloyd(points, centroids, max_passes);
    }
    let keep = 1.0 - stickiness;
    let mut passes = 0;
    while passes < max_passes.max(1) {
        passes += 1;
        let norms = centroid_norms(&centroids, dim);
        let mut changed = false;
        for (i, label) in labels.iter_mut().enumerate() {
            let (c, best) = nearest(points, i, &centroids, &norms);
            if *label == c {
                continue;
            }
            let own = *label as usize;
            let stays = own < k
                && best
                    >= keep
                        * points.distance2(i, &centroids[own * dim..(own + 1) * dim], norms[own]);
            if !stays {
                *label = c;
                changed = true;
            }
        }
        if !changed && passes > 1 {
            break;
        }
        update_centroids(points, &mut labels, k, &mut centroids);
        if !changed {
            break;
        }
    }
    finish(points, labels, centroids, passes)
}

/// `optimum` (a Lloyd optimum reached from `previous`, the labels it continues) with as many
/// users as possible kept in their `previous` cluster: a user whose own centroid is within the
/// hysteresis (`(1 − stickiness)` times its squared distance to its previous centroid no more
/// than to its new one) goes back there, cheapest first, while the added squared error stays
/// within `budget` (a share of the optimum's inertia); then the centroids are the member means
/// again, which only lowers the inertia. One pass over the points: the inertia is at most
/// `(1 + budget)` times the optimum's, and no clustering within that bound that moves users
/// only back to their previous clusters keeps more of them where they were.
pub fn hold_within_budget<P: Points>(
    points: &P,
    optimum: Clustering,
    previous: &[u32],
    stickiness: f64,
    budget: f64,
) -> Clustering {
    let dim = points.dim();
    let k = optimum.k();
    if stickiness <= 0.0 || budget <= 0.0 || previous.len() != optimum.labels.len() {
        return optimum;
    }
    let norms = centroid_norms(&optimum.centroids, dim);
    let distance = |i: usize, c: usize| {
        points.distance2(i, &optimum.centroids[c * dim..(c + 1) * dim], norms[c])
    };
    let mut costs: Vec<(f64, usize)> = previous
        .iter()
        .zip(&optimum.labels)
        .enumerate()
        .filter(|(_, (p, l))| (**p as usize) < k && p != l)
        .filter_map(|(i, (&p, &l))| {
            let (back, now) = (distance(i, p as usize), distance(i, l as usize));
            ((1.0 - stickiness) * back <= now).then_some(((back - now).max(0.0), i))
        })
        .collect();
    if costs.is_empty() {
        return optimum;
    }
    costs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut allowance = budget * optimum.inertia;
    let mut labels = optimum.labels.clone();
    let mut sizes = optimum.sizes.clone();
    let mut held = 0usize;
    for (cost, i) in costs {
        if cost > allowance {
            break;
        }
        let (from, to) = (labels[i] as usize, previous[i] as usize);
        if sizes[from] <= 1 {
            continue;
        }
        allowance -= cost;
        sizes[from] -= 1;
        sizes[to] += 1;
        labels[i] = previous[i];
        held += 1;
    }
    if held == 0 {
        return optimum;
    }
    let passes = optimum.passes;
    match keep(points, k, labels) {
        Some(kept) if kept.inertia <= optimum.inertia * (1.0 + budget) => {
            Clustering { passes, ..kept }
        }
        _ => optimum,
    }
}

/// Re-seeds the degenerate clusters of `clustering` (fewer than `min_size` members: what a
/// continued clustering keeps of a centroid the data left behind) as k-means++ would: the
/// centroid moves to a point
/// drawn with probability proportional to its squared distance from its own centroid, out of
/// the cluster with the largest squared error, and Lloyd runs to convergence. Re-seedings are
/// kept while the inertia stays within `tolerance` (a share) of the input's and the re-seeded
/// segment no longer is degenerate: a segment of one outlying user can be a local optimum, but
/// not one a cold solve finds. Also says whether any re-seeding was kept (many users may have
/// moved then).
pub fn reseed_degenerate<P: Points>(
    points: &P,
    mut clustering: Clustering,
    min_size: u64,
    max_passes: usize,
    tolerance: f64,
    seed: u64,
) -> (Clustering, bool) {
    let dim = points.dim();
    let k = clustering.k();
    if k < 2 || points.len() < k {
        return (clustering, false);
    }
    let mut reseeded = false;
    let mut tried = vec![false; k];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let bound = clustering.inertia * (1.0 + tolerance);
    for _ in 0..k {
        let Some(small) = (0..k)
            .filter(|&c| !tried[c] && clustering.sizes[c] < min_size)
            .min_by_key(|&c| (clustering.sizes[c], c))
        else {
            break;
        };
        tried[small] = true;
        let norms = centroid_norms(&clustering.centroids, dim);
        let fit = |i: usize, c: usize| {
            points.distance2(i, &clustering.centroids[c * dim..(c + 1) * dim], norms[c])
        };
        let mut errors = vec![0.0; k];
        for (i, &l) in clustering.labels.iter().enumerate() {
            errors[l as usize] += fit(i, l as usize);
        }
        let Some(donor) = (0..k)
            .filter(|&c| c != small)
            .max_by(|&a, &b| errors[a].total_cmp(&errors[b]))
        else {
            break;
        };
        let mut target = rng.random::<f64>() * errors[donor];
        let mut chosen = None;
        for (i, &l) in clustering.labels.iter().enumerate() {
            if l as usize == donor {
                chosen = Some(i);
                target -= fit(i, donor);
                if target <= 0.0 {
                    break;
                }
            }
        }
        let Some(chosen) = chosen else {
            continue;
        };
        let mut centroids = clustering.centroids.clone();
        let seat = &mut centroids[small * dim..(small + 1) * dim];
        seat.iter_mut().for_each(|x| *x = 0.0);
        points.add_to(chosen, seat);
        let candidate = lloyd(points, centroids, max_passes);
        if candidate.inertia <= bound
            && reseeding_helps(&clustering, &candidate, min_size, tolerance)
        {
            clustering = candidate;
            reseeded = true;
        }
    }
    (clustering, reseeded)
}

/// Whether `after`, a re-seeding of `before`, is worth keeping: fewer segments under
/// `min_size` (or the smallest at least twice as large), at most `tolerance` (a share) more
/// inertia. A re-seeding that lands as small again would be repeated at every snapshot, each
/// time a Lloyd run over everyone and a flagged re-segmentation.
pub fn reseeding_helps(
    before: &Clustering,
    after: &Clustering,
    min_size: u64,
    tolerance: f64,
) -> bool {
    let degenerate = |c: &Clustering| c.sizes.iter().filter(|&&s| s < min_size).count();
    let smallest = |c: &Clustering| c.sizes.iter().copied().min().unwrap_or(0);
    let helps =
        degenerate(after) < degenerate(before) || smallest(after) >= 2 * smallest(before).max(1);
    helps && after.inertia <= before.inertia * (1.0 + tolerance)
}

/// Labels, sizes and inertia of `labels` with their exact member-mean centroids.
pub fn finish<P: Points>(
    points: &P,
    labels: Vec<u32>,
    centroids: Vec<f64>,
    passes: usize,
) -> Clustering {
    let dim = points.dim();
    let k = centroids.len() / dim.max(1);
    let mut sizes = vec![0u64; k];
    let norms = centroid_norms(&centroids, dim);
    let mut inertia = 0.0;
    for (i, &l) in labels.iter().enumerate() {
        let l = l as usize;
        sizes[l] += 1;
        inertia += points.distance2(i, &centroids[l * dim..(l + 1) * dim], norms[l]);
    }
    Clustering {
        labels,
        centroids,
        sizes,
        inertia,
        passes,
    }
}

/// Best of: Lloyd from `initial` centroids (if given) and `restarts` fresh k-means++ starts.
/// Start `i` draws from its own RNG seeded by `(seed, i)` and ties go to the lowest start, so
/// the result does not depend on how many threads run the starts (all available cores do).
pub fn cluster<P: Points + Sync>(
    points: &P,
    initial: Option<Vec<f64>>,
    params: &ClusteringParams,
) -> Clustering {
    let mut best: Option<Clustering> = initial.map(|c| lloyd(points, c, params.max_passes));
    let starts = if best.is_none() {
        params.restarts.max(1)
    } else {
        params.restarts
    };
    let run_start = |i: usize| {
        let mut rng =
            ChaCha8Rng::seed_from_u64(params.seed ^ (i as u64).wrapping_mul(0xA076_1D64_78BD_642F));
        let seeds = kmeans_plus_plus(points, params.k, &mut rng);
        lloyd(points, seeds, params.max_passes)
    };
    let results = super::parallel::map_interleaved(starts, run_start);
    for candidate in results {
        if best.as_ref().is_none_or(|b| candidate.inertia < b.inertia) {
            best = Some(candidate);
        }
    }
    best.unwrap_or_else(|| finish(points, vec![], vec![0.0; params.k * points.dim()], 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(seed: u64) -> (Vec<f64>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centers = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]];
        let mut data = vec![];
        let mut truth = vec![];
        for i in 0..400 {
            let c = i % 4;
            data.push(centers[c][0] + rng.random::<f64>() - 0.5);
            data.push(centers[c][1] + rng.random::<f64>() - 0.5);
            truth.push(c as u32);
        }
        (data, truth)
    }

    #[test]
    fn restarts_find_the_four_blobs() {
        let (data, truth) = blobs(1);
        let points = DensePoints {
            data: &data,
            dim: 2,
        };
        let params = ClusteringParams {
            k: 4,
            max_passes: 100,
            restarts: 5,
            keep_current: false,
            seed: 7,
        };
        let c = cluster(&points, None, &params);
        assert_eq!(c.sizes, vec![100; 4]);
        let ari = crate::engine::matching::adjusted_rand_index(&c.labels, &truth);
        assert!((ari - 1.0).abs() < 1e-12);
    }

    #[test]
    fn an_empty_cluster_is_reseeded_not_dropped() {
        let (data, _) = blobs(2);
        let points = DensePoints {
            data: &data,
            dim: 2,
        };
        // Two centroids far away from everything: they start empty.
        let start = vec![5.0, 5.0, 1000.0, 1000.0, -1000.0, -1000.0, 2000.0, 0.0];
        let c = lloyd(&points, start, 100);
        assert!(c.sizes.iter().all(|&s| s > 0), "sizes {:?}", c.sizes);
    }

    #[test]
    fn a_segment_the_data_left_behind_is_reseeded_where_a_cold_solve_puts_one() {
        let (mut data, truth) = blobs(3);
        // One stray point far from the blobs: a continued clustering kept a centroid on it
        // while two blobs share one centroid (a local optimum a cold solve does not reach).
        data.extend_from_slice(&[30.0, 30.0]);
        let points = DensePoints {
            data: &data,
            dim: 2,
        };
        let mut labels: Vec<u32> = truth.iter().map(|&t| t.min(2)).collect();
        labels.push(3);
        let stuck = keep(&points, 4, labels).expect("an assignment");
        let stuck = lloyd(&points, stuck.centroids, 100);
        assert_eq!(
            stuck.sizes.iter().min(),
            Some(&1),
            "sizes {:?}",
            stuck.sizes
        );
        let (reseeded, changed) = reseed_degenerate(&points, stuck.clone(), 10, 100, 0.0, 7);
        assert!(changed);
        assert!(
            reseeded.inertia < stuck.inertia * 0.5,
            "inertia {} from {}",
            reseeded.inertia,
            stuck.inertia
        );
        assert!(
            reseeded.sizes.iter().all(|&s| s >= 99),
            "sizes {:?}",
            reseeded.sizes
        );
        // Nothing degenerate: nothing changes.
        let (again, changed) = reseed_degenerate(&points, reseeded.clone(), 10, 100, 0.0, 7);
        assert!(!changed);
        assert_eq!(again.labels, reseeded.labels);
    }

    #[test]
    fn a_kept_reseeding_always_leaves_fewer_degenerate_segments() {
        // Heavy-tailed points (a few far out): natural small clusters that a re-seeding cannot
        // fix. Whatever is kept must have fixed something; what is refused leaves the input.
        for seed in 0..12u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let data: Vec<f64> = (0..600)
                .map(|_| {
                    let u: f64 = rng.random::<f64>().max(1e-9);
                    let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
                    sign * u.powf(-0.7)
                })
                .collect();
            let points = DensePoints {
                data: &data,
                dim: 2,
            };
            let start = lloyd(
                &points,
                kmeans_plus_plus(&points, 8, &mut ChaCha8Rng::seed_from_u64(seed)),
                100,
            );
            let min_size = 30;
            let degenerate = |c: &Clustering| c.sizes.iter().filter(|&&s| s < min_size).count();
            let smallest = |c: &Clustering| c.sizes.iter().copied().min().unwrap_or(0);
            let (after, changed) =
                reseed_degenerate(&points, start.clone(), min_size, 100, 0.5, seed);
            if changed {
                assert!(
                    degenerate(&after) < degenerate(&start)
                        || smallest(&after) >= 2 * smallest(&start).max(1),
                    "seed {seed}: sizes {:?} -> {:?}",
                    start.sizes,
                    after.sizes
                );
            } else {
                assert_eq!(after.labels, start.labels, "seed {seed}");
            }
        }
    }

    #[test]
    fn lloyd_over_shards_of_the_points_equals_lloyd_over_all_of_them() {
        let (data, _) = blobs(5);
        let points = DensePoints {
            data: &data,
            dim: 2,
        };
        let start = kmeans_plus_plus(&points, 5, &mut ChaCha8Rng::seed_from_u64(3));
        let whole = lloyd(&points, start.clone(), 100);
        // Three instances, each holding every third point.
        let shards: Vec<Vec<f64>> = (0..3)
            .map(|s| {
                data.chunks_exact(2)
                    .skip(s)
                    .step_by(3)
                    .flatten()
                    .copied()
                    .collect()
            })
            .collect();
        let mut labels: Vec<Vec<u32>> =
            shards.iter().map(|s| vec![u32::MAX; s.len() / 2]).collect();
        let mut centroids = start;
        let mut inertia = f64::NAN;
        for _ in 0..100 {
            let mut merged: Option<LloydPartial> = None;
            for (shard, labels) in shards.iter().zip(labels.iter_mut()) {
                let part = LloydPartial::assign(
                    &DensePoints {
                        data: shard,
                        dim: 2,
                    },
                    &centroids,
                    labels,
                );
                match merged.as_mut() {
                    Some(m) => m.merge(&part),
                    None => merged = Some(part),
                }
            }
            let merged = merged.expect("three shares");
            inertia = merged.inertia;
            if merged.moved == 0 {
                break;
            }
            centroids = merged.centroids(&centroids);
        }
        let sharded: Vec<u32> = (0..whole.labels.len())
            .map(|i| labels[i % 3][i / 3])
            .collect();
        assert_eq!(sharded, whole.labels);
        assert!(
            (inertia - whole.inertia).abs() <= 1e-9 * whole.inertia,
            "{inertia} vs {}",
            whole.inertia
        );
        for (a, b) in centroids.iter().zip(&whole.centroids) {
            assert!(
                (a - b).abs() <= 1e-9 * (1.0 + b.abs()),
                "centroid {a} vs {b}"
            );
        }
    }
}
