//! End to end against the real Kafka broker started by `scripts/test.sh`: a topic with several
//! partitions consumed by `segmenter run` ends where `segmenter replay` of the same file ends;
//! SIGKILL at random moments and SIGTERM lose nothing and count nothing twice; every bad
//! message lands in the dead-letter topic with its reason.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use segmenter::event::Mode;

const EVENTS: u64 = 24_000;

#[test]
fn kafka_run_ends_in_the_same_state_and_model_as_replay() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), Mode::Explicit, 400, EVENTS as usize, 21);
    let topic = unique_topic("e2e");
    produce(&topic, 3, &ratings);
    let env = service_env(&topic, &dir.path().join("state"), Mode::Explicit);
    let from_kafka = run_to_completion(&env, EVENTS);
    let from_file = replay_snapshot(&ratings, &dir.path().join("replay"), &env);
    assert_same_model(&from_kafka, &from_file);
    assert_same_partition(
        &dir.path().join("state"),
        &dir.path().join("replay"),
        &config_for(&env),
    );
    assert_eq!(
        from_kafka.offsets.len(),
        3,
        "offsets of every partition: {:?}",
        from_kafka.offsets
    );
    assert_eq!(from_kafka.offsets.values().sum::<i64>(), EVENTS as i64);

    // Started again with its target already reached, it only takes a final snapshot.
    let again = run_to_completion(&env, EVENTS);
    assert_eq!(again.version, from_kafka.version + 1);
    assert_eq!(again.counts, from_kafka.counts);
}

#[test]
fn a_burst_then_silence_still_gets_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), Mode::Explicit, 300, 6_000, 61);
    let topic = unique_topic("burst");
    produce(&topic, 2, &ratings);
    let mut env = service_env(&topic, &dir.path().join("state"), Mode::Explicit);
    env.push(("SEGMENTER_SNAPSHOT__INTERVAL_MS".into(), "1500".into()));
    env.push(("SEGMENTER_SNAPSHOT__MAX_STALENESS_MS".into(), "1500".into()));
    let mut service = Service::start(&env, &[]);
    service.wait_for_applied(6_000, Duration::from_secs(60));
    // No more events arrive; the snapshot timer must still cover the burst.
    let line = service.wait_for(Duration::from_secs(30), |v| {
        v["fields"]["message"] == "snapshot built" && v["fields"]["events_applied"] == 6_000
    });
    assert!(line["fields"]["users"].as_u64().unwrap() > 0);
    service.signal("-TERM");
    let (code, _) = service.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0));
}

/// Records of `topic` from the beginning (key, payload), read until `done` holds for them or
/// `limit` passes.
fn read_records(
    topic: &str,
    limit: Duration,
    done: impl Fn(&[(String, serde_json::Value)]) -> bool,
) -> Vec<(String, serde_json::Value)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("check-{topic}-{}", std::process::id()))
        // Every read starts from the beginning: nothing is committed.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut records = vec![];
    let deadline = std::time::Instant::now() + limit;
    while !done(&records) && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let value = serde_json::from_slice(m.payload().unwrap_or_default()).expect("JSON");
            records.push((key, value));
        }
    }
    records
}

#[test]
fn every_snapshot_is_published_to_the_snapshots_topic_under_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ratings = generate(dir.path(), Mode::Explicit, 300, 6_000, 67);
    let topic = unique_topic("published");
    let snapshots_topic = unique_topic("snapshots");
    produce(&topic, 2, &ratings);
    let mut env = service_env(&topic, &state, Mode::Explicit);
    env.push((
        "SEGMENTER_KAFKA__SNAPSHOTS_TOPIC".into(),
        snapshots_topic.clone(),
    ));
    env.push(("SEGMENTER_SNAPSHOT__INTERVAL_MS".into(), "1000".into()));
    env.push(("SEGMENTER_SNAPSHOT__MAX_STALENESS_MS".into(), "1000".into()));
    let mut service = Service::start(&env, &[]);
    service.wait_for_applied(6_000, Duration::from_secs(60));
    let built = service.wait_for(Duration::from_secs(30), |v| {
        v["fields"]["message"] == "snapshot built" && v["fields"]["events_applied"] == 6_000
    });
    let version = built["fields"]["version"].as_u64().unwrap();
    let has = |want: u64| {
        move |records: &[(String, serde_json::Value)]| {
            records.iter().any(|(key, _)| *key == want.to_string())
        }
    };
    let records = read_records(&snapshots_topic, Duration::from_secs(30), has(version));
    service.signal("-TERM");
    let (code, log) = service.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", log.join("\n"));

    // Each record is a stored snapshot, whole, under its version.
    let store = segmenter::store::open(&state).unwrap().snapshots;
    assert!(
        records.iter().any(|(key, _)| *key == version.to_string()),
        "{records:?}"
    );
    for (key, value) in &records {
        let v: u64 = key.parse().expect("a version key");
        assert_eq!(value["version"].as_u64(), Some(v));
        let stored = store
            .snapshot(v)
            .unwrap()
            .expect("published snapshots are stored");
        assert_eq!(
            *value,
            serde_json::to_value(&stored).unwrap(),
            "snapshot v{v}"
        );
    }
    // A restart publishes the latest stored snapshot again, under the same version, before any
    // newer one it builds: a crash between storing and publishing loses nothing.
    let latest = store.latest_snapshot().unwrap().unwrap().version;
    drop(store);
    let copies = |records: &[(String, serde_json::Value)]| {
        records
            .iter()
            .filter(|(key, _)| *key == latest.to_string())
            .count()
    };
    let count = {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .expect("consumer");
        let (low, high) = probe
            .fetch_watermarks(&snapshots_topic, 0, Duration::from_secs(10))
            .expect("watermarks");
        (high - low) as usize
    };
    let before = copies(&read_records(
        &snapshots_topic,
        Duration::from_secs(30),
        |r| r.len() >= count,
    ));
    assert!(before >= 1, "v{latest} was published before the restart");
    let service = Service::start(&env, &[]);
    let records = read_records(&snapshots_topic, Duration::from_secs(30), |r| {
        copies(r) > before
    });
    service.signal("-TERM");
    let (code, log) = service.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    assert!(
        copies(&records) > before,
        "v{latest} published again after the restart: {:?}",
        records.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    let store = segmenter::store::open(&state).unwrap().snapshots;
    for (key, value) in &records {
        let stored = store
            .snapshot(key.parse().unwrap())
            .unwrap()
            .expect("stored");
        assert_eq!(
            *value,
            serde_json::to_value(&stored).unwrap(),
            "snapshot v{key}"
        );
    }
}

/// One round of a kill test: produces `part` to `topic` (bringing it to `produced` events),
/// starts the service, waits until it has applied a seeded random number of events past what
/// the state dir held, lets `linger` pick the moment after that, and SIGKILLs it. Returns the
/// events the service reported committed.
fn kill_round(
    round: usize,
    (topic, part, produced): (&str, &Path, u64),
    env: &[(String, String)],
    rng: &mut ChaCha8Rng,
    linger: impl FnOnce(&mut Service, &mut ChaCha8Rng),
) -> u64 {
    produce(topic, 3, part);
    let state = config_for(env).state.dir;
    let before = persisted_position(&state);
    assert!(before < produced, "round {round}: nothing left to consume");
    let target = rng.random_range(before + 1..=produced);
    let mut service = Service::start(env, &[]);
    let logged = service.wait_for_applied(target, Duration::from_secs(120));
    linger(&mut service, rng);
    service.signal("-KILL");
    let (code, _) = service.wait_exit(Duration::from_secs(30));
    assert_eq!(code, None, "round {round}: killed by a signal");
    logged
}

/// The topic is produced in installments, one more before each round, so every kill lands
/// while events remain to be consumed however late it comes on a busy machine; each round
/// starts from what the previous one persisted (the state dir's offsets), not from a log line.
fn killed_at_random_moments_loses_nothing(mode: Mode, seed: u64) {
    const INSTALLMENTS: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), mode, 400, EVENTS as usize, seed);
    let parts = split_ratings(&ratings, INSTALLMENTS);
    assert_eq!(parts.iter().map(|(_, n)| n).sum::<u64>(), EVENTS);
    let topic = unique_topic("crash");
    let state = dir.path().join("state");
    let mut env = service_env(&topic, &state, mode);
    // Small batches: many commits, so kills land between and inside them.
    env.push(("SEGMENTER_KAFKA__BATCH_SIZE".into(), "300".into()));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut produced = 0;
    let (last, rounds) = parts.split_last().expect("installments");
    for (round, (part, count)) in rounds.iter().enumerate() {
        produced += count;
        let logged = kill_round(round, (&topic, part, produced), &env, &mut rng, |_, rng| {
            // A random extra delay inside the next batches (a moment, not a wait for a condition).
            std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
        });
        let after = persisted_position(&state);
        assert!(
            after >= logged,
            "round {round}: a commit the service reported ({logged}) is persisted ({after})"
        );
        assert!(
            after < EVENTS,
            "round {round}: the kill landed mid-stream ({after} of {EVENTS} consumed)"
        );
    }
    produce(&topic, 3, &last.0);
    let killed = run_to_completion(&env, EVENTS);
    assert_eq!(
        killed.counts.events_applied, EVENTS,
        "every event applied exactly once"
    );

    // The uninterrupted run of the same topic, in its own state dir and group.
    let mut clean_env = service_env(&topic, &dir.path().join("clean"), mode);
    clean_env.retain(|(k, _)| k != "SEGMENTER_KAFKA__GROUP_ID");
    clean_env.push(("SEGMENTER_KAFKA__GROUP_ID".into(), format!("clean-{topic}")));
    let clean = run_to_completion(&clean_env, EVENTS);
    assert_same_model(&killed, &clean);
    assert_same_partition(&state, &dir.path().join("clean"), &config_for(&env));
    assert_same_vectors(&state, &dir.path().join("clean"), &config_for(&env));
}

#[test]
fn sigkill_at_random_moments_explicit_mode_same_final_state() {
    killed_at_random_moments_loses_nothing(Mode::Explicit, 31);
}

#[test]
fn sigkill_at_random_moments_implicit_mode_same_final_state() {
    killed_at_random_moments_loses_nothing(Mode::Implicit, 32);
}

#[test]
fn sigterm_mid_stream_exits_zero_and_resumes_to_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), Mode::Implicit, 400, EVENTS as usize, 41);
    let topic = unique_topic("term");
    produce(&topic, 2, &ratings);
    let mut env = service_env(&topic, &dir.path().join("state"), Mode::Implicit);
    env.push(("SEGMENTER_KAFKA__BATCH_SIZE".into(), "300".into()));
    let mut service = Service::start(&env, &[]);
    service.wait_for_applied(6_000, Duration::from_secs(120));
    service.signal("-TERM");
    let (code, log) = service.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    assert!(
        log.iter().any(|l| l.contains("\"stopped\"")),
        "{}",
        log.join("\n")
    );
    let resumed = run_to_completion(&env, EVENTS);
    let reference = replay_snapshot(&ratings, &dir.path().join("replay"), &env);
    assert_same_model(&resumed, &reference);
    assert_same_partition(
        &dir.path().join("state"),
        &dir.path().join("replay"),
        &config_for(&env),
    );
}

#[test]
fn bad_messages_go_to_the_dead_letter_topic_with_their_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique_topic("dlq");
    let dlq = format!("{topic}-dlq");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let oversized = format!(
        r#"{{"user":"u1","item":"i1","rating":3,"pad":"{}"}}"#,
        "x".repeat(70_000)
    );
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"{\"user\": \"u1\", ".to_vec()),
        (
            "wrong_type",
            br#"{"user":"u1","item":"i1","rating":"three"}"#.to_vec(),
        ),
        (
            "wrong_type",
            br#"{"user":["u1"],"item":"i1","rating":3}"#.to_vec(),
        ),
        ("missing_field", br#"{"user":"u1","rating":3}"#.to_vec()),
        ("missing_field", br#"{"user":"u1","item":"i1"}"#.to_vec()),
        (
            "not_finite",
            br#"{"user":"u1","item":"i1","rating":"NaN"}"#.to_vec(),
        ),
        (
            "out_of_range",
            br#"{"user":"u1","item":"i1","rating":7}"#.to_vec(),
        ),
        (
            "out_of_range",
            br#"{"user":"u1","item":"i1","rating":-2}"#.to_vec(),
        ),
        ("empty", b"".to_vec()),
        (
            "malformed",
            br#"{"user":"u1","item":"i1","rating":1,"rating":5}"#.to_vec(),
        ),
        (
            "malformed",
            b"{\"user\":\"u1\",\"item\":\"i1\",\"rating\":1,\"note\":\"\xff\"}".to_vec(),
        ),
        (
            "malformed",
            format!(
                r#"{{"user":"u1","item":"i1","rating":1,"x":{}0{}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            )
            .into_bytes(),
        ),
        (
            "bad_timestamp",
            br#"{"user":"u1","item":"i1","rating":1,"ts":1e30}"#.to_vec(),
        ),
        (
            "bad_timestamp",
            br#"{"user":"u1","item":"i1","rating":1,"ts":-5}"#.to_vec(),
        ),
        (
            "bad_id",
            br#"{"user":"u\u0000","item":"i1","rating":1}"#.to_vec(),
        ),
        (
            "bad_id",
            format!(r#"{{"user":"{}","item":"i1","rating":1}}"#, "u".repeat(300)).into_bytes(),
        ),
        ("oversized", oversized.into_bytes()),
    ];
    let mut good = 0u64;
    let users = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"];
    for round in 0..20 {
        for (i, user) in users.iter().enumerate() {
            let value = format!(
                r#"{{"user":"{user}","item":"i{}","rating":{}}}"#,
                round * 3 + i,
                1 + (round + i) % 5
            );
            producer
                .send(BaseRecord::to(&topic).key(*user).payload(&value))
                .unwrap();
            good += 1;
        }
        if let Some((_, payload)) = bad.get(round) {
            producer
                .send(BaseRecord::to(&topic).key("bad-key").payload(payload))
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let mut env = service_env(&topic, &dir.path().join("state"), Mode::Explicit);
    env.push(("SEGMENTER_MODEL__CLUSTERS".into(), "2".into()));
    env.push(("SEGMENTER_MODEL__COMPONENTS".into(), "2".into()));
    env.push(("SEGMENTER_MODEL__CURVE_COMPONENTS".into(), "4".into()));
    env.push(("SEGMENTER_SNAPSHOT__DIAGNOSTICS_K".into(), "[2]".into()));
    env.push(("SEGMENTER_EVENTS__MIN_VALUE".into(), "1".into()));
    let snapshot = run_to_completion(&env, good);
    assert_eq!(
        snapshot.counts.events_applied, good,
        "every good event applied"
    );

    let letters = read_dead_letters(&dlq, bad.len(), Duration::from_secs(60));
    assert_eq!(
        letters.len(),
        bad.len(),
        "every bad message dead-lettered: {letters:?}"
    );
    for ((reason, payload), letter) in bad.iter().zip(&letters) {
        assert_eq!(letter.header("segmenter.reason"), Some(*reason));
        assert_eq!(&letter.payload, payload, "original bytes kept");
        assert_eq!(
            letter.key.as_deref(),
            Some(&b"bad-key"[..]),
            "original key kept"
        );
        assert_eq!(
            letter.header("segmenter.source.topic"),
            Some(topic.as_str())
        );
        assert!(
            letter.header("segmenter.source.offset").is_some()
                && letter.header("segmenter.source.partition").is_some(),
            "source partition and offset headers"
        );
    }
}

/// Resident memory of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn items_past_max_items_are_dead_lettered_as_catalogue_full_and_memory_stays_flat() {
    const MAX_ITEMS: usize = 40;
    const GOOD: u64 = 6_000;
    let dir = tempfile::tempdir().unwrap();
    let topic = unique_topic("catalogue");
    let dlq = format!("{topic}-dlq");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("queue.buffering.max.messages", "100000")
        .create()
        .unwrap();
    // Three events for never-seen items after every good one: a producer flooding the
    // catalogue. The good events use exactly MAX_ITEMS items, each one first seen before any
    // flood event (n = 0..MAX_ITEMS covers every item).
    let mut fresh = 0u64;
    for n in 0..GOOD {
        let user = format!("u{}", n % 200);
        let good = format!(
            r#"{{"user":"{user}","item":"i{}","rating":{}}}"#,
            (n * 7) % MAX_ITEMS as u64, // 7 and 40 coprime: the first 40 cover every item
            1 + n % 5
        );
        producer
            .send(BaseRecord::to(&topic).key(&user).payload(&good))
            .unwrap();
        if n < MAX_ITEMS as u64 {
            continue;
        }
        for _ in 0..3 {
            let flood = format!(r#"{{"user":"{user}","item":"new-{fresh}","rating":3}}"#);
            fresh += 1;
            producer
                .send(BaseRecord::to(&topic).key(&user).payload(&flood))
                .unwrap();
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).unwrap();

    let http = free_port();
    let mut env = service_env(&topic, &dir.path().join("state"), Mode::Explicit);
    env.push(("SEGMENTER_HTTP__LISTEN".into(), format!("127.0.0.1:{http}")));
    env.push(("SEGMENTER_MODEL__MAX_ITEMS".into(), MAX_ITEMS.to_string()));
    env.push(("SEGMENTER_KAFKA__BATCH_SIZE".into(), "500".into()));
    let mut service = Service::start(&env, &[]);
    service.wait_for_applied(GOOD / 4, Duration::from_secs(120));
    let rss_early = rss_kib(service.child.id());
    service.wait_for_applied(GOOD, Duration::from_secs(180));
    let rss_late = rss_kib(service.child.id());
    let (status, metrics) = http_get(&format!("http://127.0.0.1:{http}/metrics"), None);
    assert_eq!(status, 200);
    let rejected = metrics
        .lines()
        .find(|l| l.starts_with("segmenter_events_rejected_total") && l.contains("catalogue_full"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert_eq!(
        rejected as u64, fresh,
        "every flood event counted: {metrics}"
    );
    service.signal("-TERM");
    let (code, log) = service.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    let engine = segmenter::store::open(&dir.path().join("state"))
        .unwrap()
        .state
        .load_engine(config_for(&env).engine_params())
        .unwrap()
        .engine;
    assert_eq!(engine.counters().events_applied, GOOD);
    assert_eq!(engine.items().len(), MAX_ITEMS, "catalogue capped");
    // Three quarters of the flood arrived between the two readings; the catalogue (and with it
    // every per-item structure) did not grow, and neither did memory beyond noise.
    assert!(
        rss_late <= rss_early + 32 * 1024,
        "RSS grew from {rss_early} KiB to {rss_late} KiB"
    );

    let letters = read_dead_letters(&dlq, fresh as usize, Duration::from_secs(60));
    assert!(
        letters
            .iter()
            .all(|l| l.header("segmenter.reason") == Some("catalogue_full"))
    );
    let letters = letters.len() as u64;
    assert!(
        letters >= fresh,
        "{letters} of {fresh} flood events dead-lettered"
    );
}

/// The value of an unlabelled or `reason`-labelled sample in a metrics page (0 when absent).
fn metric_value(metrics: &str, name: &str, label: Option<&str>) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.split(['{', ' ']).next() == Some(name)
                && label.is_none_or(|label| l.contains(&format!("reason=\"{label}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[test]
fn users_past_max_users_are_dead_lettered_as_population_full_and_known_users_still_apply() {
    const MAX_USERS: u64 = 50;
    const GOOD: u64 = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let topic = unique_topic("population");
    let dlq = format!("{topic}-dlq");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("queue.buffering.max.messages", "100000")
        .create()
        .unwrap();
    // The good events come from exactly MAX_USERS users, each first seen before any stranger;
    // after that, two events of never-seen users precede every good one. One key, so one
    // partition and one order: once every good event is applied, every stranger's event before
    // it has been dead-lettered and counted.
    let send = |payload: &str| {
        producer
            .send(BaseRecord::to(&topic).key("one-partition").payload(payload))
            .unwrap();
    };
    let mut fresh = 0u64;
    for n in 0..GOOD {
        if n >= MAX_USERS {
            for _ in 0..2 {
                send(&format!(
                    r#"{{"user":"new-{fresh}","item":"i{}","rating":3}}"#,
                    n % 30
                ));
                fresh += 1;
            }
        }
        send(&format!(
            r#"{{"user":"u{}","item":"i{}","rating":{}}}"#,
            n % MAX_USERS,
            n % 30,
            1 + n % 5
        ));
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).unwrap();

    let http = free_port();
    let mut env = service_env(&topic, &dir.path().join("state"), Mode::Explicit);
    env.push(("SEGMENTER_HTTP__LISTEN".into(), format!("127.0.0.1:{http}")));
    env.push(("SEGMENTER_MODEL__MAX_USERS".into(), MAX_USERS.to_string()));
    env.push(("SEGMENTER_KAFKA__BATCH_SIZE".into(), "500".into()));
    let mut service = Service::start(&env, &[]);
    service.wait_for_applied(GOOD, Duration::from_secs(180));
    let (status, metrics) = http_get(&format!("http://127.0.0.1:{http}/metrics"), None);
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(
            &metrics,
            "segmenter_events_rejected_total",
            Some("population_full")
        ),
        fresh,
        "every stranger's event counted: {metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "segmenter_user_ids", None),
        MAX_USERS,
        "{metrics}"
    );
    service.signal("-TERM");
    let (code, log) = service.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    assert!(
        !log.iter()
            .any(|l| l.contains("refused by the engine after the poll loop")),
        "the poll loop's gate and the engine agree: {}",
        log.join("\n")
    );
    let engine = segmenter::store::open(&dir.path().join("state"))
        .unwrap()
        .state
        .load_engine(config_for(&env).engine_params())
        .unwrap()
        .engine;
    assert_eq!(engine.counters().events_applied, GOOD);
    assert_eq!(engine.users().len() as u64, MAX_USERS, "population capped");
    assert_eq!(engine.users().get("new-0"), None);

    let letters = read_dead_letters(&dlq, fresh as usize, Duration::from_secs(60));
    assert!(
        letters
            .iter()
            .all(|l| l.header("segmenter.reason") == Some("population_full"))
    );
    assert!(
        letters.len() as u64 >= fresh,
        "{} of {fresh} strangers' events dead-lettered",
        letters.len()
    );
}

#[test]
fn a_message_too_big_to_dead_letter_whole_is_cut_and_never_stalls_consumption() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique_topic("huge");
    let dlq = format!("{topic}-dlq");
    // The topic takes 5 MB messages; a 2 MB event exceeds every producer's default limit.
    create_topic(&topic, 2, &[("max.message.bytes", "5242880")]);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("message.max.bytes", "5242880")
        .create()
        .unwrap();
    let huge = format!(
        r#"{{"user":"u1","item":"i1","rating":3,"pad":"{}"}}"#,
        "x".repeat(2 << 20)
    );
    let mut good = 0u64;
    for n in 0..400u64 {
        let user = format!("u{}", n % 40);
        let value = format!(
            r#"{{"user":"{user}","item":"i{}","rating":{}}}"#,
            n % 30,
            1 + n % 5
        );
        producer
            .send(BaseRecord::to(&topic).key(&user).payload(&value))
            .unwrap();
        good += 1;
        if n == 100 {
            for partition in 0..2 {
                producer
                    .send(
                        BaseRecord::to(&topic)
                            .partition(partition)
                            .key("huge")
                            .payload(&huge),
                    )
                    .unwrap();
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();

    let mut env = service_env(&topic, &dir.path().join("state"), Mode::Explicit);
    env.push(("SEGMENTER_MODEL__CLUSTERS".into(), "2".into()));
    env.push(("SEGMENTER_MODEL__COMPONENTS".into(), "2".into()));
    env.push(("SEGMENTER_MODEL__CURVE_COMPONENTS".into(), "4".into()));
    env.push(("SEGMENTER_SNAPSHOT__DIAGNOSTICS_K".into(), "[2]".into()));
    // Every good event on both partitions, past the huge ones, is applied.
    let snapshot = run_to_completion(&env, good);
    assert_eq!(snapshot.counts.events_applied, good);

    let letters = read_dead_letters(&dlq, 2, Duration::from_secs(60));
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.header("segmenter.reason"), Some("oversized"));
        assert_eq!(
            letter.header("segmenter.truncated_from_bytes"),
            Some(huge.len().to_string().as_str())
        );
        assert_eq!(
            letter.payload.len(),
            segmenter::kafka::dead_letter::MAX_DEAD_LETTER_PAYLOAD
        );
    }
}

#[test]
fn a_dead_letter_topic_that_refuses_letters_is_reported_and_consumption_resumes_when_it_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique_topic("refusing");
    let dlq = format!("{topic}-dlq");
    // Every letter (headers alone exceed 100 bytes) is too large for this dead-letter topic.
    create_topic(&dlq, 1, &[("max.message.bytes", "100")]);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let mut good = 0u64;
    for n in 0..300u64 {
        let user = format!("u{}", n % 30);
        let value = format!(
            r#"{{"user":"{user}","item":"i{}","rating":{}}}"#,
            n % 20,
            1 + n % 5
        );
        producer
            .send(BaseRecord::to(&topic).key(&user).payload(&value))
            .unwrap();
        good += 1;
        if n == 10 {
            producer
                .send(BaseRecord::to(&topic).key("bad").payload("{not json"))
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let http = free_port();
    let mut env = service_env(&topic, &dir.path().join("state"), Mode::Explicit);
    env.push(("SEGMENTER_HTTP__LISTEN".into(), format!("127.0.0.1:{http}")));
    env.push(("SEGMENTER_KAFKA__RETRY_BACKOFF_MS".into(), "200".into()));
    env.push(("SEGMENTER_MODEL__CLUSTERS".into(), "2".into()));
    env.push(("SEGMENTER_MODEL__COMPONENTS".into(), "2".into()));
    env.push(("SEGMENTER_MODEL__CURVE_COMPONENTS".into(), "4".into()));
    env.push(("SEGMENTER_SNAPSHOT__DIAGNOSTICS_K".into(), "[2]".into()));
    let mut service = Service::start(&env, &["--exit-at-events", &good.to_string()]);
    service.wait_for(Duration::from_secs(60), |v| {
        v["fields"]["message"]
            == "the dead-letter topic refuses letters: consumption waits; not ready"
    });
    let base = format!("http://127.0.0.1:{http}");
    let (status, body) = http_get(&format!("{base}/readyz"), None);
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["dead_letters_refused"], true, "{body}");
    let (_, metrics) = http_get(&format!("{base}/metrics"), None);
    let refused = metrics
        .lines()
        .find(|l| l.starts_with("segmenter_dead_letters_refused_total "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(refused >= 1.0, "{metrics}");

    // The operator fixes the topic: the letter goes through and every event is applied.
    alter_topic(&dlq, &[("max.message.bytes", "1048588")]);
    let (code, log) = service.wait_exit(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    assert!(
        log.iter()
            .any(|l| l.contains("dead letters delivered again")),
        "{}",
        log.join("\n")
    );
    let letters = read_dead_letters(&dlq, 1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].header("segmenter.reason"), Some("malformed"));
    assert_eq!(
        latest_stored_snapshot(&dir.path().join("state"))
            .counts
            .events_applied,
        good
    );
}

#[test]
fn titles_arriving_after_the_events_reach_the_cluster_profiles() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = dir.path().join("ratings.csv");
    let items = dir.path().join("items.csv");
    succeed(
        std::process::Command::new(BIN)
            .args([
                "generate", "--users", "200", "--items", "120", "--events", "4000",
            ])
            .args(["--segments", "4", "--out"])
            .arg(&ratings)
            .arg("--items-out")
            .arg(&items),
    );
    let topic = unique_topic("titled");
    let items_topic = format!("{topic}-items");
    // The catalogue topic exists, empty, when the service starts.
    create_topic(&items_topic, 1, &[]);
    produce(&topic, 2, &ratings);
    let http = free_port();
    let mut env = service_env(&topic, &dir.path().join("state"), Mode::Explicit);
    env.push(("SEGMENTER_HTTP__LISTEN".into(), format!("127.0.0.1:{http}")));
    env.push(("SEGMENTER_KAFKA__ITEMS_TOPIC".into(), items_topic.clone()));
    env.push(("SEGMENTER_SNAPSHOT__INTERVAL_MS".into(), "300".into()));
    env.push(("SEGMENTER_SNAPSHOT__MAX_STALENESS_MS".into(), "300".into()));
    env.push(("SEGMENTER_MODEL__CLUSTERS".into(), "4".into()));
    let mut service = Service::start(&env, &[]);
    service.wait_for(Duration::from_secs(120), |v| {
        v["fields"]["message"] == "snapshot built" && v["fields"]["events_applied"] == 4_000
    });
    // Only now does the catalogue arrive: no new event comes, yet a new snapshot shows it.
    let header_only = dir.path().join("none.csv");
    std::fs::write(&header_only, "user,item,rating,ts\n").unwrap();
    succeed(
        std::process::Command::new(BIN)
            .args([
                "produce",
                "--brokers",
                &brokers(),
                "--topic",
                &topic,
                "--ratings",
            ])
            .arg(&header_only)
            .arg("--items")
            .arg(&items)
            .args(["--items-topic", &items_topic]),
    );
    let url = format!("http://127.0.0.1:{http}/clusters/0?limit=5");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let titled = loop {
        let (status, body) = http_get(&url, None);
        if status == 200 {
            let cluster: serde_json::Value = serde_json::from_str(&body).unwrap();
            let top = cluster["top_items"].as_array().cloned().unwrap_or_default();
            if !top.is_empty() && top.iter().all(|t| t["title"].is_string()) {
                break top;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "titles never reached the profiles: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let catalogue = std::fs::read_to_string(&items).unwrap();
    for item in &titled {
        let id = item["item"].as_str().unwrap();
        let title = item["title"].as_str().unwrap();
        assert!(
            catalogue
                .lines()
                .any(|l| l.starts_with(&format!("{id},")) && l.contains(title)),
            "{id} is titled {title} in the catalogue"
        );
    }
    service.signal("-TERM");
    let (code, _) = service.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0));
}

/// Every record of `topic`'s partition 0 that a `read_committed` consumer sees, in order, up
/// to the partition's end: (key, payload; `None` for a tombstone).
fn read_committed(topic: &str) -> Vec<(String, Option<serde_json::Value>)> {
    read_to_end(topic, "read_committed")
}

/// A file retracting every rating of the first `users` users of `ratings` (they leave).
fn retract_users(ratings: &Path, users: usize) -> (PathBuf, u64, Vec<String>) {
    let text = std::fs::read_to_string(ratings).expect("read ratings");
    let mut lines = text.lines();
    let header = lines.next().expect("header");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let mut leavers: Vec<String> = rows.iter().map(|r| r[0].to_string()).collect();
    leavers.sort();
    leavers.dedup();
    leavers.truncate(users);
    let last_ts: i64 = rows
        .iter()
        .map(|r| r[3].parse::<i64>().unwrap())
        .max()
        .unwrap();
    let mut cells: Vec<(String, String)> = rows
        .iter()
        .filter(|r| leavers.iter().any(|u| u == r[0]))
        .map(|r| (r[0].to_string(), r[1].to_string()))
        .collect();
    cells.sort();
    cells.dedup();
    let mut body = format!("{header}\n");
    for (user, item) in &cells {
        body.push_str(&format!("{user},{item},,{}\n", last_ts + 1));
    }
    let path = ratings.with_extension("leavers.csv");
    std::fs::write(&path, body).expect("write retractions");
    (path, cells.len() as u64, leavers)
}

/// A stored snapshot's assignments as a map (`None`: no longer stored).
fn stored_table(
    store: &segmenter::store::SnapshotStore,
    version: u64,
) -> Option<std::collections::BTreeMap<String, u32>> {
    Some(store.assignments(version).unwrap()?.into_iter().collect())
}

/// Applies one version's change records to a table of user → segment.
fn apply_changes(
    table: &mut std::collections::BTreeMap<String, u32>,
    records: &[serde_json::Value],
) {
    for r in records {
        assert_eq!(r["distance"].is_null(), r["to"].is_null(), "{r}");
        let user = r["user"].as_str().unwrap().to_string();
        match r["to"].as_u64() {
            Some(to) => table.insert(user, to as u32),
            None => table.remove(&user),
        };
    }
}

/// The change feed and the assignments table, consumed from the beginning, end at exactly the
/// last published snapshot's assignments although the service was SIGKILLed at random moments
/// (mid-transaction included): every version's changes are its diff against the version
/// published before it, once each; users whose ratings were all retracted get a tombstone.
#[test]
fn change_feed_and_assignments_table_end_at_the_snapshot_across_sigkills() {
    const EVENTS: u64 = 9_000;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ratings = generate(dir.path(), Mode::Explicit, 300, EVENTS as usize, 73);
    let (leavers_file, retractions, leavers) = retract_users(&ratings, 4);
    let mut parts = split_ratings(&ratings, 4);
    parts.push((leavers_file, retractions));
    let total = EVENTS + retractions;
    let topic = unique_topic("feed");
    let (changes, assignments, publications) = (
        format!("{topic}-changes"),
        format!("{topic}-assignments"),
        format!("{topic}-publications"),
    );
    let mut env = service_env(&topic, &state, Mode::Explicit);
    for (key, value) in [
        ("SEGMENTER_KAFKA__CHANGES_TOPIC", changes.as_str()),
        ("SEGMENTER_KAFKA__ASSIGNMENTS_TOPIC", assignments.as_str()),
        ("SEGMENTER_KAFKA__PUBLICATIONS_TOPIC", publications.as_str()),
        ("SEGMENTER_KAFKA__BATCH_SIZE", "300"),
        ("SEGMENTER_SNAPSHOT__INTERVAL_MS", "200"),
        ("SEGMENTER_SNAPSHOT__MAX_STALENESS_MS", "200"),
        // Small: versions are pruned behind the feed, as in production.
        ("SEGMENTER_SNAPSHOT__RETENTION", "4"),
    ] {
        env.push((key.into(), value.into()));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(73);
    let mut produced = 0;
    let (last, rounds) = parts.split_last().expect("installments");
    for (round, (part, count)) in rounds.iter().enumerate() {
        produced += count;
        kill_round(
            round,
            (&topic, part, produced),
            &env,
            &mut rng,
            |service, rng| {
                // Past a publication or into one, at a random moment.
                if rng.random_bool(0.5) {
                    service.wait_for(Duration::from_secs(60), |v| {
                        v["fields"]["message"] == "segment changes published"
                    });
                }
                std::thread::sleep(Duration::from_millis(rng.random_range(0..60)));
            },
        );
    }
    produce(&topic, 3, &last.0);
    let mut service = Service::start(&env, &[]);
    service.wait_for_applied(total, Duration::from_secs(120));
    let built = service.wait_for(Duration::from_secs(60), |v| {
        v["fields"]["message"] == "snapshot built"
            && v["fields"]["events_applied"].as_u64() == Some(total)
    });
    let final_version = built["fields"]["version"].as_u64().unwrap();
    service.wait_for(Duration::from_secs(60), |v| {
        v["fields"]["message"] == "segment changes published"
            && v["fields"]["version"].as_u64() >= Some(final_version)
    });
    service.signal("-TERM");
    let (code, log) = service.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", log.join("\n"));

    let store = segmenter::store::open(&state).unwrap().snapshots;
    let published: Vec<(u64, u64, u64)> = read_committed(&publications)
        .into_iter()
        .map(|(_, v)| {
            let v = v.expect("a publication record");
            let field = |name: &str| v[name].as_u64().expect("a number");
            (field("version"), field("previous"), field("changes"))
        })
        .collect();
    assert!(
        published.len() >= 3,
        "several versions published: {published:?}"
    );
    let mut last_version = 0;
    for &(version, previous, _) in &published {
        assert_eq!(
            previous, last_version,
            "each version follows the last one published"
        );
        assert!(version > previous);
        last_version = version;
    }
    assert!(last_version >= final_version);
    // Every version still stored was published, up to the last one stored (a stop publishes
    // what is stored before the service exits); retention pruned the older ones.
    let stored: Vec<u64> = store.snapshot_versions().unwrap();
    let versions: Vec<u64> = published.iter().map(|&(v, _, _)| v).collect();
    assert!(
        stored.iter().all(|v| versions.contains(v)),
        "every stored version published: stored {stored:?}, published {versions:?}"
    );
    assert!(
        stored.len() <= 4 + 2 && stored.len() < versions.len(),
        "pruned behind the feed: stored {stored:?}, published {versions:?}"
    );

    // The change feed: each version's records are its diff from the previous publication,
    // one per user, and applied in order they rebuild the last published snapshot.
    let change_records = read_committed(&changes);
    // Not asserted (kills land where they land): how many records the kills left in
    // transactions that were aborted, invisible to the checks below.
    eprintln!(
        "change records: {} committed, {} written",
        change_records.len(),
        read_to_end(&changes, "read_uncommitted").len()
    );
    let mut by_version: std::collections::BTreeMap<u64, Vec<serde_json::Value>> =
        Default::default();
    for (key, value) in change_records {
        let value = value.expect("changes are never tombstones");
        assert_eq!(value["user"].as_str(), Some(key.as_str()));
        by_version
            .entry(value["version"].as_u64().unwrap())
            .or_default()
            .push(value);
    }
    let mut table = std::collections::BTreeMap::<String, u32>::new();
    for &(version, previous, count) in &published {
        let records = by_version.remove(&version).unwrap_or_default();
        assert_eq!(
            records.len() as u64,
            count,
            "v{version}: no change lost or repeated"
        );
        // Versions pruned since: their records still chain, checked below through the table.
        let (Some(before), Some(after)) = (
            (previous == 0)
                .then(Default::default)
                .or_else(|| stored_table(&store, previous)),
            stored_table(&store, version),
        ) else {
            apply_changes(&mut table, &records);
            continue;
        };
        let mut expected: Vec<(String, Option<u32>, Option<u32>)> = before
            .iter()
            .filter(|(u, s)| after.get(*u) != Some(s))
            .map(|(u, &s)| (u.clone(), Some(s), after.get(u).copied()))
            .chain(
                after
                    .iter()
                    .filter(|(u, _)| !before.contains_key(*u))
                    .map(|(u, &s)| (u.clone(), None, Some(s))),
            )
            .collect();
        expected.sort();
        let mut got: Vec<(String, Option<u32>, Option<u32>)> = records
            .iter()
            .map(|r| {
                let segment = |name: &str| r[name].as_u64().map(|s| s as u32);
                (
                    r["user"].as_str().unwrap().to_string(),
                    segment("from"),
                    segment("to"),
                )
            })
            .collect();
        got.sort();
        assert_eq!(got, expected, "v{version}'s changes against v{previous}");
        apply_changes(&mut table, &records);
        assert_eq!(table, after, "the feed rebuilds v{version}");
    }
    assert!(
        by_version.is_empty(),
        "records outside a publication: {by_version:?}"
    );
    let expected = stored_table(&store, last_version).expect("the last version published stored");
    assert_eq!(table, expected, "the change feed rebuilds v{last_version}");
    for leaver in &leavers {
        assert!(!expected.contains_key(leaver), "{leaver} left");
    }

    // The assignments table: the last record per user, a tombstone deleting it.
    let mut materialised = std::collections::BTreeMap::<String, u32>::new();
    let mut tombstones = 0;
    for (key, value) in read_committed(&assignments) {
        match value {
            Some(v) => {
                materialised.insert(key, v["segment"].as_u64().unwrap() as u32);
            }
            None => {
                tombstones += 1;
                materialised.remove(&key);
            }
        }
    }
    assert!(
        tombstones >= leavers.len(),
        "a tombstone per leaver ({tombstones})"
    );
    assert_eq!(
        materialised, expected,
        "the assignments table is v{last_version}"
    );
}
