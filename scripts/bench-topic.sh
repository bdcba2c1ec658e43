# Sourced by the Kafka benchmarks (bench-kafka.sh, bench-feed.sh) after they set USERS, ITEMS,
# EVENTS and PARTITIONS: a broker (its own on BENCH_KAFKA_PORT, default 49092, unless
# BENCH_BROKERS is given), a release build, and a generated topic of that shape named
# "$BENCH_NAME-<time>". Sets work, brokers, bin and topic; at exit stops its broker and removes
# the work dir (KEEP=1 keeps it).
work="$(mktemp -d "/tmp/segmenter-$BENCH_NAME.XXXXXX")"
cleanup() {
  if [ -z "${BENCH_BROKERS:-}" ]; then KAFKA_PORT="$port" scripts/kafka.sh stop >/dev/null 2>&1 || true; fi
  if [ -z "${KEEP:-}" ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT
if [ -n "${BENCH_BROKERS:-}" ]; then
  brokers="$BENCH_BROKERS"
else
  port="${BENCH_KAFKA_PORT:-49092}"
  KAFKA_PORT="$port" scripts/kafka.sh start
  brokers="127.0.0.1:$port"
fi

cargo build --release --quiet
bin=target/release/segmenter
topic="$BENCH_NAME-$(date +%s)"
"$bin" generate --users "$USERS" --items "$ITEMS" --events "$EVENTS" --segments 25 --out "$work/ratings.csv"
"$bin" produce --brokers "$brokers" --topic "$topic" --partitions "$PARTITIONS" --ratings "$work/ratings.csv"
