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
//! The model's snapshot is the group's: every instance serves it as its latest
//! (`GET /snapshots/latest`, byte for byte), with the Naive Bayes report and cluster profiles
//! that one engine holding every user computes under the same segments. The change feed and
//! the snapshots topic carry each version once for the whole group: no user's change twice in a
//! version, each change starting from the segment the previous one left, and every user's last
//! change the segment the group serves.
//!
//! The rounds run with `[kafka] group_part_bytes` at its minimum, so every large message goes
//! out in parts and the figures above hold after they are put together.
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
    let mut env = group_env(&topic, dir.path(), Mode::Implicit, Some(500));
    let (changes_topic, snapshots_topic) = (format!("{topic}-changes"), format!("{topic}-snaps"));
    env.push((
        "SEGMENTER_KAFKA__CHANGES_TOPIC".into(),
        changes_topic.clone(),
    ));
    env.push((
        "SEGMENTER_KAFKA__SNAPSHOTS_TOPIC".into(),
        snapshots_topic.clone(),
    ));
    // Small parts: every block, partial and broadcast of the rounds travels in several
    // messages, put together on arrival.
    env.push(("SEGMENTER_KAFKA__GROUP_PART_BYTES".into(), "4096".into()));
    finish_producing(start_producing(&brokers(), &topic, PARTITIONS, &parts[0].0));
    let mut produced = parts[0].1;

    let mut a = start_group_instance(&env, dir.path(), "a").0;
    let mut b = start_group_instance(&env, dir.path(), "b").0;
    let mut c = start_group_instance(&env, dir.path(), "c").0;
    wait_until(
        Duration::from_secs(120),
        "the first installment consumed",
        || group_progress(&topic, &group, PARTITIONS) >= produced,
    );

    // One dies while the next installment is produced and consumed; another joins later.
    let producer = kill_mid_installment(
        (&topic, &group, PARTITIONS),
        &parts[1].0,
        produced,
        &mut a.service,
    );
    finish_producing(producer);
    produced += parts[1].1;
    let mut d = start_group_instance(&env, dir.path(), "d").0;
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
    let mut segments: std::collections::BTreeMap<String, u64> = Default::default();
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
                segments.insert(user.to_string(), *segment);
            }
            counted = per_segment;
            counted == sizes
        },
    );

    let snapshot = &model["snapshot"];
    assert_eq!(snapshot["version"], model["version"]);
    // The group's snapshot has one replay's statistics too, and covers every message.
    let typed: segmenter::snapshot::Snapshot =
        serde_json::from_value(snapshot.clone()).expect("a snapshot");
    assert_eq!(typed.counts.users, replay.counts.users);
    assert_eq!(typed.counts.items, replay.counts.items);
    assert_eq!(typed.counts.ratings, replay.counts.ratings);
    assert_eq!(typed.counts.events_applied, produced);
    assert_eq!(
        typed.offsets.values().map(|&o| o as u64).sum::<u64>(),
        produced
    );
    assert!(
        (typed.pca.total_variance - replay.pca.total_variance).abs()
            <= 1e-9 * replay.pca.total_variance
    );
    for (x, y) in typed
        .pca
        .explained_variance
        .iter()
        .zip(&replay.pca.explained_variance)
    {
        assert!((x - y).abs() <= 1e-9 * y, "explained variance {x} vs {y}");
    }
    assert_eq!(typed.kmeans.sizes.iter().sum::<u64>(), replay.counts.users);
    assert!(typed.kmeans.inertia <= 1.02 * replay.kmeans.inertia);
    for instance in live {
        let (status, body) = http_get(&format!("{}/snapshots/latest", instance.url), None);
        assert_eq!(status, 200, "{body}");
        let served: serde_json::Value = serde_json::from_str(&body).expect("snapshot JSON");
        assert_eq!(
            &served, snapshot,
            "{} serves the group's snapshot",
            instance.url
        );
        let user = users.iter().next().expect("a user");
        let (status, body) = http_get(&format!("{}/users/{user}", instance.url), None);
        assert_eq!(status, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(answer["cluster"].as_u64(), segments.get(*user).copied());
    }
    // The listings every user in one place would give, from any instance: the latest
    // version's assignments, and a cluster's members page by page.
    for instance in live {
        let (status, body) = http_get(
            &format!("{}/snapshots/latest/assignments", instance.url),
            None,
        );
        assert_eq!(status, 200, "{body}");
        let listed: std::collections::BTreeMap<String, u64> = body
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("an NDJSON line");
                (
                    v["user"].as_str().expect("user").to_string(),
                    v["cluster"].as_u64().expect("cluster"),
                )
            })
            .collect();
        assert_eq!(
            listed, segments,
            "{} lists every user's segment",
            instance.url
        );
        let mut members = vec![];
        let mut cursor = String::new();
        loop {
            let (status, body) = http_get(
                &format!(
                    "{}/clusters/0/members?limit=37&cursor={cursor}",
                    instance.url
                ),
                None,
            );
            assert_eq!(status, 200, "{body}");
            let page: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            members.extend(
                page["members"]
                    .as_array()
                    .expect("members")
                    .iter()
                    .filter_map(|m| m.as_str().map(String::from)),
            );
            match page["next_cursor"].as_str() {
                Some(next) => cursor = next.to_string(),
                None => break,
            }
        }
        let expected: Vec<String> = segments
            .iter()
            .filter(|(_, s)| **s == 0)
            .map(|(u, _)| u.clone())
            .collect();
        assert_eq!(members, expected, "cluster 0's members, page by page");
    }
    assert_group_snapshot_describes_the_segments(
        snapshot,
        &segments,
        &dir.path().join("replay"),
        &env,
    );
    assert_one_feed(&changes_topic, &snapshots_topic, &segments, snapshot);

    // Idle now: every instance answers the next cuts without a pass over its ratings.
    for instance in [&mut b, &mut c, &mut d] {
        instance.service.wait_for(Duration::from_secs(30), |v| {
            v["fields"]["message"] == "group cut unchanged: answered from the last one"
        });
    }

    for instance in [b, c, d] {
        instance.service.signal("-TERM");
        let (code, log) = instance.service.wait_exit(Duration::from_secs(60));
        assert_eq!(code, Some(0), "{}", log.join("\n"));
    }
}

/// The snapshot's Naive Bayes report and cluster profiles are the ones one engine holding every
/// user (the replay's state dir) computes under the group's segments.
fn assert_group_snapshot_describes_the_segments(
    snapshot: &serde_json::Value,
    segments: &std::collections::BTreeMap<String, u64>,
    replay_state: &std::path::Path,
    env: &[(String, String)],
) {
    use segmenter::snapshot::validation::{NaiveBayesReport, naive_bayes_report, tfidf_profiles};
    let config = config_for(env);
    let engine = segmenter::store::open(replay_state)
        .expect("open the replay's state")
        .state
        .load_engine(config.engine_params())
        .expect("load it")
        .engine;
    let k = snapshot["kmeans"]["k"].as_u64().expect("k") as usize;
    let d = engine.items().len();
    let labels: Vec<u32> = (0..engine.users().len())
        .map(|u| {
            segments
                .get(engine.users().id(u as u32))
                .map_or(segmenter::engine::NO_CLUSTER, |&s| s as u32)
        })
        .collect();
    let seed = config.engine_params().seed;
    let percent = config.snapshot.holdout_percent;
    let expected = naive_bayes_report(engine.vectors(), &labels, k, d, 1.0, |u| {
        segmenter::engine::held_out(engine.users().id(u as u32), seed, percent)
    });
    let got: NaiveBayesReport =
        serde_json::from_value(snapshot["validation"]["naive_bayes"].clone()).expect("report");
    assert_eq!(got, expected, "the group's Naive Bayes report");
    assert!(expected.holdout_users > 0);

    let profiles = tfidf_profiles(engine.vectors(), &labels, k, d);
    let clusters = snapshot["clusters"].as_array().expect("clusters");
    assert_eq!(clusters.len(), k);
    for (c, cluster) in clusters.iter().enumerate() {
        let ranked = profiles.ranked(c);
        assert_eq!(cluster["n_items"].as_u64(), Some(ranked.len() as u64));
        assert_eq!(cluster["size"].as_u64(), Some(profiles.sizes[c]));
        let top = cluster["top_items"].as_array().expect("top items");
        assert_eq!(top.len(), ranked.len().min(50), "cluster {c}");
        let scale = profiles.score(c, ranked[0]);
        for item in top {
            let id = item["item"].as_str().expect("item id");
            let j = engine.items().get(id).expect("a known item") as usize;
            let score = item["score"].as_f64().expect("score");
            assert!(
                (score - profiles.score(c, j)).abs() <= 1e-12 * scale,
                "cluster {c} item {id}: {score} vs {}",
                profiles.score(c, j)
            );
        }
        let last = top.last().and_then(|t| t["score"].as_f64()).unwrap_or(0.0);
        let kth = profiles.score(c, ranked[top.len() - 1]);
        assert!(
            (last - kth).abs() <= 1e-12 * scale,
            "cluster {c}: the top {} items",
            top.len()
        );
    }
}

/// The change feed and the snapshots topic carry each version once for the whole group.
fn assert_one_feed(
    changes_topic: &str,
    snapshots_topic: &str,
    segments: &std::collections::BTreeMap<String, u64>,
    snapshot: &serde_json::Value,
) {
    let mut last: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    let mut changes = 0;
    for (user, record) in read_to_end(changes_topic, "read_committed") {
        let record = record.expect("a change record");
        let version = record["version"].as_u64().expect("version");
        let to = record["to"].as_u64().expect("to");
        let from = record["from"].as_u64();
        match last.get(&user) {
            Some(&(v, segment)) => {
                assert!(v < version, "{user}: version {version} after {v}");
                assert_eq!(
                    from,
                    Some(segment),
                    "{user}: a change from where the last one left"
                );
            }
            None => assert_eq!(from, None, "{user}: the first change comes from nowhere"),
        }
        last.insert(user, (version, to));
        changes += 1;
    }
    assert_eq!(last.len(), segments.len(), "every user in the feed");
    for (user, segment) in segments {
        assert_eq!(
            last.get(user).map(|l| l.1),
            Some(*segment),
            "{user}'s last change"
        );
    }
    let published = read_to_end(snapshots_topic, "read_committed");
    let mut versions: Vec<u64> = published
        .iter()
        .map(|(key, _)| key.parse().expect("a version key"))
        .collect();
    let total = versions.len();
    versions.dedup();
    assert_eq!(versions.len(), total, "each version published once");
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert_eq!(
        published.last().and_then(|(_, s)| s.as_ref()),
        Some(snapshot)
    );
    eprintln!(
        "one feed: {changes} changes over {} versions for {} users",
        versions.len(),
        segments.len()
    );
}

/// Users whose every rating is retracted leave the group's segments: the instance holding each
/// publishes a change to no segment and tombstones, so `/users/{id}` stops answering them on
/// every instance, the change feed ends their chain with `"to": null`, the assignments table
/// forgets them, and the snapshot counts the users a replay of the same events counts.
#[test]
fn users_whose_ratings_are_all_retracted_leave_the_group_snapshot_and_its_feed() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), Mode::Explicit, 300, 20_000, 43);
    let topic = unique_topic("leavers");
    let mut env = group_env(&topic, dir.path(), Mode::Explicit, Some(300));
    let (changes_topic, table_topic) = (format!("{topic}-changes"), format!("{topic}-table"));
    env.push((
        "SEGMENTER_KAFKA__CHANGES_TOPIC".into(),
        changes_topic.clone(),
    ));
    env.push((
        "SEGMENTER_KAFKA__ASSIGNMENTS_TOPIC".into(),
        table_topic.clone(),
    ));
    finish_producing(start_producing(&brokers(), &topic, PARTITIONS, &ratings));
    let text = std::fs::read_to_string(&ratings).expect("ratings");
    let rows: Vec<&str> = text.lines().skip(1).collect();
    let mut produced = rows.len() as u64;

    let a = start_group_instance(&env, dir.path(), "a").0;
    let b = start_group_instance(&env, dir.path(), "b").0;
    let covering = |n: u64| {
        move |url: &str| group_model(url).is_some_and(|m| m["messages_covered"].as_u64() == Some(n))
    };
    wait_until(Duration::from_secs(120), "a model of every rating", || {
        covering(produced)(&a.url)
    });

    // Every rating of 5 users retracted (an empty rating), after it in their partitions.
    let leavers: std::collections::BTreeSet<&str> = rows
        .iter()
        .filter_map(|l| l.split(',').next())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .take(5)
        .collect();
    // After every rating in time too: a replay orders events by their timestamps.
    let after_all = rows
        .iter()
        .filter_map(|l| l.split(',').nth(3)?.parse::<i64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let mut cells = std::collections::BTreeSet::new();
    let mut retractions = String::from("user,item,rating,ts\n");
    for row in &rows {
        let f: Vec<&str> = row.split(',').collect();
        if leavers.contains(f[0]) && cells.insert((f[0], f[1])) {
            retractions.push_str(&format!("{},{},,{after_all}\n", f[0], f[1]));
        }
    }
    let retractions_file = dir.path().join("retractions.csv");
    std::fs::write(&retractions_file, &retractions).expect("write");
    finish_producing(start_producing(
        &brokers(),
        &topic,
        PARTITIONS,
        &retractions_file,
    ));
    produced += cells.len() as u64;
    wait_until(
        Duration::from_secs(120),
        "a model after the retractions",
        || covering(produced)(&a.url) && covering(produced)(&b.url),
    );
    let model = group_model(&a.url).expect("a model");

    // Each leaver: gone from every instance's answers, its feed ended, its table row forgotten.
    let changes = read_to_end(&changes_topic, "read_committed");
    let table = read_to_end(&table_topic, "read_committed");
    let segment_before = |user: &str| -> Option<u64> {
        changes
            .iter()
            .filter(|(key, _)| key == user)
            .filter_map(|(_, r)| r.as_ref().and_then(|r| r["to"].as_u64()))
            .next_back()
    };
    for user in &leavers {
        for instance in [&a, &b] {
            let (status, body) = http_get(&format!("{}/users/{user}", instance.url), None);
            assert_eq!(status, 404, "{user} on {}: {body}", instance.url);
            let (status, _) = http_get(&format!("{}/group/users/{user}", instance.url), None);
            assert_eq!(status, 404);
        }
        let last = changes
            .iter()
            .filter(|(key, _)| key == user)
            .filter_map(|(_, r)| r.as_ref())
            .next_back()
            .expect("a leaver's changes");
        assert!(last["to"].is_null(), "{user} leaves: {last}");
        assert_eq!(
            last["from"].as_u64(),
            segment_before(user),
            "{user} leaves from where it was"
        );
        let row = table
            .iter()
            .rfind(|(key, _)| key == user)
            .expect("a table row");
        assert!(row.1.is_none(), "{user}'s table row is a tombstone");
    }

    // Everyone else is still served, and the snapshot counts what a replay of the same events
    // counts.
    let mut all = text.clone();
    all.push_str(retractions.trim_start_matches("user,item,rating,ts\n"));
    let everything = dir.path().join("everything.csv");
    std::fs::write(&everything, all).expect("write");
    let replay = replay_snapshot(&everything, &dir.path().join("replay"), &env);
    assert_eq!(
        model["snapshot"]["counts"]["users"].as_u64(),
        Some(replay.counts.users)
    );
    assert_eq!(model["users"].as_u64(), Some(replay.counts.users));
    let stayer = rows
        .iter()
        .filter_map(|l| l.split(',').next())
        .find(|u| !leavers.contains(u))
        .expect("a user who stays");
    assert_eq!(http_get(&format!("{}/users/{stayer}", b.url), None).0, 200);
    eprintln!(
        "{} users left (v{}); {} remain",
        leavers.len(),
        model["version"],
        replay.counts.users
    );
    for instance in [a, b] {
        instance.service.signal("-TERM");
        let (code, log) = instance.service.wait_exit(Duration::from_secs(60));
        assert_eq!(code, Some(0), "{}", log.join("\n"));
    }
}
