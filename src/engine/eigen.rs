//! Top-k eigenpairs of a symmetric positive semi-definite matrix by warm-started block subspace
//! iteration with Rayleigh–Ritz, plus the small dense pieces it needs (cyclic Jacobi for the
//! projected problem, twice-applied modified Gram–Schmidt). Blocks are stored as rows
//! (`b x d`) so every vector is contiguous.

use ndarray::{Array2, ArrayView2, Axis, s};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr_normal::standard_normal;

/// Settings of one eigen solve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EigenParams {
    /// Eigenpairs whose vectors must converge (the kept PCA components).
    pub vectors: usize,
    /// Eigenvalues wanted in all (the diagnostics curve); at least `vectors`.
    pub values: usize,
    /// Extra block columns beyond `values`; they speed convergence of the wanted ones.
    pub oversample: usize,
    /// Converged when every wanted residual `‖Cv − λv‖ ≤ tolerance · λ₁`.
    pub tolerance: f64,
    pub max_iterations: usize,
    pub seed: u64,
}

/// Result of a solve. Non-convergence is reported here, not as an error.
#[derive(Debug, Clone)]
pub struct EigenResult {
    /// `values` eigenvalues, descending.
    pub eigenvalues: Vec<f64>,
    /// `vectors x d`, one unit eigenvector per row, in eigenvalue order.
    pub eigenvectors: Array2<f64>,
    /// Operator applications (`C` times a block), the solve's unit of cost.
    pub iterations: usize,
    pub converged: bool,
    /// Largest residual norm of the kept vectors, relative to λ₁.
    pub max_relative_residual: f64,
    /// The whole final Ritz block (`b x d`): the best warm start for the next solve.
    pub block: Array2<f64>,
}

/// A symmetric `d x d` operator, applied to a block of row vectors: `Q ↦ Q C`.
pub trait SymmetricOperator {
    fn dim(&self) -> usize;
    fn apply_rows(&self, q: &Array2<f64>) -> Array2<f64>;
}

impl SymmetricOperator for ArrayView2<'_, f64> {
    fn dim(&self) -> usize {
        self.nrows()
    }
    fn apply_rows(&self, q: &Array2<f64>) -> Array2<f64> {
        // C symmetric: (C Qᵀ)ᵀ = Q C.
        q.dot(self)
    }
}

/// Top eigenpairs of the symmetric operator `c`. `warm` (`r x d`, any `r`) seeds the block;
/// missing rows are filled with seeded Gaussian vectors.
pub fn top_eigenpairs(
    c: &impl SymmetricOperator,
    warm: Option<ArrayView2<f64>>,
    params: &EigenParams,
) -> EigenResult {
    let d = c.dim();
    let values = params.values.max(params.vectors).min(d);
    let vectors = params.vectors.min(values);
    let block = (values + params.oversample).min(d);
    if d == 0 || block == 0 {
        return EigenResult {
            eigenvalues: vec![],
            eigenvectors: Array2::zeros((0, d)),
            iterations: 0,
            converged: true,
            max_relative_residual: 0.0,
            block: Array2::zeros((0, d)),
        };
    }
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let mut q = Array2::<f64>::zeros((block, d));
    let mut filled = 0;
    if let Some(w) = warm {
        let rows = w.nrows().min(block);
        let cols = w.ncols().min(d);
        q.slice_mut(s![..rows, ..cols])
            .assign(&w.slice(s![..rows, ..cols]));
        filled = rows;
    }
    for mut row in q.rows_mut().into_iter().skip(filled) {
        row.mapv_inplace(|_| standard_normal(&mut rng));
    }
    orthonormalize_rows(&mut q, &mut rng);

    let mut iterations = 0;
    let mut previous_values: Vec<f64> = vec![f64::NAN; values];
    loop {
        iterations += 1;
        let y = c.apply_rows(&q);
        let mut t = q.dot(&y.t());
        symmetrize(&mut t);
        let (ritz_values, ritz_vectors) = jacobi_eigen(&t);
        let vt = ritz_vectors.t();
        let q_ritz = vt.dot(&q);
        let y_ritz = vt.dot(&y);
        let scale = ritz_values
            .first()
            .copied()
            .unwrap_or(0.0)
            .abs()
            .max(f64::MIN_POSITIVE);
        let residuals: Vec<f64> = (0..ritz_values.len())
            .map(|i| {
                let r = &y_ritz.row(i) - &(&q_ritz.row(i) * ritz_values[i]);
                r.dot(&r).sqrt()
            })
            .collect();
        let max_residual = residuals[..vectors]
            .iter()
            .fold(0.0f64, |m, r| m.max(r / scale));
        // Curve-only eigenvalues (beyond the kept vectors) feed a chart. A Ritz value is within
        // its residual r of an eigenvalue, and within r²/gap once the gap to the rest of the
        // spectrum is known: the gap to each neighbouring Ritz value less that neighbour's own
        // residual (a neighbour that has not converged yet gives no gap). Settled when either
        // bound is below CURVE_TOLERANCE of the value, or below `tolerance · λ₁` (the floor a
        // low-rank matrix with zero eigenvalues needs).
        let values_settled = (vectors..values).all(|i| {
            let theta = ritz_values[i].abs();
            let neighbour_gap = |j: Option<usize>| {
                j.and_then(|j| Some((ritz_values.get(j)?, residuals.get(j).copied()?)))
                    .map_or(0.0, |(&v, r)| ((v - ritz_values[i]).abs() - r).max(0.0))
            };
            let gap = neighbour_gap(i.checked_sub(1)).min(neighbour_gap(Some(i + 1)));
            let r = residuals[i];
            let bound = r.min(r * r / gap.max(f64::MIN_POSITIVE));
            let allowed = (CURVE_TOLERANCE * theta).max(params.tolerance * scale);
            // Also steady across a filtered step: a bound can look small for a Ritz value the
            // block has not separated from a close neighbour yet.
            bound <= allowed && (ritz_values[i] - previous_values[i]).abs() <= allowed
        });
        previous_values.copy_from_slice(&ritz_values[..values]);
        let converged = max_residual <= params.tolerance && values_settled;
        if converged || iterations >= params.max_iterations {
            return EigenResult {
                eigenvalues: ritz_values[..values].to_vec(),
                eigenvectors: q_ritz.slice(s![..vectors, ..]).to_owned(),
                iterations,
                converged,
                max_relative_residual: max_residual,
                block: q_ritz,
            };
        }
        // Chebyshev filter on the unwanted interval [0, θ_b] (the block's smallest Ritz value):
        // it damps what lies there and amplifies the wanted end far more than plain powers of
        // C, for the same number of operator applications.
        let floor = ritz_values.last().copied().unwrap_or(0.0);
        // The filter multiplies the λ₁ direction by T_m(2λ₁/θ_b − 1) and the others by less;
        // the degree is capped so that ratio stays below MAX_FILTER_GAIN, or the smaller
        // wanted directions would drown in the rounding of the larger ones.
        let reach = if floor > 0.0 {
            2.0 * scale / floor - 1.0
        } else {
            1.0
        };
        let degree = (1..=FILTER_DEGREE.min(params.max_iterations - iterations))
            .take_while(|&m| m == 1 || chebyshev(m, reach) <= MAX_FILTER_GAIN)
            .last()
            .unwrap_or(1);
        q = if degree > 1 && scale > floor {
            let half = 0.5 * floor;
            let mut previous = q_ritz;
            let mut current = (&y_ritz - &(&previous * half)) / half;
            for _ in 1..degree {
                iterations += 1;
                let applied = c.apply_rows(&current);
                let next = (&applied - &(&current * half)) * (2.0 / half) - &previous;
                previous = std::mem::replace(&mut current, next);
            }
            current
        } else {
            y_ritz
        };
        orthonormalize_rows(&mut q, &mut rng);
    }
}

/// Largest growth ratio the Chebyshev filter may give one direction over another.
const MAX_FILTER_GAIN: f64 = 1e8;

/// `T_m(x)` for `x ≥ 1`.
fn chebyshev(m: usize, x: f64) -> f64 {
    (m as f64 * x.max(1.0).acosh()).cosh()
}

/// Relative accuracy the diagnostics curve's eigenvalues converge to.
const CURVE_TOLERANCE: f64 = 1e-5;

/// Operator applications per Chebyshev-filtered step (one of them also feeds Rayleigh–Ritz).
const FILTER_DEGREE: usize = 4;

fn symmetrize(t: &mut Array2<f64>) {
    let n = t.nrows();
    for i in 0..n {
        for j in (i + 1)..n {
            let m = 0.5 * (t[[i, j]] + t[[j, i]]);
            t[[i, j]] = m;
            t[[j, i]] = m;
        }
    }
}

/// Orthonormalises the rows of `q` in place (modified Gram–Schmidt, applied twice for
/// orthogonality to working precision). A row that collapses is replaced by a random one.
pub fn orthonormalize_rows(q: &mut Array2<f64>, rng: &mut ChaCha8Rng) {
    let rows = q.nrows();
    for i in 0..rows {
        for attempt in 0..4 {
            for _ in 0..2 {
                for j in 0..i {
                    let (done, mut rest) = q.view_mut().split_at(Axis(0), i);
                    let qj = done.row(j);
                    let mut qi = rest.row_mut(0);
                    let proj = qi.dot(&qj);
                    qi.scaled_add(-proj, &qj);
                }
            }
            let norm = q.row(i).dot(&q.row(i)).sqrt();
            if norm > 1e-10 || attempt == 3 {
                let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
                q.row_mut(i).mapv_inplace(|x| x * inv);
                break;
            }
            q.row_mut(i).mapv_inplace(|_| standard_normal(rng));
        }
    }
}

/// Eigen-decomposition of a small symmetric matrix by cyclic Jacobi rotations. Returns the
/// eigenvalues in descending order and the eigenvectors as the matching *columns*.
pub fn jacobi_eigen(a: &Array2<f64>) -> (Vec<f64>, Array2<f64>) {
    let n = a.nrows();
    let mut a = a.clone();
    let mut v = Array2::<f64>::eye(n);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| ((i + 1)..n).map(move |j| (i, j)))
            .map(|(i, j)| a[[i, j]] * a[[i, j]])
            .sum();
        let diag: f64 = (0..n).map(|i| a[[i, i]] * a[[i, i]]).sum();
        if off <= 1e-32 * diag || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in (p + 1)..n {
                let apq = a[[p, q]];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[[q, q]] - a[[p, p]]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[[k, p]];
                    let akq = a[[k, q]];
                    a[[k, p]] = c * akp - s * akq;
                    a[[k, q]] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[[p, k]];
                    let aqk = a[[q, k]];
                    a[[p, k]] = c * apk - s * aqk;
                    a[[q, k]] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[[k, p]];
                    let vkq = v[[k, q]];
                    v[[k, p]] = c * vkp - s * vkq;
                    v[[k, q]] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[[j, j]].total_cmp(&a[[i, i]]));
    let values = order.iter().map(|&i| a[[i, i]]).collect();
    let mut vectors = Array2::zeros((n, n));
    for (dst, &src) in order.iter().enumerate() {
        vectors.column_mut(dst).assign(&v.column(src));
    }
    (values, vectors)
}

/// A tiny Box–Muller normal sampler so the crate needs no distribution dependency.
mod rand_distr_normal {
    use rand::Rng;

    pub fn standard_normal(rng: &mut impl Rng) -> f64 {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

pub use rand_distr_normal::standard_normal as sample_standard_normal;

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;

    fn random_symmetric_psd(d: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = Array2::from_shape_fn((d + 5, d), |_| standard_normal(&mut rng));
        // Spread the spectrum so the top eigenvalues are distinct.
        let scales = Array1::from_shape_fn(d, |j| 1.0 / (1.0 + j as f64));
        let x = &x * &scales;
        x.t().dot(&x)
    }

    #[test]
    fn jacobi_reconstructs_the_matrix() {
        let a = random_symmetric_psd(12, 1);
        let (values, vectors) = jacobi_eigen(&a);
        let lambda = Array2::from_diag(&Array1::from(values.clone()));
        let back = vectors.dot(&lambda).dot(&vectors.t());
        let err = (&back - &a).iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(err < 1e-10, "reconstruction error {err}");
        assert!(values.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn subspace_iteration_matches_full_jacobi_and_warm_start_is_faster() {
        let a = random_symmetric_psd(60, 2);
        let (exact, exact_vectors) = jacobi_eigen(&a);
        let params = EigenParams {
            vectors: 5,
            values: 8,
            oversample: 6,
            tolerance: 1e-11,
            max_iterations: 2000,
            seed: 3,
        };
        let cold = top_eigenpairs(&a.view(), None, &params);
        assert!(cold.converged);
        for i in 0..8 {
            assert!((cold.eigenvalues[i] - exact[i]).abs() <= 1e-9 * exact[0]);
        }
        for i in 0..5 {
            let cos = cold.eigenvectors.row(i).dot(&exact_vectors.column(i)).abs();
            assert!(cos > 1.0 - 1e-9, "component {i}: cos {cos}");
        }
        let warm = top_eigenpairs(&a.view(), Some(cold.block.view()), &params);
        assert!(warm.converged);
        assert!(
            warm.iterations < cold.iterations,
            "warm {} vs cold {}",
            warm.iterations,
            cold.iterations
        );
    }
}
