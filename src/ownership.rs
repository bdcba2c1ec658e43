//! Which Kafka partition each user's events come from, for an instance with a changelog: the
//! rows each batch gives the changelog per partition, and whom to drop or restore when the
//! consumer group moves partitions between instances.

use std::collections::BTreeSet;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::engine::Engine;
use crate::event::Rating;
use crate::kafka::changelog::{ChangelogBatch, PartitionChanges, Row};
use crate::pipeline::Positions;

/// The partition of every user this instance has applied events of (user index → partition),
/// as persisted with the state.
#[derive(Debug, Default)]
pub struct Ownership {
    /// `topic/` of the ratings topic, the prefix of its positions.
    prefix: String,
    by_user: FxHashMap<u32, i32>,
}

impl Ownership {
    pub fn new(topic: &str, by_user: FxHashMap<u32, i32>) -> Ownership {
        Ownership {
            prefix: format!("{topic}/"),
            by_user,
        }
    }

    /// The partition a position key of the ratings topic names.
    pub fn partition_of_key(&self, key: &str) -> Option<i32> {
        key.strip_prefix(&self.prefix)?.parse().ok()
    }

    pub fn key_of(&self, partition: i32) -> String {
        format!("{}{partition}", self.prefix)
    }

    /// Partitions this instance holds state of: those it has positions for, and those of
    /// users it holds.
    pub fn held(&self, positions: &Positions) -> BTreeSet<i32> {
        positions
            .keys()
            .filter_map(|k| self.partition_of_key(k))
            .chain(self.by_user.values().copied())
            .collect()
    }

    /// The users of the partitions `which` selects.
    pub fn users_of(&self, which: impl Fn(i32) -> bool) -> Vec<u32> {
        let mut users: Vec<u32> = self
            .by_user
            .iter()
            .filter(|&(_, &p)| which(p))
            .map(|(&u, _)| u)
            .collect();
        users.sort_unstable();
        users
    }

    /// Notes that `user` belongs to `partition`; `true` when that is new (to be persisted).
    pub fn assign(&mut self, user: u32, partition: i32) -> bool {
        self.by_user.insert(user, partition) != Some(partition)
    }

    /// What a batch of `events` (the `i`-th from partition `partitions[i]`) changed, by
    /// partition, once `engine` applied them, with the batch's next offsets `positions`; and
    /// the users whose partition is new to this instance, to persist with the batch.
    pub fn batch_changes(
        &mut self,
        engine: &Engine,
        events: &[impl Rating],
        partitions: &[i32],
        positions: &Positions,
    ) -> (ChangelogBatch, Vec<(u32, i32)>) {
        let mut batch = ChangelogBatch::new();
        for (key, &next_offset) in positions {
            if let Some(partition) = self.partition_of_key(key) {
                batch.insert(
                    partition,
                    PartitionChanges {
                        rows: vec![],
                        next_offset,
                    },
                );
            }
        }
        let mut seen: FxHashSet<u32> = FxHashSet::default();
        let mut moved = vec![];
        for (event, &partition) in events.iter().zip(partitions) {
            let Some(u) = engine.users().get(event.user()) else {
                continue;
            };
            if !seen.insert(u) {
                continue;
            }
            let Some(changes) = batch.get_mut(&partition) else {
                // Every event moves its partition's position: a source bug, and a row without
                // its offset must never be written.
                tracing::error!(
                    partition,
                    "an event of a partition the batch has no position for"
                );
                continue;
            };
            match self.by_user.insert(u, partition) {
                Some(p) if p == partition => {}
                previous => {
                    if let Some(previous) = previous {
                        tracing::warn!(
                            user = event.user(),
                            previous,
                            partition,
                            "a user's events came from another partition: key every event by \
                             its user id, or a moved partition restores this user's row wrongly"
                        );
                    }
                    moved.push((u, partition));
                }
            }
            let items = engine.items();
            let cells = engine
                .stored_vector(u)
                .iter()
                .map(|(j, v)| (items.id(j).to_string(), v))
                .collect();
            changes.rows.push(Row {
                user: event.user().to_string(),
                cells,
            });
        }
        (batch, moved)
    }
}
