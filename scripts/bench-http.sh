#!/usr/bin/env bash
# Load benchmark of the HTTP API while the service consumes: `segmenter run --demo` streams
# generated events (20,000/s by default) and takes snapshots; wrk (Debian) measures requests/s
# and latency percentiles of GET /snapshots/latest and GET /users/{id} (ids cycling over the
# demo's users). Usage: scripts/bench-http.sh [DURATION_SECONDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10}"; connections="${2:-32}"
command -v wrk >/dev/null || { echo "bench-http.sh: install wrk (apt-get install wrk)" >&2; exit 2; }
cargo build --release --quiet
port="${BENCH_HTTP_PORT:-49464}"
work="$(mktemp -d /tmp/segmenter-http-bench.XXXXXX)"
SEGMENTER_HTTP__LISTEN="127.0.0.1:$port" SEGMENTER_SNAPSHOT__INTERVAL_MS=2000 \
  target/release/segmenter run --demo --state-dir "$work/state" 2> "$work/demo.log" &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$port/snapshots/latest" -o /dev/null && break
  sleep 0.1
done
cat > "$work/users.lua" <<'LUA'
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/users/u" .. (counter % 943))
end
LUA
echo "== GET /snapshots/latest ($connections connections, ${duration}s, service consuming)"
wrk -t2 -c"$connections" -d"${duration}s" --latency "http://127.0.0.1:$port/snapshots/latest" | grep -E "Requests/sec|Transfer/sec|  50%|  99%"
echo "== GET /users/{id} ($connections connections, ${duration}s, service consuming)"
wrk -t2 -c"$connections" -d"${duration}s" --latency -s "$work/users.lua" "http://127.0.0.1:$port" | grep -E "Requests/sec|  50%|  99%|Non-2xx"
echo "== events consumed meanwhile: $(curl -s "http://127.0.0.1:$port/metrics" | grep '^segmenter_events_consumed_total' | awk '{print $2}')"
