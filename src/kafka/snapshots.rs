//! Publishes every snapshot the service serves to `[kafka] snapshots_topic`, keyed by its
//! version, so "read the latest snapshot" works from Kafka too. At least once: a restart
//! publishes the latest stored snapshot again (a crash may have come between storing it and
//! publishing it); readers keep the record with the highest version.

use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;

use crate::config::Config;
use crate::kafka::{client_config, ensure_topic_with};
use crate::pipeline::Shared;
use crate::store::SnapshotStore;

/// How long one snapshot may wait for the broker before it is given up (the next one follows).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest snapshot record (the topic is created to accept it).
const MAX_SNAPSHOT_BYTES: usize = 16 << 20;

/// Starts the publisher (it first creates the topic when missing); it ends with `shutdown`.
pub fn spawn_publisher(
    config: &Config,
    shared: &Shared,
    snapshots: SnapshotStore,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let kafka = config.kafka.clone();
    let topic = kafka.snapshots_topic.clone();
    let producer: FutureProducer = client_config(&kafka)
        .set("enable.idempotence", "true")
        .set("message.max.bytes", MAX_SNAPSHOT_BYTES.to_string())
        .set("compression.type", "lz4")
        .create()
        .context("cannot create the snapshots producer")?;
    let mut notices = shared.published.subscribe();
    let shared = shared.clone();
    // Read now, before the pipeline can store a newer one: the snapshot a crash may have kept
    // from being published is the latest stored at start.
    let latest = snapshots.latest_snapshot().ok().flatten();
    tokio::spawn(async move {
        if !topic_ready(&kafka, &topic, &mut shutdown).await {
            return;
        }
        if let Some(snapshot) = latest {
            let json = serde_json::to_vec(&snapshot).unwrap_or_default();
            publish(&producer, &topic, snapshot.version, &json).await;
        }
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                changed = notices.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let version = *notices.borrow_and_update();
                    let served = shared.serving.read().ok().and_then(|s| s.clone());
                    if let Some(serving) = served.filter(|s| s.snapshot.version == version) {
                        publish(&producer, &topic, version, &serving.snapshot_json).await;
                    }
                }
            }
        }
    });
    Ok(())
}

/// Creates the topic when missing, retrying while the broker is unreachable (the service starts
/// before its broker as well); `false` when `shutdown` came first.
async fn topic_ready(
    kafka: &crate::config::KafkaConfig,
    topic: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let max_bytes = MAX_SNAPSHOT_BYTES.to_string();
    loop {
        match ensure_topic_with(kafka, topic, 1, &[("max.message.bytes", &max_bytes)]).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(topic, error = %e, "cannot create [kafka] snapshots_topic yet")
            }
        }
        let backoff = Duration::from_millis(kafka.retry_backoff_ms.max(100) * 10);
        tokio::select! {
            _ = shutdown.changed() => return false,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

async fn publish(producer: &FutureProducer, topic: &str, version: u64, json: &[u8]) {
    let key = version.to_string();
    let record = FutureRecord::to(topic).key(&key).payload(json);
    match producer.send(record, SEND_TIMEOUT).await {
        Ok(_) => tracing::info!(version, topic, bytes = json.len(), "snapshot published"),
        Err((e, _)) => tracing::warn!(
            version,
            topic,
            bytes = json.len(),
            error = %e,
            "cannot publish the snapshot to [kafka] snapshots_topic (the next one will be tried)"
        ),
    }
}
