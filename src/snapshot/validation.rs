//! Cluster validation and description on the full user x item matrix: multinomial Naive Bayes
//! (alpha = 1) trained on the cluster labels, and TF-IDF cluster profiles following
//! scikit-learn's `TfidfTransformer` defaults (smooth idf, l2-normalised rows).
//! Pure functions of user vectors and labels, so they can be checked against scikit-learn
//! with scikit-learn's own labels.

use crate::engine::{CowVec, NO_CLUSTER, SegmentSums, SparseVec};

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
    let sums = SegmentSums::from_scratch(vectors, labels, k, d, |_| false);
    tfidf_profiles_from_sums(vectors, labels, &sums, d)
}

/// [`tfidf_profiles`] from the segments' sums (rating sums, raters, sizes and document
/// frequencies come from them); the l2 norm of each member's tf-idf row depends on every idf,
/// so the scores still take one pass over the members' ratings.
pub fn tfidf_profiles_from_sums(
    vectors: &CowVec<SparseVec>,
    labels: &[u32],
    sums: &SegmentSums,
    d: usize,
) -> Profiles {
    let idf = smooth_idf(sums, d);
    let scores = tfidf_score_sums(vectors.iter().zip(labels.iter().copied()), &idf, sums.k());
    profiles_from_parts(sums, idf, scores)
}

/// scikit-learn's smooth idf of every item over the segments' members:
/// `ln((1 + n) / (1 + df_j)) + 1`.
pub fn smooth_idf(sums: &SegmentSums, d: usize) -> Vec<f64> {
    let n = sums.sizes().iter().sum::<u64>() as f64;
    sums.document_frequency(d)
        .iter()
        .map(|&f| ((1.0 + n) / (1.0 + f as f64)).ln() + 1.0)
        .collect()
}

/// Per segment (`k x d`, row-major), the sum of its members' l2-normalised tf-idf rows under
/// `idf`: what [`profiles_from_parts`] averages. Sums over disjoint sets of users add up.
pub fn tfidf_score_sums<'a>(
    rows: impl Iterator<Item = (&'a SparseVec, u32)>,
    idf: &[f64],
    k: usize,
) -> Vec<f64> {
    let d = idf.len();
    let mut scores = vec![0.0; k * d];
    for (x, label) in rows {
        if label == NO_CLUSTER || x.nnz() == 0 || label as usize >= k {
            continue;
        }
        let c = label as usize;
        let norm = x
            .iter()
            .map(|(j, v)| (v * idf[j as usize]).powi(2))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            for (j, v) in x.iter() {
                let j = j as usize;
                scores[c * d + j] += v * idf[j] / norm;
            }
        }
    }
    scores
}

/// The profiles from the segments' sums, their `idf` and their summed tf-idf rows
/// ([`tfidf_score_sums`]).
pub fn profiles_from_parts(sums: &SegmentSums, idf: Vec<f64>, mut scores: Vec<f64>) -> Profiles {
    let k = sums.k();
    let d = idf.len();
    let sizes = sums.sizes().to_vec();
    for c in 0..k {
        if sizes[c] > 0 {
            let inv = 1.0 / sizes[c] as f64;
            scores[c * d..(c + 1) * d]
                .iter_mut()
                .for_each(|s| *s *= inv);
        }
    }
    let mut rating_sums = vec![0.0; k * d];
    let mut raters = vec![0u32; k * d];
    // An item with a rater in some segment has a non-zero document frequency.
    let mut rated_items = 0;
    for j in 0..d {
        let mut rated = false;
        for c in 0..k {
            rating_sums[c * d + j] = sums.value(c, j);
            raters[c * d + j] = sums.raters(c, j);
            rated |= raters[c * d + j] > 0;
        }
        rated_items += u64::from(rated);
    }
    Profiles {
        k,
        d,
        scores,
        rating_sums,
        raters,
        sizes,
        idf,
        rated_items,
    }
}

/// A fitted multinomial Naive Bayes over the items with at least one rating.
pub struct NaiveBayes {
    k: usize,
    /// `d x k` (item-major) log feature probabilities; `-inf` for classes absent from training.
    log_prob: Vec<f64>,
    log_prior: Vec<f64>,
    /// The factor turning stored values into the true ones (see [`NaiveBayes::fit_sums`]).
    value_scale: f64,
}

/// Whom a Naive Bayes fit trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Training {
    Everyone,
    /// Everyone but the held-out users.
    NotHeldOut,
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
        let sums = SegmentSums::from_scratch(vectors, labels, k, d, |u| !train(u));
        Self::fit_sums(&sums, d, 1.0, Training::NotHeldOut)
    }

    /// Fits on the segments' sums, O(segments x items), on the stored values times
    /// `value_scale`, which [`predict`] applies too: a decaying engine stores its values
    /// scaled by one global factor, and unlike PCA and K-Means, Naive Bayes (its smoothing,
    /// its prior against the evidence) depends on the scale, so it must see the true decayed
    /// values. Features are the items some member rates.
    ///
    /// [`predict`]: NaiveBayes::predict
    pub fn fit_sums(sums: &SegmentSums, d: usize, value_scale: f64, training: Training) -> Self {
        let k = sums.k();
        let df = sums.document_frequency(d);
        let features = df.iter().filter(|&&f| f > 0).count() as f64;
        let held = training == Training::NotHeldOut;
        let count = |c: usize, j: usize| {
            let v = if held {
                sums.value(c, j) - sums.held_value(c, j)
            } else {
                sums.value(c, j)
            };
            v * value_scale
        };
        let class_counts: Vec<f64> = (0..k)
            .map(|c| (sums.sizes()[c] - if held { sums.held_sizes()[c] } else { 0 }) as f64)
            .collect();
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
                .map(|j| count(c, j) + 1.0)
                .sum();
            debug_assert!(
                (row_total - ((0..d).map(|j| count(c, j)).sum::<f64>() + features)).abs()
                    < 1e-6 * row_total
            );
            let log_total = row_total.ln();
            for j in 0..d {
                log_prob[j * k + c] = (count(c, j) + 1.0).ln() - log_total;
            }
        }
        NaiveBayes {
            k,
            log_prob,
            log_prior,
            value_scale,
        }
    }

    /// The classes (segments) it tells apart.
    pub fn classes(&self) -> usize {
        self.k
    }

    /// The fit as floats, to travel bit for bit: the log priors (`k`), then the log feature
    /// probabilities (`d x k`).
    pub fn to_floats(&self) -> Vec<f64> {
        let mut out = self.log_prior.clone();
        out.extend_from_slice(&self.log_prob);
        out
    }

    /// What [`NaiveBayes::to_floats`] wrote for `k` classes; `None` when the length does not
    /// fit.
    pub fn from_floats(k: usize, floats: &[f64], value_scale: f64) -> Option<NaiveBayes> {
        if k == 0 || floats.len() < k || !(floats.len() - k).is_multiple_of(k) {
            return None;
        }
        Some(NaiveBayes {
            k,
            log_prior: floats[..k].to_vec(),
            log_prob: floats[k..].to_vec(),
            value_scale,
        })
    }

    /// The most likely class (the first on ties, like scikit-learn's argmax).
    pub fn predict(&self, x: &SparseVec) -> u32 {
        let k = self.k;
        let mut jll = vec![0.0; k];
        for (j, v) in x.iter() {
            let w = v * self.value_scale;
            let row = &self.log_prob[j as usize * k..(j as usize + 1) * k];
            for (s, &l) in jll.iter_mut().zip(row) {
                *s += w * l;
            }
        }
        let mut best = (0u32, f64::NEG_INFINITY);
        for (c, (&prior, &evidence)) in self.log_prior.iter().zip(&jll).enumerate() {
            if prior == f64::NEG_INFINITY {
                continue;
            }
            let score = prior + evidence;
            if score > best.1 {
                best = (c as u32, score);
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
    holdout: impl Fn(usize) -> bool + Sync,
) -> NaiveBayesReport {
    let sums = SegmentSums::from_scratch(vectors, labels, k, d, &holdout);
    naive_bayes_from_sums(vectors, labels, &sums, d, value_scale, holdout)
}

/// [`naive_bayes_report`] with both fits from the segments' sums (O(segments x items)); the
/// predictions score every member, O(ratings x segments), on all cores.
pub fn naive_bayes_from_sums(
    vectors: &CowVec<SparseVec>,
    labels: &[u32],
    sums: &SegmentSums,
    d: usize,
    value_scale: f64,
    holdout: impl Fn(usize) -> bool + Sync,
) -> NaiveBayesReport {
    let full = NaiveBayes::fit_sums(sums, d, value_scale, Training::Everyone);
    let partial = NaiveBayes::fit_sums(sums, d, value_scale, Training::NotHeldOut);
    naive_bayes_tally(vectors, labels, &full, &partial, holdout).report()
}

/// The Naive Bayes counts of the users of `vectors` under `labels` (those with a segment and
/// a rating): `full`'s prediction for everyone, `partial`'s for the held-out ones (`holdout`),
/// on all cores.
pub fn naive_bayes_tally(
    vectors: &CowVec<SparseVec>,
    labels: &[u32],
    full: &NaiveBayes,
    partial: &NaiveBayes,
    holdout: impl Fn(usize) -> bool + Sync,
) -> NaiveBayesTally {
    let k = full.classes();
    let labelled = |u: usize| {
        labels
            .get(u)
            .is_some_and(|&l| l != NO_CLUSTER && (l as usize) < k)
            && vectors[u].nnz() > 0
    };
    let tally = |users: std::ops::Range<usize>| {
        let mut t = NaiveBayesTally::new(k);
        for u in users.filter(|&u| labelled(u)) {
            t.add(&vectors[u], labels[u], holdout(u), full, partial);
        }
        t
    };
    let n = vectors.len();
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .clamp(1, 8);
    let chunk = n.div_ceil(threads).max(1);
    let parts: Vec<NaiveBayesTally> = if threads == 1 || n < 20_000 {
        vec![tally(0..n)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .step_by(chunk)
                .map(|start| {
                    let tally = &tally;
                    scope.spawn(move || tally(start..(start + chunk).min(n)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| NaiveBayesTally::new(k)))
                .collect()
        })
    };
    let mut total = NaiveBayesTally::new(k);
    for part in &parts {
        total.merge(part);
    }
    total
}

/// The counts behind a [`NaiveBayesReport`], over some of the users: they add up over
/// disjoint sets of users (threads, or instances of a group).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NaiveBayesTally {
    /// `k x k`, row-major: `[cluster * k + predicted]`, by the fit on everyone.
    pub confusion: Vec<u64>,
    pub agree: u64,
    pub total: u64,
    pub held: u64,
    pub held_agree: u64,
}

impl NaiveBayesTally {
    pub fn new(k: usize) -> Self {
        NaiveBayesTally {
            confusion: vec![0; k * k],
            agree: 0,
            total: 0,
            held: 0,
            held_agree: 0,
        }
    }

    fn k(&self) -> usize {
        self.confusion.len().isqrt()
    }

    /// Counts user `x` of segment `label` (`held`: held out of the `partial` fit).
    pub fn add(
        &mut self,
        x: &SparseVec,
        label: u32,
        held: bool,
        full: &NaiveBayes,
        partial: &NaiveBayes,
    ) {
        let k = self.k();
        if label == NO_CLUSTER || label as usize >= k || x.nnz() == 0 {
            return;
        }
        let p = full.predict(x);
        self.confusion[label as usize * k + p as usize] += 1;
        self.total += 1;
        self.agree += u64::from(p == label);
        if held {
            self.held += 1;
            self.held_agree += u64::from(partial.predict(x) == label);
        }
    }

    /// Adds the counts over another, disjoint set of users.
    pub fn merge(&mut self, other: &NaiveBayesTally) {
        for (a, b) in self.confusion.iter_mut().zip(&other.confusion) {
            *a += b;
        }
        self.agree += other.agree;
        self.total += other.total;
        self.held += other.held;
        self.held_agree += other.held_agree;
    }

    pub fn report(&self) -> NaiveBayesReport {
        let k = self.k();
        NaiveBayesReport {
            train_agreement: if self.total > 0 {
                self.agree as f64 / self.total as f64
            } else {
                0.0
            },
            holdout_agreement: (self.held > 0).then(|| self.held_agree as f64 / self.held as f64),
            holdout_users: self.held,
            confusion_matrix: self
                .confusion
                .chunks(k.max(1))
                .map(<[u64]>::to_vec)
                .collect(),
        }
    }
}

pub use crate::engine::stable_hash;

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
