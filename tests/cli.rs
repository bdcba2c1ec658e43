//! The binary as users run it: generate → replay with outputs and the seed-style report,
//! the demo until stopped by Ctrl-C, and configuration errors that name the field.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_segmenter");

fn segmenter(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SEGMENTER_CONFIG")
        .output()
        .expect("run segmenter")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `segmenter generate` of a small planted data set into `dir/ratings.csv`.
fn generate_ratings(dir: &Path, users: u32, items: u32, events: u32) -> std::path::PathBuf {
    let ratings = dir.join("ratings.csv");
    let out = segmenter(&[
        "generate",
        "--users",
        &users.to_string(),
        "--items",
        &items.to_string(),
        "--events",
        &events.to_string(),
        "--segments",
        "4",
        "--out",
        path(&ratings),
    ]);
    assert!(out.status.success());
    ratings
}

#[test]
fn replay_writes_snapshot_assignments_and_the_seed_report() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = dir.path().join("ratings.csv");
    let items = dir.path().join("items.csv");
    let out = segmenter(&[
        "generate",
        "--users",
        "300",
        "--items",
        "400",
        "--events",
        "20000",
        "--segments",
        "6",
        "--out",
        path(&ratings),
        "--items-out",
        path(&items),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let snapshot = dir.path().join("snapshot.json");
    let assignments = dir.path().join("assignments.csv");
    let out = segmenter(&[
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/segmenter.toml"),
        "replay",
        "--ratings",
        path(&ratings),
        "--items",
        path(&items),
        "--clusters",
        "6",
        "--components",
        "5",
        "--state-dir",
        path(&dir.path().join("state")),
        "--snapshot-out",
        path(&snapshot),
        "--assignments-out",
        path(&assignments),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("replayed 20000 events"));

    // Seed-style report: `ID (SIZE, N_ITEMS)` then 10 items with scores, per cluster.
    let headers: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            let l = l.trim();
            l.ends_with(')')
                && l.contains(" (")
                && l.split(' ')
                    .next()
                    .is_some_and(|id| id.parse::<u32>().is_ok())
        })
        .collect();
    assert_eq!(headers.len(), 6, "{stdout}");
    assert!(
        stdout.contains("Item "),
        "titles from the catalogue: {stdout}"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&snapshot).unwrap()).unwrap();
    for key in [
        "version",
        "created_at",
        "counts",
        "pca",
        "kmeans",
        "clusters",
        "validation",
        "diagnostics",
        "drift",
    ] {
        assert!(json.get(key).is_some(), "snapshot lacks {key}");
    }
    assert_eq!(json["pca"]["n_components"], 5);
    assert_eq!(json["kmeans"]["k"], 6);
    let sizes: u64 = json["kmeans"]["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .sum();
    assert_eq!(sizes, json["counts"]["users"].as_u64().unwrap());

    let csv = std::fs::read_to_string(&assignments).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("user,cluster"));
    assert_eq!(lines.count() as u64, sizes);
}

#[test]
fn bad_configuration_names_the_field_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["replay", "--ratings", "/nonexistent"])
        .env("SEGMENTER_MODEL__CLUSTERS", "1")
        .env("SEGMENTER_STATE__DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[model] clusters"), "{err}");

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[model]\ncomponents = 10\ncolour = \"red\"\n").unwrap();
    let out = segmenter(&[
        "--config",
        path(&config),
        "replay",
        "--ratings",
        "/nonexistent",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));

    let out = segmenter(&[
        "replay",
        "--ratings",
        "/nonexistent",
        "--state-dir",
        path(&dir.path().join("s")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));
}

/// A `[kafka.client]` property librdkafka does not know is the client's verdict, not a field
/// of ours: it is reported when the consumer is created, with exit 1 (configuration errors
/// found by segmenter itself exit 2, above). No broker is needed to see it.
#[test]
fn an_unknown_kafka_client_property_exits_1_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[kafka.client]\n\"bogus.property\" = \"x\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", path(&config), "run"])
        .env_remove("SEGMENTER_CONFIG")
        .env("SEGMENTER_STATE__DIR", dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus.property"), "{err}");
}

#[test]
fn demo_runs_takes_snapshots_and_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--demo", "--state-dir", path(dir.path())])
        .env("SEGMENTER_SNAPSHOT__INTERVAL_MS", "200")
        .env("SEGMENTER_SNAPSHOT__MAX_STALENESS_MS", "200")
        .env("SEGMENTER_HTTP__LISTEN", "127.0.0.1:0")
        .env("SEGMENTER_DEMO__EVENTS_PER_SECOND", "50000")
        .env("SEGMENTER_LOG__FORMAT", "json")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    // Wait for the condition itself: a snapshot log line.
    let mut seen = vec![];
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("snapshot built") {
            let event: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            assert!(event["fields"]["users"].as_u64().unwrap() > 0);
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("snapshot built")),
        "{seen:?}"
    );
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("demo stopped")), "{rest:?}");
}

#[test]
fn replay_past_max_items_rejects_new_items_as_catalogue_full_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate_ratings(dir.path(), 200, 120, 6000);
    let snapshot = dir.path().join("snapshot.json");
    let out = Command::new(BIN)
        .args(["replay", "--ratings", path(&ratings), "--clusters", "4"])
        .args(["--components", "5", "--snapshot-out", path(&snapshot)])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_remove("SEGMENTER_CONFIG")
        .env("SEGMENTER_MODEL__MAX_ITEMS", "60")
        .output()
        .expect("run segmenter");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("catalogue_full") || stderr.contains("catalogue_full"),
        "the report names the reason: {stdout}{stderr}"
    );
    let snap: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&snapshot).unwrap()).unwrap();
    assert_eq!(snap["counts"]["items"], 60, "catalogue capped at max_items");
    let applied = snap["counts"]["events_applied"].as_u64().unwrap();
    assert!(
        applied > 0 && applied < 6000,
        "events for known items applied, the rest refused: {applied}"
    );
}

#[test]
fn replay_past_max_users_rejects_new_users_as_population_full_and_keeps_known_users() {
    let dir = tempfile::tempdir().unwrap();
    // Ten users, in time order u0..u9, each rating three items; then the first users rate
    // again after the cap was reached.
    let mut csv = String::from("user,item,rating,ts\n");
    let mut ts = 1_700_000_000;
    for u in 0..10 {
        for j in 0..3 {
            ts += 1;
            csv.push_str(&format!("u{u},i{},{},{ts}\n", (u + j) % 7, 1 + (u + j) % 5));
        }
    }
    for u in 0..6 {
        ts += 1;
        csv.push_str(&format!("u{u},i6,5,{ts}\n"));
    }
    let ratings = dir.path().join("ratings.csv");
    std::fs::write(&ratings, csv).unwrap();
    let snapshot = dir.path().join("snapshot.json");
    let out = Command::new(BIN)
        .args(["replay", "--ratings", path(&ratings), "--clusters", "2"])
        .args(["--components", "2", "--snapshot-out", path(&snapshot)])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_remove("SEGMENTER_CONFIG")
        .env("SEGMENTER_MODEL__MAX_USERS", "6")
        .output()
        .expect("run segmenter");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = format!("{}{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(
        text.contains("12 rejected (population_full: 12)"),
        "the report counts the reason: {text}"
    );
    assert!(
        text.contains("user `u6` is new") && text.contains("max_users = 6"),
        "the report names the user and the cap: {text}"
    );
    let snap: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&snapshot).unwrap()).unwrap();
    assert_eq!(snap["counts"]["users"], 6, "population capped at max_users");
    assert_eq!(
        snap["counts"]["events_applied"], 24,
        "every event of the six known users applied, their late ones included"
    );
}

#[test]
fn replay_with_more_clusters_than_users_says_so_instead_of_blaming_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate_ratings(dir.path(), 200, 100, 3000);
    let state = dir.path().join("state");
    let out = segmenter(&[
        "replay",
        "--ratings",
        path(&ratings),
        "--clusters",
        "100000",
        "--state-dir",
        path(&state),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("[demo]"), "{text}");
    assert!(text.contains("100000 users"), "{text}");
}

/// A size-limited tmpfs mounted for the test (the test command runs as root, as it installs
/// packages); unmounted however the test ends.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a {size} tmpfs on {}: the full-disk test needs root (scripts/test.sh)",
            dir.display()
        );
        SmallDisk(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(status.success(), "cannot resize the tmpfs");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_the_demo_with_exit_1_and_the_cause_and_the_state_dir_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(dir.path(), "6m");
    let state = dir.path().join("state");
    let mut demo = Command::new(BIN)
        .args(["run", "--demo", "--state-dir", path(&state)])
        .env_remove("SEGMENTER_CONFIG")
        .env("SEGMENTER_HTTP__LISTEN", "127.0.0.1:0")
        .env("SEGMENTER_DEMO__EVENTS_PER_SECOND", "200000")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the demo");
    let stderr = demo.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    // The stream is endless: only the full disk ends it. A process that hangs instead (the bug
    // this guards against) is killed after two minutes and fails the test.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(status) = demo.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = demo.kill();
            let _ = demo.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let lines = reader.join().unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!(
            "the demo did not exit on a full disk:\n{}",
            lines.join("\n")
        )
    });
    assert_eq!(status.code(), Some(1), "{}", lines.join("\n"));
    let last = lines.last().cloned().unwrap_or_default();
    assert!(
        last.contains("No space left on device"),
        "the cause is reported: {last}"
    );

    // With room again, the state dir opens whole (every commit before the failure) and the
    // demo resumes from its last commit.
    disk.resize("256m");
    let engine = segmenter::store::open(&state)
        .expect("open")
        .state
        .load_engine(segmenter::config::Config::default().engine_params())
        .expect("a readable state dir")
        .engine;
    assert!(engine.counters().events_applied > 0);
    let out = Command::new(BIN)
        .args([
            "run",
            "--demo",
            "--state-dir",
            path(&state),
            "--max-events",
            "1",
        ])
        .env_remove("SEGMENTER_CONFIG")
        .env("SEGMENTER_HTTP__LISTEN", "127.0.0.1:0")
        .output()
        .expect("resume");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
}

#[test]
fn generate_realistic_writes_ratings_truth_and_statistics_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = dir.path().join("ratings.csv");
    let truth = dir.path().join("truth.csv");
    let out = segmenter(&[
        "generate",
        "--profile",
        "realistic",
        "--seed",
        "3",
        "--stats",
        "--out",
        path(&ratings),
        "--truth-out",
        path(&truth),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("wrote 100000 events"), "{stderr}");
    assert!(stderr.contains("943 users, 1682 items"), "{stderr}");
    assert!(
        stderr.contains("stars 1-5: 6.1% 11.4% 27.2% 34.2% 21.2%"),
        "{stderr}"
    );
    let truth_rows = std::fs::read_to_string(&truth).unwrap();
    assert_eq!(truth_rows.lines().next(), Some("user,segment"));
    assert_eq!(truth_rows.lines().count(), 1 + 943);

    let snapshot = dir.path().join("snapshot.json");
    let out = segmenter(&[
        "replay",
        "--ratings",
        path(&ratings),
        "--clusters",
        "12",
        "--state-dir",
        path(&dir.path().join("state")),
        "--snapshot-out",
        path(&snapshot),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&snapshot).unwrap()).unwrap();
    assert_eq!(snap["counts"]["users"], 943);
    assert_eq!(snap["counts"]["events_applied"], 100_000);
}

#[test]
fn generate_realistic_refuses_planted_knobs_and_more_events_than_users_can_rate() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = dir.path().join("ratings.csv");
    let out = segmenter(&[
        "generate",
        "--profile",
        "realistic",
        "--affinity",
        "0.5",
        "--out",
        path(&ratings),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--affinity shapes the planted profile only"),
        "{stderr}"
    );
    let out = segmenter(&[
        "generate",
        "--profile",
        "realistic",
        "--users",
        "10",
        "--items",
        "50",
        "--events",
        "1000",
        "--out",
        path(&ratings),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("lower --events to at most 300"), "{stderr}");
    assert!(!ratings.exists(), "nothing written for a refused data set");
}

#[test]
fn replay_without_diagnostics_leaves_them_out_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ratings = generate_ratings(dir.path(), 200, 150, 8_000);
    let run = |name: &str, extra: &[&str]| -> serde_json::Value {
        let snapshot = dir.path().join(format!("{name}.json"));
        let state = dir.path().join(name);
        let mut args = vec![
            "replay",
            "--ratings",
            path(&ratings),
            "--clusters",
            "4",
            "--components",
            "3",
            "--state-dir",
            path(&state),
            "--snapshot-out",
            path(&snapshot),
        ];
        args.extend_from_slice(extra);
        let out = segmenter(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&std::fs::read_to_string(&snapshot).unwrap()).unwrap()
    };
    let with = run("with", &[]);
    let without = run("without", &["--no-diagnostics"]);
    assert_eq!(with["diagnostics"]["as_of_version"], 1);
    assert!(with["diagnostics"]["explained_variance_ratio_curve"].is_array());
    assert!(
        without["diagnostics"].is_null(),
        "{}",
        without["diagnostics"]
    );
    // The rest of the snapshot does not depend on the diagnostics.
    assert_eq!(with["counts"], without["counts"]);
    assert_eq!(with["kmeans"]["sizes"], without["kmeans"]["sizes"]);
    assert_eq!(with["validation"], without["validation"]);
}

#[test]
fn bench_instances_reports_the_same_rounds_and_result_for_every_split() {
    let out = segmenter(&[
        "bench",
        "--shape",
        "realistic",
        "--instances",
        "1,3",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    assert_eq!(results.len(), 2, "one result per instance count");
    assert_eq!(results[0]["instances"], 1);
    assert_eq!(results[1]["instances"], 3);
    assert_eq!(results[0]["rounds"], results[1]["rounds"]);
    assert!(results[1]["rounds"]["eigen"].as_u64() >= Some(2));
    let ratio = results[1]["inertia_ratio"].as_f64().expect("a ratio");
    assert!((ratio - 1.0).abs() <= 1e-9, "inertia ratio {ratio}");
    let largest = results[1]["largest_share"].as_f64().expect("a share");
    assert!(
        largest < 0.5,
        "3 instances share the users: largest {largest}"
    );
}
