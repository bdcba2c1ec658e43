#!/usr/bin/env bash
# Benchmark: does publishing the change feed stall consumption? One generated topic (default
# 1,000,000 users x 5,000 items x 10,000,000 events, so a snapshot's changes cover up to a
# million users) is consumed twice from a real local broker into fresh state dirs, in the same
# run: once without the feed, once with `[kafka] changes_topic` and `assignments_topic` set and
# a snapshot every SNAPSHOT_INTERVAL_MS. Prints both consumption rates, each publication (users
# changed, seconds), and the consumption rate inside and outside the publications' windows.
# REPEATS (default 2) pairs of runs, alternating, so neither side always comes first.
# Starts its own broker on BENCH_KAFKA_PORT (default 49092) unless BENCH_BROKERS is given.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS="${USERS:-1000000}"; ITEMS="${ITEMS:-5000}"; EVENTS="${EVENTS:-10000000}"
PARTITIONS="${PARTITIONS:-4}"
BENCH_NAME=bench-feed
# shellcheck source=scripts/bench-topic.sh
. scripts/bench-topic.sh

export SEGMENTER_KAFKA__BROKERS="$brokers" SEGMENTER_KAFKA__TOPIC="$topic"
export SEGMENTER_KAFKA__BATCH_SIZE="${BATCH_SIZE:-20000}"
export SEGMENTER_MODEL__REFRESH_EVERY_EVENTS="${REFRESH_EVERY:-1000000}"
export SEGMENTER_SNAPSHOT__INTERVAL_MS="${SNAPSHOT_INTERVAL_MS:-10000}"
export SEGMENTER_LOG__FORMAT=json RUST_LOG="segmenter=debug,librdkafka=warn"

consume() { # name, extra env...
  local name="$1"; shift
  env SEGMENTER_KAFKA__GROUP_ID="bench-$name-$topic" SEGMENTER_STATE__DIR="$work/state-$name" "$@" \
    "$bin" run --exit-at-events "$EVENTS" 2> "$work/$name.log" || { tail -20 "$work/$name.log"; exit 1; }
}
logs=()
for r in $(seq 1 "${REPEATS:-2}"); do
  pair=("plain$r" "feed$r"); [ $((r % 2)) -eq 0 ] && pair=("feed$r" "plain$r")
  for name in "${pair[@]}"; do
    case "$name" in
      plain*) consume "$name" ;;
      feed*) consume "$name" SEGMENTER_KAFKA__CHANGES_TOPIC="$topic-changes-$r" \
        SEGMENTER_KAFKA__ASSIGNMENTS_TOPIC="$topic-assignments-$r" \
        SEGMENTER_KAFKA__PUBLICATIONS_TOPIC="$topic-publications-$r" ;;
    esac
  done
  logs+=("$work/plain$r.log" "$work/feed$r.log")
done

python3 - "$EVENTS" "${logs[@]}" <<'PY'
import json, sys
from datetime import datetime

def load(path):
    return [json.loads(l) for l in open(path) if l.startswith("{")]

def ts(line):
    return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()

def first(lines, message):
    for l in lines:
        if l["fields"].get("message") == message:
            return ts(l)
    raise SystemExit(f"no '{message}' line in the service log")

def report(plain, feed):
    for name, path in (("without the feed", plain), ("with the feed", feed)):
        lines = load(path)
        start = first(lines, "partitions assigned at the offsets stored in the state dir")
        end = first(lines, "target reached: stopping")
        print(f"{name}: {events} events in {end - start:.1f} s = {events / (end - start):,.0f} events/s")
    lines = load(feed)
    windows = []
    for l in lines:
        f = l["fields"]
        if f.get("message") == "segment changes published":
            windows.append((ts(l) - f["seconds"], ts(l)))
            print(f"  published v{f['version']}: {f['changes']:,} users changed, {f['seconds']:.2f} s")
    commits = [(ts(l), l["fields"]["events_applied"]) for l in lines
               if l["fields"].get("message") == "batch committed"]
    inside = outside = 0.0
    inside_events = outside_events = 0
    for (t0, n0), (t1, n1) in zip(commits, commits[1:]):
        mid = (t0 + t1) / 2
        if any(a <= mid <= b for a, b in windows):
            inside += t1 - t0; inside_events += n1 - n0
        else:
            outside += t1 - t0; outside_events += n1 - n0
    if inside > 0 and outside > 0:
        print(f"  consumption during publications: {inside_events / inside:,.0f} events/s over {inside:.1f} s; "
              f"outside them: {outside_events / outside:,.0f} events/s over {outside:.1f} s")
    else:
        print("  no publication overlapped consumption (lower SNAPSHOT_INTERVAL_MS or raise EVENTS)")

events = int(sys.argv[1])
paths = sys.argv[2:]
for r in range(len(paths) // 2):
    print(f"pair {r + 1}:")
    report(paths[2 * r], paths[2 * r + 1])
PY
