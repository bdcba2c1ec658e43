#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): formatting, lints, then every unit
# and end-to-end test in release mode. It starts by itself every real component the tests
# need: a single-node Apache Kafka broker (KRaft, jars from Maven Central via scripts/kafka.sh),
# stopped again on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

export KAFKA_PORT="${SEGMENTER_TEST_KAFKA_PORT:-39092}"
export SEGMENTER_TEST_KAFKA_PORT="$KAFKA_PORT"
export SEGMENTER_TEST_BROKERS="127.0.0.1:$KAFKA_PORT"

cargo fmt --all -- --check
cargo clippy --all-targets --release -- -D warnings
# Build everything before the broker starts, so its start-up timeout never races a compile.
cargo test --release --no-run

scripts/kafka.sh start
trap 'scripts/kafka.sh stop >/dev/null 2>&1 || true' EXIT

cargo test --release
