//! The HTTP API of a running service (the demo, so no broker is needed): every route, unknown
//! ids, malformed versions and limits, and a wrong or missing token; then `segmenter snapshot`
//! from the running service and from the state dir.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const TOKEN: &str = "s3cret-token";

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn every_route_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (service, base) = start_demo(
        &state,
        &[("SEGMENTER_HTTP__TOKEN", TOKEN)],
        &["--max-events", "30000", "--keep-serving"],
    );
    let get = |path: &str| http_get(&format!("{base}{path}"), Some(TOKEN));

    // Open routes.
    let (status, body) = http_get(&format!("{base}/healthz"), None);
    assert_eq!((status, json(&body)["status"].as_str()), (200, Some("ok")));
    let (status, body) = http_get(&format!("{base}/readyz"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["ready"], true);
    let (status, body) = http_get(&format!("{base}/metrics"), None);
    assert_eq!(status, 200);
    assert!(body.contains("segmenter_events_consumed_total"));

    // The token guards everything else.
    for path in [
        "/snapshots",
        "/snapshots/latest",
        "/snapshots/1",
        "/snapshots/latest/assignments",
        "/clusters/0",
        "/clusters/0/members",
        "/users/u1",
        "/users/u1/history",
        "/openapi.json",
        "/group",
        "/group/users/u1",
    ] {
        let (missing, body) = http_get(&format!("{base}{path}"), None);
        assert_eq!(missing, 401, "{path} without token: {body}");
        assert_eq!(json(&body)["status"], 401);
        let (wrong, _) = http_get(&format!("{base}{path}"), Some("not-the-token"));
        assert_eq!(wrong, 401, "{path} with a wrong token");
    }

    // The OpenAPI document lists every route.
    let (status, body) = get("/openapi.json");
    assert_eq!(status, 200);
    let spec = json(&body);
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/snapshots",
        "/snapshots/latest",
        "/snapshots/{version}",
        "/snapshots/{version}/assignments",
        "/clusters/{id}",
        "/clusters/{id}/members",
        "/users/{id}",
        "/users/{id}/history",
        "/openapi.json",
        "/charts/{file}",
        "/",
    ] {
        assert!(spec["paths"].get(path).is_some(), "OpenAPI lacks {path}");
    }

    // Snapshots.
    let (status, body) = get("/snapshots/latest");
    assert_eq!(status, 200);
    let latest = json(&body);
    let version = latest["version"].as_u64().unwrap();
    let k = latest["kmeans"]["k"].as_u64().unwrap();
    let (status, body) = get("/snapshots");
    assert_eq!(status, 200);
    let versions: Vec<u64> = json(&body)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["version"].as_u64().unwrap())
        .collect();
    assert!(versions.contains(&version), "{versions:?}");
    let (status, body) = get(&format!("/snapshots/{}", versions[0]));
    assert_eq!(
        (status, json(&body)["version"].as_u64()),
        (200, Some(versions[0]))
    );
    assert_eq!(get("/snapshots/99999999").0, 404);
    for bad in ["abc", "-1", "1.5", "99999999999999999999999", "%20"] {
        let (status, body) = get(&format!("/snapshots/{bad}"));
        assert_eq!(status, 400, "version {bad}: {body}");
        assert_eq!(json(&body)["status"], 400);
    }

    // Assignments, streamed: one line (NDJSON) or row (CSV) per assigned user, as stored.
    let (status, body) = get(&format!("/snapshots/{version}/assignments"));
    assert_eq!(status, 200, "{body}");
    let lines: Vec<Value> = body.lines().map(json).collect();
    assert_eq!(
        lines.len() as u64,
        latest["counts"]["users"].as_u64().unwrap(),
        "every assigned user once"
    );
    let cluster_of = |user: &str| {
        lines
            .iter()
            .find(|l| l["user"] == user)
            .map(|l| l["cluster"].clone())
    };
    let (status, csv) = get(&format!("/snapshots/{version}/assignments?format=csv"));
    assert_eq!(status, 200);
    let mut rows = csv.lines();
    assert_eq!(rows.next(), Some("user,cluster"));
    let rows: Vec<(String, u64)> = rows
        .map(|r| {
            let (user, cluster) = r.rsplit_once(',').unwrap();
            (user.to_string(), cluster.parse().unwrap())
        })
        .collect();
    assert_eq!(rows.len(), lines.len());
    assert!(
        rows.iter()
            .zip(&lines)
            .all(|((u, c), l)| l["user"] == u.as_str() && l["cluster"] == *c)
    );
    assert_eq!(get("/snapshots/latest/assignments?format=xml").0, 400);
    assert_eq!(get("/snapshots/99999999/assignments").0, 404);
    assert_eq!(get("/snapshots/abc/assignments").0, 400);

    // Clusters.
    let (status, body) = get("/clusters/0");
    assert_eq!(status, 200);
    let cluster = json(&body);
    assert!(cluster["top_items"].as_array().unwrap().len() <= 10);
    let (_, body) = get("/clusters/0?limit=3");
    assert_eq!(json(&body)["top_items"].as_array().unwrap().len(), 3);
    let (_, body) = get("/clusters/0?limit=40");
    assert!(
        json(&body)["top_items"].as_array().unwrap().len() > 10,
        "more top items on request"
    );
    assert_eq!(get(&format!("/clusters/{k}")).0, 404);
    // Members, page by page: together exactly the users that snapshot's assignments put in
    // cluster 0, in id order, each once.
    let mut members: Vec<String> = vec![];
    let mut cursor: Option<String> = None;
    let mut listed_version = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("/clusters/0/members?limit=7&cursor={c}"),
            None => "/clusters/0/members?limit=7".to_string(),
        };
        let (status, body) = get(&query);
        assert_eq!(status, 200, "{body}");
        let page = json(&body);
        let v = page["snapshot_version"].as_u64().unwrap();
        assert_eq!(*listed_version.get_or_insert(v), v, "pages of one snapshot");
        let ids = page["members"].as_array().unwrap();
        assert!(ids.len() <= 7);
        members.extend(ids.iter().map(|m| m.as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    let (_, body) = get(&format!(
        "/snapshots/{}/assignments",
        listed_version.unwrap()
    ));
    let mut expected: Vec<String> = body
        .lines()
        .map(json)
        .filter(|l| l["cluster"] == 0)
        .map(|l| l["user"].as_str().unwrap().to_string())
        .collect();
    expected.sort();
    assert!(!expected.is_empty());
    assert_eq!(members, expected);
    assert_eq!(get(&format!("/clusters/{k}/members")).0, 404);
    assert_eq!(get("/clusters/0/members?limit=0").0, 400);
    assert_eq!(get("/clusters/x/members").0, 400);
    for bad in [
        "/clusters/x",
        "/clusters/0?limit=0",
        "/clusters/0?limit=abc",
        "/clusters/0?limit=100000",
    ] {
        assert_eq!(get(bad).0, 400, "{bad}");
    }

    // Users: known users get their nearest segment; unknown ones 404; absurd ids 400.
    let (status, body) = get("/users/u5");
    assert_eq!(status, 200, "{body}");
    let user = json(&body);
    assert_eq!(user["snapshot_version"].as_u64(), Some(version));
    assert!(user["cluster"].as_u64().unwrap() < k);
    let (d, next) = (
        user["distance"].as_f64().unwrap(),
        user["next_distance"].as_f64().unwrap(),
    );
    assert!(
        d <= next,
        "a user sits in its nearest segment: {d} vs {next}"
    );
    let pulling = user["pulling_items"].as_array().unwrap();
    assert!(!pulling.is_empty() && pulling.len() <= 10);
    assert!(
        pulling
            .windows(2)
            .all(|w| w[0]["pull"].as_f64() >= w[1]["pull"].as_f64())
    );
    assert_eq!(get("/users/no-such-user").0, 404);
    assert_eq!(get(&format!("/users/{}", "x".repeat(300))).0, 400);
    assert_eq!(get("/users/u5?items=0").0, 400);

    // A user's history: each retained snapshot once, oldest first, with the cluster that
    // snapshot gave the user (the one `/users/u5` reported for `version`).
    let (status, body) = get("/users/u5/history");
    assert_eq!(status, 200, "{body}");
    let history = json(&body);
    assert_eq!(history["user"], "u5");
    let entries = history["history"].as_array().unwrap();
    let listed: Vec<u64> = entries
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert!(!listed.is_empty(), "{body}");
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "{listed:?}");
    let at_version = entries
        .iter()
        .find(|e| e["version"].as_u64() == Some(version))
        .unwrap_or_else(|| panic!("no entry for snapshot {version}: {body}"));
    assert_eq!(at_version["cluster"], user["cluster"], "{body}");
    assert_eq!(cluster_of("u5"), Some(user["cluster"].clone()));
    assert!(
        entries
            .iter()
            .all(|e| !e["created_at"].as_str().unwrap().is_empty())
    );
    assert_eq!(get("/users/no-such-user/history").0, 404);
    assert_eq!(get(&format!("/users/{}/history", "x".repeat(300))).0, 400);
    assert_eq!(get("/no/such/route").0, 404);
    let post = ureq::post(&format!("{base}/snapshots/latest"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call();
    assert!(
        matches!(post, Err(ureq::Error::Status(405, _))),
        "read-only API"
    );

    // `segmenter snapshot` against the running service.
    let out =
        succeed(Command::new(BIN).args(["snapshot", "latest", "--url", &base, "--token", TOKEN]));
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    // The service may have taken a newer snapshot since `version` was read.
    let reported: u64 = report
        .split("snapshot v")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no snapshot version in the report: {report}"));
    assert!(reported >= version, "{report}");
    assert!(report.lines().any(|l| l.starts_with("0 (")), "{report}");
    let out = succeed(Command::new(BIN).args([
        "snapshot", "history", "u5", "--json", "--url", &base, "--token", TOKEN,
    ]));
    let over_http: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(over_http["user"], "u5");
    assert!(!over_http["history"].as_array().unwrap().is_empty());

    service.signal("-INT");
    let (code, log) = service.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", log.join("\n"));

    // ... and read-only from the state dir once the service is gone.
    let out = succeed(
        Command::new(BIN)
            .args(["snapshot", "latest", "--state-dir"])
            .arg(&state),
    );
    let from_dir = String::from_utf8_lossy(&out.stdout);
    assert!(from_dir.lines().any(|l| l.starts_with("0 (")), "{from_dir}");
    let out = Command::new(BIN)
        .args(["snapshot", "list", "--json", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list.as_array().unwrap().len() >= 2);
    // The history read from the state dir is the one the service served.
    let out = succeed(
        Command::new(BIN)
            .args(["snapshot", "history", "u5", "--json", "--state-dir"])
            .arg(&state),
    );
    let from_dir: Value = serde_json::from_slice(&out.stdout).unwrap();
    let served = over_http["history"].as_array().unwrap();
    let stored = from_dir["history"].as_array().unwrap();
    // Every snapshot, the one taken at shutdown too.
    assert!(stored.len() >= 2, "{from_dir}");
    let common: Vec<&Value> = served
        .iter()
        .filter(|e| stored.iter().any(|s| s["version"] == e["version"]))
        .collect();
    assert!(!common.is_empty(), "{from_dir} vs {over_http}");
    for entry in common {
        assert!(stored.contains(entry), "{entry} not in {from_dir}");
    }
    let out = Command::new(BIN)
        .args(["snapshot", "history", "no-such-user", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user `no-such-user`"));
    let out = Command::new(BIN)
        .args(["snapshot", "show", "99999", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot 99999"));
}

#[test]
fn every_client_error_is_the_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    let (service, base) = start_demo(
        &dir.path().join("state"),
        &[],
        &["--max-events", "20000", "--keep-serving"],
    );
    for path in [
        "/users/%FF",
        "/snapshots/%FF",
        "/clusters/0?limit=1&limit=2",
        "/clusters/0?limit=many",
    ] {
        let response = match ureq::get(&format!("{base}{path}")).call() {
            Err(ureq::Error::Status(_, r)) => r,
            Ok(r) => panic!("{path} answered {} instead of an error", r.status()),
            Err(e) => panic!("GET {path}: {e}"),
        };
        let status = response.status();
        assert!((400..500).contains(&status), "{path}: {status}");
        assert_eq!(
            response.header("content-type"),
            Some("application/json"),
            "{path}"
        );
        let body: serde_json::Value =
            serde_json::from_str(&response.into_string().unwrap()).expect("a JSON body");
        assert_eq!(body["status"], status, "{path}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}"
        );
    }
    drop(service);
}

/// Resident memory of a process in MiB, from /proc.
fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .expect("VmRSS")
}

#[test]
fn four_hundred_concurrent_chart_requests_keep_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let (mut service, base) = start_demo(
        &dir.path().join("state"),
        &[
            ("SEGMENTER_SNAPSHOT__INTERVAL_MS", "100"),
            ("SEGMENTER_SNAPSHOT__MAX_STALENESS_MS", "100"),
        ],
        &[],
    );
    // Charts read up to 20 stored snapshots each: have that many.
    service.wait_for(Duration::from_secs(120), |v| {
        v["fields"]["message"] == "snapshot built" && v["fields"]["version"].as_u64() >= Some(20)
    });
    let pid = service.child.id();
    let before = rss_mib(pid);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..400)
            .map(|i| {
                let url = format!(
                    "{base}/charts/{}.svg",
                    ["cluster_sizes", "drift", "explained_variance"][i % 3]
                );
                scope.spawn(move || match ureq::get(&url).call() {
                    Ok(r) => r.status(),
                    Err(ureq::Error::Status(code, _)) => code,
                    Err(e) => panic!("GET {url}: {e}"),
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let after = rss_mib(pid);
    eprintln!("RSS before {before} MiB, after {after} MiB");
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 503),
        "every request answered (200, or 503 when it waited too long): {statuses:?}"
    );
    assert!(statuses.iter().filter(|&&s| s == 200).count() >= 100);
    assert!(
        after <= before + 150,
        "RSS grew from {before} MiB to {after} MiB under 400 concurrent chart requests"
    );
}
