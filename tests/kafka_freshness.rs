//! Snapshots come by change, not by clock, against the real broker: with the default
//! `[snapshot] max_staleness_ms` (1 s) and `interval_ms` (1 s), one new event is served in one
//! new snapshot, and an idle service builds none however long it waits.

mod common;

use std::time::Duration;

use common::*;
use segmenter::event::Mode;

#[test]
fn one_event_brings_one_snapshot_and_an_idle_service_builds_none() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ratings = generate(dir.path(), Mode::Explicit, 200, 4_000, 23);
    let parts = split_ratings(&ratings, 2);
    let topic = unique_topic("freshness");
    let http = free_port();
    let mut env = service_env(&topic, &state, Mode::Explicit);
    env.push(("SEGMENTER_HTTP__LISTEN".into(), format!("127.0.0.1:{http}")));
    let base = format!("http://127.0.0.1:{http}");
    let mut service = Service::start(&env, &[]);

    let (first, first_count) = &parts[0];
    produce(&topic, 2, first);
    service.wait_for(Duration::from_secs(60), |v| {
        v["fields"]["message"] == "snapshot built"
            && v["fields"]["events_applied"].as_u64() >= Some(*first_count)
    });
    wait_until(
        Duration::from_secs(30),
        "every applied event covered",
        || metric(&base, "segmenter_snapshot_staleness_seconds") == Some(0.0),
    );
    let version = metric(&base, "segmenter_snapshot_version").expect("a version");
    let served = metric(&base, "segmenter_snapshot_freshness_seconds_count").expect("a count");
    assert!(
        served >= 1.0,
        "freshness observed for the snapshots served: {served}"
    );

    // Idle: three staleness bounds and more pass (by the service's own clock), no snapshot.
    wait_until(Duration::from_secs(30), "the service idles for 3 s", || {
        metric(&base, "segmenter_snapshot_age_seconds").is_some_and(|age| age >= 3.0)
    });
    assert_eq!(
        metric(&base, "segmenter_snapshot_version"),
        Some(version),
        "an idle service builds no snapshot"
    );

    // One event: one snapshot, served within the bound (its freshness is reported; the bound
    // itself is measured by the benches, not asserted here).
    let one = dir.path().join("one.csv");
    let text = std::fs::read_to_string(&parts[1].0).unwrap();
    let mut lines = text.lines();
    std::fs::write(
        &one,
        format!("{}\n{}\n", lines.next().unwrap(), lines.next().unwrap()),
    )
    .unwrap();
    produce(&topic, 2, &one);
    service.wait_for(Duration::from_secs(60), |v| {
        v["fields"]["message"] == "snapshot built"
            && v["fields"]["events_applied"].as_u64() > Some(*first_count)
    });
    wait_until(Duration::from_secs(30), "the new event covered", || {
        metric(&base, "segmenter_snapshot_staleness_seconds") == Some(0.0)
    });
    assert_eq!(
        metric(&base, "segmenter_snapshot_version"),
        Some(version + 1.0),
        "one snapshot for one event"
    );
    assert_eq!(
        metric(&base, "segmenter_snapshot_freshness_seconds_count"),
        Some(served + 1.0)
    );
    service.signal("-TERM");
    let (code, log) = service.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", log.join("\n"));
}
