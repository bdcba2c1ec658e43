//! What the HTTP API serves between two snapshots: the latest snapshot (and its JSON, encoded
//! once) and, for `/users/{id}`, every assigned user's projection, ratings and cluster at that
//! snapshot, so a lookup is a hash probe and a few small dot products.

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::engine::{CowVec, EngineView, Model, NO_CLUSTER, SparseVec, ValueTransform};
use crate::snapshot::Snapshot;

pub struct Serving {
    pub snapshot: Snapshot,
    pub snapshot_json: Vec<u8>,
    user_index: FxHashMap<String, u32>,
    labels: Vec<u32>,
    /// Centred projections, `users x components`.
    projections: Vec<f64>,
    /// The users' rating vectors, shared with the engine copy-on-write; `rows[i]` is the
    /// engine index of served user `i`.
    vectors: CowVec<SparseVec>,
    rows: Vec<u32>,
    /// Centred centroids, `clusters x components`.
    centroids: Vec<f64>,
    /// `items x components`.
    loadings: Vec<f64>,
    item_ids: Vec<String>,
    titles: FxHashMap<String, String>,
    components: usize,
    /// Stored values times this are the decayed ones (1 without a half-life).
    value_scale: f64,
    /// Each cluster's member ids, sorted: built at the first member listing of this snapshot
    /// (most snapshots are never listed).
    members: std::sync::OnceLock<Vec<Vec<String>>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UserSegment {
    pub user: String,
    pub snapshot_version: u64,
    pub cluster: u32,
    /// Euclidean distance to the user's centroid in PCA space.
    pub distance: f64,
    /// The next-nearest cluster and the distance to it.
    pub next_cluster: Option<u32>,
    pub next_distance: Option<f64>,
    pub ratings: usize,
    /// `[events] transform`: `pulling_items` values are transformed values.
    pub transform: ValueTransform,
    /// The user's rated items that pull it most towards its cluster rather than the next one.
    pub pulling_items: Vec<PullingItem>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PullingItem {
    pub item: String,
    pub title: Option<String>,
    pub value: f64,
    /// This item's share of `‖p − c_next‖² − ‖p − c‖²` (larger = pulls harder).
    pub pull: f64,
}

impl Serving {
    pub fn new(
        engine: &EngineView,
        model: &Model,
        snapshot: Snapshot,
        titles: FxHashMap<String, String>,
    ) -> Serving {
        let k = model.components();
        let offset = model.projected_mean();
        // With a half-life the model holds scaled values: projections in the snapshot's
        // (decayed) units, like its centroids.
        let scale = engine.value_scale();
        let mut user_index = FxHashMap::default();
        let mut labels = vec![];
        let mut projections = vec![];
        let mut rows = vec![];
        for (u, &label) in model.labels().iter().enumerate() {
            if label == NO_CLUSTER {
                continue;
            }
            user_index.insert(engine.users().id(u as u32).to_string(), labels.len() as u32);
            labels.push(label);
            projections.extend(
                model
                    .projection(u)
                    .iter()
                    .zip(&offset)
                    .map(|(z, m)| (z - m) * scale),
            );
            rows.push(u as u32);
        }
        let basis = model.basis();
        let d = basis.ncols();
        let mut loadings = vec![0.0; d * k];
        for c in 0..basis.nrows().min(k) {
            for j in 0..d {
                loadings[j * k + c] = basis[[c, j]];
            }
        }
        let centroids = snapshot
            .clusters
            .iter()
            .flat_map(|c| c.centroid.iter().copied())
            .collect();
        let snapshot_json = serde_json::to_vec(&snapshot).unwrap_or_default();
        Serving {
            snapshot,
            snapshot_json,
            user_index,
            labels,
            projections,
            vectors: engine.vectors().clone(),
            rows,
            centroids,
            loadings,
            item_ids: engine.items().iter().take(d).cloned().collect(),
            titles,
            components: k,
            value_scale: scale,
            members: std::sync::OnceLock::new(),
        }
    }

    /// A snapshot of the whole consumer group: served as it is; its users are looked up in the
    /// group's assignments instead (no instance holds them all).
    pub fn of_group(snapshot: Snapshot) -> Serving {
        let snapshot_json = serde_json::to_vec(&snapshot).unwrap_or_default();
        Serving {
            snapshot,
            snapshot_json,
            user_index: FxHashMap::default(),
            labels: vec![],
            projections: vec![],
            vectors: CowVec::default(),
            rows: vec![],
            centroids: vec![],
            loadings: vec![],
            item_ids: vec![],
            titles: FxHashMap::default(),
            components: 0,
            value_scale: 1.0,
            members: std::sync::OnceLock::new(),
        }
    }

    pub fn user(&self, id: &str, items: usize) -> Option<UserSegment> {
        let i = *self.user_index.get(id)? as usize;
        let k = self.components;
        let p = &self.projections[i * k..(i + 1) * k];
        let cluster = self.labels[i];
        let distance = |c: usize| {
            p.iter()
                .zip(&self.centroids[c * k..(c + 1) * k])
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt()
        };
        let clusters = self.centroids.len() / k.max(1);
        let next = (0..clusters)
            .filter(|&c| c as u32 != cluster)
            .map(|c| (c, distance(c)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let own = &self.centroids[cluster as usize * k..(cluster as usize + 1) * k];
        let x = &self.vectors[self.rows[i] as usize];
        let mut pulling: Vec<PullingItem> = x
            .iter()
            .filter(|(j, _)| (*j as usize) < self.item_ids.len())
            .map(|(j, stored)| {
                let v = stored * self.value_scale;
                let row = &self.loadings[j as usize * k..(j as usize + 1) * k];
                let pull = match next {
                    Some((n, _)) => {
                        let other = &self.centroids[n * k..(n + 1) * k];
                        2.0 * v
                            * row
                                .iter()
                                .zip(own.iter().zip(other))
                                .map(|(l, (a, b))| l * (a - b))
                                .sum::<f64>()
                    }
                    None => v * row.iter().zip(own).map(|(l, a)| l * a).sum::<f64>(),
                };
                let item = self.item_ids[j as usize].clone();
                PullingItem {
                    title: self.titles.get(&item).cloned(),
                    item,
                    value: v,
                    pull,
                }
            })
            .filter(|p| p.pull > 0.0)
            .collect();
        pulling.sort_by(|a, b| b.pull.total_cmp(&a.pull).then_with(|| a.item.cmp(&b.item)));
        pulling.truncate(items);
        Some(UserSegment {
            user: id.to_string(),
            snapshot_version: self.snapshot.version,
            cluster,
            distance: distance(cluster as usize),
            next_cluster: next.map(|n| n.0 as u32),
            next_distance: next.map(|n| n.1),
            ratings: x.nnz(),
            transform: self.snapshot.transform,
            pulling_items: pulling,
        })
    }

    /// The engine index of user `id`, when this snapshot assigned it (the same index in every
    /// snapshot: ids are only ever appended).
    pub fn engine_index(&self, id: &str) -> Option<u32> {
        self.user_index.get(id).map(|&i| self.rows[i as usize])
    }

    /// Up to `limit` member ids of `cluster` after `cursor` (exclusive) in id order, and the
    /// cursor of the next page when there is one; `None` for a cluster the snapshot lacks.
    pub fn members(
        &self,
        cluster: u32,
        cursor: Option<&str>,
        limit: usize,
    ) -> Option<(&[String], Option<&str>)> {
        let members = self.members.get_or_init(|| {
            let mut members = vec![Vec::new(); self.snapshot.clusters.len()];
            for (id, &i) in &self.user_index {
                if let Some(m) = members.get_mut(self.labels[i as usize] as usize) {
                    m.push(id.clone());
                }
            }
            members.iter_mut().for_each(|m| m.sort_unstable());
            members
        });
        let all = members.get(cluster as usize)?;
        let start = cursor.map_or(0, |c| all.partition_point(|id| id.as_str() <= c));
        let page = &all[start..(start + limit).min(all.len())];
        let next = (start + page.len() < all.len())
            .then(|| page.last().map(String::as_str))
            .flatten();
        Some((page, next))
    }

    /// Number of users that can be looked up.
    pub fn users(&self) -> usize {
        self.labels.len()
    }

    /// Some user id (for examples and load tests), the first in id order.
    pub fn any_user(&self) -> Option<&str> {
        self.user_index.keys().min().map(String::as_str)
    }
}
