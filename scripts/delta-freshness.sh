#!/usr/bin/env bash
# scripts/delta-freshness.sh - how fresh the service's snapshot is after a small delta, and what
# that snapshot costs: a ratings file (default: the realistic-large bench set, 5M ratings) is
# produced to Kafka minus its last DELTAS x 1% of events; once a snapshot covers that base, each
# 1% delta is produced in turn and timed from the end of its produce to a served snapshot that
# covers it (polling /snapshots/latest), with that snapshot's build time (the build histogram's
# last observation). Then a steady stream: STEADY_RATE events/s for STEADY_SECONDS (re-ratings
# of the file's first events, each moved by one star), the served snapshot's staleness (the age of the oldest
# applied event it does not cover, segmenter_snapshot_staleness_seconds) sampled every 50 ms.
# Last, in the same run on the same file, the sparse scikit-learn pipeline recomputes everything
# (scripts/bench_sklearn.py, SK_REPEATS times) and each delta build is reported as a share of it.
# Default staleness bound and floor (1 s each) unless set.
#
# Usage: BROKERS=127.0.0.1:9092 scripts/delta-freshness.sh [BIN]
# Environment: RATINGS (target/bench-data/realistic-large/ratings.csv), DELTAS (5), PORT (9483),
#   STEADY_RATE (50000), STEADY_SECONDS (20; 0 skips), SK_REPEATS (3; 0 skips),
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

metric() { curl -s "127.0.0.1:$port/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
# The served snapshot's events, from the metrics (a few kB): fetching and parsing the whole
# snapshot every 20 ms would take a core from the service it measures.
latest() { local n; n=$(metric segmenter_snapshot_events_applied); echo "${n:-0}"; }
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
builds=()
served_after=()
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
  builds+=("$build")
  served_after+=("$(echo "$served - $produced" | bc)")
done
served_sorted=$(printf '%s\n' "${served_after[@]}" | sort -g)
printf 'served after produce: median %.2f s, worst %.2f s over %d deltas\n' \
  "$(echo "$served_sorted" | sed -n "$(((${#served_after[@]} + 1) / 2))p")" "$(echo "$served_sorted" | tail -n 1)" "${#served_after[@]}"

steady_rate=${STEADY_RATE:-50000}
steady_seconds=${STEADY_SECONDS:-20}
if [ "$steady_seconds" -gt 0 ]; then
  steady=$((steady_rate * steady_seconds))
  # Re-ratings of the file's first events, each moved by one star: every event changes a cell.
  head -n $((steady + 1)) "$ratings" |
    awk -F, -v OFS=, 'NR == 1 { print; next } { $3 = ($3 % 5) + 1; print }' >"$work/steady.csv"
  read -r sum0 count0 < <(build_stats)
  "$bin" produce --brokers "$brokers" --topic "$topic" --partitions 2 --rate "$steady_rate" \
    --ratings "$work/steady.csv" >/dev/null 2>&1 &
  producer=$!
  max_stale=0
  samples=0
  while kill -0 "$producer" 2>/dev/null; do
    stale=$(metric segmenter_snapshot_staleness_seconds)
    max_stale=$(echo "if (${stale:-0} > $max_stale) ${stale:-0} else $max_stale" | bc -l)
    samples=$((samples + 1))
    sleep 0.05
  done
  wait "$producer"
  read -r sum1 count1 < <(build_stats)
  printf 'steady: %d events at %d/s: served snapshot at most %.2f s stale (%d samples), %d builds of %.3f s mean\n' \
    "$steady" "$steady_rate" "$max_stale" "$samples" "$((${count1%.*} - ${count0%.*}))" \
    "$(echo "($sum1 - $sum0) / (($count1 - $count0) + ($count1 == $count0))" | bc -l)"
fi

sk_repeats=${SK_REPEATS:-3}
if [ "$sk_repeats" -gt 0 ]; then
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; pid=
  source scripts/bench-venv.sh
  times=()
  for r in $(seq 1 "$sk_repeats"); do
    /usr/bin/time -f '%e' -o "$work/sk.time" "$py" scripts/bench_sklearn.py \
      --ratings "$ratings" --components 10 --clusters 25 --json >/dev/null 2>"$work/sk.err" ||
      { tail -n 5 "$work/sk.err" >&2; exit 1; }
    times+=("$(tail -n 1 "$work/sk.time")")
  done
  sk_min=$(printf '%s\n' "${times[@]}" | sort -g | head -n 1)
  sk_median=$(printf '%s\n' "${times[@]}" | sort -g | sed -n "$(((sk_repeats + 1) / 2))p")
  build_sorted=$(printf '%s\n' "${builds[@]}" | sort -g)
  build_median=$(echo "$build_sorted" | sed -n "$(((${#builds[@]} + 1) / 2))p")
  build_worst=$(echo "$build_sorted" | tail -n 1)
  printf 'scikit-learn recompute of all %d events (whole process, %d runs): min %.2f s, median %.2f s\n' \
    "$total" "$sk_repeats" "$sk_min" "$sk_median"
  printf 'delta build: median %.3f s = %.3fx the scikit-learn min, worst %.3f s = %.3fx\n' \
    "$build_median" "$(echo "$build_median / $sk_min" | bc -l)" "$build_worst" "$(echo "$build_worst / $sk_min" | bc -l)"
fi
[ "${LOG:-}" = "" ] || grep -E "timing|snapshot built|challenged|diagnosed" "$work/log" | sed 's/\x1b\[[0-9;]*m//g' | tail -n "${LOG_LINES:-40}"
