//! `segmenter produce`: loads a ratings file (and optionally a catalogue) into topics, key =
//! user id, in timestamp order, with a progress bar: how a user bootstraps from history and how
//! the tests feed the broker.

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::config::Config;
use crate::decode::{self, FileFormat, RejectTally};
use crate::event::{Mode, ValuePolicy};
use crate::kafka::{client_config, ensure_topic};

#[derive(Debug, Clone)]
pub struct ProduceOptions {
    pub brokers: String,
    pub topic: String,
    pub ratings: PathBuf,
    pub format: FileFormat,
    pub items: Option<PathBuf>,
    pub items_topic: Option<String>,
    /// Create the topics with this many partitions if they do not exist.
    pub partitions: Option<i32>,
    pub progress: bool,
    /// Send at most this many rating events per second (a steady stream for load tests);
    /// `None`: as fast as the broker takes them.
    pub rate: Option<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct ProduceOutcome {
    pub produced: u64,
    pub items_produced: u64,
    pub rejected: RejectTally,
}

/// Deliveries awaited together; bounds memory while keeping the producer busy.
const IN_FLIGHT: usize = 20_000;

/// Records paced at `rate` per second are sent in slices of this length.
const PACING_SLICE: Duration = Duration::from_millis(10);

async fn send_all(
    producer: &FutureProducer,
    topic: &str,
    records: impl Iterator<Item = (String, Vec<u8>)>,
    bar: &ProgressBar,
    rate: Option<f64>,
) -> anyhow::Result<u64> {
    let mut inflight: Vec<DeliveryFuture> = Vec::with_capacity(IN_FLIGHT);
    let mut sent = 0u64;
    let started = tokio::time::Instant::now();
    for (i, (key, payload)) in records.enumerate() {
        if let Some(rate) = rate.filter(|r| *r > 0.0) {
            // Record i is due at i / rate: sleep in slices rather than per record.
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if due > tokio::time::Instant::now() + PACING_SLICE {
                tokio::time::sleep_until(due).await;
            }
        }
        let future = loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&payload)) {
                Ok(f) => break f,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => anyhow::bail!("cannot produce to {topic}: {e}"),
            }
        };
        inflight.push(future);
        if inflight.len() >= IN_FLIGHT {
            sent += await_deliveries(&mut inflight, topic).await?;
            bar.set_position(sent);
        }
    }
    sent += await_deliveries(&mut inflight, topic).await?;
    bar.set_position(sent);
    Ok(sent)
}

async fn await_deliveries(inflight: &mut Vec<DeliveryFuture>, topic: &str) -> anyhow::Result<u64> {
    let n = inflight.len() as u64;
    for f in inflight.drain(..) {
        match f.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => anyhow::bail!("delivery to {topic} failed: {e}"),
            Err(_) => anyhow::bail!("delivery to {topic} was cancelled"),
        }
    }
    Ok(n)
}

pub async fn produce(config: &Config, options: &ProduceOptions) -> anyhow::Result<ProduceOutcome> {
    let mut kafka = config.kafka.clone();
    kafka.brokers = options.brokers.clone();
    if let Some(partitions) = options.partitions {
        ensure_topic(&kafka, &options.topic, partitions).await?;
        if let Some(t) = &options.items_topic {
            ensure_topic(&kafka, t, 1).await?;
        }
    }
    let producer: FutureProducer = client_config(&kafka)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("enable.idempotence", "true")
        .create()?;
    let mut outcome = ProduceOutcome::default();
    if let (Some(items), Some(topic)) = (&options.items, &options.items_topic) {
        let (titles, bad) = decode::read_catalogue_file(items)?;
        if bad > 0 {
            tracing::warn!(bad, "unreadable catalogue lines skipped");
        }
        let records = titles.into_iter().map(|(item, title)| {
            let payload = serde_json::to_vec(&serde_json::json!({"item": item, "title": title}))
                .unwrap_or_default();
            (item, payload)
        });
        outcome.items_produced =
            send_all(&producer, topic, records, &ProgressBar::hidden(), None).await?;
    }
    // Only undecodable lines and NaN/infinite values (JSON cannot carry them) are skipped here:
    // range and mode checks belong to the consuming service, which dead-letters violations.
    let permissive = ValuePolicy {
        mode: Mode::Explicit,
        min_value: f64::NEG_INFINITY,
        max_value: f64::INFINITY,
        half_life_seconds: None,
        future_tolerance_seconds: None,
    };
    let mut decoded = decode::read_ratings_file(
        &options.ratings,
        options.format,
        &config.events.fields,
        &permissive,
    )?;
    decoded.events.sort_by_key(|e| e.ts);
    outcome.rejected = decoded.rejected;
    let bar = if options.progress {
        ProgressBar::new(decoded.events.len() as u64).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} events ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    } else {
        ProgressBar::hidden()
    };
    let f = &config.events.fields;
    let records = decoded.events.into_iter().map(|e| {
        let mut object = serde_json::Map::new();
        object.insert(f.user.clone(), e.user.clone().into());
        object.insert(f.item.clone(), e.item.into());
        object.insert(f.rating.clone(), e.value.into());
        object.insert(f.ts.clone(), e.ts.into());
        (e.user, serde_json::to_vec(&object).unwrap_or_default())
    });
    outcome.produced = send_all(&producer, &options.topic, records, &bar, options.rate).await?;
    bar.finish_and_clear();
    Ok(outcome)
}
