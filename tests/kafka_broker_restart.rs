//! Broker outages. The broker is stopped and restarted mid-stream (its data kept): the service
//! reports the outage, keeps its state, resumes by itself and ends where `segmenter replay`
//! ends. And a broker that is not there at start: the service reports not ready, waits, and
//! consumes everything once a broker comes up. In their own test binary because they stop and
//! start brokers.

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
    let from_kafka = latest_stored_snapshot(&dir.path().join("state"));
    let from_file = replay_snapshot(&ratings, &dir.path().join("replay"), &env);
    assert_same_model(&from_kafka, &from_file);
    assert_same_partition(
        &dir.path().join("state"),
        &dir.path().join("replay"),
        &config_for(&env),
    );
}

/// Two consecutive free ports (broker and controller).
fn free_port_pair() -> u16 {
    loop {
        let port = free_port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

fn kafka_sh(command: &str, port: u16) {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh"))
        .arg(command)
        .env("KAFKA_PORT", port.to_string())
        .env_remove("KAFKA_CONTROLLER_PORT")
        .output()
        .expect("kafka.sh");
    assert!(
        out.status.success(),
        "kafka.sh {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn service_started_before_the_broker_waits_not_ready_then_consumes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let brokers = format!("127.0.0.1:{port}");
    let http = free_port();
    let topic = unique_topic("late");
    let mut env = service_env(&topic, &dir.path().join("state"), Mode::Explicit);
    env.push(("SEGMENTER_KAFKA__BROKERS".into(), brokers.clone()));
    env.push(("SEGMENTER_KAFKA__RETRY_BACKOFF_MS".into(), "200".into()));
    env.push(("SEGMENTER_HTTP__LISTEN".into(), format!("127.0.0.1:{http}")));
    let mut service = Service::start(&env, &["--exit-at-events", "8000"]);
    service.wait_for(Duration::from_secs(30), |v| {
        v["fields"]["message"] == "HTTP API listening"
    });
    let readyz = format!("http://127.0.0.1:{http}/readyz");
    let (status, body) = http_get(&readyz, None);
    assert_eq!(status, 503, "not ready without a broker: {body}");
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["broker_reachable"], false);
    assert_eq!(state["state_open"], true);

    // The broker arrives; the events follow. It is stopped however the test ends.
    struct Broker(u16);
    impl Drop for Broker {
        fn drop(&mut self) {
            kafka_sh("stop", self.0);
        }
    }
    kafka_sh("start", port);
    let _broker = Broker(port);
    let ratings = generate(dir.path(), Mode::Explicit, 200, 8_000, 71);
    succeed(
        Command::new(BIN)
            .args([
                "produce",
                "--brokers",
                &brokers,
                "--topic",
                &topic,
                "--partitions",
                "2",
                "--ratings",
            ])
            .arg(&ratings),
    );
    let (code, log) = service.wait_exit(Duration::from_secs(180));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    let snapshot = latest_stored_snapshot(&dir.path().join("state"));
    assert_eq!(snapshot.counts.events_applied, 8_000);
    assert!(
        log.iter().any(|l| l.contains("broker reachable")),
        "{}",
        log.join("\n")
    );
}
