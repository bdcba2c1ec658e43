//! Exact sufficient statistics of the user x item matrix in O(d) memory beside the user
//! vectors: user count `n`, column sums `s` and per-item sums of squares, updated in O(1) per
//! rating change. The covariance itself is never built: [`CovarianceOperator`] applies
//! `C V = (Xᵀ(X V))/n − μ(μᵀV)` through the sparse user rows, exact at any moment, in
//! O(nnz·r) for a block of r vectors; the trace comes from the sums of squares.

use ndarray::Array2;

use super::eigen::SymmetricOperator;
use super::{CowVec, SparseVec};

#[derive(Debug, Clone, Default)]
pub struct CovarianceStats {
    n: u64,
    sums: Vec<f64>,
    /// `Σ_u x_uj²` per item: the diagonal of `XᵀX`, all the trace needs.
    squares: Vec<f64>,
}

impl CovarianceStats {
    /// Number of users with at least one rating.
    pub fn users(&self) -> u64 {
        self.n
    }

    /// Column sums `s` (length = items seen so far).
    pub fn sums(&self) -> &[f64] {
        &self.sums
    }

    /// Per-item sums of squares (the diagonal of `XᵀX`).
    pub fn squares(&self) -> &[f64] {
        &self.squares
    }

    fn ensure_items(&mut self, d: usize) {
        if self.sums.len() < d {
            self.sums.resize(d, 0.0);
            self.squares.resize(d, 0.0);
        }
    }

    /// A user's value of item `j` changes from `old` to `new`.
    pub fn apply_change(&mut self, j: usize, old: f64, new: f64) {
        self.ensure_items(j + 1);
        self.sums[j] += new - old;
        self.squares[j] += new * new - old * old;
    }

    /// A user enters (first rating) or leaves (last rating retracted): only `n` changes, since
    /// a zero row adds nothing to the sums.
    pub fn user_entered(&mut self) {
        self.n += 1;
    }

    pub fn user_left(&mut self) {
        self.n = self.n.saturating_sub(1);
    }

    /// Every stored value was multiplied by `factor` (a power of two, so exactly): sums scale
    /// by it and sums of squares by its square, applied as two factors (the square alone may
    /// underflow where each step does not).
    pub fn rescale(&mut self, factor: f64) {
        self.sums.iter_mut().for_each(|s| *s *= factor);
        self.squares
            .iter_mut()
            .for_each(|s| *s = *s * factor * factor);
    }

    /// Trace of the population covariance, `Σ_j (Σ_u x_uj²)/n − μ_j²`, without building it.
    pub fn covariance_trace(&self, d: usize) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let n = self.n as f64;
        (0..d.min(self.sums.len()))
            .map(|j| {
                let mean = self.sums[j] / n;
                self.squares[j] / n - mean * mean
            })
            .sum()
    }

    /// Column means `μ = s/n` over `d` items.
    pub fn mean(&self, d: usize) -> Vec<f64> {
        let n = self.n.max(1) as f64;
        (0..d)
            .map(|j| self.sums.get(j).copied().unwrap_or(0.0) / n)
            .collect()
    }

    /// The population covariance over `d` items as an operator on the user rows.
    pub fn operator<'a>(&self, vectors: &'a CowVec<SparseVec>, d: usize) -> CovarianceOperator<'a> {
        self.sharded_operator(vec![vectors], d)
    }

    /// Statistics from their parts: `n` users with these column sums and sums of squares (an
    /// instance's partial, or partials added up elsewhere).
    pub fn from_parts(n: u64, sums: Vec<f64>, squares: Vec<f64>) -> CovarianceStats {
        CovarianceStats { n, sums, squares }
    }

    /// Adds `other`, the statistics of users disjoint from these (another instance's share):
    /// counts and sums add up, so partials merged in any grouping give the whole.
    pub fn merge(&mut self, other: &CovarianceStats) {
        self.ensure_items(other.sums.len());
        self.n += other.n;
        for (s, o) in self.sums.iter_mut().zip(&other.sums) {
            *s += o;
        }
        for (s, o) in self.squares.iter_mut().zip(&other.squares) {
            *s += o;
        }
    }

    /// The population covariance of users spread over `shards` (each one instance's user rows,
    /// disjoint; these statistics their merged ones) as one operator: each application sums
    /// the shards' [`partial_gram`] products, what a coordinator does with the partials every
    /// instance sends back for the block it broadcast.
    pub fn sharded_operator<'a, S: GramShare + ?Sized>(
        &self,
        shards: Vec<&'a S>,
        d: usize,
    ) -> CovarianceOperator<'a, S> {
        CovarianceOperator {
            shards,
            mean: self.mean(d),
            users: self.n,
        }
    }

    /// Statistics recomputed from scratch from user vectors (restart, tests).
    pub fn from_vectors<'a>(vectors: impl IntoIterator<Item = &'a SparseVec>, d: usize) -> Self {
        let mut stats = CovarianceStats::default();
        stats.ensure_items(d);
        for x in vectors {
            if x.idx.is_empty() {
                continue;
            }
            stats.n += 1;
            for (j, v) in x.iter() {
                stats.apply_change(j as usize, 0.0, v);
            }
        }
        stats
    }
}

/// The population covariance `XᵀX/n − μμᵀ` applied through the sparse user rows: exact, and
/// O(nnz·r) time and O(d·r) memory for a block of r vectors, whatever the catalogue size. The
/// rows may be spread over several instances' shares (one share for a single instance): each
/// application sums the shares' [`partial_gram`] products.
pub struct CovarianceOperator<'a, S: ?Sized = CowVec<SparseVec>> {
    shards: Vec<&'a S>,
    mean: Vec<f64>,
    users: u64,
}

/// What one share of the users contributes to a covariance application: their ratings (the
/// solver's cost estimate) and `Xᵢᵀ(Xᵢ Qᵀ)` over them ([`partial_gram`]). An instance's rows
/// are one; an instance answering a coordinator's round is another (`engine::cluster`).
pub trait GramShare {
    fn ratings(&self) -> usize;
    /// `Xᵢᵀ(Xᵢ Qᵀ)` over these users, item-major (`d x b`), for the block `q` (`b x d`).
    fn gram(&self, q: &Array2<f64>) -> Vec<f64>;
}

impl GramShare for CowVec<SparseVec> {
    fn ratings(&self) -> usize {
        self.iter().map(|x| x.nnz()).sum()
    }

    fn gram(&self, q: &Array2<f64>) -> Vec<f64> {
        partial_gram(self, q)
    }
}

impl<S: GramShare + ?Sized> SymmetricOperator for CovarianceOperator<'_, S> {
    fn dim(&self) -> usize {
        self.mean.len()
    }

    fn row_work(&self) -> usize {
        let ratings: usize = self.shards.iter().map(|shard| shard.ratings()).sum();
        2 * ratings + 2 * self.mean.len()
    }

    fn apply_rows(&self, q: &Array2<f64>) -> Array2<f64> {
        let mut shares = self.shards.iter().map(|shard| shard.gram(q));
        let (b, d) = q.dim();
        let mut gram = shares.next().unwrap_or_else(|| vec![0.0; d * b]);
        for share in shares {
            for (g, p) in gram.iter_mut().zip(share) {
                *g += p;
            }
        }
        covariance_from_gram(&gram, q, &self.mean, self.users)
    }
}

/// `C Qᵀ` (as `b x d` rows) from `Σ Xᵀ(X Qᵀ)` over every user (item-major `d x b`), the
/// user count and the column means: `XᵀX Q/n − μ(μᵀQ)`.
fn covariance_from_gram(gram: &[f64], q: &Array2<f64>, mean: &[f64], users: u64) -> Array2<f64> {
    let (b, d) = q.dim();
    let inv = 1.0 / users.max(1) as f64;
    let q_mean = q.dot(&ndarray::ArrayView1::from(mean));
    Array2::from_shape_fn((b, d), |(r, j)| {
        gram.get(j * b + r).copied().unwrap_or(0.0) * inv - q_mean[r] * mean[j]
    })
}

/// One instance's share of a covariance application: `Xᵀ(X Qᵀ)` over the users it holds,
/// item-major (`d x b`) for the block `q` (`b x d`). Shares over disjoint users add up to the
/// whole product; rows index items `< d` only.
pub fn partial_gram(vectors: &CowVec<SparseVec>, q: &Array2<f64>) -> Vec<f64> {
    let (b, d) = q.dim();
    // Item-major copy of the block: each rating reads one contiguous row of b values.
    let qt = q.t().as_standard_layout().into_owned();
    let qt = qt.as_slice().unwrap_or(&[]);
    // A fixed number of user ranges, summed in a fixed order: the result is the same on
    // any machine, however many of the ranges run at once.
    let n = vectors.len();
    let chunk = n.div_ceil(OPERATOR_PARTS).max(1);
    let ranges: Vec<Vec<&[SparseVec]>> = (0..n)
        .step_by(chunk)
        .map(|start| vectors.slices(start, start + chunk))
        .collect();
    let partials =
        super::parallel::map_interleaved(ranges.len(), |i| gram_times_block(&ranges[i], qt, b, d));
    let mut parts = partials.into_iter();
    let mut yt = parts.next().unwrap_or_else(|| vec![0.0; d * b]);
    for part in parts {
        for (y, p) in yt.iter_mut().zip(&part) {
            *y += p;
        }
    }
    yt
}

/// User ranges the operator splits its work into (see `apply_rows`).
const OPERATOR_PARTS: usize = 4;

/// `Xᵀ(X Q)` over some users, item-major (`d x b`), for the item-major block `qt`: with AVX2
/// when the CPU has it (4 lanes instead of SSE2's 2). Each output element is accumulated in the
/// same order either way and no multiply-add is fused, so both give bit-identical results.
fn gram_times_block(vectors: &[&[SparseVec]], qt: &[f64], b: usize, d: usize) -> Vec<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { gram_times_block_avx2(vectors, qt, b, d) };
    }
    gram_times_block_sized(vectors, qt, b, d)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn gram_times_block_avx2(vectors: &[&[SparseVec]], qt: &[f64], b: usize, d: usize) -> Vec<f64> {
    gram_times_block_sized(vectors, qt, b, d)
}

/// The block widths the solvers use (a Lanczos step; the kept block; the kept block with the
/// diagnostics curve) get a kernel of fixed width: the row accumulator stays in registers and
/// the loops unroll. Same operations in the same order, so the same bits.
#[inline(always)]
fn gram_times_block_sized(vectors: &[&[SparseVec]], qt: &[f64], b: usize, d: usize) -> Vec<f64> {
    match b {
        10 => gram_times_block_fixed::<10>(vectors, qt, d),
        20 => gram_times_block_fixed::<20>(vectors, qt, d),
        40 => gram_times_block_fixed::<40>(vectors, qt, d),
        _ => gram_times_block_portable(vectors, qt, b, d),
    }
}

#[inline(always)]
fn gram_times_block_fixed<const B: usize>(
    vectors: &[&[SparseVec]],
    qt: &[f64],
    d: usize,
) -> Vec<f64> {
    let mut yt = vec![0.0; d * B];
    let rows_q: &[[f64; B]] = qt.as_chunks::<B>().0;
    let (rows_y, _) = yt.as_chunks_mut::<B>();
    for x in vectors.iter().flat_map(|part| part.iter()) {
        if x.idx.is_empty() {
            continue;
        }
        let mut t = [0.0; B];
        for (j, v) in x.iter() {
            if let Some(q) = rows_q.get(j as usize).filter(|_| (j as usize) < d) {
                for i in 0..B {
                    t[i] += v * q[i];
                }
            }
        }
        for (j, v) in x.iter() {
            if let Some(y) = rows_y.get_mut(j as usize).filter(|_| (j as usize) < d) {
                for i in 0..B {
                    y[i] += v * t[i];
                }
            }
        }
    }
    yt
}

#[inline(always)]
fn gram_times_block_portable(vectors: &[&[SparseVec]], qt: &[f64], b: usize, d: usize) -> Vec<f64> {
    let mut yt = vec![0.0; d * b];
    let mut t = vec![0.0; b];
    for x in vectors.iter().flat_map(|part| part.iter()) {
        if x.idx.is_empty() {
            continue;
        }
        t.iter_mut().for_each(|v| *v = 0.0);
        for (j, v) in x.iter() {
            let j = j as usize;
            if j < d {
                for (ti, &qi) in t.iter_mut().zip(&qt[j * b..(j + 1) * b]) {
                    *ti += v * qi;
                }
            }
        }
        for (j, v) in x.iter() {
            let j = j as usize;
            if j < d {
                for (yi, &ti) in yt[j * b..(j + 1) * b].iter_mut().zip(&t) {
                    *yi += v * ti;
                }
            }
        }
    }
    yt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_width_kernels_give_the_same_bits_as_the_general_one() {
        let d = 37;
        let users: Vec<SparseVec> = (0..50u32)
            .map(|u| {
                // Some indices at or past d: items the operator must skip.
                let idx: Vec<u32> = (0..d as u32 + 4)
                    .filter(|j| (u * 7 + j * 3) % 5 < 2)
                    .collect();
                let val = idx
                    .iter()
                    .map(|&j| ((u + j) % 9) as f64 * 0.37 - 1.1)
                    .collect();
                SparseVec { idx, val }
            })
            .collect();
        for b in [10, 20, 40] {
            let qt: Vec<f64> = (0..d * b).map(|i| ((i * 31 % 17) as f64).sin()).collect();
            let parts = [&users[..20], &users[20..]];
            let general = gram_times_block_portable(&parts, &qt, b, d);
            let fixed = gram_times_block(&parts, &qt, b, d);
            assert!(general.iter().any(|&x| x != 0.0));
            assert_eq!(
                general.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                fixed.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "block {b}"
            );
        }
    }

    #[test]
    fn statistics_and_the_operator_over_shards_of_the_users_equal_the_whole() {
        use super::super::eigen::{EigenParams, top_eigenpairs};
        let d = 60;
        let users: Vec<SparseVec> = (0..300u32)
            .map(|u| {
                let idx: Vec<u32> = (0..d as u32)
                    .filter(|j| (u * 13 + j * 7) % 11 < 3)
                    .collect();
                let val = idx
                    .iter()
                    .map(|&j| ((u * 3 + j * 5) % 7) as f64 + 1.0 + (u % 4) as f64 * 0.25)
                    .collect();
                SparseVec { idx, val }
            })
            .collect();
        let all: CowVec<SparseVec> = users.iter().cloned().collect();
        // Three instances, each holding every third user (as partitions by user would).
        let shards: Vec<CowVec<SparseVec>> = (0..3)
            .map(|s| users.iter().skip(s).step_by(3).cloned().collect())
            .collect();
        let whole = CovarianceStats::from_vectors(all.iter(), d);
        let mut merged = CovarianceStats::default();
        for shard in &shards {
            merged.merge(&CovarianceStats::from_vectors(shard.iter(), d));
        }
        assert_eq!(merged.users(), whole.users());
        for (a, b) in merged.sums().iter().zip(whole.sums()) {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "sum {a} vs {b}");
        }
        for (a, b) in merged.squares().iter().zip(whole.squares()) {
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "square {a} vs {b}"
            );
        }
        let params = EigenParams {
            vectors: 5,
            values: 5,
            oversample: 5,
            tolerance: 1e-10,
            max_iterations: 300,
            seed: 9,
        };
        let single = top_eigenpairs(&whole.operator(&all, d), None, &params);
        let sharded = top_eigenpairs(
            &merged.sharded_operator(shards.iter().collect(), d),
            None,
            &params,
        );
        assert!(single.converged && sharded.converged);
        for (a, b) in sharded.eigenvalues.iter().zip(&single.eigenvalues) {
            assert!((a - b).abs() <= 1e-9 * b.abs(), "eigenvalue {a} vs {b}");
        }
        for (a, b) in sharded
            .eigenvectors
            .rows()
            .into_iter()
            .zip(single.eigenvectors.rows())
        {
            let cosine: f64 = a.iter().zip(b.iter()).map(|(x, y)| x * y).sum();
            assert!(cosine.abs() >= 1.0 - 1e-9, "component cosine {cosine}");
        }
    }
}
