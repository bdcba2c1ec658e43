//! `segmenter run --demo`: the engine fed by an endless generated stream with planted
//! segments, committing to a state dir and taking snapshots, until stopped. No broker needed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::generator::{GeneratorParams, generate};
use crate::service::Shared;
use crate::store::Store;

/// Events generated per round of the endless stream.
const ROUND_EVENTS: usize = 50_000;

#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub events_applied: u64,
    pub snapshots: u64,
    pub last_version: Option<u64>,
}

/// Runs until `shutdown` is set or `max_events` events were applied; the final state is
/// committed and a last snapshot taken before returning.
pub fn run_demo(
    config: &Config,
    store: &Store,
    max_events: Option<u64>,
    shutdown: &AtomicBool,
    shared: &Shared,
) -> anyhow::Result<DemoSummary> {
    let mut engine = store.load_engine(config.engine_params())?;
    // No broker in the demo: ready as soon as the state is open and the stream runs.
    for flag in [
        &shared.health.state_open,
        &shared.health.consuming,
        &shared.health.broker_reachable,
    ] {
        flag.store(true, Ordering::Relaxed);
    }
    let demo = &config.demo;
    let base = GeneratorParams {
        users: demo.users,
        items: demo.items,
        events: ROUND_EVENTS,
        segments: demo.segments,
        mode: config.events.mode,
        seed: demo.seed,
        ..GeneratorParams::default()
    };
    store.put_titles(
        &generate(&GeneratorParams {
            events: 0,
            ..base.clone()
        })
        .catalogue,
    )?;
    tracing::info!(
        users = demo.users,
        items = demo.items,
        segments = demo.segments,
        events_per_second = demo.events_per_second,
        state_dir = %store.path().display(),
        "demo stream started; stop with Ctrl-C"
    );
    let mut summary = DemoSummary::default();
    let snapshot_every = Duration::from_millis(config.snapshot.interval_ms.max(1));
    let mut last_snapshot = Instant::now();
    let started = Instant::now();
    let mut round = engine.counters().events_applied / ROUND_EVENTS as u64;
    let mut ts = base.start_ts;
    'stream: loop {
        let data = generate(&GeneratorParams {
            round,
            start_ts: ts,
            ..base.clone()
        });
        ts = data.events.last().map_or(ts, |e| e.ts + 1);
        for batch in data.events.chunks(demo.batch_size) {
            if shutdown.load(Ordering::Relaxed) {
                break 'stream;
            }
            let batch = match max_events {
                Some(max) => {
                    let left = max.saturating_sub(summary.events_applied) as usize;
                    &batch[..batch.len().min(left)]
                }
                None => batch,
            };
            let applied_at = Instant::now();
            let outcome = engine.apply(batch);
            summary.events_applied += outcome.applied;
            store.commit(&mut engine, None)?;
            let metrics = &shared.metrics;
            metrics.events_consumed.inc_by(batch.len() as u64);
            metrics.events_applied.inc_by(outcome.applied);
            for &(_, reason) in &outcome.rejected {
                metrics.rejected(reason, 1);
            }
            metrics.batch_size.observe(batch.len() as f64);
            metrics
                .batch_apply_seconds
                .observe(applied_at.elapsed().as_secs_f64());
            for r in &outcome.refreshes {
                metrics.refresh_seconds.observe(r.seconds);
            }
            if last_snapshot.elapsed() >= snapshot_every {
                take_snapshot(config, store, &engine, &mut summary, shared)?;
                last_snapshot = Instant::now();
            }
            if max_events.is_some_and(|m| summary.events_applied >= m) {
                break 'stream;
            }
            // Pace the stream to the configured rate.
            let due = Duration::from_secs_f64(
                summary.events_applied as f64 / demo.events_per_second.max(1) as f64,
            );
            while let Some(wait) = due.checked_sub(started.elapsed()) {
                if shutdown.load(Ordering::Relaxed) {
                    break 'stream;
                }
                std::thread::sleep(wait.min(Duration::from_millis(100)));
            }
        }
        round += 1;
    }
    take_snapshot(config, store, &engine, &mut summary, shared)?;
    shared.health.consuming.store(false, Ordering::Relaxed);
    Ok(summary)
}

fn take_snapshot(
    config: &Config,
    store: &Store,
    engine: &crate::engine::Engine,
    summary: &mut DemoSummary,
    shared: &Shared,
) -> anyhow::Result<()> {
    if let Some(version) = shared.snapshot(config, store, &engine.view(), BTreeMap::new())? {
        summary.snapshots += 1;
        summary.last_version = Some(version);
    }
    Ok(())
}
