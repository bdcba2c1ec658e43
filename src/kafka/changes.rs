//! The change feed (`[kafka] changes_topic`) and the assignments table
//! (`[kafka] assignments_topic`): for every stored snapshot version, in order, one record per
//! user whose segment changed since the last version published. Each version goes out in one
//! Kafka transaction together with a record of its number in the publications topic, and a
//! restart reads that record back, so a version's changes are published exactly once across
//! crashes (for consumers reading with `isolation.level=read_committed`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::config::{Config, KafkaConfig};
use crate::kafka::{client_config, ensure_topic_with};
use crate::pipeline::{Health, Shared};
use crate::store::{FeedRow, SnapshotStore};
use crate::telemetry::Metrics;

/// How long a transaction may stay open at the broker: a version's changes for millions of
/// users take seconds, and a crashed predecessor's open transaction is aborted at the next
/// start anyway.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the producer's transactional calls (init, commit, abort) wait for the broker.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long reading back the publications topic may take.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(60);
/// At shutdown, how long the feed may go on publishing the versions stored before it stopped
/// (the final snapshot included); past it, a transaction in flight is aborted (the next start
/// publishes it). Below Kubernetes' default 30 s grace together with the drain.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Longest wait between two sessions after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A failure that retrying cannot mend: the feed stops, the service reports itself not ready
/// (`feed_stopped`) and the message says what the operator must do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NeedsOperator(String);

/// Whether `error` says another producer with this transactional id took over (it fenced
/// this one off): retrying would fence that one in turn, so the two would take turns forever.
pub(crate) fn is_fenced(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<KafkaError>()
            .and_then(KafkaError::rdkafka_error_code)
            .is_some_and(|code| {
                matches!(
                    code,
                    RDKafkaErrorCode::Fenced
                        | RDKafkaErrorCode::ProducerFenced
                        | RDKafkaErrorCode::InvalidProducerEpoch
                )
            })
    })
}

/// One record of the change feed: `user` moved from segment `from` to `to` in snapshot
/// `version` (`from` null for a user new to the feed, `to` null for a user who left).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub user: String,
    pub from: Option<u32>,
    pub to: Option<u32>,
    pub version: u64,
    pub created_at: String,
    /// Distance to the new segment's centroid in the PCA space (null when `to` is).
    pub distance: Option<f64>,
    /// The version re-segmented (replaced its previous segments by a clearly better
    /// clustering): this move is part of a wholesale change, not of this user's own drift.
    #[serde(default)]
    pub resegmented: bool,
}

/// One record of the assignments table (a user who left gets a tombstone instead).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AssignmentRecord<'a> {
    pub user: &'a str,
    pub segment: u32,
    pub version: u64,
}

/// What the publications topic holds, keyed by the transactional id: the last version out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicationRecord {
    pub version: u64,
    /// The version this one's changes are relative to (0: none, every user is new).
    pub previous: u64,
    pub changes: u64,
    /// The version re-segmented (see [`ChangeRecord::resegmented`]).
    #[serde(default)]
    pub resegmented: bool,
    /// The state dir that published it ([`SnapshotStore::feed_origin`]; absent in records of
    /// older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// Writes `change` to the change feed and to the assignments table (a tombstone there for a
/// user who left), for those of the two topics that are set, through `send(topic, value)`
/// (keyed by the user).
pub(crate) fn publish_change(
    change: &ChangeRecord,
    changes_topic: Option<&str>,
    assignments_topic: Option<&str>,
    mut send: impl FnMut(&str, Option<&[u8]>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if let Some(topic) = changes_topic {
        send(topic, Some(&serde_json::to_vec(change)?))?;
    }
    if let Some(topic) = assignments_topic {
        let value = change.to.map(|segment| AssignmentRecord {
            user: &change.user,
            segment,
            version: change.version,
        });
        let json = value.as_ref().map(serde_json::to_vec).transpose()?;
        send(topic, json.as_deref())?;
    }
    Ok(())
}

/// A user whose segment differs between two stored snapshots.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmentChange {
    pub user: u32,
    pub from: Option<u32>,
    pub to: Option<u32>,
    pub distance: Option<f32>,
}

/// The users whose segment differs from `before` to `after` (both ascending by user), in user
/// order: a merge, O(users).
pub fn segment_changes(before: &[FeedRow], after: &[FeedRow]) -> Vec<SegmentChange> {
    let mut out = vec![];
    let (mut i, mut j) = (0, 0);
    loop {
        let (b, a) = (before.get(i), after.get(j));
        let change = match (b, a) {
            (None, None) => break,
            (Some(b), Some(a)) if b.user == a.user => {
                i += 1;
                j += 1;
                (b.segment != a.segment).then_some(SegmentChange {
                    user: a.user,
                    from: Some(b.segment),
                    to: Some(a.segment),
                    distance: a.distance,
                })
            }
            (Some(b), a) if a.is_none_or(|a| b.user < a.user) => {
                i += 1;
                Some(SegmentChange {
                    user: b.user,
                    from: Some(b.segment),
                    to: None,
                    distance: None,
                })
            }
            (_, Some(a)) => {
                j += 1;
                Some(SegmentChange {
                    user: a.user,
                    from: None,
                    to: Some(a.segment),
                    distance: a.distance,
                })
            }
            (Some(_), None) => unreachable!("covered by the arm above"),
        };
        out.extend(change);
    }
    out
}

/// The feed's settings and handles.
struct Feed {
    kafka: KafkaConfig,
    snapshots: SnapshotStore,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// `[kafka] feed_resync`: when the last version published is gone (from Kafka or from the
    /// state dir), publish the next one whole instead of stopping.
    resync: bool,
    changes_topic: Option<String>,
    assignments_topic: Option<String>,
    publications_topic: String,
    transactional_id: String,
    /// This state dir's name in publication records.
    origin: String,
    stop_at: StopAt,
}

/// When the feed must be done: unset while it runs, set once by [`RunningFeed::stop`].
#[derive(Clone, Default)]
struct StopAt(Arc<std::sync::OnceLock<Instant>>);

impl StopAt {
    fn requested(&self) -> bool {
        self.0.get().is_some()
    }
    fn overdue(&self) -> bool {
        self.0
            .get()
            .is_some_and(|deadline| Instant::now() >= *deadline)
    }
}

/// The feed's thread, stopped with [`RunningFeed::stop`].
pub struct RunningFeed {
    stop_at: StopAt,
    wake: watch::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl RunningFeed {
    /// Lets the feed publish what is stored (the final snapshot included) for up to
    /// [`STOP_GRACE`], aborting a transaction still open then, and waits for its thread a
    /// little longer than that (a thread still busy is left to the process's exit).
    pub async fn stop(self) {
        let _ = self.stop_at.0.set(Instant::now() + STOP_GRACE);
        self.wake.send_replace(());
        let deadline = Instant::now() + STOP_GRACE + Duration::from_secs(5);
        while !self.thread.is_finished() {
            if Instant::now() >= deadline {
                tracing::warn!("the change feed did not stop in time");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts the feed on a thread of its own (rdkafka's transactional calls block); it runs until
/// [`RunningFeed::stop`] (the service calls it once its pipeline has finished, so the last
/// snapshot is published too). Topics are created when missing, retried while the broker is
/// away.
pub fn spawn_feed(
    config: &Config,
    shared: &Shared,
    snapshots: SnapshotStore,
) -> anyhow::Result<RunningFeed> {
    let kafka = config.kafka.clone();
    let topic = |name: &str| (!name.is_empty()).then(|| name.to_string());
    let feed = Feed {
        changes_topic: topic(&kafka.changes_topic),
        assignments_topic: topic(&kafka.assignments_topic),
        publications_topic: kafka.publications_topic_name(),
        transactional_id: kafka.transactional_id_name(),
        resync: kafka.feed_resync,
        origin: snapshots.feed_origin()?,
        kafka,
        snapshots,
        metrics: shared.metrics.clone(),
        health: shared.health.clone(),
        stop_at: StopAt::default(),
    };
    let stop_at = feed.stop_at.clone();
    let (wake, woken) = watch::channel(());
    let notices = shared.published.subscribe();
    let runtime = Handle::current();
    let thread = std::thread::Builder::new()
        .name("segmenter-feed".into())
        .spawn(move || feed.run(&runtime, notices, woken))
        .context("cannot start the change feed thread")?;
    Ok(RunningFeed {
        stop_at,
        wake,
        thread,
    })
}

impl Feed {
    /// Sessions until stopped: any failure ends the session (its open transaction is aborted
    /// by the next one's `init_transactions`), and the next, after a backoff that doubles while
    /// sessions fail without publishing, reads back where Kafka stands.
    fn run(
        self,
        runtime: &Handle,
        mut notices: watch::Receiver<u64>,
        mut woken: watch::Receiver<()>,
    ) {
        let base = Duration::from_millis(self.kafka.retry_backoff_ms.max(100) * 4);
        let mut backoff = base;
        loop {
            let mut published_any = false;
            match self.session(runtime, &mut notices, &mut woken, &mut published_any) {
                Ok(()) => return,
                Err(_) if self.stop_at.requested() => return,
                Err(e) if is_fenced(&e) || e.downcast_ref::<NeedsOperator>().is_some() => {
                    self.metrics.feed_errors.inc();
                    self.metrics.feed_stopped.set(1);
                    self.health
                        .feed_stopped
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    let why = if is_fenced(&e) {
                        format!(
                            "another producer with transactional id {} fenced this one off: \
                             give each instance its own [kafka] instance_id (or \
                             transactional_id), then restart this one ({e:#})",
                            self.transactional_id
                        )
                    } else {
                        format!("{e:#}")
                    };
                    tracing::error!(error = why, "change feed stopped: not ready");
                    return;
                }
                Err(e) => {
                    self.health.set_feed_behind(true);
                    self.metrics.feed_errors.inc();
                    tracing::warn!(
                        error = format!("{e:#}"),
                        retry_in_seconds = backoff.as_secs_f64(),
                        "change feed interrupted; retrying"
                    );
                }
            }
            if published_any {
                backoff = base;
            }
            let stopped = runtime.block_on(async {
                tokio::select! {
                    woke = woken.changed() => woke.is_err() || self.stop_at.requested(),
                    _ = tokio::time::sleep(backoff) => false,
                }
            });
            if stopped {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One producer's life: fence off predecessors, read back the last version published, then
    /// publish every newer stored version as it comes. `Ok` only at shutdown.
    fn session(
        &self,
        runtime: &Handle,
        notices: &mut watch::Receiver<u64>,
        woken: &mut watch::Receiver<()>,
        published_any: &mut bool,
    ) -> anyhow::Result<()> {
        runtime.block_on(self.ensure_topics())?;
        let producer: ThreadedProducer<_> = client_config(&self.kafka)
            .set("transactional.id", &self.transactional_id)
            .set("enable.idempotence", "true")
            .set(
                "transaction.timeout.ms",
                TRANSACTION_TIMEOUT.as_millis().to_string(),
            )
            .set("compression.type", "lz4")
            // A version's records are sent in one burst: full batches, and room to queue them
            // rather than wait on a full queue.
            .set("linger.ms", "50")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .context("cannot create the change feed producer")?;
        producer
            .init_transactions(CALL_TIMEOUT)
            .context("cannot initialise the change feed's transactions")?;
        let (mut published, origin) = self.read_back()?;
        let ours = origin.is_none_or(|o| o == self.origin);
        if !ours && !self.resync {
            return Err(NeedsOperator(format!(
                "the last version published under transactional id {}, {published}, was \
                 published from another state dir: another instance uses this transactional \
                 id. Give each instance its own [kafka] instance_id (or transactional_id); to \
                 take the feed over from this state dir, start once with [kafka] feed_resync = \
                 true",
                self.transactional_id
            ))
            .into());
        }
        let seen = self.snapshots.feed_published()?;
        let went_back = published < seen;
        if went_back && !self.resync {
            return Err(NeedsOperator(format!(
                "Kafka's record of the last version published ({published}, in {}) is behind \
                 what this state dir saw published ({seen}): the publications record was lost \
                 (topic deleted or truncated); publishing from there would repeat versions. \
                 Start once with [kafka] feed_resync = true to publish the next version whole",
                self.publications_topic
            ))
            .into());
        }
        // A version that left through Kafka is never given to other content, whatever the
        // state dir holds now (a dir rolled back, or restored from a backup).
        if self.snapshots.raise_version_floor(published)?.is_some() {
            self.metrics.state_rollbacks.inc();
        }
        let stored = self.snapshots.snapshot_versions()?;
        if ours && (stored.contains(&published) || published == 0) {
            // Never report a version this state dir did not publish (another instance's).
            self.metrics.feed_version.set(published as i64);
        } else {
            tracing::warn!(
                published,
                "Kafka's record names a version this state dir does not hold (another \
                 instance with this transactional id, or a new or rolled-back state dir)"
            );
        }
        // What the next version is diffed against: after a resync, nothing (another state dir's
        // version numbers name none of this dir's snapshots; a lost record names none at all).
        let mut previous = if ours && !went_back { published } else { 0 };
        if went_back {
            // Resynced: versions this dir saw published are not published again.
            published = seen;
        }
        self.snapshots.set_feed_published(published)?;
        tracing::info!(
            published,
            transactional_id = self.transactional_id,
            "change feed ready"
        );
        loop {
            // One listing a pass: sled reads each listed snapshot's record, so the gauge and
            // the caught-up check below reuse it (a snapshot stored meanwhile wakes the next).
            let versions = self.snapshots.snapshot_versions()?;
            let start = published;
            for &version in versions.iter().filter(|&&v| v > start) {
                if self.stop_at.overdue() {
                    return Ok(());
                }
                // A version pruned since the listing is skipped: the next one's diff against
                // the last published covers its changes.
                if self.publish(&producer, previous, version)? {
                    *published_any = true;
                    published = version;
                    previous = version;
                    self.snapshots.set_feed_published(published)?;
                }
                let unpublished = versions.iter().filter(|&&v| v > published).count();
                self.metrics.feed_unpublished.set(unpublished as i64);
            }
            if self.stop_at.requested() {
                return Ok(());
            }
            if versions.last() <= Some(&published) {
                self.health.set_feed_behind(false);
            }
            // Woken by a new snapshot, or by the stop (then one more pass catches up).
            let alive = runtime.block_on(async {
                tokio::select! {
                    woke = woken.changed() => woke.is_ok(),
                    notice = notices.changed() => notice.is_ok(),
                }
            });
            if !alive {
                return Ok(());
            }
        }
    }

    async fn ensure_topics(&self) -> anyhow::Result<()> {
        let compacted = [("cleanup.policy", "compact")];
        if let Some(topic) = &self.changes_topic {
            ensure_topic_with(&self.kafka, topic, 1, &[]).await?;
        }
        if let Some(topic) = &self.assignments_topic {
            ensure_topic_with(&self.kafka, topic, 1, &compacted).await?;
        }
        ensure_topic_with(&self.kafka, &self.publications_topic, 1, &compacted).await?;
        // An existing topic keeps its own policy: under `delete`, retention would one day drop
        // the record of the last version published, and the feed would start from nothing.
        let (compacted, policy) =
            crate::kafka::is_compacted(&self.kafka, &self.publications_topic).await?;
        let policy = policy.unwrap_or_default();
        if !compacted {
            anyhow::bail!(
                "the publications topic {} has cleanup.policy={policy:?}: retention would delete \
                 the feed's record of what it published; make it compacted (kafka-configs.sh \
                 --alter --entity-type topics --entity-name {} --add-config \
                 cleanup.policy=compact) or name another [kafka] publications_topic",
                self.publications_topic,
                self.publications_topic
            );
        }
        Ok(())
    }

    /// The last version this transactional id published and the state dir it came from, from
    /// the publications topic read to its end with committed records only (0: none yet).
    fn read_back(&self) -> anyhow::Result<(u64, Option<String>)> {
        let consumer: BaseConsumer = client_config(&self.kafka)
            .set("group.id", format!("{}-read-back", self.transactional_id))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()
            .context("cannot create the publications reader")?;
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition_offset(&self.publications_topic, 0, Offset::Beginning)?;
        consumer.assign(&partitions)?;
        let deadline = Instant::now() + READ_BACK_TIMEOUT;
        let mut published = (0, None);
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok(published),
                Some(Err(e)) => return Err(e).context("cannot read the publications topic"),
                Some(Ok(m)) => {
                    if m.key() != Some(self.transactional_id.as_bytes()) {
                        continue;
                    }
                    let record: PublicationRecord =
                        serde_json::from_slice(m.payload().unwrap_or_default()).with_context(
                            || format!("unreadable record in {} at {}", m.topic(), m.offset()),
                        )?;
                    published = (record.version, record.origin);
                }
            }
        }
        anyhow::bail!(
            "reading {} back took over {READ_BACK_TIMEOUT:?}",
            self.publications_topic
        )
    }

    /// Publishes `version`'s changes relative to `previous` (the last version published) in one
    /// transaction with its publication record. `false`: `version` is no longer stored.
    fn publish(
        &self,
        producer: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
        previous: u64,
        version: u64,
    ) -> anyhow::Result<bool> {
        let started = Instant::now();
        let Some((records, base)) = self.records(previous, version)? else {
            return Ok(false);
        };
        let prepared = started.elapsed();
        producer.begin_transaction()?;
        let sent = self.send_all(producer, &records, base, version);
        let queued = started.elapsed();
        let committed = sent.and_then(|()| Ok(producer.commit_transaction(CALL_TIMEOUT)?));
        if let Err(e) = committed {
            let _ = producer.abort_transaction(CALL_TIMEOUT);
            return Err(e).with_context(|| format!("cannot publish version {version}'s changes"));
        }
        self.metrics.feed_version.set(version as i64);
        self.metrics.feed_records.inc_by(records.len() as u64);
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            version,
            previous = base,
            changes = records.len(),
            seconds,
            // Where the time went: diffing the stored snapshots, queueing, the commit's wait.
            diff_seconds = prepared.as_secs_f64(),
            queue_seconds = (queued - prepared).as_secs_f64(),
            commit_seconds = seconds - queued.as_secs_f64(),
            "segment changes published"
        );
        Ok(true)
    }

    /// `version`'s changes with their user ids and creation time, relative to `previous`, and
    /// the version they are relative to (`None`: `version` is no longer stored). When
    /// `previous` is gone too, the feed stops unless a resync is asked for (then every
    /// assigned user of `version` is new, relative to version 0).
    fn records(
        &self,
        previous: u64,
        version: u64,
    ) -> anyhow::Result<Option<(Vec<ChangeRecord>, u64)>> {
        let before = match previous {
            0 => Some(vec![]),
            v => self.snapshots.feed_rows(v)?,
        };
        let base = if before.is_some() { previous } else { 0 };
        if before.is_none() {
            if !self.resync {
                return Err(NeedsOperator(format!(
                    "the last version published, {previous}, is not in this state dir, so \
                     version {version} cannot be published as a diff from it (a state dir \
                     restored from a backup or rolled back, or another instance with this \
                     transactional id). Start once with [kafka] feed_resync = true to publish \
                     version {version} whole: every assigned user as new"
                ))
                .into());
            }
            tracing::warn!(
                previous,
                version,
                "resync: the last version published is not stored; publishing every assigned \
                 user of this version as new"
            );
        }
        let Some(after) = self.snapshots.feed_rows(version)? else {
            return Ok(None);
        };
        let summary = self.snapshots.summary(version)?;
        let resegmented = summary
            .as_ref()
            .and_then(|s| s.drift.as_ref())
            .is_some_and(|d| d.resegmented);
        let created_at = summary.map(|s| s.created_at).unwrap_or_default();
        let changes = segment_changes(&before.unwrap_or_default(), &after);
        let users: Vec<u32> = changes.iter().map(|c| c.user).collect();
        let ids = self.snapshots.user_ids(&users)?;
        let records = ids
            .into_iter()
            .zip(changes)
            .map(|(user, c)| ChangeRecord {
                user,
                from: c.from,
                to: c.to,
                version,
                created_at: created_at.clone(),
                distance: c.distance.filter(|d| d.is_finite()).map(f64::from),
                resegmented,
            })
            .collect();
        Ok(Some((records, base)))
    }

    fn send_all(
        &self,
        producer: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
        records: &[ChangeRecord],
        previous: u64,
        version: u64,
    ) -> anyhow::Result<()> {
        for (n, change) in records.iter().enumerate() {
            let id = change.user.as_str();
            if n % 1024 == 0 && self.stop_at.overdue() {
                anyhow::bail!("stopping: the version is left to the next start");
            }
            publish_change(
                change,
                self.changes_topic.as_deref(),
                self.assignments_topic.as_deref(),
                |topic, value| send(producer, &self.stop_at, (topic, None), id, value),
            )?;
        }
        let publication = PublicationRecord {
            version,
            previous,
            changes: records.len() as u64,
            resegmented: records.first().is_some_and(|r| r.resegmented),
            origin: Some(self.origin.clone()),
        };
        // Always partition 0, where the read-back looks, however many the topic has.
        send(
            producer,
            &self.stop_at,
            (&self.publications_topic, Some(0)),
            &self.transactional_id,
            Some(&serde_json::to_vec(&publication)?),
        )
    }
}

/// Queues one record (`None`: a tombstone), waiting while the producer's queue is full until
/// the stop's grace is over.
fn send(
    producer: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    stop_at: &StopAt,
    target: (&str, Option<i32>),
    key: &str,
    payload: Option<&[u8]>,
) -> anyhow::Result<()> {
    crate::kafka::send_queued(producer, target, key.as_bytes(), payload, || {
        anyhow::ensure!(
            !stop_at.overdue(),
            "stopping: the version is left to the next start"
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(pairs: &[(u32, u32)]) -> Vec<FeedRow> {
        pairs
            .iter()
            .map(|&(user, segment)| FeedRow {
                user,
                segment,
                distance: Some(user as f32),
            })
            .collect()
    }

    #[test]
    fn changes_list_moves_arrivals_and_departures_in_user_order() {
        let before = rows(&[(0, 1), (1, 2), (3, 0), (5, 4)]);
        let after = rows(&[(1, 2), (2, 7), (3, 1), (6, 4)]);
        let changes = segment_changes(&before, &after);
        let summary: Vec<(u32, Option<u32>, Option<u32>)> =
            changes.iter().map(|c| (c.user, c.from, c.to)).collect();
        assert_eq!(
            summary,
            vec![
                (0, Some(1), None),
                (2, None, Some(7)),
                (3, Some(0), Some(1)),
                (5, Some(4), None),
                (6, None, Some(4)),
            ]
        );
        assert_eq!(changes[0].distance, None);
        assert_eq!(changes[2].distance, Some(3.0));
    }

    #[test]
    fn applying_the_changes_to_the_before_table_gives_the_after_table() {
        let before = rows(&[(0, 1), (2, 2), (4, 0), (9, 3)]);
        let after = rows(&[(1, 1), (2, 2), (4, 3), (8, 0)]);
        let mut table: std::collections::BTreeMap<u32, u32> =
            before.iter().map(|r| (r.user, r.segment)).collect();
        for c in segment_changes(&before, &after) {
            assert_eq!(table.get(&c.user).copied(), c.from);
            match c.to {
                Some(to) => table.insert(c.user, to),
                None => table.remove(&c.user),
            };
        }
        let expected: std::collections::BTreeMap<u32, u32> =
            after.iter().map(|r| (r.user, r.segment)).collect();
        assert_eq!(table, expected);
        assert!(segment_changes(&after, &after).is_empty());
    }
}
