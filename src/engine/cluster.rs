//! One model over several instances' users: the coordinator's side of the rounds in
//! docs/cluster.md, without a transport. Each round broadcasts something small (a block of
//! vectors, centroids) and every [`Participant`] answers from the users it holds with a partial
//! that adds up; a cluster of one is one participant, the same code path. Kafka topics will carry
//! the rounds; here a participant is called directly.

use ndarray::Array2;

use super::eigen::{EigenParams, top_eigenpairs};
use super::ids::stable_hash;
use super::kmeans::{self, ClusteringParams, DensePoints, LloydPartial};
use super::model::project_rows;
use super::stats::{CovarianceStats, GramShare, partial_gram};
use super::{CowVec, SparseVec};

/// What one instance answers, each from the users it holds (and, as a [`GramShare`], its
/// ratings and its share of each eigensolver application).
pub trait Participant: GramShare {
    /// The statistics round: its users' count, column sums and sums of squares over `items`.
    fn statistics(&self, items: usize) -> CovarianceStats;
    /// The basis (`components x items`) is broadcast: each user's projection, kept for the
    /// rounds that follow.
    fn project(&mut self, basis: &Array2<f64>);
    /// Its users in the clustering sample, `(hash of the id, projection)`: those whose
    /// `stable_hash(id, seed)` is below `share` of the hash range, so the sample does not depend
    /// on which instance holds whom.
    fn sample(&self, share: f64, seed: u64) -> Vec<(u64, Vec<f64>)>;
    /// A Lloyd round: its users assigned to the broadcast centroids (the labels kept).
    fn lloyd(&mut self, centroids: &[f64]) -> LloydPartial;
}

/// A participant over rows it holds in memory (a test's shard, or the one instance there is).
pub struct LocalParticipant {
    ids: Vec<String>,
    vectors: CowVec<SparseVec>,
    components: usize,
    projections: Vec<f64>,
    labels: Vec<u32>,
    /// The users with a rating and their projections side by side (`rated.len() x
    /// components`), made once per basis for the Lloyd rounds.
    rated: Vec<usize>,
    rated_projections: Vec<f64>,
    /// The centroids of the last Lloyd round (the model's, once the rounds settle).
    centroids: Vec<f64>,
}

impl LocalParticipant {
    /// `ids[i]` holds row `vectors[i]`.
    pub fn new(ids: Vec<String>, vectors: Vec<SparseVec>) -> Self {
        let n = vectors.len();
        LocalParticipant {
            ids,
            vectors: vectors.into(),
            components: 0,
            projections: vec![],
            labels: vec![super::NO_CLUSTER; n],
            rated: vec![],
            rated_projections: vec![],
            centroids: vec![],
        }
    }

    /// Its rows and their segments, by local user index ([`NO_CLUSTER`] for users without a
    /// rating or before the Lloyd rounds).
    ///
    /// [`NO_CLUSTER`]: super::NO_CLUSTER
    pub fn rows(&self) -> (&CowVec<SparseVec>, &[u32]) {
        (&self.vectors, &self.labels)
    }

    /// The id of local user `u`.
    pub fn id(&self, u: usize) -> &str {
        &self.ids[u]
    }

    /// `(user id, segment)` for each of its users with a rating.
    pub fn labels(&self) -> Vec<(String, u32)> {
        self.rated()
            .map(|u| (self.ids[u].clone(), self.labels[u]))
            .collect()
    }

    /// `(id, row, segment)` of each user it holds with a rating.
    pub fn members(&self) -> impl Iterator<Item = (&str, &SparseVec, u32)> + '_ {
        self.rated()
            .map(|u| (self.ids[u].as_str(), &self.vectors[u], self.labels[u]))
    }

    /// Renames its users' segments: `mapping[segment]` is the new id (a permutation of the
    /// `k` segments), the last Lloyd round's centroids renamed with them.
    pub fn relabel(&mut self, mapping: &[u32]) {
        for label in &mut self.labels {
            if let Some(&to) = mapping.get(*label as usize) {
                *label = to;
            }
        }
        self.centroids = relabelled_rows(&self.centroids, mapping);
    }

    /// Its users counted by (segment, previous segment) for the `k` segments, `previous`
    /// giving a user's previous segment (`overlap[segment * k + previous]`).
    pub fn overlap(&self, k: usize, previous: impl Fn(&str) -> Option<u32>) -> Vec<f64> {
        let mut overlap = vec![0.0; k * k];
        for (id, _, label) in self.members() {
            if let Some(before) = previous(id).filter(|&b| (b as usize) < k)
                && (label as usize) < k
            {
                overlap[label as usize * k + before as usize] += 1.0;
            }
        }
        overlap
    }

    /// `(id, segment, distance to the segment's centroid)` of each user it holds with a
    /// rating, the centroids being the last Lloyd round's.
    pub fn assignments(&self) -> Vec<(String, u32, f64)> {
        let k = self.components;
        self.rated()
            .map(|u| {
                let label = self.labels[u];
                let z = &self.projections[u * k..(u + 1) * k];
                let distance = self
                    .centroids
                    .get(label as usize * k..(label as usize + 1) * k)
                    .map_or(f64::NAN, |c| {
                        z.iter()
                            .zip(c)
                            .map(|(a, b)| (a - b) * (a - b))
                            .sum::<f64>()
                            .sqrt()
                    });
                (self.ids[u].clone(), label, distance)
            })
            .collect()
    }

    /// Users it holds with at least one rating.
    pub fn labels_len(&self) -> usize {
        self.rated().count()
    }

    fn rated(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.vectors.len()).filter(|&u| self.vectors[u].nnz() > 0)
    }
}

impl GramShare for LocalParticipant {
    fn ratings(&self) -> usize {
        self.vectors.ratings()
    }

    fn gram(&self, block: &Array2<f64>) -> Vec<f64> {
        partial_gram(&self.vectors, block)
    }
}

impl Participant for LocalParticipant {
    fn statistics(&self, items: usize) -> CovarianceStats {
        CovarianceStats::from_vectors(self.vectors.iter(), items)
    }

    fn project(&mut self, basis: &Array2<f64>) {
        self.components = basis.nrows();
        self.projections = project_rows(&self.vectors, basis);
        let k = self.components;
        self.rated = self.rated().collect();
        self.rated_projections = self
            .rated
            .iter()
            .flat_map(|&u| self.projections[u * k..(u + 1) * k].iter().copied())
            .collect();
    }

    fn sample(&self, share: f64, seed: u64) -> Vec<(u64, Vec<f64>)> {
        let k = self.components;
        let below = (share.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
        self.rated()
            .map(|u| (stable_hash(self.ids[u].as_bytes(), seed), u))
            .filter(|&(h, _)| h <= below)
            .map(|(h, u)| (h, self.projections[u * k..(u + 1) * k].to_vec()))
            .collect()
    }

    fn lloyd(&mut self, centroids: &[f64]) -> LloydPartial {
        self.centroids = centroids.to_vec();
        let mut labels: Vec<u32> = self.rated.iter().map(|&u| self.labels[u]).collect();
        let partial = LloydPartial::assign(
            &DensePoints {
                data: &self.rated_projections,
                dim: self.components,
            },
            centroids,
            &mut labels,
        );
        for (&u, &l) in self.rated.iter().zip(&labels) {
            self.labels[u] = l;
        }
        partial
    }
}

/// `vectors` (rows of the users `ids` names) split over `instances` participants by a hash of
/// the user id, as partitions by user key split them.
pub fn split_by_user(
    ids: impl Fn(usize) -> String,
    vectors: &CowVec<SparseVec>,
    instances: usize,
) -> Vec<LocalParticipant> {
    let instances = instances.max(1);
    let mut parts: Vec<(Vec<String>, Vec<SparseVec>)> =
        (0..instances).map(|_| (vec![], vec![])).collect();
    for (u, x) in vectors.iter().enumerate() {
        let id = ids(u);
        let shard = (stable_hash(id.as_bytes(), SHARD_SEED) % instances as u64) as usize;
        parts[shard].0.push(id);
        parts[shard].1.push(x.clone());
    }
    parts
        .into_iter()
        .map(|(ids, rows)| LocalParticipant::new(ids, rows))
        .collect()
}

const SHARD_SEED: u64 = 77;

/// What the coordinator solved, and the rounds it took.
#[derive(Debug, Clone)]
pub struct ClusterModel {
    pub users: u64,
    pub eigenvalues: Vec<f64>,
    /// `components x items`.
    pub basis: Array2<f64>,
    /// `clusters x components`.
    pub centroids: Vec<f64>,
    pub sizes: Vec<u64>,
    pub inertia: f64,
    pub rounds: Rounds,
    /// The eigensolver met its tolerance.
    pub converged: bool,
}

impl ClusterModel {
    /// Renames the segments: `mapping[segment]` is the new id (a permutation).
    pub fn relabel(&mut self, mapping: &[u32]) {
        self.centroids = relabelled_rows(&self.centroids, mapping);
        let mut sizes = self.sizes.clone();
        for (c, &size) in self.sizes.iter().enumerate() {
            if let Some(slot) = mapping.get(c).and_then(|&to| sizes.get_mut(to as usize)) {
                *slot = size;
            }
        }
        self.sizes = sizes;
    }
}

/// `rows` (one per segment, row-major) with row `c` moved to `mapping[c]`; unchanged when the
/// mapping does not fit.
fn relabelled_rows(rows: &[f64], mapping: &[u32]) -> Vec<f64> {
    let k = mapping.len();
    if k == 0 || !rows.len().is_multiple_of(k) || mapping.iter().any(|&m| m as usize >= k) {
        return rows.to_vec();
    }
    let dim = rows.len() / k;
    let mut out = rows.to_vec();
    for (c, &to) in mapping.iter().enumerate() {
        out[to as usize * dim..(to as usize + 1) * dim]
            .copy_from_slice(&rows[c * dim..(c + 1) * dim]);
    }
    out
}

/// Rounds of each kind one solve took: each is one broadcast and one partial per participant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rounds {
    pub statistics: usize,
    pub eigen: usize,
    pub sample: usize,
    pub lloyd: usize,
    /// A group snapshot's rounds after the model: renaming the segments after the previous
    /// model's, their sums, the scores and predictions, publishing every user's segment.
    #[serde(default)]
    pub snapshot: usize,
}

impl Rounds {
    pub fn total(&self) -> usize {
        self.statistics + self.eigen + self.sample + self.lloyd + self.snapshot
    }
}

pub struct ClusterParams {
    pub eigen: EigenParams,
    pub clustering: ClusteringParams,
    /// Share of the users (by hash of the id) the k-means++ starts run on.
    pub sample_share: f64,
}

impl ClusterParams {
    /// The settings of the engine's own cold snapshot (`params`), for `users` users: the
    /// same tolerance, starts and passes, and the same clustering sample size.
    pub fn for_engine(params: &super::EngineParams, users: u64) -> ClusterParams {
        let sample_users = super::model::clustering_sample_users(params.clusters);
        ClusterParams {
            eigen: params.eigen(params.seed, super::params::EigenSolve::Cold, false),
            clustering: ClusteringParams {
                k: params.clusters,
                max_passes: params.snapshot_max_passes,
                restarts: params.snapshot_kmeans_starts,
                keep_current: false,
                seed: params.seed,
            },
            sample_share: (sample_users as f64 / users.max(1) as f64).min(1.0),
        }
    }
}

/// PCA and k-means over every participant's users, cold: the statistics round, one round per
/// eigensolver application, the basis broadcast, one sample round for the k-means++ starts (run
/// here on the sample, ordered by hash so the result does not depend on who holds whom), then
/// Lloyd rounds over everyone until no user moves. `None` with fewer users than clusters.
pub fn solve<P: Participant>(
    participants: &mut [P],
    items: usize,
    params: &ClusterParams,
) -> Option<ClusterModel> {
    let mut rounds = Rounds {
        statistics: 1,
        ..Rounds::default()
    };
    let mut stats = CovarianceStats::default();
    for participant in participants.iter() {
        stats.merge(&participant.statistics(items));
    }
    let k = params.clustering.k;
    if stats.users() < k as u64 || items == 0 {
        return None;
    }
    let shares: Vec<&P> = participants.iter().collect();
    let solved = top_eigenpairs(&stats.sharded_operator(shares, items), None, &params.eigen);
    // One round per operator application, which is what the solver counts.
    rounds.eigen = solved.iterations;
    let basis = solved.eigenvectors;
    let components = basis.nrows();
    for participant in participants.iter_mut() {
        participant.project(&basis);
    }

    rounds.sample = 1;
    let mut sample: Vec<(u64, Vec<f64>)> = participants
        .iter()
        .flat_map(|p| p.sample(params.sample_share, params.clustering.seed))
        .collect();
    sample.sort_by_key(|(hash, _)| *hash);
    let data: Vec<f64> = sample.into_iter().flat_map(|(_, z)| z).collect();
    if data.len() < k * components {
        return None;
    }
    let started = kmeans::cluster(
        &DensePoints {
            data: &data,
            dim: components,
        },
        None,
        &params.clustering,
    );

    let mut centroids = started.centroids;
    let mut merged = None;
    for _ in 0..params.clustering.max_passes.max(1) {
        rounds.lloyd += 1;
        let mut pass: Option<LloydPartial> = None;
        for participant in participants.iter_mut() {
            let part = participant.lloyd(&centroids);
            match pass.as_mut() {
                Some(m) => m.merge(&part),
                None => pass = Some(part),
            }
        }
        let pass = pass?;
        let settled = pass.moved == 0;
        if !settled {
            centroids = pass.centroids(&centroids);
        }
        merged = Some(pass);
        if settled {
            break;
        }
    }
    let merged = merged?;
    Some(ClusterModel {
        users: stats.users(),
        eigenvalues: solved.eigenvalues,
        basis,
        centroids,
        sizes: merged.counts,
        inertia: merged.inertia,
        rounds,
        converged: solved.converged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineParams, PreviousSegments};
    use crate::generator::{GeneratorParams, generate};

    fn params(engine: &EngineParams) -> ClusterParams {
        ClusterParams {
            eigen: EigenParams {
                vectors: engine.components,
                values: engine.components,
                oversample: engine.eigen_oversample,
                tolerance: 1e-10,
                max_iterations: 500,
                seed: 5,
            },
            clustering: ClusteringParams {
                k: engine.clusters,
                max_passes: 300,
                restarts: engine.snapshot_kmeans_starts,
                keep_current: false,
                seed: 5,
            },
            // The engine's cold solve samples 200 users a cluster, at least 5,000: all of
            // these.
            sample_share: 1.0,
        }
    }

    fn shards(engine: &Engine, instances: usize) -> Vec<LocalParticipant> {
        split_by_user(
            |u| engine.users().id(u as u32).to_string(),
            engine.vectors(),
            instances,
        )
    }

    #[test]
    fn a_renaming_is_found_from_the_overlap_and_undone_everywhere() {
        let data = generate(&GeneratorParams {
            events: 20_000,
            seed: 22,
            ..GeneratorParams::default()
        });
        let mut engine = Engine::new(EngineParams::default());
        engine.apply(&data.events);
        let items = engine.items().len();
        let mut parts = shards(&engine, 3);
        let mut model = solve(&mut parts, items, &params(engine.params())).expect("a model");
        let k = model.sizes.len();
        let before: std::collections::BTreeMap<String, u32> =
            parts.iter().flat_map(|p| p.labels()).collect();
        let (sizes, centroids) = (model.sizes.clone(), model.centroids.clone());

        // Rename every segment (a rotation), as a new cold solve may.
        let rotation: Vec<u32> = (0..k as u32).map(|c| (c + 1) % k as u32).collect();
        parts.iter_mut().for_each(|p| p.relabel(&rotation));
        model.relabel(&rotation);
        assert_ne!(
            model.sizes, sizes,
            "the rotation renames segments of different sizes"
        );

        let mut overlap = vec![0.0; k * k];
        for part in &parts {
            let theirs = part.overlap(k, |id| before.get(id).copied());
            overlap.iter_mut().zip(&theirs).for_each(|(a, b)| *a += b);
        }
        let back = crate::engine::matching::match_overlap(&overlap, k);
        parts.iter_mut().for_each(|p| p.relabel(&back));
        model.relabel(&back);
        let after: std::collections::BTreeMap<String, u32> =
            parts.iter().flat_map(|p| p.labels()).collect();
        assert_eq!(after, before);
        assert_eq!(model.sizes, sizes);
        assert_eq!(model.centroids, centroids);
        // Distances follow the renamed centroids.
        for part in &parts {
            for (_, _, distance) in part.assignments() {
                assert!(distance.is_finite());
            }
        }
    }

    #[test]
    fn three_instances_solve_the_model_one_instance_solves() {
        let data = generate(&GeneratorParams {
            events: 30_000,
            seed: 21,
            ..GeneratorParams::default()
        });
        let mut engine = Engine::new(EngineParams::default());
        engine.apply(&data.events);
        let items = engine.items().len();
        let params = params(engine.params());

        let mut one = shards(&engine, 1);
        let mut three = shards(&engine, 3);
        assert!(
            three.iter().all(|p| p.ratings() > 0),
            "every instance holds users"
        );
        let alone = solve(&mut one, items, &params).expect("a model");
        let together = solve(&mut three, items, &params).expect("a model");

        // The PCA: as one instance, and as the engine's own snapshot solves it.
        let snapshot = engine
            .snapshot_model(false, PreviousSegments::None)
            .expect("a snapshot");
        for ((a, b), c) in together
            .eigenvalues
            .iter()
            .zip(&alone.eigenvalues)
            .zip(snapshot.eigenvalues())
        {
            assert!((a - b).abs() <= 1e-9 * b.abs(), "eigenvalue {a} vs {b}");
            assert!(
                (b - c).abs() <= 1e-9 * c.abs(),
                "eigenvalue {b} vs the engine's {c}"
            );
        }
        // The clustering: the same sample, starts and Lloyd rounds, so the same segments.
        let by_id = |parts: &[LocalParticipant]| {
            let mut labels: Vec<(String, u32)> = parts.iter().flat_map(|p| p.labels()).collect();
            labels.sort();
            labels
        };
        assert_eq!(by_id(&three), by_id(&one));
        assert_eq!(together.sizes, alone.sizes);
        assert!(
            (together.inertia - alone.inertia).abs() <= 1e-9 * alone.inertia,
            "inertia {} vs {}",
            together.inertia,
            alone.inertia
        );
        // As good as the engine's own cold solve of the same data.
        let engine_inertia = snapshot.inertia();
        assert!(
            together.inertia <= 1.02 * engine_inertia,
            "inertia {} vs the engine's {engine_inertia}",
            together.inertia
        );
        // Rounds: one of statistics, one per eigensolver application, one sample, the passes.
        assert_eq!(together.rounds, alone.rounds);
        assert_eq!(together.rounds.statistics, 1);
        assert!(together.rounds.eigen >= 2 && together.rounds.lloyd >= 1);
        eprintln!(
            "rounds {:?} ({} in all)",
            together.rounds,
            together.rounds.total()
        );
    }
}
