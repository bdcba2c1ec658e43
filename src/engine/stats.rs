//! Exact sufficient statistics of the user x item matrix: user count `n`, column sums `s` and
//! second moments `M = Σ x xᵀ`, updated in O(nnz of the user) per rating change so that the
//! covariance at any moment equals the batch covariance of the current matrix.
//!
//! `M` is kept as a non-symmetric accumulator `A` with `M = (A + Aᵀ)/2`: the rank-2 update
//! `δ(x e_jᵀ + e_j xᵀ)` then only touches row `j` of `A` (contiguous) instead of a row and a
//! column (strided).

use ndarray::Array2;

use super::SparseVec;

#[derive(Debug, Clone, Default)]
pub struct CovarianceStats {
    n: u64,
    sums: Vec<f64>,
    /// Row `j` of the accumulator `A`; shorter rows are implicitly zero-padded.
    rows: Vec<Vec<f64>>,
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

    fn ensure_items(&mut self, d: usize) {
        if self.sums.len() < d {
            self.sums.resize(d, 0.0);
            self.rows.resize_with(d, Vec::new);
        }
    }

    /// The user's value of item `j` changes by `delta`; `before` is the user's vector before
    /// the change. `M += δ(x e_jᵀ + e_j xᵀ) + δ² e_j e_jᵀ`, `s_j += δ`.
    pub fn apply_change(&mut self, before: &SparseVec, j: usize, delta: f64, items: usize) {
        self.ensure_items(items.max(j + 1));
        self.sums[j] += delta;
        let row = &mut self.rows[j];
        let needed = before
            .idx
            .last()
            .map_or(j + 1, |&last| (last as usize + 1).max(j + 1));
        if row.len() < needed {
            row.resize(needed.max(items), 0.0);
        }
        let twice = 2.0 * delta;
        for (&i, &x) in before.idx.iter().zip(&before.val) {
            row[i as usize] += twice * x;
        }
        row[j] += delta * delta;
    }

    /// A user enters (first rating) or leaves (last rating retracted): only `n` changes, since
    /// a zero row adds nothing to `s` or `M`.
    pub fn user_entered(&mut self) {
        self.n += 1;
    }

    pub fn user_left(&mut self) {
        self.n = self.n.saturating_sub(1);
    }

    /// Trace of the population covariance, `Σ_j M_jj/n − μ_j²`, without building it.
    pub fn covariance_trace(&self, d: usize) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let n = self.n as f64;
        (0..d)
            .map(|j| {
                let m_jj = self
                    .rows
                    .get(j)
                    .and_then(|r| r.get(j))
                    .copied()
                    .unwrap_or(0.0);
                let mean = self.sums.get(j).copied().unwrap_or(0.0) / n;
                m_jj / n - mean * mean
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

    /// `M = (A + Aᵀ)/2` as a dense `d x d` matrix.
    pub fn second_moments(&self, d: usize) -> Array2<f64> {
        self.symmetrised(d, 1.0, None)
    }

    /// Population covariance `C = M/n − μμᵀ` (`d x d`). scikit-learn's `explained_variance_`
    /// uses `n − 1`: multiply by `n/(n−1)` for that; ratios are unaffected.
    pub fn covariance(&self, d: usize) -> Array2<f64> {
        if self.n == 0 {
            return self.second_moments(d);
        }
        let n = self.n as f64;
        let mean: Vec<f64> = (0..d)
            .map(|j| self.sums.get(j).copied().unwrap_or(0.0) / n)
            .collect();
        self.symmetrised(d, 1.0 / n, Some(&mean))
    }

    /// `scale · (A + Aᵀ)/2 − mean meanᵀ`, built in cache-sized tiles (the transpose is the
    /// expensive part of a refresh otherwise).
    fn symmetrised(&self, d: usize, scale: f64, mean: Option<&[f64]>) -> Array2<f64> {
        const TILE: usize = 64;
        let mut flat = vec![0.0; d * d];
        for (j, row) in self.rows.iter().enumerate().take(d) {
            let len = row.len().min(d);
            flat[j * d..j * d + len].copy_from_slice(&row[..len]);
        }
        let outer = |j: usize, i: usize| mean.map_or(0.0, |m| m[j] * m[i]);
        for jb in (0..d).step_by(TILE) {
            for ib in (jb..d).step_by(TILE) {
                for j in jb..(jb + TILE).min(d) {
                    for i in ib.max(j)..(ib + TILE).min(d) {
                        let v = 0.5 * (flat[j * d + i] + flat[i * d + j]) * scale - outer(j, i);
                        flat[j * d + i] = v;
                        flat[i * d + j] = v;
                    }
                }
            }
        }
        Array2::from_shape_vec((d, d), flat).unwrap_or_else(|_| Array2::zeros((d, d)))
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
            for (&j, &xj) in x.idx.iter().zip(&x.val) {
                let j = j as usize;
                stats.sums[j] += xj;
                let row = &mut stats.rows[j];
                if row.len() < d {
                    row.resize(d, 0.0);
                }
                for (&i, &xi) in x.idx.iter().zip(&x.val) {
                    row[i as usize] += xj * xi;
                }
            }
        }
        stats
    }
}
