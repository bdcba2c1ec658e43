//! The realistic profile is harder than the planted sets in the way real data is: weak,
//! overlapping tastes under a popularity and activity skew. Recovered dominant tastes score a
//! clearly lower ARI than planted segments of the same size, yet well above chance.

use std::collections::HashMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use segmenter::engine::matching::adjusted_rand_index;
use segmenter::engine::{Engine, EngineParams};
use segmenter::generator::{GeneratorParams, Profile, generate};
use segmenter::snapshot::{self, BuildInput, SnapshotParams};

/// ARIs of the snapshot's clusters against the truth, against the truth shuffled (chance),
/// and against activity quintiles (how much the clusters follow how much users rate).
struct Recovery {
    ari: f64,
    chance: f64,
    activity: f64,
}

fn recovery(params: &GeneratorParams) -> Recovery {
    let data = generate(params);
    let mut engine = Engine::new(EngineParams {
        components: 10,
        clusters: params.segments,
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
    let truth: HashMap<_, _> = data.truth.iter().cloned().collect();
    let (found, planted): (Vec<u32>, Vec<u32>) =
        assignments.iter().map(|(u, c)| (*c, truth[u])).unzip();
    let mut shuffled = planted.clone();
    shuffled.shuffle(&mut ChaCha8Rng::seed_from_u64(params.seed));
    let mut events_of: HashMap<&str, usize> = HashMap::new();
    for e in &data.events {
        *events_of.entry(&e.user).or_default() += 1;
    }
    let mut by_activity: Vec<usize> = assignments
        .iter()
        .map(|(u, _)| events_of[u.as_str()])
        .collect();
    by_activity.sort_unstable();
    let quintile =
        |n: usize| (5 * by_activity.partition_point(|&m| m < n) / by_activity.len()) as u32;
    let activity: Vec<u32> = assignments
        .iter()
        .map(|(u, _)| quintile(events_of[u.as_str()]))
        .collect();
    Recovery {
        ari: adjusted_rand_index(&found, &planted),
        chance: adjusted_rand_index(&found, &shuffled),
        activity: adjusted_rand_index(&found, &activity),
    }
}

/// ML-100K-sized sets (943 users, 1,682 items, 100,000 ratings, 12 segments or tastes),
/// explicit stars. Measured (seeds 1, 2, 3): planted 0.915 / 0.978 / 0.915, realistic
/// 0.124 / 0.144 / 0.084, chance within ±0.005; the realistic clusters follow activity
/// quintiles more (ARI 0.21-0.27) than tastes, as on real data.
#[test]
fn realistic_tastes_are_recovered_far_worse_than_planted_segments_but_above_chance() {
    for seed in [1, 2, 3] {
        let planted = recovery(&GeneratorParams {
            seed,
            ..GeneratorParams::default()
        });
        let realistic = recovery(&GeneratorParams {
            seed,
            profile: Profile::Realistic,
            ..GeneratorParams::default()
        });
        let figures = format!(
            "seed {seed}: planted ARI {:.3}; realistic ARI {:.3}, chance {:.4}, activity quintiles {:.3}",
            planted.ari, realistic.ari, realistic.chance, realistic.activity
        );
        assert!(planted.ari >= 0.85, "{figures}");
        assert!(realistic.ari <= planted.ari - 0.5, "{figures}");
        assert!(realistic.chance.abs() < 0.02, "{figures}");
        assert!(realistic.ari >= realistic.chance + 0.05, "{figures}");
    }
}
