//! File replay through the state dir: a replay interrupted half-way and resumed from the
//! reopened state dir ends in the same snapshot as one uninterrupted replay (both modes), also
//! when the process is killed in the middle of a file; replaying a file again never double
//! counts; bad lines are counted and skipped.

use std::path::Path;

use segmenter::config::Config;
use segmenter::decode::FileFormat;
use segmenter::event::{Mode, RejectReason};
use segmenter::generator::{GeneratorParams, generate, write_csv};
use segmenter::replay::{ReplayOptions, ReplayOutcome, replay};
use segmenter::snapshot::Snapshot;
use serde_json::Value;

fn config(state: &Path, mode: Mode) -> Config {
    let mut c = Config::default();
    c.state.dir = state.to_path_buf();
    c.events.mode = mode;
    c.events.max_value = if mode == Mode::Implicit { 1000.0 } else { 5.0 };
    c.model.clusters = 8;
    c.model.refresh_every_events = 4_000;
    c.replay.batch_size = 2_500;
    c
}

fn options(ratings: &Path) -> ReplayOptions {
    ReplayOptions::csv(ratings)
}

fn write_events(path: &Path, events: &[segmenter::event::RatingEvent]) {
    let mut f = std::fs::File::create(path).unwrap();
    write_csv(events, &mut f).unwrap();
}

/// The snapshot as JSON without the fields that legitimately differ between two histories:
/// version (and the diagnostics', a replay's own), creation time, drift (which compares against
/// a previous snapshot) and the eigensolver's iteration count (its warm start is not persisted;
/// the result is).
fn comparable(snapshot: &Snapshot) -> Value {
    let mut v = serde_json::to_value(snapshot).unwrap();
    let o = v.as_object_mut().unwrap();
    if let Some(diagnostics) = o["diagnostics"].as_object_mut() {
        assert_eq!(
            diagnostics.remove("as_of_version"),
            Some(Value::from(snapshot.version)),
            "a replay computes its snapshot's own diagnostics"
        );
    }
    for field in ["version", "created_at", "drift"] {
        o.remove(field);
    }
    o["pca"].as_object_mut().unwrap().remove("eigen_iterations");
    v
}

fn assert_close(a: &Value, b: &Value, path: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
                "{path}: {x} vs {y}"
            );
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{path}: lengths");
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert_close(p, q, &format!("{path}[{i}]"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{path}: keys"
            );
            for (k, p) in x {
                assert_close(p, &y[k], &format!("{path}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{path}"),
    }
}

/// The cluster ids of `b`'s assignments renamed to `a`'s: the two must be the same partition
/// (every `b` cluster maps to exactly one `a` cluster). A replay resumed in a state dir with
/// snapshots keeps their ids, which an uninterrupted replay never saw.
fn id_mapping(a: &[(String, u32)], b: &[(String, u32)]) -> std::collections::BTreeMap<u32, u32> {
    assert_eq!(a.len(), b.len(), "as many assigned users");
    let mut mapping = std::collections::BTreeMap::new();
    for ((user_a, label_a), (user_b, label_b)) in a.iter().zip(b) {
        assert_eq!(user_a, user_b, "the same users in the same order");
        let previous = mapping.insert(*label_b, *label_a);
        assert!(
            previous.is_none_or(|p| p == *label_a),
            "cluster {label_b} maps to both {} and {label_a}: not the same partition",
            previous.unwrap_or_default()
        );
    }
    mapping
}

/// `snapshot` (from [`comparable`]) with its cluster ids renamed by `mapping`: sizes, profiles
/// and the confusion matrix permuted.
fn renamed(mut snapshot: Value, mapping: &std::collections::BTreeMap<u32, u32>) -> Value {
    let to = |c: usize| mapping.get(&(c as u32)).map_or(c, |&m| m as usize);
    let permute = |values: &Vec<Value>| {
        let mut out = values.clone();
        for (c, v) in values.iter().enumerate() {
            out[to(c)] = v.clone();
        }
        out
    };
    let sizes = snapshot["kmeans"]["sizes"].as_array().unwrap().clone();
    snapshot["kmeans"]["sizes"] = Value::Array(permute(&sizes));
    let mut clusters = snapshot["clusters"].as_array().unwrap().clone();
    for cluster in &mut clusters {
        let id = cluster["id"].as_u64().unwrap() as usize;
        cluster["id"] = Value::from(to(id) as u64);
    }
    clusters.sort_by_key(|c| c["id"].as_u64());
    snapshot["clusters"] = Value::Array(clusters);
    let matrix = snapshot["validation"]["naive_bayes"]["confusion_matrix"]
        .as_array()
        .unwrap()
        .clone();
    let rows: Vec<Value> = matrix
        .iter()
        .map(|row| Value::Array(permute(row.as_array().unwrap())))
        .collect();
    snapshot["validation"]["naive_bayes"]["confusion_matrix"] = Value::Array(permute(&rows));
    snapshot
}

fn final_snapshot(outcome: &ReplayOutcome) -> &(Snapshot, Vec<(String, u32)>) {
    outcome.snapshot.as_ref().expect("snapshot")
}

fn restart_gives_the_same_final_snapshot(mode: Mode) {
    restart_gives_the_same_final_snapshot_with(mode, None);
}

/// With `half_life` set (`[events] half_life`), the decay clock and the scaled values are
/// restored too, so the resumed run ends where the uninterrupted one does.
fn restart_gives_the_same_final_snapshot_with(mode: Mode, half_life: Option<&str>) -> f64 {
    let config = |state: &Path, mode: Mode| {
        let mut c = config(state, mode);
        c.events.half_life = half_life.map(str::to_string);
        c
    };
    let dir = tempfile::tempdir().unwrap();
    let events = generate(&GeneratorParams {
        users: 300,
        items: 400,
        events: 20_000,
        segments: 8,
        mode,
        seed: 5,
        ..GeneratorParams::default()
    })
    .events;
    let (whole, first, second) = (
        dir.path().join("all.csv"),
        dir.path().join("a.csv"),
        dir.path().join("b.csv"),
    );
    write_events(&whole, &events);
    write_events(&first, &events[..10_000]);
    write_events(&second, &events[10_000..]);

    let straight = replay(&config(&dir.path().join("s1"), mode), &options(&whole)).unwrap();
    let resumed_dir = dir.path().join("s2");
    let half = replay(&config(&resumed_dir, mode), &options(&first)).unwrap();
    assert_eq!(half.applied, 10_000);
    // A fresh process would reopen the state dir: nothing is carried over in memory.
    let resumed = replay(&config(&resumed_dir, mode), &options(&second)).unwrap();
    assert_eq!(resumed.applied, 10_000);

    let (a, a_assign) = final_snapshot(&straight);
    let (b, b_assign) = final_snapshot(&resumed);
    assert_eq!(a.counts, b.counts);
    let (mut a_json, mut b_json) = (comparable(a), comparable(b));
    if half_life.is_some() {
        // Decayed values are not whole numbers, so the statistics rebuilt from the vectors on
        // reopening differ from the ones summed along the way in the last bits; the inertia
        // curve's fresh starts at large k (50 clusters of 300 users) tie on such differences.
        for json in [&mut a_json, &mut b_json] {
            json["diagnostics"]
                .as_object_mut()
                .expect("diagnostics")
                .remove("inertia_by_k");
        }
        let (x, y) = (a.decay.as_ref(), b.decay.as_ref());
        let (x, y) = (x.expect("decay reported"), y.expect("decay reported"));
        assert_eq!(x.effective_events.to_bits(), y.effective_events.to_bits());
        assert_eq!((x.as_of_ts, x.scale), (y.as_of_ts, y.scale));
    }
    let mapping = id_mapping(a_assign, b_assign);
    assert_close(&a_json, &renamed(b_json, &mapping), "snapshot");
    assert_eq!(b.version, 2);
    assert!(b.drift.is_some());

    // Replaying the same file again is a no-op: implicit values are not counted twice.
    let again = replay(&config(&resumed_dir, mode), &options(&second)).unwrap();
    assert_eq!((again.applied, again.skipped), (0, 10_000));
    let (c, _) = final_snapshot(&again);
    assert_eq!(c.counts, b.counts);
    assert_close(&comparable(c)["pca"], &comparable(b)["pca"], "pca");
    b.decay.as_ref().map_or(1.0, |d| d.scale)
}

#[test]
fn explicit_replay_interrupted_and_resumed_matches_uninterrupted() {
    restart_gives_the_same_final_snapshot(Mode::Explicit);
}

#[test]
fn implicit_replay_interrupted_and_resumed_matches_uninterrupted() {
    restart_gives_the_same_final_snapshot(Mode::Implicit);
}

#[test]
fn explicit_replay_with_a_half_life_interrupted_and_resumed_matches_uninterrupted() {
    // About 20,000 s of event time: weights from 1 down to about 2^-2.8.
    restart_gives_the_same_final_snapshot_with(Mode::Explicit, Some("2h"));
}

#[test]
fn implicit_replay_with_a_half_life_interrupted_and_resumed_matches_uninterrupted() {
    restart_gives_the_same_final_snapshot_with(Mode::Implicit, Some("2h"));
}

#[test]
fn a_replay_resumed_across_a_decay_rebase_matches_uninterrupted() {
    // 64 half-lives of 5 minutes are 19,200 s: the origin moves during the second file.
    let scale = restart_gives_the_same_final_snapshot_with(Mode::Explicit, Some("5m"));
    // Without a rebase the scale would be about 2^-66 (20,000 s past the first event).
    assert!(scale > (-64f64).exp2(), "no rebase: scale {scale}");
}

#[test]
fn a_state_dir_refuses_another_half_life_naming_the_field_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let events = generate(&GeneratorParams {
        users: 50,
        items: 40,
        events: 500,
        ..GeneratorParams::default()
    })
    .events;
    let ratings = dir.path().join("r.csv");
    write_events(&ratings, &events);
    let with = |half_life: Option<&str>| {
        let mut c = config(&dir.path().join("state"), Mode::Explicit);
        c.model.clusters = 2;
        c.model.components = 3;
        c.events.half_life = half_life.map(str::to_string);
        c
    };
    // Written without forgetting (as every state dir before it existed).
    replay(&with(None), &options(&ratings)).unwrap();
    for (configured, stored) in [(Some("30d"), "off"), (Some("1h"), "off")] {
        let err = replay(&with(configured), &options(&ratings))
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("events.half_life")
                && err.contains(stored)
                && err.contains("new [state] dir"),
            "{err}"
        );
    }
    let other = dir.path().join("decaying");
    let mut c = with(Some("30d"));
    c.state.dir = other.clone();
    replay(&c, &options(&ratings)).unwrap();
    for configured in [Some("7d"), None] {
        let mut c = with(configured);
        c.state.dir = other.clone();
        let err = format!("{:#}", replay(&c, &options(&ratings)).expect_err("refused"));
        assert!(err.contains("half_life = \"30d\""), "{err}");
    }
    // The same half-life opens it.
    replay(&c_with_dir(with(Some("30d")), &other), &options(&ratings)).unwrap();
}

fn c_with_dir(mut c: Config, dir: &Path) -> Config {
    c.state.dir = dir.to_path_buf();
    c
}

#[test]
fn bad_lines_are_counted_with_reasons_and_every_good_line_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let events = generate(&GeneratorParams {
        users: 200,
        items: 150,
        events: 6_000,
        segments: 5,
        seed: 8,
        ..GeneratorParams::default()
    })
    .events;
    let clean = dir.path().join("clean.data");
    let dirty = dir.path().join("dirty.data");
    let mut clean_text = String::new();
    let mut dirty_text = String::new();
    for (i, e) in events.iter().enumerate() {
        let line = format!("{}\t{}\t{}\t{}\n", e.user, e.item, e.value.unwrap(), e.ts);
        clean_text.push_str(&line);
        dirty_text.push_str(&line);
        match i % 1000 {
            10 => dirty_text.push_str("this line is garbage\n"),
            20 => dirty_text.push_str(&format!("{}\t{}\tNaN\t{}\n", e.user, e.item, e.ts)),
            30 => dirty_text.push_str(&format!("{}\t{}\t9\t{}\n", e.user, e.item, e.ts)),
            40 => dirty_text.push_str(&format!("{}\t{}\t-1\t{}\n", e.user, e.item, e.ts)),
            50 => dirty_text.push_str(&format!("{}\t{}\tfive\t{}\n", e.user, e.item, e.ts)),
            60 => dirty_text.push_str(&format!("\t{}\t3\t{}\n", e.item, e.ts)),
            _ => {}
        }
    }
    std::fs::write(&clean, clean_text).unwrap();
    std::fs::write(&dirty, dirty_text).unwrap();
    let opts = |p: &Path| ReplayOptions {
        format: FileFormat::Movielens,
        ..options(p)
    };
    let good = replay(
        &config(&dir.path().join("clean"), Mode::Explicit),
        &opts(&clean),
    )
    .unwrap();
    let bad = replay(
        &config(&dir.path().join("dirty"), Mode::Explicit),
        &opts(&dirty),
    )
    .unwrap();
    assert_eq!(good.rejected.total, 0);
    assert_eq!(bad.applied, good.applied);
    assert_eq!(bad.rejected.total, 36);
    let by = &bad.rejected.by_reason;
    assert_eq!(by[&RejectReason::Malformed], 6);
    assert_eq!(by[&RejectReason::NotFinite], 6);
    assert_eq!(by[&RejectReason::OutOfRange], 12);
    assert_eq!(by[&RejectReason::WrongType], 6);
    assert_eq!(by[&RejectReason::MissingField], 6);
    assert!(bad.rejected.summary().contains("36 rejected"));
    let (a, _) = final_snapshot(&good);
    let (b, _) = final_snapshot(&bad);
    assert_eq!(a.counts, b.counts);
    assert_close(&comparable(a)["pca"], &comparable(b)["pca"], "pca");
}

/// Starts `segmenter replay` of `ratings` into `state`.
fn replay_process(
    ratings: &Path,
    state: &Path,
    snapshot_out: Option<&Path>,
) -> std::process::Child {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_segmenter"));
    command
        .args(["replay", "--clusters", "8", "--ratings"])
        .arg(ratings)
        .arg("--state-dir")
        .arg(state)
        .env_remove("SEGMENTER_CONFIG")
        .env("SEGMENTER_MODEL__REFRESH_EVERY_EVENTS", "4000")
        .env("SEGMENTER_REPLAY__BATCH_SIZE", "2500")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(out) = snapshot_out {
        command.arg("--snapshot-out").arg(out);
    }
    command.spawn().expect("start segmenter replay")
}

/// Events an earlier, killed replay had already committed, from the resumed replay's summary
/// `replayed N events (M skipped as already applied)`.
fn skipped_by(stdout: &str) -> u64 {
    stdout
        .split(" events (")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no replay summary in: {stdout}"))
}

#[test]
fn a_replay_killed_in_the_middle_of_a_file_resumes_to_the_uninterrupted_result() {
    const EVENTS: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let events = generate(&GeneratorParams {
        users: 2_000,
        items: 800,
        events: EVENTS,
        segments: 8,
        seed: 17,
        ..GeneratorParams::default()
    })
    .events;
    let ratings = dir.path().join("ratings.csv");
    write_events(&ratings, &events);

    let straight_out = dir.path().join("straight.json");
    let straight = replay_process(&ratings, &dir.path().join("straight"), Some(&straight_out))
        .wait_with_output()
        .unwrap();
    assert!(straight.status.success());

    // SIGKILL after a delay; the delay adapts until the kill lands between the first commit
    // and the end of the file (what the resumed run reports, not a guess).
    let resumed_out = dir.path().join("resumed.json");
    let mut delay = std::time::Duration::from_millis(300);
    let mut landed = None;
    for attempt in 0..12 {
        let state = dir.path().join(format!("killed-{attempt}"));
        let mut killed = replay_process(&ratings, &state, None);
        std::thread::sleep(delay);
        let _ = killed.kill();
        let _ = killed.wait();
        let resumed = replay_process(&ratings, &state, Some(&resumed_out))
            .wait_with_output()
            .unwrap();
        let stdout = format!(
            "{}{}",
            String::from_utf8_lossy(&resumed.stdout),
            String::from_utf8_lossy(&resumed.stderr)
        );
        assert!(resumed.status.success(), "{stdout}");
        let skipped = skipped_by(&stdout);
        if skipped == 0 {
            delay *= 2;
        } else if skipped as usize >= EVENTS {
            delay /= 2;
        } else {
            landed = Some(skipped);
            break;
        }
    }
    let skipped = landed.expect("a kill landed in the middle of the file within 12 attempts");
    assert!(skipped > 0 && (skipped as usize) < EVENTS);
    let read =
        |p: &Path| -> Snapshot { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let (a, b) = (read(&straight_out), read(&resumed_out));
    assert_eq!(a.counts, b.counts);
    assert_close(&comparable(&a), &comparable(&b), "snapshot");
}
