//! The one path every source drives. A source (the Kafka consumer, the demo generator, a file
//! replay) decodes events and hands them in batches, with its positions, to the pipeline, which
//! applies them to the engine, commits the changed state together with the positions in one
//! atomic write (on a writer thread, in order), refreshes the model on its timer, takes
//! snapshots on schedule and publishes them to readers (HTTP, metrics). It owns health too:
//! whichever source runs, `/readyz` reads the same flags.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::Config;
use crate::engine::{
    ApplyOutcome, Challenge, Engine, EngineParams, EngineView, Model, SourceIds, WarmStart,
};
use crate::event::Rating;
use crate::http::serving::Serving;
use crate::kafka::changelog::{ChangelogBatch, Handover};
use crate::ownership::Ownership;
use crate::snapshot::{
    self, Assignments, BuildInput, Built, Diagnostics, Snapshot, SnapshotParams,
};
use crate::store::{
    Catalogue, ChangeTracker, FeedRecord, LoadedEngine, PreparedCommit, SnapshotStore, StateStore,
    Stores,
};
use crate::telemetry::Metrics;

/// Positions in the sources, committed with the state: `topic/partition` → next offset for
/// Kafka, a file's key → events applied for a replay.
pub type Positions = BTreeMap<String, i64>;

/// What `/readyz` and the logs report about the service.
#[derive(Debug, Default)]
pub struct Health {
    pub state_open: AtomicBool,
    pub consuming: AtomicBool,
    pub broker_reachable: AtomicBool,
    /// The dead-letter topic refuses the current batch's letters: consumption waits (a bad
    /// event is never dropped) and the service is not ready until they are delivered.
    pub dead_letters_refused: AtomicBool,
    /// Kafka partitions of the configured topic this instance has assigned, when Kafka is the
    /// source (`None` for the demo and replay): an instance with none consumes nothing.
    pub partitions_assigned: std::sync::Mutex<Option<usize>>,
    /// The change feed failed its last attempt and stored snapshots wait to be published.
    pub feed_behind: AtomicBool,
    /// The change feed stopped for good and needs an operator: fenced by another producer
    /// with its transactional id, or Kafka's record of what it published went backwards.
    pub feed_stopped: AtomicBool,
    /// Partitions were assigned whose state this instance is taking over from the changelog:
    /// they are consumed once it is restored.
    pub restoring: AtomicBool,
    /// The changelog failed its last transaction and retries: a partition moved now would be
    /// restored to an older offset (and consumed again from there).
    pub changelog_behind: AtomicBool,
    /// With a changelog: the partitions this instance has taken over and consumes, emptied at a
    /// revoke. Batches applied before a revoke may still be on their way to the changelog when
    /// the partition's new owner fences this instance off; only a partition still consumed
    /// makes that fatal.
    pub consumed_partitions: std::sync::Mutex<std::collections::BTreeSet<i32>>,
    /// `[kafka] standby`: this instance keeps warm copies of the partitions it does not own.
    pub standby: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.state_open.load(Ordering::Relaxed)
            && self.consuming.load(Ordering::Relaxed)
            && self.broker_reachable.load(Ordering::Relaxed)
            && !self.dead_letters_refused.load(Ordering::Relaxed)
            && self.partitions_assigned().is_none_or(|n| n > 0)
            && !self.feed_behind.load(Ordering::Relaxed)
            && !self.feed_stopped.load(Ordering::Relaxed)
            && !self.restoring.load(Ordering::Relaxed)
            && !self.changelog_behind.load(Ordering::Relaxed)
    }

    /// One word for `/readyz`: `restoring` while partitions are being taken over from the
    /// changelog, `serving` when ready, `standing_by` for a standby with no partition to
    /// consume, `not_ready` otherwise (the flags say why).
    pub fn status(&self) -> &'static str {
        if self.restoring.load(Ordering::Relaxed) {
            "restoring"
        } else if self.ready() {
            "serving"
        } else if self.standby.load(Ordering::Relaxed) && self.partitions_assigned() == Some(0) {
            // No partition to consume: a spare, ready to take some over without a full read.
            "standing_by"
        } else {
            "not_ready"
        }
    }

    pub fn set_changelog_behind(&self, behind: bool) {
        let was = self.changelog_behind.swap(behind, Ordering::Relaxed);
        if !was && behind {
            tracing::warn!("the changelog is behind the state dir: not ready until it catches up");
        } else if was && !behind {
            tracing::info!("the changelog caught up");
        }
    }

    pub fn partitions_assigned(&self) -> Option<usize> {
        *self
            .partitions_assigned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_consumed_partitions(&self, partitions: std::collections::BTreeSet<i32>) {
        *self
            .consumed_partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = partitions;
    }

    pub fn consumes_partition(&self, partition: i32) -> bool {
        self.consumed_partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&partition)
    }

    pub fn set_partitions_assigned(&self, partitions: usize) {
        *self
            .partitions_assigned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(partitions);
    }

    pub fn set_feed_behind(&self, behind: bool) {
        let was = self.feed_behind.swap(behind, Ordering::Relaxed);
        if !was && behind {
            tracing::warn!("the change feed is behind: snapshots wait to be published; not ready");
        } else if was && !behind {
            tracing::info!("the change feed caught up");
        }
    }

    pub fn set_dead_letters_refused(&self, refused: bool) {
        let was = self.dead_letters_refused.swap(refused, Ordering::Relaxed);
        if !was && refused {
            tracing::error!("the dead-letter topic refuses letters: consumption waits; not ready");
        } else if was && !refused {
            tracing::info!("dead letters delivered again");
        }
    }

    pub fn set_broker_reachable(&self, reachable: bool) {
        let was = self.broker_reachable.swap(reachable, Ordering::Relaxed);
        if was && !reachable {
            tracing::warn!("broker unreachable: not ready; retrying with backoff");
        } else if !was && reachable {
            tracing::info!("broker reachable");
        }
    }
}

/// The latest snapshot as served over HTTP, replaced whenever a new one is built.
pub type ServingSlot = Arc<RwLock<Option<Arc<Serving>>>>;

/// How a source keeps its model and makes its snapshots: the one place where the file replay
/// and the service differ, handed to [`Pipeline::new`] by each source.
///
/// | | replay ([`SnapshotPolicy::replay`]) | service and demo ([`SnapshotPolicy::service`]) |
/// |---|---|---|
/// | online model | none: nobody sees a file's intermediate models | refreshed every `[model] refresh_every_events` |
/// | segments | solved cold, ids matched to stored snapshots | the previous snapshot's continued, re-segmented openly |
/// | diagnostics | every snapshot | every `[snapshot] diagnostics_every`-th version, after it is served |
/// | when | one snapshot at the end | `[snapshot] max_staleness_ms` after the first uncovered event, `interval_ms` apart |
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotPolicy {
    pub online_model: bool,
    pub segments: SegmentPolicy,
    /// Diagnostics on every n-th version (1: every snapshot, 0: none).
    pub diagnostics_every: u64,
    /// Compute them after the snapshot is served, carried into the following ones, rather
    /// than while it is built (the first snapshot a process builds still computes them inline).
    pub background_diagnostics: bool,
    pub cadence: Cadence,
}

/// Whether a snapshot continues the previous one's segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentPolicy {
    Continue,
    /// Solve from the data alone; ids still matched to the stored snapshots.
    Cold,
}

/// When snapshots are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cadence {
    /// At most `max_staleness` after the first applied event the served one does not cover,
    /// starts at least `min_interval` apart.
    Staleness {
        max_staleness: Duration,
        min_interval: Duration,
    },
    /// Only when the source asks ([`Pipeline::final_snapshot`], [`Pipeline::finish`]).
    AtEnd,
    /// Never: the consumer group's coordinator builds every snapshot of the whole group
    /// (`[kafka] group_model_interval_ms`), which this instance stores and serves.
    Never,
}

impl SnapshotPolicy {
    pub fn service(config: &Config) -> Self {
        let cadence = if config.kafka.group_model_on() {
            Cadence::Never
        } else {
            Cadence::Staleness {
                max_staleness: Duration::from_millis(config.snapshot.max_staleness_ms.max(1)),
                min_interval: Duration::from_millis(config.snapshot.interval_ms.max(1)),
            }
        };
        SnapshotPolicy {
            online_model: true,
            segments: SegmentPolicy::Continue,
            diagnostics_every: config.snapshot.diagnostics_every.max(1),
            background_diagnostics: true,
            cadence,
        }
    }

    /// A replay's: `diagnostics` false leaves them out of its snapshot.
    pub fn replay(diagnostics: bool) -> Self {
        SnapshotPolicy {
            online_model: false,
            segments: SegmentPolicy::Cold,
            diagnostics_every: u64::from(diagnostics),
            background_diagnostics: false,
            cadence: Cadence::AtEnd,
        }
    }
}

/// What the pipeline shares with its readers (the HTTP API, tests): metrics, health and the
/// latest snapshot ready for lookups.
#[derive(Clone, Default)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// The latest model of the whole consumer group, read from its models topic (Kafka
    /// source with `[kafka] group_model_interval_ms`; empty otherwise).
    pub group: crate::kafka::rounds::GroupSlot,
    /// Every user's segment in the group model, read from its assignments topic.
    pub group_assignments: crate::kafka::rounds::GroupAssignments,
    pub health: Arc<Health>,
    pub serving: ServingSlot,
    /// Bumped whenever catalogue titles are stored: profiles show titles, so a changed
    /// catalogue is a reason for a new snapshot even when no event came.
    pub catalogue_version: Arc<AtomicU64>,
    /// The version of the latest snapshot served, announced as it is (the Kafka snapshots
    /// topic publisher waits on it).
    pub published: SnapshotNotices,
    /// The latest snapshot's solved basis: the next snapshot's solve starts from it.
    pub warm_start: Arc<std::sync::Mutex<Option<WarmStart>>>,
    /// What challenging the latest snapshot found (the next one compares itself with it).
    pub challenge: Arc<std::sync::Mutex<Option<Challenge>>>,
    /// The snapshot waiting to be challenged next, and whether the challenger thread runs.
    challenge_request: Arc<std::sync::Mutex<Option<ChallengeRequest>>>,
    /// The latest diagnostics computed after a snapshot was served, carried into the next ones.
    pub diagnostics: Arc<std::sync::Mutex<Option<Diagnostics>>>,
    challenging: Arc<std::sync::atomic::AtomicBool>,
    /// The version whose challenge last asked for a snapshot to re-seed its degenerate
    /// segments (0: none yet).
    reseed_asked_by: Arc<AtomicU64>,
    /// Bumped when a challenge beat the served segments: a reason for a new snapshot (which
    /// re-segments) even when no event came.
    pub challenges_won: Arc<AtomicU64>,
    /// Held while a snapshot is built: challenges and diagnostics wait for it between their
    /// steps.
    building: Arc<BuildGate>,
    /// The latest snapshot's version and the Lloyd optimum its build reached before holding
    /// users: the next continued snapshot's Lloyd starts there.
    lloyd_start: Arc<std::sync::Mutex<Option<LloydStart>>>,
}

/// Snapshot `version`'s Lloyd optimum before users were held (by user index).
#[derive(Debug, Clone)]
struct LloydStart {
    version: u64,
    labels: Vec<u32>,
}

/// Lets background work (challenges, diagnostics) step aside while a snapshot is built. They
/// run at the lowest CPU priority, but on another core they still share the caches and memory
/// bandwidth with the build: measured at 5M ratings, builds that overlapped a diagnostics and
/// challenge job took 0.56 s instead of 0.38 s.
#[derive(Debug, Default)]
pub struct BuildGate {
    builds: std::sync::Mutex<usize>,
    idle: std::sync::Condvar,
}

impl BuildGate {
    /// A build starts; it ends when the guard is dropped.
    pub fn enter(&self) -> BuildGuard<'_> {
        *self.builds.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        BuildGuard(self)
    }

    /// Returns once no build is running.
    pub fn wait_idle(&self) {
        let mut builds = self.builds.lock().unwrap_or_else(|e| e.into_inner());
        while *builds > 0 {
            builds = self.idle.wait(builds).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A build in progress (see [`BuildGate::enter`]).
pub struct BuildGuard<'a>(&'a BuildGate);

impl Drop for BuildGuard<'_> {
    fn drop(&mut self) {
        let mut builds = self.0.builds.lock().unwrap_or_else(|e| e.into_inner());
        *builds = builds.saturating_sub(1);
        if *builds == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// Announces each snapshot version as it is served.
#[derive(Clone)]
pub struct SnapshotNotices(Arc<tokio::sync::watch::Sender<u64>>);

impl Default for SnapshotNotices {
    fn default() -> Self {
        SnapshotNotices(Arc::new(tokio::sync::watch::channel(0).0))
    }
}

impl SnapshotNotices {
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }

    /// The version served last (0 before any).
    pub fn latest(&self) -> u64 {
        *self.0.borrow()
    }
}

impl Shared {
    /// Builds and stores a snapshot of `engine` as `policy` says, then publishes it: metrics,
    /// and the serving copy for lookups. Returns its version (`None` while there is too little
    /// data).
    pub fn snapshot(
        &self,
        config: &Config,
        policy: &SnapshotPolicy,
        snapshots: &SnapshotStore,
        catalogue: &Catalogue,
        engine: &EngineView,
        positions: Positions,
    ) -> anyhow::Result<Option<Taken>> {
        let started = Instant::now();
        let building = self.building.enter();
        let titles = catalogue.titles()?;
        let carried = self.diagnostics.lock().ok().and_then(|d| d.clone());
        let computed_inline = carried.is_none();
        let Some(built) = build_and_store_snapshot(
            config, policy, snapshots, engine, &titles, positions, carried,
        )?
        else {
            return Ok(None);
        };
        let version = built.snapshot.version;
        if computed_inline && built.snapshot.diagnostics.is_some() {
            // Computed while this one was built (none to carry yet): the next ones carry them.
            if let Ok(mut slot) = self.diagnostics.lock() {
                slot.clone_from(&built.snapshot.diagnostics);
            }
        }
        self.metrics.on_snapshot(&built.snapshot);
        if config.kafka.change_feed_on() {
            self.metrics
                .feed_unpublished
                .set(snapshots.unpublished_versions()? as i64);
        }
        self.metrics
            .snapshot_build_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Ok(mut warm) = self.warm_start.lock() {
            *warm = Some(built.model.warm_start());
        }
        if let Ok(mut start) = self.lloyd_start.lock() {
            let optimum = built.model.lloyd_optimum();
            *start = (!optimum.is_empty()).then(|| LloydStart {
                version,
                labels: optimum.to_vec(),
            });
        }
        let serving = Arc::new(Serving::new(engine, &built.model, built.snapshot, titles));
        let labels = built.model.labels().to_vec();
        if let Ok(mut slot) = self.serving.write() {
            *slot = Some(serving.clone());
        }
        log_snapshot_built(&serving.snapshot);
        self.published.0.send_replace(version);
        drop(building);
        if policy.segments == SegmentPolicy::Continue {
            let diagnose = (policy.background_diagnostics
                && diagnostics_due(policy, version)
                && !(computed_inline && serving.snapshot.diagnostics.is_some()))
            .then(|| Diagnose {
                view: engine.clone(),
                params: config.snapshot_params(),
            });
            self.request_challenge(engine, built.model, version, diagnose);
        }
        Ok(Some(Taken { version, labels }))
    }

    /// Asks for snapshot `version` to be challenged on a thread of its own, after it is
    /// served (see [`Challenge`]). One challenge runs at a time; a request made meanwhile
    /// replaces any older one waiting, so the latest snapshot is always challenged in the end.
    fn request_challenge(
        &self,
        engine: &EngineView,
        served: Model,
        version: u64,
        diagnose: Option<Diagnose>,
    ) {
        if let Ok(mut slot) = self.challenge_request.lock() {
            // Diagnostics still owed by a request not yet taken are owed by this one too.
            let diagnose = diagnose.or_else(|| {
                slot.as_ref()
                    .and_then(|old| old.diagnose.as_ref())
                    .map(|old| Diagnose {
                        view: engine.clone(),
                        params: old.params.clone(),
                    })
            });
            *slot = Some(ChallengeRequest {
                params: engine.params().clone(),
                order: engine.canonical_user_order(),
                online: engine.model().labels().to_vec(),
                served,
                version,
                diagnose,
            });
        }
        if self.challenging.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name("segmenter-challenge".into())
            .spawn(move || shared.run_challenges());
        if spawned.is_err() {
            self.challenging.store(false, Ordering::Release);
        }
    }

    /// The challenger thread: runs the waiting request until there is none, resting twice as
    /// long as each one took before the next, so that challenges and diagnostics take at
    /// most a third of a core from the snapshots and the stream they compete with.
    fn run_challenges(&self) {
        lower_this_threads_priority();
        let mut rest = Duration::ZERO;
        loop {
            std::thread::sleep(rest);
            let request = self
                .challenge_request
                .lock()
                .ok()
                .and_then(|mut r| r.take());
            let Some(request) = request else {
                self.challenging.store(false, Ordering::Release);
                // A request that came between the take and the store has no thread yet.
                let waiting = self.challenge_request.lock().is_ok_and(|r| r.is_some());
                if waiting && !self.challenging.swap(true, Ordering::AcqRel) {
                    continue;
                }
                return;
            };
            self.building.wait_idle();
            let job_started = Instant::now();
            let ChallengeRequest {
                params,
                served,
                version,
                order,
                online,
                diagnose,
            } = request;
            if let Some(Diagnose { view, params }) = diagnose {
                let started = Instant::now();
                let with_curve = view.with_curve(&served);
                self.building.wait_idle();
                let diagnostics =
                    snapshot::diagnostics(&view, &with_curve, &params, view.value_scale(), &|| {
                        self.building.wait_idle()
                    });
                tracing::info!(
                    version,
                    seconds = started.elapsed().as_secs_f64(),
                    "snapshot diagnosed"
                );
                if let Ok(mut slot) = self.diagnostics.lock() {
                    *slot = Some(Diagnostics {
                        as_of_version: Some(version),
                        ..diagnostics
                    });
                }
            }
            self.building.wait_idle();
            let started = Instant::now();
            let Some(challenge) =
                EngineView::challenge_with(&params, &served, version, &order, &online, &|| {
                    self.building.wait_idle()
                })
            else {
                continue;
            };
            // A better clustering, or a re-seeding that helps, asks for a snapshot even when no
            // event comes (else a stream that stopped would keep its degenerate segments). A
            // re-seeding asks once: if the snapshot it brought did not take it, the next
            // challenge finding it again waits for events.
            let reseed_asks = challenge.reseeded.is_some()
                && self.reseed_asked_by.load(Ordering::Relaxed) + 1 != version;
            if reseed_asks {
                self.reseed_asked_by.store(version, Ordering::Relaxed);
            }
            let asks_snapshot = challenge.better.is_some() || reseed_asks;
            // Operators and tests read from this line whether the served segments held.
            tracing::info!(
                version,
                ratio = challenge.ratio,
                better = challenge.better.is_some(),
                reseeded = challenge.reseeded.is_some(),
                asks_snapshot,
                seconds = started.elapsed().as_secs_f64(),
                "snapshot challenged"
            );
            if asks_snapshot {
                self.challenges_won.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut slot) = self.challenge.lock() {
                *slot = Some(challenge);
            }
            rest = job_started.elapsed() * CHALLENGE_REST_FACTOR;
        }
    }
}

/// Makes the calling thread (and the threads it starts) yield the CPU to every other thread of
/// the service: challenges and diagnostics are background work, snapshots and the stream come
/// first (nice 19, Linux; elsewhere nothing).
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        unsafe extern "C" {
            fn setpriority(
                which: std::ffi::c_int,
                who: std::ffi::c_uint,
                prio: std::ffi::c_int,
            ) -> std::ffi::c_int;
            fn gettid() -> std::ffi::c_int;
        }
        const PRIO_PROCESS: std::ffi::c_int = 0;
        // SAFETY: both calls take plain integers; on Linux `setpriority` with a thread id sets
        // that thread's nice value only.
        let failed = unsafe { setpriority(PRIO_PROCESS, gettid() as std::ffi::c_uint, 19) } != 0;
        if failed {
            tracing::debug!("could not lower the challenger thread's priority");
        }
    }
}

/// How long the challenger rests after a job, in multiples of the job's duration.
const CHALLENGE_REST_FACTOR: u32 = 2;

/// A served snapshot to challenge, with what the challenge needs of the view it was built from.
struct ChallengeRequest {
    params: EngineParams,
    served: Model,
    version: u64,
    order: Vec<u32>,
    online: Vec<u32>,
    /// Its diagnostics are due too.
    diagnose: Option<Diagnose>,
}

/// What diagnostics computed after a snapshot is served need: the view it was built from.
struct Diagnose {
    view: EngineView,
    params: SnapshotParams,
}

/// A snapshot built and served: its version and its segments by user index (the engine's
/// tracked sums follow them).
#[derive(Debug, Clone)]
pub struct Taken {
    pub version: u64,
    pub labels: Vec<u32>,
}

/// What the writer reports after each durable commit.
#[derive(Debug, Clone)]
pub struct Committed {
    pub positions: Positions,
    pub events_applied: u64,
}

/// Where durable commits are reported (the Kafka source acknowledges offsets from them).
pub type Acks = UnboundedSender<anyhow::Result<Committed>>;

/// What a pipeline did, for the source's summary line.
#[derive(Debug, Clone, Default)]
pub struct PipelineSummary {
    pub events_applied: u64,
    pub snapshots: u64,
    pub last_version: Option<u64>,
}

pub struct Pipeline {
    config: Config,
    /// Shared with the writer thread: commits are prepared here and written there.
    state: Arc<StateStore>,
    snapshots: SnapshotStore,
    catalogue: Catalogue,
    engine: Engine,
    /// What the engine changed since the last commit, for the next one.
    changes: ChangeTracker,
    source_ids: SourceIds,
    positions: Positions,
    shared: Shared,
    writer: Writer,
    schedule: Schedule,
    policy: SnapshotPolicy,
    /// Whose partition each user is, when a changelog backs the state (see
    /// [`Pipeline::track_partitions`]).
    ownership: Option<Ownership>,
    /// The partitions of the tracked topic this instance owns (the last [`Pipeline::take_over`]).
    owned: BTreeSet<i32>,
}

impl Pipeline {
    /// A pipeline over the engine loaded from `stores.state`, at the positions the state store
    /// holds. Commits are reported to `acks` once durable.
    pub fn new(
        config: &Config,
        policy: SnapshotPolicy,
        stores: Stores,
        loaded: LoadedEngine,
        shared: Shared,
        acks: Option<Acks>,
    ) -> anyhow::Result<Pipeline> {
        let Stores {
            state,
            snapshots,
            catalogue,
        } = stores;
        let LoadedEngine { engine, changes } = loaded;
        if snapshots.rollback().is_some() {
            // Logged by the store; counted here, where the metrics are.
            shared.metrics.state_rollbacks.inc();
        }
        let state = Arc::new(state);
        let positions = state.offsets()?;
        let schedule = Schedule::new(config, &policy, &engine, &shared);
        shared.metrics.user_ids.set(engine.users().len() as i64);
        let mut engine = engine;
        if policy.segments == SegmentPolicy::Continue {
            // Snapshots continue the latest one: keep the sums under its segments in step
            // with every event, so the next snapshot pays only for what changed.
            let latest = snapshots.snapshot_versions()?.last().copied();
            let labels = match latest {
                Some(v) => snapshots.assignment_labels(v)?.unwrap_or_default(),
                None => vec![],
            };
            engine.track_segments(&labels, config.snapshot.holdout_percent);
        }
        Ok(Pipeline {
            config: config.clone(),
            writer: Writer::spawn(state.clone(), acks)?,
            state,
            snapshots,
            catalogue,
            engine,
            changes,
            source_ids: SourceIds::default(),
            positions,
            shared,
            schedule,
            policy,
            ownership: None,
            owned: BTreeSet::new(),
        })
    }

    /// The admission gate of the engine as it stands (after a take-over changed its users).
    pub fn admission_gate(&self) -> crate::engine::AdmissionGate {
        crate::engine::AdmissionGate::new(&self.engine)
    }

    /// This instance's users as they stand, with the next offset of each partition it owns:
    /// what it answers a group model's rounds from (a copy-on-write view).
    pub fn shard(&self) -> crate::kafka::rounds::Shard {
        let local = self.local_offsets(&self.owned);
        let offsets = self
            .owned
            .iter()
            .map(|&p| (p, local.get(&p).copied().unwrap_or(0)))
            .collect();
        let vectors = self.engine.vectors();
        // Held users (of owned partitions) whose every rating is gone: they left the segments.
        let emptied = self.ownership.as_ref().map_or_else(Vec::new, |ownership| {
            ownership
                .users_of(|p| self.owned.contains(&p))
                .into_iter()
                .filter(|&u| vectors.get(u as usize).is_some_and(|x| x.nnz() == 0))
                .map(|u| self.engine.users().id(u).to_string())
                .collect()
        });
        crate::kafka::rounds::Shard {
            users: self.engine.users().ids().clone(),
            items: self.engine.items().ids().clone(),
            vectors: vectors.clone(),
            offsets,
            emptied,
        }
    }

    /// Keeps track of which partition of `topic` each user's events come from (persisted
    /// with the state), for [`Pipeline::apply_partitioned`] and [`Pipeline::take_over`].
    pub fn track_partitions(&mut self, topic: &str) -> anyhow::Result<()> {
        let by_user = self.state.user_partitions()?;
        anyhow::ensure!(
            !by_user.is_empty() || self.engine.users().is_empty(),
            "the state dir {} holds users applied without a changelog, whose partitions it \
             did not record: start this instance on an empty state dir (it restores its \
             partitions from the changelog, or the ratings topic), or remove [kafka] \
             changelog_topic",
            self.state.path().display()
        );
        self.ownership = Some(Ownership::new(topic, by_user));
        Ok(())
    }

    /// The next offsets the state holds for `partitions` of the tracked topic.
    pub fn local_offsets(&self, partitions: &BTreeSet<i32>) -> BTreeMap<i32, i64> {
        let Some(ownership) = &self.ownership else {
            return BTreeMap::new();
        };
        partitions
            .iter()
            .filter_map(|&p| Some((p, *self.positions.get(&ownership.key_of(p))?)))
            .collect()
    }

    /// [`Pipeline::apply`] for events from partitions of the tracked topic (`partitions[i]`
    /// is the `i`-th event's): also returns what changed per partition, for the changelog.
    pub fn apply_partitioned(
        &mut self,
        events: &[impl Rating],
        partitions: &[i32],
        positions: Positions,
    ) -> anyhow::Result<(ApplyOutcome, ChangelogBatch)> {
        let mut ownership = self
            .ownership
            .take()
            .context("partitions are not tracked: call track_partitions first")?;
        let outcome = self.apply_events(events);
        let cells = self.changes.changed_cells();
        let (changes, new_owners) =
            ownership.batch_changes(&self.engine, events, partitions, cells, &positions);
        self.ownership = Some(ownership);
        self.positions.extend(positions);
        self.commit(&new_owners)?;
        Ok((outcome, changes))
    }

    /// The consumer group gave this instance `owned` (and only those) partitions: the users
    /// of partitions it held and no longer owns leave the engine, and each partition in
    /// `handovers` restored from the changelog replaces what the state held of it. Committed
    /// like a batch; returns the next offset to consume each owned partition from (absent:
    /// from the beginning).
    pub fn take_over(
        &mut self,
        owned: &BTreeSet<i32>,
        handovers: BTreeMap<i32, Handover>,
    ) -> anyhow::Result<BTreeMap<i32, i64>> {
        let mut ownership = self
            .ownership
            .take()
            .context("partitions are not tracked: call track_partitions first")?;
        let taken = self.take_over_with(&mut ownership, owned, handovers);
        self.ownership = Some(ownership);
        let new_owners = taken?;
        self.owned = owned.clone();
        self.commit(&new_owners)?;
        Ok(self.local_offsets(owned))
    }

    fn take_over_with(
        &mut self,
        ownership: &mut Ownership,
        owned: &BTreeSet<i32>,
        handovers: BTreeMap<i32, Handover>,
    ) -> anyhow::Result<Vec<(u32, i32)>> {
        let held = ownership.held(&self.positions);
        let restored: BTreeSet<i32> = handovers
            .iter()
            .filter(|(_, h)| matches!(h, Handover::Restored { .. }))
            .map(|(&p, _)| p)
            .collect();
        // Users of partitions no longer owned leave; of a restored partition, only those the
        // changelog no longer holds (the others' rows are set to the changelog's below).
        let restored_users: FxHashSet<u32> = handovers
            .values()
            .flat_map(|h| match h {
                Handover::Restored { rows, .. } => rows.as_slice(),
                Handover::Kept => &[],
            })
            .filter_map(|row| self.engine.users().get(&row.user))
            .collect();
        let mut leaving = ownership.users_of(|p| !owned.contains(&p));
        leaving.extend(
            ownership
                .users_of(|p| restored.contains(&p))
                .into_iter()
                .filter(|u| !restored_users.contains(u)),
        );
        leaving.sort_unstable();
        let changed = !leaving.is_empty() || !restored.is_empty();
        let dropped: Vec<i32> = held.difference(owned).copied().collect();
        if !dropped.is_empty() {
            tracing::info!(partitions = ?dropped, "partitions moved to other instances: their users leave this one");
        }
        self.engine.clear_users(&leaving, &mut self.changes);
        for p in &dropped {
            self.positions.remove(&ownership.key_of(*p));
        }
        let mut new_owners = vec![];
        for (partition, handover) in handovers {
            let Handover::Restored { rows, next_offset } = handover else {
                continue;
            };
            for row in &rows {
                self.engine
                    .set_stored_row(&row.user, &row.cells, &mut self.changes)
                    .map_err(|reason| {
                        anyhow::anyhow!(
                            "cannot restore partition {partition} from the changelog: user {} \
                             does not fit ({}): give this instance the same [model] max_users \
                             and max_items as the others",
                            row.user,
                            reason.label()
                        )
                    })?;
                if let Some(u) = self.engine.users().get(&row.user)
                    && ownership.assign(u, partition)
                {
                    new_owners.push((u, partition));
                }
            }
            let key = ownership.key_of(partition);
            match next_offset {
                Some(offset) => self.positions.insert(key, offset),
                None => self.positions.remove(&key),
            };
        }
        if changed {
            self.shared
                .metrics
                .user_ids
                .set(self.engine.users().len() as i64);
            let now = Instant::now();
            self.schedule.last_applied = Some(now);
            self.schedule.first_uncovered.get_or_insert(now);
        }
        Ok(new_owners)
    }

    pub fn positions(&self) -> &Positions {
        &self.positions
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Moves a source's position to a new key (committed with the next batch): a source whose
    /// key format changed resumes where it was.
    pub fn move_position(&mut self, from: &str, to: &str) {
        if let Some(position) = self.positions.remove(from) {
            self.positions.insert(to.to_string(), position);
        }
    }

    /// Applies a batch and hands its commit (the changed state with `positions` merged into
    /// the current ones) to the writer; it is durable once reported to the acks. Events with
    /// source keys (see [`crate::engine::Rating::source_keys`]) resolve ids through the
    /// pipeline's own map, so a source must keep its keys stable for the pipeline's life.
    pub fn apply(
        &mut self,
        events: &[impl Rating],
        positions: Positions,
    ) -> anyhow::Result<ApplyOutcome> {
        let outcome = self.apply_events(events);
        self.positions.extend(positions);
        self.commit(&[])?;
        Ok(outcome)
    }

    /// Applies `events` to the engine and counts them; the caller commits.
    fn apply_events(&mut self, events: &[impl Rating]) -> ApplyOutcome {
        let applied_at = Instant::now();
        let outcome =
            self.engine
                .apply_with_source_ids(events, &mut self.source_ids, &mut self.changes);
        let metrics = &self.shared.metrics;
        metrics.events_applied.inc_by(outcome.applied);
        metrics.user_ids.set(self.engine.users().len() as i64);
        for &(_, reason) in &outcome.rejected {
            metrics.rejected(reason, 1);
        }
        if !outcome.refreshes.is_empty() {
            self.schedule.last_refresh = Instant::now();
        }
        if outcome.applied > 0 {
            self.schedule.last_applied = Some(applied_at);
            if self.schedule.first_uncovered.is_none() {
                self.schedule.first_uncovered = Some(applied_at);
            }
        }
        for r in &outcome.refreshes {
            metrics.refresh_seconds.observe(r.seconds);
        }
        metrics.batch_size.observe(events.len() as f64);
        metrics
            .batch_apply_seconds
            .observe(applied_at.elapsed().as_secs_f64());
        outcome
    }

    /// Hands the changes since the last commit, the positions and `user_partitions` (users
    /// whose partition is new) to the writer.
    fn commit(&mut self, user_partitions: &[(u32, i32)]) -> anyhow::Result<()> {
        let mut commit = self
            .state
            .prepare_commit(&self.engine, &mut self.changes, Some(&self.positions))
            .context("cannot persist the batch: stopping without recording its positions")?;
        commit.record_user_partitions(user_partitions);
        let committed = Committed {
            positions: self.positions.clone(),
            events_applied: self.engine.counters().events_applied,
        };
        self.writer.send(commit, committed)
    }

    /// The timers: a refresh when `[model] refresh_interval_ms` has passed, and a snapshot on
    /// a background thread when the staleness bound says so (see [`snapshot_due_at`]); no
    /// snapshot while every applied event is covered. Sources call it after each batch and
    /// at least every [`TICK_EVERY`] when idle.
    pub fn tick(&mut self) -> anyhow::Result<()> {
        if self.schedule.refresh_due() {
            let _span = tracing::info_span!("refresh").entered();
            if let Some(r) = self.engine.refresh(&mut self.changes) {
                tracing::info!(
                    iterations = r.eigen_iterations,
                    seconds = r.seconds,
                    "model refreshed on timer"
                );
                self.commit(&[])?;
            }
            self.schedule.last_refresh = Instant::now();
        }
        if self.schedule.last_release.elapsed() >= RELEASE_EVERY {
            release_free_memory();
            self.schedule.last_release = Instant::now();
        }
        if let Some(taken) = self.schedule.reap_snapshot()? {
            self.engine.adopt_segments(&taken.labels);
        }
        let catalogue = self.shared.catalogue_version.load(Ordering::Relaxed);
        let now = Instant::now();
        let challenges = self.shared.challenges_won.load(Ordering::Relaxed);
        self.schedule
            .note_uncovered(&self.engine, catalogue, challenges, now);
        let oldest = self
            .schedule
            .building
            .and_then(|(_, covered)| covered)
            .or(self.schedule.first_uncovered);
        // With a group model this instance builds no snapshots: the group's come every
        // `group_model_interval_ms`, whose age `segmenter_snapshot_age_seconds` shows.
        let uncovered = oldest.filter(|_| self.policy.cadence != Cadence::Never);
        self.shared
            .metrics
            .snapshot_staleness_seconds
            .set(uncovered.map_or(0.0, |t| now.duration_since(t).as_secs_f64()));
        if self.schedule.snapshot_due(now) {
            self.spawn_snapshot()?;
        }
        Ok(())
    }

    /// Publishes the state as it is, on a background thread (a restarted service has data
    /// before any batch comes).
    pub fn publish_current(&mut self) -> anyhow::Result<()> {
        if self.engine.active_users() > 0 && self.policy.cadence != Cadence::Never {
            self.spawn_snapshot()?;
        }
        Ok(())
    }

    fn spawn_snapshot(&mut self) -> anyhow::Result<()> {
        if let Some(taken) = self.schedule.join_snapshot()? {
            self.engine.adopt_segments(&taken.labels);
        }
        // A snapshot never shows what the state dir does not hold yet.
        self.writer.flush()?;
        let config = self.config.clone();
        let (snapshots, catalogue) = (self.snapshots.clone(), self.catalogue.clone());
        // A copy-on-write view: the source goes on applying while the snapshot reads it.
        let mut engine = self.engine.view();
        if let Some(warm) = self.shared.warm_start.lock().ok().and_then(|w| w.clone()) {
            engine.warm_start_from(&warm);
        }
        if let Some(challenge) = self.shared.challenge.lock().ok().and_then(|c| c.clone()) {
            engine.set_challenge(challenge);
        }
        // Only for the segments it was reached from: the snapshot served last, which the next
        // one continues.
        if let Some(start) = self.shared.lloyd_start.lock().ok().and_then(|s| s.clone())
            && self.shared.published.latest() == start.version
        {
            engine.set_lloyd_start(start.labels);
        }
        let positions = self.positions.clone();
        let shared = self.shared.clone();
        let covered_since = self.schedule.first_uncovered;
        let policy = self.policy;
        self.schedule.thread = Some(
            std::thread::Builder::new()
                .name("segmenter-snapshot".into())
                .spawn(move || {
                    let _span = tracing::info_span!("snapshot").entered();
                    let taken = shared
                        .snapshot(&config, &policy, &snapshots, &catalogue, &engine, positions);
                    if let (Ok(Some(_)), Some(since)) = (&taken, covered_since) {
                        shared
                            .metrics
                            .snapshot_freshness_seconds
                            .observe(since.elapsed().as_secs_f64());
                    }
                    // What the build freed (gigabytes for millions of users) goes back to the
                    // system now, not whenever the allocator gets round to it.
                    drop(engine);
                    release_free_memory();
                    taken
                })?,
        );
        self.schedule.taken(&self.engine, &self.shared);
        Ok(())
    }

    /// A replay's end: builds and stores the final snapshot on this thread (the lowest inertia
    /// found, diagnostics included, whatever came before) and makes its model the online one.
    pub fn final_snapshot(&mut self) -> anyhow::Result<Option<(Snapshot, Assignments)>> {
        self.writer.flush()?;
        let titles = self.catalogue.titles()?;
        let built = build_and_store_snapshot(
            &self.config,
            &self.policy,
            &self.snapshots,
            &self.engine.view(),
            &titles,
            BTreeMap::new(),
            None,
        )?;
        let Some(built) = built else {
            return Ok(None);
        };
        self.engine.adopt_model(built.model, &mut self.changes);
        self.commit(&[])?;
        Ok(Some((built.snapshot, built.assignments)))
    }

    /// Waits for every commit to be durable (the acks see the last one) and for a running
    /// snapshot; then, with `final_snapshot`, takes one last snapshot of the final state.
    pub fn finish(self, final_snapshot: bool) -> anyhow::Result<PipelineSummary> {
        let Pipeline {
            config,
            snapshots,
            catalogue,
            engine,
            positions,
            shared,
            writer,
            mut schedule,
            policy,
            ..
        } = self;
        writer.finish()?;
        schedule.join_snapshot()?;
        if final_snapshot && policy.cadence != Cadence::Never {
            let taken = shared.snapshot(
                &config,
                &policy,
                &snapshots,
                &catalogue,
                &engine.view(),
                positions,
            )?;
            schedule.count(taken.as_ref());
        }
        Ok(PipelineSummary {
            events_applied: engine.counters().events_applied,
            snapshots: schedule.snapshots,
            last_version: schedule.last_version,
        })
    }
}

/// How often a source calls [`Pipeline::tick`] at least: the granularity of the staleness
/// bound.
pub const TICK_EVERY: Duration = Duration::from_millis(25);

/// How often the thread that applies hands freed memory back to the system.
const RELEASE_EVERY: Duration = Duration::from_secs(10);

/// Hands the memory the allocator holds free back to the system. glibc's malloc keeps what was
/// freed inside its heaps (per-thread arenas, below the top of each heap) for reuse: the
/// buffers of ingest (decoded events, commit batches) and of snapshot builds are freed on
/// other threads than the ones that allocated them, and measured with 2M new users the
/// process held 2-3 times the memory it used. `malloc_trim` releases the free pages of every
/// arena; it costs a walk over the free chunks (milliseconds), so it runs after each snapshot
/// and every [`RELEASE_EVERY`] on the thread that applies, not per batch.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        let started = Instant::now();
        // SAFETY: malloc_trim takes no pointers and only returns free pages to the system;
        // it is thread-safe (it locks each arena in turn).
        let released = unsafe { malloc_trim(0) };
        tracing::debug!(
            released = released != 0,
            seconds = started.elapsed().as_secs_f64(),
            "free memory handed back to the system"
        );
    }
}

/// When the next refresh and snapshot are due, and the snapshot thread.
struct Schedule {
    /// `[snapshot] interval_ms`: the least time between two snapshot starts.
    snapshot_every: Duration,
    /// `[snapshot] max_staleness_ms`; `None`: snapshots only when the source asks.
    max_staleness: Option<Duration>,
    refresh_every: Option<Duration>,
    last_snapshot: Instant,
    /// When the first event (or catalogue change) that no served or building snapshot covers
    /// was applied; `None` when everything applied is covered.
    first_uncovered: Option<Instant>,
    /// When the source last applied an event (a quiet input starts a snapshot early).
    last_applied: Option<Instant>,
    /// Whether events were still coming when the last snapshot started (a steady stream, not a
    /// burst gathered whole).
    steady: bool,
    /// How long the last snapshot took to build and store: a snapshot starts this much before
    /// its staleness bound.
    last_build: Duration,
    /// The running build's start and the first uncovered event it covers.
    building: Option<(Instant, Option<Instant>)>,
    last_refresh: Instant,
    /// When freed memory was last handed back to the system ([`release_free_memory`]).
    last_release: Instant,
    /// Events applied and catalogue version when the last snapshot was taken: no new snapshot
    /// without new data.
    snapshotted_events: u64,
    snapshotted_catalogue: u64,
    /// Challenges won when the last snapshot was taken (a won challenge asks for a snapshot).
    snapshotted_challenges: u64,
    thread: Option<JoinHandle<anyhow::Result<Option<Taken>>>>,
    snapshots: u64,
    last_version: Option<u64>,
}

impl Schedule {
    fn new(config: &Config, policy: &SnapshotPolicy, engine: &Engine, shared: &Shared) -> Self {
        let (max_staleness, snapshot_every) = match policy.cadence {
            Cadence::Staleness {
                max_staleness,
                min_interval,
            } => (Some(max_staleness), min_interval),
            Cadence::AtEnd | Cadence::Never => (None, Duration::MAX),
        };
        Schedule {
            snapshot_every,
            max_staleness,
            first_uncovered: None,
            last_applied: None,
            steady: false,
            last_build: Duration::ZERO,
            building: None,
            refresh_every: (config.model.refresh_interval_ms > 0)
                .then(|| Duration::from_millis(config.model.refresh_interval_ms)),
            last_snapshot: Instant::now(),
            last_refresh: Instant::now(),
            last_release: Instant::now(),
            snapshotted_events: engine.counters().events_applied,
            snapshotted_catalogue: shared.catalogue_version.load(Ordering::Relaxed),
            snapshotted_challenges: shared.challenges_won.load(Ordering::Relaxed),
            thread: None,
            snapshots: 0,
            last_version: None,
        }
    }

    fn refresh_due(&self) -> bool {
        self.refresh_every
            .is_some_and(|every| self.last_refresh.elapsed() >= every)
    }

    /// Notes what is not covered yet: events applied, or a catalogue change (profiles show
    /// titles) while there are users.
    fn note_uncovered(&mut self, engine: &Engine, catalogue: u64, challenges: u64, now: Instant) {
        let changed = engine.counters().events_applied != self.snapshotted_events
            || (catalogue != self.snapshotted_catalogue && engine.active_users() > 0)
            || challenges != self.snapshotted_challenges;
        if changed && self.first_uncovered.is_none() {
            self.first_uncovered = Some(now);
        }
    }

    fn snapshot_due(&self, now: Instant) -> bool {
        let Some(max_staleness) = self.max_staleness else {
            return false;
        };
        let idle = self.thread.as_ref().is_none_or(|t| t.is_finished());
        // Under a steady stream a snapshot starts a build's length before the bound, so it is
        // served within it; bursts are gathered whole (the last snapshot started on a quiet
        // input), as starting early would only split them into two builds.
        let expected_build = if self.steady {
            self.last_build
        } else {
            Duration::ZERO
        };
        idle && snapshot_due_at(
            self.first_uncovered,
            self.last_applied,
            self.last_snapshot,
            expected_build,
            max_staleness,
            self.snapshot_every,
        )
        .is_some_and(|due| now >= due)
    }

    fn taken(&mut self, engine: &Engine, shared: &Shared) {
        self.last_snapshot = Instant::now();
        self.steady = self.last_applied.is_some_and(|applied| {
            self.last_snapshot.duration_since(applied) < QUIET_BEFORE_SNAPSHOT
        });
        self.building = Some((self.last_snapshot, self.first_uncovered.take()));
        self.snapshotted_events = engine.counters().events_applied;
        self.snapshotted_catalogue = shared.catalogue_version.load(Ordering::Relaxed);
        self.snapshotted_challenges = shared.challenges_won.load(Ordering::Relaxed);
    }

    /// Waits for the running build, if any: what it took.
    fn join_snapshot(&mut self) -> anyhow::Result<Option<Taken>> {
        let Some(t) = self.thread.take() else {
            return Ok(None);
        };
        let taken = t
            .join()
            .map_err(|_| anyhow::anyhow!("snapshot thread panicked"))??;
        self.count(taken.as_ref());
        Ok(taken)
    }

    /// Joins a finished build (its duration becomes the next estimate), without waiting.
    fn reap_snapshot(&mut self) -> anyhow::Result<Option<Taken>> {
        if !self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            return Ok(None);
        }
        if let Some((started, _)) = self.building.take() {
            self.last_build = started.elapsed();
        }
        self.join_snapshot()
    }

    fn count(&mut self, taken: Option<&Taken>) {
        if let Some(taken) = taken {
            self.snapshots += 1;
            self.last_version = Some(taken.version);
        }
    }
}

/// How long the input must be quiet (nothing applied) before a snapshot starts ahead of its
/// staleness bound: a burst of events is gathered into one snapshot served as soon as it is
/// in, instead of a snapshot of its first part and another of the rest.
pub const QUIET_BEFORE_SNAPSHOT: Duration = Duration::from_millis(150);

/// When the next snapshot is due: once the input has been quiet for
/// [`QUIET_BEFORE_SNAPSHOT`] since the last applied event, and at the latest `max_staleness`
/// after the first uncovered event less the expected build time (the last build's under a
/// steady stream, so it is served within the bound; zero after a burst); but not before `min_interval` after the last start (bounding
/// the cost under constant load). `None` while everything applied is covered: an idle
/// service builds no snapshot.
fn snapshot_due_at(
    first_uncovered: Option<Instant>,
    last_applied: Option<Instant>,
    last_start: Instant,
    expected_build: Duration,
    max_staleness: Duration,
    min_interval: Duration,
) -> Option<Instant> {
    let first = first_uncovered?;
    let by_staleness = first + max_staleness.saturating_sub(expected_build);
    let quiet_from = last_applied.map_or(first, |applied| applied.max(first));
    let by_quiet = quiet_from + QUIET_BEFORE_SNAPSHOT;
    Some(by_staleness.min(by_quiet).max(last_start + min_interval))
}

enum WriterJob {
    Commit(PreparedCommit, Committed),
    /// Answered once every earlier commit is durable.
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// The thread that writes and flushes commits, in the order they were prepared, while the
/// source applies the next batch: at most one commit waits.
struct Writer {
    jobs: Option<std::sync::mpsc::SyncSender<WriterJob>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Writer {
    fn spawn(state: Arc<StateStore>, acks: Option<Acks>) -> anyhow::Result<Writer> {
        let (jobs, received) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("segmenter-writer".into())
            .spawn(move || write_commits(&state, received, acks))?;
        Ok(Writer {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    fn send(&mut self, commit: PreparedCommit, committed: Committed) -> anyhow::Result<()> {
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(WriterJob::Commit(commit, committed)).is_ok());
        if sent { Ok(()) } else { Err(self.failure()) }
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        let (done, answered) = std::sync::mpsc::sync_channel(1);
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(WriterJob::Flush(done)).is_ok());
        if sent && answered.recv().is_ok() {
            Ok(())
        } else {
            Err(self.failure())
        }
    }

    /// The writer stopped: its error.
    fn failure(&mut self) -> anyhow::Error {
        self.jobs = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => anyhow::anyhow!("the state writer thread panicked"),
            _ => anyhow::anyhow!("the state writer stopped"),
        }
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.jobs = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(anyhow::anyhow!("the state writer thread panicked")),
            None => Err(anyhow::anyhow!("the state writer stopped")),
        }
    }
}

fn write_commits(
    state: &StateStore,
    jobs: std::sync::mpsc::Receiver<WriterJob>,
    acks: Option<Acks>,
) -> anyhow::Result<()> {
    for job in jobs {
        match job {
            WriterJob::Commit(commit, committed) => {
                if let Err(e) = state.write_commit(commit) {
                    let e = anyhow::Error::new(e).context(
                        "cannot persist the batch: stopping without recording its positions",
                    );
                    if let Some(acks) = &acks {
                        let _ = acks.send(Err(anyhow::anyhow!("{e:#}")));
                    }
                    return Err(e);
                }
                // Logged once durable: operators and tests read progress from this line.
                tracing::debug!(events_applied = committed.events_applied, "batch committed");
                if let Some(acks) = &acks {
                    let _ = acks.send(Ok(committed));
                }
            }
            WriterJob::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
    Ok(())
}

/// Builds a snapshot of the engine (the next version, drift against the latest stored one),
/// stores it with the configured retention and returns it. `None` while there is too little data.
/// The segments and diagnostics are as `policy` says.
/// Whether version `version` is one whose diagnostics are computed.
fn diagnostics_due(policy: &SnapshotPolicy, version: u64) -> bool {
    policy.diagnostics_every > 0 && (version - 1).is_multiple_of(policy.diagnostics_every)
}

pub fn build_and_store_snapshot(
    config: &Config,
    policy: &SnapshotPolicy,
    snapshots: &SnapshotStore,
    engine: &EngineView,
    titles: &FxHashMap<String, String>,
    offsets: Positions,
    carried_diagnostics: Option<Diagnostics>,
) -> anyhow::Result<Option<Built>> {
    let version = snapshots.next_snapshot_version()?;
    let previous_version = snapshots.snapshot_versions()?.last().copied();
    let previous = match previous_version {
        Some(v) => snapshots.assignment_labels(v)?.map(|a| (v, a)),
        None => None,
    };
    let with_diagnostics = diagnostics_due(policy, version)
        && !(policy.background_diagnostics && carried_diagnostics.is_some());
    let built = snapshot::build_with_model(
        engine,
        &config.snapshot_params(),
        BuildInput {
            version,
            created_at: snapshot::now_rfc3339(),
            titles,
            offsets,
            previous: previous.as_ref().map(|(v, a)| (*v, a.as_slice())),
            continue_previous: policy.segments == SegmentPolicy::Continue,
            with_diagnostics,
            carried_diagnostics,
        },
    );
    if let Some(Built {
        snapshot: snap,
        model,
        ..
    }) = &built
    {
        // Whatever builds it, a snapshot in a state dir the change feed publishes from is
        // published (by the next service run, for a replay's).
        // In the decayed matrix's units, like every figure of the snapshot.
        let distances = config
            .kafka
            .change_feed_on()
            .then(|| model.distances_to_centroids(engine.value_scale()));
        let feed = distances
            .as_deref()
            .map(|distances| FeedRecord { distances });
        snapshots.put_snapshot_with(snap, model.labels(), feed, config.snapshot.retention)?;
    }
    Ok(built)
}

/// The `snapshot built` log line: emitted once the snapshot is stored and, in the service, also
/// published to readers (tests and operators wait for it).
pub fn log_snapshot_built(snap: &Snapshot) {
    tracing::info!(
        version = snap.version,
        users = snap.counts.users,
        items = snap.counts.items,
        ratings = snap.counts.ratings,
        events_applied = snap.counts.events_applied,
        inertia = snap.kmeans.inertia,
        explained = snap.pca.explained_variance_ratio.iter().sum::<f64>(),
        nb_train = snap.validation.naive_bayes.train_agreement,
        moved = snap.drift.as_ref().map_or(0, |d| d.users_moved),
        "snapshot built"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_idle_service_has_no_snapshot_due() {
        let long_ago = Instant::now();
        assert_eq!(
            snapshot_due_at(None, Some(long_ago), long_ago, 200 * MS, SECOND, SECOND),
            None
        );
    }

    #[test]
    fn a_burst_is_served_as_soon_as_the_input_is_quiet() {
        let last_start = Instant::now();
        let first = last_start + 60 * SECOND;
        let last = first + 300 * MS;
        // The burst's last event, then quiet: one snapshot of all of it, at once.
        assert_eq!(
            snapshot_due_at(
                Some(first),
                Some(last),
                last_start,
                200 * MS,
                SECOND,
                100 * MS
            ),
            Some(last + QUIET_BEFORE_SNAPSHOT)
        );
        // A catalogue change with no event since the last snapshot is quiet from the start.
        assert_eq!(
            snapshot_due_at(
                Some(first),
                Some(last_start),
                last_start,
                Duration::ZERO,
                SECOND,
                100 * MS
            ),
            Some(first + QUIET_BEFORE_SNAPSHOT)
        );
    }

    #[test]
    fn a_steady_stream_is_served_within_the_staleness_bound() {
        let last_start = Instant::now();
        let first = last_start + 60 * SECOND;
        // Events keep coming (never quiet): due early enough that a build as long as the last
        // one ends within the bound.
        let busy = Some(first + 10 * SECOND);
        assert_eq!(
            snapshot_due_at(Some(first), busy, last_start, 200 * MS, SECOND, SECOND),
            Some(first + 800 * MS)
        );
        // A build longer than the bound starts at once.
        assert_eq!(
            snapshot_due_at(Some(first), busy, last_start, 3 * SECOND, SECOND, SECOND),
            Some(first)
        );
    }

    #[test]
    fn under_constant_load_snapshots_start_at_most_once_an_interval() {
        let last_start = Instant::now();
        // An event right after the last start: the floor holds it back.
        let first = last_start + 10 * MS;
        assert_eq!(
            snapshot_due_at(
                Some(first),
                Some(first),
                last_start,
                100 * MS,
                SECOND,
                2 * SECOND
            ),
            Some(last_start + 2 * SECOND)
        );
    }
}
