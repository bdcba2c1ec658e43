//! Online equals batch at every step: after each of several batches, the engine's statistics
//! (column sums, sums of squares, the covariance applied as an operator) equal statistics
//! recomputed from scratch from the raw events (independently of the engine), and each
//! refreshed PCA equals a full eigen-decomposition of the batch covariance.

use std::collections::BTreeMap;

use ndarray::Array2;
use segmenter::engine::eigen::{SymmetricOperator, jacobi_eigen};
use segmenter::engine::{Engine, EngineParams, PreviousSegments};
use segmenter::event::{Mode, RatingEvent};
use segmenter::generator::{GeneratorParams, generate};
use segmenter::snapshot::{self, BuildInput, SnapshotParams};

mod common;

/// The batch recipe's matrix, built directly from an event prefix.
fn batch_matrix(events: &[RatingEvent], mode: Mode) -> BTreeMap<(String, String), f64> {
    common::weighted_batch_matrix(events, mode, |_| 1.0)
}

use common::with_retractions;

/// The stream both parity checks replay: planted segments, and in explicit mode retractions.
fn parity_stream(mode: Mode) -> Vec<RatingEvent> {
    let events = generate(&GeneratorParams {
        users: 120,
        items: 60,
        events: 6_000,
        segments: 4,
        mode,
        seed: 3,
        ..GeneratorParams::default()
    })
    .events;
    match mode {
        Mode::Explicit => with_retractions(events),
        Mode::Implicit => events,
    }
}

/// A batch matrix's user count, column sums and `XᵀX`, over the engine's item order.
struct Moments {
    n: u64,
    sums: Vec<f64>,
    m: Array2<f64>,
}

fn moments(cells: &BTreeMap<(String, String), f64>, engine: &Engine) -> Moments {
    let (n, sums, m) = common::moments(cells, engine);
    Moments { n, sums, m }
}

/// The population covariance, batch-style, from [`Moments`].
fn covariance(n: u64, sums: &[f64], m: &Array2<f64>) -> Array2<f64> {
    let d = sums.len();
    let nf = n as f64;
    let mean: Vec<f64> = sums.iter().map(|s| s / nf).collect();
    Array2::from_shape_fn((d, d), |(i, j)| m[[i, j]] / nf - mean[i] * mean[j])
}

/// A fixed block of 3 vectors to apply the covariance operator to.
fn probe_block(d: usize) -> Array2<f64> {
    Array2::from_shape_fn((3, d), |(r, j)| ((r * 31 + j * 7) % 13) as f64 - 6.0)
}

fn check_stats_equal_batch(mode: Mode) {
    let events = parity_stream(mode);
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
        let Moments { n, sums, m } = moments(&cells, &engine);
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
        let cov = covariance(n, &sums, &m);
        // The covariance operator (no d x d matrix) equals the batch covariance on a block.
        let block = probe_block(d);
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
        let model = engine
            .snapshot_model(true, PreviousSegments::None)
            .expect("model");
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

/// The decayed batch matrix as of the largest applied `ts`, built directly from the events:
/// each event weighted by `2^(−(T − t)/h)`, computed here independently of the engine.
fn decayed_batch_matrix(
    events: &[RatingEvent],
    mode: Mode,
    half_life: f64,
) -> BTreeMap<(String, String), f64> {
    let now = events.iter().map(|e| e.ts).max().unwrap_or(0);
    common::weighted_batch_matrix(events, mode, |ts| (-((now - ts) as f64) / half_life).exp2())
}

fn assert_close(a: f64, b: f64, relative: f64, what: &str) {
    assert!(
        (a - b).abs() <= relative * a.abs().max(b.abs()).max(f64::MIN_POSITIVE),
        "{what}: {a} vs {b}"
    );
}

fn decay_params(mode: Mode, half_life_seconds: u64) -> EngineParams {
    EngineParams {
        mode,
        max_value: 1e6,
        half_life_seconds: Some(half_life_seconds),
        components: 5,
        clusters: 4,
        curve_components: 8,
        refresh_every_events: 1_000,
        ..EngineParams::default()
    }
}

/// After every batch, the decaying engine's statistics times its scale `c` (squares: `c²`),
/// its covariance operator times `c²` and its snapshot PCA equal those of the decayed batch
/// matrix; at the end, its snapshot equals the one of a non-decaying engine fed that matrix.
fn check_decay_equals_batch(mode: Mode, half_life_seconds: u64, diagnostics: bool) -> Engine {
    check_decay_equals_batch_on(parity_stream(mode), mode, half_life_seconds, diagnostics)
}

fn check_decay_equals_batch_on(
    events: Vec<RatingEvent>,
    mode: Mode,
    half_life_seconds: u64,
    diagnostics: bool,
) -> Engine {
    let mut engine = Engine::new(decay_params(mode, half_life_seconds));
    let h = half_life_seconds as f64;
    let mut applied = 0;
    for batch in events.chunks(750) {
        engine.apply(batch);
        applied += batch.len();
        let cells = decayed_batch_matrix(&events[..applied], mode, h);
        let c = engine.value_scale();
        let d = engine.items().len();
        let cov = common::assert_statistics_equal(&engine, &cells, &format!("after {applied}"));
        let (exact, _) = jacobi_eigen(&cov);
        let model = engine
            .snapshot_model(false, PreviousSegments::None)
            .expect("model");
        for i in 0..5 {
            let got = model.eigenvalues()[i] * c * c;
            assert!(
                (got - exact[i]).abs() <= 1e-8 * exact[0],
                "snapshot eigenvalue {i}: {got} vs {} after {applied}",
                exact[i]
            );
        }
        let total: f64 = (0..d).map(|i| cov[[i, i]]).sum();
        assert_close(
            model.total_variance() * c * c,
            total,
            1e-9,
            "total variance",
        );
    }
    let now = events.iter().map(|e| e.ts).max().unwrap_or(0);
    let effective: f64 = events
        .iter()
        .map(|e| (-((now - e.ts) as f64) / h).exp2())
        .sum();
    assert_close(
        engine.decay().effective_events(half_life_seconds),
        effective,
        1e-12,
        "effective events",
    );
    assert_eq!(
        engine.decay().clock_ts,
        events.iter().map(|e| e.ts).max(),
        "the clock is the largest ts"
    );
    let cells = decayed_batch_matrix(&events, mode, h);
    assert_snapshot_equals_batch_snapshot(&engine, &cells, diagnostics);
    engine
}

/// A non-decaying engine fed `cells` (the decayed batch matrix) as explicit ratings, with
/// the decaying engine's user and item order and event count (so its seeds are the same).
fn batch_engine(decaying: &Engine, cells: &BTreeMap<(String, String), f64>) -> Engine {
    let mut params = decaying.params().clone();
    params.mode = Mode::Explicit;
    params.half_life_seconds = None;
    let mut engine = Engine::new(params);
    let users = decaying.users();
    let items = decaying.items();
    let event = |u: u32, j: u32, value: Option<f64>| RatingEvent {
        user: users.id(u).to_string(),
        item: items.id(j).to_string(),
        value,
        ts: 0,
    };
    // Ids interned in the decaying engine's order, with nothing rated.
    let mut priming = vec![];
    for j in 0..items.len() as u32 {
        priming.extend([event(0, j, Some(1.0)), event(0, j, None)]);
    }
    for u in 0..users.len() as u32 {
        priming.extend([event(u, 0, Some(1.0)), event(u, 0, None)]);
    }
    engine.apply(&priming);
    let mut rated = vec![];
    for ((user, item), v) in cells {
        let (u, j) = (
            users.get(user).expect("user"),
            items.get(item).expect("item"),
        );
        rated.push((u, j, *v));
    }
    rated.sort_by_key(|&(u, j, _)| (u, j));
    let fed: Vec<RatingEvent> = rated
        .iter()
        .map(|&(u, j, v)| event(u, j, Some(v)))
        .collect();
    engine.apply(&fed);
    // Re-ratings with the same value change nothing but the event count.
    let target = decaying.counters().events_applied;
    let have = engine.counters().events_applied;
    assert!(have <= target, "more cells than events");
    let same: Vec<RatingEvent> = fed
        .iter()
        .cycle()
        .take((target - have) as usize)
        .cloned()
        .collect();
    engine.apply(&same);
    assert_eq!(engine.counters().events_applied, target);
    engine
}

/// With `diagnostics`, also their inertia curves (fresh k-means starts on a sample).
fn assert_snapshot_equals_batch_snapshot(
    decaying: &Engine,
    cells: &BTreeMap<(String, String), f64>,
    diagnostics: bool,
) {
    let mut batch = batch_engine(decaying, cells);
    let mut decaying = decaying.clone();
    // Both from the data alone (as a replay's snapshot): a cold solve and fresh starts.
    decaying.forget_model(&mut ());
    batch.forget_model(&mut ());
    let titles = Default::default();
    let params = SnapshotParams::default();
    let (a, a_assigned) =
        snapshot::build(&decaying, &params, BuildInput::standalone(&titles, true))
            .expect("decaying snapshot");
    let (b, b_assigned) = snapshot::build(&batch, &params, BuildInput::standalone(&titles, true))
        .expect("batch snapshot");
    assert_eq!(a_assigned, b_assigned, "labels");
    assert_eq!(a.kmeans.sizes, b.kmeans.sizes);
    assert_eq!(a.counts, b.counts);
    let tol = 1e-9;
    assert_close(a.kmeans.inertia, b.kmeans.inertia, tol, "inertia");
    for (x, y) in a
        .pca
        .explained_variance
        .iter()
        .zip(&b.pca.explained_variance)
    {
        assert_close(*x, *y, tol, "explained variance");
    }
    for (x, y) in a.pca.singular_values.iter().zip(&b.pca.singular_values) {
        assert_close(*x, *y, tol, "singular value");
    }
    for (x, y) in a
        .pca
        .explained_variance_ratio
        .iter()
        .zip(&b.pca.explained_variance_ratio)
    {
        assert_close(*x, *y, tol, "explained variance ratio");
    }
    assert_close(
        a.pca.total_variance,
        b.pca.total_variance,
        tol,
        "total variance",
    );
    assert_eq!(
        a.validation, b.validation,
        "Naive Bayes on the decayed values"
    );
    for (p, q) in a.clusters.iter().zip(&b.clusters) {
        let norm = q.centroid.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (x, y) in p.centroid.iter().zip(&q.centroid) {
            assert!((x - y).abs() <= tol * norm, "centroid {x} vs {y}");
        }
        assert_eq!(p.n_items, q.n_items);
        for (s, t) in p.top_items.iter().zip(&q.top_items) {
            assert_eq!((&s.item, s.raters), (&t.item, t.raters));
            assert_close(s.score, t.score, tol, "profile score");
            assert_close(
                s.mean_rating.unwrap_or(0.0),
                t.mean_rating.unwrap_or(0.0),
                tol,
                "mean rating",
            );
        }
    }
    let (da, db) = (
        a.diagnostics.expect("diagnostics"),
        b.diagnostics.expect("diagnostics"),
    );
    let curves = if diagnostics {
        da.inertia_by_k.k.len()
    } else {
        0
    };
    for (x, y) in da
        .inertia_by_k
        .projected
        .iter()
        .zip(&db.inertia_by_k.projected)
        .take(curves)
    {
        assert_close(*x, *y, 1e-9, "projected inertia by k");
    }
    for (x, y) in da
        .inertia_by_k
        .full
        .iter()
        .zip(&db.inertia_by_k.full)
        .take(curves)
    {
        assert_close(*x, *y, 1e-9, "full inertia by k");
    }
    let decay = a.decay.expect("a decaying snapshot reports its decay");
    assert!(b.decay.is_none());
    assert_eq!(
        decay.half_life_seconds,
        decaying.params().half_life_seconds.unwrap_or(0)
    );
    assert_eq!(decay.scale, decaying.value_scale());
}

#[test]
fn explicit_decay_equals_batch_on_the_decayed_matrix() {
    // About 6,000 s of event time: weights from 1 down to about 2^-4.
    let engine = check_decay_equals_batch(Mode::Explicit, 1_500, true);
    let origin = engine.decay().origin_ts.expect("an origin");
    assert!(origin < 874_724_710 + 3, "no rebase here: origin {origin}");
}

#[test]
fn implicit_decay_equals_batch_on_the_decayed_matrix() {
    check_decay_equals_batch(Mode::Implicit, 1_500, true);
}

#[test]
fn decay_parity_holds_for_events_out_of_time_order() {
    // Every third event is stamped 900 s earlier than its place in the stream: it is weighed
    // by its own time (less), and in explicit mode it still replaces what came before it.
    for mode in [Mode::Explicit, Mode::Implicit] {
        let mut events = parity_stream(mode);
        for e in events.iter_mut().step_by(3) {
            e.ts -= 900;
        }
        check_decay_equals_batch_on(events, mode, 1_500, false);
    }
}

#[test]
fn decay_parity_holds_across_rebases() {
    // A 40 s half-life over about 6,000 s: the origin moves twice by 64 half-lives. Most
    // users then hold only ratings weighing under 2^-60, nearly one point at the origin, where
    // the diagnostics' fresh k-means starts on a sample tie (the snapshot's own clustering,
    // PCA, Naive Bayes and profiles are still compared).
    for mode in [Mode::Explicit, Mode::Implicit] {
        let engine = check_decay_equals_batch(mode, 40, false);
        let first = 874_724_710;
        let origin = engine.decay().origin_ts.expect("an origin");
        assert!(origin >= first + 2 * 64 * 40, "{mode}: origin {origin}");
    }
}
