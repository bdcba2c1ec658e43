//! Generated rating streams with a ground truth, deterministic from a seed, in two profiles:
//! `planted` (clearly separated segments: power-law item popularity, per-segment preferred
//! items, heavy-tailed user activity and re-ratings) and `realistic` (shaped like public
//! rating data sets, weak overlapping tastes; `realistic.rs`, calibrated in docs/generator.md).
//! Used by the demo, the tests and the benchmarks; MovieLens is never committed.

use std::io::Write;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::event::{Mode, RatingEvent};

pub mod realistic;
pub mod stats;

/// Which kind of data set to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Clearly separated planted segments, each user in exactly one (the tests' and demo's
    /// default: recovery should be near perfect).
    #[default]
    Planted,
    /// Shaped like MovieLens: Zipf popularity, log-normal activity (at least 20 ratings a
    /// user), weak overlapping tastes with a dominant one as the truth, user bias and item
    /// quality, MovieLens' star shares, timestamps over seven months.
    Realistic,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratorParams {
    pub users: usize,
    pub items: usize,
    pub events: usize,
    /// Planted segments; each user belongs to exactly one.
    pub segments: usize,
    /// Probability that an event picks from the user's segment's preferred items.
    pub affinity: f64,
    /// Fraction of each segment's items that are preferred by it (`items / segments` at 1.0).
    pub preferred_share: f64,
    /// Zipf exponent of item popularity.
    pub popularity_exponent: f64,
    /// Probability that an event re-rates an item the user already has.
    pub rerate: f64,
    pub mode: Mode,
    pub seed: u64,
    /// Time of the first event (seconds since the epoch).
    pub start_ts: i64,
    /// Which stretch of an endless stream: the same users, segments and items, fresh events.
    pub round: u64,
    /// Planted drift: from this event on, every other user (by index) of each segment takes
    /// the next segment's taste, so the grouping of users by taste changes (each new group is
    /// half of a segment and half of the one before it). `truth` is the grouping at the end.
    #[serde(default)]
    pub taste_change_at: Option<usize>,
    /// Which kind of data set. `realistic` uses `users`, `items`, `events`, `segments` (the
    /// number of latent tastes), `mode`, `seed`, `start_ts` and `round`; the other knobs shape
    /// the planted profile only.
    #[serde(default)]
    pub profile: Profile,
}

impl Default for GeneratorParams {
    fn default() -> Self {
        GeneratorParams {
            users: 943,
            items: 1682,
            events: 100_000,
            segments: 12,
            affinity: 0.8,
            preferred_share: 1.0,
            popularity_exponent: 0.9,
            rerate: 0.05,
            mode: Mode::Explicit,
            seed: 42,
            start_ts: 874_724_710,
            round: 0,
            taste_change_at: None,
            profile: Profile::Planted,
        }
    }
}

/// A generated data set: events in time order, and the planted segment of every user.
#[derive(Debug, Clone)]
pub struct GeneratedData {
    pub events: Vec<RatingEvent>,
    /// `(user id, segment)` for every user that has at least one event.
    pub truth: Vec<(String, u32)>,
    /// `(item id, title)` for every item.
    pub catalogue: Vec<(String, String)>,
}

pub fn user_id(u: usize) -> String {
    format!("u{u}")
}

pub fn item_id(i: usize) -> String {
    format!("i{i}")
}

/// Cumulative weights for O(log n) weighted sampling.
struct Weighted {
    cumulative: Vec<f64>,
}

impl Weighted {
    fn new(weights: impl IntoIterator<Item = f64>) -> Self {
        let mut total = 0.0;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                total += w;
                total
            })
            .collect();
        Weighted { cumulative }
    }
    fn sample(&self, rng: &mut ChaCha8Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let target = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c <= target)
            .min(self.cumulative.len().saturating_sub(1))
    }
}

pub fn generate(params: &GeneratorParams) -> GeneratedData {
    let mut events = Vec::with_capacity(params.events);
    let (truth, catalogue) = generate_into(params, |e| events.push(e));
    GeneratedData {
        events,
        truth,
        catalogue,
    }
}

/// Planted truth (user → segment, users with at least one event) and catalogue (item → title).
pub type TruthAndCatalogue = (Vec<(String, u32)>, Vec<(String, String)>);

/// [`generate`], handing each event to `sink` in time order instead of keeping them: what
/// a 100M-event file needs (the events alone would take about 14 GB in memory).
pub fn generate_into(
    params: &GeneratorParams,
    mut sink: impl FnMut(RatingEvent),
) -> TruthAndCatalogue {
    if params.profile == Profile::Realistic {
        return realistic::generate_into(params, sink);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let segments = params.segments.max(1);
    let world = World::plant(params, segments, &mut rng);
    if params.round > 0 {
        rng = ChaCha8Rng::seed_from_u64(round_seed(params.seed, params.round));
    }
    let mut rated: Vec<Vec<u32>> = vec![vec![]; params.users];
    let mut ts = params.start_ts;
    for n in 0..params.events {
        // Some events share a timestamp, as in real logs.
        ts += rng.random_range(0..3);
        let u = world.activity.sample(&mut rng);
        let changed = params.taste_change_at.is_some_and(|at| n >= at);
        let seg = world.taste(u, changed, segments);
        let item = world.pick_item(params, seg, &rated[u], &mut rng);
        let value = rating_value(params.mode, world.prefers(seg, item), &mut rng);
        if !rated[u].contains(&(item as u32)) {
            rated[u].push(item as u32);
        }
        sink(RatingEvent {
            user: user_id(u),
            item: item_id(item),
            value: Some(value),
            ts,
        });
    }
    let truth = (0..params.users)
        .filter(|&u| !rated[u].is_empty())
        .map(|u| {
            let changed = params.taste_change_at.is_some_and(|at| params.events > at);
            (user_id(u), world.taste(u, changed, segments) as u32)
        })
        .collect();
    (truth, catalogue(params.items, segments))
}

/// The seed of a round's draws: the world stays that of `seed`, the events are fresh.
fn round_seed(seed: u64, round: u64) -> u64 {
    seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// What stays the same across the rounds of a stream: item popularity, the segments' preferred
/// items, every user's segment and activity.
struct World {
    global: Weighted,
    /// Per segment, the first of its preferred items and their popularity weights.
    preferred: Vec<(usize, Weighted)>,
    segment_of: Vec<u32>,
    activity: Weighted,
}

impl World {
    fn plant(params: &GeneratorParams, segments: usize, rng: &mut ChaCha8Rng) -> World {
        // Popularity rank of each item is a random permutation so that segments share the head.
        let mut ranks: Vec<usize> = (0..params.items).collect();
        for i in (1..ranks.len()).rev() {
            ranks.swap(i, rng.random_range(0..=i));
        }
        let popularity: Vec<f64> = ranks
            .iter()
            .map(|&r| 1.0 / ((r + 1) as f64).powf(params.popularity_exponent))
            .collect();
        let global = Weighted::new(popularity.iter().copied());
        // Segment s prefers a block of items (by item index), sampled by popularity within it.
        let block = ((params.items / segments) as f64 * params.preferred_share)
            .round()
            .max(1.0) as usize;
        let preferred: Vec<(usize, Weighted)> = (0..segments)
            .map(|s| {
                let start = (s * params.items / segments).min(params.items.saturating_sub(1));
                let end = (start + block).min(params.items);
                (start, Weighted::new(popularity[start..end].iter().copied()))
            })
            .collect();
        let segment_of: Vec<u32> = (0..params.users)
            .map(|_| rng.random_range(0..segments) as u32)
            .collect();
        // Heavy-tailed activity: a few users rate a lot, most rate a little (as in MovieLens).
        let activity = Weighted::new((0..params.users).map(|_| {
            let u: f64 = rng.random::<f64>().max(1e-9);
            (u.powf(-0.6)).min(50.0)
        }));
        World {
            global,
            preferred,
            segment_of,
            activity,
        }
    }

    /// The item of a user's next event: a re-rating of one of the items it `rated`, one of its
    /// segment's preferred items, or any item by global popularity.
    fn pick_item(
        &self,
        params: &GeneratorParams,
        seg: usize,
        rated: &[u32],
        rng: &mut ChaCha8Rng,
    ) -> usize {
        if !rated.is_empty() && rng.random::<f64>() < params.rerate {
            rated[rng.random_range(0..rated.len())] as usize
        } else if rng.random::<f64>() < params.affinity {
            let (start, weights) = &self.preferred[seg];
            start + weights.sample(rng)
        } else {
            self.global.sample(rng)
        }
    }

    /// The segment whose taste user `u` has: its own, or after a planted taste change
    /// (`changed`) the next segment's for every other user. Draws nothing, so the stream
    /// before the change is the same as without one.
    fn taste(&self, u: usize, changed: bool, segments: usize) -> usize {
        let own = self.segment_of[u] as usize;
        if changed && u.is_multiple_of(2) {
            (own + 1) % segments
        } else {
            own
        }
    }

    /// Whether `item` is one of segment `seg`'s preferred items.
    fn prefers(&self, seg: usize, item: usize) -> bool {
        let (start, w) = &self.preferred[seg];
        item >= *start && item < start + w.cumulative.len()
    }
}

/// A rating: high in the user's segment, low outside it (explicit stars or implicit plays).
fn rating_value(mode: Mode, in_segment: bool, rng: &mut ChaCha8Rng) -> f64 {
    match mode {
        Mode::Explicit => {
            let base = if in_segment { 4.0 } else { 2.0 };
            let jitter = rng.random_range(-1..=1) as f64;
            (base + jitter).clamp(1.0, 5.0)
        }
        Mode::Implicit => {
            let mut plays = 1.0;
            while plays < 20.0 && rng.random::<f64>() < if in_segment { 0.6 } else { 0.3 } {
                plays += 1.0;
            }
            plays
        }
    }
}

/// `(item id, title)` for every item, the title naming the segment whose block holds it.
fn catalogue(items: usize, segments: usize) -> Vec<(String, String)> {
    (0..items)
        .map(|i| {
            let owner = (i * segments / items.max(1)).min(segments - 1);
            (item_id(i), format!("Item {i} (segment {owner})"))
        })
        .collect()
}

/// Writes one event as a CSV line of `user,item,rating,ts` (empty rating = retraction).
pub fn write_csv_line(e: &RatingEvent, w: &mut impl Write) -> std::io::Result<()> {
    match e.value {
        Some(v) => writeln!(w, "{},{},{},{}", e.user, e.item, v, e.ts),
        None => writeln!(w, "{},{},,{}", e.user, e.item, e.ts),
    }
}

/// Writes one event as a JSON line, the Kafka message format.
pub fn write_json_line(e: &RatingEvent, w: &mut impl Write) -> std::io::Result<()> {
    serde_json::to_writer(
        &mut *w,
        &serde_json::json!({"user": e.user, "item": e.item, "rating": e.value, "ts": e.ts}),
    )?;
    writeln!(w)
}

/// Writes events as CSV with the header `user,item,rating,ts` (empty rating = retraction).
pub fn write_csv(events: &[RatingEvent], out: &mut impl Write) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(out);
    writeln!(w, "user,item,rating,ts")?;
    for e in events {
        write_csv_line(e, &mut w)?;
    }
    w.flush()
}

/// Writes events as JSON lines, the Kafka message format.
pub fn write_json_lines(events: &[RatingEvent], out: &mut impl Write) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(out);
    for e in events {
        write_json_line(e, &mut w)?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let p = GeneratorParams {
            users: 50,
            items: 80,
            events: 2000,
            ..GeneratorParams::default()
        };
        let a = generate(&p);
        let b = generate(&p);
        assert_eq!(a.events, b.events);
        let c = generate(&GeneratorParams { seed: 7, ..p });
        assert_ne!(a.events, c.events);
        assert!(a.events.windows(2).all(|w| w[0].ts <= w[1].ts));
        assert!(
            a.events
                .iter()
                .all(|e| matches!(e.value, Some(v) if (1.0..=5.0).contains(&v)))
        );
    }
}
