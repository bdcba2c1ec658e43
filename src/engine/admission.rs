//! Admission ahead of the engine: the caps on items and users, the id length limit and the
//! decay clock's age limit, checked the way the engine checks them so a source can route
//! refused events elsewhere (the dead-letter topic) before handing a batch over.

use super::{DecayClock, Engine, IdMap};
use crate::event::{Rating, RejectReason};

/// The engine's admission rules ([`Engine::admits_item`], [`Engine::admits_user`]) ahead of
/// the engine: a source that must route refused events elsewhere (the Kafka consumer's
/// dead-letter topic) decides before handing a batch over. It sees events in the order the
/// engine applies them and checks them in the engine's order (item, then user, nothing
/// recorded for a refused event), so it admits exactly the events the engine will.
#[derive(Debug, Clone)]
///
/// With a half-life it also follows the decay origin, so it refuses as the engine does an
/// event too old to weigh ([`DecayClock::refuses`]) and such an event is dead-lettered.
pub struct AdmissionGate {
    items: IdMap,
    max_items: usize,
    /// The users known, by a 128-bit digest of their id rather than a second copy of every id
    /// string: the gate must know every user, and users outnumber items by far. Two ids share a
    /// digest with a probability of about n²/2¹²⁹ (10⁻²⁵ for ten million users).
    users: rustc_hash::FxHashSet<u128>,
    max_users: usize,
    pub(super) decay: DecayClock,
    half_life_seconds: Option<u64>,
}

impl AdmissionGate {
    pub fn new(engine: &Engine) -> Self {
        AdmissionGate {
            items: IdMap::from_ids(engine.items().ids().iter().cloned().collect()),
            max_items: engine.params().max_items,
            users: engine
                .users()
                .ids()
                .iter()
                .map(|id| id_digest(id))
                .collect(),
            max_users: engine.params().max_users,
            decay: engine.decay(),
            half_life_seconds: engine.params().half_life_seconds,
        }
    }

    /// Admits an event that passed the value policy as the engine will (refused when too old
    /// for the decay clock, for a new item past the item cap, or for a new user past the user
    /// cap, in that order), recording what it changes.
    pub fn admit_event(&mut self, event: &impl Rating) -> Result<(), crate::event::Rejection> {
        let Some(half_life) = self.half_life_seconds else {
            return self.admit(event.user(), event.item());
        };
        if let Some(rejection) = self.decay.refuses(event.ts(), event.value(), half_life) {
            return Err(rejection);
        }
        self.admit(event.user(), event.item())?;
        // The origin moves as the engine's will when it applies the event.
        let spans = self.decay.spans_due(event.ts(), half_life);
        if spans > 0 {
            self.decay.advance(spans, half_life);
        }
        self.decay.clock_ts = Some(
            self.decay
                .clock_ts
                .map_or(event.ts(), |c| c.max(event.ts())),
        );
        Ok(())
    }

    /// Admits an event of `user` for `item` (recording both when new), or refuses it with the
    /// reason's detail.
    pub fn admit(&mut self, user: &str, item: &str) -> Result<(), crate::event::Rejection> {
        let new_item = self.items.get(item).is_none();
        if new_item && self.items.len() >= self.max_items {
            return Err(catalogue_full(item, self.max_items));
        }
        let digest = id_digest(user);
        if !self.users.contains(&digest) {
            if self.users.len() >= self.max_users {
                return Err(population_full(user, self.max_users));
            }
            self.users.insert(digest);
        }
        if new_item {
            self.items.intern(item);
        }
        Ok(())
    }
}

/// A 128-bit digest of an id: two SipHash passes over differently salted input. Digests live
/// in memory only, so `DefaultHasher`'s fixed keys (the same for every instance) suffice.
fn id_digest(id: &str) -> u128 {
    use std::hash::{Hash, Hasher};
    let half = |salt: u8| {
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

/// The rejection of an event for a new `item` once the catalogue holds `max_items` items.
pub fn catalogue_full(item: &str, max_items: usize) -> crate::event::Rejection {
    crate::event::Rejection::new(
        RejectReason::CatalogueFull,
        format!(
            "item `{item}` is new and the catalogue already holds [model] max_items = {max_items} items"
        ),
    )
}

/// The rejection of an event of a new `user` once the engine holds `max_users` users.
pub fn population_full(user: &str, max_users: usize) -> crate::event::Rejection {
    crate::event::Rejection::new(
        RejectReason::PopulationFull,
        format!(
            "user `{user}` is new and the engine already holds [model] max_users = {max_users} users"
        ),
    )
}
