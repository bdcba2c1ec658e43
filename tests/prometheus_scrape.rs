//! Metrics proven by a real Prometheus server (Debian's `prometheus`, installed by the test
//! command): it scrapes the running service, and its own query API must return the events
//! consumed and the cluster sizes of the latest snapshot; `promtool check metrics` must accept
//! the exposition.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn prometheus_binary(name: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "`{name}` is not installed: run the suite with scripts/test.sh, which installs Debian's prometheus package"
    );
    String::from_utf8_lossy(&found.stdout).trim().to_string()
}

/// Polls Prometheus' query API until `check` accepts the result vector.
fn wait_for_query(prom: &str, query: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let url = format!("{prom}/api/v1/query?query={}", query);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(r) = ureq::get(&url).call() {
            last = r.into_string().unwrap_or_default();
            if let Ok(v) = serde_json::from_str::<Value>(&last) {
                let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
                if check(&result) {
                    return result;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("Prometheus never answered `{query}` as expected; last answer: {last}");
}

fn sample_value(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn prometheus_scrapes_the_consumed_events_and_cluster_sizes() {
    let prometheus = prometheus_binary("prometheus");
    let promtool = prometheus_binary("promtool");
    let dir = tempfile::tempdir().unwrap();
    let events = 24_000u64;
    let (service, base) = start_demo(
        &dir.path().join("state"),
        &[],
        &["--max-events", &events.to_string(), "--keep-serving"],
    );
    let target = base.trim_start_matches("http://").to_string();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: segmenter\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let mut prom = Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let prom_url = format!("http://127.0.0.1:{prom_port}");

    let consumed = wait_for_query(&prom_url, "segmenter_events_consumed_total", |r| {
        r.len() == 1 && sample_value(&r[0]) == events as f64
    });
    assert_eq!(consumed[0]["metric"]["job"], "segmenter");

    // Cluster sizes as Prometheus stored them equal the latest snapshot's.
    let (_, body) = http_get(&format!("{base}/snapshots/latest"), None);
    let snapshot: Value = serde_json::from_str(&body).unwrap();
    let sizes: Vec<f64> = snapshot["kmeans"]["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let version = snapshot["version"].as_f64().unwrap();
    wait_for_query(&prom_url, "segmenter_snapshot_version", |r| {
        r.len() == 1 && sample_value(&r[0]) == version
    });
    let series = wait_for_query(&prom_url, "segmenter_cluster_size_users", |r| {
        r.len() == sizes.len()
            && r.iter().all(|s| {
                let c: usize = s["metric"]["cluster"]
                    .as_str()
                    .unwrap_or("x")
                    .parse()
                    .unwrap_or(usize::MAX);
                sizes.get(c) == Some(&sample_value(s))
            })
    });
    let total: f64 = series.iter().map(sample_value).sum();
    assert_eq!(total, snapshot["counts"]["users"].as_f64().unwrap());

    // promtool accepts the exposition as it is served.
    let (_, metrics) = http_get(&format!("{base}/metrics"), None);
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let _ = prom.kill();
    let _ = prom.wait();
    service.signal("-INT");
    let (code, _) = service.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0));
}
