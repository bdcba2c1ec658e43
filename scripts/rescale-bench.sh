#!/usr/bin/env bash
# scripts/rescale-bench.sh - scaling out from 2 to 3 instances, with the changelog and without.
# A ratings file (default: the realistic-large bench set, 5M ratings) is produced once to a
# 6-partition topic. Then, for each mode and repeat, in a consumer group of its own:
#   1. instances A and B consume the whole topic: events/s of 2 instances (with the changelog,
#      what writing it costs);
#   2. instance C joins with an empty state dir, and the group gives it 2 of the 6 partitions.
#      Timed from C's start until it has caught up: "changelog" restores its partitions from the
#      changelog and consumes on from the recorded offsets; "rebuild" (no changelog, what
#      segmenter did before) consumes its partitions' whole history from the ratings topic.
#      Caught up = C ready, its lag 0, and its events applied no longer moving.
# Whole-process figures; peak RSS from /proc (VmHWM) at the end of each run.
#
# Usage: BROKERS=127.0.0.1:9092 scripts/rescale-bench.sh [BIN]
# Environment: RATINGS (target/bench-data/realistic-large/ratings.csv), REPEATS (3),
#   MODES ("changelog rebuild"), PORT (9583: A, B, C use PORT, PORT+1, PORT+2).
set -euo pipefail
cd "$(dirname "$0")/.."

modes=${MODES:-changelog rebuild}
port=${PORT:-9583}
source scripts/lib-instances.sh rescale "$@"

lag() { curl -s "127.0.0.1:$1/metrics" | awk '/^segmenter_consumer_lag_messages\{/{s+=$2; n++} END{print (n ? s : -1)}'; }
status() { curl -s "127.0.0.1:$1/readyz" | sed -n 's/.*"status":"\([a-z_]*\)".*/\1/p'; }

start() { # name port mode group -> pid
  local name=$1 p=$2 mode=$3 group=$4
  local changelog=""
  [ "$mode" = changelog ] && changelog="$group-changelog"
  SEGMENTER_KAFKA__BROKERS=$brokers SEGMENTER_KAFKA__TOPIC=$topic SEGMENTER_KAFKA__GROUP_ID=$group \
    SEGMENTER_KAFKA__INSTANCE_ID="$group-$name" SEGMENTER_KAFKA__CHANGELOG_TOPIC=$changelog \
    SEGMENTER_KAFKA__DEAD_LETTER_TOPIC="$topic-dlq" SEGMENTER_STATE__DIR="$work/$group-$name" \
    SEGMENTER_HTTP__LISTEN="127.0.0.1:$p" RUST_LOG=segmenter=info \
    "$bin" run >"$work/$group-$name.log" 2>&1 &
  echo $!
}

printf 'mode\trun\tA+B consume s\tA+B events/s\tC catch-up s\tC events applied\tRSS A/B/C MB\n'
for r in $(seq 1 "$repeats"); do
  for mode in $modes; do
    group="$topic-$mode-$r"
    t0=$(now)
    a=$(start a "$port" "$mode" "$group"); pids+=("$a")
    b=$(start b "$((port + 1))" "$mode" "$group"); pids+=("$b")
    deadline=$((SECONDS + 900))
    until [ "$(($(applied "$port") + $(applied "$((port + 1))")))" -ge "$total" ]; do
      [ $SECONDS -lt $deadline ] || { echo "A+B did not consume $total events" >&2; tail "$work/$group-a.log" >&2; exit 1; }
      sleep 0.05
    done
    consumed=$(echo "$(now) - $t0" | bc)
    t1=$(now)
    c=$(start c "$((port + 2))" "$mode" "$group"); pids+=("$c")
    last=-1 last_change=$t1 serving_at=""
    deadline=$((SECONDS + 900))
    while :; do
      [ $SECONDS -lt $deadline ] || { echo "C did not catch up" >&2; tail "$work/$group-c.log" >&2; exit 1; }
      t=$(now)
      n=$(applied "$((port + 2))")
      [ "$n" = "$last" ] || { last=$n; last_change=$t; }
      [ -n "$serving_at" ] || { [ "$(status "$((port + 2))")" = serving ] && serving_at=$t; }
      if [ -n "$serving_at" ] && [ "$(lag "$((port + 2))")" = 0 ] &&
        [ "$(echo "$t - $last_change > 3" | bc)" = 1 ]; then
        break
      fi
      sleep 0.05
    done
    caught=$(echo "if ($serving_at > $last_change) $serving_at - $t1 else $last_change - $t1" | bc)
    rss="$(hwm_mb "$a")/$(hwm_mb "$b")/$(hwm_mb "$c")"
    printf '%s\t%d\t%.1f\t%.0f\t%.2f\t%d\t%s\n' "$mode" "$r" "$consumed" \
      "$(echo "$total / $consumed" | bc -l)" "$caught" "$last" "$rss"
    grep -h "partition restored from the changelog\|partitions taken over" "$work/$group-c.log" |
      sed 's/\x1b\[[0-9;]*m//g' | sed 's/^/    c: /' | tail -n 4 || true
    stop_all
  done
done
