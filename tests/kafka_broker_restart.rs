//! The broker is stopped and restarted mid-stream (its data kept): the service reports the
//! outage, keeps its state, resumes by itself and ends where `segmenter replay` ends. In its
//! own test binary because it restarts the shared test broker.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use segmenter::event::Mode;

#[test]
fn service_survives_a_broker_restart_mid_stream() {
    let port = std::env::var("SEGMENTER_TEST_KAFKA_PORT")
        .expect("SEGMENTER_TEST_KAFKA_PORT is not set: run the suite with scripts/test.sh");
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), Mode::Explicit, 400, 24_000, 51);
    let text = std::fs::read_to_string(&ratings).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (header, body) = (lines[0], &lines[1..]);
    let first = dir.path().join("first.csv");
    let second = dir.path().join("second.csv");
    std::fs::write(&first, format!("{header}\n{}\n", body[..12_000].join("\n"))).unwrap();
    std::fs::write(
        &second,
        format!("{header}\n{}\n", body[12_000..].join("\n")),
    )
    .unwrap();

    let topic = unique_topic("restart");
    produce(&topic, 3, &first);
    let mut env = service_env(&topic, &dir.path().join("state"), Mode::Explicit);
    env.push(("SEGMENTER_KAFKA__BATCH_SIZE".into(), "300".into()));
    env.push(("SEGMENTER_KAFKA__RETRY_BACKOFF_MS".into(), "200".into()));
    let mut service = Service::start(&env, &["--exit-at-events", "24000"]);
    service.wait_for_applied(12_000, Duration::from_secs(120));

    let restart = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh"))
        .arg("restart")
        .env("KAFKA_PORT", &port)
        .output()
        .expect("restart the broker");
    assert!(
        restart.status.success(),
        "{}",
        String::from_utf8_lossy(&restart.stderr)
    );
    produce(&topic, 3, &second);

    let (code, log) = service.wait_exit(Duration::from_secs(180));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    assert!(
        log.iter().any(|l| l.contains("broker unreachable")),
        "the outage is reported:\n{}",
        log.join("\n")
    );
    let from_kafka = segmenter::store::Store::open(&dir.path().join("state"))
        .unwrap()
        .latest_snapshot()
        .unwrap()
        .expect("final snapshot");
    let from_file = replay_snapshot(&ratings, &dir.path().join("replay"), &env);
    assert_same_model(&from_kafka, &from_file);
}
