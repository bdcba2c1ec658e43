//! `segmenter run`: the Kafka source of the pipeline. A poll loop on the tokio runtime reads
//! rating events from Kafka, decodes them, dead-letters the bad ones and hands batches with
//! their next offsets to the pipeline on an engine thread, which applies them and commits the
//! changed state together with the offsets in one atomic write. Only then are offsets committed
//! to Kafka (for progress and lag). Snapshots and time-based refreshes are the pipeline's. With
//! `[kafka] changelog_topic`, each batch's changed cells also go to the changelog, and assigned
//! partitions are taken over (restored when they moved) before they are consumed; with
//! `[kafka] group_model_interval_ms`, threads answer and coordinate the group model's rounds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::decode;
use crate::engine::AdmissionGate;
use crate::event::{RatingEvent, RejectReason, Rejection};
use crate::http;
use crate::kafka::changelog::Changelog;
use crate::kafka::dead_letter::{DeadLetter, deliver_all};
use crate::kafka::{ServiceContext, client_config, client_config_with_defaults, offset_key};
use crate::pipeline::{Acks, Committed, Pipeline, Positions, Shared, SnapshotPolicy};
use crate::store::{Catalogue, LoadedEngine, Stores};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop gracefully once this many events have been applied and persisted in total, and
    /// build a final snapshot (a SIGTERM drain never waits for a snapshot).
    pub exit_at_events: Option<u64>,
}

/// A batch on its way from the poll loop to the engine thread.
#[derive(Default)]
struct Batch {
    events: Vec<RatingEvent>,
    /// The partition each event came from.
    partitions: Vec<i32>,
    /// Next offset per partition after this batch.
    offsets: Positions,
}

/// What the poll loop asks of the engine thread, in order.
enum Work {
    Batch(Batch),
    /// This instance's users as they stand, for a group model's rounds.
    Shard {
        reply: std::sync::mpsc::SyncSender<crate::kafka::rounds::Shard>,
    },
    /// With a changelog: own these partitions of the ratings topic (and no other), restoring
    /// those whose state moved here; answers the next offset of each (absent: the beginning).
    TakeOver {
        partitions: BTreeSet<i32>,
        reply: tokio::sync::oneshot::Sender<anyhow::Result<(BTreeMap<i32, i64>, AdmissionGate)>>,
    },
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
    shutdown: watch::Receiver<bool>,
    options: RunOptions,
    shared: Shared,
) -> anyhow::Result<RunSummary> {
    let started = Instant::now();
    let (stores, loaded) = open_state(&config).await?;
    shared.health.state_open.store(true, Ordering::Relaxed);
    let readers = start_readers(&config, &shared, &stores.snapshots, &shutdown).await?;
    let initial_events_applied = loaded.engine.counters().events_applied;
    let stored_offsets = Arc::new(Mutex::new(stores.state.offsets()?));
    tracing::info!(
        state_dir = %config.state.dir.display(),
        users = loaded.engine.active_users(),
        events_applied = initial_events_applied,
        offsets = ?read_offsets(&stored_offsets),
        "state opened"
    );
    let policy = SnapshotPolicy::service(&config);
    if options
        .exit_at_events
        .is_some_and(|n| initial_events_applied >= n)
    {
        tracing::info!(
            events_applied = initial_events_applied,
            "target already reached: final snapshot only"
        );
        let pipeline = Pipeline::new(&config, policy, stores, loaded, shared.clone(), None)?;
        // Off the async runtime, which keeps serving HTTP meanwhile.
        tokio::task::spawn_blocking(move || pipeline.finish(true)).await??;
        readers.stop().await;
        return Ok(RunSummary {
            events_applied_total: initial_events_applied,
            ..RunSummary::default()
        });
    }
    let (batch_tx, batch_rx) = mpsc::channel::<Work>(2);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<anyhow::Result<Committed>>();
    let final_snapshot = Arc::new(AtomicBool::new(false));
    let (changelog_errors_tx, changelog_errors) = mpsc::unbounded_channel();
    let stopping = Arc::new(AtomicBool::new(false));
    let owns_partition_zero = Arc::new(AtomicBool::new(false));
    let changelog = if config.kafka.changelog_topic.is_empty() {
        None
    } else {
        let partitions = ensure_changelog_topic(&config, shutdown.clone()).await?;
        if config.kafka.group_model_on() {
            crate::kafka::rounds::ensure_topics(&config.kafka).await?;
            spawn_group_threads(
                &config,
                &shared,
                GroupHandles {
                    work: batch_tx.clone(),
                    snapshots: stores.snapshots.clone(),
                    catalogue: stores.catalogue.clone(),
                    partitions,
                    owns_partition_zero: owns_partition_zero.clone(),
                    stopping: stopping.clone(),
                },
            )?;
        }
        let standby = if config.kafka.standby {
            shared.health.standby.store(true, Ordering::Relaxed);
            Some(crate::kafka::standby::Standby::start(
                &config.kafka,
                partitions,
                shared.metrics.clone(),
                stopping.clone(),
            )?)
        } else {
            None
        };
        Some(Changelog::start(
            &config.kafka,
            shared.health.clone(),
            shared.metrics.clone(),
            changelog_errors_tx,
            standby,
        )?)
    };
    let mut source = Source::connect(
        &config,
        &stores.catalogue,
        &shared,
        stored_offsets,
        AdmissionGate::new(&loaded.engine),
        &shutdown,
        (batch_tx, ack_rx, changelog_errors),
    )?;
    let mut pipeline = Pipeline::new(
        &config,
        policy,
        stores,
        loaded,
        shared.clone(),
        Some(ack_tx.clone()),
    )?;
    if changelog.is_some() {
        pipeline.track_partitions(&config.kafka.topic)?;
    }
    let worker = spawn_engine_thread(
        pipeline,
        changelog,
        batch_rx,
        ack_tx,
        final_snapshot.clone(),
    )?;
    source.owns_partition_zero = owns_partition_zero;
    let consumed = source.consume(shutdown, &options, &final_snapshot).await;
    stopping.store(true, Ordering::Relaxed);
    consumed?;
    let mut summary = source.drain(worker).await?;
    readers.stop().await;
    summary.applied = summary
        .events_applied_total
        .saturating_sub(initial_events_applied);
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

/// What reads the pipeline's results while the service runs.
struct Readers {
    http: http::RunningServer,
    feed: Option<crate::kafka::changes::RunningFeed>,
}

impl Readers {
    /// Stops the HTTP API, then lets the change feed publish what is stored, the final snapshot
    /// included, within its grace (an open transaction would hold back `read_committed`
    /// consumers until the next start).
    async fn stop(self) {
        self.http.stop().await;
        if let Some(feed) = self.feed {
            feed.stop().await;
        }
    }
}

/// Starts what reads the pipeline's results: the HTTP API and, when their topics are set, the
/// snapshots topic publisher and the change feed. All stop with `shutdown`.
async fn start_readers(
    config: &Config,
    shared: &Shared,
    snapshots: &crate::store::SnapshotStore,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Readers> {
    let mut stop_http = shutdown.clone();
    let http = http::start(config, shared, snapshots, async move {
        let _ = stop_http.wait_for(|v| *v).await;
    })
    .await?;
    // With a group model the coordinator publishes the group's snapshots and changes, once
    // for the whole group (`kafka::rounds`).
    let group = config.kafka.group_model_on();
    if !config.kafka.snapshots_topic.is_empty() && !group {
        crate::kafka::snapshots::spawn_publisher(
            config,
            shared,
            snapshots.clone(),
            shutdown.clone(),
        )?;
    }
    let feed = if config.kafka.change_feed_on() && !group {
        Some(crate::kafka::changes::spawn_feed(
            config,
            shared,
            snapshots.clone(),
        )?)
    } else {
        None
    };
    Ok(Readers { http, feed })
}

/// Opens the state dir and loads the engine off the async runtime, storing the catalogue
/// file's titles when one is configured.
async fn open_state(config: &Config) -> anyhow::Result<(Stores, LoadedEngine)> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<(Stores, LoadedEngine)> {
        let stores = config.state.open()?;
        let loaded = stores.state.load_engine(config.engine_params())?;
        if let Some(file) = &config.catalogue.file {
            let (titles, bad) = decode::read_catalogue_file(file)?;
            if bad > 0 {
                tracing::warn!(bad, file = %file.display(), "unreadable catalogue lines skipped");
            }
            stores.catalogue.put_titles(&titles)?;
        }
        Ok((stores, loaded))
    })
    .await?
}

/// The engine thread: the pipeline applies and commits each batch (acknowledged once
/// durable), and runs its timers when the poll loop's tick comes instead of a batch.
fn spawn_engine_thread(
    mut pipeline: Pipeline,
    changelog: Option<Changelog>,
    mut batches: mpsc::Receiver<Work>,
    errors: Acks,
    final_snapshot: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    Ok(std::thread::Builder::new()
        .name("segmenter-engine".into())
        .spawn(move || {
            let applied = (|| -> anyhow::Result<()> {
                pipeline.publish_current()?;
                while let Some(work) = batches.blocking_recv() {
                    let batch = match work {
                        Work::Batch(batch) => batch,
                        Work::Shard { reply } => {
                            let _ = reply.send(pipeline.shard());
                            continue;
                        }
                        Work::TakeOver { partitions, reply } => {
                            let changelog = changelog
                                .as_ref()
                                .context("partitions handed over without a changelog")?;
                            let taken = take_over(&mut pipeline, changelog, partitions)
                                .map(|next| (next, pipeline.admission_gate()));
                            let failed = taken.as_ref().err().map(|e| anyhow::anyhow!("{e:#}"));
                            let _ = reply.send(taken);
                            if let Some(e) = failed {
                                return Err(e);
                            }
                            pipeline.tick()?;
                            continue;
                        }
                    };
                    if !batch.events.is_empty() || !batch.offsets.is_empty() {
                        let _span =
                            tracing::debug_span!("batch", events = batch.events.len()).entered();
                        let outcome = match &changelog {
                            None => pipeline.apply(&batch.events, batch.offsets)?,
                            Some(changelog) => {
                                let (outcome, changes) = pipeline.apply_partitioned(
                                    &batch.events,
                                    &batch.partitions,
                                    batch.offsets,
                                )?;
                                changelog.write(changes)?;
                                outcome
                            }
                        };
                        if !outcome.rejected.is_empty() {
                            // The poll loop's gate and value checks run first: a bug.
                            tracing::error!(count = outcome.rejected.len(), first = ?outcome.rejected[0], "events refused by the engine after the poll loop admitted them");
                        }
                    }
                    pipeline.tick()?;
                }
                Ok(())
            })();
            // The poll loop stops on the cause, not on a closed channel.
            if let Err(e) = &applied {
                let _ = errors.send(Err(anyhow::anyhow!("{e:#}")));
            }
            drop(errors);
            // Finishing writes every commit and closes the acknowledgements, which ends the
            // drain: a final snapshot (exit_at_events) is not part of it.
            let finished = pipeline.finish(applied.is_ok() && final_snapshot.load(Ordering::Relaxed));
            // Every committed batch's rows to the changelog too, so a restart keeps its state
            // dir instead of restoring from the changelog.
            if let Some(changelog) = changelog {
                changelog.finish();
            }
            applied.and(finished.map(|_| ()))
        })?)
}

/// Takes the partitions the group assigned over: the changelog fences their previous owners
/// and reads what moved, the pipeline drops the users of partitions gone and restores those
/// that came. The next offsets to consume from.
fn take_over(
    pipeline: &mut Pipeline,
    changelog: &Changelog,
    partitions: BTreeSet<i32>,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let local = pipeline.local_offsets(&partitions);
    let handovers = changelog.own(partitions.clone(), local)?;
    pipeline.take_over(&partitions, handovers)
}

/// What the group model's threads work with.
struct GroupHandles {
    /// The engine thread's queue (a cut's view of the users is taken there).
    work: mpsc::Sender<Work>,
    /// Where the group's snapshots are stored as they are read.
    snapshots: crate::store::SnapshotStore,
    /// The titles of the snapshot's profiles.
    catalogue: crate::store::Catalogue,
    /// The ratings topic's partition count.
    partitions: i32,
    /// Set while this instance owns partition 0 (it coordinates then).
    owns_partition_zero: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
}

/// The group model's threads: every instance answers the rounds from its users (through the
/// engine thread) and reads the models topic into `shared.group`, storing and serving each
/// version's snapshot; the one owning partition 0 coordinates every
/// `[kafka] group_model_interval_ms`.
fn spawn_group_threads(
    config: &Config,
    shared: &Shared,
    handles: GroupHandles,
) -> anyhow::Result<()> {
    use crate::kafka::rounds::{self, Coordinator, GroupProgress, Responder, Shard};
    let GroupHandles {
        work,
        snapshots,
        catalogue,
        partitions,
        owns_partition_zero,
        stopping,
    } = handles;
    let progress = Arc::new(GroupProgress::default());
    let kafka = config.kafka.clone();
    let instance = if kafka.instance_id.trim().is_empty() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("segmenter-{}-{nanos}", std::process::id())
    } else {
        kafka.instance_id.clone()
    };
    let mut responder = Responder::new(
        &kafka,
        &instance,
        shared.group_assignments.clone(),
        progress.clone(),
    )?;
    let stop = stopping.clone();
    std::thread::Builder::new()
        .name("segmenter-group-rounds".into())
        .spawn(move || {
            let mut shard = || -> anyhow::Result<Shard> {
                let (reply, answer) = std::sync::mpsc::sync_channel(1);
                work.blocking_send(Work::Shard { reply })
                    .map_err(|_| anyhow::anyhow!("the engine worker stopped"))?;
                answer
                    .recv()
                    .map_err(|_| anyhow::anyhow!("the engine worker stopped"))
            };
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = responder.step(Duration::from_millis(200), &mut shard) {
                    tracing::warn!(error = %format!("{e:#}"), "cannot answer a group model round");
                }
            }
        })?;
    let (slot, metrics, stop, serving, reader_progress) = (
        shared.group.clone(),
        shared.metrics.clone(),
        stopping.clone(),
        shared.serving.clone(),
        progress.clone(),
    );
    let retention = config.snapshot.retention;
    let reader_kafka = kafka.clone();
    let models_read = Arc::new(AtomicBool::new(false));
    let caught_up = models_read.clone();
    std::thread::Builder::new()
        .name("segmenter-group-models".into())
        .spawn(move || {
            let read = rounds::read_models(
                &reader_kafka,
                &slot,
                &reader_progress,
                &caught_up,
                || stop.load(Ordering::Relaxed),
                |model| {
                    metrics.group_model_version.set(model.version as i64);
                    metrics.on_snapshot(&model.snapshot);
                    // Every instance keeps the group's versions: `/snapshots` lists them and
                    // reads them back like its own.
                    if let Err(e) = snapshots.put_snapshot(&model.snapshot, &[], retention) {
                        tracing::error!(error = %e, version = model.version, "cannot store the group snapshot");
                    }
                    if let Ok(mut slot) = serving.write() {
                        *slot = Some(Arc::new(crate::http::serving::Serving::of_group(
                            model.snapshot.clone(),
                        )));
                    }
                },
            );
            if let Err(e) = read {
                tracing::error!(error = %format!("{e:#}"), "cannot read the group models topic");
            }
        })?;
    let (assignments, stop, assignments_kafka, assignments_progress) = (
        shared.group_assignments.clone(),
        stopping.clone(),
        kafka.clone(),
        progress.clone(),
    );
    std::thread::Builder::new()
        .name("segmenter-group-assignments".into())
        .spawn(move || {
            let read = rounds::read_assignments(
                &assignments_kafka,
                &assignments,
                &assignments_progress,
                || stop.load(Ordering::Relaxed),
            );
            if let Err(e) = read {
                tracing::error!(error = %format!("{e:#}"), "cannot read the group assignments topic");
            }
        })?;
    let (slot, metrics) = (shared.group.clone(), shared.metrics.clone());
    let params = config.engine_params();
    let snapshot_params = config.snapshot_params();
    let interval = Duration::from_millis(config.kafka.group_model_interval_ms);
    std::thread::Builder::new()
        .name("segmenter-group-coordinator".into())
        .spawn(move || {
            let mut coordinator: Option<Coordinator> = None;
            let mut next = Instant::now() + interval;
            while !stopping.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if Instant::now() < next {
                    continue;
                }
                next = Instant::now() + interval;
                if !owns_partition_zero.load(Ordering::Relaxed)
                    || !models_read.load(Ordering::Relaxed)
                {
                    // Not the coordinator, or not yet sure of the latest version published.
                    coordinator = None;
                    continue;
                }
                let c = match coordinator.as_mut() {
                    Some(c) => c,
                    None => match Coordinator::new(
                        &kafka,
                        &instance,
                        partitions,
                        snapshot_params.clone(),
                        progress.clone(),
                    ) {
                        Ok(c) => coordinator.insert(c),
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "cannot start coordinating the group model");
                            continue;
                        }
                    },
                };
                let latest = slot
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let titles = catalogue.titles().unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot read the catalogue: profiles without titles");
                    Default::default()
                });
                match c.next_model(&params, latest.as_deref(), &titles) {
                    Ok(Some(model)) => {
                        metrics.group_model_seconds.observe(model.seconds);
                        metrics.group_rounds.inc_by(model.rounds.total() as u64 + 1);
                        tracing::info!(
                            version = model.version,
                            users = model.users,
                            ratings = model.ratings,
                            messages_covered = model.messages_covered,
                            instances = model.instances.len(),
                            assignments_changed = model.assignments_changed,
                            rounds = model.rounds.total() + 1,
                            inertia = model.inertia,
                            seconds = model.seconds,
                            "group model published"
                        );
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::info!(error = %format!("{e:#}"), "no group model this time; trying again");
                    }
                }
            }
        })?;
    Ok(())
}

/// The changelog topic: created compacted with the ratings topic's partition count, which
/// it must have (a user's row lives in the partition of the user's events). Returns that count.
async fn ensure_changelog_topic(
    config: &Config,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<i32> {
    let kafka = &config.kafka;
    // The changelog is partitioned like the ratings topic: wait for it to exist (not ready
    // meanwhile), as the consumer would.
    let mut warned = false;
    let partitions = loop {
        if let Some(n) = crate::kafka::partition_count(kafka, &kafka.topic).await? {
            break n;
        }
        if !warned {
            tracing::warn!(
                topic = kafka.topic,
                "[kafka] changelog_topic is set and the ratings topic does not exist yet: \
                 waiting for it (the changelog is created with its partition count)"
            );
            warned = true;
        }
        tokio::select! {
            _ = shutdown.changed() => anyhow::bail!("stopped while waiting for the ratings topic {}", kafka.topic),
            _ = tokio::time::sleep(Duration::from_millis(kafka.retry_backoff_ms.max(100))) => {}
        }
    };
    crate::kafka::ensure_topic_with(
        kafka,
        &kafka.changelog_topic,
        partitions,
        &[("cleanup.policy", "compact")],
    )
    .await?;
    let changelog = crate::kafka::partition_count(kafka, &kafka.changelog_topic).await?;
    anyhow::ensure!(
        changelog == Some(partitions),
        "the changelog topic {} has {changelog:?} partitions, the ratings topic {} has \
         {partitions}: they must be equal (give the changelog a new topic of its own after \
         adding partitions to the ratings topic)",
        kafka.changelog_topic,
        kafka.topic
    );
    let (compacted, policy) = crate::kafka::is_compacted(kafka, &kafka.changelog_topic).await?;
    anyhow::ensure!(
        compacted,
        "the changelog topic {} has cleanup.policy {policy:?}: it must be compacted (or the \
         broker deletes rows a restore needs); set cleanup.policy=compact",
        kafka.changelog_topic
    );
    Ok(partitions)
}

/// The poll loop's state: the consumer, the batch being filled, its dead letters, and the
/// channels to and from the engine thread.
struct Source {
    config: Config,
    shared: Shared,
    consumer: Arc<StreamConsumer<ServiceContext>>,
    dead_letters: FutureProducer,
    stored_offsets: Arc<Mutex<Positions>>,
    /// Mirrors the engine's caps on items and users, so refused events are dead-lettered like
    /// bad messages.
    admission: AdmissionGate,
    policy: crate::event::ValuePolicy,
    /// Next offset expected per partition (earlier ones are duplicates after a rebalance).
    expected: Positions,
    pending: Batch,
    letters: Vec<DeadLetter>,
    partition_keys: rustc_hash::FxHashMap<i32, String>,
    batch_started: Option<tokio::time::Instant>,
    batches: mpsc::Sender<Work>,
    /// The changelog writer's failure, which stops the service.
    changelog_errors: mpsc::UnboundedReceiver<anyhow::Error>,
    /// Set while this instance owns partition 0 (it coordinates the group model).
    owns_partition_zero: Arc<AtomicBool>,
    acks: mpsc::UnboundedReceiver<anyhow::Result<Committed>>,
    summary: RunSummary,
    stopping_for_target: bool,
}

impl Source {
    /// Connects to Kafka: the consumer (partitions assigned at the offsets stored in the
    /// state dir), the dead-letter producer, the catalogue reader and the broker probe.
    fn connect(
        config: &Config,
        titles: &Catalogue,
        shared: &Shared,
        stored_offsets: Arc<Mutex<Positions>>,
        admission: AdmissionGate,
        shutdown: &watch::Receiver<bool>,
        (batches, acks, changelog_errors): (
            mpsc::Sender<Work>,
            mpsc::UnboundedReceiver<anyhow::Result<Committed>>,
            mpsc::UnboundedReceiver<anyhow::Error>,
        ),
    ) -> anyhow::Result<Source> {
        let kafka = &config.kafka;
        let consumer = Arc::new(create_consumer(config, shared, &stored_offsets)?);
        let dead_letters: FutureProducer = client_config(kafka)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .context("cannot create the dead-letter producer")?;
        if !kafka.items_topic.is_empty() {
            spawn_items_reader(
                config,
                titles.clone(),
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
        Ok(Source {
            config: config.clone(),
            shared: shared.clone(),
            consumer,
            dead_letters,
            expected: read_offsets(&stored_offsets),
            stored_offsets,
            admission,
            policy: config.engine_params().policy().for_source(),
            pending: Batch {
                events: Vec::with_capacity(kafka.batch_size),
                partitions: Vec::with_capacity(kafka.batch_size),
                offsets: Positions::new(),
            },
            letters: vec![],
            partition_keys: Default::default(),
            batch_started: None,
            batches,
            changelog_errors,
            owns_partition_zero: Arc::new(AtomicBool::new(false)),
            acks,
            summary: RunSummary::default(),
            stopping_for_target: false,
        })
    }

    /// The poll loop, until shutdown, an error, or `exit_at_events` reached.
    async fn consume(
        &mut self,
        mut shutdown: watch::Receiver<bool>,
        options: &RunOptions,
        final_snapshot: &AtomicBool,
    ) -> anyhow::Result<()> {
        let linger = Duration::from_millis(self.config.kafka.batch_linger_ms.max(1));
        // Wakes the engine thread when no batch comes, so due snapshots and timed refreshes
        // still happen.
        let mut engine_tick = tokio::time::interval(crate::pipeline::TICK_EVERY);
        engine_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.shared.health.consuming.store(true, Ordering::Relaxed);
        let consumer = self.consumer.clone();
        loop {
            let flush_at = self.batch_started.map(|t| t + linger);
            let mut flush = false;
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        tracing::info!("shutdown requested: draining");
                        return Ok(());
                    }
                }
                ack = self.acks.recv() => {
                    let committed = ack.unwrap_or_else(|| Err(anyhow::anyhow!("the engine worker stopped unexpectedly")))?;
                    if self.on_committed(committed, options.exit_at_events) {
                        final_snapshot.store(true, Ordering::Relaxed);
                        return Ok(());
                    }
                }
                _ = sleep_until_opt(flush_at), if flush_at.is_some() => flush = true,
                _ = engine_tick.tick() => {
                    // Best effort: a full channel means the engine thread is busy anyway.
                    let _ = self.batches.try_send(Work::Batch(Batch::default()));
                }
                Some(e) = self.changelog_errors.recv() => return Err(e),
                message = consumer.recv() => match message {
                    Err(e) => tracing::warn!(%e, "consume error"),
                    Ok(m) => flush = self.on_message(&m),
                },
            }
            if consumer.context().revoked.swap(false, Ordering::Relaxed) {
                flush = true;
                // Whoever gets partition 0 next coordinates; until then, nobody here.
                self.owns_partition_zero.store(false, Ordering::Relaxed);
            }
            if consumer
                .context()
                .foreign_assignment
                .swap(false, Ordering::Relaxed)
            {
                // Unsubscribing leaves the group (a static member leaves only then, never on
                // exit), so the join that follows gets an assignment of the configured topic.
                consumer.unsubscribe();
                consumer
                    .subscribe(&[&self.config.kafka.topic])
                    .with_context(|| format!("cannot subscribe to {}", self.config.kafka.topic))?;
            }
            if flush && !self.pending.offsets.is_empty() {
                let shutdown = shutdown.clone();
                self.flush(move || *shutdown.borrow()).await?;
            }
            let assigned = consumer
                .context()
                .pending_assignment
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(partitions) = assigned {
                let shutdown = shutdown.clone();
                self.take_over(partitions, move || *shutdown.borrow())
                    .await?;
            }
        }
    }

    /// With a changelog: hands the assigned partitions to the engine thread (after the batch
    /// in flight) to take over, then consumes them from the offsets that gives.
    async fn take_over(
        &mut self,
        partitions: Vec<i32>,
        give_up: impl Fn() -> bool,
    ) -> anyhow::Result<()> {
        if !self.pending.offsets.is_empty() {
            self.flush(give_up).await?;
        }
        let started = Instant::now();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let owned: BTreeSet<i32> = partitions.iter().copied().collect();
        self.batches
            .send(Work::TakeOver {
                partitions: owned.clone(),
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the engine worker stopped unexpectedly"))?;
        // Polling on while the engine thread restores: a restore longer than
        // `max.poll.interval.ms` would otherwise get this member dropped from the group. Nothing
        // is assigned meanwhile, so nothing is fetched; a rebalance is taken in the callback.
        let mut answer = answer;
        let restored = loop {
            tokio::select! {
                restored = &mut answer => break restored,
                polled = self.consumer.recv() => {
                    if let Ok(message) = polled {
                        // Not ours to keep: its offset is fetched again once assigned.
                        tracing::debug!(partition = message.partition(), offset = message.offset(), "a message while taking partitions over: left to be fetched again");
                    }
                }
            }
        };
        let (next, gate) =
            restored.map_err(|_| anyhow::anyhow!("the engine worker stopped unexpectedly"))??;
        // Users and items restored (or gone) are the engine's now: the gate mirrors its caps.
        self.admission = gate;
        if self.consumer.context().revoked.load(Ordering::Relaxed) {
            // Revoked while restoring: the poll loop flushes and takes the new assignment over.
            tracing::info!(partitions = ?owned, "partitions revoked while being taken over: not consuming them");
            self.shared
                .health
                .set_consumed_partitions(Default::default());
            return Ok(());
        }
        let topic = self.config.kafka.topic.clone();
        let mut tpl = TopicPartitionList::new();
        self.expected
            .retain(|key, _| !key.starts_with(&format!("{topic}/")));
        for &p in &owned {
            let key = offset_key(&topic, p);
            let offset = match next.get(&p) {
                Some(&o) => {
                    self.expected.insert(key, o);
                    Offset::Offset(o)
                }
                None => Offset::Beginning,
            };
            tpl.add_partition_offset(&topic, p, offset)?;
        }
        self.consumer
            .assign(&tpl)
            .context("cannot assign the partitions taken over")?;
        self.owns_partition_zero
            .store(owned.contains(&0), Ordering::Relaxed);
        self.shared.health.restoring.store(false, Ordering::Relaxed);
        tracing::info!(
            partitions = ?owned,
            next_offsets = ?next,
            seconds = started.elapsed().as_secs_f64(),
            "partitions taken over: consuming"
        );
        Ok(())
    }

    /// Decodes one message into the pending batch (or its dead letters). Returns whether the
    /// batch is full.
    fn on_message(&mut self, m: &BorrowedMessage<'_>) -> bool {
        self.shared.health.set_broker_reachable(true);
        self.shared.metrics.events_consumed.inc();
        self.summary.consumed += 1;
        // Offsets are keyed `topic/partition`; the key of each partition is built once, and
        // the maps are updated in place (the hot path).
        let key = self
            .partition_keys
            .entry(m.partition())
            .or_insert_with(|| offset_key(m.topic(), m.partition()));
        if self
            .expected
            .get(key.as_str())
            .is_some_and(|&next| m.offset() < next)
        {
            self.shared.metrics.events_duplicate.inc();
            return false;
        }
        set_offset(&mut self.expected, key, m.offset() + 1);
        set_offset(&mut self.pending.offsets, key, m.offset() + 1);
        let default_ts = m.timestamp().to_millis().unwrap_or(0) / 1000;
        let decoded = decode_message(m.payload(), &self.config, &self.policy, default_ts)
            .and_then(|event| self.admission.admit_event(&event).map(|()| event));
        match decoded {
            Ok(event) => {
                self.pending.events.push(event);
                self.pending.partitions.push(m.partition());
            }
            Err(rejection) => self.letters.push(DeadLetter {
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                rejection,
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
            }),
        }
        if self.batch_started.is_none() {
            self.batch_started = Some(tokio::time::Instant::now());
        }
        self.pending.events.len() + self.letters.len() >= self.config.kafka.batch_size
    }

    /// A durable commit: its offsets become the stored ones and are reported to Kafka.
    /// Returns whether `exit_at_events` is reached.
    fn on_committed(&mut self, committed: Committed, exit_at_events: Option<u64>) -> bool {
        self.summary.events_applied_total = committed.events_applied;
        self.stored_offsets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone_from(&committed.positions);
        if let Some(tpl) = commit_list(&committed.positions) {
            // Async: progress reporting only; failures are harmless (the state dir is the
            // truth).
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(%e, "offset commit to Kafka failed (progress reporting only)");
            }
        }
        let reached = exit_at_events.is_some_and(|n| committed.events_applied >= n);
        if reached {
            tracing::info!(
                events_applied = committed.events_applied,
                "target reached: stopping"
            );
            self.stopping_for_target = true;
        }
        reached
    }

    /// Delivers the batch's dead letters (awaiting the broker's acknowledgement), then hands
    /// the good events and offsets to the engine thread.
    async fn flush(&mut self, give_up: impl Fn() -> bool) -> anyhow::Result<()> {
        self.batch_started = None;
        if !self.letters.is_empty() {
            self.deliver_dead_letters(give_up).await?;
        }
        let batch = Batch {
            events: std::mem::take(&mut self.pending.events),
            partitions: std::mem::take(&mut self.pending.partitions),
            offsets: std::mem::take(&mut self.pending.offsets),
        };
        self.batches
            .send(Work::Batch(batch))
            .await
            .map_err(|_| anyhow::anyhow!("the engine worker stopped unexpectedly"))
    }

    async fn deliver_dead_letters(&mut self, give_up: impl Fn() -> bool) -> anyhow::Result<()> {
        let (metrics, health) = (&self.shared.metrics, &self.shared.health);
        let letters = &mut self.letters;
        let mut by_reason: BTreeMap<&'static str, u64> = BTreeMap::new();
        for l in letters.iter() {
            *by_reason.entry(l.rejection.reason.label()).or_default() += 1;
        }
        let topic = &self.config.kafka.dead_letter_topic;
        // One line per batch, never one per event.
        tracing::warn!(
            count = letters.len(),
            reasons = ?by_reason,
            first = %letters[0].rejection,
            topic = %topic,
            "events rejected and sent to the dead-letter topic"
        );
        deliver_all(
            &self.dead_letters,
            topic,
            letters,
            Duration::from_millis(self.config.kafka.retry_backoff_ms.max(1)),
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
        self.summary.rejected += letters.len() as u64;
        letters.clear();
        Ok(())
    }

    /// The last partial batch, then every outstanding commit, within the drain time; then the
    /// final offsets reported to Kafka.
    async fn drain(
        mut self,
        worker: std::thread::JoinHandle<anyhow::Result<()>>,
    ) -> anyhow::Result<RunSummary> {
        self.shared.health.consuming.store(false, Ordering::Relaxed);
        let drain_timeout = self.config.kafka.drain_timeout_ms;
        let drain = async {
            if !self.pending.offsets.is_empty() && !self.stopping_for_target {
                self.flush(|| false).await?;
            }
            // Closing the batches stops the engine thread, which writes its last commits
            // and closes the acknowledgements.
            let (closed, _) = mpsc::channel(1);
            drop(std::mem::replace(&mut self.batches, closed));
            while let Some(ack) = self.acks.recv().await {
                self.on_committed(ack?, None);
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_millis(drain_timeout), drain)
            .await
            .map_err(|_| anyhow::anyhow!("drain did not finish within [kafka] drain_timeout_ms = {drain_timeout}; state is consistent up to the last commit"))??;
        tokio::task::spawn_blocking(move || worker.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the engine worker panicked"))??;
        // Progress for lag reporting; the state dir already holds the truth.
        if let Some(tpl) = commit_list(&read_offsets(&self.stored_offsets))
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(%e, "final offset commit to Kafka failed (progress reporting only)");
        }
        Ok(self.summary)
    }
}

/// The consumer: settings tuned for throughput (`[kafka.client]` may change them), then the
/// ones exactly-once rests on (the config layer refuses them in `[kafka.client]`).
fn create_consumer(
    config: &Config,
    shared: &Shared,
    stored_offsets: &Arc<Mutex<Positions>>,
) -> anyhow::Result<StreamConsumer<ServiceContext>> {
    let kafka = &config.kafka;
    shared.health.set_partitions_assigned(0);
    let context = ServiceContext {
        topic: kafka.topic.clone(),
        stored_offsets: stored_offsets.clone(),
        health: shared.health.clone(),
        revoked: AtomicBool::new(false),
        foreign_assignment: AtomicBool::new(false),
        changelog: !kafka.changelog_topic.is_empty(),
        pending_assignment: Mutex::new(None),
    };
    // A local prefetch deep enough that the poll loop rarely waits on a fetch, bounded in
    // messages as well as bytes: librdkafka's byte bound counts payloads only, so a backlog of
    // small messages filled the queue with 500,000 per partition (each with its own fetch
    // operation). At 50,000 consumption of a 5M-event topic took 1.4x as long; 200,000 keeps
    // it within the noise of 500,000 (scripts/bench-kafka.sh).
    let mut consumer_config = client_config_with_defaults(
        kafka,
        &[
            ("queued.min.messages", "200000"),
            ("queued.max.messages.kbytes", "65536"),
            ("max.partition.fetch.bytes", "8388608"),
            ("fetch.wait.max.ms", "100"),
        ],
    );
    if !kafka.instance_id.is_empty() {
        consumer_config.set("group.instance.id", &kafka.instance_id);
    }
    let consumer: StreamConsumer<ServiceContext> = consumer_config
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("partition.assignment.strategy", "range")
        .create_with_context(context)
        .context("cannot create the Kafka consumer")?;
    consumer
        .subscribe(&[&kafka.topic])
        .with_context(|| format!("cannot subscribe to {}", kafka.topic))?;
    Ok(consumer)
}

/// The offsets the state dir holds. A panic elsewhere while the lock was held (a poisoned
/// mutex) does not make them unknown: every write replaces the whole map at once.
fn read_offsets(stored: &Mutex<Positions>) -> Positions {
    stored
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

fn set_offset(offsets: &mut Positions, key: &str, next: i64) {
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
fn commit_list(offsets: &Positions) -> Option<TopicPartitionList> {
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
                shared.health.set_partitions_assigned(
                    assignment
                        .elements()
                        .iter()
                        .filter(|e| e.topic() == topic)
                        .count(),
                );
                let offsets = read_offsets(&stored);
                // Partitions moved to other instances leave the gauge.
                shared.metrics.consumer_lag.reset();
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
    catalogue: Catalogue,
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
                    store_titles(&catalogue, &catalogue_version, &mut pending).await;
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
                                store_titles(&catalogue, &catalogue_version, &mut pending).await;
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
        store_titles(&catalogue, &catalogue_version, &mut pending).await;
    });
    Ok(())
}

/// Catalogue records stored per write, and how long a partial batch waits.
const TITLES_PER_WRITE: usize = 1_000;
const TITLES_LINGER: Duration = Duration::from_millis(200);

async fn store_titles(
    catalogue: &Catalogue,
    catalogue_version: &std::sync::atomic::AtomicU64,
    pending: &mut Vec<(String, String)>,
) {
    if pending.is_empty() {
        return;
    }
    let titles = std::mem::take(pending);
    let catalogue = catalogue.clone();
    match tokio::task::spawn_blocking(move || catalogue.put_titles(&titles)).await {
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
