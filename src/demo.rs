//! `segmenter run --demo`: the generator as a source of the pipeline. An endless stream with
//! planted segments is handed to the pipeline in batches (committed to a state dir, snapshots
//! on schedule) until stopped. No broker needed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::generator::{GeneratorParams, generate};
use crate::pipeline::{Pipeline, Positions, Shared};
use crate::store::Stores;

/// Events generated per round of the endless stream.
const ROUND_EVENTS: usize = 50_000;

#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub events_applied: u64,
    pub snapshots: u64,
    pub last_version: Option<u64>,
}

/// Runs until `shutdown` is set or `max_events` events were applied, feeding the pipeline like
/// any other source; the final state is committed and a last snapshot taken before returning.
pub fn run_demo(
    config: &Config,
    stores: Stores,
    max_events: Option<u64>,
    shutdown: &AtomicBool,
    shared: &Shared,
) -> anyhow::Result<DemoSummary> {
    let loaded = stores.state.load_engine(config.engine_params())?;
    // No broker in the demo: ready as soon as the state is open and the stream runs.
    for flag in [
        &shared.health.state_open,
        &shared.health.consuming,
        &shared.health.broker_reachable,
    ] {
        flag.store(true, Ordering::Relaxed);
    }
    let stream = Stream::new(config, loaded.engine.counters().events_applied);
    stores.catalogue.put_titles(&stream.catalogue())?;
    let demo = &config.demo;
    tracing::info!(
        users = demo.users,
        items = demo.items,
        segments = demo.segments,
        events_per_second = demo.events_per_second,
        state_dir = %stores.state.path().display(),
        "demo stream started; stop with Ctrl-C"
    );
    let mut pipeline = Pipeline::new(
        config,
        crate::pipeline::SnapshotPolicy::service(config),
        stores,
        loaded,
        shared.clone(),
        None,
    )?;
    pipeline.publish_current()?;
    let streamed = stream.run(&mut pipeline, max_events, shutdown);
    let finished = pipeline.finish(streamed.is_ok());
    shared.health.consuming.store(false, Ordering::Relaxed);
    let events_applied = streamed?;
    let finished = finished?;
    Ok(DemoSummary {
        events_applied,
        snapshots: finished.snapshots,
        last_version: finished.last_version,
    })
}

/// The endless generated stream, in rounds of [`ROUND_EVENTS`] events, paced to the
/// configured rate.
struct Stream {
    base: GeneratorParams,
    batch_size: usize,
    events_per_second: u64,
    round: u64,
}

impl Stream {
    fn new(config: &Config, events_applied: u64) -> Self {
        let demo = &config.demo;
        Stream {
            base: GeneratorParams {
                users: demo.users,
                items: demo.items,
                events: ROUND_EVENTS,
                segments: demo.segments,
                mode: config.events.mode,
                seed: demo.seed,
                ..GeneratorParams::default()
            },
            batch_size: demo.batch_size,
            events_per_second: demo.events_per_second,
            // A restarted demo goes on with the rounds it has not applied yet.
            round: events_applied / ROUND_EVENTS as u64,
        }
    }

    fn catalogue(&self) -> Vec<(String, String)> {
        generate(&GeneratorParams {
            events: 0,
            ..self.base.clone()
        })
        .catalogue
    }

    /// Hands batches to the pipeline until `shutdown` or `max_events`; returns the events
    /// applied.
    fn run(
        mut self,
        pipeline: &mut Pipeline,
        max_events: Option<u64>,
        shutdown: &AtomicBool,
    ) -> anyhow::Result<u64> {
        let started = Instant::now();
        let mut applied = 0u64;
        let mut ts = self.base.start_ts;
        loop {
            let data = generate(&GeneratorParams {
                round: self.round,
                start_ts: ts,
                ..self.base.clone()
            });
            ts = data.events.last().map_or(ts, |e| e.ts + 1);
            for batch in data.events.chunks(self.batch_size) {
                let left = max_events.map_or(usize::MAX, |m| m.saturating_sub(applied) as usize);
                if shutdown.load(Ordering::Relaxed) || left == 0 {
                    return Ok(applied);
                }
                let batch = &batch[..batch.len().min(left)];
                pipeline
                    .shared()
                    .metrics
                    .events_consumed
                    .inc_by(batch.len() as u64);
                applied += pipeline.apply(batch, Positions::new())?.applied;
                pipeline.tick()?;
                if !self.pace(started, applied, shutdown) {
                    return Ok(applied);
                }
            }
            self.round += 1;
        }
    }

    /// Waits until `applied` events are due at the configured rate; false when `shutdown`
    /// came meanwhile.
    fn pace(&self, started: Instant, applied: u64, shutdown: &AtomicBool) -> bool {
        let due = Duration::from_secs_f64(applied as f64 / self.events_per_second.max(1) as f64);
        while let Some(wait) = due.checked_sub(started.elapsed()) {
            if shutdown.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(wait.min(Duration::from_millis(100)));
        }
        true
    }
}
