//! A broker of a 3-node cluster dies mid-stream and nothing is lost or counted twice: implicit
//! plays (values add up, so a replayed batch would show in every sum) are produced to a topic
//! replicated on all three nodes while `segmenter run` consumes it; one node is SIGKILLed while
//! events are being produced and consumed, later started again and rejoins. The service's last
//! snapshot (the group's, the changelog and the group model being on, so their transactions and
//! rounds live through it too) has exactly the statistics of one `segmenter replay` of the same
//! events.
//!
//! Needs the cluster the test command starts (`KAFKA_NODES=3 scripts/kafka.sh start`):
//! `SEGMENTER_TEST_CLUSTER_BROKERS` and `SEGMENTER_TEST_CLUSTER_PORT` (node 1's port).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use segmenter::event::Mode;

fn cluster_brokers() -> String {
    std::env::var("SEGMENTER_TEST_CLUSTER_BROKERS").expect(
        "SEGMENTER_TEST_CLUSTER_BROKERS is not set: run the suite with scripts/test.sh, which \
         starts a 3-node Kafka cluster (or KAFKA_NODES=3 KAFKA_PORT=19192 scripts/kafka.sh start \
         and export SEGMENTER_TEST_CLUSTER_BROKERS=127.0.0.1:19192,127.0.0.1:19194,127.0.0.1:19196 \
         SEGMENTER_TEST_CLUSTER_PORT=19192)",
    )
}

/// `scripts/kafka.sh <command> <node>` on the test cluster.
fn cluster_node(command: &str, node: u32) {
    let port = std::env::var("SEGMENTER_TEST_CLUSTER_PORT")
        .expect("SEGMENTER_TEST_CLUSTER_PORT is not set (see the module doc)");
    succeed(
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh"))
            .args([command, &node.to_string()])
            .env("KAFKA_NODES", "3")
            .env("KAFKA_PORT", port),
    );
}

#[test]
fn a_broker_killed_mid_stream_loses_nothing_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), Mode::Implicit, 400, 40_000, 11);
    let parts = split_ratings(&ratings, 4);
    let topic = unique_topic("cluster");
    let state = dir.path().join("state");
    let mut env = service_env(&topic, &state, Mode::Implicit);
    for (key, value) in [
        ("SEGMENTER_KAFKA__BROKERS", cluster_brokers()),
        ("SEGMENTER_SNAPSHOT__INTERVAL_MS", "200".into()),
        ("SEGMENTER_SNAPSHOT__MAX_STALENESS_MS", "200".into()),
        // The changelog's transactions and the group model's rounds go through the dying
        // node too.
        (
            "SEGMENTER_KAFKA__CHANGELOG_TOPIC",
            format!("{topic}-changelog"),
        ),
        ("SEGMENTER_KAFKA__GROUP_MODEL_INTERVAL_MS", "500".into()),
    ] {
        env.retain(|(k, _)| k != key);
        env.push((key.into(), value));
    }

    let mut service = Service::start(&env, &[]);
    let mut produced = 0;
    finish_producing(start_producing(&cluster_brokers(), &topic, 3, &parts[0].0));
    produced += parts[0].1;
    service.wait_for_applied(produced, Duration::from_secs(120));

    // Node 1 (the first bootstrap server; it leads a share of the partitions and maybe the
    // group's coordinator) dies while the next installment is produced and consumed.
    let producer = start_producing(&cluster_brokers(), &topic, 3, &parts[1].0);
    service.wait_for_applied(produced + 1, Duration::from_secs(120));
    cluster_node("kill-node", 1);
    finish_producing(producer);
    produced += parts[1].1;
    finish_producing(start_producing(&cluster_brokers(), &topic, 3, &parts[2].0));
    produced += parts[2].1;
    service.wait_for_applied(produced, Duration::from_secs(180));

    // It comes back and catches up while the last installment arrives.
    cluster_node("start-node", 1);
    finish_producing(start_producing(&cluster_brokers(), &topic, 3, &parts[3].0));
    produced += parts[3].1;
    // With the group model on, the snapshots are the group's (this instance coordinates).
    service.wait_for(Duration::from_secs(180), |v| {
        v["fields"]["message"] == "group model published"
            && v["fields"]["messages_covered"].as_u64() >= Some(produced)
    });
    service.signal("-TERM");
    let (code, log) = service.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", log.join("\n"));

    let served = latest_stored_snapshot(&state);
    assert_eq!(served.counts.events_applied, produced, "every event once");
    let replayed = replay_snapshot(&ratings, &dir.path().join("replay"), &env);
    assert_same_model(&served, &replayed);
    assert_eq!(
        persisted_position(&state),
        produced,
        "offsets cover every message once"
    );
}
