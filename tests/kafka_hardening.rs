//! Faults of the running service against the real Kafka broker started by `scripts/test.sh`:
//! a change feed that cannot publish keeps the disk bounded and says so; a feed whose record of
//! what it published is gone, or whose transactional id another producer took, stops and says
//! so instead of publishing wrong versions; readiness means partitions of the configured topic.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use segmenter::event::Mode;

/// The service's environment with the change feed on (its topics named after `topic`), an API
/// on a port of its own, a snapshot every 200 ms and a short retry backoff. Returns it with the
/// API's base URL.
fn feed_env(topic: &str, state: &Path, retention: usize) -> (Vec<(String, String)>, String) {
    let http = free_port();
    let mut env = service_env(topic, state, Mode::Explicit);
    for (key, value) in [
        ("SEGMENTER_KAFKA__CHANGES_TOPIC", format!("{topic}-changes")),
        (
            "SEGMENTER_KAFKA__ASSIGNMENTS_TOPIC",
            format!("{topic}-assignments"),
        ),
        (
            "SEGMENTER_KAFKA__PUBLICATIONS_TOPIC",
            format!("{topic}-publications"),
        ),
        ("SEGMENTER_KAFKA__BATCH_SIZE", "200".into()),
        ("SEGMENTER_KAFKA__RETRY_BACKOFF_MS", "100".into()),
        ("SEGMENTER_SNAPSHOT__INTERVAL_MS", "200".into()),
        ("SEGMENTER_SNAPSHOT__MAX_STALENESS_MS", "200".into()),
        ("SEGMENTER_SNAPSHOT__RETENTION", retention.to_string()),
        ("SEGMENTER_HTTP__LISTEN", format!("127.0.0.1:{http}")),
    ] {
        env.push((key.into(), value));
    }
    (env, format!("http://127.0.0.1:{http}"))
}

/// Produces `parts` (on top of `already` events in the topic) one at a time, each once the
/// previous one is in a built snapshot, so every part makes at least one new snapshot version.
/// Returns the version of the snapshot that covers them all.
fn stream_in_parts(
    service: &mut Service,
    topic: &str,
    already: u64,
    parts: &[(std::path::PathBuf, u64)],
) -> u64 {
    let mut produced = already;
    let mut version = 0;
    for (part, count) in parts {
        produce(topic, 2, part);
        produced += count;
        let built = service.wait_for(Duration::from_secs(60), |v| {
            v["fields"]["message"] == "snapshot built"
                && v["fields"]["events_applied"].as_u64() >= Some(produced)
        });
        version = built["fields"]["version"].as_u64().expect("a version");
    }
    version
}

fn stored_versions(base: &str) -> Vec<u64> {
    let (status, body) = http_get(&format!("{base}/snapshots"), None);
    assert_eq!(status, 200, "{body}");
    let listing: serde_json::Value = serde_json::from_str(&body).expect("JSON listing");
    listing["snapshots"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["version"].as_u64().expect("a version"))
        .collect()
}

/// The assignments table read back from its compacted topic (read_committed): user → segment.
fn assignments_table(topic: &str) -> std::collections::BTreeMap<String, u64> {
    let mut table = std::collections::BTreeMap::new();
    for (key, value) in read_to_end(topic, "read_committed") {
        match value {
            Some(v) => table.insert(key, v["segment"].as_u64().expect("segment")),
            None => table.remove(&key),
        };
    }
    table
}

/// A stored snapshot's assignments (user → segment) in a state dir no process holds.
fn stored_assignments(state: &Path, version: u64) -> std::collections::BTreeMap<String, u64> {
    segmenter::store::open(state)
        .expect("open state")
        .snapshots
        .assignments(version)
        .expect("readable assignments")
        .unwrap_or_else(|| panic!("snapshot {version} stored"))
        .into_iter()
        .map(|(user, segment)| (user, u64::from(segment)))
        .collect()
}

/// The publication records of a feed, in order: (version, previous).
fn publications(topic: &str) -> Vec<(u64, u64)> {
    read_to_end(topic, "read_committed")
        .into_iter()
        .map(|(_, v)| {
            let v = v.expect("a publication record");
            (
                v["version"].as_u64().expect("version"),
                v["previous"].as_u64().expect("previous"),
            )
        })
        .collect()
}

/// Issue: with the changes topic refusing every record, 112 snapshots were kept after 135 s
/// (retention 10) and `/readyz` said 200. Now at most `retention + 2` stay, the gauge and
/// readiness say the feed is behind, and once the topic accepts records the feed publishes the
/// newest version as a diff from the last one published, and the table equals it.
#[test]
fn a_feed_that_cannot_publish_keeps_snapshots_bounded_says_so_and_catches_up() {
    const RETENTION: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ratings = generate(dir.path(), Mode::Explicit, 200, 4_000, 19);
    let parts = split_ratings(&ratings, 12);
    let topic = unique_topic("stuck-feed");
    // Every change record is larger than this topic takes.
    create_topic(
        &format!("{topic}-changes"),
        1,
        &[("max.message.bytes", "100")],
    );
    let (env, base) = feed_env(&topic, &state, RETENTION);
    let mut service = Service::start(&env, &[]);
    let latest = stream_in_parts(&mut service, &topic, 0, &parts);
    assert!(latest >= 12, "a version per part at least: {latest}");

    let versions = stored_versions(&base);
    assert!(
        versions.len() <= RETENTION + 2,
        "{} of {latest} versions kept with retention {RETENTION}: {versions:?}",
        versions.len()
    );
    let (status, ready) = readyz(&base);
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["feed_behind"], true, "{ready}");
    let unpublished = metric(&base, "segmenter_feed_unpublished_versions").unwrap_or(0.0);
    assert!(
        unpublished >= 1.0 && unpublished <= (RETENTION + 2) as f64,
        "unpublished versions gauge: {unpublished}"
    );
    assert_eq!(metric(&base, "segmenter_feed_published_version"), Some(0.0));

    // The operator fixes the topic: the feed catches up by itself, ready again.
    alter_topic(
        &format!("{topic}-changes"),
        &[("max.message.bytes", "1048588")],
    );
    wait_until(Duration::from_secs(120), "the feed catches up", || {
        metric(&base, "segmenter_feed_published_version") == Some(latest as f64)
    });
    wait_until(Duration::from_secs(30), "ready again", || {
        readyz(&base).0 == 200
    });
    assert_eq!(
        metric(&base, "segmenter_feed_unpublished_versions"),
        Some(0.0)
    );
    service.signal("-TERM");
    let (code, log) = service.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", log.join("\n"));

    let published = publications(&format!("{topic}-publications"));
    assert!(!published.is_empty());
    let mut last = 0;
    for &(version, previous) in &published {
        assert_eq!(
            previous, last,
            "each diff from the last published: {published:?}"
        );
        last = version;
    }
    assert_eq!(last, latest);
    let expected = stored_assignments(&state, latest);
    assert_eq!(
        assignments_table(&format!("{topic}-assignments")),
        expected,
        "the table is the latest snapshot"
    );
}

/// Issue: a lost publications record made the feed republish everything from an empty base.
/// Now the feed stops (not ready, `segmenter_feed_stopped` 1) and publishes nothing until a
/// start with `[kafka] feed_resync = true`, which publishes the latest version whole.
#[test]
fn a_lost_publications_record_stops_the_feed_until_a_resync_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ratings = generate(dir.path(), Mode::Explicit, 200, 3_000, 23);
    let parts = split_ratings(&ratings, 3);
    let topic = unique_topic("lost-record");
    let (env, base) = feed_env(&topic, &state, 3);
    let publications_topic = format!("{topic}-publications");

    let mut service = Service::start(&env, &[]);
    stream_in_parts(&mut service, &topic, 0, &parts[..1]);
    wait_until(Duration::from_secs(60), "a first publication", || {
        metric(&base, "segmenter_feed_published_version").unwrap_or(0.0) >= 1.0
    });
    service.signal("-TERM");
    assert_eq!(service.wait_exit(Duration::from_secs(60)).0, Some(0));
    let before = publications(&publications_topic).len();
    assert!(before >= 1);

    delete_topic(&publications_topic);
    let mut service = Service::start(&env, &[]);
    service.wait_for(Duration::from_secs(60), |v| {
        v["fields"]["message"] == "change feed stopped: not ready"
    });
    stream_in_parts(&mut service, &topic, parts[0].1, &parts[1..2]);
    let (status, ready) = readyz(&base);
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["feed_stopped"], true, "{ready}");
    assert_eq!(metric(&base, "segmenter_feed_stopped"), Some(1.0));
    service.signal("-TERM");
    let (code, log) = service.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    assert!(
        !log.iter().any(|l| l.contains("segment changes published")),
        "nothing published from an empty base without a resync"
    );

    // Asked for: the latest version whole, relative to nothing.
    let mut env = env;
    env.push(("SEGMENTER_KAFKA__FEED_RESYNC".into(), "true".into()));
    let mut service = Service::start(&env, &[]);
    let latest = stream_in_parts(&mut service, &topic, parts[0].1 + parts[1].1, &parts[2..]);
    wait_until(Duration::from_secs(60), "the resync publishes", || {
        metric(&base, "segmenter_feed_published_version") == Some(latest as f64)
    });
    service.signal("-TERM");
    assert_eq!(service.wait_exit(Duration::from_secs(60)).0, Some(0));
    let published = publications(&publications_topic);
    assert_eq!(published.first().map(|p| p.1), Some(0), "{published:?}");
    let expected = stored_assignments(&state, latest);
    assert_eq!(assignments_table(&format!("{topic}-assignments")), expected);
}

/// The publications topic must be compacted: under `delete`, retention would one day drop the
/// record of the last version published. An existing one that is not is refused (the feed
/// waits, not ready) until it is.
#[test]
fn an_uncompacted_publications_topic_is_refused_until_it_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ratings = generate(dir.path(), Mode::Explicit, 200, 2_000, 29);
    let topic = unique_topic("uncompacted");
    let publications_topic = format!("{topic}-publications");
    create_topic(&publications_topic, 1, &[("cleanup.policy", "delete")]);
    let (env, base) = feed_env(&topic, &state, 3);
    let mut service = Service::start(&env, &[]);
    let refused = service.wait_for(Duration::from_secs(60), |v| {
        v["fields"]["message"] == "change feed interrupted; retrying"
    });
    assert!(
        refused["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cleanup.policy=compact")),
        "{refused}"
    );
    stream_in_parts(&mut service, &topic, 0, &[(ratings, 2_000)]);
    let (status, ready) = readyz(&base);
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["feed_behind"], true, "{ready}");
    assert!(publications(&publications_topic).is_empty());

    alter_topic(&publications_topic, &[("cleanup.policy", "compact")]);
    wait_until(Duration::from_secs(120), "published once compacted", || {
        metric(&base, "segmenter_feed_published_version").unwrap_or(0.0) >= 1.0
    });
    service.signal("-TERM");
    assert_eq!(service.wait_exit(Duration::from_secs(60)).0, Some(0));
}

/// Issue: two instances sharing a transactional id fenced each other six times each in 100 s,
/// both stayed ready, and one reported a published version above its own snapshot version.
/// Now a fenced feed stops and its instance is not ready; neither reports a version it did not
/// publish.
#[test]
fn instances_sharing_a_transactional_id_stop_their_feeds_and_report_no_foreign_version() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate(dir.path(), Mode::Explicit, 300, 6_000, 31);
    let parts = split_ratings(&ratings, 3);
    let topic = unique_topic("shared-txn");
    create_topic(&topic, 2, &[]);
    let shared_id = format!("{topic}-txn");
    let start = |name: &str| {
        let (mut env, base) = feed_env(&topic, &dir.path().join(name), 3);
        env.retain(|(k, _)| k != "SEGMENTER_KAFKA__INSTANCE_ID");
        env.push((
            "SEGMENTER_KAFKA__INSTANCE_ID".into(),
            format!("{topic}-{name}"),
        ));
        env.push((
            "SEGMENTER_KAFKA__TRANSACTIONAL_ID".into(),
            shared_id.clone(),
        ));
        (Service::start(&env, &[]), base)
    };
    let (mut first, first_base) = start("a");
    stream_in_parts(&mut first, &topic, 0, &parts[..1]);
    wait_until(
        Duration::from_secs(60),
        "the first instance publishes",
        || metric(&first_base, "segmenter_feed_published_version").unwrap_or(0.0) >= 1.0,
    );
    let (mut second, second_base) = start("b");
    // Both instances get events (two partitions), so both try to publish.
    for (part, _) in &parts[1..] {
        produce(&topic, 2, part);
    }
    for (service, base) in [(&mut first, &first_base), (&mut second, &second_base)] {
        service.wait_for(Duration::from_secs(120), |v| {
            v["fields"]["message"] == "change feed stopped: not ready"
        });
        let (status, ready) = readyz(base);
        assert_eq!(status, 503, "{ready}");
        assert_eq!(ready["feed_stopped"], true, "{ready}");
        assert_eq!(metric(base, "segmenter_feed_stopped"), Some(1.0));
        let published = metric(base, "segmenter_feed_published_version").unwrap_or(0.0);
        let own = metric(base, "segmenter_snapshot_version").unwrap_or(0.0);
        assert!(
            published <= own,
            "{base} reports version {published} published, above its own {own}"
        );
    }
    // The second found the first's record and never published: it reports none of its
    // versions.
    assert_eq!(
        metric(&second_base, "segmenter_feed_published_version"),
        Some(0.0)
    );
    for service in [first, second] {
        service.signal("-TERM");
        assert_eq!(service.wait_exit(Duration::from_secs(60)).0, Some(0));
    }
}

/// Issue: restarted with the same `instance_id` and a new topic within the session timeout,
/// the service consumed the old topic (the coordinator handed back the cached assignment)
/// while `/readyz` said ready. Now partitions of another topic are never consumed, the member
/// joins again, and it is ready only with partitions of the configured topic, whose events it
/// then applies.
#[test]
fn a_static_member_moved_to_another_topic_consumes_the_new_one_and_is_ready_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ratings = generate(dir.path(), Mode::Explicit, 200, 3_000, 37);
    let parts = split_ratings(&ratings, 2);
    let old_topic = unique_topic("old-topic");
    let new_topic = unique_topic("new-topic");
    let http = free_port();
    let base = format!("http://127.0.0.1:{http}");
    let env_for = |topic: &str| {
        let mut env = service_env(topic, &state, Mode::Explicit);
        env.retain(|(k, _)| {
            k != "SEGMENTER_KAFKA__INSTANCE_ID" && k != "SEGMENTER_KAFKA__GROUP_ID"
        });
        env.push((
            "SEGMENTER_KAFKA__INSTANCE_ID".into(),
            format!("{old_topic}-member"),
        ));
        env.push((
            "SEGMENTER_KAFKA__GROUP_ID".into(),
            format!("{old_topic}-group"),
        ));
        env.push(("SEGMENTER_HTTP__LISTEN".into(), format!("127.0.0.1:{http}")));
        env
    };
    produce(&old_topic, 1, &parts[0].0);
    let mut service = Service::start(&env_for(&old_topic), &[]);
    service.wait_for_applied(parts[0].1, Duration::from_secs(60));
    // Killed: a static member leaves no group on exit, so its assignment stays cached.
    service.signal("-KILL");
    service.wait_exit(Duration::from_secs(30));

    produce(&new_topic, 1, &parts[1].0);
    let total = parts[0].1 + parts[1].1;
    let mut service = Service::start(
        &env_for(&new_topic),
        &["--exit-at-events", &total.to_string()],
    );
    service.wait_for(Duration::from_secs(120), |v| {
        let (status, body) = readyz(&base);
        assert!(
            status != 200 || body["partitions_assigned"].as_u64() >= Some(1),
            "ready without partitions of the configured topic: {body}"
        );
        v["fields"]["message"] == "batch committed"
            && v["fields"]["events_applied"].as_u64() >= Some(total)
    });
    let (code, log) = service.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
    eprintln!("{}", log.join("\n"));
    assert_eq!(
        latest_stored_snapshot(&state).counts.events_applied,
        total,
        "every event of both topics applied once"
    );
}
