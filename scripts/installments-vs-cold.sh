#!/usr/bin/env bash
# scripts/installments-vs-cold.sh - the service's final snapshot after a stream in installments
# against a cold solve of the same data: a generated set (PROFILE, default realistic) is produced
# to Kafka in PARTS installments, each once the previous one is in a snapshot; then `segmenter
# replay` solves the whole file cold. Prints both inertias, their ratio, the smallest segments
# and each installment's snapshot build time and freshness (produce end to snapshot served).
#
# Usage: BROKERS=127.0.0.1:9092 scripts/installments-vs-cold.sh [BIN]
# Environment: PROFILE (realistic|planted), USERS (943), ITEMS (1682), EVENTS (100000),
#   SEGMENTS (12), PARTS (10), SEED (1), PORT (9479), INTERVAL_MS (500), STALENESS_MS (500).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-target/release/segmenter}
brokers=${BROKERS:-127.0.0.1:9092}
profile=${PROFILE:-realistic}
parts=${PARTS:-10}
port=${PORT:-9479}
work=$(mktemp -d)
pid=
trap '[ -z "$pid" ] || { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }; rm -rf "$work"' EXIT

"$bin" generate --profile "$profile" --users "${USERS:-943}" --items "${ITEMS:-1682}" \
  --events "${EVENTS:-100000}" --segments "${SEGMENTS:-12}" --seed "${SEED:-1}" \
  --out "$work/ratings.csv" >/dev/null 2>&1
total=$(($(wc -l <"$work/ratings.csv") - 1))
tail -n +2 "$work/ratings.csv" >"$work/rows.csv"
split -n "l/$parts" -d -a 3 "$work/rows.csv" "$work/part-"
topic="installments-$$-$(date +%s)"

metric() { curl -s "127.0.0.1:$port/metrics" | awk -v m="$1" '$1==m{print $2}'; }
latest() { curl -s "127.0.0.1:$port/snapshots/latest" | python3 -c "import json,sys; s=json.load(sys.stdin); print(s['version'], s['counts']['events_applied'])" 2>/dev/null || echo "0 0"; }

SEGMENTER_KAFKA__BROKERS=$brokers SEGMENTER_KAFKA__TOPIC=$topic SEGMENTER_KAFKA__GROUP_ID=$topic \
  SEGMENTER_KAFKA__DEAD_LETTER_TOPIC="$topic-dlq" SEGMENTER_STATE__DIR="$work/state" \
  SEGMENTER_SNAPSHOT__INTERVAL_MS="${INTERVAL_MS:-500}" SEGMENTER_SNAPSHOT__MAX_STALENESS_MS="${STALENESS_MS:-500}" SEGMENTER_HTTP__LISTEN="127.0.0.1:$port" \
  SEGMENTER_MODEL__CLUSTERS="${CLUSTERS:-25}" RUST_LOG=segmenter=warn "$bin" run >"$work/log" 2>&1 &
pid=$!

printf 'part\tevents\tfreshness_s\tbuild_s\n'
done_events=0
n=0
for part in "$work"/part-*; do
  { head -n 1 "$work/ratings.csv"; cat "$part"; } >"$work/one.csv"
  "$bin" produce --brokers "$brokers" --topic "$topic" --partitions 2 --ratings "$work/one.csv" >/dev/null 2>&1
  produced=$(date +%s.%N)
  done_events=$((done_events + $(wc -l <"$part")))
  n=$((n + 1))
  deadline=$((SECONDS + 120))
  while :; do
    read -r version applied < <(latest)
    [ "$applied" -ge "$done_events" ] && break
    [ $SECONDS -lt $deadline ] || { echo "no snapshot covering part $n within 120 s" >&2; exit 1; }
    sleep 0.05
  done
  served=$(date +%s.%N)
  build=$(curl -s "127.0.0.1:$port/metrics" | awk '/^segmenter_snapshot_build_duration_seconds_sum/{s=$2} /^segmenter_snapshot_build_duration_seconds_count/{c=$2} END{printf "%.3f", (c>0)?s/c:0}')
  printf '%s\t%s\t%.2f\t%s (mean so far)\n' "$n" "$done_events" "$(echo "$served - $produced" | bc)" "$build"
done
curl -s "127.0.0.1:$port/snapshots/latest" >"$work/online.json"
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=

SEGMENTER_MODEL__CLUSTERS="${CLUSTERS:-25}" "$bin" replay --ratings "$work/ratings.csv" \
  --state-dir "$work/cold" --snapshot-out "$work/cold.json" >/dev/null 2>&1
python3 - "$work/online.json" "$work/cold.json" "$total" <<'PY'
import json, sys
online, cold = (json.load(open(p)) for p in sys.argv[1:3])
def sizes(s):
    return sorted(c["size"] for c in s["kmeans"]["clusters"]) if "clusters" in s["kmeans"] else sorted(s["kmeans"].get("sizes", []))
oi, ci = online["kmeans"]["inertia"], cold["kmeans"]["inertia"]
print(f"events {sys.argv[3]}: online (installments) inertia {oi:.1f}, cold {ci:.1f}, ratio {oi / ci:.4f}")
print(f"smallest segments: online {sizes(online)[:4]}, cold {sizes(cold)[:4]}")
PY
