//! The changelog (`[kafka] changelog_topic`): every owned partition's user rows and next offset
//! in a compacted topic partitioned like the ratings topic, so a partition that moves to
//! another instance is restored there to exactly the state its offset says instead of being
//! rebuilt from the ratings topic's history.
//!
//! Each batch's changed rows of partition `p` go out in one Kafka transaction together with
//! the next offset of `p` they cover (a record under [`OFFSET_KEY`]), from a producer whose
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
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use rustc_hash::FxHashMap;

use crate::config::KafkaConfig;
use crate::kafka::client_config;
use crate::pipeline::Health;
use crate::telemetry::Metrics;

/// The key of a partition's next-offset record. User ids are never empty, so it cannot clash.
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

/// What one batch changed in one partition: the rows (each user once) and the partition's
/// next offset after the batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartitionChanges {
    pub rows: Vec<Row>,
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

/// Encodes a row's cells: count (u32), then per cell the item id's length (u32), its bytes
/// and the value (f64), little-endian. Exact: the bits of every value round-trip.
pub fn encode_cells(cells: &[(String, f64)]) -> Vec<u8> {
    let size = 4 + cells.iter().map(|(i, _)| 12 + i.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(cells.len() as u32).to_le_bytes());
    for (item, value) in cells {
        out.extend_from_slice(&(item.len() as u32).to_le_bytes());
        out.extend_from_slice(item.as_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

/// The inverse of [`encode_cells`]; `None` for bytes it did not write.
pub fn decode_cells(bytes: &[u8]) -> Option<Vec<(String, f64)>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = bytes.split_at_checked(n)?;
        *bytes = tail;
        Some(head)
    }
    let mut rest = bytes;
    let count = u32::from_le_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
    let mut cells = Vec::with_capacity(count.min(rest.len() / 12));
    for _ in 0..count {
        let len = u32::from_le_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
        let item = std::str::from_utf8(take(&mut rest, len)?).ok()?.to_string();
        let value = f64::from_le_bytes(take(&mut rest, 8)?.try_into().ok()?);
        cells.push((item, value));
    }
    rest.is_empty().then_some(cells)
}

/// Merges `later` into `earlier`: a user's later row replaces the earlier one, the later
/// offset wins.
fn merge(earlier: &mut ChangelogBatch, later: ChangelogBatch) {
    for (partition, changes) in later {
        let entry = earlier.entry(partition).or_default();
        if entry.rows.is_empty() {
            entry.rows = changes.rows;
        } else {
            let mut at: FxHashMap<String, usize> = entry
                .rows
                .iter()
                .enumerate()
                .map(|(i, r)| (r.user.clone(), i))
                .collect();
            for row in changes.rows {
                match at.get(&row.user) {
                    Some(&i) => entry.rows[i] = row,
                    None => {
                        at.insert(row.user.clone(), entry.rows.len());
                        entry.rows.push(row);
                    }
                }
            }
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
    ) -> anyhow::Result<Changelog> {
        let (commands, received) = std::sync::mpsc::sync_channel(QUEUE_DEPTH);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut writer = Writer {
            kafka: kafka.clone(),
            topic: kafka.changelog_topic.clone(),
            producers: BTreeMap::new(),
            health,
            metrics,
            stopping: stopping.clone(),
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
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Set when the service stops and the grace is over: failing writes are given up.
    stopping: Arc<AtomicBool>,
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

    /// Writes each partition's changes in one transaction, retrying with a backoff while the
    /// broker fails; a partition whose producer was fenced off (another instance owns it now)
    /// is given up: its new owner restores what the changelog holds and consumes on from there.
    fn write(&mut self, batch: ChangelogBatch) -> anyhow::Result<()> {
        for (partition, changes) in batch {
            let mut backoff = Duration::from_millis(self.kafka.retry_backoff_ms.max(1));
            // A partition not ours (any more) is its owner's to write.
            while let Some(producer) = self.producers.get(&partition) {
                match self.transaction(producer, partition, &changes) {
                    Ok(()) => {
                        self.health.set_changelog_behind(false);
                        self.metrics
                            .changelog_records
                            .inc_by(changes.rows.len() as u64 + 1);
                        break;
                    }
                    Err(e) if crate::kafka::changes::is_fenced(&e) => {
                        tracing::warn!(
                            partition,
                            "the changelog of this partition was taken over by another \
                             instance: giving it up"
                        );
                        self.producers.remove(&partition);
                        break;
                    }
                    Err(e) if self.stopping.load(Ordering::Relaxed) => {
                        tracing::warn!(partition, error = %format!("{e:#}"), "stopping: the changelog is left behind the state dir (restored from at the next start)");
                        return Ok(());
                    }
                    Err(e) => {
                        if is_fatal(&e) {
                            // A producer in a fatal state never recovers: a new one (the same
                            // transactional id, so nothing of the old one's can commit).
                            let producer = self.open(partition)?;
                            self.producers.insert(partition, producer);
                        }
                        self.health.set_changelog_behind(true);
                        tracing::warn!(partition, error = %format!("{e:#}"), retry_in = ?backoff, "changelog transaction failed; retrying");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
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
            for row in &changes.rows {
                let value = (!row.cells.is_empty()).then(|| encode_cells(&row.cells));
                self.send(producer, partition, row.user.as_bytes(), value.as_deref())?;
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
        loop {
            let mut record: BaseRecord<'_, [u8], [u8]> =
                BaseRecord::to(&self.topic).partition(partition).key(key);
            if let Some(v) = value {
                record = record.payload(v);
            }
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Closes the producers of partitions no longer owned; opens (fencing the previous owner)
    /// those of new ones and reads what the changelog holds for them.
    fn own(
        &mut self,
        partitions: &BTreeSet<i32>,
        local: &BTreeMap<i32, i64>,
    ) -> anyhow::Result<BTreeMap<i32, Handover>> {
        self.producers.retain(|p, _| partitions.contains(p));
        let mut handovers = BTreeMap::new();
        for &partition in partitions {
            if self.producers.contains_key(&partition) {
                handovers.insert(partition, Handover::Kept);
                continue;
            }
            let started = Instant::now();
            let producer = self.open(partition)?;
            let recorded = self.last_recorded_offset(partition)?;
            let handover = if recorded.is_some() && recorded == local.get(&partition).copied() {
                Handover::Kept
            } else {
                self.read(partition)?
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
                        local = local.get(&partition),
                        seconds,
                        "partition restored from the changelog"
                    );
                }
            }
            self.producers.insert(partition, producer);
            handovers.insert(partition, handover);
        }
        Ok(handovers)
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

    fn reader(&self, partition: i32, from: Offset) -> anyhow::Result<BaseConsumer> {
        let consumer: BaseConsumer = client_config(&self.kafka)
            .set("group.id", format!("{}-restore", self.topic))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create()
            .context("cannot create the changelog reader")?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, from)?;
        consumer.assign(&tpl)?;
        Ok(consumer)
    }

    /// Reads `partition` from `from` to its end, handing each committed record to `each`.
    fn scan(
        &self,
        partition: i32,
        from: Offset,
        mut each: impl FnMut(&[u8], Option<&[u8]>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let consumer = self.reader(partition, from)?;
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
    /// `None` when the tail holds none (an empty changelog, or an aborted last transaction).
    fn last_recorded_offset(&self, partition: i32) -> anyhow::Result<Option<i64>> {
        let (low, high) = self.reader(partition, Offset::End)?.fetch_watermarks(
            &self.topic,
            partition,
            FETCH_TIMEOUT,
        )?;
        if high <= low {
            return Ok(None);
        }
        let mut recorded = None;
        self.scan(
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

    /// The whole partition: each user's latest row, and the latest offset record.
    fn read(&self, partition: i32) -> anyhow::Result<Handover> {
        let mut rows: FxHashMap<String, Vec<(String, f64)>> = FxHashMap::default();
        let mut next_offset = None;
        self.scan(partition, Offset::Beginning, |key, value| {
            if key == OFFSET_KEY {
                next_offset = Some(decode_offset(value)?);
                return Ok(());
            }
            let user = String::from_utf8_lossy(key).into_owned();
            match value {
                None => {
                    rows.insert(user, vec![]);
                }
                Some(bytes) => {
                    let cells = decode_cells(bytes).ok_or_else(|| {
                        anyhow::anyhow!(
                            "the changelog {} holds a row for {user} that segmenter did not \
                             write: give the changelog a topic of its own",
                            self.topic
                        )
                    })?;
                    rows.insert(user, cells);
                }
            }
            Ok(())
        })?;
        let rows = rows
            .into_iter()
            .map(|(user, cells)| Row { user, cells })
            .collect();
        Ok(Handover::Restored { rows, next_offset })
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

    #[test]
    fn cells_round_trip_bit_for_bit_and_foreign_bytes_are_refused() {
        let cells = vec![
            ("item-1".to_string(), 0.1 + 0.2),
            ("é".to_string(), -3.5e-300),
            (String::new(), f64::MAX),
        ];
        let decoded = decode_cells(&encode_cells(&cells)).expect("ours");
        assert_eq!(decoded.len(), 3);
        for ((a, x), (b, y)) in cells.iter().zip(&decoded) {
            assert_eq!(a, b);
            assert_eq!(x.to_bits(), y.to_bits());
        }
        assert_eq!(decode_cells(&encode_cells(&[])), Some(vec![]));
        let mut long = encode_cells(&cells);
        long.push(0);
        assert_eq!(decode_cells(&long), None, "trailing bytes");
        assert_eq!(decode_cells(br#"{"user":"u1"}"#), None, "json");
        assert_eq!(decode_cells(&[1, 0, 0]), None, "truncated");
    }

    #[test]
    fn a_later_batch_replaces_a_users_row_and_moves_the_offset() {
        let row = |user: &str, v: f64| Row {
            user: user.into(),
            cells: vec![("i".into(), v)],
        };
        let mut earlier = ChangelogBatch::from([(
            0,
            PartitionChanges {
                rows: vec![row("a", 1.0), row("b", 1.0)],
                next_offset: 10,
            },
        )]);
        let later = ChangelogBatch::from([
            (
                0,
                PartitionChanges {
                    rows: vec![row("b", 2.0), row("c", 2.0)],
                    next_offset: 14,
                },
            ),
            (
                1,
                PartitionChanges {
                    rows: vec![],
                    next_offset: 3,
                },
            ),
        ]);
        merge(&mut earlier, later);
        assert_eq!(
            earlier[&0].rows,
            vec![row("a", 1.0), row("b", 2.0), row("c", 2.0)]
        );
        assert_eq!(earlier[&0].next_offset, 14);
        assert_eq!(earlier[&1].next_offset, 3);
    }
}
