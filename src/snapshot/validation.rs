//! Cluster validation and description on the full user x item matrix: multinomial Naive Bayes
//! (alpha = 1) trained on the cluster labels, and TF-IDF cluster profiles following
//! scikit-learn's `TfidfTransformer` defaults (smooth idf, l2-normalised rows).
//! Pure functions of user vectors and labels, so they can be checked against scikit-learn
//! with scikit-learn's own labels.

use crate::engine::{CowVec, NO_CLUSTER, SparseVec};

/// Document frequency of every item (users with a non-zero value), over `d` items.
pub fn document_frequency(vectors: &CowVec<SparseVec>, d: usize) -> Vec<u64> {
    let mut df = vec![0u64; d];
    for x in vectors {
        for &j in &x.idx {
            df[j as usize] += 1;
        }
    }
    df
}

/// Per-cluster TF-IDF profiles: `profile[c][j]` is the mean over members of `c` of their
/// l2-normalised tf-idf row, `idf_j = ln((1 + n) / (1 + df_j)) + 1` with `n` = users with a
/// rating. Also returns, per cluster and item, the members' rating sum and raters count.
pub struct Profiles {
    pub k: usize,
    pub d: usize,
    /// `k x d`, row-major.
    pub scores: Vec<f64>,
    pub rating_sums: Vec<f64>,
    pub raters: Vec<u32>,
    pub sizes: Vec<u64>,
    pub idf: Vec<f64>,
    /// Items with at least one rating (the columns of the batch recipe's matrix).
    pub rated_items: u64,
}

impl Profiles {
    pub fn score(&self, c: usize, j: usize) -> f64 {
        self.scores[c * self.d + j]
    }
    /// Items of cluster `c` ordered by score descending (ties: lower index first), non-zero only.
    pub fn ranked(&self, c: usize) -> Vec<usize> {
        let row = &self.scores[c * self.d..(c + 1) * self.d];
        let mut order: Vec<usize> = (0..self.d).filter(|&j| row[j] > 0.0).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        order
    }
    pub fn mean_rating(&self, c: usize, j: usize) -> Option<f64> {
        let n = self.raters[c * self.d + j];
        (n > 0).then(|| self.rating_sums[c * self.d + j] / n as f64)
    }
}

pub fn tfidf_profiles(vectors: &CowVec<SparseVec>, labels: &[u32], k: usize, d: usize) -> Profiles {
    let df = document_frequency(vectors, d);
    let n = vectors.iter().filter(|x| x.nnz() > 0).count() as f64;
    let idf: Vec<f64> = df
        .iter()
        .map(|&f| ((1.0 + n) / (1.0 + f as f64)).ln() + 1.0)
        .collect();
    let mut scores = vec![0.0; k * d];
    let mut rating_sums = vec![0.0; k * d];
    let mut raters = vec![0u32; k * d];
    let mut sizes = vec![0u64; k];
    for (x, &label) in vectors.iter().zip(labels) {
        if label == NO_CLUSTER || x.nnz() == 0 || label as usize >= k {
            continue;
        }
        let c = label as usize;
        sizes[c] += 1;
        let norm = x
            .iter()
            .map(|(j, v)| (v * idf[j as usize]).powi(2))
            .sum::<f64>()
            .sqrt();
        for (j, v) in x.iter() {
            let j = j as usize;
            if norm > 0.0 {
                scores[c * d + j] += v * idf[j] / norm;
            }
            rating_sums[c * d + j] += v;
            raters[c * d + j] += 1;
        }
    }
    for c in 0..k {
        if sizes[c] > 0 {
            let inv = 1.0 / sizes[c] as f64;
            scores[c * d..(c + 1) * d]
                .iter_mut()
                .for_each(|s| *s *= inv);
        }
    }
    Profiles {
        k,
        d,
        scores,
        rating_sums,
        raters,
        sizes,
        idf,
        rated_items: df.iter().filter(|&&f| f > 0).count() as u64,
    }
}

/// A fitted multinomial Naive Bayes over the items with at least one rating.
pub struct NaiveBayes {
    k: usize,
    d: usize,
    /// `k x d` log feature probabilities; `-inf` rows for classes absent from training.
    log_prob: Vec<f64>,
    log_prior: Vec<f64>,
    /// The factor turning stored values into the true ones (see [`NaiveBayes::fit_scaled`]).
    value_scale: f64,
}

impl NaiveBayes {
    /// Fits on the users for which `train(u)` is true (alpha = 1, as `MultinomialNB()`).
    /// Features are the items with a rating anywhere in `vectors` (scikit-learn's columns).
    pub fn fit(
        vectors: &CowVec<SparseVec>,
        labels: &[u32],
        k: usize,
        d: usize,
        train: impl Fn(usize) -> bool,
    ) -> NaiveBayes {
        Self::fit_scaled(vectors, labels, k, d, 1.0, train)
    }

    /// [`NaiveBayes::fit`] on the values of `vectors` times `value_scale`, which [`predict`]
    /// applies too: a decaying engine stores its values scaled by one global factor, and unlike
    /// PCA and K-Means, Naive Bayes (its smoothing, its prior against the evidence) depends on
    /// the scale, so it must see the true decayed values.
    ///
    /// [`predict`]: NaiveBayes::predict
    pub fn fit_scaled(
        vectors: &CowVec<SparseVec>,
        labels: &[u32],
        k: usize,
        d: usize,
        value_scale: f64,
        train: impl Fn(usize) -> bool,
    ) -> NaiveBayes {
        let df = document_frequency(vectors, d);
        let features = df.iter().filter(|&&f| f > 0).count() as f64;
        let mut counts = vec![0.0; k * d];
        let mut class_counts = vec![0.0; k];
        for (u, (x, &label)) in vectors.iter().zip(labels).enumerate() {
            if label == NO_CLUSTER || x.nnz() == 0 || label as usize >= k || !train(u) {
                continue;
            }
            let c = label as usize;
            class_counts[c] += 1.0;
            for (j, v) in x.iter() {
                counts[c * d + j as usize] += v * value_scale;
            }
        }
        let total: f64 = class_counts.iter().sum();
        let mut log_prob = vec![f64::NEG_INFINITY; k * d];
        let mut log_prior = vec![f64::NEG_INFINITY; k];
        for c in 0..k {
            if class_counts[c] == 0.0 {
                continue;
            }
            log_prior[c] = class_counts[c].ln() - total.ln();
            let row_total: f64 = (0..d)
                .filter(|&j| df[j] > 0)
                .map(|j| counts[c * d + j] + 1.0)
                .sum();
            debug_assert!(
                (row_total - (counts[c * d..(c + 1) * d].iter().sum::<f64>() + features)).abs()
                    < 1e-6 * row_total
            );
            let log_total = row_total.ln();
            for j in 0..d {
                log_prob[c * d + j] = (counts[c * d + j] + 1.0).ln() - log_total;
            }
        }
        NaiveBayes {
            k,
            d,
            log_prob,
            log_prior,
            value_scale,
        }
    }

    /// The most likely class (the first on ties, like scikit-learn's argmax).
    pub fn predict(&self, x: &SparseVec) -> u32 {
        let mut best = (0u32, f64::NEG_INFINITY);
        for c in 0..self.k {
            if self.log_prior[c] == f64::NEG_INFINITY {
                continue;
            }
            let row = &self.log_prob[c * self.d..(c + 1) * self.d];
            let jll = self.log_prior[c]
                + x.iter()
                    .map(|(j, v)| v * self.value_scale * row[j as usize])
                    .sum::<f64>();
            if jll > best.1 {
                best = (c as u32, jll);
            }
        }
        best.0
    }
}

/// Naive Bayes validation figures for one labelling.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NaiveBayesReport {
    /// Share of users whose NB prediction (trained on everyone) equals their cluster.
    #[serde(deserialize_with = "crate::nullable::float")]
    pub train_agreement: f64,
    /// Share of held-out users (not in the fit) whose prediction equals their cluster.
    pub holdout_agreement: Option<f64>,
    pub holdout_users: u64,
    /// `confusion_matrix[cluster][predicted]` on the training fit.
    pub confusion_matrix: Vec<Vec<u64>>,
}

/// Fits NB on everyone (train agreement, confusion matrix) and on everyone but the held-out
/// users (`holdout(u)` true) for the holdout agreement, on the stored values times `value_scale`.
pub fn naive_bayes_report(
    vectors: &CowVec<SparseVec>,
    labels: &[u32],
    k: usize,
    d: usize,
    value_scale: f64,
    holdout: impl Fn(usize) -> bool,
) -> NaiveBayesReport {
    let labelled = |u: usize| labels[u] != NO_CLUSTER && vectors[u].nnz() > 0;
    let full = NaiveBayes::fit_scaled(vectors, labels, k, d, value_scale, |_| true);
    let mut confusion = vec![vec![0u64; k]; k];
    let mut agree = 0u64;
    let mut total = 0u64;
    for u in (0..vectors.len()).filter(|&u| labelled(u)) {
        let p = full.predict(&vectors[u]);
        confusion[labels[u] as usize][p as usize] += 1;
        total += 1;
        agree += u64::from(p == labels[u]);
    }
    let partial = NaiveBayes::fit_scaled(vectors, labels, k, d, value_scale, |u| !holdout(u));
    let held: Vec<usize> = (0..vectors.len())
        .filter(|&u| labelled(u) && holdout(u))
        .collect();
    let held_agree = held
        .iter()
        .filter(|&&u| partial.predict(&vectors[u]) == labels[u])
        .count();
    NaiveBayesReport {
        train_agreement: if total > 0 {
            agree as f64 / total as f64
        } else {
            0.0
        },
        holdout_agreement: (!held.is_empty()).then(|| held_agree as f64 / held.len() as f64),
        holdout_users: held.len() as u64,
        confusion_matrix: confusion,
    }
}

/// A stable 64-bit FNV-1a hash (deterministic across runs and platforms), for hold-out splits
/// and samples.
pub fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche so that nearby ids spread over the range.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sv(pairs: &[(u32, f64)]) -> SparseVec {
        SparseVec {
            idx: pairs.iter().map(|p| p.0).collect(),
            val: pairs.iter().map(|p| p.1).collect(),
        }
    }

    #[test]
    fn tfidf_matches_hand_computation() {
        // Two users, one cluster. idf: item0 df=2 → ln(3/3)+1 = 1; item1 df=1 → ln(3/2)+1.
        let vectors = vec![sv(&[(0, 1.0), (1, 2.0)]), sv(&[(0, 3.0)])];
        let p = tfidf_profiles(&vectors.into(), &[0, 0], 1, 2);
        let idf1 = (1.5f64).ln() + 1.0;
        let norm = (1.0 + (2.0 * idf1).powi(2)).sqrt();
        assert!((p.score(0, 0) - (1.0 / norm + 1.0) / 2.0).abs() < 1e-15);
        assert!((p.score(0, 1) - (2.0 * idf1 / norm) / 2.0).abs() < 1e-15);
        assert_eq!(p.mean_rating(0, 0), Some(2.0));
    }

    #[test]
    fn naive_bayes_separates_disjoint_tastes() {
        let vectors = vec![
            sv(&[(0, 5.0), (1, 4.0)]),
            sv(&[(0, 4.0)]),
            sv(&[(2, 5.0), (3, 5.0)]),
            sv(&[(3, 3.0)]),
        ];
        let labels = [0, 0, 1, 1];
        let r = naive_bayes_report(&vectors.into(), &labels, 2, 4, 1.0, |u| u == 3);
        assert_eq!(r.train_agreement, 1.0);
        assert_eq!(r.confusion_matrix, vec![vec![2, 0], vec![0, 2]]);
        assert_eq!(r.holdout_users, 1);
        assert_eq!(r.holdout_agreement, Some(1.0));
    }
}
