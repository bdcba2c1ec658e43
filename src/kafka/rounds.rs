//! One model for the whole consumer group, from partial sums exchanged over Kafka
//! (docs/cluster.md): the instance that owns partition 0 of the ratings topic coordinates. It
//! asks every instance, on `<group_id>-rounds`, for a cut (each takes a copy-on-write view of
//! its users and answers with the offsets it covers and its statistics), then runs the engine's
//! own [`cluster::solve`] over one [`Participant`] whose every call is a round: the broadcast
//! goes out on `<group_id>-rounds`, each instance answers from its view on
//! `<group_id>-partials`, and the partials are added up. The model (counts, PCA, centroids,
//! sizes, inertia, the cut) goes to the compacted `<group_id>-models`, which every instance
//! reads and serves at `GET /group`.
//!
//! The model carries the group's snapshot ([`crate::snapshot::group`]): two more rounds sum
//! the segments (Naive Bayes, profiles) and score the users under the broadcast idf and fits.
//! Each instance publishes its own users' changed segments (the internal assignments topic, and
//! `[kafka] changes_topic` / `assignments_topic` when set) once per version, against the
//! segments the assignments topic holds; the coordinator claims every version on the models
//! topic before its rounds, so no version number is ever given twice, even when a coordinator
//! dies half-way.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use ndarray::Array2;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::KafkaConfig;
use crate::engine::cluster::{
    self, ClusterModel, ClusterParams, LocalParticipant, Participant, Rounds,
};
use crate::engine::kmeans::LloydPartial;
use crate::engine::stats::{CovarianceStats, GramShare};
use crate::engine::{CowVec, EngineParams, Ids, SegmentSums, SparseVec};
use crate::kafka::changes::ChangeRecord;
use crate::kafka::client_config;
use crate::snapshot::group::{self as group_snapshot, Describe, GroupSnapshotInput, Holdout};
use crate::snapshot::validation::{NaiveBayes, NaiveBayesTally};
use crate::snapshot::{Snapshot, SnapshotParams, drift_of_flows};

/// How long the coordinator waits for every instance's answer to one round.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest round message: an eigensolver block of 20 columns over 400,000 items.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The group's internal topics, named after `[kafka] group_id`.
#[derive(Debug, Clone)]
pub struct GroupTopics {
    pub rounds: String,
    pub partials: String,
    pub models: String,
    pub assignments: String,
    /// `[kafka] changes_topic` and `assignments_topic`, when set: the user-facing feed.
    pub changes_feed: Option<String>,
    pub assignments_feed: Option<String>,
    /// `[kafka] snapshots_topic`, when set.
    pub snapshots: Option<String>,
}

impl GroupTopics {
    pub fn of(kafka: &KafkaConfig) -> GroupTopics {
        GroupTopics {
            rounds: format!("{}-rounds", kafka.group_id),
            partials: format!("{}-partials", kafka.group_id),
            models: format!("{}-models", kafka.group_id),
            assignments: format!("{}-assignments", kafka.group_id),
            changes_feed: named(&kafka.changes_topic),
            assignments_feed: named(&kafka.assignments_topic),
            snapshots: named(&kafka.snapshots_topic),
        }
    }
}

fn named(topic: &str) -> Option<String> {
    (!topic.is_empty()).then(|| topic.to_string())
}

/// One instance's users as of a cut: rows by local user and item index, and the next offset of
/// each partition it owns that they cover.
pub struct Shard {
    pub users: Ids,
    pub items: Ids,
    pub vectors: CowVec<SparseVec>,
    pub offsets: BTreeMap<i32, i64>,
    /// Users of those partitions whose every rating is gone (they leave the segments).
    pub emptied: Vec<String>,
}

/// What the coordinator asks in a round.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Ask {
    /// Take a view; answer its offsets, item ids and statistics (sums, then squares).
    Cut,
    /// The group's items in order (the index every later round uses), and who takes part.
    Items {
        items: Vec<String>,
        instances: Vec<String>,
    },
    /// `Xᵀ(X Qᵀ)` for the block `Q` in the floats (`rows x items`).
    Gram { rows: usize },
    /// Project onto the basis in the floats (`rows x items`).
    Project { rows: usize },
    /// The users whose id hashes below `share`, with their projections.
    Sample { share: f64, seed: u64 },
    /// A Lloyd pass for the centroids in the floats.
    Lloyd,
    /// Your users counted by (segment, previous segment in the assignments topic): `k x k`.
    Overlap { k: usize },
    /// Rename your users' segments: `mapping[segment]` is the new id.
    Relabel { mapping: Vec<u32> },
    /// The segments' sums of your users over the group's `items` items.
    Sums {
        k: usize,
        items: usize,
        holdout: Holdout,
    },
    /// Your users' summed tf-idf rows and Naive Bayes counts under the idf (`items`) and the
    /// two fits (each `k + items x k`) in the floats.
    Describe { k: usize, holdout: Holdout },
    /// The model is solved as `version`: publish the segments of your users that changed, and
    /// count them by (previous segment, segment).
    Assign { version: u64, created_at: String },
    /// The snapshot is over: drop the view.
    Done,
}

#[derive(Debug, Serialize, Deserialize)]
struct AskHead {
    snapshot: String,
    round: u32,
    ask: Ask,
    #[serde(default)]
    part: Part,
}

/// Which part of a message this is: floats larger than `[kafka] group_part_bytes` go out in
/// parts, each with the whole header and a slice of the floats, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Part {
    part: u32,
    parts: u32,
}

impl Part {
    const WHOLE: Part = Part { part: 0, parts: 1 };
}

impl Default for Part {
    fn default() -> Self {
        Part::WHOLE
    }
}

/// An instance's answer to a round.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Cut {
        offsets: BTreeMap<i32, i64>,
        items: Vec<String>,
        users: u64,
        ratings: u64,
    },
    Ack,
    Gram,
    Sample {
        hashes: Vec<u64>,
    },
    Lloyd {
        counts: Vec<u64>,
        inertia: f64,
        moved: u64,
    },
    Overlap,
    Sums,
    Described {
        tally: NaiveBayesTally,
    },
    Assigned {
        published: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct AnswerHead {
    snapshot: String,
    round: u32,
    instance: String,
    // Not flattened: serde cannot read the integer keys of a flattened map back.
    answer: Answer,
    #[serde(default)]
    part: Part,
}

/// A message: the header's JSON length (u32), the JSON, then the floats (f64, little-endian):
/// blocks and partials travel bit for bit.
fn encode<H: Serialize>(head: &H, floats: &[f64]) -> anyhow::Result<Vec<u8>> {
    let json = serde_json::to_vec(head)?;
    let mut out = Vec::with_capacity(4 + json.len() + 8 * floats.len());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    for x in floats {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

/// The messages carrying `floats` at most `per_part` to a message, each under the header
/// `head` gives for its part.
fn encode_parts<H: Serialize>(
    floats: &[f64],
    per_part: usize,
    head: impl Fn(Part) -> H,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let per_part = per_part.max(1);
    let parts = floats.len().div_ceil(per_part).max(1);
    (0..parts)
        .map(|p| {
            let slice =
                &floats[(p * per_part).min(floats.len())..((p + 1) * per_part).min(floats.len())];
            let part = Part {
                part: p as u32,
                parts: parts as u32,
            };
            encode(&head(part), slice)
        })
        .collect()
}

/// One message's parts as they arrive (in order, from one sender).
#[derive(Debug, Default)]
struct Assembly {
    floats: Vec<f64>,
    next: u32,
}

impl Assembly {
    /// Adds part `part`; the whole floats once it was the last. A part out of order starts
    /// over (a sender that restarted its message).
    fn add(&mut self, part: Part, floats: Vec<f64>) -> Option<Vec<f64>> {
        if part.part == 0 {
            self.floats.clear();
            self.next = 0;
        }
        if part.part != self.next {
            self.floats.clear();
            self.next = 0;
            return None;
        }
        self.floats.extend(floats);
        self.next += 1;
        (self.next >= part.parts).then(|| std::mem::take(&mut self.floats))
    }
}

fn decode<H: DeserializeOwned>(bytes: &[u8]) -> Option<(H, Vec<f64>)> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let head = serde_json::from_slice(bytes.get(4..4 + len)?).ok()?;
    let rest = bytes.get(4 + len..)?;
    if rest.len() % 8 != 0 {
        return None;
    }
    let floats = rest
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    Some((head, floats))
}

/// The model of the whole group at one cut of the ratings topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupModel {
    pub version: u64,
    pub created_at: String,
    /// Per partition, the next offset the model covers: every event below it, none above.
    pub offsets: BTreeMap<i32, i64>,
    /// Messages the cut covers (the offsets' sum).
    pub messages_covered: u64,
    pub instances: Vec<String>,
    pub users: u64,
    pub items: usize,
    pub ratings: u64,
    pub total_variance: f64,
    pub eigenvalues: Vec<f64>,
    pub explained_variance_ratio: Vec<f64>,
    /// `clusters x components`, row-major.
    pub centroids: Vec<f64>,
    pub sizes: Vec<u64>,
    pub inertia: f64,
    pub rounds: Rounds,
    /// Users whose segment this version changed (published to the assignments topic).
    pub assignments_changed: u64,
    pub seconds: f64,
    /// The group's snapshot of this version: what every instance serves at `/snapshots`.
    pub snapshot: Snapshot,
}

/// The models topic's record of the last version a coordinator started (key `claim`): the next
/// coordinator numbers above it, so a version whose rounds failed half-way is never reused.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Claim {
    claimed_version: u64,
}

/// A user's segment in the group model, as the assignments topic holds it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroupAssignment {
    pub segment: u32,
    /// The group model version that gave it.
    pub version: u64,
    /// Distance to the segment's centroid in the PCA space, at that version.
    #[serde(default)]
    pub distance: Option<f64>,
}

/// How far an instance has read the assignments topic (its next offset), and the highest
/// version claimed on the models topic: what instances wait on before they compare segments
/// and number versions.
#[derive(Debug, Default)]
pub struct GroupProgress {
    pub assignments_read: std::sync::atomic::AtomicI64,
    pub claimed: std::sync::atomic::AtomicU64,
}

/// Every user's segment in the group model, read from the assignments topic.
pub type GroupAssignments = Arc<RwLock<FxHashMap<String, GroupAssignment>>>;

/// The latest group model an instance has read.
pub type GroupSlot = Arc<RwLock<Option<Arc<GroupModel>>>>;

fn producer(kafka: &KafkaConfig) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    client_config(kafka)
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
        .set("compression.type", "lz4")
        .create()
        .context("cannot create the group rounds producer")
}

/// A consumer of `topic`'s partition 0 from its current end (`from_end`) or its beginning.
fn reader(kafka: &KafkaConfig, topic: &str, from_end: bool) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = client_config(kafka)
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.max.bytes", (2 * MAX_MESSAGE_BYTES).to_string())
        .set("max.partition.fetch.bytes", MAX_MESSAGE_BYTES.to_string())
        .set(
            "receive.message.max.bytes",
            (2 * MAX_MESSAGE_BYTES + 1024).to_string(),
        )
        .create()
        .context("cannot create a group rounds reader")?;
    let start = if from_end {
        // The end as it is now, not whenever the first fetch happens: nothing sent after this
        // call is missed.
        let (_, high) = consumer.fetch_watermarks(topic, 0, ROUND_TIMEOUT)?;
        Offset::Offset(high)
    } else {
        Offset::Beginning
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, start)?;
    consumer.assign(&tpl)?;
    Ok(consumer)
}

fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    send_or_tombstone(producer, topic, key, Some(payload))
}

/// `payload` under `key` on `topic`, or a tombstone (the compacted topics forget the key).
fn send_or_tombstone(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    payload: Option<&[u8]>,
) -> anyhow::Result<()> {
    crate::kafka::send_queued(producer, (topic, None), key.as_bytes(), payload, || Ok(()))
}

/// Creates the group's topics: rounds and partials (one partition each, messages up to
/// [`MAX_MESSAGE_BYTES`], kept an hour) and the compacted models topic.
pub async fn ensure_topics(kafka: &KafkaConfig) -> anyhow::Result<()> {
    let topics = GroupTopics::of(kafka);
    let max = MAX_MESSAGE_BYTES.to_string();
    crate::kafka::ensure_topic_with(
        kafka,
        &topics.assignments,
        1,
        &[("cleanup.policy", "compact")],
    )
    .await?;
    for topic in [&topics.rounds, &topics.partials] {
        crate::kafka::ensure_topic_with(
            kafka,
            topic,
            1,
            &[("max.message.bytes", &max), ("retention.ms", "3600000")],
        )
        .await?;
    }
    if let Some(topic) = &topics.changes_feed {
        crate::kafka::ensure_topic_with(kafka, topic, 1, &[]).await?;
    }
    if let Some(topic) = &topics.assignments_feed {
        crate::kafka::ensure_topic_with(kafka, topic, 1, &[("cleanup.policy", "compact")]).await?;
    }
    if let Some(topic) = &topics.snapshots {
        crate::kafka::ensure_topic_with(kafka, topic, 1, &[("max.message.bytes", &max)]).await?;
    }
    crate::kafka::ensure_topic_with(
        kafka,
        &topics.models,
        1,
        &[("cleanup.policy", "compact"), ("max.message.bytes", &max)],
    )
    .await
}

/// Waits until this instance's reader of the assignments topic has read everything the topic
/// held when called (`consumer` only asks the broker for the end).
fn catch_up(
    consumer: &BaseConsumer,
    topics: &GroupTopics,
    progress: &GroupProgress,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let (_, end) = consumer.fetch_watermarks(&topics.assignments, 0, ROUND_TIMEOUT)?;
    let deadline = Instant::now() + ROUND_TIMEOUT / 2;
    while progress.assignments_read.load(Relaxed) < end {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the assignments topic is not read up to {end} within {:?}",
            ROUND_TIMEOUT / 2
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// An instance's side: answers every round from the view it took at the cut.
pub struct Responder {
    instance: String,
    topics: GroupTopics,
    consumer: BaseConsumer,
    producer: ThreadedProducer<DefaultProducerContext>,
    /// The snapshot being answered, its view, and (from the items round on) the participant.
    current: Option<(String, Shard, Option<LocalParticipant>)>,
    /// Every user's segment, as this instance read it from the assignments topic.
    assignments: GroupAssignments,
    progress: Arc<GroupProgress>,
    /// The last cut's answer and the offsets it covered: the same offsets mean the same rows
    /// (state is a function of the events below them), so an idle group's cuts cost no pass
    /// over the ratings.
    last_cut: Option<(BTreeMap<i32, i64>, Answer, Vec<f64>)>,
    /// `[kafka] group_part_bytes` in floats.
    part_floats: usize,
    /// The parts of the ask being received: its snapshot and round, and the floats so far.
    ask_parts: Option<((String, u32), Assembly)>,
}

impl Responder {
    pub fn new(
        kafka: &KafkaConfig,
        instance: &str,
        assignments: GroupAssignments,
        progress: Arc<GroupProgress>,
    ) -> anyhow::Result<Responder> {
        let topics = GroupTopics::of(kafka);
        Ok(Responder {
            instance: instance.to_string(),
            consumer: reader(kafka, &topics.rounds, true)?,
            producer: producer(kafka)?,
            topics,
            current: None,
            assignments,
            progress,
            last_cut: None,
            part_floats: kafka.group_part_bytes / 8,
            ask_parts: None,
        })
    }

    /// Publishes the segments of this snapshot's users that differ from the ones the
    /// assignments topic holds (read up to its end first): to that topic (key = user id, a
    /// [`GroupAssignment`]) and to the user-facing feed topics when set, and a tombstone (a
    /// change to no segment) for each of its users who had a segment and no rating is left of;
    /// waits for the broker. Answers how many it published.
    fn assign(&mut self, version: u64, created_at: &str) -> anyhow::Result<Option<Answer>> {
        let Some((_, view, Some(participant))) = self.current.as_ref() else {
            return Ok(None);
        };
        catch_up(&self.consumer, &self.topics, &self.progress)?;
        let assignments = participant.assignments();
        // Each user whose segment differs: a change, to no segment for one who left.
        let mut changes = vec![];
        {
            let previous = self
                .assignments
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let change = |user: &str, from, to, distance: Option<f64>| ChangeRecord {
                user: user.to_string(),
                from,
                to,
                version,
                created_at: created_at.to_string(),
                distance,
                resegmented: false,
            };
            for (user, segment, distance) in &assignments {
                let before = previous.get(user).map(|a| a.segment);
                if before != Some(*segment) {
                    let distance = distance.is_finite().then_some(*distance);
                    changes.push(change(user, before, Some(*segment), distance));
                }
            }
            for user in &view.emptied {
                if let Some(before) = previous.get(user) {
                    changes.push(change(user, Some(before.segment), None, None));
                }
            }
        }
        for change in &changes {
            let internal = change
                .to
                .map(|segment| {
                    serde_json::to_vec(&GroupAssignment {
                        segment,
                        version,
                        distance: change.distance,
                    })
                })
                .transpose()?;
            let user = change.user.as_str();
            send_or_tombstone(
                &self.producer,
                &self.topics.assignments,
                user,
                internal.as_deref(),
            )?;
            crate::kafka::changes::publish_change(
                change,
                self.topics.changes_feed.as_deref(),
                self.topics.assignments_feed.as_deref(),
                |topic, value| send_or_tombstone(&self.producer, topic, user, value),
            )?;
        }
        self.producer.flush(ROUND_TIMEOUT)?;
        Ok(Some(Answer::Assigned {
            published: changes.len() as u64,
        }))
    }

    /// This snapshot's users counted by (segment, segment the assignments topic holds), the
    /// topic read to its end first.
    fn overlap(&self, k: usize) -> anyhow::Result<Option<Vec<f64>>> {
        let Some((_, _, Some(participant))) = self.current.as_ref() else {
            return Ok(None);
        };
        catch_up(&self.consumer, &self.topics, &self.progress)?;
        let previous = self
            .assignments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(Some(
            participant.overlap(k, |id| previous.get(id).map(|a| a.segment)),
        ))
    }

    /// Waits up to `wait` for the next round and answers it; `shard` takes the view at a cut.
    pub fn step(
        &mut self,
        wait: Duration,
        shard: &mut impl FnMut() -> anyhow::Result<Shard>,
    ) -> anyhow::Result<()> {
        let Some(message) = self.consumer.poll(wait) else {
            return Ok(());
        };
        let message = message?;
        let Some((head, floats)) = message.payload().and_then(decode::<AskHead>) else {
            tracing::warn!("a message on the rounds topic segmenter did not write: skipped");
            return Ok(());
        };
        let AskHead {
            snapshot,
            round,
            ask,
            part,
        } = head;
        let floats = if part == Part::WHOLE {
            floats
        } else {
            let key = (snapshot.clone(), round);
            let assembly = match &mut self.ask_parts {
                Some((k, a)) if *k == key => a,
                slot => &mut slot.insert((key, Assembly::default())).1,
            };
            match assembly.add(part, floats) {
                Some(whole) => {
                    self.ask_parts = None;
                    whole
                }
                None => return Ok(()),
            }
        };
        tracing::debug!(snapshot, round, "group round asked");
        let answer = match ask {
            Ask::Cut => {
                let view = shard()?;
                let answered = match &self.last_cut {
                    Some((offsets, answer, floats)) if *offsets == view.offsets => {
                        tracing::debug!(
                            snapshot,
                            "group cut unchanged: answered from the last one"
                        );
                        (answer.clone(), floats.clone())
                    }
                    _ => {
                        let d = view.items.len();
                        let stats = CovarianceStats::from_vectors(view.vectors.iter(), d);
                        let mut floats = stats.sums().to_vec();
                        floats.extend_from_slice(stats.squares());
                        let answer = Answer::Cut {
                            offsets: view.offsets.clone(),
                            items: view.items.iter().cloned().collect(),
                            users: stats.users(),
                            ratings: view.vectors.ratings() as u64,
                        };
                        self.last_cut =
                            Some((view.offsets.clone(), answer.clone(), floats.clone()));
                        (answer, floats)
                    }
                };
                self.current = Some((snapshot.clone(), view, None));
                Some(answered)
            }
            Ask::Done => {
                if self.current.as_ref().is_some_and(|c| c.0 == snapshot) {
                    self.current = None;
                }
                None
            }
            Ask::Overlap { k } => {
                if self.current.as_ref().is_none_or(|c| c.0 != snapshot) {
                    return Ok(());
                }
                self.overlap(k)?.map(|floats| (Answer::Overlap, floats))
            }
            Ask::Assign {
                version,
                created_at,
            } => {
                if self.current.as_ref().is_none_or(|c| c.0 != snapshot) {
                    return Ok(());
                }
                self.assign(version, &created_at)?.map(|a| (a, vec![]))
            }
            ask => {
                let Some((current, view, participant)) = self.current.as_mut() else {
                    return Ok(());
                };
                if *current != snapshot {
                    return Ok(());
                }
                answer_round(&self.instance, ask, &floats, view, participant)
            }
        };
        if let Some((answer, floats)) = answer {
            let messages = encode_parts(&floats, self.part_floats, |part| AnswerHead {
                snapshot: snapshot.clone(),
                round,
                instance: self.instance.clone(),
                answer: answer.clone(),
                part,
            })?;
            for bytes in messages {
                send(
                    &self.producer,
                    &self.topics.partials,
                    &self.instance,
                    &bytes,
                )?;
            }
        }
        Ok(())
    }
}

/// An answer to a round after the cut, from `view` and its `participant` (made at the items
/// round); `None` for a round this instance takes no part in.
fn answer_round(
    instance: &str,
    ask: Ask,
    floats: &[f64],
    view: &Shard,
    participant: &mut Option<LocalParticipant>,
) -> Option<(Answer, Vec<f64>)> {
    if let Ask::Items { items, instances } = &ask {
        if !instances.iter().any(|i| i == instance) {
            *participant = None;
            return None;
        }
        *participant = Some(remapped(view, items));
        return Some((Answer::Ack, vec![]));
    }
    let participant = participant.as_mut()?;
    let items = participant_items(floats, &ask);
    match ask {
        Ask::Gram { rows } => {
            let block = Array2::from_shape_vec((rows, items?), floats.to_vec()).ok()?;
            Some((Answer::Gram, participant.gram(&block)))
        }
        Ask::Project { rows } => {
            let basis = Array2::from_shape_vec((rows, items?), floats.to_vec()).ok()?;
            participant.project(&basis);
            Some((Answer::Ack, vec![]))
        }
        Ask::Sample { share, seed } => {
            let sample = participant.sample(share, seed);
            let hashes = sample.iter().map(|(h, _)| *h).collect();
            let floats = sample.into_iter().flat_map(|(_, z)| z).collect();
            Some((Answer::Sample { hashes }, floats))
        }
        Ask::Lloyd => {
            let partial = participant.lloyd(floats);
            Some((
                Answer::Lloyd {
                    counts: partial.counts,
                    inertia: partial.inertia,
                    moved: partial.moved,
                },
                partial.sums,
            ))
        }
        Ask::Relabel { mapping } => {
            participant.relabel(&mapping);
            Some((Answer::Ack, vec![]))
        }
        Ask::Sums { k, items, holdout } => {
            let sums = participant.segment_sums(k, items, holdout);
            Some((Answer::Sums, sums.to_floats()))
        }
        Ask::Describe { k, holdout } => {
            let (idf, full, partial) = fits(floats, k)?;
            let (scores, tally) = participant.describe(&idf, &full, &partial, holdout);
            Some((Answer::Described { tally }, scores))
        }
        Ask::Cut | Ask::Items { .. } | Ask::Overlap { .. } | Ask::Assign { .. } | Ask::Done => None,
    }
}

/// The idf and the two Naive Bayes fits of a describe round's floats: `items`, then
/// `k + items x k` twice.
fn fits(floats: &[f64], k: usize) -> Option<(Vec<f64>, NaiveBayes, NaiveBayes)> {
    let d = floats.len().checked_sub(2 * k)? / (2 * k + 1);
    if d + 2 * (k + d * k) != floats.len() {
        return None;
    }
    let (idf, fits) = floats.split_at(d);
    let (full, partial) = fits.split_at(k + d * k);
    Some((
        idf.to_vec(),
        NaiveBayes::from_floats(k, full, 1.0)?,
        NaiveBayes::from_floats(k, partial, 1.0)?,
    ))
}

/// The item count a block or basis of `floats` spans (`rows x items`).
fn participant_items(floats: &[f64], ask: &Ask) -> Option<usize> {
    match ask {
        Ask::Gram { rows } | Ask::Project { rows } if *rows > 0 => Some(floats.len() / rows),
        _ => None,
    }
}

/// `view`'s users over the group's `items` (their order is the index every round uses).
fn remapped(view: &Shard, items: &[String]) -> LocalParticipant {
    let global: FxHashMap<&str, u32> = items
        .iter()
        .enumerate()
        .map(|(g, id)| (id.as_str(), g as u32))
        .collect();
    let local_to_global: Vec<u32> = view
        .items
        .iter()
        .map(|id| global.get(id.as_str()).copied().unwrap_or(u32::MAX))
        .collect();
    let mut ids = Vec::with_capacity(view.users.len());
    let mut rows = Vec::with_capacity(view.users.len());
    for (u, x) in view.vectors.iter().enumerate() {
        if x.nnz() == 0 {
            continue;
        }
        let mut cells: Vec<(u32, f64)> = x
            .iter()
            .map(|(j, v)| (local_to_global[j as usize], v))
            .filter(|&(g, _)| g != u32::MAX)
            .collect();
        cells.sort_unstable_by_key(|&(g, _)| g);
        ids.push(view.users.id(u as u32).to_string());
        rows.push(SparseVec {
            idx: cells.iter().map(|&(g, _)| g).collect(),
            val: cells.iter().map(|&(_, v)| v).collect(),
        });
    }
    LocalParticipant::new(ids, rows)
}

/// The coordinator's side: the rounds of one group model.
pub struct Coordinator {
    instance: String,
    topics: GroupTopics,
    partitions: i32,
    consumer: BaseConsumer,
    producer: ThreadedProducer<DefaultProducerContext>,
    /// The ratings topic (the snapshot's offsets are keyed `topic/partition`).
    ratings_topic: String,
    snapshot: SnapshotParams,
    progress: Arc<GroupProgress>,
    /// The last version this coordinator claimed.
    claimed: u64,
    /// `[kafka] group_part_bytes` in floats.
    part_floats: usize,
}

/// What a cut gathered.
struct Cut {
    offsets: BTreeMap<i32, i64>,
    instances: Vec<String>,
    items: Vec<String>,
    stats: CovarianceStats,
    ratings: u64,
}

impl Coordinator {
    /// A coordinator of a group whose ratings topic has `partitions` partitions.
    pub fn new(
        kafka: &KafkaConfig,
        instance: &str,
        partitions: i32,
        snapshot: SnapshotParams,
        progress: Arc<GroupProgress>,
    ) -> anyhow::Result<Self> {
        let topics = GroupTopics::of(kafka);
        Ok(Coordinator {
            instance: instance.to_string(),
            consumer: reader(kafka, &topics.partials, true)?,
            producer: producer(kafka)?,
            topics,
            partitions,
            ratings_topic: kafka.topic.clone(),
            snapshot,
            progress,
            claimed: 0,
            part_floats: kafka.group_part_bytes / 8,
        })
    }

    /// Sends `ask` as round `round` of `snapshot` and gathers the answers of `from` (any
    /// instance's when `None`, until `enough` says they suffice).
    fn round(
        &self,
        snapshot: &str,
        round: u32,
        ask: Ask,
        floats: &[f64],
        from: Option<&BTreeSet<String>>,
        enough: impl Fn(&[(AnswerHead, Vec<f64>)]) -> bool,
    ) -> anyhow::Result<Vec<(AnswerHead, Vec<f64>)>> {
        let messages = encode_parts(floats, self.part_floats, |part| AskHead {
            snapshot: snapshot.to_string(),
            round,
            ask: ask.clone(),
            part,
        })?;
        for bytes in messages {
            send(&self.producer, &self.topics.rounds, &self.instance, &bytes)?;
        }
        let started = Instant::now();
        let deadline = started + ROUND_TIMEOUT;
        let mut answers: Vec<(AnswerHead, Vec<f64>)> = vec![];
        let mut assemblies: BTreeMap<String, Assembly> = BTreeMap::new();
        loop {
            let done = match from {
                Some(from) => answers.len() == from.len(),
                None => enough(&answers),
            };
            if done {
                tracing::debug!(
                    snapshot,
                    round,
                    seconds = started.elapsed().as_secs_f64(),
                    "group round answered"
                );
                return Ok(answers);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(
                !left.is_zero(),
                "round {round} of {snapshot}: {} of {} answers within {ROUND_TIMEOUT:?}",
                answers.len(),
                from.map_or(0, BTreeSet::len)
            );
            let Some(message) = self.consumer.poll(left.min(Duration::from_millis(100))) else {
                continue;
            };
            let message = message?;
            let Some((answer, floats)) = message.payload().and_then(decode::<AnswerHead>) else {
                continue;
            };
            let wanted = answer.snapshot == snapshot
                && answer.round == round
                && from.is_none_or(|f| f.contains(&answer.instance))
                && !answers.iter().any(|(a, _)| a.instance == answer.instance);
            if !wanted {
                continue;
            }
            if answer.part == Part::WHOLE {
                answers.push((answer, floats));
            } else if let Some(whole) = assemblies
                .entry(answer.instance.clone())
                .or_default()
                .add(answer.part, floats)
            {
                answers.push((answer, whole));
            }
        }
    }

    /// The cut: every instance's view, until their partitions cover the topic exactly once.
    fn cut(&self, snapshot: &str) -> anyhow::Result<Cut> {
        let partitions = self.partitions;
        let covered = |answers: &[(AnswerHead, Vec<f64>)]| {
            let owned: Vec<i32> = answers
                .iter()
                .flat_map(|(a, _)| match &a.answer {
                    Answer::Cut { offsets, .. } => offsets.keys().copied().collect(),
                    _ => vec![],
                })
                .collect();
            owned.len() as i32 >= partitions
        };
        let answers = self.round(snapshot, 0, Ask::Cut, &[], None, covered)?;
        let mut offsets = BTreeMap::new();
        let mut parts = vec![];
        for (head, floats) in answers {
            let Answer::Cut {
                offsets: theirs,
                items,
                users,
                ratings,
            } = head.answer
            else {
                continue;
            };
            if theirs.is_empty() {
                continue;
            }
            for (p, o) in theirs {
                anyhow::ensure!(
                    offsets.insert(p, o).is_none(),
                    "partition {p} is held by two instances (a rebalance is under way)"
                );
            }
            parts.push((head.instance, items, users, ratings, floats));
        }
        let missing: Vec<i32> = (0..partitions)
            .filter(|p| !offsets.contains_key(p))
            .collect();
        anyhow::ensure!(
            missing.is_empty(),
            "partitions {missing:?} are held by no instance (a rebalance is under way)"
        );
        let mut items: Vec<String> = parts
            .iter()
            .flat_map(|(_, items, ..)| items.iter().cloned())
            .collect::<BTreeSet<String>>()
            .into_iter()
            .collect();
        items.shrink_to_fit();
        let index: FxHashMap<&str, usize> = items
            .iter()
            .enumerate()
            .map(|(g, id)| (id.as_str(), g))
            .collect();
        let d = items.len();
        let (mut users, mut ratings) = (0, 0);
        let (mut sums, mut squares) = (vec![0.0; d], vec![0.0; d]);
        for (_, theirs, n, r, floats) in &parts {
            users += n;
            ratings += r;
            let local = theirs.len();
            anyhow::ensure!(floats.len() == 2 * local, "a cut answer of the wrong size");
            for (l, id) in theirs.iter().enumerate() {
                let g = index[id.as_str()];
                sums[g] += floats[l];
                squares[g] += floats[local + l];
            }
        }
        let instances = parts.into_iter().map(|(i, ..)| i).collect();
        Ok(Cut {
            offsets,
            instances,
            stats: CovarianceStats::from_parts(users, sums, squares),
            items,
            ratings,
        })
    }

    /// One group model and its snapshot: the cut, the engine's cold solve with every call a
    /// round, the segments described, every user's segment published. `None` when the cut
    /// covers exactly what `previous` did (nothing new since). The version is the next one
    /// above `previous` and every claim, claimed before the rounds that publish anything.
    pub fn solve(
        &mut self,
        params: &EngineParams,
        previous: Option<&GroupModel>,
        titles: &FxHashMap<String, String>,
    ) -> anyhow::Result<Option<GroupModel>> {
        use std::sync::atomic::Ordering::Relaxed;
        let started = Instant::now();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let snapshot = format!("{}-{nanos}", self.instance);
        let cut = self.cut(&snapshot);
        let cut = match cut {
            Ok(cut) if previous.map(|p| &p.offsets) != Some(&cut.offsets) => cut,
            other => {
                self.done(&snapshot);
                return other.map(|_| None);
            }
        };
        let version = previous
            .map_or(0, |m| m.version)
            .max(self.progress.claimed.load(Relaxed))
            .max(self.claimed)
            + 1;
        if let Err(e) = self.claim(version) {
            self.done(&snapshot);
            return Err(e);
        }
        let created_at = crate::snapshot::now_rfc3339();
        let group = RemoteGroup {
            coordinator: self,
            snapshot: snapshot.clone(),
            instances: cut.instances.iter().cloned().collect(),
            items: cut.items.len(),
            stats: cut.stats.clone(),
            ratings: cut.ratings as usize,
            round: RefCell::new(1),
            error: RefCell::new(None),
        };
        let holdout = Holdout {
            percent: self.snapshot.holdout_percent,
            seed: params.seed,
        };
        let solved = group.items_round(&cut.items).and_then(|()| {
            let cluster_params = ClusterParams::for_engine(params, cut.stats.users());
            let mut participants = [group];
            let model = cluster::solve(&mut participants, cut.items.len(), &cluster_params);
            let [group] = participants;
            let mut model = model.context("fewer users than segments: no group model yet")?;
            let k = model.sizes.len();
            let solved_at = *group.round.borrow();
            // A cold solve names its segments anew: keep the previous model's names for the
            // users that stay together, so the feed carries moves, not renamings.
            let flows = if previous.is_some() {
                group.rename_after_previous(&mut model)
            } else {
                BTreeMap::new()
            };
            let description =
                group_snapshot::describe(std::slice::from_ref(&group), k, cut.items.len(), holdout);
            // Every user's segment goes out before the model names its version.
            let changed: u64 = group
                .ask(
                    Ask::Assign {
                        version,
                        created_at: created_at.clone(),
                    },
                    &[],
                )
                .iter()
                .map(|(answer, _)| match answer {
                    Answer::Assigned { published } => *published,
                    _ => 0,
                })
                .sum();
            model.rounds.snapshot = (*group.round.borrow() - solved_at) as usize;
            match group.error.into_inner() {
                Some(e) => Err(e),
                None => Ok((model, description, changed, flows)),
            }
        });
        self.done(&snapshot);
        let (model, description, assignments_changed, flows) = solved?;
        let messages_covered = cut.offsets.values().map(|&o| o.max(0) as u64).sum();
        let group_snapshot = group_snapshot::group_snapshot(
            &model,
            &cut.stats,
            &description,
            GroupSnapshotInput {
                version,
                created_at: created_at.clone(),
                offsets: cut
                    .offsets
                    .iter()
                    .map(|(&p, &o)| (crate::kafka::offset_key(&self.ratings_topic, p), o))
                    .collect(),
                items: &cut.items,
                titles,
                params: &self.snapshot,
                mode: params.mode,
                transform: params.transform,
                ratings: cut.ratings,
                events_applied: messages_covered,
                drift: previous.map(|p| drift_of_flows(p.version, flows)),
            },
        );
        let pca = &group_snapshot.pca;
        Ok(Some(GroupModel {
            version,
            created_at,
            messages_covered,
            offsets: cut.offsets,
            instances: cut.instances,
            users: model.users,
            items: cut.items.len(),
            ratings: cut.ratings,
            total_variance: pca.total_variance,
            explained_variance_ratio: pca.explained_variance_ratio.clone(),
            eigenvalues: pca.explained_variance.clone(),
            centroids: model.centroids,
            sizes: model.sizes,
            inertia: model.inertia,
            rounds: model.rounds,
            assignments_changed,
            seconds: started.elapsed().as_secs_f64(),
            snapshot: group_snapshot,
        }))
    }

    /// Records on the models topic that `version` is taken (waiting for the broker).
    fn claim(&mut self, version: u64) -> anyhow::Result<()> {
        let json = serde_json::to_vec(&Claim {
            claimed_version: version,
        })?;
        send(&self.producer, &self.topics.models, "claim", &json)?;
        self.producer.flush(ROUND_TIMEOUT)?;
        self.claimed = version;
        Ok(())
    }

    /// The model after `latest` (the last one published): solved and published, unless the
    /// cut has not moved since (`None`).
    pub fn next_model(
        &mut self,
        params: &EngineParams,
        latest: Option<&GroupModel>,
        titles: &FxHashMap<String, String>,
    ) -> anyhow::Result<Option<GroupModel>> {
        let Some(model) = self.solve(params, latest, titles)? else {
            return Ok(None);
        };
        self.publish(&model)
            .context("cannot publish the group model")?;
        Ok(Some(model))
    }

    /// Publishes `model` to the models topic, and its snapshot to `[kafka] snapshots_topic`
    /// when set (keyed by version, as a single instance publishes them), waiting for the
    /// broker's acknowledgements.
    fn publish(&self, model: &GroupModel) -> anyhow::Result<()> {
        let json = serde_json::to_vec(model)?;
        send(&self.producer, &self.topics.models, "model", &json)?;
        if let Some(topic) = &self.topics.snapshots {
            let json = serde_json::to_vec(&model.snapshot)?;
            send(&self.producer, topic, &model.version.to_string(), &json)?;
        }
        Ok(self.producer.flush(ROUND_TIMEOUT)?)
    }

    fn done(&self, snapshot: &str) {
        let head = AskHead {
            snapshot: snapshot.to_string(),
            round: u32::MAX,
            ask: Ask::Done,
            part: Part::WHOLE,
        };
        if let Ok(bytes) = encode(&head, &[]) {
            let _ = send(&self.producer, &self.topics.rounds, &self.instance, &bytes);
        }
    }
}

/// Every instance of a cut as one [`Participant`]: each call is a round, the answers added up.
/// A failed round is kept in `error` (the trait's calls cannot fail) and the solve's result
/// thrown away.
struct RemoteGroup<'a> {
    coordinator: &'a Coordinator,
    snapshot: String,
    instances: BTreeSet<String>,
    items: usize,
    stats: CovarianceStats,
    ratings: usize,
    round: RefCell<u32>,
    error: RefCell<Option<anyhow::Error>>,
}

impl RemoteGroup<'_> {
    fn ask(&self, ask: Ask, floats: &[f64]) -> Vec<(Answer, Vec<f64>)> {
        if self.error.borrow().is_some() {
            return vec![];
        }
        let round = {
            let mut r = self.round.borrow_mut();
            *r += 1;
            *r
        };
        match self.coordinator.round(
            &self.snapshot,
            round,
            ask,
            floats,
            Some(&self.instances),
            |_| false,
        ) {
            Ok(answers) => answers.into_iter().map(|(h, f)| (h.answer, f)).collect(),
            Err(e) => {
                *self.error.borrow_mut() = Some(e);
                vec![]
            }
        }
    }

    /// The renaming of the `k` new segments that keeps most users under their previous
    /// segment's id, applied at every instance; `None` when it renames nothing.
    /// Renames `model`'s segments (and every instance's) by the match that keeps most users
    /// under their previous segment's id. Returns the users by (previous segment, segment), the
    /// drift's flows.
    fn rename_after_previous(&self, model: &mut ClusterModel) -> BTreeMap<(u32, u32), u64> {
        let k = model.sizes.len();
        let mut overlap = vec![0.0; k * k];
        for (_, theirs) in self.ask(Ask::Overlap { k }, &[]) {
            if theirs.len() != overlap.len() {
                self.error
                    .borrow_mut()
                    .get_or_insert_with(|| anyhow::anyhow!("an overlap answer of the wrong size"));
                return BTreeMap::new();
            }
            overlap.iter_mut().zip(&theirs).for_each(|(a, b)| *a += b);
        }
        let mapping = crate::engine::matching::match_overlap(&overlap, k);
        if mapping.iter().enumerate().any(|(c, &m)| c as u32 != m) {
            self.ask(
                Ask::Relabel {
                    mapping: mapping.clone(),
                },
                &[],
            );
            model.relabel(&mapping);
        }
        let mut flows = BTreeMap::new();
        for (c, &renamed) in mapping.iter().enumerate() {
            for previous in 0..k {
                let users = overlap[c * k + previous] as u64;
                if users > 0 {
                    flows.insert((previous as u32, renamed), users);
                }
            }
        }
        flows
    }

    fn items_round(&self, items: &[String]) -> anyhow::Result<()> {
        self.ask(
            Ask::Items {
                items: items.to_vec(),
                instances: self.instances.iter().cloned().collect(),
            },
            &[],
        );
        match self.error.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl GramShare for RemoteGroup<'_> {
    fn ratings(&self) -> usize {
        self.ratings
    }

    fn gram(&self, q: &Array2<f64>) -> Vec<f64> {
        let floats: Vec<f64> = q.iter().copied().collect();
        let mut total = vec![0.0; self.items * q.nrows()];
        for (_, partial) in self.ask(Ask::Gram { rows: q.nrows() }, &floats) {
            if partial.len() == total.len() {
                total.iter_mut().zip(&partial).for_each(|(t, p)| *t += p);
            } else {
                self.error
                    .borrow_mut()
                    .get_or_insert_with(|| anyhow::anyhow!("a Gram partial of the wrong size"));
            }
        }
        total
    }
}

impl Participant for RemoteGroup<'_> {
    fn statistics(&self, _items: usize) -> CovarianceStats {
        self.stats.clone()
    }

    fn project(&mut self, basis: &Array2<f64>) {
        let floats: Vec<f64> = basis.iter().copied().collect();
        self.ask(
            Ask::Project {
                rows: basis.nrows(),
            },
            &floats,
        );
    }

    fn sample(&self, share: f64, seed: u64) -> Vec<(u64, Vec<f64>)> {
        let mut sample = vec![];
        for (answer, floats) in self.ask(Ask::Sample { share, seed }, &[]) {
            let Answer::Sample { hashes } = answer else {
                continue;
            };
            let dim = floats.len() / hashes.len().max(1);
            if dim * hashes.len() != floats.len() {
                self.error
                    .borrow_mut()
                    .get_or_insert_with(|| anyhow::anyhow!("a sample answer of the wrong size"));
                continue;
            }
            for (i, h) in hashes.into_iter().enumerate() {
                sample.push((h, floats[i * dim..(i + 1) * dim].to_vec()));
            }
        }
        sample
    }

    fn lloyd(&mut self, centroids: &[f64]) -> LloydPartial {
        let mut merged: Option<LloydPartial> = None;
        for (answer, sums) in self.ask(Ask::Lloyd, centroids) {
            let Answer::Lloyd {
                counts,
                inertia,
                moved,
            } = answer
            else {
                continue;
            };
            let k = counts.len();
            if k == 0 || sums.len() != centroids.len() || !centroids.len().is_multiple_of(k) {
                self.error
                    .borrow_mut()
                    .get_or_insert_with(|| anyhow::anyhow!("a Lloyd answer of the wrong size"));
                continue;
            }
            let part = LloydPartial {
                sums,
                counts,
                inertia,
                moved,
            };
            match merged.as_mut() {
                Some(m) => m.merge(&part),
                None => merged = Some(part),
            }
        }
        // No answer: the round failed (its error is kept) and the solve is thrown away.
        merged.unwrap_or(LloydPartial {
            sums: vec![0.0; centroids.len()],
            counts: vec![],
            inertia: 0.0,
            moved: 0,
        })
    }
}

impl Describe for RemoteGroup<'_> {
    fn segment_sums(&self, k: usize, items: usize, holdout: Holdout) -> SegmentSums {
        let mut sums = SegmentSums::new(k);
        sums.ensure_items(items);
        for (_, floats) in self.ask(Ask::Sums { k, items, holdout }, &[]) {
            match SegmentSums::from_floats(k, &floats).filter(|s| s.items() == items) {
                Some(theirs) => sums.merge(&theirs),
                None => {
                    self.error
                        .borrow_mut()
                        .get_or_insert_with(|| anyhow::anyhow!("a sums answer of the wrong size"));
                }
            }
        }
        sums
    }

    fn describe(
        &self,
        idf: &[f64],
        full: &NaiveBayes,
        partial: &NaiveBayes,
        holdout: Holdout,
    ) -> (Vec<f64>, NaiveBayesTally) {
        let k = full.classes();
        let mut floats = idf.to_vec();
        floats.extend(full.to_floats());
        floats.extend(partial.to_floats());
        let mut scores = vec![0.0; k * idf.len()];
        let mut tally = NaiveBayesTally::new(k);
        for (answer, theirs) in self.ask(Ask::Describe { k, holdout }, &floats) {
            match answer {
                Answer::Described { tally: counts }
                    if theirs.len() == scores.len() && counts.confusion.len() == k * k =>
                {
                    scores.iter_mut().zip(&theirs).for_each(|(a, b)| *a += b);
                    tally.merge(&counts);
                }
                _ => {
                    self.error.borrow_mut().get_or_insert_with(|| {
                        anyhow::anyhow!("a describe answer of the wrong size")
                    });
                }
            }
        }
        (scores, tally)
    }
}

/// Reads the models topic from its beginning and keeps the highest version in `slot`, until
/// `stop` says so; sets `caught_up` once it has read what the topic held when it started (a
/// coordinator numbers its model only then, so versions never go back).
pub fn read_models(
    kafka: &KafkaConfig,
    slot: &GroupSlot,
    progress: &GroupProgress,
    caught_up: &std::sync::atomic::AtomicBool,
    stop: impl Fn() -> bool,
    on_model: impl Fn(&GroupModel),
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let topics = GroupTopics::of(kafka);
    let consumer = reader(kafka, &topics.models, false)?;
    let (_, end) = consumer.fetch_watermarks(&topics.models, 0, ROUND_TIMEOUT)?;
    let mut next = 0;
    while !stop() {
        if next >= end {
            caught_up.store(true, Relaxed);
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            // An empty poll at the start of a compacted topic: whatever is left to read past
            // removed records arrives in the next fetch; nothing at all means nothing left.
            let at_end = consumer.position().ok().is_some_and(|tpl| {
                tpl.find_partition(&topics.models, 0)
                    .is_some_and(|e| matches!(e.offset(), Offset::Offset(o) if o >= end))
            });
            if at_end {
                caught_up.store(true, Relaxed);
            }
            continue;
        };
        if let Ok(m) = &message {
            next = m.offset() + 1;
        }
        let Ok(message) = message else {
            continue;
        };
        if message.key() == Some(b"claim".as_slice()) {
            if let Some(claim) = message
                .payload()
                .and_then(|p| serde_json::from_slice::<Claim>(p).ok())
            {
                progress.claimed.fetch_max(claim.claimed_version, Relaxed);
            }
            continue;
        }
        let Some(model) = message
            .payload()
            .and_then(|p| serde_json::from_slice::<GroupModel>(p).ok())
        else {
            continue;
        };
        let mut latest = slot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if latest.as_ref().is_none_or(|l| l.version < model.version) {
            on_model(&model);
            *latest = Some(Arc::new(model));
        }
    }
    Ok(())
}

/// Reads the assignments topic from its beginning into `assignments`, until `stop` says so.
pub fn read_assignments(
    kafka: &KafkaConfig,
    assignments: &GroupAssignments,
    progress: &GroupProgress,
    stop: impl Fn() -> bool,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let topics = GroupTopics::of(kafka);
    let consumer = reader(kafka, &topics.assignments, false)?;
    while !stop() {
        let polled = consumer.poll(Duration::from_millis(200));
        // After the message is in the map: the position says what is read.
        let read_up_to = || {
            consumer.position().ok().and_then(|tpl| {
                tpl.find_partition(&topics.assignments, 0)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
            })
        };
        let Some(Ok(message)) = polled else {
            if let Some(o) = read_up_to() {
                progress.assignments_read.fetch_max(o, Relaxed);
            }
            continue;
        };
        let Some(Ok(user)) = message.key().map(std::str::from_utf8) else {
            continue;
        };
        match message.payload() {
            // A user who left every segment.
            None => {
                assignments
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(user);
            }
            Some(value) => {
                let Ok(assignment) = serde_json::from_slice::<GroupAssignment>(value) else {
                    continue;
                };
                assignments
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(user.to_string(), assignment);
            }
        }
        progress
            .assignments_read
            .fetch_max(message.offset() + 1, Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_bit_for_bit_and_foreign_bytes_are_refused() {
        let head = AnswerHead {
            snapshot: "s".into(),
            round: 3,
            instance: "a".into(),
            answer: Answer::Lloyd {
                counts: vec![1, 2],
                inertia: 0.1 + 0.2,
                moved: 4,
            },
            part: Part::WHOLE,
        };
        let floats = [0.1 + 0.2, -0.0, f64::MIN_POSITIVE, 1e300];
        let bytes = encode(&head, &floats).expect("encode");
        let (back, got): (AnswerHead, Vec<f64>) = decode(&bytes).expect("decode");
        assert_eq!(back.round, 3);
        assert!(matches!(back.answer, Answer::Lloyd { moved: 4, .. }));
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            floats.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(decode::<AnswerHead>(&bytes[..bytes.len() - 1]).is_none());
        let cut = AnswerHead {
            snapshot: "s".into(),
            round: 0,
            instance: "b".into(),
            answer: Answer::Cut {
                offsets: BTreeMap::from([(0, 10), (5, 7)]),
                items: vec!["i1".into()],
                users: 3,
                ratings: 9,
            },
            part: Part { part: 1, parts: 3 },
        };
        let (back, _): (AnswerHead, Vec<f64>) =
            decode(&encode(&cut, &[1.0, 2.0]).expect("encode")).expect("a cut decodes");
        assert!(
            matches!(&back.answer, Answer::Cut { offsets, .. } if offsets[&5] == 7),
            "{back:?}"
        );
        assert!(decode::<AnswerHead>(b"{}").is_none());
        let (back, _): (AnswerHead, Vec<f64>) =
            decode(&encode(&cut, &[]).expect("encode")).expect("decodes");
        assert_eq!(back.part, Part { part: 1, parts: 3 });
        // A header of a build without parts reads as a whole message.
        let json = br#"{"snapshot":"s","round":2,"instance":"i","answer":"ack"}"#;
        let mut old = (json.len() as u32).to_le_bytes().to_vec();
        old.extend_from_slice(json);
        let (back, _): (AnswerHead, Vec<f64>) = decode(&old).expect("decodes");
        assert_eq!(back.part, Part::WHOLE);
    }

    #[test]
    fn large_floats_travel_in_parts_and_are_put_together_bit_for_bit() {
        let floats: Vec<f64> = (0..100).map(|i| (i as f64).sqrt() * 1e-3 - 0.05).collect();
        let head = |part| AskHead {
            snapshot: "s".into(),
            round: 7,
            ask: Ask::Gram { rows: 4 },
            part,
        };
        let messages = encode_parts(&floats, 7, head).expect("encode");
        assert_eq!(messages.len(), 15, "100 floats, 7 a part");
        let decoded: Vec<(AskHead, Vec<f64>)> = messages
            .iter()
            .map(|m| decode(m).expect("a part decodes"))
            .collect();
        let mut assembly = Assembly::default();
        let mut whole = None;
        for (i, (head, part)) in decoded.iter().enumerate() {
            assert_eq!(head.part.parts, 15);
            let got = assembly.add(head.part, part.clone());
            assert_eq!(got.is_some(), i == 14, "complete only at the last part");
            whole = whole.or(got);
        }
        let whole = whole.expect("put together");
        assert_eq!(
            whole.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            floats.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        // A part missing: nothing comes out, and the next message starts over cleanly.
        let mut assembly = Assembly::default();
        assert!(
            assembly
                .add(decoded[0].0.part, decoded[0].1.clone())
                .is_none()
        );
        assert!(
            assembly
                .add(decoded[2].0.part, decoded[2].1.clone())
                .is_none()
        );
        let again: Option<Vec<f64>> = decoded
            .iter()
            .map(|(h, f)| assembly.add(h.part, f.clone()))
            .last()
            .flatten();
        assert_eq!(again.map(|w| w.len()), Some(100));
        // Small floats: one whole message.
        let one = encode_parts(&floats[..3], 7, head).expect("encode");
        assert_eq!(one.len(), 1);
        let (h, f): (AskHead, Vec<f64>) = decode(&one[0]).expect("decodes");
        assert_eq!((h.part, f.len()), (Part::WHOLE, 3));
    }
}
