#!/usr/bin/env bash
# scripts/fault-feed-disk.sh - what a change feed that cannot publish costs on disk: a changes
# topic that refuses every record (max.message.bytes=100), a snapshot a second, events trickling
# in for DURATION seconds; prints the stored snapshot count, the state dir's size and /readyz
# every 15 s.
#
# Usage: scripts/fault-feed-disk.sh [BIN]   (BIN: a segmenter binary, default the release build)
# Environment: BROKERS (default 127.0.0.1:9092, e.g. a broker from scripts/kafka.sh start),
#   DURATION seconds (default 120), USERS (default 1000), RETENTION (default 10), PORT (9477).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-target/release/segmenter}
brokers=${BROKERS:-127.0.0.1:9092}
duration=${DURATION:-120}
users=${USERS:-1000}
retention=${RETENTION:-10}
port=${PORT:-9477}
work=$(mktemp -d)
pid=
trap '[ -z "$pid" ] || { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }; rm -rf "$work"' EXIT

topic="fault-feed-$$-$(date +%s)"
"$bin" generate --users "$users" --items 500 --events $((users * 60)) --segments 8 --seed 7 \
  --out "$work/ratings.csv" >/dev/null
# One part a second.
tail -n +2 "$work/ratings.csv" >"$work/rows.csv"
split -n "l/$duration" -d -a 4 "$work/rows.csv" "$work/part-"
scripts/kafka.sh tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$brokers" \
  --create --topic "$topic-changes" --partitions 1 --config max.message.bytes=100 >/dev/null

SEGMENTER_KAFKA__BROKERS=$brokers SEGMENTER_KAFKA__TOPIC=$topic \
  SEGMENTER_KAFKA__GROUP_ID="$topic" SEGMENTER_KAFKA__INSTANCE_ID=one \
  SEGMENTER_KAFKA__DEAD_LETTER_TOPIC="$topic-dlq" \
  SEGMENTER_KAFKA__CHANGES_TOPIC="$topic-changes" \
  SEGMENTER_KAFKA__ASSIGNMENTS_TOPIC="$topic-assignments" \
  SEGMENTER_SNAPSHOT__INTERVAL_MS=1000 SEGMENTER_SNAPSHOT__RETENTION="$retention" \
  SEGMENTER_STATE__DIR="$work/state" SEGMENTER_HTTP__LISTEN="127.0.0.1:$port" \
  RUST_LOG=segmenter=warn "$bin" run >"$work/log" 2>&1 &
pid=$!

printf 'seconds\tsnapshots_stored\tlatest_version\tstate_dir_bytes\treadyz\tunpublished_gauge\n'
start=$(date +%s)
n=0
for part in "$work"/part-*; do
  { head -n 1 "$work/ratings.csv"; cat "$part"; } >"$work/one.csv"
  "$bin" produce --brokers "$brokers" --topic "$topic" --partitions 2 --ratings "$work/one.csv" >/dev/null 2>&1
  n=$((n + 1))
  if ((n % 15 == 0)); then
    listing=$(curl -s "127.0.0.1:$port/snapshots" || true)
    count=$(grep -o '"version"' <<<"$listing" | wc -l)
    latest=$(grep -o '"version":[0-9]*' <<<"$listing" | cut -d: -f2 | sort -n | tail -1)
    ready=$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$port/readyz" || true)
    gauge=$(curl -s "127.0.0.1:$port/metrics" | awk '$1=="segmenter_feed_unpublished_versions"{print $2}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$(($(date +%s) - start))" "$count" "${latest:-0}" \
      "$(du -sb "$work/state" | cut -f1)" "$ready" "${gauge:-absent}"
  fi
  sleep 1
done
