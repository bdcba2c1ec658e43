//! The live page in headless Chromium (Debian's `chromium`, installed by the test command):
//! it loads `/`, every chart is rendered with the snapshot's numbers, a user lookup through the
//! page's form finds the user's segment, and a screenshot is saved as a test artifact. Then the
//! offline report built from the state dir renders too.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn chromium(args: &[&str], profile: &Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            "--virtual-time-budget=15000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("chromium is not installed: run the suite with scripts/test.sh, which installs Debian's chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `name="value"` attribute values of every element whose opening tag contains `marker`.
fn attribute_values(dom: &str, marker: &str, name: &str) -> Vec<String> {
    dom.split('<')
        .filter(|tag| tag.contains(marker))
        .filter_map(|tag| {
            let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
            let end = tag[start..].find('"')? + start;
            Some(tag[start..end].to_string())
        })
        .collect()
}

/// The `<svg ...>...</svg>` of chart `name` in the DOM.
fn chart<'a>(dom: &'a str, name: &str) -> &'a str {
    let start = dom
        .find(&format!("data-chart=\"{name}\""))
        .unwrap_or_else(|| panic!("chart {name} not rendered"));
    let end = dom[start..].find("</svg>").map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

#[test]
fn page_renders_every_chart_with_the_snapshots_numbers_and_finds_a_user() {
    let dir = tempfile::tempdir().unwrap();
    let token = "page-token";
    let state = dir.path().join("state");
    let (mut service, base) = start_demo(
        &state,
        &[
            ("SEGMENTER_HTTP__TOKEN", token),
            ("SEGMENTER_SNAPSHOT__DIAGNOSTICS_EVERY", "1"),
        ],
        &["--max-events", "24000", "--keep-serving"],
    );
    service.wait_for(Duration::from_secs(60), |v| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("stream stopped"))
    });
    let (_, body) = http_get(&format!("{base}/snapshots/latest"), Some(token));
    let snapshot: Value = serde_json::from_str(&body).unwrap();
    let (_, body) = http_get(&format!("{base}/users/u7"), Some(token));
    let user: Value = serde_json::from_str(&body).unwrap();
    let (_, body) = http_get(&format!("{base}/users/u7/history"), Some(token));
    let history: Value = serde_json::from_str(&body).unwrap();

    let profile = dir.path().join("chromium");
    let page = format!("{base}/?user=u7#token={token}");
    let dom = chromium(&["--dump-dom", &page], &profile);
    let version = snapshot["version"].as_u64().unwrap();
    assert!(
        dom.contains(&format!("data-version=\"{version}\"")),
        "page shows the latest snapshot v{version}"
    );

    // Explained variance: one bar per kept component, values and heights from the snapshot.
    let ratios: Vec<f64> = snapshot["pca"]["explained_variance_ratio"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let ev = chart(&dom, "explained_variance");
    let values: Vec<f64> = attribute_values(ev, "class=\"bar\"", "data-value")
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    let heights: Vec<f64> = attribute_values(ev, "class=\"bar\"", "height")
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(values.len(), ratios.len(), "one bar per kept component");
    for ((v, r), h) in values.iter().zip(&ratios).zip(&heights) {
        assert!((v - r).abs() <= 1e-12 * r, "bar value {v} vs snapshot {r}");
        let expected = h / heights[0] * ratios[0];
        assert!(
            (expected - r).abs() <= 0.01 * ratios[0],
            "bar height proportional to {r}"
        );
    }
    assert_eq!(
        attribute_values(ev, "class=\"curve-point\"", "data-value").len(),
        snapshot["diagnostics"]["explained_variance_ratio_curve"]
            .as_array()
            .unwrap()
            .len()
    );

    // Inertia by k: both curves, one point per k.
    let ks = snapshot["diagnostics"]["inertia_by_k"]["k"]
        .as_array()
        .unwrap()
        .len();
    let inertia = chart(&dom, "inertia_by_k");
    assert_eq!(
        attribute_values(inertia, "class=\"projected-point\"", "data-value").len(),
        ks
    );
    assert_eq!(
        attribute_values(inertia, "class=\"full-point\"", "data-value").len(),
        ks
    );

    // Confusion matrix: k x k cells summing to the users.
    let k = snapshot["kmeans"]["k"].as_u64().unwrap() as usize;
    let cells: Vec<u64> = attribute_values(
        chart(&dom, "confusion_matrix"),
        "class=\"cell\"",
        "data-value",
    )
    .iter()
    .map(|v| v.parse().unwrap())
    .collect();
    assert_eq!(cells.len(), k * k);
    assert_eq!(
        cells.iter().sum::<u64>(),
        snapshot["counts"]["users"].as_u64().unwrap()
    );

    // Cluster sizes over snapshots: the last point of each cluster is its current size.
    let sizes = chart(&dom, "cluster_sizes");
    for (c, size) in snapshot["kmeans"]["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let series = attribute_values(sizes, &format!("data-series=\"cluster {c}\""), "data-value");
        assert_eq!(
            series.last().map(|v| v.parse::<f64>().unwrap()),
            size.as_f64(),
            "cluster {c}"
        );
    }
    let drift_bars = attribute_values(chart(&dom, "drift"), "class=\"bar\"", "data-version");
    assert!(drift_bars.contains(&version.to_string()));

    // Flows: a band per (from, to) pair of the snapshot's drift, in order, with its users.
    let flows_chart = chart(&dom, "flows");
    match snapshot["drift"]["flows"].as_array() {
        Some(flows) if !flows.is_empty() => {
            for field in ["from", "to", "users"] {
                let drawn =
                    attribute_values(flows_chart, "class=\"flow\"", &format!("data-{field}"));
                let expected: Vec<String> = flows.iter().map(|f| f[field].to_string()).collect();
                assert_eq!(drawn, expected, "flows {field}");
            }
        }
        _ => assert!(flows_chart.contains("no earlier snapshot"), "{flows_chart}"),
    }

    // Segments table and the user lookup through the form.
    assert_eq!(
        attribute_values(&dom, "tr data-cluster", "data-cluster").len(),
        k
    );
    let found = attribute_values(&dom, "id=\"lookup-segment\"", "data-cluster");
    assert_eq!(
        found,
        vec![user["cluster"].to_string()],
        "the page finds u7's segment"
    );
    // ... and its segment over the retained snapshots, as the API gives it.
    let entries = history["history"].as_array().unwrap();
    assert!(!entries.is_empty(), "{history}");
    let expected = |field: &str| -> Vec<String> {
        entries
            .iter()
            .map(|e| match &e[field] {
                Value::Null => String::new(),
                v => v.to_string(),
            })
            .collect()
    };
    let history_items = |attribute: &str| attribute_values(&dom, "li data-version", attribute);
    assert_eq!(history_items("data-version"), expected("version"));
    assert_eq!(history_items("data-cluster"), expected("cluster"));

    // Screenshot artifact.
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1300,2900",
            &page,
        ],
        &profile,
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);

    // Charts are served as SVG and rendering is deterministic.
    let (status, a) = http_get(
        &format!("{base}/charts/explained_variance.svg?version={version}"),
        Some(token),
    );
    let (_, b) = http_get(
        &format!("{base}/charts/explained_variance.svg?version={version}"),
        Some(token),
    );
    assert_eq!((status, &a), (200, &b));
    assert_eq!(
        http_get(&format!("{base}/charts/nope.svg"), Some(token)).0,
        404
    );
    assert_eq!(
        http_get(&format!("{base}/charts/drift.svg?version=x"), Some(token)).0,
        400
    );

    service.signal("-INT");
    let (code, _) = service.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0));

    // The offline report from the state dir: self-contained, renders the same charts.
    let report = dir.path().join("report");
    succeed(
        Command::new(BIN)
            .args(["report", "--out"])
            .arg(&report)
            .arg("--state-dir")
            .arg(&state),
    );
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(
            !html.contains(external),
            "report must open offline: found {external}"
        );
    }
    let offline = chromium(
        &[
            "--dump-dom",
            &format!("file://{}", report.join("index.html").display()),
        ],
        &profile,
    );
    for name in segmenter::charts::CHART_NAMES {
        chart(&offline, name);
    }
    assert!(offline.contains(&format!("snapshot v{version}")));
}
