//! What the state store must write next, as the engine reports it: the cells, labels and model
//! changed since the last commit, the users changed since the last checkpoint, and the ids
//! persisted so far. Kept beside the engine (the pipeline owns it), so the engine holds no
//! bookkeeping of what was saved.

use std::ops::Range;

use crate::engine::{ChangeSink, Engine};

/// Accumulates the engine's reports between commits; [`super::StateStore::prepare_commit`]
/// takes them.
#[derive(Debug)]
pub struct ChangeTracker {
    /// (user, item, new value) of the cells changed since the last commit, in change order with
    /// repeats (a push
    /// per event is far cheaper than a set insert; [`ChangeTracker::take`] sorts and dedups).
    cells: Vec<(u32, u32, f64)>,
    /// Users changed since the last checkpoint of whole user records.
    checkpoint_users: UserSet,
    /// Users whose label changed since the last commit, with repeats; not kept once the model
    /// changed, since every label is written then.
    labels: Vec<u32>,
    model: bool,
    /// Ids are only appended: those at or past these counts are not persisted yet.
    persisted_users: u32,
    persisted_items: u32,
}

/// What one commit writes, taken from a [`ChangeTracker`].
pub(super) struct Changes {
    /// (user, item, value), ascending by (user, item), distinct; the value each cell was given
    /// last.
    pub cells: Vec<(u32, u32, f64)>,
    /// Users whose label changed, ascending, distinct; empty when `model` (every label is
    /// written then).
    pub labels: Vec<u32>,
    pub model: bool,
    pub new_users: Range<u32>,
    pub new_items: Range<u32>,
}

impl ChangeSink for ChangeTracker {
    #[inline]
    fn cell_changed(&mut self, user: u32, item: u32, value: f64) {
        self.cells.push((user, item, value));
        self.checkpoint_users.insert(user);
    }

    fn label_changed(&mut self, user: u32) {
        if !self.model {
            self.labels.push(user);
        }
    }

    fn model_changed(&mut self) {
        self.model = true;
        self.labels = Vec::new();
    }
}

impl ChangeTracker {
    /// The tracker of an engine just loaded: everything it holds is persisted, but the users in
    /// `stale` have a checkpoint record older than their vector (their changes are in the log).
    pub(super) fn loaded(engine: &Engine, stale: UserSet) -> ChangeTracker {
        ChangeTracker {
            cells: Vec::new(),
            checkpoint_users: stale,
            labels: Vec::new(),
            model: false,
            persisted_users: engine.users().len() as u32,
            persisted_items: engine.items().len() as u32,
        }
    }

    /// What changed since the previous call; from then on, `engine`'s ids count as persisted.
    pub(super) fn take(&mut self, engine: &Engine) -> Changes {
        let cells = last_values(std::mem::take(&mut self.cells));
        let mut labels = std::mem::take(&mut self.labels);
        labels.sort_unstable();
        labels.dedup();
        let (users, items) = (engine.users().len() as u32, engine.items().len() as u32);
        let changes = Changes {
            cells,
            labels,
            model: std::mem::take(&mut self.model),
            new_users: self.persisted_users..users,
            new_items: self.persisted_items..items,
        };
        self.persisted_users = users;
        self.persisted_items = items;
        changes
    }

    /// The cells changed since the last commit, each once with the value it was given last
    /// (user, item, value; zero: removed), ascending: what a changelog writes for the commit.
    /// Kept in that form, so the commit's [`ChangeTracker::take`] finds them sorted already.
    pub fn changed_cells(&mut self) -> &[(u32, u32, f64)] {
        self.cells = last_values(std::mem::take(&mut self.cells));
        &self.cells
    }

    /// Users changed since the previous call, ascending (the users a checkpoint rewrites).
    pub(super) fn take_checkpoint_users(&mut self) -> Vec<u32> {
        self.checkpoint_users.take()
    }
}

/// `cells` in (user, item) order, each cell once with the value it was given last.
fn last_values(mut cells: Vec<(u32, u32, f64)>) -> Vec<(u32, u32, f64)> {
    // Stable, so a cell changed twice keeps the value it was given last.
    cells.sort_by_key(|&(u, j, _)| (u, j));
    cells.dedup_by(|later, kept| {
        let same = (later.0, later.1) == (kept.0, kept.1);
        if same {
            kept.2 = later.2;
        }
        same
    });
    cells
}

/// A set of user indices as a bitmap: an insert per event costs a bit, not a hash.
#[derive(Debug, Clone, Default)]
pub(super) struct UserSet {
    words: Vec<u64>,
}

impl UserSet {
    #[inline]
    pub(super) fn insert(&mut self, user: u32) {
        let word = user as usize / 64;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (user % 64);
    }

    /// The members, ascending; the set is left empty.
    fn take(&mut self) -> Vec<u32> {
        let mut users = Vec::new();
        for (w, word) in std::mem::take(&mut self.words).into_iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                users.push((w * 64) as u32 + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
        users
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineParams, SourceIds};
    use crate::event::RatingEvent;

    #[test]
    fn a_user_set_gives_its_members_once_ascending_and_empties() {
        let mut set = UserSet::default();
        for u in [700, 3, 64, 63, 3, 0, 700, 128] {
            set.insert(u);
        }
        assert_eq!(set.take(), vec![0, 3, 63, 64, 128, 700]);
        assert!(set.take().is_empty());
        set.insert(5);
        assert_eq!(set.take(), vec![5]);
    }

    #[test]
    fn a_tracker_gives_each_change_once_and_new_ids_from_where_the_last_commit_ended() {
        let ev = |user: &str, item: &str, value: Option<f64>| RatingEvent {
            user: user.into(),
            item: item.into(),
            value,
            ts: 0,
        };
        fn apply(engine: &mut Engine, tracker: &mut ChangeTracker, events: &[RatingEvent]) {
            engine.apply_with_source_ids(events, &mut SourceIds::default(), tracker);
        }
        let mut engine = Engine::new(EngineParams::default());
        let mut tracker = ChangeTracker::loaded(&engine, UserSet::default());
        apply(
            &mut engine,
            &mut tracker,
            &[
                ev("a", "x", Some(3.0)),
                ev("b", "y", Some(1.0)),
                ev("a", "x", Some(4.0)),
                // The same value again changes nothing.
                ev("b", "y", Some(1.0)),
            ],
        );
        let first = tracker.take(&engine);
        assert_eq!(first.cells, vec![(0, 0, 4.0), (1, 1, 1.0)]);
        assert_eq!((first.new_users, first.new_items), (0..2, 0..2));
        assert!(!first.model && first.labels.is_empty());
        apply(&mut engine, &mut tracker, &[ev("c", "x", Some(2.0))]);
        let second = tracker.take(&engine);
        assert_eq!(second.cells, vec![(2, 0, 2.0)]);
        assert_eq!((second.new_users, second.new_items), (2..3, 2..2));
        assert_eq!(tracker.take_checkpoint_users(), vec![0, 1, 2]);
        assert!(tracker.take_checkpoint_users().is_empty());
        engine.forget_model(&mut tracker);
        tracker.label_changed(1);
        let third = tracker.take(&engine);
        assert!(third.model && third.labels.is_empty() && third.cells.is_empty());
    }
}
