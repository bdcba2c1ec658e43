//! `segmenter bench`: engine throughput (events/s, single thread, every online update on) and
//! snapshot build time on generated streams of fixed shapes. Figures, not assertions.

use std::time::Instant;

use serde::Serialize;

use crate::engine::{Engine, EngineParams};
use crate::generator::{GeneratorParams, Profile, generate};
use crate::snapshot::{self, BuildInput, SnapshotParams};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// 943 users, 1,682 items, 100,000 events (MovieLens 100K).
    Ml100k,
    /// 100,000 users, 5,000 items, 5,000,000 events.
    Large,
    /// MovieLens 100K's size in the realistic profile (weak overlapping tastes, log-normal
    /// activity, Zipf-Mandelbrot popularity).
    Realistic,
    /// The large shape in the realistic profile.
    RealisticLarge,
}

impl Shape {
    pub fn generator(self) -> GeneratorParams {
        match self {
            Shape::Ml100k => GeneratorParams::default(),
            Shape::Large => GeneratorParams {
                users: 100_000,
                items: 5_000,
                events: 5_000_000,
                segments: 25,
                ..GeneratorParams::default()
            },
            Shape::Realistic => GeneratorParams {
                profile: Profile::Realistic,
                ..Shape::Ml100k.generator()
            },
            Shape::RealisticLarge => GeneratorParams {
                profile: Profile::Realistic,
                ..Shape::Large.generator()
            },
        }
    }
    /// Default periodic refresh interval: the configured default for the MovieLens shape; for
    /// the large one every 1M events (5 refreshes), as a service would set it for that volume.
    pub fn refresh_every(self) -> u64 {
        match self {
            Shape::Ml100k | Shape::Realistic => EngineParams::default().refresh_every_events,
            Shape::Large | Shape::RealisticLarge => 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub shape: String,
    pub users: usize,
    pub items: usize,
    pub events: usize,
    pub batch_size: usize,
    pub refresh_every_events: u64,
    pub refreshes: usize,
    pub refresh_seconds: f64,
    pub apply_seconds: f64,
    pub events_per_second: f64,
    /// Throughput of the per-event work alone (apply time minus refresh time).
    pub events_per_second_between_refreshes: f64,
    pub snapshot_seconds: f64,
    pub diagnostics_seconds: f64,
    /// A snapshot that continues the previous one after a delta of 1% of the events (the
    /// service's case), without diagnostics.
    pub delta_snapshot_seconds: f64,
}

pub fn run(shape: Shape, batch_size: usize, refresh_every: Option<u64>) -> BenchResult {
    let generator = shape.generator();
    let data = generate(&generator);
    let refresh_every = refresh_every.unwrap_or(shape.refresh_every());
    let mut engine = Engine::new(EngineParams {
        refresh_every_events: refresh_every,
        ..EngineParams::default()
    });
    let mut refreshes = 0;
    let mut refresh_seconds = 0.0;
    let started = Instant::now();
    let delta_from = data.events.len() - data.events.len() / 100;
    let (before, delta) = data.events.split_at(delta_from);
    for batch in before.chunks(batch_size.max(1)) {
        let outcome = engine.apply(batch);
        refreshes += outcome.refreshes.len();
        refresh_seconds += outcome.refreshes.iter().map(|r| r.seconds).sum::<f64>();
    }
    let mut apply_seconds = started.elapsed().as_secs_f64();
    let titles = Default::default();
    let previous = snapshot::build_with_model(
        &engine.view(),
        &SnapshotParams::default(),
        BuildInput::standalone(&titles, false),
    )
    .map(|built| (built.model.labels().to_vec(), built.model));
    // As the service does: the engine tracks the sums under the served segments, and the
    // served snapshot is challenged after it is served (neither is timed here).
    if let Some((labels, _)) = &previous {
        engine.track_segments(labels, SnapshotParams::default().holdout_percent);
    }
    let challenge = previous
        .as_ref()
        .and_then(|(_, model)| engine.view().challenge(model, 1));
    let resumed = Instant::now();
    for batch in delta.chunks(batch_size.max(1)) {
        let outcome = engine.apply(batch);
        refreshes += outcome.refreshes.len();
        refresh_seconds += outcome.refreshes.iter().map(|r| r.seconds).sum::<f64>();
    }
    apply_seconds += resumed.elapsed().as_secs_f64();
    let delta_snapshot_seconds = {
        let t = Instant::now();
        let _span = tracing::info_span!("delta snapshot").entered();
        let mut view = engine.view();
        if let Some((_, model)) = &previous {
            view.warm_start_from(&model.warm_start());
        }
        if let Some(challenge) = challenge.clone() {
            view.set_challenge(challenge);
        }
        let built = snapshot::build_with_model(
            &view,
            &SnapshotParams::default(),
            BuildInput {
                version: 2,
                previous: previous.as_ref().map(|(labels, _)| (1, labels.as_slice())),
                continue_previous: true,
                ..BuildInput::standalone(&titles, false)
            },
        );
        assert!(built.is_some(), "bench data too small for a snapshot");
        t.elapsed().as_secs_f64()
    };
    let build = |with_diagnostics| {
        let t = Instant::now();
        let built = snapshot::build(
            &engine,
            &SnapshotParams::default(),
            BuildInput::standalone(&titles, with_diagnostics),
        );
        assert!(built.is_some(), "bench data too small for a snapshot");
        t.elapsed().as_secs_f64()
    };
    let snapshot_seconds = build(false);
    let diagnostics_seconds = (build(true) - snapshot_seconds).max(0.0);
    let events = data.events.len();
    BenchResult {
        shape: clap::ValueEnum::to_possible_value(&shape)
            .map_or_else(|| format!("{shape:?}"), |v| v.get_name().to_string()),
        users: generator.users,
        items: generator.items,
        events,
        batch_size,
        refresh_every_events: refresh_every,
        refreshes,
        refresh_seconds,
        apply_seconds,
        events_per_second: events as f64 / apply_seconds,
        events_per_second_between_refreshes: events as f64
            / (apply_seconds - refresh_seconds).max(1e-9),
        snapshot_seconds,
        diagnostics_seconds,
        delta_snapshot_seconds,
    }
}

pub fn print(result: &BenchResult) {
    println!(
        "{shape}: {users} users x {items} items x {events} events, batches of {batch}\n  \
         engine: {eps:.0} events/s overall ({apply:.2} s, {refreshes} refreshes every {every} events taking {refresh:.2} s)\n  \
         engine between refreshes: {eps_between:.0} events/s\n  \
         snapshot build: {snap:.3} s (+ {diag:.3} s diagnostics)\n  \
         snapshot after a 1% delta, continuing the previous one: {delta:.3} s",
        shape = result.shape,
        users = result.users,
        items = result.items,
        events = result.events,
        batch = result.batch_size,
        eps = result.events_per_second,
        apply = result.apply_seconds,
        refreshes = result.refreshes,
        every = result.refresh_every_events,
        refresh = result.refresh_seconds,
        eps_between = result.events_per_second_between_refreshes,
        snap = result.snapshot_seconds,
        diag = result.diagnostics_seconds,
        delta = result.delta_snapshot_seconds,
    );
}

/// A cold snapshot's coordination over several instances (`engine::cluster`, in process: the
/// rounds and what each instance sends, not a transport's latency).
#[derive(Debug, Clone, Serialize)]
pub struct RoundsResult {
    pub shape: String,
    pub users: usize,
    pub items: usize,
    pub ratings: usize,
    pub instances: usize,
    pub rounds: crate::engine::cluster::Rounds,
    pub rounds_total: usize,
    /// Largest share of the users one instance holds.
    pub largest_share: f64,
    /// Bytes one instance sends for one round of each kind (8-byte numbers).
    pub statistics_bytes: usize,
    pub eigen_round_bytes: usize,
    pub lloyd_round_bytes: usize,
    /// The clustering sample, all instances together.
    pub sample_bytes: usize,
    /// The snapshot's rounds after the model: one instance's segment sums (values, held-out
    /// values, raters), the idf and two Naive Bayes fits broadcast, one instance's summed
    /// tf-idf rows.
    pub sums_bytes: usize,
    pub describe_broadcast_bytes: usize,
    pub describe_bytes: usize,
    pub seconds: f64,
    /// Describing the segments (sums, profiles, Naive Bayes) over the participants.
    pub snapshot_seconds: f64,
    /// Inertia over the one-instance solve's (1 when the segments are the same).
    pub inertia_ratio: f64,
}

pub fn rounds(shape: Shape, instances: &[usize]) -> Vec<RoundsResult> {
    use crate::engine::cluster::{self, ClusterParams};
    let data = generate(&shape.generator());
    let params = EngineParams {
        refresh_every_events: u64::MAX,
        ..EngineParams::default()
    };
    let mut engine = Engine::new(params.clone());
    engine.apply(&data.events);
    let items = engine.items().len();
    let users = engine.active_users() as usize;
    let ratings = engine.ratings() as usize;
    let block = params.components + params.eigen_oversample;
    let solve_params = ClusterParams::for_engine(&params, users as u64);
    let mut results = vec![];
    let mut alone: Option<f64> = None;
    for &n in instances {
        let mut participants = cluster::split_by_user(
            |u| engine.users().id(u as u32).to_string(),
            engine.vectors(),
            n,
        );
        let largest = participants
            .iter()
            .map(|p| p.labels_len())
            .max()
            .unwrap_or(0);
        let started = Instant::now();
        let Some(model) = cluster::solve(&mut participants, items, &solve_params) else {
            continue;
        };
        let seconds = started.elapsed().as_secs_f64();
        let k = model.sizes.len();
        let described = Instant::now();
        let holdout = crate::snapshot::group::Holdout {
            percent: crate::snapshot::SnapshotParams::default().holdout_percent,
            seed: params.seed,
        };
        let description = crate::snapshot::group::describe(&participants, k, items, holdout);
        let snapshot_seconds = described.elapsed().as_secs_f64();
        std::hint::black_box(&description.naive_bayes);
        let reference = *alone.get_or_insert(model.inertia);
        let sampled = (solve_params.sample_share * users as f64).round() as usize;
        results.push(RoundsResult {
            shape: format!("{shape:?}"),
            users,
            items,
            ratings,
            instances: n,
            rounds: model.rounds,
            rounds_total: model.rounds.total(),
            largest_share: largest as f64 / users.max(1) as f64,
            statistics_bytes: (2 * items + 1) * 8,
            eigen_round_bytes: items * block * 8,
            lloyd_round_bytes: (params.clusters * (params.components + 1) + 2) * 8,
            sample_bytes: sampled * (params.components + 1) * 8,
            sums_bytes: (3 * items * k + 2 * k) * 8,
            describe_broadcast_bytes: (items + 2 * (k + items * k)) * 8,
            describe_bytes: k * items * 8,
            seconds,
            snapshot_seconds,
            inertia_ratio: model.inertia / reference,
        });
    }
    results
}

pub fn print_rounds(result: &RoundsResult) {
    println!(
        "{shape}: {users} users x {items} items, {ratings} ratings, {n} instance(s) \
         (largest {share:.0}% of the users)\n  \
         rounds: {total} ({stats} statistics, {eigen} eigensolver, {sample} sample, {lloyd} Lloyd); \
         {seconds:.2} s in process\n  \
         each instance sends per round: statistics {sb} B, eigensolver {eb} B, Lloyd {lb} B; \
         sample {smp} B in all; inertia {ratio:.6}x one instance's\n  \
         the snapshot (segment sums, profiles, Naive Bayes): {snap:.2} s in process; each \
         instance sends sums {sums} B and tf-idf rows {desc} B, after a broadcast of {bcast} B",
        shape = result.shape,
        users = result.users,
        items = result.items,
        ratings = result.ratings,
        n = result.instances,
        share = 100.0 * result.largest_share,
        total = result.rounds_total,
        stats = result.rounds.statistics,
        eigen = result.rounds.eigen,
        sample = result.rounds.sample,
        lloyd = result.rounds.lloyd,
        seconds = result.seconds,
        sb = result.statistics_bytes,
        eb = result.eigen_round_bytes,
        lb = result.lloyd_round_bytes,
        smp = result.sample_bytes,
        ratio = result.inertia_ratio,
        snap = result.snapshot_seconds,
        sums = result.sums_bytes,
        desc = result.describe_bytes,
        bcast = result.describe_broadcast_bytes,
    );
}
