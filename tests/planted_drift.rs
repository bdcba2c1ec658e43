//! Planted drift: halfway through the stream every other user of each planted segment takes
//! the next segment's taste, so the grouping of users by taste changes. With a half-life the
//! segments follow the change; without one, the old ratings hold users where they were.
//!
//! Measured (explicit ratings, seed 11, 600 users, 800 items, 8 segments, 2 x 60,000 events
//! over about 120,000 s of event time, half-life 15,000 s): with the half-life the final
//! snapshot's adjusted Rand index is 1.000 against the new tastes (0.428 against the planted
//! segments); without decay 0.775 against the new tastes (0.528 against the old ones).

use std::collections::HashMap;

use segmenter::engine::matching::adjusted_rand_index;
use segmenter::engine::{Engine, EngineParams};
use segmenter::event::Mode;
use segmenter::generator::{GeneratorParams, generate};
use segmenter::snapshot::{self, BuildInput, SnapshotParams};

const EVENTS: usize = 120_000;

fn stream(mode: Mode, taste_change_at: Option<usize>) -> segmenter::generator::GeneratedData {
    generate(&GeneratorParams {
        users: 600,
        items: 800,
        events: EVENTS,
        segments: 8,
        affinity: 0.9,
        mode,
        seed: 11,
        taste_change_at,
        ..GeneratorParams::default()
    })
}

/// The final snapshot's adjusted Rand index against the tastes at the end (the new truth)
/// and against the planted segments (the old truth).
fn final_ari(mode: Mode, half_life_seconds: Option<u64>) -> (f64, f64) {
    let data = stream(mode, Some(EVENTS / 2));
    let old_truth: HashMap<String, u32> = stream(mode, None).truth.into_iter().collect();
    let new_truth: HashMap<String, u32> = data.truth.iter().cloned().collect();
    let mut engine = Engine::new(EngineParams {
        mode,
        max_value: 1e6,
        half_life_seconds,
        components: 10,
        clusters: 8,
        refresh_every_events: 10_000,
        ..EngineParams::default()
    });
    for batch in data.events.chunks(5_000) {
        engine.apply(batch);
    }
    let titles = Default::default();
    let (_, assignments) = snapshot::build(
        &engine,
        &SnapshotParams::default(),
        BuildInput::standalone(&titles, false),
    )
    .expect("enough data for a snapshot");
    let found: Vec<u32> = assignments.iter().map(|(_, c)| *c).collect();
    let against = |truth: &HashMap<String, u32>| {
        let planted: Vec<u32> = assignments.iter().map(|(u, _)| truth[u]).collect();
        adjusted_rand_index(&found, &planted)
    };
    (against(&new_truth), against(&old_truth))
}

fn check(mode: Mode) {
    // The half-life: an eighth of the stream's event time, so by the end the ratings of the
    // first half weigh at most 2^-4.
    let (decayed_new, decayed_old) = final_ari(mode, Some(15_000));
    let (kept_new, kept_old) = final_ari(mode, None);
    eprintln!(
        "{mode}: half-life ARI new {decayed_new:.3} old {decayed_old:.3}; \
         no decay ARI new {kept_new:.3} old {kept_old:.3}"
    );
    assert!(
        decayed_new >= 0.9,
        "{mode}: with a half-life, ARI against the new truth {decayed_new}"
    );
    assert!(
        kept_new < 0.9,
        "{mode}: without decay, ARI against the new truth {kept_new}"
    );
}

#[test]
fn explicit_segments_follow_a_taste_change_with_a_half_life_and_not_without() {
    check(Mode::Explicit);
}
