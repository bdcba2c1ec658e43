//! Versioned snapshots: each snapshot with its summary and assignments, stored atomically,
//! listed, and dropped beyond the retention. Versions are never reused: the next one is above
//! both what the database holds and the version mark beside it (see `versions`).

use serde::{Deserialize, Serialize};

use crate::snapshot::{Assignments, Snapshot, SnapshotSummary};

use std::sync::Arc;

use super::versions::{Rollback, VersionMark};
use super::{Database, StoreError, corrupt, index_u32, key, meta};

/// Stored snapshots by version, with their summaries and assignments. A cheap handle: clones
/// share the database (HTTP handlers and the snapshot thread each hold one).
#[derive(Clone)]
pub struct SnapshotStore {
    db: Arc<Database>,
    versions: Arc<VersionMark>,
    /// Found at open: the database holds fewer versions than had left the process.
    rollback: Option<Rollback>,
}

/// What the change feed stores with a snapshot: every user's distance to its segment's centroid
/// (by user index, like the labels).
#[derive(Debug, Clone, Copy)]
pub struct FeedRecord<'a> {
    pub distances: &'a [f32],
}

/// One assigned user of a stored snapshot, as the change feed reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeedRow {
    pub user: u32,
    pub segment: u32,
    /// Distance to the segment's centroid in the PCA space (`None`: stored without).
    pub distance: Option<f32>,
}

/// Summary of one stored snapshot, for listings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub version: u64,
    pub created_at: String,
    pub users: u64,
    pub ratings: u64,
    pub events_applied: u64,
}

impl SnapshotStore {
    /// The snapshots of `db`, with the version mark beside it; a database that holds fewer
    /// versions than the mark is reported (logged here, see [`Self::rollback`]).
    pub(super) fn open(db: Arc<Database>) -> Result<SnapshotStore, StoreError> {
        let versions = Arc::new(VersionMark::open(&db.path)?);
        let mut store = SnapshotStore {
            db,
            versions,
            rollback: None,
        };
        store.rollback = store.rollback_below(store.versions.highest())?;
        Ok(store)
    }

    /// A rollback if `marked` (a version that left the process) is above every version the
    /// database holds, logged.
    fn rollback_below(&self, marked: u64) -> Result<Option<Rollback>, StoreError> {
        let stored = self.highest_stored_version()?;
        if marked <= stored {
            return Ok(None);
        }
        tracing::warn!(
            state_dir = %self.db.path.display(),
            stored,
            marked,
            next = marked + 1,
            "state dir rolled back: it holds snapshot versions up to {stored}, but versions up \
             to {marked} were already stored, served or published; new snapshots continue at \
             {} so that no version is reused",
            marked + 1
        );
        Ok(Some(Rollback { stored, marked }))
    }

    /// Whether the state dir was found rolled back at open: it held fewer snapshot versions
    /// than the version mark says had left the process (sled reopened at an earlier commit, or
    /// an older copy was restored). The next version continues above the mark regardless.
    pub fn rollback(&self) -> Option<Rollback> {
        self.rollback
    }

    /// Raises the floor of snapshot versions: `version` is known to have left the process (the
    /// change feed reads the last one it published back from Kafka), so the next snapshot gets
    /// a higher one. Durable before it returns. Returns the rollback it reveals (logged) when
    /// the database holds no version that high.
    pub fn raise_version_floor(&self, version: u64) -> Result<Option<Rollback>, StoreError> {
        let before = self.versions.raise(version)?;
        if version <= before {
            return Ok(None);
        }
        self.rollback_below(version)
    }

    /// The highest version the database holds or last stored (retention may have dropped it).
    fn highest_stored_version(&self) -> Result<u64, StoreError> {
        let latest = self.db.get_json::<u64>("latest_snapshot")?.unwrap_or(0);
        let listed = self.snapshot_versions()?.last().copied().unwrap_or(0);
        Ok(latest.max(listed))
    }

    /// Stores a snapshot and its assignments atomically, then drops versions older than the
    /// newest `retention`.
    pub fn put_snapshot(
        &self,
        snapshot: &Snapshot,
        labels: &[u32],
        retention: usize,
    ) -> Result<(), StoreError> {
        self.put_snapshot_with(snapshot, labels, None, retention)
    }

    /// [`Self::put_snapshot`] with what the change feed needs when it is on: each assigned
    /// user's distance to its segment's centroid (stored beside the assignments), and the
    /// versions the feed has not published yet kept whatever the retention (the feed diffs
    /// each version against the last one it published).
    pub fn put_snapshot_with(
        &self,
        snapshot: &Snapshot,
        labels: &[u32],
        feed: Option<FeedRecord<'_>>,
        retention: usize,
    ) -> Result<(), StoreError> {
        let v = snapshot.version.to_be_bytes();
        let mut packed = Vec::with_capacity(labels.len() * 8);
        for (u, &cluster) in labels.iter().enumerate() {
            if cluster == crate::engine::NO_CLUSTER {
                continue;
            }
            packed.extend_from_slice(&(u as u32).to_le_bytes());
            packed.extend_from_slice(&cluster.to_le_bytes());
        }
        let mut batch = sled::Batch::default();
        batch.insert(
            key(b's', &v),
            serde_json::to_vec(snapshot).unwrap_or_default(),
        );
        batch.insert(key(b'a', &v), packed);
        batch.insert(
            key(b'h', &v),
            serde_json::to_vec(&SnapshotSummary::from(snapshot)).unwrap_or_default(),
        );
        batch.insert(
            meta("latest_snapshot"),
            serde_json::to_vec(&snapshot.version).unwrap_or_default(),
        );
        let mut pinned = [None, None];
        if let Some(feed) = feed {
            let distances: Vec<u8> = labels
                .iter()
                .zip(feed.distances)
                .filter(|(c, _)| **c != crate::engine::NO_CLUSTER)
                .flat_map(|(_, d)| d.to_le_bytes())
                .collect();
            batch.insert(key(b'd', &v), distances);
        }
        let versions = self.snapshot_versions()?;
        if feed.is_some() {
            pinned = self.feed_pins(&versions)?;
        }
        let keep_from = versions.len().saturating_sub(retention.saturating_sub(1));
        for &old in versions[..keep_from]
            .iter()
            .filter(|&&old| !pinned.contains(&Some(old)))
        {
            for prefix in [b's', b'a', b'h', b'd'] {
                batch.remove(key(prefix, &old.to_be_bytes()));
            }
        }
        self.db.write(batch)?;
        // Before the version is served or announced to the publishers, so that a database
        // rolled back later cannot give it to other content. Not before the write: a crash in
        // between would then read as a rollback.
        self.versions.raise(snapshot.version)?;
        Ok(())
    }

    /// The versions the change feed still needs whatever the retention: the last one it is
    /// known to have published (it diffs the next against it), and the first stored after it
    /// (Kafka's record may lead this hint by that one version: a crash between the feed's
    /// commit and [`Self::set_feed_published`]). Everything else beyond the retention goes,
    /// so a feed that cannot publish keeps at most `retention + 2` snapshots.
    fn feed_pins(&self, versions: &[u64]) -> Result<[Option<u64>; 2], StoreError> {
        let published = self.feed_published()?;
        let next = versions.iter().copied().find(|&v| v > published);
        Ok([(published > 0).then_some(published), next])
    }

    /// How many stored versions the change feed has not published yet (by its hint).
    pub fn unpublished_versions(&self) -> Result<u64, StoreError> {
        let published = self.feed_published()?;
        Ok(self
            .snapshot_versions()?
            .into_iter()
            .filter(|&v| v > published)
            .count() as u64)
    }

    /// This state dir's name in the change feed's publication records, made once at random:
    /// a record with another name was written from another state dir (another instance with
    /// the same transactional id), so its version numbers are not this dir's.
    pub fn feed_origin(&self) -> Result<String, StoreError> {
        if let Some(origin) = self.db.get_json::<String>("feed_origin")? {
            return Ok(origin);
        }
        let origin = format!("{:032x}", rand::random::<u128>());
        let mut batch = sled::Batch::default();
        batch.insert(
            meta("feed_origin"),
            serde_json::to_vec(&origin).unwrap_or_default(),
        );
        self.db.write(batch)?;
        Ok(origin)
    }

    /// The last snapshot version the change feed is known to have published (0: none). A hint
    /// that may lag the feed's own record in Kafka (a crash between the two), never lead it.
    pub fn feed_published(&self) -> Result<u64, StoreError> {
        Ok(self.db.get_json::<u64>("feed_published")?.unwrap_or(0))
    }

    pub fn set_feed_published(&self, version: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(
            meta("feed_published"),
            serde_json::to_vec(&version).unwrap_or_default(),
        );
        self.db.write(batch)
    }

    /// A stored snapshot's assigned users, ascending by user index, with their distances to
    /// their segment's centroid when the snapshot was stored with them.
    pub fn feed_rows(&self, version: u64) -> Result<Option<Vec<FeedRow>>, StoreError> {
        let Some(pairs) = self.assignment_pairs(version)? else {
            return Ok(None);
        };
        let k = key(b'd', &version.to_be_bytes());
        let distances = self.db.tree.get(&k)?;
        let distances: Option<&[[u8; 4]]> = match &distances {
            Some(bytes) if bytes.len() == pairs.len() * 4 => Some(bytes.as_chunks::<4>().0),
            Some(_) => return Err(corrupt(&k, "distances do not match the assignments")),
            None => None,
        };
        Ok(Some(
            pairs
                .into_iter()
                .enumerate()
                .map(|(i, (user, segment))| FeedRow {
                    user,
                    segment,
                    distance: distances.map(|d| f32::from_le_bytes(d[i])),
                })
                .collect(),
        ))
    }

    /// The ids of users by index (`indices` ascending), in one ordered scan of the stored ids.
    pub fn user_ids(&self, indices: &[u32]) -> Result<Vec<String>, StoreError> {
        ids_in_order(self.db.tree.scan_prefix(b"n/"), indices)
    }

    /// Stored snapshot versions, ascending.
    pub fn snapshot_versions(&self) -> Result<Vec<u64>, StoreError> {
        let mut out = vec![];
        for k in self.db.tree.scan_prefix(b"s/").keys() {
            let k = k?;
            let bytes: [u8; 8] = k[2..]
                .try_into()
                .map_err(|_| corrupt(&k, "bad snapshot key"))?;
            out.push(u64::from_be_bytes(bytes));
        }
        Ok(out)
    }

    /// The version the next snapshot gets: above every version stored (versions never repeat,
    /// even after retention) and above the version mark (nor after a rollback of the database).
    pub fn next_snapshot_version(&self) -> Result<u64, StoreError> {
        Ok(self.highest_stored_version()?.max(self.versions.highest()) + 1)
    }

    pub fn snapshot(&self, version: u64) -> Result<Option<Snapshot>, StoreError> {
        let k = key(b's', &version.to_be_bytes());
        match self.db.tree.get(&k)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| corrupt(&k, e.to_string())),
        }
    }

    pub fn latest_snapshot(&self) -> Result<Option<Snapshot>, StoreError> {
        match self.snapshot_versions()?.last() {
            None => Ok(None),
            Some(&v) => self.snapshot(v),
        }
    }

    /// A snapshot's assignments with user ids resolved through the stored user records: one
    /// ordered scan of the ids beside the pairs (both ascend by user index), not a lookup per
    /// user.
    pub fn assignments(&self, version: u64) -> Result<Option<Assignments>, StoreError> {
        let Some(pairs) = self.assignment_pairs(version)? else {
            return Ok(None);
        };
        let indices: Vec<u32> = pairs.iter().map(|&(u, _)| u).collect();
        let ids = self.user_ids(&indices)?;
        Ok(Some(
            ids.into_iter()
                .zip(pairs)
                .map(|(id, (_, c))| (id, c))
                .collect(),
        ))
    }

    /// A stored snapshot's assignments to read a chunk of users at a time, in user order
    /// (`None`: no such snapshot). A download holds one chunk of ids, not the whole list.
    pub fn assignment_chunks(&self, version: u64) -> Result<Option<AssignmentChunks>, StoreError> {
        let k = key(b'a', &version.to_be_bytes());
        let Some(packed) = self.db.tree.get(&k)? else {
            return Ok(None);
        };
        if packed.len() % 8 != 0 {
            return Err(corrupt(
                &k,
                "assignments are not whole (user, cluster) pairs",
            ));
        }
        Ok(Some(AssignmentChunks {
            db: self.db.clone(),
            packed,
            next: 0,
        }))
    }

    /// Stores user ids by index from 0, as the state's commits do: for tests of readers that
    /// need many users without running an engine.
    #[cfg(test)]
    pub(crate) fn put_user_ids_for_tests(&self, ids: &[String]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (u, id) in ids.iter().enumerate() {
            batch.insert(key(b'n', &(u as u32).to_be_bytes()), id.as_bytes());
        }
        self.db.write(batch)
    }

    /// A stored snapshot's `(user index, cluster)` pairs.
    fn assignment_pairs(&self, version: u64) -> Result<Option<Vec<(u32, u32)>>, StoreError> {
        let Some(bytes) = self.db.tree.get(key(b'a', &version.to_be_bytes()))? else {
            return Ok(None);
        };
        Ok(Some(
            bytes
                .chunks_exact(8)
                .map(|pair| {
                    (
                        u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]),
                        u32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]),
                    )
                })
                .collect(),
        ))
    }

    /// The segment of user `user` (an engine index) in every retained snapshot, oldest first
    /// (for tools reading a state dir; the service reads [`Self::recent_user_history`]).
    pub fn user_history(&self, user: u32) -> Result<Vec<HistoryEntry>, StoreError> {
        self.recent_user_history(user, usize::MAX)
    }

    /// The segment of user `user` (an engine index) in the newest `limit` retained snapshots,
    /// oldest first: a reverse scan of the assignment records that stops after `limit` of them
    /// (older snapshots are not read at all), and a binary search in each (stored by ascending
    /// user index), so a history costs O(limit · log users) searches over `limit` records.
    pub fn recent_user_history(
        &self,
        user: u32,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut history = vec![];
        for record in self.db.tree.scan_prefix(b"a/").rev().take(limit) {
            let (k, packed) = record?;
            let version: [u8; 8] = k
                .get(2..)
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| corrupt(&k, "bad assignments key"))?;
            let version = u64::from_be_bytes(version);
            let Some(summary) = self.summary(version)? else {
                continue;
            };
            history.push(HistoryEntry {
                version,
                created_at: summary.created_at,
                cluster: cluster_of(&packed, user),
            });
        }
        history.reverse();
        Ok(history)
    }

    /// The index of user `id` (a scan of the ids: for tools reading a state dir, not for the
    /// service, which serves from memory).
    pub fn user_index(&self, id: &str) -> Result<Option<u32>, StoreError> {
        for entry in self.db.tree.scan_prefix(b"n/") {
            let (k, v) = entry?;
            if v.as_ref() == id.as_bytes() {
                return index_u32(&k)
                    .map(Some)
                    .ok_or_else(|| corrupt(&k, "bad user key"));
            }
        }
        Ok(None)
    }

    /// A stored snapshot's clusters by user index (`NO_CLUSTER` for users it did not assign):
    /// the start the next snapshot's clustering continues from, and its drift reference.
    pub fn assignment_labels(&self, version: u64) -> Result<Option<Vec<u32>>, StoreError> {
        let Some(pairs) = self.assignment_pairs(version)? else {
            return Ok(None);
        };
        let mut labels = vec![];
        for (u, c) in pairs {
            let u = u as usize;
            if labels.len() <= u {
                labels.resize(u + 1, crate::engine::NO_CLUSTER);
            }
            labels[u] = c;
        }
        Ok(Some(labels))
    }

    /// The summaries of up to `count` stored snapshots with versions `<= up_to`, oldest first.
    pub fn summaries(&self, up_to: u64, count: usize) -> Result<Vec<SnapshotSummary>, StoreError> {
        let versions: Vec<u64> = self
            .snapshot_versions()?
            .into_iter()
            .filter(|&v| v <= up_to)
            .collect();
        let mut out = vec![];
        for &v in &versions[versions.len().saturating_sub(count)..] {
            if let Some(s) = self.summary(v)? {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// A stored snapshot's summary; for a snapshot stored before summaries were, read from
    /// the snapshot itself.
    pub fn summary(&self, version: u64) -> Result<Option<SnapshotSummary>, StoreError> {
        let k = key(b'h', &version.to_be_bytes());
        match self.db.tree.get(&k)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| corrupt(&k, e.to_string())),
            None => Ok(self.snapshot(version)?.as_ref().map(SnapshotSummary::from)),
        }
    }

    pub fn snapshot_infos(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        Ok(self
            .summaries(u64::MAX, usize::MAX)?
            .into_iter()
            .map(|s| SnapshotInfo {
                version: s.version,
                created_at: s.created_at,
                users: s.counts.users,
                ratings: s.counts.ratings,
                events_applied: s.counts.events_applied,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::test_support::small_snapshot;

    #[test]
    fn summaries_list_and_chart_without_whole_snapshots_and_follow_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::open(dir.path()).unwrap().snapshots;
        for v in 1..=4 {
            store
                .put_snapshot(&small_snapshot(v, v == 2), &[0; 20], 3)
                .unwrap();
        }
        let summaries = store.summaries(u64::MAX, 10).unwrap();
        let versions: Vec<u64> = summaries.iter().map(|s| s.version).collect();
        assert_eq!(versions, vec![2, 3, 4], "retention drops summaries too");
        let latest = store.snapshot(4).unwrap().unwrap();
        assert_eq!(summaries[2], SnapshotSummary::from(&latest));
        assert_eq!(store.summaries(3, 1).unwrap()[0].version, 3);
        assert_eq!(
            crate::charts::diagnostics_source(&latest, &summaries),
            Some(2)
        );
        // A snapshot stored before summaries were: its summary is read from the snapshot.
        store
            .db
            .tree
            .remove(key(b'h', &3u64.to_be_bytes()))
            .unwrap();
        let third = store.snapshot(3).unwrap().unwrap();
        assert_eq!(
            store.summary(3).unwrap(),
            Some(SnapshotSummary::from(&third))
        );
        let infos = store.snapshot_infos().unwrap();
        assert_eq!(infos.len(), 3);
        assert_eq!(infos[2].users, latest.counts.users);
    }

    #[test]
    fn a_feed_that_cannot_publish_keeps_a_bounded_number_of_versions_with_distances() {
        use crate::engine::NO_CLUSTER;
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::open(dir.path()).unwrap().snapshots;
        let put = |v: u64, labels: &[u32]| {
            let distances: Vec<f32> = (0..labels.len()).map(|u| u as f32 + 0.5).collect();
            let feed = FeedRecord {
                distances: &distances,
            };
            store
                .put_snapshot_with(&small_snapshot(v, false), labels, Some(feed), 2)
                .unwrap();
        };
        for v in 1..=10 {
            put(v, &[0, NO_CLUSTER, 1]);
        }
        // Nothing published yet: the first version (Kafka's record may hold it already) and
        // the newest `retention`, nothing in between.
        assert_eq!(store.snapshot_versions().unwrap(), vec![1, 9, 10]);
        assert_eq!(store.unpublished_versions().unwrap(), 3);
        store.set_feed_published(9).unwrap();
        assert_eq!(store.feed_published().unwrap(), 9);
        assert_eq!(store.unpublished_versions().unwrap(), 1);
        put(11, &[0, NO_CLUSTER, 1]);
        put(12, &[0, NO_CLUSTER, 1]);
        put(13, &[1, 0, NO_CLUSTER]);
        // The last version published (the next diff starts from it), the one after it (Kafka
        // may have it already), the newest `retention`: never more than `retention + 2`.
        assert_eq!(store.snapshot_versions().unwrap(), vec![9, 10, 12, 13]);
        assert_eq!(store.unpublished_versions().unwrap(), 3);
        let rows = store.feed_rows(13).unwrap().unwrap();
        assert_eq!(
            rows,
            vec![
                FeedRow {
                    user: 0,
                    segment: 1,
                    distance: Some(0.5)
                },
                FeedRow {
                    user: 1,
                    segment: 0,
                    distance: Some(1.5)
                },
            ]
        );
        // A snapshot stored without the feed has no distances; the retention applies again.
        store
            .put_snapshot(&small_snapshot(14, false), &[0, 0], 2)
            .unwrap();
        assert_eq!(store.snapshot_versions().unwrap(), vec![13, 14]);
        assert!(
            store.feed_rows(14).unwrap().unwrap()[0].distance.is_none(),
            "no distances stored"
        );
        assert!(store.feed_rows(11).unwrap().is_none());
    }

    #[test]
    fn a_user_history_gives_each_retained_snapshot_its_cluster_of_the_user() {
        use crate::engine::NO_CLUSTER;
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::open(dir.path()).unwrap().snapshots;
        let labelings: [&[u32]; 4] = [
            &[0, 1, NO_CLUSTER],
            &[1, 1, 0, 2],
            &[1, NO_CLUSTER, 0, 2, 2],
            &[2, 0, 0, 1, 2, 0],
        ];
        for (i, labels) in labelings.iter().enumerate() {
            let v = i as u64 + 1;
            store
                .put_snapshot(&small_snapshot(v, false), labels, 3)
                .unwrap();
        }
        let clusters = |u: u32| -> Vec<(u64, Option<u32>)> {
            let history = store.user_history(u).unwrap();
            assert!(history.iter().all(|h| !h.created_at.is_empty()));
            history.iter().map(|h| (h.version, h.cluster)).collect()
        };
        // Version 1 fell to retention; unassigned and not-yet-known users have no cluster.
        assert_eq!(clusters(0), vec![(2, Some(1)), (3, Some(1)), (4, Some(2))]);
        assert_eq!(clusters(1), vec![(2, Some(1)), (3, None), (4, Some(0))]);
        assert_eq!(clusters(4), vec![(2, None), (3, Some(2)), (4, Some(2))]);
        assert_eq!(clusters(9), vec![(2, None), (3, None), (4, None)]);
    }

    #[test]
    fn a_recent_history_reads_only_the_newest_limit_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::open(dir.path()).unwrap().snapshots;
        for v in 1..=5 {
            let labels: Vec<u32> = (0..4).map(|u| (u + v as u32) % 3).collect();
            store
                .put_snapshot(&small_snapshot(v, false), &labels, 10)
                .unwrap();
        }
        // Snapshots 1 to 3 become unreadable: a history that touched them would fail.
        for v in 1..=3u64 {
            for prefix in [b'h', b's'] {
                store
                    .db
                    .tree
                    .insert(key(prefix, &v.to_be_bytes()), &b"not json"[..])
                    .unwrap();
            }
        }
        let recent = store.recent_user_history(2, 2).unwrap();
        let clusters: Vec<(u64, Option<u32>)> =
            recent.iter().map(|h| (h.version, h.cluster)).collect();
        assert_eq!(clusters, vec![(4, Some(0)), (5, Some(1))]);
        assert!(recent.iter().all(|h| !h.created_at.is_empty()));
        assert!(
            store.recent_user_history(2, 3).is_err(),
            "a third snapshot is read, and it is corrupt"
        );
    }

    #[test]
    fn assignments_read_in_chunks_equal_the_whole_list() {
        use crate::engine::NO_CLUSTER;
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::open(dir.path()).unwrap().snapshots;
        let ids: Vec<String> = (0..1000).map(|u| format!("user-{u}")).collect();
        store.put_user_ids_for_tests(&ids).unwrap();
        // Every third user unassigned, so chunks start at scattered user indices.
        let labels: Vec<u32> = (0..1000)
            .map(|u| if u % 3 == 1 { NO_CLUSTER } else { u % 4 })
            .collect();
        store
            .put_snapshot(&small_snapshot(1, false), &labels, 10)
            .unwrap();
        let whole = store.assignments(1).unwrap().unwrap();
        let mut chunks = store.assignment_chunks(1).unwrap().unwrap();
        assert_eq!(chunks.len(), whole.len());
        let mut read = vec![];
        while let Some(chunk) = chunks.next_chunk(97).unwrap() {
            assert!(!chunk.is_empty() && chunk.len() <= 97);
            read.extend(chunk);
        }
        assert_eq!(read, whole);
        assert_eq!(read[1], ("user-2".to_string(), 2));
        assert!(chunks.next_chunk(97).unwrap().is_none());
        assert!(store.assignment_chunks(2).unwrap().is_none());
    }

    #[test]
    fn non_finite_floats_in_a_stored_snapshot_or_model_leave_it_readable() {
        use crate::engine::PersistedModel;
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::open(dir.path()).unwrap().snapshots;
        let mut snap = small_snapshot(1, false);
        snap.kmeans.inertia = f64::NAN;
        snap.pca.explained_variance[0] = f64::INFINITY;
        store.put_snapshot(&snap, &[0; 20], 5).unwrap();
        let read = store.snapshot(snap.version).unwrap().expect("stored");
        assert!(read.kmeans.inertia.is_nan());
        assert!(
            read.pca.explained_variance[0].is_nan(),
            "infinity reads as NaN"
        );
        assert_eq!(
            read.pca.explained_variance[1],
            snap.pca.explained_variance[1]
        );

        // The model goes through the state dir as the state store writes it (`m/model`), and
        // is read back after a reopen as it loads it.
        let model = PersistedModel {
            eigenvalues: vec![1.0, f64::NAN],
            total_variance: f64::INFINITY,
            mean: vec![f64::NEG_INFINITY],
            ..PersistedModel::default()
        };
        store
            .db
            .tree
            .insert(meta("model"), serde_json::to_vec(&model).unwrap())
            .unwrap();
        store.db.tree.flush().unwrap();
        drop(store);
        let reopened = super::super::open(dir.path()).unwrap().snapshots;
        let back: PersistedModel = reopened
            .db
            .get_json("model")
            .expect("readable")
            .expect("stored");
        assert_eq!(back.eigenvalues[0], 1.0);
        assert!(
            back.eigenvalues[1].is_nan() && back.total_variance.is_nan() && back.mean[0].is_nan()
        );
    }
}

/// One snapshot's entry in a user's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub created_at: String,
    /// `None`: the snapshot did not assign the user (no ratings yet, or none left).
    pub cluster: Option<u32>,
}

/// The cluster of `user` in packed assignments (`[user u32][cluster u32]` pairs, little-endian,
/// ascending by user).
fn cluster_of(packed: &[u8], user: u32) -> Option<u32> {
    let (pairs, _) = packed.as_chunks::<8>();
    let at = pairs
        .binary_search_by_key(&user, |p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]))
        .ok()?;
    let p = pairs[at];
    Some(u32::from_le_bytes([p[4], p[5], p[6], p[7]]))
}

/// The ids of users by index (`indices` ascending) from `ids`, an ordered scan of the stored
/// ids (`n/<u32>` entries) that starts at or before the first of them.
fn ids_in_order(
    mut ids: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    indices: &[u32],
) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::with_capacity(indices.len());
    for &u in indices {
        let unknown = || corrupt(&key(b'n', &u.to_be_bytes()), "no stored id for this user");
        let id = loop {
            let (k, id) = ids.next().ok_or_else(unknown)??;
            match index_u32(&k)
                .ok_or_else(|| corrupt(&k, "bad user key"))?
                .cmp(&u)
            {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => break id,
                std::cmp::Ordering::Greater => return Err(unknown()),
            }
        };
        out.push(String::from_utf8_lossy(&id).into_owned());
    }
    Ok(out)
}

/// A stored snapshot's assignments read a chunk of users at a time ([`SnapshotStore::assignment_chunks`]):
/// it holds the stored pairs record (8 bytes a user, the value sled keeps) and resolves the ids
/// of one chunk per call, so a reader never holds the whole list of ids.
pub struct AssignmentChunks {
    db: Arc<Database>,
    packed: sled::IVec,
    /// The first pair not read yet.
    next: usize,
}

impl AssignmentChunks {
    /// Assigned users in the record.
    pub fn len(&self) -> usize {
        self.packed.len() / 8
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next up to `users` assignments (`user id`, `cluster`) in user order; `None` once
    /// all are read. The ids come from one ordered scan that starts at the chunk's first user.
    pub fn next_chunk(&mut self, users: usize) -> Result<Option<Vec<(String, u32)>>, StoreError> {
        let (pairs, _) = self.packed.as_chunks::<8>();
        let Some(chunk) = pairs.get(self.next..).filter(|rest| !rest.is_empty()) else {
            return Ok(None);
        };
        let chunk = &chunk[..chunk.len().min(users.max(1))];
        let indices: Vec<u32> = chunk
            .iter()
            .map(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]))
            .collect();
        let ids_from = key(b'n', &indices[0].to_be_bytes());
        let ids = ids_in_order(
            self.db.tree.range(ids_from..key(b'n', &[0xff; 5])),
            &indices,
        )?;
        self.next += chunk.len();
        Ok(Some(
            ids.into_iter()
                .zip(chunk)
                .map(|(id, p)| (id, u32::from_le_bytes([p[4], p[5], p[6], p[7]])))
                .collect(),
        ))
    }
}
