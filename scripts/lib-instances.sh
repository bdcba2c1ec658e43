# scripts/lib-instances.sh - shared by the benchmarks that run several `segmenter run` instances
# (rescale-bench.sh, group-bench.sh, failover-bench.sh), sourced as
# `source scripts/lib-instances.sh PREFIX "$@"`. Reads the settings they share (the binary as the
# script's first argument, BROKERS, RATINGS, REPEATS), makes a work dir, stops every started
# instance on exit, produces the ratings file once to a fresh 6-partition topic, and reads an
# instance's figures by its HTTP port.
# Sets: bin, brokers, ratings, repeats, work, pids, total, topic (prefix PREFIX).

bin=${2:-target/release/segmenter}
brokers=${BROKERS:-127.0.0.1:9092}
ratings=${RATINGS:-target/bench-data/realistic-large/ratings.csv}
repeats=${REPEATS:-3}

[ -s "$ratings" ] || { echo "no $ratings: run scripts/bench-vs-sklearn.sh realistic-large once" >&2; exit 1; }
work=$(mktemp -d)
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT

total=$(($(wc -l <"$ratings") - 1))
topic="$1-$$-$(date +%s)"
"$bin" produce --brokers "$brokers" --topic "$topic" --partitions 6 --ratings "$ratings" >/dev/null 2>&1
echo "produced $total events to $topic (6 partitions)"

metric() { curl -s "127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
applied() { local n; n=$(metric "$1" segmenter_events_applied_total); echo "${n:-0}"; }
now() { date +%s.%N; }
hwm_mb() { awk '/VmHWM/{printf "%.0f", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
