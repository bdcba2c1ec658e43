#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): formatting, lints, then every unit
# and end-to-end test in release mode. It installs and starts by itself every real component
# the tests need:
#   - a single-node Apache Kafka broker (KRaft; jars from Maven Central via scripts/kafka.sh)
#     and a 3-node cluster (every topic replicated 3 times) for the broker-failure test, both
#     stopped again on exit;
#   - Debian's prometheus (server and promtool) and chromium, with apt-get when missing;
#   - Python tools from PyPI (schemathesis, kubernetes-validate) in target/test-venv.
set -euo pipefail
cd "$(dirname "$0")/.."

export KAFKA_PORT="${SEGMENTER_TEST_KAFKA_PORT:-19092}"
export SEGMENTER_TEST_KAFKA_PORT="$KAFKA_PORT"
export SEGMENTER_TEST_BROKERS="127.0.0.1:$KAFKA_PORT"
cluster_port="${SEGMENTER_TEST_CLUSTER_PORT:-19192}"
export SEGMENTER_TEST_CLUSTER_PORT="$cluster_port"
export SEGMENTER_TEST_CLUSTER_BROKERS="127.0.0.1:$cluster_port,127.0.0.1:$((cluster_port + 2)),127.0.0.1:$((cluster_port + 4))"

# Debian packages the tests drive for real.
missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]} from Debian" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python tools, pinned, in a venv of the project's own.
venv=target/test-venv
if [ ! -x "$venv/bin/st" ] || ! cmp -s scripts/requirements-test.txt "$venv/requirements-test.txt"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r scripts/requirements-test.txt
  cp scripts/requirements-test.txt "$venv/requirements-test.txt"
fi
export SEGMENTER_TEST_SCHEMATHESIS="$PWD/$venv/bin/st"
export SEGMENTER_TEST_PYTHON="$PWD/$venv/bin/python"

cargo fmt --all -- --check
cargo clippy --all-targets --release -- -D warnings
# Build everything before the broker starts, so its start-up timeout never races a compile.
cargo test --release --no-run

stop_brokers() {
  scripts/kafka.sh stop >/dev/null 2>&1 || true
  KAFKA_NODES=3 KAFKA_PORT="$cluster_port" scripts/kafka.sh stop >/dev/null 2>&1 || true
}
trap stop_brokers EXIT
scripts/kafka.sh start
KAFKA_NODES=3 KAFKA_PORT="$cluster_port" KAFKA_HEAP_OPTS="-Xms64m -Xmx384m" scripts/kafka.sh start

cargo test --release
