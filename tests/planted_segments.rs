//! Planted segments are recovered: the online engine plus snapshot clustering finds the
//! generator's ground truth on a clearly separated set.

use segmenter::engine::matching::adjusted_rand_index;
use segmenter::engine::{Engine, EngineParams};
use segmenter::generator::{GeneratorParams, generate};
use segmenter::snapshot::{self, BuildInput, SnapshotParams};

#[test]
fn planted_segments_are_recovered_with_ari_above_0_9() {
    let data = generate(&GeneratorParams {
        users: 600,
        items: 800,
        events: 60_000,
        segments: 8,
        affinity: 0.9,
        seed: 11,
        ..GeneratorParams::default()
    });
    let mut engine = Engine::new(EngineParams {
        components: 10,
        clusters: 8,
        refresh_every_events: 10_000,
        ..EngineParams::default()
    });
    for batch in data.events.chunks(5_000) {
        engine.apply(batch);
    }
    let titles = Default::default();
    let (snap, assignments) = snapshot::build(
        &engine,
        &SnapshotParams::default(),
        BuildInput::standalone(&titles, false),
    )
    .expect("enough data for a snapshot");
    let truth: std::collections::HashMap<_, _> = data.truth.iter().cloned().collect();
    let (found, planted): (Vec<u32>, Vec<u32>) =
        assignments.iter().map(|(u, c)| (*c, truth[u])).unzip();
    let ari = adjusted_rand_index(&found, &planted);
    assert!(ari >= 0.9, "ARI {ari}, sizes {:?}", snap.kmeans.sizes);
    // The online clustering (before the snapshot's polish) should already be close.
    let online: Vec<u32> = assignments
        .iter()
        .map(|(u, _)| {
            engine
                .model()
                .label(engine.users().get(u).unwrap() as usize)
        })
        .collect();
    let online_ari = adjusted_rand_index(&online, &planted);
    assert!(online_ari >= 0.8, "online ARI {online_ari}");
}
