//! Top-k eigenpairs of a symmetric positive semi-definite matrix: block Lanczos with full
//! reorthogonalisation and thick restarts for a cold solve, warm-started Chebyshev-filtered
//! block subspace iteration when a previous basis is at hand, Rayleigh–Ritz for both, plus the
//! small dense pieces they need (Householder–QL and cyclic Jacobi for the projected problem,
//! twice-applied Gram–Schmidt). Blocks are stored as rows (`b x d`) so every vector is
//! contiguous.

use ndarray::{Array1, Array2, ArrayView2, Axis, s};
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
    /// Operator applications (`C` times a block of at most `values + oversample` rows: a
    /// Lanczos step, a filter step, or the final check of the kept vectors' residuals), the
    /// solve's unit of cost.
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
    /// Multiply-adds of one application to a single row (the solver picks its method by it).
    fn row_work(&self) -> usize {
        self.dim() * self.dim()
    }
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
/// missing rows are filled with seeded Gaussian vectors. A cold solve runs block Lanczos; a
/// warm one runs subspace iteration from the warm block, which needs only a few applications
/// when the block is already close.
pub fn top_eigenpairs(
    c: &impl SymmetricOperator,
    warm: Option<ArrayView2<f64>>,
    params: &EigenParams,
) -> EigenResult {
    let d = c.dim();
    let values = params.values.max(params.vectors).min(d);
    let wanted = Wanted {
        values,
        vectors: params.vectors.min(values),
        block: (values + params.oversample).min(d),
    };
    if d == 0 || wanted.block == 0 {
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
    let rows = LANCZOS_BLOCK.min(wanted.block);
    // Lanczos needs its basis to hold the Ritz block before its last application, and pays
    // off when applications are dear: its Rayleigh–Ritz steps cost O(basis³) whatever the
    // operator, which on a small matrix outweighs the applications it saves.
    let lanczos_fits = rows * params.max_iterations.saturating_sub(1) >= wanted.block;
    if warm.is_none() && lanczos_fits && c.row_work() >= LANCZOS_MIN_ROW_WORK {
        let q = start_block(None, rows, d, &mut rng);
        let cap = basis_cap(d, wanted.block, rows);
        lanczos(c, q, &wanted, params, cap, &mut rng)
    } else {
        let q = start_block(warm, wanted.block, d, &mut rng);
        subspace_iteration(c, q, &wanted, params, &mut rng)
    }
}

/// How many eigenpairs a solve needs, clamped to the dimension.
struct Wanted {
    values: usize,
    vectors: usize,
    /// Ritz vectors carried along (`values + oversample`), returned as the warm start.
    block: usize,
}

/// `rows x d` orthonormal rows: the warm rows first, seeded Gaussian rows after.
fn start_block(
    warm: Option<ArrayView2<f64>>,
    rows: usize,
    d: usize,
    rng: &mut ChaCha8Rng,
) -> Array2<f64> {
    let mut q = Array2::<f64>::zeros((rows, d));
    let mut filled = 0;
    if let Some(w) = warm {
        let r = w.nrows().min(rows);
        let cols = w.ncols().min(d);
        q.slice_mut(s![..r, ..cols])
            .assign(&w.slice(s![..r, ..cols]));
        filled = r;
    }
    for mut row in q.rows_mut().into_iter().skip(filled) {
        row.mapv_inplace(|_| standard_normal(rng));
    }
    orthonormalize_rows(&mut q, rng);
    q
}

/// Where the curve-only eigenvalues (beyond the kept vectors) stand. They feed a chart. A Ritz
/// value is within its residual r of an eigenvalue, and within r²/gap once the gap to the rest
/// of the spectrum is known: the gap to each neighbouring Ritz value less that neighbour's own
/// residual (a neighbour that has not converged yet gives no gap). `bounded` when either bound
/// is below CURVE_TOLERANCE of the value, or below `tolerance · λ₁` (the floor a low-rank
/// matrix with zero eigenvalues needs), for every value; `steady` when no value moved by more
/// than that since the previous Rayleigh–Ritz step (a bound can look small for a Ritz value
/// the basis has not separated from a close neighbour yet).
#[derive(Debug, Clone, Copy)]
struct CurveState {
    bounded: bool,
    steady: bool,
}

impl CurveState {
    fn settled(self) -> bool {
        self.bounded && self.steady
    }
}

fn curve_state(
    ritz_values: &[f64],
    residuals: &[f64],
    previous_values: &[f64],
    wanted: &Wanted,
    tolerance: f64,
    scale: f64,
) -> CurveState {
    let mut state = CurveState {
        bounded: true,
        steady: true,
    };
    for i in wanted.vectors..wanted.values {
        let theta = ritz_values[i].abs();
        let neighbour_gap = |j: Option<usize>| {
            j.and_then(|j| Some((ritz_values.get(j)?, residuals.get(j).copied()?)))
                .map_or(0.0, |(&v, r)| ((v - ritz_values[i]).abs() - r).max(0.0))
        };
        let gap = neighbour_gap(i.checked_sub(1)).min(neighbour_gap(Some(i + 1)));
        let r = residuals[i];
        let bound = r.min(r * r / gap.max(f64::MIN_POSITIVE));
        let allowed = (CURVE_TOLERANCE * theta).max(tolerance * scale);
        let previous = previous_values.get(i).copied().unwrap_or(f64::NAN);
        state.bounded &= bound <= allowed;
        state.steady &= (ritz_values[i] - previous).abs() <= allowed;
    }
    state
}

/// `|λ₁|`, the scale residuals are measured against (never zero).
fn residual_scale(ritz_values: &[f64]) -> f64 {
    ritz_values
        .first()
        .copied()
        .unwrap_or(0.0)
        .abs()
        .max(f64::MIN_POSITIVE)
}

/// `‖y_i − θ_i q_i‖` for each row.
fn row_residuals(q: &Array2<f64>, y: &Array2<f64>, theta: &[f64]) -> Vec<f64> {
    theta
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let r = &y.row(i) - &(&q.row(i) * t);
            r.dot(&r).sqrt()
        })
        .collect()
}

/// Block subspace iteration from the orthonormal block `q`, Chebyshev-filtered, with
/// Rayleigh–Ritz on the block after every filtered step.
fn subspace_iteration(
    c: &impl SymmetricOperator,
    mut q: Array2<f64>,
    wanted: &Wanted,
    params: &EigenParams,
    rng: &mut ChaCha8Rng,
) -> EigenResult {
    let mut iterations = 0;
    let mut previous_values: Vec<f64> = vec![f64::NAN; wanted.values];
    loop {
        iterations += 1;
        let y = c.apply_rows(&q);
        let mut t = q.dot(&y.t());
        symmetrize(&mut t);
        let (ritz_values, ritz_vectors) = jacobi_eigen(&t);
        let vt = ritz_vectors.t();
        let q_ritz = vt.dot(&q);
        let y_ritz = vt.dot(&y);
        let scale = residual_scale(&ritz_values);
        let residuals = row_residuals(&q_ritz, &y_ritz, &ritz_values);
        let max_residual = residuals[..wanted.vectors]
            .iter()
            .fold(0.0f64, |m, r| m.max(r / scale));
        let settled = curve_state(
            &ritz_values,
            &residuals,
            &previous_values,
            wanted,
            params.tolerance,
            scale,
        )
        .settled();
        previous_values.copy_from_slice(&ritz_values[..wanted.values]);
        let converged = max_residual <= params.tolerance && settled;
        if converged || iterations >= params.max_iterations {
            return EigenResult {
                eigenvalues: ritz_values[..wanted.values].to_vec(),
                eigenvectors: q_ritz.slice(s![..wanted.vectors, ..]).to_owned(),
                iterations,
                converged,
                max_relative_residual: max_residual,
                block: q_ritz,
            };
        }
        let floor = ritz_values.last().copied().unwrap_or(0.0);
        let budget = params.max_iterations - iterations;
        let filtered = chebyshev_filter(c, q_ritz, &y_ritz, scale, floor, budget);
        iterations += filtered.1;
        q = filtered.0;
        orthonormalize_rows(&mut q, rng);
    }
}

/// Chebyshev filter on the unwanted interval [0, θ_b] (the block's smallest Ritz value): it
/// damps what lies there and amplifies the wanted end far more than plain powers of C, for the
/// same number of operator applications. Returns the filtered block (not orthonormalised) and
/// the applications it spent beyond the one that gave `y_ritz = q_ritz C`.
fn chebyshev_filter(
    c: &impl SymmetricOperator,
    q_ritz: Array2<f64>,
    y_ritz: &Array2<f64>,
    scale: f64,
    floor: f64,
    budget: usize,
) -> (Array2<f64>, usize) {
    // The filter multiplies the λ₁ direction by T_m(2λ₁/θ_b − 1) and the others by less; the
    // degree is capped so that ratio stays below MAX_FILTER_GAIN, or the smaller wanted
    // directions would drown in the rounding of the larger ones.
    let reach = if floor > 0.0 {
        2.0 * scale / floor - 1.0
    } else {
        1.0
    };
    let degree = (1..=FILTER_DEGREE.min(budget))
        .take_while(|&m| m == 1 || chebyshev(m, reach) <= MAX_FILTER_GAIN)
        .last()
        .unwrap_or(1);
    if degree <= 1 || scale <= floor {
        return (y_ritz.clone(), 0);
    }
    let half = 0.5 * floor;
    let mut previous = q_ritz;
    let mut current = (y_ritz - &(&previous * half)) / half;
    for _ in 1..degree {
        let applied = c.apply_rows(&current);
        let next = (&applied - &(&current * half)) * (2.0 / half) - &previous;
        previous = std::mem::replace(&mut current, next);
    }
    (current, degree - 1)
}

/// Rows per block Lanczos step of a cold solve. A Krylov basis needs fewer operator-vector
/// products the smaller its block, but the operator streams every rating once per application,
/// so a block of several rows costs little more than one row; several rows also resolve
/// clustered eigenvalues without waiting for them to split.
const LANCZOS_BLOCK: usize = 10;

/// Operator work per row below which cold solves run subspace iteration (measured: a
/// MovieLens-100K-shaped matrix, ~0.1M multiply-adds a row, solves twice as fast that way; a
/// 5M-rating one, ~6.5M, three times slower).
const LANCZOS_MIN_ROW_WORK: usize = 1 << 20;

/// Krylov basis bounds: at most this many vectors, and this many bytes (a catalogue of 100,000
/// items holds 160 vectors), but always room for the kept Ritz block and two steps.
const MAX_BASIS_VECTORS: usize = 320;
const MAX_BASIS_BYTES: usize = 128 << 20;

/// A row whose remainder after projection is below this share of its norm has no new direction.
const BREAKDOWN: f64 = 1e-12;

fn basis_cap(d: usize, block: usize, step: usize) -> usize {
    let by_bytes = MAX_BASIS_BYTES / (8 * d.max(1));
    MAX_BASIS_VECTORS.min(by_bytes).max(block + 3 * step).min(d)
}

/// Block Lanczos from the orthonormal block `start` in a basis of at most `cap` rows, with full reorthogonalisation, Rayleigh–
/// Ritz on the projected matrix after every step (once the basis holds the Ritz block) and a
/// thick restart from the Ritz block when the basis is full. Convergence is judged on the
/// Lanczos residual estimates and confirmed on the true residuals of the kept vectors.
fn lanczos(
    c: &impl SymmetricOperator,
    start: Array2<f64>,
    wanted: &Wanted,
    params: &EigenParams,
    cap: usize,
    rng: &mut ChaCha8Rng,
) -> EigenResult {
    let mut k = Krylov::new(start, cap);
    let mut iterations = 0;
    let mut previous_values = vec![f64::NAN; wanted.values];
    // Rayleigh–Ritz costs O(len³): it runs each time the basis has grown by a quarter (and
    // whenever the basis is full or the solve must end), not after every step.
    let mut ritz_at = wanted.block;
    loop {
        let w = c.apply_rows(&k.active_block());
        iterations += 1;
        let (next, coupling) = k.extend(w, rng);
        let spanned = next.nrows() == 0;
        let last_call = iterations + 1 >= params.max_iterations;
        let full = k.len + next.nrows() > cap;
        if (k.len >= ritz_at && k.len >= wanted.block) || full || spanned || last_call {
            ritz_at = k.len + (k.len / 4).max(1);
            let (theta, s) = k.ritz();
            let estimates = k.residual_estimates(&coupling, &s);
            let scale = residual_scale(&theta);
            let curve = curve_state(
                &theta,
                &estimates,
                &previous_values,
                wanted,
                params.tolerance,
                scale,
            );
            let settled = curve.settled();
            previous_values.copy_from_slice(&theta[..wanted.values]);
            let kept_converged = estimates[..wanted.vectors]
                .iter()
                .all(|e| e / scale <= params.tolerance);
            if kept_converged && curve.bounded && !curve.steady {
                // Only steadiness is missing, judged against the previous Rayleigh–Ritz step:
                // the next step tells, where waiting for a quarter more basis would spend
                // several applications after convergence.
                ritz_at = k.len + 1;
            }
            if (settled && kept_converged) || spanned || last_call {
                let result = k.finish(c, &theta, &s, wanted, settled, params.tolerance);
                iterations += usize::from(wanted.vectors > 0);
                if result.converged || spanned || iterations >= params.max_iterations {
                    return EigenResult {
                        iterations,
                        ..result
                    };
                }
            }
            if full {
                k.restart(&theta, &s, wanted.block, next, &coupling);
                ritz_at = wanted.block;
                continue;
            }
        }
        k.append(next, &coupling);
    }
}

/// A block Lanczos basis (orthonormal rows) and the operator projected on it, `H = V C Vᵀ`:
/// entries with an applied block are measured, the rest follow from the Lanczos relation.
struct Krylov {
    /// `cap x d`; rows `..len` in use.
    basis: Array2<f64>,
    /// `cap x cap`, symmetric.
    h: Array2<f64>,
    len: usize,
    /// First row of the block the next application takes (rows `active..len`).
    active: usize,
}

impl Krylov {
    fn new(start: Array2<f64>, cap: usize) -> Self {
        let (len, d) = start.dim();
        let cap = cap.max(len);
        let mut basis = Array2::zeros((cap, d));
        basis.slice_mut(s![..len, ..]).assign(&start);
        Krylov {
            basis,
            h: Array2::zeros((cap, cap)),
            len,
            active: 0,
        }
    }

    fn active_block(&self) -> Array2<f64> {
        self.basis.slice(s![self.active..self.len, ..]).to_owned()
    }

    /// Takes `w = Q_active C` (the active block applied): projects it out of the whole basis
    /// twice, recording the projections in H, and orthonormalises what is left into the next
    /// block. Returns that block and its coupling `R` (`next x active`, the H entries between
    /// the two).
    fn extend(&mut self, mut w: Array2<f64>, rng: &mut ChaCha8Rng) -> (Array2<f64>, Array2<f64>) {
        let (len, a, p) = (self.len, self.active, w.nrows());
        let norms: Vec<f64> = w.rows().into_iter().map(|r| r.dot(&r).sqrt()).collect();
        let v = self.basis.slice(s![..len, ..]);
        let mut g = Array2::<f64>::zeros((len, p));
        for _ in 0..2 {
            let pass = v.dot(&w.t());
            w -= &pass.t().dot(&v);
            g += &pass;
        }
        for j in 0..p {
            for i in 0..a {
                self.h[[i, a + j]] = g[[i, j]];
                self.h[[a + j, i]] = g[[i, j]];
            }
            for i in 0..p {
                self.h[[a + i, a + j]] = 0.5 * (g[[a + i, j]] + g[[a + j, i]]);
            }
        }
        orthonormalize_remainder(w, &norms, v, rng)
    }

    /// Appends the next block as the active one.
    fn append(&mut self, next: Array2<f64>, coupling: &Array2<f64>) {
        let (len, a, q) = (self.len, self.active, next.nrows());
        self.basis.slice_mut(s![len..len + q, ..]).assign(&next);
        for ((i, j), &r) in coupling.indexed_iter() {
            self.h[[len + i, a + j]] = r;
            self.h[[a + j, len + i]] = r;
        }
        self.active = len;
        self.len = len + q;
    }

    /// Eigenpairs of the projected matrix, values descending, vectors as columns.
    fn ritz(&self) -> (Vec<f64>, Array2<f64>) {
        symmetric_eigen(&self.h.slice(s![..self.len, ..self.len]).to_owned())
    }

    /// `‖Cy − θy‖` of each Ritz vector `y = sᵀV` by the Lanczos relation: only the part of
    /// `Cy` on the next block, `R s_active`, lies outside the basis.
    fn residual_estimates(&self, coupling: &Array2<f64>, s: &Array2<f64>) -> Vec<f64> {
        let outside = coupling.dot(&s.slice(s![self.active..self.len, ..]));
        outside
            .columns()
            .into_iter()
            .map(|col| col.dot(&col).sqrt())
            .collect()
    }

    /// The first `rows` Ritz vectors, `rows x d`.
    fn ritz_vectors(&self, s: &Array2<f64>, rows: usize) -> Array2<f64> {
        let rows = rows.min(self.len);
        s.slice(s![..self.len, ..rows])
            .t()
            .dot(&self.basis.slice(s![..self.len, ..]))
    }

    /// Thick restart: the basis becomes the first `keep` Ritz vectors (on which H is diagonal)
    /// and the next block, coupled to them through `R s_active`.
    fn restart(
        &mut self,
        theta: &[f64],
        s: &Array2<f64>,
        keep: usize,
        next: Array2<f64>,
        coupling: &Array2<f64>,
    ) {
        let keep = keep.min(self.len);
        let y = self.ritz_vectors(s, keep);
        let tied = coupling.dot(&s.slice(s![self.active..self.len, ..keep]));
        self.h.fill(0.0);
        self.basis.slice_mut(s![..keep, ..]).assign(&y);
        for (i, &t) in theta[..keep].iter().enumerate() {
            self.h[[i, i]] = t;
        }
        self.len = keep;
        self.active = 0;
        self.append(next, &Array2::zeros((0, 0)));
        for ((i, j), &r) in tied.indexed_iter() {
            self.h[[keep + i, j]] = r;
            self.h[[j, keep + i]] = r;
        }
    }

    /// The result from the current Ritz pairs, with the kept vectors' true residuals (one
    /// operator application).
    fn finish(
        &self,
        c: &impl SymmetricOperator,
        theta: &[f64],
        s: &Array2<f64>,
        wanted: &Wanted,
        settled: bool,
        tolerance: f64,
    ) -> EigenResult {
        let block = self.ritz_vectors(s, wanted.block);
        let kept = block.slice(s![..wanted.vectors, ..]).to_owned();
        let max_residual = if wanted.vectors > 0 {
            let applied = c.apply_rows(&kept);
            let scale = residual_scale(theta);
            row_residuals(&kept, &applied, &theta[..wanted.vectors])
                .iter()
                .fold(0.0f64, |m, r| m.max(r / scale))
        } else {
            0.0
        };
        EigenResult {
            eigenvalues: theta[..wanted.values].to_vec(),
            eigenvectors: kept,
            iterations: 0,
            converged: max_residual <= tolerance && settled,
            max_relative_residual: max_residual,
            block,
        }
    }
}

/// Orthonormalises the rows of `w` (already orthogonal to the basis `v`) into new basis rows.
/// `R[i, j]` is row j's coefficient on new row i. A row with nothing new left (a breakdown)
/// is replaced by a fresh random direction orthogonal to everything, with no coefficient;
/// none is added once the rows span the whole space.
fn orthonormalize_remainder(
    w: Array2<f64>,
    norms: &[f64],
    v: ArrayView2<f64>,
    rng: &mut ChaCha8Rng,
) -> (Array2<f64>, Array2<f64>) {
    let (p, d) = w.dim();
    let mut next: Vec<Array1<f64>> = Vec::with_capacity(p);
    let mut r = Array2::<f64>::zeros((p, p));
    for (j, row) in w.rows().into_iter().enumerate() {
        if v.nrows() + next.len() >= d {
            break;
        }
        let mut row = row.to_owned();
        let before = row.dot(&row).sqrt();
        for _ in 0..2 {
            for (i, q) in next.iter().enumerate() {
                let proj = q.dot(&row);
                row.scaled_add(-proj, q);
                r[[i, j]] += proj;
            }
        }
        let mut norm = row.dot(&row).sqrt();
        if norm < 0.5 * before {
            // Much cancelled: once more against everything, or rounding leaves a tilt.
            project_out(&mut row, v, &next);
            norm = row.dot(&row).sqrt();
        }
        if norm > BREAKDOWN * norms[j] && norm > 0.0 {
            r[[next.len(), j]] = norm;
            next.push(row / norm);
        } else if let Some(fresh) = fresh_direction(v, &next, rng) {
            next.push(fresh);
        }
    }
    let q = next.len();
    let mut block = Array2::zeros((q, d));
    for (mut dst, src) in block.rows_mut().into_iter().zip(&next) {
        dst.assign(src);
    }
    (block, r.slice(s![..q, ..]).to_owned())
}

/// Removes from `row` its components on the rows of `v` and on `extra` (one pass).
fn project_out(row: &mut Array1<f64>, v: ArrayView2<f64>, extra: &[Array1<f64>]) {
    let on_basis = v.dot(&row.view());
    *row -= &v.t().dot(&on_basis);
    for q in extra {
        let proj = q.dot(&*row);
        row.scaled_add(-proj, q);
    }
}

/// A seeded random unit vector orthogonal to `v` and `extra`, if one can be found.
fn fresh_direction(
    v: ArrayView2<f64>,
    extra: &[Array1<f64>],
    rng: &mut ChaCha8Rng,
) -> Option<Array1<f64>> {
    let d = v.ncols();
    (0..4).find_map(|_| {
        let mut row = Array1::from_shape_fn(d, |_| standard_normal(rng));
        let before = row.dot(&row).sqrt();
        project_out(&mut row, v, extra);
        project_out(&mut row, v, extra);
        let norm = row.dot(&row).sqrt();
        (norm > 1e-8 * before).then(|| row / norm)
    })
}

/// Eigen-decomposition of a symmetric matrix by Householder reduction to tridiagonal form and
/// implicit QL: O(n³) once, where cyclic Jacobi repeats O(n³) sweeps, so it suits the few
/// hundred rows of a Krylov basis. Returns the eigenvalues in descending order and the
/// eigenvectors as the matching *columns*.
pub fn symmetric_eigen(a: &Array2<f64>) -> (Vec<f64>, Array2<f64>) {
    let n = a.nrows();
    let mut z: Vec<f64> = a.iter().copied().collect();
    let mut diag = vec![0.0; n];
    let mut off = vec![0.0; n];
    householder_tridiagonalize(&mut z, n, &mut diag, &mut off);
    tridiagonal_ql(&mut z, n, &mut diag, &mut off);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| diag[j].total_cmp(&diag[i]));
    let values = order.iter().map(|&i| diag[i]).collect();
    let vectors = Array2::from_shape_fn((n, n), |(r, c)| z[r * n + order[c]]);
    (values, vectors)
}

/// Householder reduction of the row-major symmetric `z` (`n x n`) to tridiagonal form
/// (`diag`, and `off[i]` below the diagonal in row i), leaving the accumulated orthogonal
/// transformation in `z` (after Numerical Recipes' `tred2`).
fn householder_tridiagonalize(z: &mut [f64], n: usize, diag: &mut [f64], off: &mut [f64]) {
    for i in (1..n).rev() {
        let l = i - 1;
        let mut h = 0.0;
        let scale: f64 = (0..i).map(|k| z[i * n + k].abs()).sum();
        if l == 0 || scale == 0.0 {
            off[i] = z[i * n + l];
        } else {
            for k in 0..i {
                z[i * n + k] /= scale;
                h += z[i * n + k] * z[i * n + k];
            }
            let f = z[i * n + l];
            let g = if f >= 0.0 { -h.sqrt() } else { h.sqrt() };
            off[i] = scale * g;
            h -= f * g;
            z[i * n + l] = f - g;
            let mut f = 0.0;
            for j in 0..i {
                z[j * n + i] = z[i * n + j] / h;
                let mut g = 0.0;
                for k in 0..=j {
                    g += z[j * n + k] * z[i * n + k];
                }
                for k in (j + 1)..i {
                    g += z[k * n + j] * z[i * n + k];
                }
                off[j] = g / h;
                f += off[j] * z[i * n + j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                let f = z[i * n + j];
                let g = off[j] - hh * f;
                off[j] = g;
                for k in 0..=j {
                    z[j * n + k] -= f * off[k] + g * z[i * n + k];
                }
            }
        }
        diag[i] = h;
    }
    if n > 0 {
        diag[0] = 0.0;
        off[0] = 0.0;
    }
    for i in 0..n {
        if diag[i] != 0.0 {
            for j in 0..i {
                let g: f64 = (0..i).map(|k| z[i * n + k] * z[k * n + j]).sum();
                for k in 0..i {
                    z[k * n + j] -= g * z[k * n + i];
                }
            }
        }
        diag[i] = z[i * n + i];
        z[i * n + i] = 1.0;
        for j in 0..i {
            z[j * n + i] = 0.0;
            z[i * n + j] = 0.0;
        }
    }
}

/// Eigenvalues (into `diag`) and eigenvectors (rotating the columns of `z`) of the symmetric
/// tridiagonal matrix `diag`/`off` by QL with implicit shifts (Numerical Recipes' `tqli`).
fn tridiagonal_ql(z: &mut [f64], n: usize, diag: &mut [f64], off: &mut [f64]) {
    if n == 0 {
        return;
    }
    off.copy_within(1.., 0);
    off[n - 1] = 0.0;
    for l in 0..n {
        for _ in 0..QL_MAX_SWEEPS {
            let m = (l..n - 1)
                .find(|&m| off[m].abs() <= f64::EPSILON * (diag[m].abs() + diag[m + 1].abs()))
                .unwrap_or(n - 1);
            if m == l {
                break;
            }
            let g = (diag[l + 1] - diag[l]) / (2.0 * off[l]);
            let r = g.hypot(1.0);
            let mut g = diag[m] - diag[l] + off[l] / (g + if g >= 0.0 { r } else { -r });
            let (mut s, mut c, mut p) = (1.0, 1.0, 0.0);
            let mut underflow = false;
            for i in (l..m).rev() {
                let f = s * off[i];
                let b = c * off[i];
                let r = f.hypot(g);
                off[i + 1] = r;
                if r == 0.0 {
                    diag[i + 1] -= p;
                    off[m] = 0.0;
                    underflow = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = diag[i + 1] - p;
                let r = (diag[i] - g) * s + 2.0 * c * b;
                p = s * r;
                diag[i + 1] = g + p;
                g = c * r - b;
                for k in 0..n {
                    let f = z[k * n + i + 1];
                    z[k * n + i + 1] = s * z[k * n + i] + c * f;
                    z[k * n + i] = c * z[k * n + i] - s * f;
                }
            }
            if underflow {
                continue;
            }
            diag[l] -= p;
            off[l] = g;
            off[m] = 0.0;
        }
    }
}

/// QL sweeps per eigenvalue before giving up on it (a handful suffice in practice).
const QL_MAX_SWEEPS: usize = 60;

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

    #[test]
    fn householder_ql_matches_jacobi() {
        for (d, seed) in [(1, 4), (2, 5), (17, 6), (64, 7)] {
            let a = random_symmetric_psd(d, seed);
            let (values, vectors) = symmetric_eigen(&a);
            let (exact, _) = jacobi_eigen(&a);
            for (v, e) in values.iter().zip(&exact) {
                assert!(
                    (v - e).abs() <= 1e-12 * exact[0].abs().max(1.0),
                    "{v} vs {e}"
                );
            }
            let lambda = Array2::from_diag(&Array1::from(values.clone()));
            let back = vectors.dot(&lambda).dot(&vectors.t());
            let err = (&back - &a).iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert!(err < 1e-10, "reconstruction error {err}");
        }
    }

    #[test]
    fn lanczos_converges_on_a_low_rank_matrix_and_restarts() {
        // Rank 7 in 300 dimensions: breakdowns and zero eigenvalues in the curve.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let x = Array2::from_shape_fn((7, 300), |_| standard_normal(&mut rng));
        check_lanczos(&x.t().dot(&x), 300);
        // Full rank, slowly decaying: thick restarts (a Ritz block of 50 in 80 rows at most).
        check_lanczos(&random_symmetric_psd(200, 10), 80);
    }

    #[test]
    fn a_cold_solve_with_few_iterations_stays_within_them() {
        let a = random_symmetric_psd(80, 11);
        let params = EigenParams {
            vectors: 10,
            values: 30,
            oversample: 10,
            tolerance: 1e-12,
            max_iterations: 3,
            seed: 12,
        };
        let result = top_eigenpairs(&a.view(), None, &params);
        assert!(result.iterations <= 3);
        assert_eq!(result.eigenvalues.len(), 30);
    }

    fn check_lanczos(a: &Array2<f64>, cap: usize) {
        let d = a.nrows();
        let (exact, _) = jacobi_eigen(a);
        let params = EigenParams {
            vectors: 5,
            values: 40,
            oversample: 10,
            tolerance: 1e-10,
            max_iterations: 500,
            seed: 9,
        };
        let wanted = Wanted {
            values: 40,
            vectors: 5,
            block: 50,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        let start = start_block(None, LANCZOS_BLOCK, d, &mut rng);
        let result = lanczos(&a.view(), start, &wanted, &params, cap, &mut rng);
        assert_eq!(result.block.dim(), (50, d));
        assert!(
            result.converged,
            "residual {}",
            result.max_relative_residual
        );
        for i in 0..40 {
            assert!((result.eigenvalues[i] - exact[i]).abs() <= 1e-9 * exact[0]);
        }
        for row in result.eigenvectors.rows() {
            let applied = a.dot(&row);
            let theta = row.dot(&applied);
            let r = &applied - &(&row * theta);
            assert!(r.dot(&r).sqrt() <= 1e-9 * exact[0]);
        }
    }
}
