//! One model for the whole consumer group: 3 instances on a 6-partition topic of implicit
//! plays, one SIGKILLed mid-stream and never restarted, a new one added later (two
//! rebalances, partitions restored from the changelog). After the stream ends, every live
//! instance serves the same group model (`GET /group`), built by whichever instance owns
//! partition 0 from every instance's partial sums: it covers every message, with the
//! statistics of one `segmenter replay` of the same events (counts equal, explained variance
//! within 1e-9) and a clustering as good as the replay's cold solve (inertia at most 1.02x); and
//! every instance answers every user's segment (`GET /group/users/{id}`) alike, as many per
//! segment as the model counts.
//!
//! Needs the broker the test command starts (`SEGMENTER_TEST_BROKERS`).

mod common;

use std::time::Duration;

use common::*;
use segmenter::event::Mode;

const PARTITIONS: i32 = 6;

/// The group model an instance serves, if any.
fn group_model(url: &str) -> Option<serde_json::Value> {
    let (status, body) = try_http_get(&format!("{url}/group"))?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

#[test]
fn every_instance_serves_one_group_model_equal_to_a_replay_through_a_kill_and_a_join() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), Mode::Implicit, 600, 60_000, 31);
    let parts = split_ratings(&ratings, 3);
    let topic = unique_topic("group");
    let group = format!("g-{topic}");
    let env = group_env(&topic, dir.path(), Some(500));
    finish_producing(start_producing(&brokers(), &topic, PARTITIONS, &parts[0].0));
    let mut produced = parts[0].1;

    let mut a = start_group_instance(&env, dir.path(), "a").0;
    let b = start_group_instance(&env, dir.path(), "b").0;
    let c = start_group_instance(&env, dir.path(), "c").0;
    wait_until(
        Duration::from_secs(120),
        "the first installment consumed",
        || group_progress(&topic, &group, PARTITIONS) >= produced,
    );

    // One dies while the next installment is produced and consumed; another joins later.
    let producer = start_producing(&brokers(), &topic, PARTITIONS, &parts[1].0);
    wait_until(
        Duration::from_secs(120),
        "the second installment under way",
        || group_progress(&topic, &group, PARTITIONS) > produced,
    );
    a.service.child.kill().expect("SIGKILL");
    let _ = a.service.child.wait();
    finish_producing(producer);
    produced += parts[1].1;
    let d = start_group_instance(&env, dir.path(), "d").0;
    finish_producing(start_producing(&brokers(), &topic, PARTITIONS, &parts[2].0));
    produced += parts[2].1;
    wait_until(
        Duration::from_secs(180),
        "every installment consumed",
        || group_progress(&topic, &group, PARTITIONS) >= produced,
    );

    let live = [&b, &c, &d];
    let mut models = vec![];
    wait_until(
        Duration::from_secs(120),
        "every live instance serves the same group model covering every message",
        || {
            models = live.iter().map(|i| group_model(&i.url)).collect();
            let first = &models[0];
            first.as_ref().is_some_and(|m| {
                m["messages_covered"].as_u64() == Some(produced)
                    && models.iter().all(|other| other == &models[0])
            })
        },
    );
    let model = models[0].clone().expect("a model");

    let replay = replay_snapshot(&ratings, &dir.path().join("replay"), &env);
    assert_eq!(model["users"].as_u64(), Some(replay.counts.users));
    assert_eq!(model["ratings"].as_u64(), Some(replay.counts.ratings));
    let total = model["total_variance"].as_f64().expect("total");
    assert!(
        (total - replay.pca.total_variance).abs() <= 1e-9 * replay.pca.total_variance,
        "total variance {total} vs {}",
        replay.pca.total_variance
    );
    let ratios: Vec<f64> = model["explained_variance_ratio"]
        .as_array()
        .expect("ratios")
        .iter()
        .filter_map(|v| v.as_f64())
        .collect();
    assert_eq!(ratios.len(), replay.pca.explained_variance_ratio.len());
    for (x, y) in ratios.iter().zip(&replay.pca.explained_variance_ratio) {
        assert!((x - y).abs() <= 1e-9, "explained-variance ratio {x} vs {y}");
    }
    let inertia = model["inertia"].as_f64().expect("inertia");
    assert!(
        inertia <= 1.02 * replay.kmeans.inertia,
        "inertia {inertia} vs the replay's cold {}",
        replay.kmeans.inertia
    );
    let sizes: u64 = model["sizes"]
        .as_array()
        .expect("sizes")
        .iter()
        .filter_map(|v| v.as_u64())
        .sum();
    assert_eq!(sizes, replay.counts.users, "every user in a segment");
    eprintln!(
        "group model v{}: {} users, inertia {inertia:.2} vs replay {:.2} ({:.4}x), rounds {}",
        model["version"],
        model["users"],
        replay.kmeans.inertia,
        inertia / replay.kmeans.inertia,
        model["rounds"]
    );
    // Every user's segment, the same whichever instance is asked, and as many per segment as
    // the model counts.
    let text = std::fs::read_to_string(&ratings).expect("ratings");
    let users: std::collections::BTreeSet<&str> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .collect();
    assert_eq!(users.len() as u64, replay.counts.users);
    let sizes: Vec<u64> = model["sizes"]
        .as_array()
        .expect("sizes")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    let mut counted = vec![];
    wait_until(
        Duration::from_secs(60),
        "every instance answers every user's segment alike",
        || {
            let mut per_segment = vec![0u64; sizes.len()];
            for user in &users {
                let answers: Vec<Option<u64>> = live
                    .iter()
                    .map(|i| {
                        let (status, body) =
                            try_http_get(&format!("{}/group/users/{user}", i.url))?;
                        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                        (status == 200).then(|| v["segment"].as_u64())?
                    })
                    .collect();
                let Some(Some(segment)) = answers.first() else {
                    return false;
                };
                if answers.iter().any(|a| a != &Some(*segment)) {
                    return false;
                }
                let Some(slot) = per_segment.get_mut(*segment as usize) else {
                    return false;
                };
                *slot += 1;
            }
            counted = per_segment;
            counted == sizes
        },
    );
    for instance in [b, c, d] {
        instance.service.signal("-TERM");
        let (code, log) = instance.service.wait_exit(Duration::from_secs(60));
        assert_eq!(code, Some(0), "{}", log.join("\n"));
    }
}
