//! Online equals batch at every step: after each of several batches, the engine's statistics
//! (column sums, sums of squares, the covariance applied as an operator) equal statistics
//! recomputed from scratch from the raw events (independently of the engine), and each
//! refreshed PCA equals a full eigen-decomposition of the batch covariance.

use std::collections::BTreeMap;

use ndarray::Array2;
use segmenter::engine::eigen::{SymmetricOperator, jacobi_eigen};
use segmenter::engine::{Engine, EngineParams};
use segmenter::event::{Mode, RatingEvent};
use segmenter::generator::{GeneratorParams, generate};

/// The batch recipe's matrix, built directly from an event prefix.
fn batch_matrix(events: &[RatingEvent], mode: Mode) -> BTreeMap<(String, String), f64> {
    let mut cells = BTreeMap::new();
    for e in events {
        let key = (e.user.clone(), e.item.clone());
        match (mode, e.value) {
            (Mode::Explicit, Some(v)) => {
                cells.insert(key, v);
            }
            (Mode::Explicit, None) => {
                cells.remove(&key);
            }
            (Mode::Implicit, Some(v)) => *cells.entry(key).or_insert(0.0) += v,
            (Mode::Implicit, None) => {}
        }
    }
    cells.retain(|_, v| *v != 0.0);
    cells
}

fn with_retractions(mut events: Vec<RatingEvent>) -> Vec<RatingEvent> {
    // Every 7th event retracts an earlier rating instead (explicit mode's null value).
    for i in (7..events.len()).step_by(7) {
        let earlier = events[i - 5].clone();
        events[i] = RatingEvent {
            value: None,
            ts: events[i].ts,
            ..earlier
        };
    }
    events
}

fn check_stats_equal_batch(mode: Mode) {
    let mut events = generate(&GeneratorParams {
        users: 120,
        items: 60,
        events: 6_000,
        segments: 4,
        mode,
        seed: 3,
        ..GeneratorParams::default()
    })
    .events;
    if mode == Mode::Explicit {
        events = with_retractions(events);
    }
    let mut engine = Engine::new(EngineParams {
        mode,
        max_value: 1e6,
        components: 5,
        clusters: 4,
        curve_components: 8,
        refresh_every_events: 1_000,
        ..EngineParams::default()
    });
    let mut applied = 0;
    let mut refreshes_checked = 0;
    for batch in events.chunks(750) {
        let outcome = engine.apply(batch);
        applied += batch.len();
        let cells = batch_matrix(&events[..applied], mode);
        // Independent statistics over the engine's item order.
        let d = engine.items().len();
        let mut rows: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for ((user, item), v) in &cells {
            let j = engine.items().get(item).expect("item known") as usize;
            rows.entry(user.as_str()).or_insert_with(|| vec![0.0; d])[j] = *v;
        }
        let n = rows.len() as u64;
        let mut sums = vec![0.0; d];
        let mut m = Array2::<f64>::zeros((d, d));
        for x in rows.values() {
            for i in 0..d {
                sums[i] += x[i];
                for j in 0..d {
                    m[[i, j]] += x[i] * x[j];
                }
            }
        }
        assert_eq!(
            engine.active_users(),
            n,
            "user count after {applied} events"
        );
        assert_eq!(engine.ratings(), cells.len() as u64);
        for (a, b) in engine.stats().sums().iter().zip(&sums) {
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                "column sum {a} vs {b}"
            );
        }
        for (j, (a, b)) in engine.stats().squares().iter().zip(m.diag()).enumerate() {
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                "sum of squares of item {j}: {a} vs {b} after {applied} events"
            );
        }

        // Covariance and its spectrum, batch-style.
        let nf = n as f64;
        let mean: Vec<f64> = sums.iter().map(|s| s / nf).collect();
        let cov = Array2::from_shape_fn((d, d), |(i, j)| m[[i, j]] / nf - mean[i] * mean[j]);
        // The covariance operator (no d x d matrix) equals the batch covariance on a block.
        let block = Array2::from_shape_fn((3, d), |(r, j)| ((r * 31 + j * 7) % 13) as f64 - 6.0);
        let online = engine
            .stats()
            .operator(engine.vectors(), d)
            .apply_rows(&block);
        let batch = block.dot(&cov);
        let worst = (&online - &batch)
            .iter()
            .fold(0.0f64, |w, x| w.max(x.abs()));
        let scale = batch.iter().fold(1.0f64, |w, x| w.max(x.abs()));
        assert!(
            worst <= 1e-9 * scale,
            "covariance operator differs by {worst} after {applied} events"
        );
        let (exact, _) = jacobi_eigen(&cov);
        if !outcome.refreshes.is_empty() && applied % 1_000 == 0 {
            // A refresh at exactly this event count saw exactly this matrix.
            let values = engine.model().eigenvalues();
            for i in 0..5 {
                assert!(
                    (values[i] - exact[i]).abs() <= 1e-5 * exact[0],
                    "refresh eigenvalue {i}"
                );
            }
            refreshes_checked += 1;
        }
        let model = engine.snapshot_model(true, None).expect("model");
        for i in 0..5 {
            let got = model.eigenvalues()[i];
            assert!(
                (got - exact[i]).abs() <= 1e-8 * exact[0],
                "snapshot eigenvalue {i}: {got} vs {}",
                exact[i]
            );
        }
        let total: f64 = (0..d).map(|i| cov[[i, i]]).sum();
        assert!((model.total_variance() - total).abs() <= 1e-9 * total);
    }
    assert!(
        refreshes_checked >= 2,
        "the test must see periodic refreshes"
    );
}

#[test]
fn explicit_statistics_equal_batch_after_every_batch() {
    check_stats_equal_batch(Mode::Explicit);
}

#[test]
fn implicit_statistics_equal_batch_after_every_batch() {
    check_stats_equal_batch(Mode::Implicit);
}

#[test]
fn batch_boundaries_do_not_change_the_result() {
    let events = generate(&GeneratorParams {
        users: 200,
        items: 90,
        events: 8_000,
        segments: 5,
        seed: 9,
        ..GeneratorParams::default()
    })
    .events;
    let params = EngineParams {
        components: 5,
        clusters: 5,
        refresh_every_events: 1_500,
        ..EngineParams::default()
    };
    let mut one = Engine::new(params.clone());
    one.apply(&events);
    let mut many = Engine::new(params);
    for batch in events.chunks(333) {
        many.apply(batch);
    }
    assert_eq!(one.model().labels(), many.model().labels());
    assert_eq!(one.model().eigenvalues(), many.model().eigenvalues());
}
