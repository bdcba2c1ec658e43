//! The changelog (`[kafka] changelog_topic`): every owned partition's user rows and next offset
//! in a compacted topic partitioned like the ratings topic, so a partition that moves to
//! another instance is restored there to exactly the state its offset says instead of being
//! rebuilt from the ratings topic's history.
//!
//! A record is one cell: key `user NUL item`, value the stored value (8 bytes, little-endian),
//! a tombstone once the cell is gone, so compaction keeps each cell's latest value and a batch
//! writes what it changed, not whole rows. Each batch's changed cells of partition `p` go out
//! in one Kafka transaction together with the next offset of `p` they cover (a record under
//! [`OFFSET_KEY`]), from a producer whose
//! `transactional.id` is `<changelog_topic>-<p>`: whoever is assigned `p` initialises that id
//! first, which fences off the previous owner and aborts whatever it left open. So the
//! changelog of `p` is always the state of one owner at one offset, and a restore (read with
//! `isolation.level=read_committed`) never mixes two.
//!
//! A user's row is a deterministic function of that user's events, which all come through one
//! partition (the message key is the user id): whoever applied them, the row at an offset is
//! the same. An instance whose state dir holds `p` at the offset the changelog records keeps
//! it; otherwise (another instance moved `p` on, or this one crashed between its state commit
//! and the changelog's) it drops its rows of `p` and restores them from the changelog.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use rustc_hash::FxHashMap;

use crate::config::KafkaConfig;
use crate::kafka::client_config;
use crate::pipeline::Health;
use crate::telemetry::Metrics;

/// The key of a partition's next-offset record. A cell's key holds a NUL, which ids never do
/// (`event::check_id`), so it cannot clash.
pub const OFFSET_KEY: &[u8] = b"";

/// At shutdown, how long the writer may go on writing what is queued.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long transactional calls (init, commit, abort) wait for the broker.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restore may wait for one fetch before it gives up on the broker.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait between two attempts to write a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Batches the engine may hand over before it waits for the changelog to catch up.
const QUEUE_DEPTH: usize = 8;

/// One user's stored row: (item id, stored value); empty when the user has no rating left.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub user: String,
    pub cells: Vec<(String, f64)>,
}

/// One changed cell: its stored value, zero once removed.
#[derive(Debug, Clone, PartialEq)]
pub struct CellChange {
    pub user: String,
    pub item: String,
    pub value: f64,
}

/// What one batch changed in one partition: the cells (each once) and the partition's next
/// offset after the batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartitionChanges {
    pub cells: Vec<CellChange>,
    pub next_offset: i64,
}

/// A batch's changes by partition.
pub type ChangelogBatch = BTreeMap<i32, PartitionChanges>;

/// What becoming the owner of a partition found.
#[derive(Debug, Clone, PartialEq)]
pub enum Handover {
    /// The changelog records the offset this instance's state dir holds (or this instance
    /// owned the partition all along): its rows are kept as they are.
    Kept,
    /// The state of the partition as the changelog holds it: its rows and the next offset
    /// to consume (`None`: nothing recorded, consume from the beginning).
    Restored {
        rows: Vec<Row>,
        next_offset: Option<i64>,
    },
}

/// A changelog partition's state as read so far, record by record in offset order: every
/// user's cells and the last next-offset record. Records set a cell or remove it, so reading
/// some of them twice changes nothing.
#[derive(Debug, Clone, Default)]
pub struct PartitionState {
    rows: FxHashMap<String, FxHashMap<String, f64>>,
    next_offset: Option<i64>,
    /// Cells in `rows`, kept as records come (a standby reports it after every read).
    cells: usize,
}

impl PartitionState {
    /// Applies one record; `Err` names what segmenter does not write.
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), &'static str> {
        if key == OFFSET_KEY {
            self.next_offset = Some(decode_offset(value).map_err(|_| "an offset record")?);
            return Ok(());
        }
        let (user, item) = split_cell_key(key).ok_or("a key")?;
        match value {
            None => {
                if let Some(row) = self.rows.get_mut(user) {
                    if row.remove(item).is_some() {
                        self.cells -= 1;
                    }
                    if row.is_empty() {
                        self.rows.remove(user);
                    }
                }
            }
            Some(bytes) => {
                let value = <[u8; 8]>::try_from(bytes)
                    .map(f64::from_le_bytes)
                    .map_err(|_| "a value")?;
                let row = match self.rows.get_mut(user) {
                    Some(row) => row,
                    None => self.rows.entry(user.to_string()).or_default(),
                };
                if row.insert(item.to_string(), value).is_none() {
                    self.cells += 1;
                }
            }
        }
        Ok(())
    }

    /// Cells held.
    pub fn cells(&self) -> usize {
        self.cells
    }

    fn into_handover(self) -> Handover {
        let rows = self
            .rows
            .into_iter()
            .map(|(user, cells)| Row {
                user,
                cells: cells.into_iter().collect(),
            })
            .collect();
        Handover::Restored {
            rows,
            next_offset: self.next_offset,
        }
    }
}

/// A standby's copy of one changelog partition: its state up to `position` (the next
/// changelog offset to read).
#[derive(Debug, Clone)]
pub struct PartitionCopy {
    pub state: PartitionState,
    pub position: i64,
}

/// A cell's record key: `user NUL item`.
pub fn cell_key(user: &str, item: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(user.len() + 1 + item.len());
    key.extend_from_slice(user.as_bytes());
    key.push(0);
    key.extend_from_slice(item.as_bytes());
    key
}

/// The (user, item) of a cell's record key; `None` for keys segmenter does not write.
pub fn split_cell_key(key: &[u8]) -> Option<(&str, &str)> {
    let nul = key.iter().position(|&b| b == 0)?;
    let user = std::str::from_utf8(&key[..nul]).ok()?;
    let item = std::str::from_utf8(&key[nul + 1..]).ok()?;
    (!user.is_empty() && !item.is_empty()).then_some((user, item))
}

/// Appends `later` to `earlier`: a cell changed in both is written twice in one transaction,
/// the later value last, which is the one a restore (reading in order) and compaction keep.
fn merge(earlier: &mut ChangelogBatch, later: ChangelogBatch) {
    for (partition, changes) in later {
        let entry = earlier.entry(partition).or_default();
        if entry.cells.is_empty() {
            entry.cells = changes.cells;
        } else {
            entry.cells.extend(changes.cells);
        }
        entry.next_offset = changes.next_offset;
    }
}

enum Command {
    Write(ChangelogBatch),
    Own {
        partitions: BTreeSet<i32>,
        local: BTreeMap<i32, i64>,
        reply: SyncSender<anyhow::Result<BTreeMap<i32, Handover>>>,
    },
}

/// The engine thread's end of the changelog: batches go to a writer thread, in order.
pub struct Changelog {
    commands: SyncSender<Command>,
    writer: std::thread::JoinHandle<()>,
    stopping: Arc<AtomicBool>,
}

impl Changelog {
    /// Starts the writer thread. Its failures (a transaction the broker refuses for good)
    /// reach the service through `errors`, which stops it: the state dir and the changelog
    /// still agree up to the last committed transaction, and the next start restores from it.
    pub fn start(
        kafka: &KafkaConfig,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        errors: tokio::sync::mpsc::UnboundedSender<anyhow::Error>,
        standby: Option<crate::kafka::standby::Standby>,
    ) -> anyhow::Result<Changelog> {
        let (commands, received) = std::sync::mpsc::sync_channel(QUEUE_DEPTH);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut writer = Writer {
            kafka: kafka.clone(),
            topic: kafka.changelog_topic.clone(),
            producers: BTreeMap::new(),
            lost: BTreeSet::new(),
            health,
            metrics,
            stopping: stopping.clone(),
            standby,
        };
        let writer = std::thread::Builder::new()
            .name("segmenter-changelog".into())
            .spawn(move || {
                if let Err(e) = writer.run(received) {
                    tracing::error!(error = %format!("{e:#}"), "the changelog stopped");
                    let _ = errors.send(e);
                }
            })?;
        Ok(Changelog {
            commands,
            writer,
            stopping,
        })
    }

    /// Writes what is queued and stops. A broker failing meanwhile is retried for
    /// [`STOP_GRACE`]; what is left then is consumed again by whoever restores the partitions
    /// next (this instance at its next start included: its state dir is then ahead of the
    /// changelog, so it restores from it).
    pub fn finish(self) {
        let Changelog {
            commands,
            writer,
            stopping,
        } = self;
        drop(commands);
        let deadline = Instant::now() + STOP_GRACE;
        while !writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        stopping.store(true, Ordering::Relaxed);
        let _ = writer.join();
    }

    /// Hands a batch's changes over (waits while [`QUEUE_DEPTH`] batches are queued).
    pub fn write(&self, batch: ChangelogBatch) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.commands
            .send(Command::Write(batch))
            .map_err(|_| anyhow::anyhow!("the changelog writer stopped"))
    }

    /// Makes this instance the changelog's writer for `partitions` (and no other): fences the
    /// previous owner of each new one and reads what it left; `local` holds the next offset
    /// this instance's state dir has for each. Every batch written before is written first.
    pub fn own(
        &self,
        partitions: BTreeSet<i32>,
        local: BTreeMap<i32, i64>,
    ) -> anyhow::Result<BTreeMap<i32, Handover>> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.commands
            .send(Command::Own {
                partitions,
                local,
                reply,
            })
            .map_err(|_| anyhow::anyhow!("the changelog writer stopped"))?;
        answer
            .recv()
            .map_err(|_| anyhow::anyhow!("the changelog writer stopped"))?
    }
}

type TxProducer = ThreadedProducer<DefaultProducerContext>;

struct Writer {
    kafka: KafkaConfig,
    topic: String,
    /// One transactional producer per partition this instance owns.
    producers: BTreeMap<i32, TxProducer>,
    /// Partitions whose producer was fenced off or failed for good since they were owned: this
    /// instance may no longer write them.
    lost: BTreeSet<i32>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Set when the service stops and the grace is over: failing writes are given up.
    stopping: Arc<AtomicBool>,
    /// `[kafka] standby`: warm copies of the partitions not owned.
    standby: Option<crate::kafka::standby::Standby>,
}

impl Writer {
    fn run(&mut self, commands: Receiver<Command>) -> anyhow::Result<()> {
        while let Ok(command) = commands.recv() {
            match command {
                Command::Write(mut batch) => {
                    // Whatever queued meanwhile goes in the same transactions: under load the
                    // changelog costs one transaction per partition per round, not per batch.
                    let mut next = None;
                    while let Ok(queued) = commands.try_recv() {
                        match queued {
                            Command::Write(later) => merge(&mut batch, later),
                            own => {
                                next = Some(own);
                                break;
                            }
                        }
                    }
                    self.write(batch)?;
                    if let Some(Command::Own {
                        partitions,
                        local,
                        reply,
                    }) = next
                    {
                        let _ = reply.send(self.own(&partitions, &local));
                    }
                }
                Command::Own {
                    partitions,
                    local,
                    reply,
                } => {
                    let _ = reply.send(self.own(&partitions, &local));
                }
            }
        }
        Ok(())
    }

    /// Writes each partition's changes in one transaction (the partitions' transactions side
    /// by side), retrying with a backoff while the broker fails; a partition whose producer was
    /// fenced off (another instance owns it now) is given up: its new owner restores what the
    /// changelog holds and consumes on from there.
    fn write(&mut self, batch: ChangelogBatch) -> anyhow::Result<()> {
        // A partition this instance still consumes but may no longer write: its changelog
        // would freeze while the state dir moves on. Stopping is safe: the next start finds the
        // two apart and restores the partition from the changelog. (One revoked meanwhile is
        // its new owner's: what this instance applied of it is consumed again there.)
        if let Some(p) = batch
            .iter()
            .find(|(p, c)| {
                self.lost.contains(p) && !c.cells.is_empty() && self.health.consumes_partition(**p)
            })
            .map(|(p, _)| *p)
        {
            anyhow::bail!(
                "the changelog of partition {p} was taken over by another producer (or failed \
                 for good) while this instance still consumes it: stopping; the next start \
                 restores the partition from the changelog"
            );
        }
        // A partition not ours (any more) is its owner's to write.
        let mut pending: Vec<(i32, &PartitionChanges)> = batch
            .iter()
            .filter(|(p, _)| self.producers.contains_key(p))
            .map(|(&p, c)| (p, c))
            .collect();
        let mut backoff = Duration::from_millis(self.kafka.retry_backoff_ms.max(1));
        while !pending.is_empty() {
            let outcomes: Vec<anyhow::Result<()>> = std::thread::scope(|scope| {
                let writes: Vec<_> = pending
                    .iter()
                    .map(|&(partition, changes)| {
                        let producer = &self.producers[&partition];
                        let this = &*self;
                        scope.spawn(move || this.transaction(producer, partition, changes))
                    })
                    .collect();
                writes
                    .into_iter()
                    .map(|w| {
                        w.join().unwrap_or_else(|_| {
                            Err(anyhow::anyhow!("a changelog transaction panicked"))
                        })
                    })
                    .collect()
            });
            let mut failed = vec![];
            for (&(partition, changes), outcome) in pending.iter().zip(outcomes) {
                match outcome {
                    Ok(()) => self
                        .metrics
                        .changelog_records
                        .inc_by(changes.cells.len() as u64 + 1),
                    Err(e) if crate::kafka::changes::is_fenced(&e) || is_fatal(&e) => {
                        // Never initialise the id again here: that would fence the partition's
                        // new owner. Lost until the group assigns the partition here again.
                        tracing::warn!(
                            partition,
                            error = %format!("{e:#}"),
                            "the changelog of this partition was taken over by another \
                             instance (or failed for good): giving it up"
                        );
                        self.producers.remove(&partition);
                        self.lost.insert(partition);
                    }
                    Err(e) if self.stopping.load(Ordering::Relaxed) => {
                        tracing::warn!(partition, error = %format!("{e:#}"), "stopping: the changelog is left behind the state dir (restored from at the next start)");
                    }
                    Err(e) => {
                        tracing::warn!(partition, error = %format!("{e:#}"), retry_in = ?backoff, "changelog transaction failed; retrying");
                        failed.push((partition, changes));
                    }
                }
            }
            self.health.set_changelog_behind(!failed.is_empty());
            if !failed.is_empty() {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            pending = failed;
        }
        Ok(())
    }

    fn transaction(
        &self,
        producer: &TxProducer,
        partition: i32,
        changes: &PartitionChanges,
    ) -> anyhow::Result<()> {
        producer.begin_transaction()?;
        let sent = (|| -> anyhow::Result<()> {
            for cell in &changes.cells {
                let value = (cell.value != 0.0).then(|| cell.value.to_le_bytes());
                let key = cell_key(&cell.user, &cell.item);
                self.send(producer, partition, &key, value.as_ref().map(|v| &v[..]))?;
            }
            let offset = changes.next_offset.to_le_bytes();
            self.send(producer, partition, OFFSET_KEY, Some(&offset))?;
            Ok(producer.commit_transaction(CALL_TIMEOUT)?)
        })();
        if let Err(e) = sent {
            if !crate::kafka::changes::is_fenced(&e) {
                let _ = producer.abort_transaction(CALL_TIMEOUT);
            }
            return Err(e).with_context(|| {
                format!(
                    "cannot write partition {partition} to the changelog {}",
                    self.topic
                )
            });
        }
        Ok(())
    }

    fn send(
        &self,
        producer: &TxProducer,
        partition: i32,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        crate::kafka::send_queued(producer, (&self.topic, Some(partition)), key, value, || {
            anyhow::ensure!(
                !self.stopping.load(Ordering::Relaxed),
                "stopping with the producer's queue full"
            );
            Ok(())
        })
    }

    /// Closes the producers of partitions no longer owned; opens (fencing the previous owner)
    /// those of new ones and reads what the changelog holds for them.
    fn own(
        &mut self,
        partitions: &BTreeSet<i32>,
        local: &BTreeMap<i32, i64>,
    ) -> anyhow::Result<BTreeMap<i32, Handover>> {
        self.producers.retain(|p, _| partitions.contains(p));
        self.lost.clear();
        if let Some(standby) = &self.standby {
            standby.set_owned(partitions);
        }
        let mut handovers = BTreeMap::new();
        let new: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| !self.producers.contains_key(p))
            .collect();
        for &partition in partitions.difference(&new.iter().copied().collect()) {
            handovers.insert(partition, Handover::Kept);
        }
        // Each new partition's takeover (fence, then read) side by side: they are independent.
        let taken: Vec<anyhow::Result<(TxProducer, Handover)>> = std::thread::scope(|scope| {
            let this = &*self;
            let takes: Vec<_> = new
                .iter()
                .map(|&p| scope.spawn(move || this.take(p, local.get(&p).copied())))
                .collect();
            takes
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a changelog restore panicked")))
                })
                .collect()
        });
        for (partition, taken) in new.into_iter().zip(taken) {
            let (producer, handover) = taken?;
            self.producers.insert(partition, producer);
            handovers.insert(partition, handover);
        }
        self.health.set_consumed_partitions(partitions.clone());
        Ok(handovers)
    }

    /// Takes `partition` over: fences its previous owner, then compares the offset the
    /// changelog records with `local` (the state dir's) and reads the partition unless equal.
    fn take(&self, partition: i32, local: Option<i64>) -> anyhow::Result<(TxProducer, Handover)> {
        let started = Instant::now();
        let producer = self.open(partition)?;
        let opened = started.elapsed().as_secs_f64();
        // Owned from now on: a standby copy of it is this take-over's to use, or nobody's.
        let copy = self.standby.as_ref().and_then(|s| s.take(partition));
        let standby = copy.as_ref().map(|c| (c.position, c.state.cells()));
        // One reader for the watermarks, the tail and (when needed) the whole partition.
        let reader = self.reader()?;
        let (low, high) = reader.fetch_watermarks(&self.topic, partition, FETCH_TIMEOUT)?;
        let recorded = if high > low {
            self.last_recorded_offset(&reader, partition, low, high)?
        } else {
            None
        };
        tracing::debug!(
            partition,
            open_seconds = opened,
            tail_seconds = started.elapsed().as_secs_f64() - opened,
            "changelog partition opened"
        );
        let handover = if recorded.is_some() && recorded == local {
            Handover::Kept
        } else if high <= low {
            Handover::Restored {
                rows: vec![],
                next_offset: None,
            }
        } else {
            if standby.is_some() {
                self.metrics.changelog_standby_takeovers.inc();
            }
            self.read(&reader, partition, copy)?
        };
        let seconds = started.elapsed().as_secs_f64();
        match &handover {
            Handover::Kept => tracing::info!(
                partition,
                next_offset = recorded,
                seconds,
                "partition owned: the state dir holds what the changelog records"
            ),
            Handover::Restored { rows, next_offset } => {
                self.metrics
                    .changelog_restored_users
                    .inc_by(rows.len() as u64);
                self.metrics.changelog_restore_seconds.observe(seconds);
                tracing::info!(
                    partition,
                    users = rows.len(),
                    next_offset,
                    local,
                    seconds,
                    standby_position = standby.map(|s| s.0),
                    standby_cells = standby.map(|s| s.1),
                    "partition restored from the changelog"
                );
            }
        }
        Ok((producer, handover))
    }

    fn open(&self, partition: i32) -> anyhow::Result<TxProducer> {
        let id = format!("{}-{partition}", self.topic);
        let producer: TxProducer = client_config(&self.kafka)
            .set("transactional.id", &id)
            .set("enable.idempotence", "true")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .context("cannot create a changelog producer")?;
        producer
            .init_transactions(CALL_TIMEOUT)
            .with_context(|| format!("cannot initialise the changelog's transactions as {id}"))?;
        Ok(producer)
    }

    fn reader(&self) -> anyhow::Result<BaseConsumer> {
        client_config(&self.kafka)
            .set("group.id", format!("{}-restore", self.topic))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            // The end of the partition is reported by an empty fetch: answered at once.
            .set("fetch.wait.max.ms", "10")
            .set("max.partition.fetch.bytes", "16777216")
            .set("queued.min.messages", "1000000")
            .create()
            .context("cannot create the changelog reader")
    }

    /// Reads `partition` with `consumer` from `from` to its end, handing each committed record
    /// to `each`.
    fn scan(
        &self,
        consumer: &BaseConsumer,
        partition: i32,
        from: Offset,
        mut each: impl FnMut(&[u8], Option<&[u8]>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, from)?;
        consumer.assign(&tpl)?;
        loop {
            match consumer.poll(FETCH_TIMEOUT) {
                None => anyhow::bail!(
                    "the changelog {} partition {partition} sent nothing for {FETCH_TIMEOUT:?}",
                    self.topic
                ),
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok(()),
                Some(Err(e)) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot read the changelog {} partition {partition}",
                            self.topic
                        )
                    });
                }
                Some(Ok(m)) => each(m.key().unwrap_or_default(), m.payload())?,
            }
        }
    }

    /// The next offset the latest committed transaction of `partition` records, read from the
    /// partition's tail (a transaction ends with its offset record and a commit marker);
    /// `None` when the tail holds none (an aborted last transaction).
    fn last_recorded_offset(
        &self,
        consumer: &BaseConsumer,
        partition: i32,
        low: i64,
        high: i64,
    ) -> anyhow::Result<Option<i64>> {
        let mut recorded = None;
        self.scan(
            consumer,
            partition,
            Offset::Offset((high - 2).max(low)),
            |key, value| {
                if key == OFFSET_KEY {
                    recorded = Some(decode_offset(value)?);
                }
                Ok(())
            },
        )?;
        Ok(recorded)
    }

    /// The whole partition: each cell's latest value, by user, and the latest offset record.
    /// The partition's state read on from `from` (a standby copy) to the partition's end, or
    /// from its beginning.
    fn read(
        &self,
        consumer: &BaseConsumer,
        partition: i32,
        from: Option<PartitionCopy>,
    ) -> anyhow::Result<Handover> {
        let (mut state, start) = match from {
            Some(copy) => (copy.state, Offset::Offset(copy.position)),
            None => (PartitionState::default(), Offset::Beginning),
        };
        self.scan(consumer, partition, start, |key, value| {
            state.apply(key, value).map_err(|what| {
                anyhow::anyhow!(
                    "the changelog {} partition {partition} holds {what} segmenter did not \
                     write: give the changelog a topic of its own",
                    self.topic
                )
            })
        })?;
        Ok(state.into_handover())
    }
}

/// Whether `error` leaves the producer unusable (a fatal transactional error).
fn is_fatal(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(cause.downcast_ref::<KafkaError>(), Some(KafkaError::Transaction(e)) if e.is_fatal())
    })
}

fn decode_offset(value: Option<&[u8]>) -> anyhow::Result<i64> {
    value
        .and_then(|v| v.try_into().ok())
        .map(i64::from_le_bytes)
        .filter(|&o| o >= 0)
        .ok_or_else(|| anyhow::anyhow!("a changelog offset record segmenter did not write"))
}

#[cfg(test)]
mod tests {
    use super::*;

    type SortedRows = Vec<(String, Vec<(String, f64)>)>;

    /// Rows sorted by user and item, to compare handovers.
    fn sorted(handover: Handover) -> (SortedRows, Option<i64>) {
        let Handover::Restored { rows, next_offset } = handover else {
            panic!("a restore");
        };
        let mut rows: Vec<_> = rows
            .into_iter()
            .map(|mut r| {
                r.cells.sort_by(|a, b| a.0.cmp(&b.0));
                (r.user, r.cells)
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        (rows, next_offset)
    }

    #[test]
    fn a_copy_read_on_from_any_earlier_position_gives_the_whole_read() {
        let value = |v: f64| Some(v.to_le_bytes().to_vec());
        let mut records: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![];
        for round in 0..5i64 {
            for u in 0..20 {
                for j in 0..4 {
                    let key = cell_key(&format!("u{u}"), &format!("i{j}"));
                    // Cells come and go: every third a tombstone.
                    let v = if (u + j + round) % 3 == 0 {
                        None
                    } else {
                        value((u * 10 + j) as f64 + round as f64)
                    };
                    records.push((key, v));
                }
            }
            records.push((
                OFFSET_KEY.to_vec(),
                Some((100 * (round + 1)).to_le_bytes().to_vec()),
            ));
        }
        let mut whole = PartitionState::default();
        for (k, v) in &records {
            whole.apply(k, v.as_deref()).expect("segmenter's records");
        }
        let expected = sorted(whole.clone().into_handover());
        assert_eq!(expected.1, Some(500));
        assert!(whole.cells() > 0 && whole.cells() < 80);
        assert_eq!(
            whole.cells(),
            whole.rows.values().map(FxHashMap::len).sum::<usize>(),
            "the running count of cells"
        );
        for position in [0, 1, 77, 200, records.len()] {
            let mut copy = PartitionState::default();
            for (k, v) in &records[..position] {
                copy.apply(k, v.as_deref()).expect("segmenter's records");
            }
            // The tail, from a little before the copy's position: records read twice change
            // nothing.
            for (k, v) in &records[position.saturating_sub(30)..] {
                copy.apply(k, v.as_deref()).expect("segmenter's records");
            }
            assert_eq!(sorted(copy.into_handover()), expected, "from {position}");
        }
        let mut foreign = PartitionState::default();
        assert_eq!(
            foreign.apply(b"no-nul", value(1.0).as_deref()),
            Err("a key")
        );
        assert_eq!(
            foreign.apply(&cell_key("u", "i"), Some(b"short")),
            Err("a value")
        );
    }

    #[test]
    fn cell_keys_round_trip_and_foreign_keys_are_refused() {
        let key = cell_key("user-1", "é item");
        assert_eq!(split_cell_key(&key), Some(("user-1", "é item")));
        assert_eq!(split_cell_key(b"no separator"), None);
        assert_eq!(
            split_cell_key(OFFSET_KEY),
            None,
            "the offset record is no cell"
        );
        assert_eq!(split_cell_key(b"\0item"), None, "empty user");
        assert_eq!(split_cell_key(&[b'u', 0, 0xff]), None, "not utf-8");
    }

    #[test]
    fn a_later_batch_follows_the_earlier_and_moves_the_offset() {
        let row = |user: &str, v: f64| CellChange {
            user: user.into(),
            item: "i".into(),
            value: v,
        };
        let mut earlier = ChangelogBatch::from([(
            0,
            PartitionChanges {
                cells: vec![row("a", 1.0), row("b", 1.0)],
                next_offset: 10,
            },
        )]);
        let later = ChangelogBatch::from([
            (
                0,
                PartitionChanges {
                    cells: vec![row("b", 2.0), row("c", 2.0)],
                    next_offset: 14,
                },
            ),
            (
                1,
                PartitionChanges {
                    cells: vec![],
                    next_offset: 3,
                },
            ),
        ]);
        merge(&mut earlier, later);
        assert_eq!(
            earlier[&0].cells,
            vec![row("a", 1.0), row("b", 1.0), row("b", 2.0), row("c", 2.0)],
            "in order: b's later value last"
        );
        assert_eq!(earlier[&0].next_offset, 14);
        assert_eq!(earlier[&1].next_offset, 3);
    }
}
