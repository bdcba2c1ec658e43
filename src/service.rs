//! `segmenter run`: the long-running service. A poll loop on the tokio runtime reads rating
//! events from Kafka, decodes them, dead-letters the bad ones and hands batches to an engine
//! worker thread, which applies them and persists the changed state together with the next
//! offset of every partition in one atomic commit. Only then are offsets committed to Kafka
//! (for progress and lag). Snapshots and time-based refreshes run on the worker side, off the
//! poll loop; snapshot building runs on its own thread.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::decode;
use crate::engine::{CatalogueGate, Engine, EngineView};
use crate::event::{RatingEvent, RejectReason, Rejection};
use crate::http::serving::Serving;
use crate::http::{self, AppState};
use crate::kafka::dead_letter::{DeadLetter, deliver_all};
use crate::kafka::{
    Health, ServiceContext, client_config, client_config_with_defaults, offset_key,
};
use crate::replay::build_and_store_snapshot;
use crate::store::Store;
use crate::telemetry::Metrics;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop gracefully once this many events have been applied and persisted in total, and
    /// build a final snapshot (a SIGTERM drain never waits for a snapshot).
    pub exit_at_events: Option<u64>,
}

/// The latest snapshot as served over HTTP, replaced whenever a new one is built.
pub type ServingSlot = Arc<RwLock<Option<Arc<Serving>>>>;

/// What the service shares with its HTTP API (and tests): metrics, health and the latest
/// snapshot ready for lookups.
#[derive(Clone, Default)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub serving: ServingSlot,
    /// Bumped whenever catalogue titles are stored: profiles show titles, so a changed
    /// catalogue is a reason for a new snapshot even when no event came.
    pub catalogue_version: Arc<std::sync::atomic::AtomicU64>,
}

impl Shared {
    /// Builds and stores a snapshot of `engine`, then publishes it: metrics, and the serving
    /// copy for lookups. Returns its version (`None` while there is too little data).
    pub fn snapshot(
        &self,
        config: &Config,
        store: &Store,
        engine: &EngineView,
        offsets: BTreeMap<String, i64>,
    ) -> anyhow::Result<Option<u64>> {
        let started = Instant::now();
        let titles = store.titles()?;
        let Some(built) = build_and_store_snapshot(config, store, engine, &titles, offsets, true)?
        else {
            return Ok(None);
        };
        let version = built.snapshot.version;
        self.metrics.on_snapshot(&built.snapshot);
        self.metrics
            .snapshot_build_seconds
            .observe(started.elapsed().as_secs_f64());
        let serving = Arc::new(Serving::new(engine, &built.model, built.snapshot, titles));
        if let Ok(mut slot) = self.serving.write() {
            *slot = Some(serving.clone());
        }
        crate::replay::log_snapshot_built(&serving.snapshot);
        Ok(Some(version))
    }
}

/// A batch on its way from the poll loop to the engine worker.
struct Batch {
    events: Vec<RatingEvent>,
    /// Next offset per partition after this batch.
    offsets: BTreeMap<String, i64>,
}

/// What the worker reports after each durable commit.
struct Committed {
    offsets: BTreeMap<String, i64>,
    events_applied: u64,
}

#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub consumed: u64,
    pub applied: u64,
    pub rejected: u64,
    pub events_applied_total: u64,
    pub seconds: f64,
}

pub async fn run(
    config: Config,
    mut shutdown: watch::Receiver<bool>,
    options: RunOptions,
    shared: Shared,
) -> anyhow::Result<RunSummary> {
    let health = shared.health.clone();
    let metrics = shared.metrics.clone();
    let started = Instant::now();
    let kafka = config.kafka.clone();
    let (store, engine) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(Store, Engine)> {
            let store = config.state.open()?;
            let engine = store.load_engine(config.engine_params())?;
            if let Some(file) = &config.catalogue.file {
                let (titles, bad) = decode::read_catalogue_file(file)?;
                if bad > 0 {
                    tracing::warn!(bad, file = %file.display(), "unreadable catalogue lines skipped");
                }
                store.put_titles(&titles)?;
            }
            Ok((store, engine))
        })
        .await??
    };
    let store = Arc::new(store);
    health.state_open.store(true, Ordering::Relaxed);
    let listen = config.http.listen_addr()?;
    let (http_stop, http_stop_rx) = watch::channel(false);
    let http_server = {
        let state = Arc::new(AppState {
            metrics: metrics.clone(),
            health: health.clone(),
            serving: shared.serving.clone(),
            store: store.clone(),
            token: config.http.token(),
        });
        let mut stop = http_stop_rx;
        let mut global = shutdown.clone();
        http::serve(listen, state, async move {
            tokio::select! {
                _ = stop.wait_for(|v| *v) => {}
                _ = global.wait_for(|v| *v) => {}
            }
        })
        .await?
    };
    let initial_events_applied = engine.counters().events_applied;
    let mut events_applied_total = initial_events_applied;
    let stored_offsets = Arc::new(Mutex::new(store.offsets()?));
    tracing::info!(
        state_dir = %config.state.dir.display(),
        users = engine.active_users(),
        events_applied = engine.counters().events_applied,
        offsets = ?read_offsets(&stored_offsets),
        "state opened"
    );
    if options
        .exit_at_events
        .is_some_and(|n| engine.counters().events_applied >= n)
    {
        tracing::info!(
            events_applied = engine.counters().events_applied,
            "target already reached: final snapshot only"
        );
        let offsets = store.offsets()?;
        let engine_events = engine.counters().events_applied;
        // Joined off the async runtime, which keeps serving HTTP meanwhile.
        let snapshot = spawn_snapshot(&config, &store, &engine, &offsets, &shared)?;
        tokio::task::spawn_blocking(move || snapshot.join())
            .await?
            .map_err(|_| anyhow::anyhow!("snapshot thread panicked"))??;
        let _ = http_stop.send(true);
        let _ = http_server.await;
        return Ok(RunSummary {
            events_applied_total: engine_events,
            ..RunSummary::default()
        });
    }

    let context = ServiceContext {
        stored_offsets: stored_offsets.clone(),
        health: health.clone(),
        revoked: AtomicBool::new(false),
    };
    // Throughput: keep a deep local prefetch so the poll loop never waits on a fetch.
    // `[kafka.client]` may tune these.
    let mut consumer_config = client_config_with_defaults(
        &kafka,
        &[
            ("queued.min.messages", "500000"),
            ("max.partition.fetch.bytes", "8388608"),
            ("fetch.wait.max.ms", "100"),
        ],
    );
    if !kafka.instance_id.is_empty() {
        consumer_config.set("group.instance.id", &kafka.instance_id);
    }
    // What exactly-once rests on; `[kafka.client]` cannot set these (the config layer refuses).
    let consumer: Arc<StreamConsumer<ServiceContext>> = Arc::new(
        consumer_config
            .set("group.id", &kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("partition.assignment.strategy", "range")
            .create_with_context(context)
            .context("cannot create the Kafka consumer")?,
    );
    consumer
        .subscribe(&[&kafka.topic])
        .with_context(|| format!("cannot subscribe to {}", kafka.topic))?;
    let dead_letters: FutureProducer = client_config(&kafka)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .context("cannot create the dead-letter producer")?;
    if !kafka.items_topic.is_empty() {
        spawn_items_reader(
            &config,
            store.clone(),
            shared.catalogue_version.clone(),
            shutdown.clone(),
        )?;
    }
    spawn_broker_probe(
        consumer.clone(),
        stored_offsets.clone(),
        shared.clone(),
        kafka.topic.clone(),
        shutdown.clone(),
    );

    // Mirrors the engine's catalogue cap, so refused items are dead-lettered like bad messages.
    let mut catalogue = CatalogueGate::new(&engine);
    // Engine worker: owns the engine, applies and persists batches, reports commits.
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(2);
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<anyhow::Result<Committed>>();
    let final_snapshot = Arc::new(AtomicBool::new(false));
    let worker = {
        let config = config.clone();
        let store = store.clone();
        let offsets = read_offsets(&stored_offsets);
        let final_snapshot = final_snapshot.clone();
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("segmenter-engine".into())
            .spawn(move || {
                engine_worker(
                    WorkerContext {
                        config,
                        store,
                        shared,
                        final_snapshot,
                    },
                    engine,
                    offsets,
                    batch_rx,
                    ack_tx,
                )
            })?
    };

    let linger = Duration::from_millis(kafka.batch_linger_ms.max(1));
    let policy = config.engine_params().policy();
    let mut expected: BTreeMap<String, i64> = read_offsets(&stored_offsets);
    let mut pending = Batch {
        events: Vec::with_capacity(kafka.batch_size),
        offsets: BTreeMap::new(),
    };
    let mut letters: Vec<DeadLetter> = vec![];
    let mut partition_keys: rustc_hash::FxHashMap<i32, String> = Default::default();
    let mut batch_started: Option<tokio::time::Instant> = None;
    let mut summary = RunSummary::default();
    let mut stopping_for_target = false;
    // Wakes the worker when no batch comes, so due snapshots and timed refreshes still happen.
    let mut worker_tick = tokio::time::interval(Duration::from_secs(1));
    worker_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.consuming.store(true, Ordering::Relaxed);

    let result: anyhow::Result<()> = async {
        loop {
            let flush_at = batch_started.map(|t| t + linger);
            let mut flush = false;
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        tracing::info!("shutdown requested: draining");
                        break;
                    }
                }
                ack = ack_rx.recv() => {
                    match ack {
                        Some(Ok(committed)) => {
                            events_applied_total = committed.events_applied;
                            on_committed(&consumer, &stored_offsets, &committed);
                            if options.exit_at_events.is_some_and(|n| committed.events_applied >= n) {
                                tracing::info!(events_applied = committed.events_applied, "target reached: stopping");
                                stopping_for_target = true;
                                final_snapshot.store(true, Ordering::Relaxed);
                                break;
                            }
                        }
                        Some(Err(e)) => return Err(e),
                        None => anyhow::bail!("the engine worker stopped unexpectedly"),
                    }
                }
                _ = sleep_until_opt(flush_at), if flush_at.is_some() => flush = true,
                _ = worker_tick.tick() => {
                    // Best effort: a full channel means the worker is busy anyway.
                    let _ = batch_tx.try_send(Batch { events: vec![], offsets: BTreeMap::new() });
                }
                message = consumer.recv() => {
                    match message {
                        Err(e) => {
                            tracing::warn!(%e, "consume error");
                            continue;
                        }
                        Ok(m) => {
                            health.set_broker_reachable(true);
                            metrics.events_consumed.inc();
                            summary.consumed += 1;
                            // Offsets are keyed `topic/partition`; the key of each partition is
                            // built once, and the maps are updated in place (the hot path).
                            let key = partition_keys
                                .entry(m.partition())
                                .or_insert_with(|| offset_key(m.topic(), m.partition()));
                            if expected.get(key.as_str()).is_some_and(|&next| m.offset() < next) {
                                metrics.events_duplicate.inc();
                                continue;
                            }
                            set_offset(&mut expected, key, m.offset() + 1);
                            set_offset(&mut pending.offsets, key, m.offset() + 1);
                            let default_ts = m.timestamp().to_millis().unwrap_or(0) / 1000;
                            let decoded = decode_message(m.payload(), &config, &policy, default_ts)
                                .and_then(|event| catalogue.admit(&event.item).map(|()| event));
                            match decoded {
                                Ok(event) => pending.events.push(event),
                                Err(rejection) => letters.push(DeadLetter {
                                    key: m.key().map(<[u8]>::to_vec),
                                    payload: m.payload().map(<[u8]>::to_vec),
                                    rejection,
                                    topic: m.topic().to_string(),
                                    partition: m.partition(),
                                    offset: m.offset(),
                                }),
                            }
                            if batch_started.is_none() {
                                batch_started = Some(tokio::time::Instant::now());
                            }
                            flush = pending.events.len() + letters.len() >= kafka.batch_size;
                        }
                    }
                }
            }
            if consumer.context().revoked.swap(false, Ordering::Relaxed) {
                flush = true;
            }
            if flush && !pending.offsets.is_empty() {
                let shutdown_rx = shutdown.clone();
                summary.rejected += send_batch(&dead_letters, &config, &shared, &mut pending, &mut letters, &batch_tx, move || *shutdown_rx.borrow()).await?;
                batch_started = None;
            }
        }
        Ok(())
    }
    .await;
    result?;

    // Drain: the last partial batch, then every outstanding commit, within the drain time.
    health.consuming.store(false, Ordering::Relaxed);
    let drain = async {
        if !pending.offsets.is_empty() && !stopping_for_target {
            summary.rejected += send_batch(
                &dead_letters,
                &config,
                &shared,
                &mut pending,
                &mut letters,
                &batch_tx,
                || false,
            )
            .await?;
        }
        drop(batch_tx);
        while let Some(ack) = ack_rx.recv().await {
            let committed = ack?;
            events_applied_total = committed.events_applied;
            on_committed(&consumer, &stored_offsets, &committed);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_millis(kafka.drain_timeout_ms), drain)
        .await
        .map_err(|_| anyhow::anyhow!("drain did not finish within [kafka] drain_timeout_ms = {}; state is consistent up to the last commit", kafka.drain_timeout_ms))??;
    let worker_result = tokio::task::spawn_blocking(move || worker.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the engine worker panicked"))?;
    worker_result?;
    // Progress for lag reporting; the state dir already holds the truth.
    let final_offsets = read_offsets(&stored_offsets);
    if let Some(tpl) = commit_list(&final_offsets)
        && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
    {
        tracing::warn!(%e, "final offset commit to Kafka failed (progress reporting only)");
    }
    let _ = http_stop.send(true);
    let _ = http_server.await;
    summary.events_applied_total = events_applied_total;
    summary.applied = events_applied_total.saturating_sub(initial_events_applied);
    summary.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        consumed = summary.consumed,
        applied = summary.applied,
        rejected = summary.rejected,
        seconds = summary.seconds,
        events_per_second = summary.applied as f64 / summary.seconds.max(1e-9),
        "stopped"
    );
    Ok(summary)
}

/// The offsets the state dir holds. A panic elsewhere while the lock was held (a poisoned
/// mutex) does not make them unknown: every write replaces the whole map at once.
fn read_offsets(stored: &Mutex<BTreeMap<String, i64>>) -> BTreeMap<String, i64> {
    stored
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

fn set_offset(offsets: &mut BTreeMap<String, i64>, key: &str, next: i64) {
    match offsets.get_mut(key) {
        Some(v) => *v = next,
        None => {
            offsets.insert(key.to_string(), next);
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn decode_message(
    payload: Option<&[u8]>,
    config: &Config,
    policy: &crate::event::ValuePolicy,
    default_ts: i64,
) -> Result<RatingEvent, Rejection> {
    let bytes = match payload {
        None => return Err(Rejection::new(RejectReason::Empty, "message has no value")),
        Some(b) if b.len() > config.kafka.max_message_bytes => {
            return Err(Rejection::new(
                RejectReason::Oversized,
                format!(
                    "message of {} bytes exceeds [kafka] max_message_bytes = {}",
                    b.len(),
                    config.kafka.max_message_bytes
                ),
            ));
        }
        Some(b) => b,
    };
    let event = decode::decode_json(bytes, &config.events.fields, default_ts)?;
    policy.check(&event)?;
    Ok(event)
}

/// The stored offsets of Kafka partitions (`topic/partition` keys) as a commit list. Other
/// positions in the state dir (a replayed file's `file:…` key) are not Kafka's business and
/// are skipped, never a reason to stop reporting progress.
fn commit_list(offsets: &BTreeMap<String, i64>) -> Option<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (key, &offset) in offsets {
        let Some((topic, partition)) = key.rsplit_once('/') else {
            continue;
        };
        let Ok(partition) = partition.parse::<i32>() else {
            continue;
        };
        if tpl
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .is_err()
        {
            continue;
        }
    }
    (tpl.count() > 0).then_some(tpl)
}

fn on_committed(
    consumer: &StreamConsumer<ServiceContext>,
    stored: &Mutex<BTreeMap<String, i64>>,
    committed: &Committed,
) {
    stored
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone_from(&committed.offsets);
    if let Some(tpl) = commit_list(&committed.offsets) {
        // Async: progress reporting only; failures are harmless (the state dir is the truth).
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(%e, "offset commit to Kafka failed (progress reporting only)");
        }
    }
}

/// Delivers the batch's dead letters (awaiting the broker's acknowledgement), then hands the
/// good events and offsets to the engine worker.
async fn send_batch(
    producer: &FutureProducer,
    config: &Config,
    shared: &Shared,
    pending: &mut Batch,
    letters: &mut Vec<DeadLetter>,
    batch_tx: &mpsc::Sender<Batch>,
    give_up: impl Fn() -> bool,
) -> anyhow::Result<u64> {
    let (metrics, health) = (&shared.metrics, &shared.health);
    let rejected = letters.len() as u64;
    if !letters.is_empty() {
        let mut by_reason: BTreeMap<&'static str, u64> = BTreeMap::new();
        for l in letters.iter() {
            *by_reason.entry(l.rejection.reason.label()).or_default() += 1;
        }
        // One line per batch, never one per event.
        tracing::warn!(
            count = letters.len(),
            reasons = ?by_reason,
            first = %letters[0].rejection,
            topic = %config.kafka.dead_letter_topic,
            "events rejected and sent to the dead-letter topic"
        );
        deliver_all(
            producer,
            &config.kafka.dead_letter_topic,
            letters,
            Duration::from_millis(config.kafka.retry_backoff_ms.max(1)),
            give_up,
            |refused| {
                metrics.dead_letters_refused.inc_by(refused);
                health.set_dead_letters_refused(true);
            },
        )
        .await?;
        health.set_dead_letters_refused(false);
        for l in letters.iter() {
            metrics.rejected(l.rejection.reason, 1);
        }
        letters.clear();
    }
    let batch = Batch {
        events: std::mem::take(&mut pending.events),
        offsets: std::mem::take(&mut pending.offsets),
    };
    batch_tx
        .send(batch)
        .await
        .map_err(|_| anyhow::anyhow!("the engine worker stopped unexpectedly"))?;
    Ok(rejected)
}

/// The engine side: apply, persist with offsets, acknowledge; periodic refresh by time and
/// snapshots on their own thread so neither blocks the poll loop.
struct WorkerContext {
    config: Config,
    store: Arc<Store>,
    shared: Shared,
    final_snapshot: Arc<AtomicBool>,
}

fn engine_worker(
    context: WorkerContext,
    mut engine: Engine,
    mut offsets: BTreeMap<String, i64>,
    mut batches: mpsc::Receiver<Batch>,
    acks: mpsc::UnboundedSender<anyhow::Result<Committed>>,
) -> anyhow::Result<()> {
    let WorkerContext {
        config,
        store,
        shared,
        final_snapshot,
    } = context;
    let metrics = shared.metrics.clone();
    let snapshot_every = Duration::from_millis(config.snapshot.interval_ms.max(1));
    let refresh_every = (config.model.refresh_interval_ms > 0)
        .then(|| Duration::from_millis(config.model.refresh_interval_ms));
    let mut last_snapshot = Instant::now();
    let mut last_refresh = Instant::now();
    // Serve the state as it is right away (a restarted service has data before any batch).
    let mut snapshot_thread: Option<std::thread::JoinHandle<anyhow::Result<()>>> =
        if engine.active_users() > 0 {
            Some(spawn_snapshot(&config, &store, &engine, &offsets, &shared)?)
        } else {
            None
        };
    // Events applied when the last snapshot was taken: no new snapshot without new data.
    let mut snapshotted_catalogue = shared.catalogue_version.load(Ordering::Relaxed);
    let mut snapshotted_events = if snapshot_thread.is_some() {
        engine.counters().events_applied
    } else {
        0
    };
    let result = (|| -> anyhow::Result<()> {
        while let Some(batch) = batches.blocking_recv() {
            // An empty batch is the poll loop's tick: only the timers below run.
            if !batch.events.is_empty() || !batch.offsets.is_empty() {
                let span = tracing::debug_span!("batch", events = batch.events.len());
                let _enter = span.enter();
                let applied_at = Instant::now();
                let outcome = engine.apply(&batch.events);
                if !outcome.rejected.is_empty() {
                    // The poll loop's gate and value checks run first; reaching here is a bug.
                    tracing::error!(count = outcome.rejected.len(), first = ?outcome.rejected[0], "events refused by the engine after the poll loop admitted them");
                }
                for &(_, reason) in &outcome.rejected {
                    metrics.rejected(reason, 1);
                }
                if !outcome.refreshes.is_empty() {
                    last_refresh = Instant::now();
                }
                for r in &outcome.refreshes {
                    metrics.refresh_seconds.observe(r.seconds);
                }
                offsets.extend(batch.offsets);
                store
                    .commit(&mut engine, Some(&offsets))
                    .context("cannot persist the batch: stopping without recording its offsets")?;
                let events_applied = engine.counters().events_applied;
                metrics.events_applied.inc_by(outcome.applied);
                metrics.batch_size.observe(batch.events.len() as f64);
                metrics
                    .batch_apply_seconds
                    .observe(applied_at.elapsed().as_secs_f64());
                tracing::debug!(
                    events = batch.events.len(),
                    events_applied,
                    seconds = applied_at.elapsed().as_secs_f64(),
                    "batch committed"
                );
                if acks
                    .send(Ok(Committed {
                        offsets: offsets.clone(),
                        events_applied,
                    }))
                    .is_err()
                {
                    break;
                }
            }
            if refresh_every.is_some_and(|every| last_refresh.elapsed() >= every) {
                let _span = tracing::info_span!("refresh").entered();
                if let Some(r) = engine.refresh() {
                    tracing::info!(
                        iterations = r.eigen_iterations,
                        seconds = r.seconds,
                        "model refreshed on timer"
                    );
                    store.commit(&mut engine, Some(&offsets))?;
                }
                last_refresh = Instant::now();
            }
            let idle = snapshot_thread.as_ref().is_none_or(|t| t.is_finished());
            let catalogue = shared.catalogue_version.load(Ordering::Relaxed);
            let changed = engine.counters().events_applied != snapshotted_events
                || (catalogue != snapshotted_catalogue && engine.active_users() > 0);
            if idle && changed && last_snapshot.elapsed() >= snapshot_every {
                if let Some(t) = snapshot_thread.take() {
                    t.join()
                        .map_err(|_| anyhow::anyhow!("snapshot thread panicked"))??;
                }
                snapshot_thread =
                    Some(spawn_snapshot(&config, &store, &engine, &offsets, &shared)?);
                last_snapshot = Instant::now();
                snapshotted_events = engine.counters().events_applied;
                snapshotted_catalogue = catalogue;
            }
        }
        Ok(())
    })();
    if let Err(e) = &result {
        let _ = acks.send(Err(anyhow::anyhow!("{e:#}")));
    }
    // Closing the acknowledgements ends the drain: a final snapshot is not part of it.
    drop(acks);
    if let Some(t) = snapshot_thread.take() {
        t.join()
            .map_err(|_| anyhow::anyhow!("snapshot thread panicked"))??;
    }
    if result.is_ok() && final_snapshot.load(Ordering::Relaxed) {
        spawn_snapshot(&config, &store, &engine, &offsets, &shared)?
            .join()
            .map_err(|_| anyhow::anyhow!("snapshot thread panicked"))??;
    }
    result
}

fn spawn_snapshot(
    config: &Config,
    store: &Arc<Store>,
    engine: &Engine,
    offsets: &BTreeMap<String, i64>,
    shared: &Shared,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let config = config.clone();
    let store = store.clone();
    // A copy-on-write view: the poll loop goes on applying while the snapshot reads it.
    let engine = engine.view();
    let offsets = offsets.clone();
    let shared = shared.clone();
    Ok(std::thread::Builder::new()
        .name("segmenter-snapshot".into())
        .spawn(move || {
            let _span = tracing::info_span!("snapshot").entered();
            shared.snapshot(&config, &store, &engine, offsets)?;
            Ok(())
        })?)
}

/// Every few seconds: whether the broker answers (readiness, also while the topic is idle),
/// and the lag per assigned partition = high watermark − next offset persisted.
fn spawn_broker_probe(
    consumer: Arc<StreamConsumer<ServiceContext>>,
    stored: Arc<Mutex<BTreeMap<String, i64>>>,
    shared: Shared,
    topic: String,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|v| *v) => break,
                _ = tick.tick() => {}
            }
            let (consumer, stored, shared, topic) = (
                consumer.clone(),
                stored.clone(),
                shared.clone(),
                topic.clone(),
            );
            let _ = tokio::task::spawn_blocking(move || {
                let reachable = consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .is_ok();
                shared.health.set_broker_reachable(reachable);
                let Ok(assignment) = consumer.assignment() else {
                    return;
                };
                let offsets = read_offsets(&stored);
                for elem in assignment.elements() {
                    if let Ok((low, high)) = consumer.fetch_watermarks(
                        elem.topic(),
                        elem.partition(),
                        Duration::from_secs(2),
                    ) {
                        let next = offsets
                            .get(&offset_key(elem.topic(), elem.partition()))
                            .copied()
                            .unwrap_or(low);
                        shared
                            .metrics
                            .consumer_lag
                            .with_label_values(&[&elem.partition().to_string()])
                            .set((high - next).max(0));
                    }
                }
            })
            .await;
        }
    });
}

/// Reads the compacted catalogue topic from the beginning and stores titles as they come.
fn spawn_items_reader(
    config: &Config,
    store: Arc<Store>,
    catalogue_version: Arc<std::sync::atomic::AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let kafka = &config.kafka;
    let consumer: StreamConsumer = client_config(kafka)
        .set("group.id", format!("{}-items", kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("cannot create the catalogue consumer")?;
    consumer.subscribe(&[&kafka.items_topic])?;
    let topic = kafka.items_topic.clone();
    tokio::spawn(async move {
        // Titles are stored in batches, off the async runtime: one sled write and flush per
        // batch, not per record.
        let mut pending: Vec<(String, String)> = vec![];
        let mut flush_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = sleep_until_opt(flush_at), if flush_at.is_some() => {
                    store_titles(&store, &catalogue_version, &mut pending).await;
                    flush_at = None;
                }
                m = consumer.recv() => {
                    let Ok(m) = m else { continue };
                    let parsed = m.payload().and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok());
                    let item = parsed.as_ref().and_then(|v| match &v["item"] {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    });
                    let title = parsed.as_ref().and_then(|v| v["title"].as_str().map(str::to_string));
                    match (item, title) {
                        (Some(item), Some(title)) => {
                            pending.push((item, title));
                            if pending.len() >= TITLES_PER_WRITE {
                                store_titles(&store, &catalogue_version, &mut pending).await;
                                flush_at = None;
                            } else if flush_at.is_none() {
                                flush_at = Some(tokio::time::Instant::now() + TITLES_LINGER);
                            }
                        }
                        _ => tracing::warn!(topic = %topic, offset = m.offset(), "catalogue record skipped: expected {{\"item\": ..., \"title\": ...}}"),
                    }
                }
            }
        }
        store_titles(&store, &catalogue_version, &mut pending).await;
    });
    Ok(())
}

/// Catalogue records stored per write, and how long a partial batch waits.
const TITLES_PER_WRITE: usize = 1_000;
const TITLES_LINGER: Duration = Duration::from_millis(200);

async fn store_titles(
    store: &Arc<Store>,
    catalogue_version: &std::sync::atomic::AtomicU64,
    pending: &mut Vec<(String, String)>,
) {
    if pending.is_empty() {
        return;
    }
    let titles = std::mem::take(pending);
    let store = store.clone();
    match tokio::task::spawn_blocking(move || store.put_titles(&titles)).await {
        Ok(Ok(())) => {
            catalogue_version.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Err(e)) => tracing::error!(%e, "cannot store catalogue titles"),
        Err(e) => tracing::error!(%e, "catalogue write task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_file_position_in_the_state_dir_does_not_stop_kafka_progress_commits() {
        let offsets: BTreeMap<String, i64> = [
            ("file:0123456789abcdef:4096".to_string(), 500),
            ("ratings/0".to_string(), 42),
            ("ratings/1".to_string(), 7),
        ]
        .into_iter()
        .collect();
        let tpl = commit_list(&offsets).expect("the partitions are committed");
        assert_eq!(tpl.count(), 2);
        let committed = tpl.to_topic_map();
        assert_eq!(
            committed.get(&("ratings".to_string(), 0)),
            Some(&Offset::Offset(42))
        );
        assert_eq!(
            committed.get(&("ratings".to_string(), 1)),
            Some(&Offset::Offset(7))
        );
    }
}
