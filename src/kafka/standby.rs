//! Standby copies of the changelog (`[kafka] standby`): a thread follows every changelog
//! partition this instance does not own (read committed, as it is written) and keeps each one's
//! state in memory, so that taking a partition over reads only the records written after the
//! copy instead of the whole partition. A record sets a cell or removes it, so the copy read on
//! to the partition's end is exactly what a restore from the beginning gives.
//!
//! Every instance with a standby holds the rows of every partition of the group (its own in the
//! engine, the others here): the price of a fail-over that does not wait for a full read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::kafka::changelog::{PartitionCopy, PartitionState};
use crate::kafka::client_config;
use crate::telemetry::Metrics;

/// Records applied to the copies per lock: the take-over waits for at most this many.
const APPLY_CHUNK: usize = 10_000;

/// The copies and which partitions this instance owns (those are not followed).
#[derive(Default)]
struct Copies {
    owned: BTreeSet<i32>,
    partitions: BTreeMap<i32, PartitionCopy>,
}

/// The standby's handle: the take-over asks it for copies.
#[derive(Clone)]
pub struct Standby {
    copies: Arc<Mutex<Copies>>,
}

impl Standby {
    /// Starts following the `partitions` partitions of `[kafka] changelog_topic` (all of them
    /// until [`Standby::set_owned`] says which this instance owns), until `stop` is set.
    pub fn start(
        kafka: &KafkaConfig,
        partitions: i32,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Standby> {
        let consumer: BaseConsumer = client_config(kafka)
            .set("group.id", format!("{}-standby", kafka.changelog_topic))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "100")
            .set("max.partition.fetch.bytes", "16777216")
            .create()
            .context("cannot create the standby's changelog reader")?;
        let standby = Standby {
            copies: Arc::new(Mutex::new(Copies::default())),
        };
        let follower = Follower {
            topic: kafka.changelog_topic.clone(),
            partitions,
            consumer,
            standby: standby.clone(),
            followed: BTreeSet::new(),
            metrics,
        };
        std::thread::Builder::new()
            .name("segmenter-standby".into())
            .spawn(move || follower.run(&stop))?;
        Ok(standby)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Copies> {
        self.copies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This instance owns `partitions` now: their copies are no longer kept up (a take-over
    /// takes them), the others' are.
    pub fn set_owned(&self, partitions: &BTreeSet<i32>) {
        self.lock().owned = partitions.clone();
    }

    /// The copy of `partition`, handed over (the standby keeps none of an owned partition).
    pub fn take(&self, partition: i32) -> Option<PartitionCopy> {
        let mut copies = self.lock();
        copies.owned.insert(partition);
        copies.partitions.remove(&partition)
    }
}

struct Follower {
    topic: String,
    partitions: i32,
    consumer: BaseConsumer,
    standby: Standby,
    /// The partitions the consumer is assigned.
    followed: BTreeSet<i32>,
    metrics: Arc<Metrics>,
}

impl Follower {
    fn run(mut self, stop: &AtomicBool) {
        let mut warned = false;
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.follow_the_unowned() {
                tracing::warn!(error = %format!("{e:#}"), "the standby cannot follow the changelog; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            let mut records = vec![];
            let mut wait = Duration::from_millis(200);
            while records.len() < APPLY_CHUNK {
                match self.consumer.poll(wait) {
                    Some(Ok(m)) => records.push((
                        m.partition(),
                        m.offset(),
                        m.key().unwrap_or_default().to_vec(),
                        m.payload().map(<[u8]>::to_vec),
                    )),
                    Some(Err(e)) => {
                        tracing::debug!(%e, "standby fetch error");
                        break;
                    }
                    None => break,
                }
                wait = Duration::ZERO;
            }
            let mut copies = self.standby.lock();
            for (partition, offset, key, value) in records {
                // Taken over since it was fetched: the take-over read it from the changelog.
                if copies.owned.contains(&partition) {
                    continue;
                }
                let copy = copies
                    .partitions
                    .entry(partition)
                    .or_insert_with(|| PartitionCopy {
                        state: PartitionState::default(),
                        position: 0,
                    });
                if let Err(what) = copy.state.apply(&key, value.as_deref())
                    && !warned
                {
                    tracing::warn!(
                        partition,
                        offset,
                        "the changelog holds {what} segmenter did not write: the standby skips it"
                    );
                    warned = true;
                }
                copy.position = offset + 1;
            }
            let cells: usize = copies.partitions.values().map(|c| c.state.cells()).sum();
            self.metrics.changelog_standby_cells.set(cells as i64);
        }
    }

    /// Assigns the consumer every partition not owned, each at its copy's position.
    fn follow_the_unowned(&mut self) -> anyhow::Result<()> {
        let (wanted, tpl) = {
            let copies = self.standby.lock();
            // Copies of owned partitions stay until their take-over takes them.
            let wanted: BTreeSet<i32> = (0..self.partitions)
                .filter(|p| !copies.owned.contains(p))
                .collect();
            if wanted == self.followed {
                return Ok(());
            }
            let mut tpl = TopicPartitionList::new();
            for &p in &wanted {
                let offset = copies
                    .partitions
                    .get(&p)
                    .map_or(Offset::Beginning, |c| Offset::Offset(c.position));
                tpl.add_partition_offset(&self.topic, p, offset)?;
            }
            (wanted, tpl)
        };
        self.consumer.assign(&tpl)?;
        tracing::info!(partitions = ?wanted, "standby: following the changelog of the partitions not owned");
        self.followed = wanted;
        Ok(())
    }
}
