#!/usr/bin/env bash
# scripts/delta-freshness.sh - how fresh the service's snapshot is after a small delta, and what
# that snapshot costs: a ratings file (default: the realistic-large bench set, 5M ratings) is
# produced to Kafka minus its last DELTAS x 1% of events; once a snapshot covers that base, each
# 1% delta is produced in turn and timed from the end of its produce to a served snapshot that
# covers it (polling /snapshots/latest), with that snapshot's build time (the build histogram's
# last observation). Default staleness bound and floor (1 s each) unless set.
#
# Usage: BROKERS=127.0.0.1:9092 scripts/delta-freshness.sh [BIN]
# Environment: RATINGS (target/bench-data/realistic-large/ratings.csv), DELTAS (5), PORT (9483),
#   LOG (segmenter=warn; segmenter=debug prints each snapshot's timings at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-target/release/segmenter}
brokers=${BROKERS:-127.0.0.1:9092}
ratings=${RATINGS:-target/bench-data/realistic-large/ratings.csv}
deltas=${DELTAS:-5}
port=${PORT:-9483}
[ -s "$ratings" ] || { echo "no $ratings: run scripts/bench-vs-sklearn.sh realistic-large once" >&2; exit 1; }
work=$(mktemp -d)
pid=
trap '[ -z "$pid" ] || { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }; rm -rf "$work"' EXIT

header=$(head -n 1 "$ratings")
total=$(($(wc -l <"$ratings") - 1))
delta=$((total / 100))
base=$((total - deltas * delta))
sed -n "1,$((base + 1))p" "$ratings" >"$work/base.csv"
for i in $(seq 1 "$deltas"); do
  from=$((base + (i - 1) * delta + 2))
  { echo "$header"; sed -n "${from},$((from + delta - 1))p" "$ratings"; } >"$work/delta-$i.csv"
done
topic="delta-$$-$(date +%s)"

latest() { curl -s "127.0.0.1:$port/snapshots/latest" | python3 -c "import json,sys; s=json.load(sys.stdin); print(s['counts']['events_applied'])" 2>/dev/null || echo 0; }
build_stats() { curl -s "127.0.0.1:$port/metrics" | awk '/^segmenter_snapshot_build_duration_seconds_sum/{s=$2} /^segmenter_snapshot_build_duration_seconds_count/{c=$2} END{print s, c}'; }
wait_covered() {
  local deadline=$((SECONDS + 300))
  while [ "$(latest)" -lt "$1" ]; do
    [ $SECONDS -lt $deadline ] || { echo "no snapshot covering $1 events within 300 s" >&2; exit 1; }
    sleep 0.02
  done
}

"$bin" produce --brokers "$brokers" --topic "$topic" --partitions 2 --ratings "$work/base.csv" >/dev/null 2>&1
SEGMENTER_KAFKA__BROKERS=$brokers SEGMENTER_KAFKA__TOPIC=$topic SEGMENTER_KAFKA__GROUP_ID=$topic \
  SEGMENTER_KAFKA__DEAD_LETTER_TOPIC="$topic-dlq" SEGMENTER_STATE__DIR="$work/state" \
  SEGMENTER_HTTP__LISTEN="127.0.0.1:$port" RUST_LOG="${LOG:-segmenter=warn}" "$bin" run >"$work/log" 2>&1 &
pid=$!
started=$(date +%s.%N)
wait_covered "$base"
printf 'base: %d events consumed and served in %.1f s\n' "$base" "$(echo "$(date +%s.%N) - $started" | bc)"
printf 'delta\tevents\tserved_after_produce_s\tbuild_s\n'
done_events=$base
for i in $(seq 1 "$deltas"); do
  read -r sum0 count0 < <(build_stats)
  "$bin" produce --brokers "$brokers" --topic "$topic" --partitions 2 --ratings "$work/delta-$i.csv" >/dev/null 2>&1
  produced=$(date +%s.%N)
  done_events=$((done_events + delta))
  wait_covered "$done_events"
  served=$(date +%s.%N)
  read -r sum1 count1 < <(build_stats)
  build=$(echo "($sum1 - $sum0) / (($count1 - $count0) + ($count1 == $count0))" | bc -l)
  printf '%d\t%d\t%.2f\t%.3f (%d builds)\n' "$i" "$delta" "$(echo "$served - $produced" | bc)" "$build" "$((${count1%.*} - ${count0%.*}))"
done
[ "${LOG:-}" = "" ] || grep -E "timing|snapshot built" "$work/log" | sed 's/\x1b\[[0-9;]*m//g' | tail -n 40
