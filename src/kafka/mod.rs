//! Kafka plumbing shared by the service and the `produce` command: client configuration,
//! topic creation, the consumer context that assigns partitions at the offsets stored in the
//! state dir (or, with a changelog, hands them to the poll loop to take over first), dead
//! letters, the changelog and the group model's rounds.

pub mod changelog;
pub mod changes;
pub mod dead_letter;
pub mod produce;
pub mod rounds;
pub mod snapshots;
pub mod standby;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// `topic/partition`, the key of stored offsets.
pub fn offset_key(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// librdkafka settings common to every client, plus `[kafka.client]` overrides.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    client_config_with_defaults(kafka, &[])
}

/// Like [`client_config`], with tuning `defaults` a user's `[kafka.client]` may override.
/// Settings the exactly-once design depends on are set by the caller afterwards; the config
/// layer refuses them in `[kafka.client]` (see [`crate::config::SERVICE_OWNED_CLIENT_KEYS`]).
pub fn client_config_with_defaults(kafka: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("reconnect.backoff.ms", kafka.retry_backoff_ms.to_string())
        .set("reconnect.backoff.max.ms", "10000");
    for (k, v) in defaults {
        config.set(*k, *v);
    }
    for (k, v) in &kafka.client {
        config.set(k, v);
    }
    config
}

/// Creates `topic` with `partitions` partitions unless it exists.
pub async fn ensure_topic(kafka: &KafkaConfig, topic: &str, partitions: i32) -> anyhow::Result<()> {
    ensure_topic_with(kafka, topic, partitions, &[]).await
}

/// [`ensure_topic`] with topic `configs` for a topic it creates (an existing topic keeps its own).
pub async fn ensure_topic_with(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka).create()?;
    let mut new = NewTopic::new(
        topic,
        partitions,
        TopicReplication::Fixed(kafka.topic_replication_factor),
    );
    for (k, v) in configs {
        new = new.set(k, v);
    }
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
        }
    }
    Ok(())
}

/// Queues one record for `(topic, partition)` (`None`: by key) with `payload` (`None`: a
/// tombstone), waiting while the producer's queue is full; `give_up`, asked while it waits,
/// ends the wait with its error.
pub fn send_queued<C: rdkafka::producer::ProducerContext<DeliveryOpaque = ()> + 'static>(
    producer: &rdkafka::producer::ThreadedProducer<C>,
    (topic, partition): (&str, Option<i32>),
    key: &[u8],
    payload: Option<&[u8]>,
    give_up: impl Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    loop {
        let mut record = rdkafka::producer::BaseRecord::<[u8], [u8]>::to(topic).key(key);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                give_up()?;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e).with_context(|| format!("cannot produce to {topic}")),
        }
    }
}

/// How many partitions `topic` has (`None`: the topic does not exist).
pub async fn partition_count(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Option<i32>> {
    let (kafka, topic) = (kafka.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || -> anyhow::Result<Option<i32>> {
        let consumer: BaseConsumer = client_config(&kafka).create()?;
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(30))
            .with_context(|| format!("cannot read the metadata of topic {topic}"))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|&n| n > 0))
    })
    .await?
}

/// Whether `topic`'s `cleanup.policy` includes `compact` (`None` when the broker does not
/// report it).
pub async fn is_compacted(
    kafka: &KafkaConfig,
    topic: &str,
) -> anyhow::Result<(bool, Option<String>)> {
    let policy = topic_config(kafka, topic, "cleanup.policy").await?;
    let compacted = policy
        .as_deref()
        .is_some_and(|p| p.split(',').any(|p| p.trim() == "compact"));
    Ok((compacted, policy))
}

/// The value of one of `topic`'s configs as the broker reports it (`None`: not reported).
pub async fn topic_config(
    kafka: &KafkaConfig,
    topic: &str,
    name: &str,
) -> anyhow::Result<Option<String>> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> = client_config(kafka).create()?;
    let results = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for result in results {
        let resource =
            result.map_err(|code| anyhow::anyhow!("cannot describe topic {topic}: {code}"))?;
        if let Some(entry) = resource.get(name) {
            return Ok(entry.value.clone());
        }
    }
    Ok(None)
}

/// Consumer context: partitions are assigned at the next offsets stored in the state dir (the
/// source of truth), never at Kafka's committed offsets; revocations are flagged so the
/// service flushes its batch.
pub struct ServiceContext {
    /// `[kafka] topic`: partitions of any other topic are never consumed.
    pub topic: String,
    pub stored_offsets: Arc<Mutex<BTreeMap<String, i64>>>,
    pub health: Arc<crate::pipeline::Health>,
    pub revoked: AtomicBool,
    /// Partitions of another topic were handed to this member: the poll loop leaves the group
    /// and subscribes again, so the coordinator forgets the stale assignment.
    pub foreign_assignment: AtomicBool,
    /// With a changelog, an assignment is not consumed at once: its partitions wait here for
    /// the poll loop, which takes them over (restoring what moved) and then assigns them at
    /// the offsets that gives.
    pub changelog: bool,
    pub pending_assignment: Mutex<Option<Vec<i32>>>,
}

impl ClientContext for ServiceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure)
        ) {
            self.health.set_broker_reachable(false);
        }
        tracing::debug!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for ServiceContext {
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // A poisoned lock still holds whole offset maps: never assign from scratch.
                let stored = self
                    .stored_offsets
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let mut assigned = vec![];
                let mut foreign = vec![];
                for elem in tpl.elements() {
                    if elem.topic() != self.topic {
                        foreign.push(offset_key(elem.topic(), elem.partition()));
                        continue;
                    }
                    let key = offset_key(elem.topic(), elem.partition());
                    let offset = stored
                        .get(&key)
                        .map_or(Offset::Beginning, |&o| Offset::Offset(o));
                    assigned.push((elem.topic().to_string(), elem.partition(), offset));
                }
                if !foreign.is_empty() {
                    // A static member restarted within the session timeout with another topic
                    // gets its previous assignment back from the coordinator.
                    tracing::warn!(
                        partitions = ?foreign,
                        topic = self.topic,
                        "the group coordinator assigned partitions of another topic (a static \
                         member's previous assignment): not consuming them, not ready; leaving \
                         the group to join it again"
                    );
                    self.foreign_assignment.store(true, Ordering::Relaxed);
                }
                if self.changelog {
                    let partitions = assigned.iter().map(|(_, p, _)| *p).collect();
                    self.health.set_partitions_assigned(assigned.len());
                    self.health.restoring.store(true, Ordering::Relaxed);
                    *self
                        .pending_assignment
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(partitions);
                    // Nothing is fetched until the poll loop assigns them at their offsets.
                    if let Err(e) = base_consumer.assign(&TopicPartitionList::new()) {
                        tracing::error!(%e, "partition assignment failed");
                    }
                    tracing::info!(partitions = ?assigned.iter().map(|(_, p, _)| p).collect::<Vec<_>>(), "partitions assigned: taking them over from the changelog");
                    return;
                }
                let mut own = TopicPartitionList::new();
                for (topic, partition, offset) in &assigned {
                    if let Err(e) = own.add_partition_offset(topic, *partition, *offset) {
                        tracing::error!(%e, topic, partition, "cannot set the assigned offset");
                    }
                }
                self.health.set_partitions_assigned(assigned.len());
                if let Err(e) = base_consumer.assign(&own) {
                    tracing::error!(%e, "partition assignment failed");
                }
                tracing::info!(partitions = ?assigned, "partitions assigned at the offsets stored in the state dir");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoked.store(true, Ordering::Relaxed);
                self.health.set_partitions_assigned(0);
                self.health.set_consumed_partitions(Default::default());
                let _ = base_consumer.unassign();
                tracing::info!(partitions = tpl.count(), "partitions revoked");
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error; dropping the assignment");
                self.health.set_partitions_assigned(0);
                let _ = base_consumer.unassign();
            }
        }
    }
}
