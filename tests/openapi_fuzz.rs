//! A schema-driven fuzz run (schemathesis, from PyPI, installed by the test command) against
//! the OpenAPI document of a running service: no request may get a 5xx, and responses must
//! match the documented schemas.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn schemathesis_finds_no_server_error() {
    let st = std::env::var("SEGMENTER_TEST_SCHEMATHESIS").expect(
        "SEGMENTER_TEST_SCHEMATHESIS is not set: run the suite with scripts/test.sh, which \
         installs schemathesis into target/test-venv",
    );
    let dir = tempfile::tempdir().unwrap();
    let token = "fuzz-token";
    // A slow endless stream: the service stays ready (consuming) for the whole run.
    let (service, base) = start_demo(
        &dir.path().join("state"),
        &[
            ("SEGMENTER_HTTP__TOKEN", token),
            ("SEGMENTER_DEMO__EVENTS_PER_SECOND", "3000"),
        ],
        &[],
    );
    let out = Command::new(&st)
        .args(["run", &format!("{base}/openapi.json")])
        .args(["--url", &base])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", "60", "--workers", "2", "--seed", "7"])
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .expect("run schemathesis");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis failed:\n{report}");
    service.signal("-INT");
    let (code, _) = service.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0));
}
