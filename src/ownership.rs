//! Which Kafka partition each user's events come from, for an instance with a changelog: the
//! rows each batch gives the changelog per partition, and whom to drop or restore when the
//! consumer group moves partitions between instances.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use crate::engine::Engine;
use crate::event::Rating;
use crate::kafka::changelog::{CellChange, ChangelogBatch, PartitionChanges};
use crate::pipeline::Positions;

/// The partition of every user this instance has applied events of (user index → partition),
/// as persisted with the state.
#[derive(Debug, Default)]
pub struct Ownership {
    /// The ratings topic, whose positions are keyed `topic/partition`.
    topic: String,
    /// `topic/`, the prefix of its positions.
    prefix: String,
    by_user: FxHashMap<u32, i32>,
}

impl Ownership {
    pub fn new(topic: &str, by_user: FxHashMap<u32, i32>) -> Ownership {
        Ownership {
            topic: topic.to_string(),
            prefix: format!("{topic}/"),
            by_user,
        }
    }

    /// The partition a position key of the ratings topic names.
    pub fn partition_of_key(&self, key: &str) -> Option<i32> {
        key.strip_prefix(&self.prefix)?.parse().ok()
    }

    pub fn key_of(&self, partition: i32) -> String {
        crate::kafka::offset_key(&self.topic, partition)
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
    /// partition, once `engine` applied them: `cells`, the cells it changed (user, item,
    /// stored value), and the batch's next offsets `positions`. Also the users whose partition
    /// is new to this instance, to persist with the batch.
    pub fn batch_changes(
        &mut self,
        engine: &Engine,
        events: &[impl Rating],
        partitions: &[i32],
        cells: &[(u32, u32, f64)],
        positions: &Positions,
    ) -> (ChangelogBatch, Vec<(u32, i32)>) {
        let mut batch = ChangelogBatch::new();
        for (key, &next_offset) in positions {
            if let Some(partition) = self.partition_of_key(key) {
                batch.insert(
                    partition,
                    PartitionChanges {
                        cells: vec![],
                        next_offset,
                    },
                );
            }
        }
        let mut moved = vec![];
        let mut last_user = None;
        for (event, &partition) in events.iter().zip(partitions) {
            let Some(u) = engine.users().get(event.user()) else {
                continue;
            };
            if last_user == Some(u) {
                continue;
            }
            last_user = Some(u);
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
        }
        let (users, items) = (engine.users(), engine.items());
        for &(u, j, value) in cells {
            let Some(changes) = self.by_user.get(&u).and_then(|p| batch.get_mut(p)) else {
                // Every changed user's partition moves in the batch: a source bug, and a cell
                // without its offset must never be written.
                tracing::error!(
                    user = users.id(u),
                    "a changed cell of a partition the batch has no position for"
                );
                continue;
            };
            changes.cells.push(CellChange {
                user: users.id(u).to_string(),
                item: items.id(j).to_string(),
                value,
            });
        }
        (batch, moved)
    }
}
