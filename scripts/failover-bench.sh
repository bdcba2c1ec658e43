#!/usr/bin/env bash
# scripts/failover-bench.sh - one of two instances dies: how long its partitions take to be
# taken over by the survivor, with standby copies ([kafka] standby) and without. A ratings file
# (default: the realistic-large bench set, 5M ratings) is produced once to a 6-partition topic.
# Then, for each mode and repeat, in a consumer group of its own with the changelog on:
#   1. instances A and B consume the whole topic (with "standby", each keeps copies of the
#      other's changelog partitions; A's copies are waited for until they stop growing);
#   2. B is SIGKILLed; once its session expires the group gives its partitions to A, which
#      takes them over: "changelog" reads their whole changelog, "standby" reads on from its
#      copies. The figure is A's take-over of all 6 partitions, as it logs it (fencing B, reading,
#      applying the rows), and A's peak RSS (what the copies cost).
# Whole-process figures.
#
# Usage: BROKERS=127.0.0.1:9092 scripts/failover-bench.sh [BIN]
# Environment: RATINGS (target/bench-data/realistic-large/ratings.csv), REPEATS (3),
#   MODES ("changelog standby"), PORT (9783: A and B use PORT and PORT+1).
set -euo pipefail
cd "$(dirname "$0")/.."

modes=${MODES:-changelog standby}
port=${PORT:-9783}
source scripts/lib-instances.sh failover "$@"

printf 'mode\trun\ttake-over s (6 partitions)\tusers restored\tstandby cells before the kill\tA peak RSS MB\n'
for r in $(seq 1 "$repeats"); do
  for mode in $modes; do
    group="$topic-$mode-$r"
    standby=false
    [ "$mode" = standby ] && standby=true
    for i in 0 1; do
      # `env`: a librdkafka property's name has dots, which a shell assignment cannot.
      env SEGMENTER_KAFKA__BROKERS="$brokers" SEGMENTER_KAFKA__TOPIC="$topic" SEGMENTER_KAFKA__GROUP_ID="$group" \
        SEGMENTER_KAFKA__INSTANCE_ID="$group-$i" SEGMENTER_KAFKA__CHANGELOG_TOPIC="$group-changelog" \
        SEGMENTER_KAFKA__STANDBY=$standby "SEGMENTER_KAFKA__CLIENT__SESSION.TIMEOUT.MS=6000" \
        SEGMENTER_KAFKA__DEAD_LETTER_TOPIC="$topic-dlq" SEGMENTER_STATE__DIR="$work/$group-$i" \
        SEGMENTER_HTTP__LISTEN="127.0.0.1:$((port + i))" SEGMENTER_LOG__FORMAT=json RUST_LOG=segmenter=info \
        "$bin" run >"$work/$group-$i.log" 2>&1 &
      pids+=("$!")
    done
    deadline=$((SECONDS + 900))
    while :; do
      sum=$(( $(applied "$port") + $(applied "$((port + 1))") ))
      [ "$sum" -lt "$total" ] || break
      [ $SECONDS -lt $deadline ] || { echo "not consumed within 900 s" >&2; exit 1; }
      sleep 0.2
    done
    cells=0
    if [ "$mode" = standby ]; then
      # The copies follow the changelog: wait until A's stop growing.
      last=-1
      while :; do
        cells=$(metric "$port" segmenter_changelog_standby_cells); cells=${cells:-0}
        [ "$cells" != "$last" ] || break
        [ $SECONDS -lt $deadline ] || { echo "standby copies still growing" >&2; exit 1; }
        last=$cells
        sleep 2
      done
    fi
    # A took all 6 over once at its start, before B joined: the figure is the next time.
    takeovers() { grep '"partitions taken over: consuming"' "$work/$group-0.log" | grep -c '{0, 1, 2, 3, 4, 5}' || true; }
    before=$(takeovers)
    restored_before=$(grep -c '"partition restored from the changelog"' "$work/$group-0.log" || true)
    kill -9 "${pids[1]}"
    wait "${pids[1]}" 2>/dev/null || true
    while [ "$(takeovers)" -le "$before" ]; do
      [ $SECONDS -lt $deadline ] || { echo "A took nothing over" >&2; exit 1; }
      sleep 0.2
    done
    line=$(grep '"partitions taken over: consuming"' "$work/$group-0.log" | grep '{0, 1, 2, 3, 4, 5}' | tail -1)
    seconds=$(echo "$line" | jq -r .fields.seconds)
    users=$(grep '"partition restored from the changelog"' "$work/$group-0.log" | tail -n +"$((restored_before + 1))" | jq -s 'map(.fields.users) | add // 0')
    printf '%s\t%d\t%.2f\t%s\t%s\t%s\n' "$mode" "$r" "$seconds" "$users" "$cells" "$(hwm_mb "${pids[0]}")"
    stop_all
  done
done
