#!/usr/bin/env bash
# scripts/group-bench.sh - 1, 2 and 3 instances in one consumer group on one machine: events/s,
# and what one model of the whole group costs. A ratings file (default: the realistic-large bench
# set, 5M ratings) is produced once to a 6-partition topic. For each instance count N and
# repeat, in a consumer group of its own (with the changelog and the group model on):
#   1. N instances consume the whole topic: events/s (timed from the first start until the
#      group's committed offsets cover every message);
#   2. the instance owning partition 0 builds the group model: the first one covering every
#      message is read from /group, with its build time and rounds (from the coordinator's
#      cut to the last round, as the model reports it).
# Whole-process figures; peak RSS from /proc (VmHWM) at the end of each run.
#
# Usage: BROKERS=127.0.0.1:9092 scripts/group-bench.sh [BIN]
# Environment: RATINGS (target/bench-data/realistic-large/ratings.csv), REPEATS (3),
#   COUNTS ("1 2 3"), PORT (9683: instance i uses PORT+i), INTERVAL_MS (2000).
set -euo pipefail
cd "$(dirname "$0")/.."

counts=${COUNTS:-1 2 3}
port=${PORT:-9683}
interval=${INTERVAL_MS:-2000}
source scripts/lib-instances.sh group "$@"

# A top-level field of the group model (it carries the group's snapshot, whose fields share
# some names).
group_field() { curl -s "127.0.0.1:$1/group" | jq -r ".$2 // 0" 2>/dev/null || echo 0; }

printf 'instances\trun\tconsume s\tevents/s\tgroup model s\trounds\tusers\tRSS MB (each)\n'
for r in $(seq 1 "$repeats"); do
  for n in $counts; do
    group="$topic-$n-$r"
    t0=$(now)
    for i in $(seq 1 "$n"); do
      SEGMENTER_KAFKA__BROKERS=$brokers SEGMENTER_KAFKA__TOPIC=$topic SEGMENTER_KAFKA__GROUP_ID=$group \
        SEGMENTER_KAFKA__INSTANCE_ID="$group-$i" SEGMENTER_KAFKA__CHANGELOG_TOPIC="$group-changelog" \
        SEGMENTER_KAFKA__GROUP_MODEL_INTERVAL_MS=$interval \
        SEGMENTER_KAFKA__DEAD_LETTER_TOPIC="$topic-dlq" SEGMENTER_STATE__DIR="$work/$group-$i" \
        SEGMENTER_HTTP__LISTEN="127.0.0.1:$((port + i))" RUST_LOG=segmenter=info \
        "$bin" run >"$work/$group-$i.log" 2>&1 &
      pids+=("$!")
    done
    deadline=$((SECONDS + 900))
    while :; do
      sum=0
      for i in $(seq 1 "$n"); do sum=$((sum + $(applied "$((port + i))"))); done
      [ "$sum" -lt "$total" ] || break
      [ $SECONDS -lt $deadline ] || { echo "the group did not consume $total events" >&2; exit 1; }
      sleep 0.05
    done
    consumed=$(echo "$(now) - $t0" | bc)
    # The first model covering every message, as any instance serves it.
    while :; do
      covered=$(group_field "$((port + 1))" messages_covered)
      [ "${covered:-0}" -lt "$total" ] || break
      [ $SECONDS -lt $deadline ] || { echo "no group model covering $total messages" >&2; exit 1; }
      sleep 0.1
    done
    body=$(curl -s "127.0.0.1:$((port + 1))/group")
    seconds=$(echo "$body" | jq -r .seconds)
    users=$(echo "$body" | jq -r .users)
    rounds=$(echo "$body" | jq -c .rounds | tr -d '"{}')
    rss=""
    for p in "${pids[@]}"; do rss="$rss$(hwm_mb "$p") "; done
    printf '%d\t%d\t%.1f\t%.0f\t%.2f\t%s\t%s\t%s\n' "$n" "$r" "$consumed" \
      "$(echo "$total / $consumed" | bc -l)" "$seconds" "$rounds" "$users" "$rss"
    stop_all
  done
done
