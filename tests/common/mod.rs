//! Helpers for the tests that talk to the real Kafka broker started by `scripts/test.sh`
//! (`SEGMENTER_TEST_BROKERS`): unique topics, the service as a child process whose JSON log
//! lines can be waited on, and state-dir comparisons.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use segmenter::config::Config;
use segmenter::event::Mode;
use segmenter::snapshot::Snapshot;

pub const BIN: &str = env!("CARGO_BIN_EXE_segmenter");

/// The broker the test command started. Kafka tests cannot run without it; they fail loudly
/// instead of silently passing.
pub fn brokers() -> String {
    std::env::var("SEGMENTER_TEST_BROKERS").expect(
        "SEGMENTER_TEST_BROKERS is not set: run the suite with scripts/test.sh, which starts a \
         real Kafka broker (or start one with scripts/kafka.sh start and export \
         SEGMENTER_TEST_BROKERS=127.0.0.1:9092)",
    )
}

/// Runs `command` to completion; panics with its stderr unless it succeeds.
pub fn succeed(command: &mut Command) -> std::process::Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A topic name no other test (or earlier run) uses.
pub fn unique_topic(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{name}-{}-{nanos}", std::process::id())
}

pub fn generate(dir: &Path, mode: Mode, users: usize, events: usize, seed: u64) -> PathBuf {
    let path = dir.join(format!("ratings-{seed}.csv"));
    let mode = match mode {
        Mode::Explicit => "explicit",
        Mode::Implicit => "implicit",
    };
    succeed(
        Command::new(BIN)
            .args([
                "generate",
                "--users",
                &users.to_string(),
                "--items",
                "300",
                "--events",
            ])
            .arg(events.to_string())
            .args([
                "--segments",
                "6",
                "--seed",
                &seed.to_string(),
                "--mode",
                mode,
                "--out",
            ])
            .arg(&path),
    );
    path
}

pub fn produce(topic: &str, partitions: i32, ratings: &Path) {
    succeed(
        Command::new(BIN)
            .args([
                "produce",
                "--brokers",
                &brokers(),
                "--topic",
                topic,
                "--partitions",
            ])
            .arg(partitions.to_string())
            .arg("--ratings")
            .arg(ratings),
    );
}

/// An admin client of the test broker and a runtime to await its requests on.
fn admin() -> (
    rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    tokio::runtime::Runtime,
) {
    let client = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (client, runtime)
}

/// Creates `topic` with `partitions` and topic-level `configs`; panics unless it is created.
pub fn create_topic(topic: &str, partitions: i32, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (key, value) in configs {
        new = new.set(key, value);
    }
    let (client, runtime) = admin();
    let created = runtime
        .block_on(client.create_topics([&new], &AdminOptions::new()))
        .expect("create topics");
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
}

/// Sets topic-level `configs` of an existing `topic`; panics unless it is altered.
pub fn alter_topic(topic: &str, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
    let mut change = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (key, value) in configs {
        change = change.set(key, value);
    }
    let (client, runtime) = admin();
    let altered = runtime
        .block_on(client.alter_configs([&change], &AdminOptions::new()))
        .expect("alter configs");
    assert!(altered.iter().all(|r| r.is_ok()), "{altered:?}");
}

/// A message read back from a dead-letter topic.
#[derive(Debug, Clone)]
pub struct Letter {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl Letter {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Reads up to `want` messages of `topic` from the beginning (waiting up to `limit`).
pub fn read_dead_letters(topic: &str, want: usize, limit: Duration) -> Vec<Letter> {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("check-{topic}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut letters = vec![];
    let deadline = Instant::now() + limit;
    while letters.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .filter_map(|x| {
                            x.value
                                .map(|v| (x.key.to_string(), String::from_utf8_lossy(v).into()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            letters.push(Letter {
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                headers,
            });
        }
    }
    letters
}

/// Splits a generated ratings CSV (header `user,item,rating,ts`, events in time order) into
/// `parts` consecutive files, each with the header; returns them with their event counts.
pub fn split_ratings(ratings: &Path, parts: usize) -> Vec<(PathBuf, u64)> {
    let text = std::fs::read_to_string(ratings).expect("read ratings");
    let mut lines = text.lines();
    let header = lines.next().expect("header line");
    let rows: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    let per_part = rows.len().div_ceil(parts);
    rows.chunks(per_part)
        .enumerate()
        .map(|(i, chunk)| {
            let path = ratings.with_extension(format!("part{i}.csv"));
            let mut body = String::with_capacity(chunk.len() * 24);
            body.push_str(header);
            body.push('\n');
            for row in chunk {
                body.push_str(row);
                body.push('\n');
            }
            std::fs::write(&path, body).expect("write part");
            (path, chunk.len() as u64)
        })
        .collect()
}

/// Messages the state dir has durably consumed: the sum of its persisted next offsets over
/// every partition (0 for a state dir that does not exist yet). Only call it when no process
/// holds the state dir.
pub fn persisted_position(state: &Path) -> u64 {
    if !state.exists() {
        return 0;
    }
    let offsets = segmenter::store::open(state)
        .expect("open state")
        .state
        .offsets()
        .expect("read offsets");
    offsets.values().map(|&o| o.max(0) as u64).sum()
}

/// Environment for a service run against `topic` with state in `state`.
pub fn service_env(topic: &str, state: &Path, mode: Mode) -> Vec<(String, String)> {
    let mut env = vec![
        ("SEGMENTER_KAFKA__BROKERS".into(), brokers()),
        ("SEGMENTER_KAFKA__TOPIC".into(), topic.into()),
        ("SEGMENTER_KAFKA__GROUP_ID".into(), format!("g-{topic}")),
        ("SEGMENTER_KAFKA__INSTANCE_ID".into(), format!("i-{topic}")),
        (
            "SEGMENTER_KAFKA__DEAD_LETTER_TOPIC".into(),
            format!("{topic}-dlq"),
        ),
        ("SEGMENTER_STATE__DIR".into(), state.display().to_string()),
        // Tests run in parallel: each service's API on a port of its own.
        ("SEGMENTER_HTTP__LISTEN".into(), "127.0.0.1:0".into()),
        // 6 planted segments span 5 dimensions: keeping 5 components keeps the subspace well
        // separated from the noise, so two histories give the same clustering.
        ("SEGMENTER_MODEL__CLUSTERS".into(), "6".into()),
        ("SEGMENTER_MODEL__COMPONENTS".into(), "5".into()),
        (
            "SEGMENTER_MODEL__REFRESH_EVERY_EVENTS".into(),
            "4000".into(),
        ),
        ("SEGMENTER_LOG__FORMAT".into(), "json".into()),
        ("RUST_LOG".into(), "segmenter=debug,librdkafka=warn".into()),
    ];
    if mode == Mode::Implicit {
        env.push(("SEGMENTER_EVENTS__MODE".into(), "implicit".into()));
        env.push(("SEGMENTER_EVENTS__MAX_VALUE".into(), "1000".into()));
    }
    env
}

/// A running `segmenter run` with its log lines delivered on a channel.
pub struct Service {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Service {
    pub fn start(env: &[(String, String)], args: &[&str]) -> Service {
        let mut child = Command::new(BIN)
            .arg("run")
            .args(args)
            .envs(env.iter().cloned())
            .env_remove("SEGMENTER_CONFIG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start segmenter run");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Service {
            child,
            lines: rx,
            seen: vec![],
        }
    }

    /// Waits (up to `limit`) for a log line satisfying `condition`; panics with the log if
    /// it never comes.
    pub fn wait_for(
        &mut self,
        limit: Duration,
        condition: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && condition(&v)
                    {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "condition not met within {limit:?}; service log:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for a commit that brought the total of applied events to at least `n`.
    pub fn wait_for_applied(&mut self, n: u64, limit: Duration) -> u64 {
        let v = self.wait_for(limit, |v| {
            v["fields"]["message"] == "batch committed"
                && v["fields"]["events_applied"]
                    .as_u64()
                    .is_some_and(|a| a >= n)
        });
        v["fields"]["events_applied"].as_u64().unwrap_or(0)
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its exit code and the rest of its log.
    pub fn wait_exit(mut self, limit: Duration) -> (Option<i32>, Vec<String>) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                self.seen.extend(self.lines.try_iter());
                return (status.code(), std::mem::take(&mut self.seen));
            }
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("wait");
                    return (status.code(), std::mem::take(&mut self.seen));
                }
            }
            assert!(
                Instant::now() < deadline,
                "service did not exit within {limit:?}:\n{}",
                self.seen.join("\n")
            );
        }
    }
}

/// A failed wait (a panicking test) must not leak a running service that keeps its state dir
/// locked and its group membership alive: the child is killed and reaped on drop (a no-op for
/// one that already exited).
impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs the service until `total` events are applied (it then exits by itself with a final
/// snapshot) and returns that snapshot.
pub fn run_to_completion(env: &[(String, String)], total: u64) -> Snapshot {
    let service = Service::start(env, &["--exit-at-events", &total.to_string()]);
    let (code, log) = service.wait_exit(Duration::from_secs(180));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    let state = env
        .iter()
        .find(|(k, _)| k == "SEGMENTER_STATE__DIR")
        .map(|(_, v)| PathBuf::from(v))
        .expect("state dir");
    latest_stored_snapshot(&state)
}

/// The latest snapshot in a state dir no process holds any more.
pub fn latest_stored_snapshot(state: &Path) -> Snapshot {
    segmenter::store::open(state)
        .expect("open state")
        .snapshots
        .latest_snapshot()
        .expect("read")
        .expect("a final snapshot")
}

/// `segmenter replay` of the same file into its own state dir: the reference result.
pub fn replay_snapshot(ratings: &Path, state: &Path, env: &[(String, String)]) -> Snapshot {
    let out_path = state.with_extension("json");
    succeed(
        Command::new(BIN)
            .args(["replay", "--ratings"])
            .arg(ratings)
            .arg("--snapshot-out")
            .arg(&out_path)
            .envs(env.iter().cloned())
            .env("SEGMENTER_STATE__DIR", state),
    );
    serde_json::from_slice(&std::fs::read(out_path).expect("snapshot")).expect("json")
}

/// Same counts, explained-variance ratios within 1e-9. The snapshots' clusterings are not
/// compared: a periodic snapshot continues the previous snapshot's segments, so it depends on
/// when snapshots were taken (a crash, a replay); the state's own clustering, which does not, is
/// compared by [`assert_same_partition`].
pub fn assert_same_model(a: &Snapshot, b: &Snapshot) {
    assert_eq!(a.counts.users, b.counts.users);
    assert_eq!(a.counts.items, b.counts.items);
    assert_eq!(a.counts.ratings, b.counts.ratings);
    assert_eq!(a.counts.events_applied, b.counts.events_applied);
    assert_eq!(
        a.pca.explained_variance_ratio.len(),
        b.pca.explained_variance_ratio.len(),
        "as many components"
    );
    assert!(
        !a.pca.explained_variance_ratio.is_empty(),
        "a model to compare"
    );
    for (x, y) in a
        .pca
        .explained_variance_ratio
        .iter()
        .zip(&b.pca.explained_variance_ratio)
    {
        assert!((x - y).abs() <= 1e-9, "explained-variance ratio {x} vs {y}");
    }
    assert!((a.pca.total_variance - b.pca.total_variance).abs() <= 1e-9 * a.pca.total_variance);
}

/// The online clusterings persisted in two state dirs (no process holds them) assign the same
/// users and agree as partitions (adjusted Rand index ≥ 0.85, up to the clusters' names). Not
/// exactly: a restarted engine rebuilds its running cluster sums from the labels, so rounding
/// differs from an uninterrupted run's and users almost exactly between two centroids can land
/// differently (measured: 0.93-1.0 after restarts, 1.0 without).
pub fn assert_same_partition(a: &Path, b: &Path, config: &Config) {
    let load = |p: &Path| {
        let engine = segmenter::store::open(p)
            .expect("open state")
            .state
            .load_engine(config.engine_params())
            .expect("load state")
            .engine;
        engine
            .users()
            .ids()
            .iter()
            .zip(engine.model().labels())
            .filter(|(_, l)| **l != segmenter::engine::NO_CLUSTER)
            .map(|(u, &l)| (u.clone(), l))
            .collect::<BTreeMap<String, u32>>()
    };
    let (la, lb) = (load(a), load(b));
    assert!(!la.is_empty(), "users are assigned");
    assert_eq!(
        la.keys().collect::<Vec<_>>(),
        lb.keys().collect::<Vec<_>>(),
        "the same users are assigned"
    );
    let (x, y): (Vec<u32>, Vec<u32>) = la.iter().map(|(u, &c)| (c, lb[u])).unzip();
    let ari = segmenter::engine::matching::adjusted_rand_index(&x, &y);
    assert!(ari >= 0.85, "same partition: adjusted Rand index {ari}");
}

/// Every user's vector in two state dirs, by user id (exact equality: nothing lost, nothing
/// counted twice).
pub fn assert_same_vectors(a: &Path, b: &Path, config: &Config) {
    let load = |p: &Path| {
        let engine = segmenter::store::open(p)
            .unwrap()
            .state
            .load_engine(config.engine_params())
            .unwrap()
            .engine;
        let mut out = BTreeMap::new();
        for (u, id) in engine.users().ids().iter().enumerate() {
            let x = engine.vector(u as u32);
            let cells: BTreeMap<String, f64> = x
                .iter()
                .map(|(j, v)| (engine.items().id(j).to_string(), v))
                .collect();
            out.insert(id.clone(), cells);
        }
        out
    };
    let (va, vb) = (load(a), load(b));
    assert_eq!(va.len(), vb.len(), "user count");
    for (user, cells) in &va {
        assert_eq!(Some(cells), vb.get(user), "vector of {user}");
    }
}

/// The config a service run with `env` uses (to open its state dir in the test).
pub fn config_for(env: &[(String, String)]) -> Config {
    Config::load_with_env(None, env.iter().cloned()).expect("config")
}

/// A free TCP port on loopback (bound and released; the service binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The demo service with its HTTP API on a free port; returns once a first snapshot exists.
pub fn start_demo(state: &Path, extra_env: &[(&str, &str)], args: &[&str]) -> (Service, String) {
    let port = free_port();
    let mut env: Vec<(String, String)> = vec![
        ("SEGMENTER_HTTP__LISTEN".into(), format!("127.0.0.1:{port}")),
        ("SEGMENTER_SNAPSHOT__INTERVAL_MS".into(), "300".into()),
        ("SEGMENTER_SNAPSHOT__MAX_STALENESS_MS".into(), "300".into()),
        ("SEGMENTER_DEMO__EVENTS_PER_SECOND".into(), "40000".into()),
        ("SEGMENTER_LOG__FORMAT".into(), "json".into()),
        ("RUST_LOG".into(), "segmenter=info".into()),
    ];
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut all_args = vec!["--demo", "--state-dir", state.to_str().expect("utf-8 path")];
    all_args.extend_from_slice(args);
    let mut service = Service::start(&env, &all_args);
    service.wait_for(Duration::from_secs(60), |v| {
        v["fields"]["message"] == "snapshot built"
    });
    (service, format!("http://127.0.0.1:{port}"))
}

/// GET with an optional bearer token: (status, body).
pub fn http_get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut request = ureq::get(url);
    if let Some(t) = token {
        request = request.set("Authorization", &format!("Bearer {t}"));
    }
    match request.call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// Deletes `topic`; panics unless the broker deletes it.
pub fn delete_topic(topic: &str) {
    use rdkafka::admin::AdminOptions;
    let (client, runtime) = admin();
    let deleted = runtime
        .block_on(client.delete_topics(&[topic], &AdminOptions::new()))
        .expect("delete topics");
    assert!(deleted.iter().all(|r| r.is_ok()), "{deleted:?}");
}

/// GET without a token: (status, body), `None` while nothing listens yet.
pub fn try_http_get(url: &str) -> Option<(u16, String)> {
    match ureq::get(url).call() {
        Ok(r) => Some((r.status(), r.into_string().unwrap_or_default())),
        Err(ureq::Error::Status(code, r)) => Some((code, r.into_string().unwrap_or_default())),
        Err(_) => None,
    }
}

/// One unlabelled sample of `/metrics` at `base` (`None`: not exported, or not listening yet).
pub fn metric(base: &str, name: &str) -> Option<f64> {
    let (_, text) = try_http_get(&format!("{base}/metrics"))?;
    text.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `/readyz` at `base`: its status and body (0 and null while nothing listens yet).
pub fn readyz(base: &str) -> (u16, serde_json::Value) {
    let (status, body) = try_http_get(&format!("{base}/readyz")).unwrap_or_default();
    (status, serde_json::from_str(&body).unwrap_or_default())
}

/// Polls `condition` every 50 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `topic`'s partition 0 read to its end with `isolation` (`read_committed` or
/// `read_uncommitted`): (key, JSON value or `None` for a tombstone).
pub fn read_to_end(topic: &str, isolation: &str) -> Vec<(String, Option<serde_json::Value>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("check-{topic}-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let mut partitions = rdkafka::TopicPartitionList::new();
    partitions
        .add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .expect("partition");
    consumer.assign(&partitions).expect("assign");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut records = vec![];
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Err(KafkaError::PartitionEOF(_))) => return records,
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            Some(Ok(m)) => records.push((
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                m.payload()
                    .map(|p| serde_json::from_slice(p).expect("JSON record")),
            )),
            None => {}
        }
    }
    panic!("{topic} not read to its end within 60 s");
}

/// A batch matrix: `(user, item)` to value.
pub type Cells = BTreeMap<(String, String), f64>;

/// The batch recipe's matrix of `events`, built directly from them (independently of the
/// engine): explicit values replace and null retracts, implicit values add up, each times
/// `weight(ts)`; cells left at 0 are dropped.
pub fn weighted_batch_matrix(
    events: &[segmenter::event::RatingEvent],
    mode: Mode,
    weight: impl Fn(i64) -> f64,
) -> Cells {
    let mut cells = BTreeMap::new();
    for e in events {
        let key = (e.user.clone(), e.item.clone());
        match (mode, e.value) {
            (Mode::Explicit, Some(v)) => {
                cells.insert(key, v * weight(e.ts));
            }
            (Mode::Explicit, None) => {
                cells.remove(&key);
            }
            (Mode::Implicit, Some(v)) => *cells.entry(key).or_insert(0.0) += v * weight(e.ts),
            (Mode::Implicit, None) => {}
        }
    }
    cells.retain(|_, v| *v != 0.0);
    cells
}

/// Every 7th event retracts an earlier rating instead (explicit mode's null value).
pub fn with_retractions(
    mut events: Vec<segmenter::event::RatingEvent>,
) -> Vec<segmenter::event::RatingEvent> {
    for i in (7..events.len()).step_by(7) {
        let earlier = events[i - 5].clone();
        events[i] = segmenter::event::RatingEvent {
            value: None,
            ts: events[i].ts,
            ..earlier
        };
    }
    events
}

/// A batch matrix's user count, column sums and `XᵀX`, over `engine`'s item order.
pub fn moments(
    cells: &Cells,
    engine: &segmenter::engine::Engine,
) -> (u64, Vec<f64>, ndarray::Array2<f64>) {
    let d = engine.items().len();
    let mut rows: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for ((user, item), v) in cells {
        let j = engine.items().get(item).expect("item known") as usize;
        rows.entry(user.as_str()).or_insert_with(|| vec![0.0; d])[j] = *v;
    }
    let mut sums = vec![0.0; d];
    let mut m = ndarray::Array2::<f64>::zeros((d, d));
    for x in rows.values() {
        for i in 0..d {
            sums[i] += x[i];
            for j in 0..d {
                m[[i, j]] += x[i] * x[j];
            }
        }
    }
    (rows.len() as u64, sums, m)
}

/// Asserts that `engine`'s counts, column sums, sums of squares and covariance operator, times
/// its value scale (`c`, squares `c²`), equal those of the batch matrix `cells` (1e-9,
/// normwise: a retraction leaves the rounding of the larger values it cancels). Returns the
/// batch covariance over the engine's item order.
pub fn assert_statistics_equal(
    engine: &segmenter::engine::Engine,
    cells: &Cells,
    what: &str,
) -> ndarray::Array2<f64> {
    use ndarray::Array2;
    use segmenter::engine::eigen::SymmetricOperator;
    let d = engine.items().len();
    let (n, sums, m) = moments(cells, engine);
    assert_eq!(engine.active_users(), n, "{what}: users");
    assert_eq!(engine.ratings(), cells.len() as u64, "{what}: ratings");
    let c = engine.value_scale();
    let largest = |v: &mut dyn Iterator<Item = f64>| v.fold(0.0f64, |m, x| m.max(x.abs()));
    let sums_scale = largest(&mut sums.iter().copied());
    for (j, (a, b)) in engine.stats().sums().iter().zip(&sums).enumerate() {
        assert!(
            (a * c - b).abs() <= 1e-9 * sums_scale,
            "{what}: column sum {j}: {} vs {b}",
            a * c
        );
    }
    let squares_scale = largest(&mut m.diag().iter().copied());
    for (j, (a, b)) in engine.stats().squares().iter().zip(m.diag()).enumerate() {
        assert!(
            (a * c * c - b).abs() <= 1e-9 * squares_scale,
            "{what}: sum of squares {j}: {} vs {b}",
            a * c * c
        );
    }
    let nf = n as f64;
    let cov = Array2::from_shape_fn((d, d), |(i, j)| {
        m[[i, j]] / nf - sums[i] / nf * (sums[j] / nf)
    });
    let block = Array2::from_shape_fn((3, d), |(r, j)| ((r * 31 + j * 7) % 13) as f64 - 6.0);
    let online = engine
        .stats()
        .operator(engine.vectors(), d)
        .apply_rows(&block)
        * (c * c);
    let batch = block.dot(&cov);
    let worst = (&online - &batch)
        .iter()
        .fold(0.0f64, |w, x| w.max(x.abs()));
    let scale = batch.iter().fold(0.0f64, |w, x| w.max(x.abs()));
    assert!(
        worst <= 1e-9 * scale,
        "{what}: covariance operator differs by {worst} (of {scale})"
    );
    cov
}

/// `segmenter produce` of `ratings` into `topic` (`partitions` of them) on `brokers`, running
/// in the background; [`finish_producing`] waits for it.
pub fn start_producing(brokers: &str, topic: &str, partitions: i32, ratings: &Path) -> Child {
    Command::new(BIN)
        .args(["produce", "--brokers", brokers, "--topic", topic])
        .args(["--partitions", &partitions.to_string(), "--ratings"])
        .arg(ratings)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start segmenter produce")
}

/// Waits for a [`start_producing`] to finish; panics with its stderr unless it succeeded.
pub fn finish_producing(producer: Child) {
    let out = producer.wait_with_output().expect("wait for produce");
    assert!(
        out.status.success(),
        "produce failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The offsets consumer group `group` committed to Kafka (its instances commit them once
/// their state is durable), summed over `topic`'s `partitions`.
pub fn group_progress(topic: &str, group: &str, partitions: i32) -> u64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let Ok(committed) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else {
        return 0;
    };
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => o.max(0) as u64,
            _ => 0,
        })
        .sum()
}

/// The environment of several instances in one group on `topic`, with the changelog on (and
/// the group model every `group_model_ms`, when set): implicit plays, small batches, and a
/// session timeout at the broker's minimum (a SIGKILLed member sends no LeaveGroup: its
/// partitions move once its session expires).
pub fn group_env(
    topic: &str,
    dir: &Path,
    mode: Mode,
    group_model_ms: Option<u64>,
) -> Vec<(String, String)> {
    let mut env = service_env(topic, &dir.join("unused"), mode);
    env.push((
        "SEGMENTER_KAFKA__CHANGELOG_TOPIC".into(),
        format!("{topic}-changelog"),
    ));
    if let Some(ms) = group_model_ms {
        env.push((
            "SEGMENTER_KAFKA__GROUP_MODEL_INTERVAL_MS".into(),
            ms.to_string(),
        ));
    }
    env.push((
        "SEGMENTER_KAFKA__CLIENT__SESSION.TIMEOUT.MS".into(),
        "6000".into(),
    ));
    env.push(("SEGMENTER_KAFKA__BATCH_SIZE".into(), "500".into()));
    env
}

/// Produces `ratings` to `topic` and SIGKILLs `victim` once the consumer group `group` has
/// committed past `committed` (the installment is being consumed). Returns the producer, still
/// running.
pub fn kill_mid_installment(
    (topic, group, partitions): (&str, &str, i32),
    ratings: &Path,
    committed: u64,
    victim: &mut Service,
) -> Child {
    let producer = start_producing(&brokers(), topic, partitions, ratings);
    wait_until(
        Duration::from_secs(120),
        "the installment under way",
        || group_progress(topic, group, partitions) > committed,
    );
    victim.child.kill().expect("SIGKILL");
    let _ = victim.child.wait();
    producer
}

/// One instance of a [`group_env`] group, named `name`: its state dir under `dir`, its own
/// HTTP port.
pub struct GroupInstance {
    pub service: Service,
    pub state: PathBuf,
    pub url: String,
}

/// Starts instance `name` and waits for its first partitions to be taken over; returns it with
/// that log line.
pub fn start_group_instance(
    base: &[(String, String)],
    dir: &Path,
    name: &str,
) -> (GroupInstance, serde_json::Value) {
    let port = free_port();
    let state = dir.join(format!("state-{name}"));
    let mut env = base.to_vec();
    env.retain(|(k, _)| {
        !matches!(
            k.as_str(),
            "SEGMENTER_STATE__DIR" | "SEGMENTER_KAFKA__INSTANCE_ID" | "SEGMENTER_HTTP__LISTEN"
        )
    });
    env.push(("SEGMENTER_STATE__DIR".into(), state.display().to_string()));
    env.push(("SEGMENTER_KAFKA__INSTANCE_ID".into(), name.into()));
    env.push(("SEGMENTER_HTTP__LISTEN".into(), format!("127.0.0.1:{port}")));
    let mut service = Service::start(&env, &[]);
    let taken_over = service.wait_for(Duration::from_secs(60), |v| {
        v["fields"]["message"] == "partitions taken over: consuming"
    });
    let instance = GroupInstance {
        service,
        state,
        url: format!("http://127.0.0.1:{port}"),
    };
    (instance, taken_over)
}
