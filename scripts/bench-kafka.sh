#!/usr/bin/env bash
# Benchmark: events/s from a real local Kafka broker into durable state (sled), for the
# generated 100,000 users x 5,000 items x 5,000,000 events set (override with USERS, ITEMS,
# EVENTS, PARTITIONS). Starts its own broker on BENCH_KAFKA_PORT (default 49092) unless
# BENCH_BROKERS is given. Prints the produce rate and the consume-to-durable-state rate.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS="${USERS:-100000}"; ITEMS="${ITEMS:-5000}"; EVENTS="${EVENTS:-5000000}"
PARTITIONS="${PARTITIONS:-4}"
BENCH_NAME=bench
# shellcheck source=scripts/bench-topic.sh
. scripts/bench-topic.sh

export SEGMENTER_KAFKA__BROKERS="$brokers" SEGMENTER_KAFKA__TOPIC="$topic"
export SEGMENTER_KAFKA__GROUP_ID="bench-$topic" SEGMENTER_STATE__DIR="$work/state"
export SEGMENTER_KAFKA__BATCH_SIZE="${BATCH_SIZE:-20000}"
export SEGMENTER_MODEL__REFRESH_EVERY_EVENTS="${REFRESH_EVERY:-1000000}"
export SEGMENTER_SNAPSHOT__INTERVAL_MS="${SNAPSHOT_INTERVAL_MS:-60000}"
export SEGMENTER_LOG__FORMAT=json RUST_LOG="${BENCH_LOG:-segmenter=info}"
"$bin" run --exit-at-events "$EVENTS" 2> "$work/run.log" || { tail -20 "$work/run.log"; exit 1; }
python3 - "$work/run.log" "$EVENTS" <<'PY'
import json, sys
from datetime import datetime
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def at(message):
    for l in lines:
        if l["fields"].get("message") == message:
            return datetime.fromisoformat(l["timestamp"].replace("Z", "+00:00"))
    raise SystemExit(f"no '{message}' line in the service log")
events = int(sys.argv[2])
start, end = at("partitions assigned at the offsets stored in the state dir"), at("target reached: stopping")
seconds = (end - start).total_seconds()
print(f"consume into durable state: {events} events in {seconds:.1f} s "
      f"(partition assignment to the commit of the last event) = {events / seconds:,.0f} events/s")
PY
