//! Comparing clusterings: the Hungarian assignment that keeps cluster ids stable across
//! refreshes (maximum member overlap), and the adjusted Rand index used for drift and for
//! checking recovery of planted segments.

use rustc_hash::FxHashMap;

/// Minimum-cost perfect assignment on a square `n x n` cost matrix (row-major). Returns, for
/// each row, its column. O(n³) (Kuhn–Munkres with potentials).
pub fn hungarian_min_cost(cost: &[f64], n: usize) -> Vec<usize> {
    let inf = f64::INFINITY;
    let mut u = vec![0.0; n + 1];
    let mut v = vec![0.0; n + 1];
    let mut p = vec![0usize; n + 1];
    let mut way = vec![0usize; n + 1];
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0;
        let mut minv = vec![inf; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = inf;
            let mut j1 = 0;
            for j in 1..=n {
                if !used[j] {
                    let cur = cost[(i0 - 1) * n + (j - 1)] - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut assignment = vec![0usize; n];
    for j in 1..=n {
        if p[j] > 0 {
            assignment[p[j] - 1] = j - 1;
        }
    }
    assignment
}

/// Renames the `k` labels of `new` so they overlap `previous` as much as possible
/// (`u32::MAX` in `previous` means "no previous label"). Returns `mapping[new_label] = id`.
pub fn match_labels(new: &[u32], previous: &[u32], k: usize) -> Vec<u32> {
    let mut overlap = vec![0.0; k * k];
    for (&a, &b) in new.iter().zip(previous) {
        if (a as usize) < k && (b as usize) < k {
            overlap[a as usize * k + b as usize] += 1.0;
        }
    }
    match_overlap(&overlap, k)
}

/// [`match_labels`] from the overlap counts: `overlap[new * k + previous]` users (sums over
/// disjoint sets of users add up). Returns `mapping[new_label] = id`.
pub fn match_overlap(overlap: &[f64], k: usize) -> Vec<u32> {
    let cost: Vec<f64> = overlap.iter().map(|o| -o).collect();
    hungarian_min_cost(&cost, k)
        .into_iter()
        .map(|c| c as u32)
        .collect()
}

fn comb2(x: f64) -> f64 {
    x * (x - 1.0) / 2.0
}

/// Adjusted Rand index of two labelings of the same points (Hubert & Arabie). 1 for identical
/// partitions up to renaming, about 0 for independent ones. Two trivial partitions give 1.
pub fn adjusted_rand_index(a: &[u32], b: &[u32]) -> f64 {
    let mut table: FxHashMap<(u32, u32), u64> = FxHashMap::default();
    for (&x, &y) in a.iter().zip(b) {
        *table.entry((x, y)).or_default() += 1;
    }
    let mut cells: Vec<((u32, u32), u64)> = table.into_iter().collect();
    cells.sort_unstable();
    adjusted_rand_index_of_table(&cells)
}

/// [`adjusted_rand_index`] from the contingency table: the points in each `(a label, b label)`
/// pair (what instances holding disjoint sets of points can count and add up).
pub fn adjusted_rand_index_of_table(cells: &[((u32, u32), u64)]) -> f64 {
    let n: u64 = cells.iter().map(|(_, c)| c).sum();
    if n < 2 {
        return 1.0;
    }
    let mut rows: FxHashMap<u32, f64> = FxHashMap::default();
    let mut cols: FxHashMap<u32, f64> = FxHashMap::default();
    for &((x, y), c) in cells {
        *rows.entry(x).or_default() += c as f64;
        *cols.entry(y).or_default() += c as f64;
    }
    let index: f64 = cells.iter().map(|&(_, c)| comb2(c as f64)).sum();
    let sum_rows: f64 = rows.values().map(|&c| comb2(c)).sum();
    let sum_cols: f64 = cols.values().map(|&c| comb2(c)).sum();
    let expected = sum_rows * sum_cols / comb2(n as f64);
    let max_index = 0.5 * (sum_rows + sum_cols);
    if (max_index - expected).abs() < f64::EPSILON {
        return 1.0;
    }
    (index - expected) / (max_index - expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hungarian_finds_the_cheapest_assignment() {
        // Optimum: 0->1, 1->0, 2->2 with cost 1 + 2 + 2 = 5.
        let cost = [4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 3.0, 2.0, 2.0];
        assert_eq!(hungarian_min_cost(&cost, 3), vec![1, 0, 2]);
    }

    #[test]
    fn relabelled_clustering_maps_back_to_previous_ids() {
        let previous = [0, 0, 1, 1, 2, 2];
        let new = [2, 2, 0, 0, 1, 1];
        let mapping = match_labels(&new, &previous, 3);
        let renamed: Vec<u32> = new.iter().map(|&l| mapping[l as usize]).collect();
        assert_eq!(renamed, previous);
    }

    #[test]
    fn ari_matches_known_values() {
        assert!((adjusted_rand_index(&[0, 0, 1, 1], &[1, 1, 0, 0]) - 1.0).abs() < 1e-12);
        // sklearn.metrics.adjusted_rand_score([0, 0, 1, 2], [0, 0, 1, 1]) == 0.5714285714285715
        let ari = adjusted_rand_index(&[0, 0, 1, 2], &[0, 0, 1, 1]);
        assert!((ari - 0.5714285714285715).abs() < 1e-12, "{ari}");
    }
}
