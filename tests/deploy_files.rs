//! The files of deploy/: the Dockerfile, the compose setup, the Kubernetes manifests, the
//! Prometheus configuration and alerts, and the Grafana dashboard. They are checked with the real
//! tools (promtool; the Kubernetes JSON schemas through the PyPI package kubernetes-validate) and
//! against the service itself: its configuration loader must accept every config file they ship,
//! and every metric their PromQL uses must be one `segmenter::telemetry::Metrics` exports, so
//! renaming a metric without updating the dashboard and the alerts fails here.
//!
//! Needs `promtool` on PATH and `SEGMENTER_TEST_PYTHON` (a Python with kubernetes-validate);
//! scripts/test.sh provides both.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use segmenter::config::Config;
use segmenter::telemetry::Metrics;
use serde_yaml::Value;

/// Kubernetes version the manifests are validated against (the oldest one they must run on).
const KUBERNETES_VERSION: &str = "1.30.0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_yaml::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

/// Every document of a multi-document YAML file.
fn yaml_docs(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {value:?}"))
}

fn seq_of<'a>(value: &'a Value, what: &str) -> &'a [Value] {
    value
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: expected a list, found {value:?}"))
}

/// A scalar as text (compose and Kubernetes accept numbers where strings are meant).
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| items.iter().filter_map(scalar).collect())
        .unwrap_or_default()
}

fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn promtool(args: &[&str]) -> Output {
    match Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not on PATH: run the suite with scripts/test.sh, which installs \
             Debian's prometheus package (server and promtool)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    }
}

// ------------------------------------------------------------------------------------------
// Metric names

/// The names the service exports, and which of them are histograms (whose series carry the
/// `_bucket`, `_sum` and `_count` suffixes).
fn exported_metrics() -> (BTreeSet<String>, BTreeSet<String>) {
    let metrics = Metrics::new();
    // `render()` lists a labelled family's TYPE only once it has a series: give each one.
    metrics.consumer_lag.with_label_values(&["0"]).set(0);
    metrics.cluster_size.with_label_values(&["0"]).set(0);
    metrics
        .explained_variance_ratio
        .with_label_values(&["0"])
        .set(0.0);
    let names: BTreeSet<String> = metrics.names().into_iter().collect();
    let histograms = metrics
        .render()
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" histogram"))
        .map(str::to_string)
        .collect();
    (names, histograms)
}

fn is_exported(token: &str, names: &BTreeSet<String>, histograms: &BTreeSet<String>) -> bool {
    names.contains(token)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            token
                .strip_suffix(suffix)
                .is_some_and(|base| histograms.contains(base))
        })
}

/// The `segmenter_[a-z0-9_]+` tokens of a PromQL expression.
fn metric_tokens(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let is_name_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut tokens = Vec::new();
    let mut from = 0;
    while let Some(pos) = expr[from..].find("segmenter_") {
        let start = from + pos;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if start == 0 || !is_name_byte(bytes[start - 1]) {
            tokens.push(expr[start..end].to_string());
        }
        from = end;
    }
    tokens
}

// ------------------------------------------------------------------------------------------
// Grafana dashboard

fn dashboard() -> serde_json::Value {
    let path = deploy("grafana/dashboards/segmenter.json");
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// The panels, those nested in collapsed rows included (rows themselves left out).
fn dashboard_panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    fn walk<'a>(panels: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            if panel["type"] == "row" {
                walk(&panel["panels"], out);
            } else {
                out.push(panel);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn panel_exprs(panel: &serde_json::Value) -> Vec<String> {
    panel["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|target| {
            target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {:?}: a target without expr", panel["title"]))
                .to_string()
        })
        .collect()
}

/// The PromQL of the query variables (`label_values(metric, label)` and the like).
fn dashboard_variable_queries(dashboard: &serde_json::Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|variable| variable["type"] == "query")
        .filter_map(|variable| match &variable["query"] {
            serde_json::Value::String(q) => Some(q.clone()),
            q => q["query"].as_str().map(str::to_string),
        })
        .collect()
}

/// Replaces Grafana's variables by values that make the expression plain PromQL.
fn expand_grafana_variables(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .expect("unclosed ${ in a dashboard expression");
            (&braced[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        out.push_str(match name {
            "__rate_interval" | "__interval" => "1m",
            "__range" => "1h",
            _ => ".*",
        });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

// ------------------------------------------------------------------------------------------
// Prometheus alerts

fn alert_rules() -> Vec<Value> {
    let rules = yaml(&deploy("prometheus/alerts.yml"));
    seq_of(&rules["groups"], "alerts.yml groups")
        .iter()
        .flat_map(|group| seq_of(&group["rules"], "alerts.yml rules").to_vec())
        .collect()
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    let config = promtool(&["check", "config", "deploy/prometheus/prometheus.yml"]);
    assert!(
        config.status.success(),
        "promtool check config deploy/prometheus/prometheus.yml failed:\n{}",
        output_text(&config)
    );
    let rules = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    assert!(
        rules.status.success(),
        "promtool check rules deploy/prometheus/alerts.yml failed:\n{}",
        output_text(&rules)
    );

    // The scrape config loads the alerts and scrapes the service where compose runs it.
    let prometheus = yaml(&deploy("prometheus/prometheus.yml"));
    assert!(
        strings(&prometheus["rule_files"]).contains(&"alerts.yml".to_string()),
        "prometheus.yml must load alerts.yml"
    );
    let jobs = seq_of(&prometheus["scrape_configs"], "scrape_configs");
    let job = jobs
        .iter()
        .find(|job| job["job_name"].as_str() == Some("segmenter"))
        .expect("a scrape job named segmenter (the alerts select job=\"segmenter\")");
    assert_eq!(
        job["metrics_path"].as_str().unwrap_or("/metrics"),
        "/metrics"
    );
    let targets: Vec<String> = seq_of(&job["static_configs"], "static_configs")
        .iter()
        .flat_map(|c| strings(&c["targets"]))
        .collect();
    assert!(
        targets.contains(&"segmenter:9464".to_string()),
        "the segmenter job must scrape segmenter:9464, found {targets:?}"
    );

    // Every alert the operators rely on, with what it watches, a duration and its texts.
    let rules = alert_rules();
    let wanted: [(&str, &[&str]); 5] = [
        (
            "SegmenterConsumerLagGrowing",
            &["deriv(", "segmenter_consumer_lag_messages", "> 10000"],
        ),
        (
            "SegmenterSnapshotStale",
            &["segmenter_snapshot_age_seconds > 600"],
        ),
        (
            "SegmenterDeadLetterRateHigh",
            &[
                "segmenter_events_rejected_total",
                "segmenter_events_consumed_total",
                "> 0.05",
            ],
        ),
        ("SegmenterNotReady", &["segmenter_ready == 0"]),
        ("SegmenterDown", &["up{job=\"segmenter\"} == 0"]),
    ];
    for (name, fragments) in wanted {
        let rule = rules
            .iter()
            .find(|r| r["alert"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("alerts.yml has no alert {name}"));
        let expr = str_of(&rule["expr"], name);
        for fragment in fragments {
            assert!(
                expr.contains(fragment),
                "alert {name}: `{expr}` lacks `{fragment}`"
            );
        }
        assert!(rule["for"].as_str().is_some(), "alert {name} needs a `for`");
    }
    for rule in rules.iter().filter(|r| r["alert"].is_string()) {
        let name = str_of(&rule["alert"], "alert");
        assert!(
            rule["labels"]["severity"].is_string(),
            "alert {name} needs a severity label"
        );
        assert!(
            rule["annotations"]["summary"].is_string()
                && rule["annotations"]["description"].is_string(),
            "alert {name} needs a summary and a description"
        );
    }
}

#[test]
fn dashboard_expressions_are_valid_promql() {
    // promtool parses each expression as a recording rule (Grafana variables expanded).
    let dashboard = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut count = 0;
    for panel in dashboard_panels(&dashboard) {
        for expr in panel_exprs(panel) {
            count += 1;
            let expanded = expand_grafana_variables(&expr);
            rules.push_str(&format!(
                "      - record: segmenter_dashboard:expr_{count}\n        expr: {}\n",
                serde_json::to_string(&expanded).expect("JSON string")
            ));
        }
    }
    assert!(count > 0, "the dashboard has no expressions");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, &rules).expect("write rules");
    let output = promtool(&["check", "rules", file.to_str().expect("utf-8 path")]);
    assert!(
        output.status.success(),
        "dashboard expressions do not parse as PromQL:\n{}\n{rules}",
        output_text(&output)
    );
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let (names, histograms) = exported_metrics();
    assert!(
        names.contains("segmenter_consumer_lag_messages")
            && histograms.contains("segmenter_batch_apply_duration_seconds"),
        "unexpected metric names from Metrics::names(): {names:?}"
    );
    assert!(!is_exported(
        "segmenter_no_such_metric",
        &names,
        &histograms
    ));
    assert!(!is_exported("segmenter_ready_bucket", &names, &histograms));

    let dashboard = dashboard();
    let mut exprs: Vec<(String, String)> = Vec::new();
    let panels = dashboard_panels(&dashboard);
    assert!(!panels.is_empty(), "the dashboard has no panels");
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        let panel_exprs = panel_exprs(panel);
        assert!(
            !panel_exprs.is_empty(),
            "dashboard panel {title:?} has no query"
        );
        for expr in panel_exprs {
            exprs.push((format!("dashboard panel {title:?}"), expr));
        }
    }
    for query in dashboard_variable_queries(&dashboard) {
        exprs.push(("dashboard variable".to_string(), query));
    }
    for rule in alert_rules() {
        let name = rule["alert"]
            .as_str()
            .or(rule["record"].as_str())
            .unwrap_or("?")
            .to_string();
        let expr = str_of(&rule["expr"], &name).to_string();
        exprs.push((format!("alert {name}"), expr));
    }

    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    for (place, expr) in &exprs {
        assert!(!expr.trim().is_empty(), "{place}: empty expression");
        for token in metric_tokens(expr) {
            if is_exported(&token, &names, &histograms) {
                used.insert(token);
            } else {
                unknown.push(format!("{place}: {token} in `{expr}`"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics the service does not export (src/telemetry.rs exports {names:?}):\n{}",
        unknown.join("\n")
    );
    assert!(used.len() >= 10, "suspiciously few metrics found: {used:?}");

    // One panel at least per topic operators look at: the panel must query all of the metrics.
    let topics: [(&str, &[&str]); 8] = [
        (
            "ingest rate",
            &[
                "segmenter_events_consumed_total",
                "segmenter_events_applied_total",
            ],
        ),
        ("consumer lag", &["segmenter_consumer_lag_messages"]),
        ("rejected events", &["segmenter_events_rejected_total"]),
        ("cluster sizes", &["segmenter_cluster_size_users"]),
        ("inertia", &["segmenter_kmeans_inertia"]),
        (
            "Naive Bayes agreement",
            &[
                "segmenter_naive_bayes_train_agreement_ratio",
                "segmenter_naive_bayes_holdout_agreement_ratio",
            ],
        ),
        ("snapshot age", &["segmenter_snapshot_age_seconds"]),
        (
            "batch apply latency p99",
            &[
                "segmenter_batch_apply_duration_seconds_bucket",
                "histogram_quantile(0.99",
            ],
        ),
    ];
    for (topic, needles) in topics {
        let found = panels.iter().any(|panel| {
            let all = panel_exprs(panel).join("\n");
            needles.iter().all(|needle| all.contains(needle))
        });
        assert!(
            found,
            "no dashboard panel for {topic} (one querying {needles:?})"
        );
    }
    let lag_by_partition = panels.iter().any(|panel| {
        panel_exprs(panel)
            .iter()
            .any(|e| e.contains("segmenter_consumer_lag_messages") && e.contains("partition"))
    });
    assert!(lag_by_partition, "the lag panel must show each partition");
    let rejected_by_reason = panels.iter().any(|panel| {
        panel_exprs(panel)
            .iter()
            .any(|e| e.contains("segmenter_events_rejected_total") && e.contains("reason"))
    });
    assert!(
        rejected_by_reason,
        "rejected events must be shown by reason"
    );
}

#[test]
fn grafana_provisioning_points_at_prometheus_and_the_dashboard() {
    let datasources = yaml(&deploy("grafana/provisioning/datasources/prometheus.yml"));
    let prometheus = seq_of(&datasources["datasources"], "datasources")
        .iter()
        .find(|d| d["type"].as_str() == Some("prometheus"))
        .expect("a prometheus datasource");
    assert_eq!(
        prometheus["url"].as_str(),
        Some("http://prometheus:9090"),
        "the datasource must reach the compose Prometheus"
    );

    let providers = yaml(&deploy("grafana/provisioning/dashboards/segmenter.yml"));
    let provider = &seq_of(&providers["providers"], "providers")[0];
    assert_eq!(provider["type"].as_str(), Some("file"));
    let path = str_of(&provider["options"]["path"], "dashboard provider path");

    // The compose file mounts deploy/grafana/dashboards where the provider reads.
    let compose = yaml(&deploy("docker-compose.yml"));
    let mounts = strings(&compose["services"]["grafana"]["volumes"]);
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with(&format!("./grafana/dashboards:{path}"))),
        "grafana must mount ./grafana/dashboards at {path}: {mounts:?}"
    );
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./grafana/provisioning:/etc/grafana/provisioning")),
        "grafana must mount ./grafana/provisioning: {mounts:?}"
    );
    let dashboard = dashboard();
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
}

// ------------------------------------------------------------------------------------------
// Kubernetes

fn python() -> PathBuf {
    match std::env::var_os("SEGMENTER_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "SEGMENTER_TEST_PYTHON is not set: run the suite with scripts/test.sh, which creates \
             target/test-venv from scripts/requirements-test.txt (kubernetes-validate)"
        ),
    }
}

fn kubernetes_validate(files: &[PathBuf]) -> Output {
    let python = python();
    Command::new(&python)
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
        ])
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (SEGMENTER_TEST_PYTHON): {e}; run scripts/test.sh",
                python.display()
            )
        })
}

fn kubernetes_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes"))
        .expect("deploy/kubernetes")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> &str {
    path.file_name()
        .and_then(|n| n.to_str())
        .expect("utf-8 file name")
}

#[test]
fn kubernetes_manifests_match_the_kubernetes_schemas() {
    let files: Vec<PathBuf> = kubernetes_files()
        .into_iter()
        .filter(|p| !matches!(file_name(p), "kustomization.yaml" | "podmonitor.yaml"))
        .collect();
    assert!(
        files.len() >= 3,
        "expected configmap, service and statefulset manifests, found {files:?}"
    );
    let output = kubernetes_validate(&files);
    let text = output_text(&output);
    assert!(
        !text.contains("No module named"),
        "kubernetes-validate is not installed in SEGMENTER_TEST_PYTHON: run scripts/test.sh\n{text}"
    );
    assert!(
        output.status.success() && !text.contains("ERROR") && !text.contains("WARN"),
        "Kubernetes manifests do not validate against the {KUBERNETES_VERSION} schemas:\n{text}"
    );
    for file in &files {
        assert!(
            text.lines()
                .any(|l| l.contains(file_name(file)) && l.contains("passed")),
            "{} was not validated:\n{text}",
            file.display()
        );
    }

    // The validator really rejects what does not match the schema.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: x\nspec:\n  replica: 1\n",
    )
    .expect("write");
    let output = kubernetes_validate(&[bad]);
    assert!(
        !output.status.success(),
        "kubernetes-validate accepted an unknown field:\n{}",
        output_text(&output)
    );
}

fn find_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

/// `selector` (a label map) selects `labels` (a label map).
fn selects(selector: &Value, labels: &Value) -> bool {
    selector.as_mapping().is_some_and(|m| {
        !m.is_empty() && m.iter().all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    })
}

#[test]
fn kubernetes_manifests_wire_the_service_correctly() {
    let files = kubernetes_files();
    let kustomization = yaml(&deploy("kubernetes/kustomization.yaml"));
    let resources: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let present: BTreeSet<String> = files
        .iter()
        .map(|p| file_name(p).to_string())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(
        resources, present,
        "kustomization.yaml must list every manifest of deploy/kubernetes"
    );
    let docs: Vec<Value> = files
        .iter()
        .filter(|p| file_name(p) != "kustomization.yaml")
        .flat_map(|p| yaml_docs(p))
        .collect();

    let statefulset = *find_kind(&docs, "StatefulSet")
        .first()
        .expect("a StatefulSet");
    let spec = &statefulset["spec"];
    let pod = &spec["template"];
    let pod_labels = &pod["metadata"]["labels"];
    assert!(
        selects(&spec["selector"]["matchLabels"], pod_labels),
        "the StatefulSet selector must select its pods"
    );
    let containers = seq_of(&pod["spec"]["containers"], "containers");
    let container = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("segmenter"))
        .expect("a container named segmenter");

    // Port 9464, named, and the probes on it.
    let ports = seq_of(&container["ports"], "container ports");
    let http = ports
        .iter()
        .find(|p| p["containerPort"].as_u64() == Some(9464))
        .expect("container port 9464");
    let port_name = str_of(&http["name"], "port name").to_string();
    let probe = |kind: &str, path: &str| {
        let get = &container[kind]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{kind} must GET {path}");
        let port = &get["port"];
        assert!(
            port.as_str() == Some(port_name.as_str()) || port.as_u64() == Some(9464),
            "{kind} must probe port 9464"
        );
    };
    probe("livenessProbe", "/healthz");
    probe("readinessProbe", "/readyz");

    // Static membership from the pod name.
    let env = seq_of(&container["env"], "env");
    let instance = env
        .iter()
        .find(|e| e["name"].as_str() == Some("SEGMENTER_KAFKA__INSTANCE_ID"))
        .expect("SEGMENTER_KAFKA__INSTANCE_ID in the container env");
    assert_eq!(
        instance["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name"),
        "the instance id must come from the pod name (downward API)"
    );
    let plain_env: Vec<(String, String)> = env
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), scalar(&e["value"])?)))
        .collect();

    // Resources, and a non-root user able to write its volume.
    for section in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                scalar(&container["resources"][section][resource]).is_some(),
                "resources.{section}.{resource} must be set"
            );
        }
    }
    let security = &pod["spec"]["securityContext"];
    assert_eq!(security["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(security["runAsUser"].as_u64(), Some(10001));
    assert!(
        security["fsGroup"].as_u64().is_some(),
        "fsGroup makes the PVC writable"
    );

    // Prometheus annotations on the pod template.
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some("9464"));
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));

    // The config file: from the ConfigMap, where SEGMENTER_CONFIG points, accepted by the loader.
    let configmap = *find_kind(&docs, "ConfigMap").first().expect("a ConfigMap");
    let configmap_name = str_of(&configmap["metadata"]["name"], "ConfigMap name");
    let volumes = seq_of(&pod["spec"]["volumes"], "volumes");
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == Some(configmap_name))
        .expect("a volume from the ConfigMap");
    let mounts = seq_of(&container["volumeMounts"], "volumeMounts");
    let mount_of = |volume: &str| {
        mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(volume))
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("volume {volume} is not mounted"))
            .to_string()
    };
    let config_dir = mount_of(str_of(&config_volume["name"], "volume name"));
    let config_path = plain_env
        .iter()
        .find(|(k, _)| k == "SEGMENTER_CONFIG")
        .map_or("/etc/segmenter/segmenter.toml".to_string(), |(_, v)| {
            v.clone()
        });
    let key = config_path
        .strip_prefix(&format!("{config_dir}/"))
        .unwrap_or_else(|| panic!("SEGMENTER_CONFIG {config_path} is not under {config_dir}"));
    let toml_text = str_of(&configmap["data"][key], "ConfigMap config file");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("segmenter.toml");
    std::fs::write(&file, toml_text).expect("write");
    let mut env_for_loader = plain_env.clone();
    env_for_loader.push((
        "SEGMENTER_KAFKA__INSTANCE_ID".to_string(),
        "segmenter-0".to_string(),
    ));
    let config = Config::load_with_env(Some(file.as_path()), env_for_loader)
        .unwrap_or_else(|e| panic!("the ConfigMap's segmenter.toml does not load: {e}"));
    assert_eq!(config.kafka.instance_id, "segmenter-0");
    let listen = config.http.listen_addr().expect("listen address");
    assert_eq!(listen.port(), 9464);
    assert!(
        listen.ip().is_unspecified(),
        "[http] listen must accept the kubelet and Prometheus: {listen}"
    );

    // The state dir is the PVC of each pod.
    let claims = seq_of(&spec["volumeClaimTemplates"], "volumeClaimTemplates");
    let state_claim = str_of(&claims[0]["metadata"]["name"], "claim name");
    assert_eq!(
        PathBuf::from(mount_of(state_claim)),
        config.state.dir,
        "the volumeClaimTemplate must be mounted at [state] dir"
    );

    // Services: a headless one for the StatefulSet and a ClusterIP one for the API.
    let services = find_kind(&docs, "Service");
    let service_name = str_of(&spec["serviceName"], "serviceName");
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"].as_str() == Some(service_name))
        .unwrap_or_else(|| panic!("no Service {service_name} (the StatefulSet's serviceName)"));
    assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
    let api = services
        .iter()
        .find(|s| s["spec"]["clusterIP"].as_str() != Some("None"))
        .expect("a ClusterIP Service for the API");
    for service in [headless, api] {
        assert!(selects(&service["spec"]["selector"], pod_labels));
        assert!(
            seq_of(&service["spec"]["ports"], "service ports")
                .iter()
                .any(|p| p["port"].as_u64() == Some(9464)),
            "services expose port 9464"
        );
    }

    // The PodMonitor (a CRD, not in the Kubernetes schemas): checked here.
    let monitor = *find_kind(&docs, "PodMonitor")
        .first()
        .expect("a PodMonitor");
    assert_eq!(
        monitor["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    let endpoints = seq_of(
        &monitor["spec"]["podMetricsEndpoints"],
        "podMetricsEndpoints",
    );
    assert!(
        endpoints
            .iter()
            .any(|e| e["path"].as_str() == Some("/metrics")
                && e["port"].as_str() == Some(port_name.as_str())),
        "a podMetricsEndpoint must scrape /metrics on port {port_name}"
    );
    // The alerts select job="segmenter": the job label comes from this pod label.
    let job_label = str_of(&monitor["spec"]["jobLabel"], "jobLabel");
    assert_eq!(pod_labels[job_label].as_str(), Some("segmenter"));
}

// ------------------------------------------------------------------------------------------
// docker compose

fn compose_env(service: &Value) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Mapping(m) => m
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), scalar(v)?)))
            .collect(),
        Value::Sequence(items) => items
            .iter()
            .filter_map(|i| i.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        _ => Vec::new(),
    }
}

fn depends_healthy(service: &Value, on: &str) -> bool {
    service["depends_on"][on]["condition"].as_str() == Some("service_healthy")
}

#[test]
fn compose_runs_the_whole_setup() {
    let compose = yaml(&deploy("docker-compose.yml"));
    let services = &compose["services"];
    for name in ["kafka", "segmenter", "prometheus", "grafana", "loader"] {
        assert!(
            services[name].is_mapping(),
            "compose service {name} missing"
        );
    }

    // Every bind-mounted file or directory exists (paths are relative to deploy/).
    for (name, service) in services.as_mapping().expect("services") {
        for mount in strings(&service["volumes"]) {
            let source = mount.split(':').next().unwrap_or_default();
            if source.starts_with("./") || source.starts_with("../") {
                assert!(
                    deploy(source).exists(),
                    "service {name:?} mounts {source}, which does not exist in deploy/"
                );
            }
        }
    }

    let kafka = &services["kafka"];
    assert_eq!(kafka["image"].as_str(), Some("apache/kafka:4.1.0"));
    assert!(
        kafka["healthcheck"]["test"].is_sequence() || kafka["healthcheck"]["test"].is_string(),
        "kafka needs a healthcheck"
    );
    let kafka_env: BTreeMap<String, String> = compose_env(kafka).into_iter().collect();
    assert!(
        kafka_env
            .get("KAFKA_ADVERTISED_LISTENERS")
            .is_some_and(|l| l.contains("://kafka:9092")),
        "kafka must advertise kafka:9092 to the other containers"
    );
    assert_eq!(
        kafka_env.get("KAFKA_PROCESS_ROLES").map(String::as_str),
        Some("broker,controller"),
        "a single KRaft node"
    );

    let segmenter = &services["segmenter"];
    let build = &segmenter["build"];
    let context = str_of(&build["context"], "segmenter build context");
    let dockerfile = str_of(&build["dockerfile"], "segmenter build dockerfile");
    assert!(
        deploy(context).join(dockerfile).is_file(),
        "build context {context} + {dockerfile} does not name the Dockerfile"
    );
    assert_eq!(
        deploy(context).join(dockerfile).canonicalize().ok(),
        deploy("docker/Dockerfile").canonicalize().ok()
    );
    let ports = strings(&segmenter["ports"]);
    assert!(
        ports
            .iter()
            .any(|p| p.ends_with("9464:9464") || p == "9464"),
        "segmenter must publish 9464: {ports:?}"
    );
    let mounts = strings(&segmenter["volumes"]);
    assert!(
        mounts.contains(&"segmenter-state:/var/lib/segmenter".to_string()),
        "segmenter keeps its state in the named volume segmenter-state: {mounts:?}"
    );
    assert!(
        compose["volumes"]
            .as_mapping()
            .is_some_and(|v| v.contains_key("segmenter-state")),
        "the segmenter-state volume must be declared"
    );
    assert!(
        mounts.contains(&"./segmenter.toml:/etc/segmenter/segmenter.toml:ro".to_string()),
        "segmenter mounts ./segmenter.toml read-only: {mounts:?}"
    );
    assert!(
        depends_healthy(segmenter, "kafka"),
        "segmenter waits for a healthy kafka"
    );

    let loader = &services["loader"];
    assert_eq!(loader["restart"].as_str(), Some("no"));
    assert_eq!(
        loader["image"], segmenter["image"],
        "the loader runs the segmenter image"
    );
    assert!(depends_healthy(loader, "kafka"));
    let script = [&loader["entrypoint"], &loader["command"]]
        .iter()
        .flat_map(|v| match v {
            Value::String(s) => vec![s.clone()],
            other => strings(other),
        })
        .collect::<Vec<_>>()
        .join(" ");
    for needle in [
        "segmenter generate --out /data/ratings.csv",
        "segmenter produce --brokers kafka:9092 --topic ratings --partitions 4 --ratings /data/ratings.csv",
    ] {
        assert!(
            script.contains(needle),
            "the loader must run `{needle}`: {script}"
        );
    }

    let prometheus = &services["prometheus"];
    assert!(
        str_of(&prometheus["image"], "prometheus image").starts_with("prom/prometheus"),
        "prometheus image"
    );
    let prometheus_mounts = strings(&prometheus["volumes"]);
    for file in ["prometheus.yml", "alerts.yml"] {
        assert!(
            prometheus_mounts
                .iter()
                .any(|m| m.starts_with(&format!("./prometheus/{file}:/etc/prometheus/{file}"))),
            "prometheus must mount {file} next to its config: {prometheus_mounts:?}"
        );
    }
    assert!(
        strings(&prometheus["ports"])
            .iter()
            .any(|p| p.ends_with("9090:9090"))
    );
    let grafana = &services["grafana"];
    assert!(str_of(&grafana["image"], "grafana image").starts_with("grafana/grafana"));
    assert!(
        strings(&grafana["ports"])
            .iter()
            .any(|p| p.ends_with("3000:3000"))
    );

    // The config compose mounts loads, alone and with the image's and the service's overrides.
    let path = deploy("segmenter.toml");
    let config = Config::load_with_env(Some(path.as_path()), Vec::<(String, String)>::new())
        .unwrap_or_else(|e| panic!("deploy/segmenter.toml does not load: {e}"));
    assert_eq!(config.kafka.brokers, "kafka:9092");
    assert_eq!(config.state.dir, PathBuf::from("/var/lib/segmenter"));
    let listen = config.http.listen_addr().expect("listen address");
    assert!(listen.ip().is_unspecified() && listen.port() == 9464);
    let mut env = dockerfile_env();
    env.extend(compose_env(segmenter));
    let with_env = Config::load_with_env(Some(path.as_path()), env)
        .unwrap_or_else(|e| panic!("deploy/segmenter.toml with the container's env: {e}"));
    assert_eq!(with_env.kafka.brokers, "kafka:9092");
    assert_eq!(with_env.state.dir, config.state.dir);

    // Everything else is config/segmenter.toml.
    let defaults = Config::load_with_env(
        Some(repo().join("config/segmenter.toml").as_path()),
        Vec::<(String, String)>::new(),
    )
    .expect("config/segmenter.toml");
    let mut same = config.clone();
    same.kafka.brokers = defaults.kafka.brokers.clone();
    same.state.dir = defaults.state.dir.clone();
    same.http.listen = defaults.http.listen.clone();
    assert_eq!(
        same, defaults,
        "deploy/segmenter.toml must differ from config/segmenter.toml only in brokers, \
         state dir and listen address"
    );
}

// ------------------------------------------------------------------------------------------
// Dockerfile

/// Instructions as (KEYWORD, arguments), continuation lines joined, comments dropped.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let text = read(&deploy("docker/Dockerfile"));
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (current.is_empty() && trimmed.is_empty()) {
            continue;
        }
        if let Some(continued) = trimmed.strip_suffix('\\') {
            current.push_str(continued);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((current.as_str(), ""));
        out.push((keyword.to_ascii_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

/// The instructions of each stage, FROM first.
fn dockerfile_stages() -> Vec<Vec<(String, String)>> {
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for instruction in dockerfile_instructions() {
        if instruction.0 == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(instruction);
    }
    stages
}

fn env_pairs(args: &str) -> Vec<(String, String)> {
    let tokens: Vec<&str> = args.split_whitespace().collect();
    match tokens.first() {
        Some(first) if !first.contains('=') => {
            vec![(first.to_string(), tokens[1..].join(" "))]
        }
        _ => tokens
            .iter()
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect(),
    }
}

/// The ENV of the runtime stage.
fn dockerfile_env() -> Vec<(String, String)> {
    let stages = dockerfile_stages();
    stages
        .last()
        .expect("a stage")
        .iter()
        .filter(|(k, _)| k == "ENV")
        .flat_map(|(_, args)| env_pairs(args))
        .collect()
}

/// Files the crate embeds at compile time (`include_str!`, `include_bytes!`), repo-relative.
fn embedded_files() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = repo().canonicalize().expect("repo");
    let mut sources = Vec::new();
    walk(&repo().join("src"), &mut sources);
    let mut embedded = Vec::new();
    for source in sources {
        let text = read(&source);
        for marker in ["include_str!(\"", "include_bytes!(\""] {
            for (pos, _) in text.match_indices(marker) {
                let rest = &text[pos + marker.len()..];
                let literal = &rest[..rest.find('"').expect("closing quote")];
                let target = source
                    .parent()
                    .expect("parent")
                    .join(literal)
                    .canonicalize()
                    .unwrap_or_else(|e| panic!("{literal} in {}: {e}", source.display()));
                let relative = target
                    .strip_prefix(&root)
                    .expect("embedded file inside the repository");
                embedded.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    embedded
}

#[test]
fn dockerfile_builds_like_the_tests_and_runs_unprivileged() {
    let stages = dockerfile_stages();
    assert!(
        stages.len() >= 2,
        "the Dockerfile must be multi-stage (build, then runtime)"
    );
    let builder = &stages[0];
    let runtime = stages.last().expect("a stage");
    assert!(
        builder[0].1.starts_with("rust:1.95-bookworm"),
        "builder: {}",
        builder[0].1
    );
    assert!(
        runtime[0].1.starts_with("debian:bookworm-slim"),
        "runtime: {}",
        runtime[0].1
    );

    // The release binary exactly as the tests build it: locked, default features.
    let runs: Vec<&String> = builder
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, a)| a)
        .collect();
    assert!(
        runs.iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "the builder must run `cargo build --release --locked`"
    );
    for run in &runs {
        for flag in [
            "--features",
            "--no-default-features",
            "--all-features",
            "--profile",
        ] {
            assert!(
                !run.contains(flag),
                "`{run}`: {flag} would build other code than the tests"
            );
        }
    }

    // Every file the build copies is in the context, and every embedded file is copied.
    let ignored: Vec<String> = read(&repo().join(".dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    for excluded in ["target", ".git"] {
        assert!(
            ignored.iter().any(|p| p == excluded),
            ".dockerignore must exclude {excluded}/"
        );
    }
    let mut copied = Vec::new();
    for stage in &stages {
        for (keyword, args) in stage {
            if (keyword == "COPY" || keyword == "ADD") && !args.contains("--from=") {
                let tokens: Vec<&str> = args
                    .split_whitespace()
                    .filter(|t| !t.starts_with("--"))
                    .collect();
                for source in &tokens[..tokens.len() - 1] {
                    let source = source.trim_end_matches('/');
                    assert!(
                        repo().join(source).exists(),
                        "COPY {source}: no such file in the repository"
                    );
                    assert!(
                        !ignored
                            .iter()
                            .any(|p| source == p || source.starts_with(&format!("{p}/"))),
                        "COPY {source}: excluded by .dockerignore"
                    );
                    copied.push(source.to_string());
                }
            }
        }
    }
    for needed in ["Cargo.toml", "Cargo.lock", "src"] {
        assert!(
            copied.iter().any(|c| c == needed),
            "the build must COPY {needed}"
        );
    }
    for file in embedded_files() {
        assert!(
            copied
                .iter()
                .any(|c| file == *c || file.starts_with(&format!("{c}/"))),
            "src embeds {file} at compile time, but the Dockerfile does not copy it"
        );
    }

    // Runtime: binary from the builder, default config, non-root user, state volume, port.
    let get = |keyword: &str| -> Vec<&String> {
        runtime
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, a)| a)
            .collect()
    };
    assert!(
        get("COPY").iter().any(|a| a.contains("--from=builder")),
        "the runtime stage copies the binary from the builder"
    );
    assert!(
        get("COPY")
            .iter()
            .any(|a| a.ends_with("config/segmenter.toml /etc/segmenter/segmenter.toml")),
        "the default config goes to /etc/segmenter/segmenter.toml"
    );
    let user = get("USER")
        .last()
        .map(|u| u.split(':').next().unwrap_or_default().to_string())
        .expect("the runtime stage must set USER");
    assert!(
        user != "root" && user != "0" && !user.is_empty(),
        "USER {user} is root"
    );
    if let Ok(uid) = user.parse::<u32>() {
        assert_eq!(uid, 10001, "the Kubernetes manifests run as uid 10001");
    }
    let volumes: Vec<String> = get("VOLUME")
        .iter()
        .flat_map(|v| {
            serde_json::from_str::<Vec<String>>(v)
                .unwrap_or_else(|_| v.split_whitespace().map(str::to_string).collect())
        })
        .collect();
    assert!(
        volumes.contains(&"/var/lib/segmenter".to_string()),
        "VOLUME /var/lib/segmenter"
    );
    assert!(
        get("EXPOSE")
            .iter()
            .any(|e| e.split_whitespace().any(|p| p == "9464" || p == "9464/tcp")),
        "EXPOSE 9464"
    );
    let json = |keyword: &str| -> Vec<String> {
        let args = get(keyword)
            .last()
            .copied()
            .unwrap_or_else(|| panic!("{keyword} missing"));
        serde_json::from_str(args)
            .unwrap_or_else(|e| panic!("{keyword} must be in exec (JSON) form: {e}"))
    };
    assert_eq!(json("ENTRYPOINT"), ["segmenter"]);
    assert_eq!(json("CMD"), ["run"]);

    // The image's environment is a valid configuration on top of the default file.
    let env: BTreeMap<String, String> = dockerfile_env().into_iter().collect();
    for (key, value) in [
        ("SEGMENTER_CONFIG", "/etc/segmenter/segmenter.toml"),
        ("SEGMENTER_STATE__DIR", "/var/lib/segmenter"),
        ("SEGMENTER_HTTP__LISTEN", "0.0.0.0:9464"),
    ] {
        assert_eq!(env.get(key).map(String::as_str), Some(value), "ENV {key}");
    }
    let config = Config::load_with_env(
        Some(repo().join("config/segmenter.toml").as_path()),
        dockerfile_env(),
    )
    .unwrap_or_else(|e| panic!("the image's ENV does not load: {e}"));
    assert_eq!(config.state.dir, PathBuf::from("/var/lib/segmenter"));
    assert_eq!(config.http.listen, "0.0.0.0:9464");
}
