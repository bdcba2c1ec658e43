//! A snapshot of a whole consumer group from its instances' partial sums: each instance sums
//! its users' vectors by segment (sizes, values, raters: Naive Bayes and the profiles), the idf
//! and both Naive Bayes fits go back out for what only the users' rows can give (their
//! normalised tf-idf rows, their predictions), and the drift is counted user by user where the
//! users are. No instance holds every user, yet the snapshot is the one [`super::build_from_model`]
//! makes from one engine holding them all.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::validation::{
    NaiveBayes, NaiveBayesReport, NaiveBayesTally, Profiles, Training, naive_bayes_tally,
    profiles_from_parts, smooth_idf, tfidf_score_sums,
};
use super::{
    Counts, Drift, KmeansSummary, SNAPSHOT_FORMAT, Segments, Snapshot, SnapshotParams, Validation,
    cluster_profiles_of, pca_summary_of,
};
use crate::engine::cluster::{ClusterModel, LocalParticipant};
use crate::engine::stats::CovarianceStats;
use crate::engine::{SegmentSums, Segmentation, ValueTransform, held_out};
use crate::event::Mode;

/// Who is held out of the Naive Bayes fit for its holdout agreement: by a hash of the user id,
/// so it does not depend on which instance holds whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holdout {
    pub percent: u64,
    pub seed: u64,
}

impl Holdout {
    pub fn holds_out(&self, id: &str) -> bool {
        held_out(id, self.seed, self.percent)
    }
}

/// What one instance answers for the snapshot, from the users it holds under their segments.
pub trait Describe {
    /// Its users' sums by segment, over `items` items.
    fn segment_sums(&self, k: usize, items: usize, holdout: Holdout) -> SegmentSums;
    /// Its users' l2-normalised tf-idf rows under `idf` summed by segment (`k x items`), and
    /// the Naive Bayes counts of the fit on everyone (`full`) and of the one without the
    /// held-out users (`partial`).
    fn describe(
        &self,
        idf: &[f64],
        full: &NaiveBayes,
        partial: &NaiveBayes,
        holdout: Holdout,
    ) -> (Vec<f64>, NaiveBayesTally);
}

impl Describe for LocalParticipant {
    fn segment_sums(&self, k: usize, items: usize, holdout: Holdout) -> SegmentSums {
        let (vectors, labels) = self.rows();
        SegmentSums::from_scratch(vectors, labels, k, items, |u| holdout.holds_out(self.id(u)))
    }

    fn describe(
        &self,
        idf: &[f64],
        full: &NaiveBayes,
        partial: &NaiveBayes,
        holdout: Holdout,
    ) -> (Vec<f64>, NaiveBayesTally) {
        let (vectors, labels) = self.rows();
        let scores = tfidf_score_sums(
            vectors.iter().zip(labels.iter().copied()),
            idf,
            full.classes(),
        );
        let tally = naive_bayes_tally(vectors, labels, full, partial, |u| {
            holdout.holds_out(self.id(u))
        });
        (scores, tally)
    }
}

/// The group's Naive Bayes validation and cluster profiles.
pub struct Description {
    pub profiles: Profiles,
    pub naive_bayes: NaiveBayesReport,
}

/// Two rounds over `parts` (each instance's users under the model's `k` segments): the
/// segments' sums, then the scores and predictions under what they give.
pub fn describe<D: Describe>(parts: &[D], k: usize, items: usize, holdout: Holdout) -> Description {
    let mut sums = SegmentSums::new(k);
    sums.ensure_items(items);
    for part in parts {
        sums.merge(&part.segment_sums(k, items, holdout));
    }
    let idf = smooth_idf(&sums, items);
    // The group refuses a half-life: the stored values are the true ones.
    let full = NaiveBayes::fit_sums(&sums, items, 1.0, Training::Everyone);
    let partial = NaiveBayes::fit_sums(&sums, items, 1.0, Training::NotHeldOut);
    let mut scores = vec![0.0; k * items];
    let mut tally = NaiveBayesTally::new(k);
    for part in parts {
        let (theirs, counts) = part.describe(&idf, &full, &partial, holdout);
        scores.iter_mut().zip(&theirs).for_each(|(a, b)| *a += b);
        tally.merge(&counts);
    }
    Description {
        profiles: profiles_from_parts(&sums, idf, scores),
        naive_bayes: tally.report(),
    }
}

/// What a group snapshot says besides the model and its description.
pub struct GroupSnapshotInput<'a> {
    pub version: u64,
    pub created_at: String,
    /// Next offset per `topic/partition` the cut covers.
    pub offsets: BTreeMap<String, i64>,
    /// The group's items in index order.
    pub items: &'a [String],
    pub titles: &'a FxHashMap<String, String>,
    pub params: &'a SnapshotParams,
    pub mode: Mode,
    pub transform: ValueTransform,
    pub ratings: u64,
    /// Messages the cut covers.
    pub events_applied: u64,
    pub drift: Option<Drift>,
}

/// The group's snapshot, in the layout of every snapshot (`docs/snapshot.md`); without
/// diagnostics (they need every user's full row in one place) and without decay (the group
/// refuses a half-life).
pub fn group_snapshot(
    model: &ClusterModel,
    stats: &CovarianceStats,
    description: &Description,
    input: GroupSnapshotInput<'_>,
) -> Snapshot {
    let d = input.items.len();
    let n = stats.users();
    let kept = model.basis.nrows();
    let pca = pca_summary_of(
        &model.eigenvalues[..kept.min(model.eigenvalues.len())],
        stats.covariance_trace(d),
        n,
        1.0,
        (model.rounds.eigen, model.converged),
    );
    // The projections are of the uncentred rows: centre the centroids as scikit-learn's
    // `transform` does.
    let projected_mean = model.basis.dot(&ndarray::Array1::from(stats.mean(d)));
    let profiles = &description.profiles;
    let k = model.sizes.len();
    let segments = Segments {
        uncentred_centroids: &model.centroids,
        projected_mean: projected_mean.as_slice().unwrap_or_default(),
        sizes: &model.sizes,
        components: kept,
    };
    let clusters = cluster_profiles_of(&segments, profiles, input.params, input.titles, 1.0, |j| {
        input.items[j].clone()
    });
    Snapshot {
        format: SNAPSHOT_FORMAT,
        version: input.version,
        created_at: input.created_at,
        mode: input.mode,
        transform: input.transform,
        counts: Counts {
            users: n,
            items: profiles.rated_items,
            ratings: input.ratings,
            events_applied: input.events_applied,
        },
        offsets: input.offsets,
        pca,
        kmeans: KmeansSummary {
            k,
            inertia: model.inertia,
            sizes: model.sizes.clone(),
            segmentation: Segmentation::Fresh,
        },
        clusters,
        validation: Validation {
            naive_bayes: description.naive_bayes.clone(),
        },
        diagnostics: None,
        drift: input.drift,
        decay: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cluster::{ClusterParams, solve, split_by_user};
    use crate::engine::{Engine, EngineParams};
    use crate::generator::{GeneratorParams, generate};
    use crate::snapshot::validation::{naive_bayes_report, tfidf_profiles};

    #[test]
    fn three_instances_describe_the_segments_one_engine_describes() {
        let data = generate(&GeneratorParams {
            events: 30_000,
            seed: 23,
            ..GeneratorParams::default()
        });
        let mut engine = Engine::new(EngineParams::default());
        engine.apply(&data.events);
        let items = engine.items().len();
        let params = ClusterParams::for_engine(engine.params(), engine.active_users());
        let mut parts = split_by_user(
            |u| engine.users().id(u as u32).to_string(),
            engine.vectors(),
            3,
        );
        let model = solve(&mut parts, items, &params).expect("a model");
        let k = model.sizes.len();
        let holdout = Holdout {
            percent: 20,
            seed: engine.params().seed,
        };
        let group = describe(&parts, k, items, holdout);

        // The same segments on the engine's own rows, described in one place.
        let by_id: FxHashMap<String, u32> = parts
            .iter()
            .flat_map(|p| p.assignments().into_iter().map(|(id, l, _)| (id, l)))
            .collect();
        let labels: Vec<u32> = (0..engine.users().len())
            .map(|u| {
                by_id
                    .get(engine.users().id(u as u32))
                    .copied()
                    .unwrap_or(crate::engine::NO_CLUSTER)
            })
            .collect();
        let one = tfidf_profiles(engine.vectors(), &labels, k, items);
        assert_eq!(group.profiles.sizes, one.sizes);
        assert_eq!(group.profiles.raters, one.raters);
        assert_eq!(group.profiles.rated_items, one.rated_items);
        assert_eq!(group.profiles.idf, one.idf);
        let close = |a: &[f64], b: &[f64], what: &str| {
            let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-12 * scale, "{what}: {x} vs {y}");
            }
        };
        close(&group.profiles.scores, &one.scores, "profile scores");
        close(&group.profiles.rating_sums, &one.rating_sums, "rating sums");
        let ids = engine.users();
        let report = naive_bayes_report(engine.vectors(), &labels, k, items, 1.0, |u| {
            holdout.holds_out(ids.id(u as u32))
        });
        assert_eq!(group.naive_bayes, report);
        assert!(report.holdout_users > 0 && report.train_agreement > 0.5);

        let stats = CovarianceStats::from_vectors(engine.vectors().iter(), items);
        let item_ids: Vec<String> = (0..items)
            .map(|j| engine.items().id(j as u32).to_string())
            .collect();
        let titles = FxHashMap::default();
        let snapshot = group_snapshot(
            &model,
            &stats,
            &group,
            GroupSnapshotInput {
                version: 4,
                created_at: "now".into(),
                offsets: BTreeMap::new(),
                items: &item_ids,
                titles: &titles,
                params: &SnapshotParams::default(),
                mode: engine.params().mode,
                transform: engine.params().transform,
                ratings: engine.ratings(),
                events_applied: 30_000,
                drift: None,
            },
        );
        assert_eq!(snapshot.counts.users, engine.active_users());
        assert_eq!(
            snapshot.kmeans.sizes.iter().sum::<u64>(),
            engine.active_users()
        );
        // The cluster profiles rank as one engine's do, and the centroids are centred: the
        // size-weighted mean of the centroids is the mean projection, 0.
        for c in 0..k {
            let top: Vec<&str> = snapshot.clusters[c]
                .top_items
                .iter()
                .map(|t| t.item.as_str())
                .collect();
            let expected: Vec<&str> = one
                .ranked(c)
                .iter()
                .take(50)
                .map(|&j| item_ids[j].as_str())
                .collect();
            assert_eq!(top, expected, "cluster {c}");
        }
        let components = snapshot.pca.n_components;
        for i in 0..components {
            let weighted: f64 = snapshot
                .clusters
                .iter()
                .map(|c| c.centroid[i] * c.size as f64)
                .sum::<f64>()
                / engine.active_users() as f64;
            assert!(
                weighted.abs() < 1e-9,
                "component {i}: mean centroid {weighted}"
            );
        }
    }
}
