//! Partitions that move between instances are restored from the changelog, exactly: 2
//! instances consume a 6-partition topic of implicit plays (values add up, so an event applied
//! twice would show in a user's row), a third joins (a rebalance: it restores the partitions
//! it gets from the changelog instead of reading the ratings topic from the beginning), one of
//! the first two is SIGKILLed mid-stream and never restarted (its partitions are restored by
//! the survivors), and more events arrive. The state dirs of the instances left hold, between
//! them, every user exactly once with exactly the row one `segmenter replay` of the same events
//! gives, and offsets covering every message once.
//!
//! Needs the broker the test command starts (`SEGMENTER_TEST_BROKERS`).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use segmenter::event::Mode;

const PARTITIONS: i32 = 6;

/// Every user with ratings in a state dir no process holds, with the user's stored row.
fn rows(state: &Path, env: &[(String, String)]) -> BTreeMap<String, BTreeMap<String, f64>> {
    let config = config_for(env);
    let engine = segmenter::store::open(state)
        .expect("open state")
        .state
        .load_engine(config.engine_params())
        .expect("load state")
        .engine;
    let mut out = BTreeMap::new();
    for (u, id) in engine.users().ids().iter().enumerate() {
        let row = engine.stored_vector(u as u32);
        if row.nnz() > 0 {
            let cells = row
                .iter()
                .map(|(j, v)| (engine.items().id(j).to_string(), v))
                .collect();
            out.insert(id.clone(), cells);
        }
    }
    out
}

#[test]
fn moved_partitions_are_restored_from_the_changelog_and_nothing_is_lost_or_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), Mode::Implicit, 600, 60_000, 23);
    let parts = split_ratings(&ratings, 3);
    let topic = unique_topic("rescale");
    let group = format!("g-{topic}");
    let env = group_env(&topic, dir.path(), Mode::Implicit, None);
    // The ratings topic exists before the first instance (the changelog is made like it).
    finish_producing(start_producing(&brokers(), &topic, PARTITIONS, &parts[0].0));
    let mut produced = parts[0].1;

    let (mut a, mut b) = two_instances(&env, dir.path(), (&topic, &group), produced);

    // A third instance: the group moves partitions to it, and it restores them.
    let (mut c, taken_over) = start_group_instance(&env, dir.path(), "c");
    let next_offsets = taken_over["fields"]["next_offsets"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let users_restored: u64 = restores(&c.service.seen).iter().sum();
    assert!(
        users_restored > 0 && next_offsets.contains(':'),
        "the new instance restored users and consumes on from recorded offsets \
         ({users_restored} users, next offsets {next_offsets}):\n{}",
        c.service.seen.join("\n")
    );

    // One of the first two dies while the next installment is produced and consumed.
    let producer = kill_mid_installment(
        (&topic, &group, PARTITIONS),
        &parts[1].0,
        produced,
        &mut a.service,
    );
    let restores_before_kill: usize = [&mut b, &mut c]
        .into_iter()
        .map(|i| {
            i.service.seen.extend(i.service.lines.try_iter());
            restores(&i.service.seen).len()
        })
        .sum();
    finish_producing(producer);
    produced += parts[1].1;
    finish_producing(start_producing(&brokers(), &topic, PARTITIONS, &parts[2].0));
    produced += parts[2].1;
    wait_until(
        Duration::from_secs(180),
        "every installment consumed",
        || group_progress(&topic, &group, PARTITIONS) >= produced,
    );

    b.service.signal("-TERM");
    c.service.signal("-TERM");
    let mut logs = vec![];
    let mut states = vec![];
    for instance in [b, c] {
        let (code, log) = instance.service.wait_exit(Duration::from_secs(60));
        assert_eq!(code, Some(0), "{}", log.join("\n"));
        logs.push(log);
        states.push(instance.state);
    }
    let after_kill: Vec<u64> = logs
        .iter()
        .flat_map(|log| restores(log))
        .skip(restores_before_kill)
        .collect();
    assert!(
        after_kill.iter().any(|&users| users > 0),
        "the killed instance's partitions were restored by the survivors: {after_kill:?}"
    );

    // Between them, the survivors hold every user once, with the row one replay gives.
    let replay_state = dir.path().join("replay");
    replay_snapshot(&ratings, &replay_state, &env);
    let expected = rows(&replay_state, &env);
    let mut held: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for state in &states {
        for (user, row) in rows(state, &env) {
            assert!(
                held.insert(user.clone(), row).is_none(),
                "{user} is held by two instances"
            );
        }
    }
    assert_eq!(held.len(), expected.len(), "every user held");
    for (user, row) in &expected {
        assert_eq!(held.get(user), Some(row), "the row of {user}");
    }
    let consumed: u64 = states.iter().map(|s| persisted_position(s)).sum();
    assert_eq!(consumed, produced, "offsets cover every message once");

    // Scaling in to one: a restarted instance keeps the partitions its state dir holds at the
    // offsets the changelog records, and restores the rest.
    let (mut b, _) = start_group_instance(&env, dir.path(), "b");
    b.service.wait_for(Duration::from_secs(60), |v| {
        v["fields"]["message"] == "partitions taken over: consuming"
            && v["fields"]["partitions"] == "{0, 1, 2, 3, 4, 5}"
    });
    b.service.signal("-TERM");
    let state = b.state.clone();
    let (code, log) = b.service.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    let kept = log
        .iter()
        .filter(|l| l.contains("partition owned: the state dir holds what the changelog records"))
        .count();
    assert!(kept > 0, "its own partitions kept:\n{}", log.join("\n"));
    assert_eq!(rows(&state, &env), expected, "one instance holds everyone");
    assert_eq!(persisted_position(&state), produced);
}

/// Instances "a" and "b" of `env`'s group on `topic`, once the group has consumed the first
/// `produced` messages.
fn two_instances(
    env: &[(String, String)],
    dir: &Path,
    (topic, group): (&str, &str),
    produced: u64,
) -> (GroupInstance, GroupInstance) {
    let (a, _) = start_group_instance(env, dir, "a");
    let (b, _) = start_group_instance(env, dir, "b");
    wait_until(
        Duration::from_secs(120),
        "the first installment consumed",
        || group_progress(topic, group, PARTITIONS) >= produced,
    );
    (a, b)
}

/// The users each "partition restored from the changelog" line of `log` reports, in order.
fn restores(log: &[String]) -> Vec<u64> {
    log.iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "partition restored from the changelog")
        .map(|v| v["fields"]["users"].as_u64().unwrap_or(0))
        .collect()
}

/// An instance SIGKILLed again and again while it consumes, restarted each time on its state
/// dir: wherever the kill falls (between its state commit and the changelog's transaction
/// included, where the two disagree and the partition is restored from the changelog), it
/// ends holding exactly the rows of one replay, its offsets covering every message once.
#[test]
fn an_instance_killed_mid_stream_and_restarted_on_its_state_dir_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), Mode::Implicit, 400, 40_000, 29);
    let topic = unique_topic("restart");
    let group = format!("g-{topic}");
    let env = group_env(&topic, dir.path(), Mode::Implicit, None);
    // The topic exists (the changelog is made like it); the rest arrives while the instance runs.
    let parts = split_ratings(&ratings, 2);
    finish_producing(start_producing(&brokers(), &topic, PARTITIONS, &parts[0].0));
    let producer = start_producing(&brokers(), &topic, PARTITIONS, &parts[1].0);
    let produced = parts[0].1 + parts[1].1;
    let mut restores = vec![];
    let mut state = None;
    for kill in 0..4 {
        let (mut instance, _) = start_group_instance(&env, dir.path(), "a");
        let before = group_progress(&topic, &group, PARTITIONS);
        wait_until(
            Duration::from_secs(120),
            "progress since the last kill",
            || {
                group_progress(&topic, &group, PARTITIONS) > before
                    || group_progress(&topic, &group, PARTITIONS) >= produced
            },
        );
        instance.service.child.kill().expect("SIGKILL");
        let _ = instance.service.child.wait();
        instance
            .service
            .seen
            .extend(instance.service.lines.try_iter());
        restores.extend(
            instance
                .service
                .seen
                .iter()
                .filter(|l| l.contains("partition restored from the changelog"))
                .cloned(),
        );
        state = Some(instance.state);
        eprintln!(
            "kill {kill}: {} of {produced} committed",
            group_progress(&topic, &group, PARTITIONS)
        );
    }
    finish_producing(producer);
    let (last, _) = start_group_instance(&env, dir.path(), "a");
    wait_until(Duration::from_secs(120), "every message consumed", || {
        group_progress(&topic, &group, PARTITIONS) >= produced
    });
    last.service.signal("-TERM");
    let (code, log) = last.service.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    let state = state.expect("a state dir");
    assert_eq!(state, last.state);
    let replay_state = dir.path().join("replay");
    replay_snapshot(&ratings, &replay_state, &env);
    assert_eq!(
        rows(&state, &env),
        rows(&replay_state, &env),
        "every row as one replay"
    );
    assert_eq!(persisted_position(&state), produced, "every message once");
    eprintln!("{} partition restores over the kills", restores.len());
}

/// With `[kafka] standby`, a survivor takes a dead instance's partitions over from its warm
/// copies (reading only the changelog written after them): 2 instances on 6 partitions, each
/// following the other's changelog; one is SIGKILLed while events flow and never restarted.
/// The survivor's take-overs start from standby copies, and it ends holding exactly the rows of
/// one replay, its offsets covering every message once.
#[test]
fn a_standby_takes_a_dead_instances_partitions_over_from_its_copies_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), Mode::Implicit, 500, 50_000, 37);
    let parts = split_ratings(&ratings, 3);
    let topic = unique_topic("standby");
    let group = format!("g-{topic}");
    let mut env = group_env(&topic, dir.path(), Mode::Implicit, None);
    env.push(("SEGMENTER_KAFKA__STANDBY".into(), "true".into()));
    finish_producing(start_producing(&brokers(), &topic, PARTITIONS, &parts[0].0));
    let mut produced = parts[0].1;

    let (mut a, mut b) = two_instances(&env, dir.path(), (&topic, &group), produced);
    // Both hold copies of the other's partitions.
    wait_until(Duration::from_secs(60), "standby copies on both", || {
        [&a, &b].iter().all(|i| {
            metric(&i.url, "segmenter_changelog_standby_cells").is_some_and(|cells| cells > 0.0)
        })
    });
    let (_, ready) = readyz(&a.url);
    assert_eq!(ready["standby"], true, "{ready}");

    let producer = kill_mid_installment(
        (&topic, &group, PARTITIONS),
        &parts[1].0,
        produced,
        &mut b.service,
    );
    finish_producing(producer);
    produced += parts[1].1;
    finish_producing(start_producing(&brokers(), &topic, PARTITIONS, &parts[2].0));
    produced += parts[2].1;
    a.service.wait_for(Duration::from_secs(120), |v| {
        v["fields"]["message"] == "partitions taken over: consuming"
            && v["fields"]["partitions"] == "{0, 1, 2, 3, 4, 5}"
    });
    wait_until(
        Duration::from_secs(180),
        "every installment consumed",
        || group_progress(&topic, &group, PARTITIONS) >= produced,
    );
    let from_copies = metric(&a.url, "segmenter_changelog_standby_takeovers_total").unwrap_or(0.0);
    a.service.signal("-TERM");
    let state = a.state.clone();
    let (code, log) = a.service.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    let standby_restores: Vec<serde_json::Value> = log
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["message"] == "partition restored from the changelog"
                && v["fields"]["standby_cells"].as_u64() > Some(0)
        })
        .collect();
    assert!(
        from_copies >= 1.0 && !standby_restores.is_empty(),
        "the dead instance's partitions were taken over from standby copies \
         ({from_copies} by the metric):\n{}",
        log.join("\n")
    );
    eprintln!(
        "take-overs from standby copies: {}",
        standby_restores
            .iter()
            .map(|v| format!(
                "partition {} ({} cells copied, read on from changelog offset {}, {:.3} s)",
                v["fields"]["partition"],
                v["fields"]["standby_cells"],
                v["fields"]["standby_position"],
                v["fields"]["seconds"]
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );

    let replay_state = dir.path().join("replay");
    replay_snapshot(&ratings, &replay_state, &env);
    assert_eq!(
        rows(&state, &env),
        rows(&replay_state, &env),
        "every row as one replay"
    );
    assert_eq!(persisted_position(&state), produced, "every message once");
}
