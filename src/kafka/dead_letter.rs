//! Dead letters: a rejected message goes to the dead-letter topic with its original key and
//! bytes, and headers naming the reason and where it came from. Delivery is awaited (with
//! retries) before the batch that contained it is committed, so no bad event is ever lost.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::event::Rejection;

/// Header names on dead-letter messages.
pub const HEADER_REASON: &str = "segmenter.reason";
pub const HEADER_DETAIL: &str = "segmenter.detail";
pub const HEADER_TOPIC: &str = "segmenter.source.topic";
pub const HEADER_PARTITION: &str = "segmenter.source.partition";
pub const HEADER_OFFSET: &str = "segmenter.source.offset";
/// Present when the payload was cut to [`MAX_DEAD_LETTER_PAYLOAD`]: the original length.
pub const HEADER_TRUNCATED: &str = "segmenter.truncated_from_bytes";

/// Dead-letter payloads are cut to this many bytes: far below the producer's and brokers'
/// default message size limit (1 MB), so a huge bad message is always deliverable and can
/// never stall consumption. The original length goes in [`HEADER_TRUNCATED`].
pub const MAX_DEAD_LETTER_PAYLOAD: usize = 256 * 1024;

/// Detail texts are cut to this many bytes so a huge bad message cannot make a huge header.
const MAX_DETAIL: usize = 512;

#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub rejection: Rejection,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl DeadLetter {
    fn headers(&self) -> OwnedHeaders {
        let mut detail = self.rejection.detail.clone();
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        let partition = self.partition.to_string();
        let offset = self.offset.to_string();
        let original = self
            .payload
            .as_ref()
            .filter(|p| p.len() > MAX_DEAD_LETTER_PAYLOAD)
            .map(|p| p.len().to_string());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_REASON,
                value: Some(self.rejection.reason.label()),
            })
            .insert(Header {
                key: HEADER_DETAIL,
                value: Some(&detail),
            })
            .insert(Header {
                key: HEADER_TOPIC,
                value: Some(&self.topic),
            })
            .insert(Header {
                key: HEADER_PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: HEADER_OFFSET,
                value: Some(&offset),
            });
        match &original {
            Some(length) => headers.insert(Header {
                key: HEADER_TRUNCATED,
                value: Some(length),
            }),
            None => headers,
        }
    }

    /// The payload as delivered: whole, or its first [`MAX_DEAD_LETTER_PAYLOAD`] bytes.
    fn delivered_payload(&self) -> Option<&[u8]> {
        self.payload
            .as_deref()
            .map(|p| &p[..p.len().min(MAX_DEAD_LETTER_PAYLOAD)])
    }
}

/// Delivers every letter, retrying with exponential backoff until all are acknowledged by the
/// broker or `give_up` returns true (then an error: the batch must not be committed).
/// `on_refused` hears of every round in which some letters were not delivered.
pub async fn deliver_all(
    producer: &FutureProducer,
    topic: &str,
    letters: &[DeadLetter],
    first_backoff: Duration,
    give_up: impl Fn() -> bool,
    on_refused: impl Fn(u64),
) -> anyhow::Result<()> {
    let mut pending: Vec<&DeadLetter> = letters.iter().collect();
    let mut backoff = first_backoff;
    while !pending.is_empty() {
        // Enqueue everything first (librdkafka batches it), then await every delivery report.
        let mut deliveries = Vec::with_capacity(pending.len());
        for letter in &pending {
            let headers = letter.headers();
            let delivery = loop {
                let mut record = FutureRecord::<Vec<u8>, [u8]>::to(topic).headers(headers.clone());
                if let Some(k) = &letter.key {
                    record = record.key(k);
                }
                if let Some(p) = letter.delivered_payload() {
                    record = record.payload(p);
                }
                match producer.send_result(record) {
                    Ok(future) => break Some(future),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        tracing::warn!(%e, offset = letter.offset, "dead letter not accepted by the producer");
                        break None;
                    }
                }
            };
            deliveries.push(delivery);
        }
        let mut failed = vec![];
        for (letter, delivery) in pending.iter().zip(deliveries) {
            let delivered = match delivery {
                Some(future) => matches!(future.await, Ok(Ok(_))),
                None => false,
            };
            if !delivered {
                failed.push(*letter);
            }
        }
        pending = failed;
        if !pending.is_empty() {
            on_refused(pending.len() as u64);
            tracing::warn!(
                count = pending.len(),
                "dead letters not delivered; retrying"
            );
            if give_up() {
                anyhow::bail!(
                    "{} dead letters could not be delivered to {topic}",
                    pending.len()
                );
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
    Ok(())
}
