//! Per-segment sums of the users' vectors: what Naive Bayes validation and the cluster profiles
//! need, kept exact as events change cells and users change segments, and mergeable (sums over
//! disjoint sets of users add up to the sums over their union).
//!
//! A snapshot reads them instead of passing over every rating: after a delta of events the
//! sums under the previous snapshot's segments are already up to date (each changed cell
//! moved them by `δ`), and only the users the new snapshot puts in another segment are moved,
//! O(their ratings). Every sum is over the users whose vector is non-empty ("members"); a
//! member is *held out* (of the Naive Bayes fit for its holdout agreement) by a hash of its id.

use super::{CowVec, NO_CLUSTER, SparseVec};

/// Sums over the members of each of `k` segments, item-major (`[j * k + c]`) so that one
/// item's figures for every segment are contiguous (Naive Bayes scores a user segment by
/// segment for each of its items).
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentSums {
    k: usize,
    /// `Σ x_uj` over the members of `c`.
    values: Vec<f64>,
    /// The same over the held-out members only.
    held_values: Vec<f64>,
    /// Members of `c` with a non-zero value for `j`.
    raters: Vec<u32>,
    sizes: Vec<u64>,
    held_sizes: Vec<u64>,
}

impl SegmentSums {
    pub fn new(k: usize) -> Self {
        SegmentSums {
            k,
            values: vec![],
            held_values: vec![],
            raters: vec![],
            sizes: vec![0; k],
            held_sizes: vec![0; k],
        }
    }

    /// The sums of `vectors` under `labels` (by user index; [`NO_CLUSTER`] and users past
    /// `labels` belong to no segment), over `items` items, `held(u)` saying who is held out.
    pub fn from_scratch(
        vectors: &CowVec<SparseVec>,
        labels: &[u32],
        k: usize,
        items: usize,
        held: impl Fn(usize) -> bool,
    ) -> Self {
        let mut sums = SegmentSums::new(k);
        sums.ensure_items(items);
        for (u, (x, &label)) in vectors.iter().zip(labels).enumerate() {
            sums.add(label, x, held(u));
        }
        sums
    }

    pub fn k(&self) -> usize {
        self.k
    }
    /// Items covered (the sums of items past it are zero).
    pub fn items(&self) -> usize {
        self.raters.len() / self.k.max(1)
    }

    /// Covers at least `items` items.
    pub fn ensure_items(&mut self, items: usize) {
        if items * self.k > self.values.len() {
            self.values.resize(items * self.k, 0.0);
            self.held_values.resize(items * self.k, 0.0);
            self.raters.resize(items * self.k, 0);
        }
    }

    fn segment(&self, label: u32) -> Option<usize> {
        (label != NO_CLUSTER && (label as usize) < self.k).then_some(label as usize)
    }

    /// Adds user vector `x` to segment `label` (nothing for an empty vector or no segment).
    pub fn add(&mut self, label: u32, x: &SparseVec, held: bool) {
        self.shift(label, x, held, 1.0);
    }

    /// Removes what [`SegmentSums::add`] added.
    pub fn remove(&mut self, label: u32, x: &SparseVec, held: bool) {
        self.shift(label, x, held, -1.0);
    }

    fn shift(&mut self, label: u32, x: &SparseVec, held: bool, sign: f64) {
        let Some(c) = self.segment(label) else {
            return;
        };
        if x.nnz() == 0 {
            return;
        }
        if let Some(&last) = x.idx.last() {
            self.ensure_items(last as usize + 1);
        }
        let k = self.k;
        for (j, v) in x.iter() {
            let at = j as usize * k + c;
            self.values[at] += sign * v;
            if held {
                self.held_values[at] += sign * v;
            }
            if sign > 0.0 {
                self.raters[at] += 1;
            } else {
                self.raters[at] -= 1;
            }
        }
        if sign > 0.0 {
            self.sizes[c] += 1;
            self.held_sizes[c] += u64::from(held);
        } else {
            self.sizes[c] -= 1;
            self.held_sizes[c] -= u64::from(held);
        }
    }

    /// Moves a member from one segment to another (either may be none).
    pub fn move_user(&mut self, from: u32, to: u32, x: &SparseVec, held: bool) {
        if from != to {
            self.remove(from, x, held);
            self.add(to, x, held);
        }
    }

    /// The segments change from `from` to `to` (labels by user index; missing ones are no
    /// segment): every user of `vectors` whose segment differs is moved, O(their ratings).
    pub fn follow(
        &mut self,
        from: &[u32],
        to: &[u32],
        vectors: &CowVec<SparseVec>,
        held: impl Fn(usize) -> bool,
    ) {
        for (u, x) in vectors.iter().enumerate() {
            let before = from.get(u).copied().unwrap_or(NO_CLUSTER);
            let after = to.get(u).copied().unwrap_or(NO_CLUSTER);
            if before != after {
                self.move_user(before, after, x, held(u));
            }
        }
    }

    /// Cell `j` of a user in segment `label` went from `old` to `new`; the user's vector was
    /// non-empty before (`was_active`) and is after (`now_active`).
    #[allow(clippy::too_many_arguments)]
    pub fn cell_changed(
        &mut self,
        label: u32,
        held: bool,
        j: u32,
        old: f64,
        new: f64,
        was_active: bool,
        now_active: bool,
    ) {
        let Some(c) = self.segment(label) else {
            return;
        };
        self.ensure_items(j as usize + 1);
        let at = j as usize * self.k + c;
        self.values[at] += new - old;
        if held {
            self.held_values[at] += new - old;
        }
        match (old == 0.0, new == 0.0) {
            (true, false) => self.raters[at] += 1,
            (false, true) => self.raters[at] -= 1,
            _ => {}
        }
        match (was_active, now_active) {
            (false, true) => {
                self.sizes[c] += 1;
                self.held_sizes[c] += u64::from(held);
            }
            (true, false) => {
                self.sizes[c] -= 1;
                self.held_sizes[c] -= u64::from(held);
            }
            _ => {}
        }
    }

    /// Every stored value was multiplied by `factor` (a decay rebase: a power of two, so the
    /// sums scale exactly).
    pub fn rescale(&mut self, factor: f64) {
        self.values.iter_mut().for_each(|v| *v *= factor);
        self.held_values.iter_mut().for_each(|v| *v *= factor);
    }

    /// Adds the sums over another, disjoint set of users (another instance's partial).
    pub fn merge(&mut self, other: &SegmentSums) {
        assert_eq!(self.k, other.k, "merging sums of different segment counts");
        self.ensure_items(other.items());
        for (a, b) in self.values.iter_mut().zip(&other.values) {
            *a += b;
        }
        for (a, b) in self.held_values.iter_mut().zip(&other.held_values) {
            *a += b;
        }
        for (a, b) in self.raters.iter_mut().zip(&other.raters) {
            *a += b;
        }
        for c in 0..self.k {
            self.sizes[c] += other.sizes[c];
            self.held_sizes[c] += other.held_sizes[c];
        }
    }

    /// The sums as floats, to travel bit for bit to another instance: values, held values,
    /// raters (each `items x k`), then sizes and held sizes (`k` each).
    pub fn to_floats(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(3 * self.values.len() + 2 * self.k);
        out.extend_from_slice(&self.values);
        out.extend_from_slice(&self.held_values);
        out.extend(self.raters.iter().map(|&r| f64::from(r)));
        out.extend(self.sizes.iter().map(|&s| s as f64));
        out.extend(self.held_sizes.iter().map(|&s| s as f64));
        out
    }

    /// What [`SegmentSums::to_floats`] wrote for `k` segments; `None` when the length does not
    /// fit.
    pub fn from_floats(k: usize, floats: &[f64]) -> Option<SegmentSums> {
        let cells = floats.len().checked_sub(2 * k)?;
        if k == 0 || !cells.is_multiple_of(3 * k) {
            return None;
        }
        let n = cells / 3;
        let count = |x: f64| x.max(0.0) as u64;
        Some(SegmentSums {
            k,
            values: floats[..n].to_vec(),
            held_values: floats[n..2 * n].to_vec(),
            raters: floats[2 * n..3 * n]
                .iter()
                .map(|&r| count(r) as u32)
                .collect(),
            sizes: floats[3 * n..3 * n + k].iter().map(|&s| count(s)).collect(),
            held_sizes: floats[3 * n + k..].iter().map(|&s| count(s)).collect(),
        })
    }

    /// `Σ x_uj` over the members of `c` (held-out ones too).
    pub fn value(&self, c: usize, j: usize) -> f64 {
        self.values.get(j * self.k + c).copied().unwrap_or(0.0)
    }
    /// `Σ x_uj` over the held-out members of `c`.
    pub fn held_value(&self, c: usize, j: usize) -> f64 {
        self.held_values.get(j * self.k + c).copied().unwrap_or(0.0)
    }
    /// Members of `c` rating `j`.
    pub fn raters(&self, c: usize, j: usize) -> u32 {
        self.raters.get(j * self.k + c).copied().unwrap_or(0)
    }
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }
    pub fn held_sizes(&self) -> &[u64] {
        &self.held_sizes
    }
    /// Members rating each of the first `items` items (document frequency over the members).
    pub fn document_frequency(&self, items: usize) -> Vec<u64> {
        (0..items)
            .map(|j| {
                self.raters
                    .get(j * self.k..(j + 1) * self.k)
                    .map_or(0, |r| r.iter().map(|&n| u64::from(n)).sum())
            })
            .collect()
    }

    /// The largest difference from `other`, relative to the largest magnitude of each kind of
    /// sum (0 when equal; counts must match exactly or the result is infinite).
    pub fn max_relative_difference(&self, other: &SegmentSums) -> f64 {
        let items = self.items().max(other.items());
        let counts_match = self.sizes == other.sizes
            && self.held_sizes == other.held_sizes
            && (0..items).all(|j| (0..self.k).all(|c| self.raters(c, j) == other.raters(c, j)));
        if !counts_match || self.k != other.k {
            return f64::INFINITY;
        }
        let relative = |get: &dyn Fn(&SegmentSums, usize, usize) -> f64| {
            let mut scale = 0.0f64;
            let mut diff = 0.0f64;
            for j in 0..items {
                for c in 0..self.k {
                    let (a, b) = (get(self, c, j), get(other, c, j));
                    scale = scale.max(a.abs()).max(b.abs());
                    diff = diff.max((a - b).abs());
                }
            }
            if scale > 0.0 { diff / scale } else { diff }
        };
        relative(&|s, c, j| s.value(c, j)).max(relative(&|s, c, j| s.held_value(c, j)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_vectors(users: usize, items: u32, rng: &mut ChaCha8Rng) -> Vec<SparseVec> {
        (0..users)
            .map(|_| {
                let mut idx: Vec<u32> = (0..items).filter(|_| rng.random_bool(0.2)).collect();
                idx.dedup();
                let val = idx.iter().map(|_| rng.random_range(1..=5) as f64).collect();
                SparseVec { idx, val }
            })
            .collect()
    }

    #[test]
    fn partials_over_disjoint_users_merge_into_the_whole() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let vectors: CowVec<SparseVec> = random_vectors(300, 40, &mut rng).into();
        let labels: Vec<u32> = (0..300)
            .map(|u| {
                if u % 17 == 0 {
                    NO_CLUSTER
                } else {
                    rng.random_range(0..6)
                }
            })
            .collect();
        let held = |u: usize| u.is_multiple_of(5);
        let whole = SegmentSums::from_scratch(&vectors, &labels, 6, 40, held);
        // Two "instances", each owning every other user.
        let own = |parity: usize| -> Vec<u32> {
            labels
                .iter()
                .enumerate()
                .map(|(u, &l)| if u % 2 == parity { l } else { NO_CLUSTER })
                .collect()
        };
        let mut merged = SegmentSums::from_scratch(&vectors, &own(0), 6, 40, held);
        merged.merge(&SegmentSums::from_scratch(&vectors, &own(1), 6, 40, held));
        assert_eq!(merged.sizes(), whole.sizes());
        assert!(merged.max_relative_difference(&whole) <= 1e-12);
        let df = whole.document_frequency(40);
        assert!(df.iter().any(|&f| f > 0));
        assert_eq!(df, merged.document_frequency(40));
    }

    #[test]
    fn moving_users_matches_sums_from_scratch() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let vectors: CowVec<SparseVec> = random_vectors(200, 30, &mut rng).into();
        let mut labels: Vec<u32> = (0..200).map(|_| rng.random_range(0..4)).collect();
        let held = |u: usize| u.is_multiple_of(3);
        let mut sums = SegmentSums::from_scratch(&vectors, &labels, 4, 30, held);
        for _ in 0..500 {
            let u = rng.random_range(0..200);
            let to = if rng.random_bool(0.1) {
                NO_CLUSTER
            } else {
                rng.random_range(0..4)
            };
            sums.move_user(labels[u], to, &vectors[u], held(u));
            labels[u] = to;
        }
        let fresh = SegmentSums::from_scratch(&vectors, &labels, 4, 30, held);
        assert!(sums.max_relative_difference(&fresh) <= 1e-12);
        let other = SegmentSums::from_scratch(&vectors, &vec![0; 200], 4, 30, held);
        assert!(sums.max_relative_difference(&other).is_infinite());
    }
}
