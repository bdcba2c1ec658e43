#!/usr/bin/env bash
# scripts/kafka.sh - run a real, local, single-node Apache Kafka 4.x broker
# (KRaft combined broker+controller mode, no ZooKeeper, no Docker) for
# development and tests.
#
# Usage:
#   scripts/kafka.sh start      fresh broker: wipe the data dir, format KRaft
#                               storage with a random cluster id, start in the
#                               background, wait until it answers Kafka requests
#                               (a broker already running on the port is stopped
#                               first)
#   scripts/kafka.sh restart    stop (if running) and start again KEEPING the data
#                               dir (topics, offsets, records survive); same as
#                               KAFKA_RESTART_KEEP_DATA=1 scripts/kafka.sh start
#   scripts/kafka.sh stop       SIGTERM, wait, SIGKILL after a timeout; ok if not
#                               running
#   scripts/kafka.sh status     print state; exit 0 if running, 3 if not
#   scripts/kafka.sh fetch      only download the jars into the cache
#   scripts/kafka.sh classpath  print the java classpath of the cached jars
#   scripts/kafka.sh tool CLASS [ARGS...]
#                               run a Kafka tool class from the cached jars, e.g.
#     scripts/kafka.sh tool org.apache.kafka.tools.TopicCommand \
#         --bootstrap-server 127.0.0.1:9092 --create --topic t --partitions 3
#   scripts/kafka.sh logs [N]   print the last N (default 100) broker log lines
#                               (of node KAFKA_NODE, default 1, in a cluster)
#   scripts/kafka.sh kill-node I   SIGKILL node I of a cluster (KAFKA_NODES > 1),
#                               as a machine failure would; its data stays
#   scripts/kafka.sh start-node I  start node I again, keeping its data, and wait
#                               until it answers
#
# A cluster: KAFKA_NODES=3 scripts/kafka.sh start runs 3 nodes, each a broker and
# a voter of a static KRaft controller quorum; node I (1-based) listens on
# KAFKA_PORT + 2(I-1) (its controller on the port after), keeps its data in
# $SEGMENTER_KAFKA_DIR/node-I, and every topic is replicated on min(3, nodes)
# of them with min.insync.replicas one less (scripts/kafka/server.properties.cluster.template).
# start, restart, stop and status then act on every node; set KAFKA_NODES for
# every command on that cluster.
#
# Environment:
#   KAFKA_NODES             nodes of a local cluster, default 1 (a single broker)
#   KAFKA_PORT              client (PLAINTEXT) port, default 9092 (node 1's)
#   KAFKA_CONTROLLER_PORT   KRaft controller port, default KAFKA_PORT+1
#   KAFKA_VERSION           Kafka version fetched from Maven Central, default 4.4.0
#   SEGMENTER_KAFKA_CACHE   jar cache, default
#                           ${XDG_CACHE_HOME:-$HOME/.cache}/segmenter/kafka-$KAFKA_VERSION
#   SEGMENTER_KAFKA_DIR     data dir, default /tmp/segmenter-kafka-$KAFKA_PORT
#                           (wiped by `start`; holds server.properties, kafka.pid,
#                           logs/server.log, logs/kafka.out, kraft-data/)
#   KAFKA_RESTART_KEEP_DATA=1  make `start` keep the data dir (see `restart`)
#   KAFKA_HEAP_OPTS         broker heap, default "-Xms128m -Xmx512m"
#   KAFKA_EXTRA_CONFIG      extra server.properties lines, appended (later wins)
#   KAFKA_START_TIMEOUT     seconds to wait for the broker, default 90
#   KAFKA_STOP_TIMEOUT      seconds to wait after SIGTERM before SIGKILL, default 30
#   JAVA_HOME / java on PATH  Java 17 or newer
#
# Brokers on different KAFKA_PORTs (hence different data dirs) run side by side.
# The first `start` downloads the jars with Maven (mvn on PATH); later starts use
# the cache and need no network. The cache is refetched when scripts/kafka/pom.xml
# changes.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF_DIR="$SCRIPT_DIR/kafka"

KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
PORT="${KAFKA_PORT:-9092}"
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
  echo "kafka.sh: invalid KAFKA_PORT '$PORT'" >&2
  exit 2
fi
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((PORT + 1))}"
if ! [[ $CONTROLLER_PORT =~ ^[0-9]+$ ]] || ((CONTROLLER_PORT < 1 || CONTROLLER_PORT > 65535)) ||
  ((CONTROLLER_PORT == PORT)); then
  echo "kafka.sh: invalid KAFKA_CONTROLLER_PORT '$CONTROLLER_PORT'" >&2
  exit 2
fi
CACHE="${SEGMENTER_KAFKA_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/segmenter/kafka-$KAFKA_VERSION}"
DATA="${SEGMENTER_KAFKA_DIR:-/tmp/segmenter-kafka-$PORT}"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m}"
NODES="${KAFKA_NODES:-1}"
if ! [[ $NODES =~ ^[1-9]$ ]]; then
  echo "kafka.sh: invalid KAFKA_NODES '$NODES' (use 1 to 9)" >&2
  exit 2
fi
ROOT_PORT=$PORT
ROOT_DATA=$DATA
NODE_ID=1
if ((NODES > 1 && ROOT_PORT + 2 * NODES > 65535)); then
  echo "kafka.sh: KAFKA_PORT $ROOT_PORT leaves no room for $NODES nodes" >&2
  exit 2
fi

COMPLETE="$CACHE/.complete"

# Point the per-broker globals at $DATA.
set_paths() {
  PIDFILE="$DATA/kafka.pid"
  LOGDIR="$DATA/logs"
  SERVER_LOG="$LOGDIR/server.log"
  OUT_LOG="$LOGDIR/kafka.out"
  PROPS="$DATA/server.properties"
  MARKER="$DATA/.segmenter-kafka"
}
set_paths

# In a cluster, point the per-broker globals at node $1.
use_node() {
  ((NODES > 1)) || return 0
  [[ $1 =~ ^[1-9]$ ]] && (($1 <= NODES)) || die "no node '$1' in a cluster of $NODES"
  NODE_ID=$1
  PORT=$((ROOT_PORT + 2 * (NODE_ID - 1)))
  CONTROLLER_PORT=$((PORT + 1))
  DATA="$ROOT_DATA/node-$NODE_ID"
  set_paths
}

if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
  JAVA="$JAVA_HOME/bin/java"
else
  JAVA=java
fi

log() { echo "kafka.sh: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# --- jars -------------------------------------------------------------------

pom_stamp() {
  printf '%s %s\n' "$KAFKA_VERSION" "$(sha256sum <"$CONF_DIR/pom.xml" | cut -d' ' -f1)"
}

cache_ok() {
  [[ -f $COMPLETE && "$(cat "$COMPLETE")" == "$(pom_stamp)" ]]
}

# Download Kafka and its runtime dependencies into $CACHE unless already there.
# The jars land in a temporary sibling dir that is renamed into place only when
# complete, so an interrupted or concurrent fetch never leaves a broken cache.
ensure_jars() {
  cache_ok && return 0
  command -v mvn >/dev/null 2>&1 || die "mvn not found on PATH (needed once to fetch the Kafka jars)"
  local parent tmp start=$SECONDS
  parent=$(dirname "$CACHE")
  mkdir -p "$parent"
  tmp=$(mktemp -d "$CACHE.tmp.XXXXXX")
  log "fetching Apache Kafka $KAFKA_VERSION jars with Maven into $CACHE ..."
  if ! mvn -B -q -f "$CONF_DIR/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" >"$tmp.mvn.log" 2>&1; then
    cat "$tmp.mvn.log" >&2
    rm -rf "$tmp" "$tmp.mvn.log"
    die "Maven could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION (try another KAFKA_VERSION)"
  fi
  rm -f "$tmp.mvn.log"
  compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || {
    rm -rf "$tmp"
    die "Maven finished but no kafka_2.13 jar was copied"
  }
  pom_stamp >"$tmp/.complete"
  if [[ -e $CACHE ]] && ! cache_ok; then
    rm -rf "$CACHE" # stale (other pom) or incomplete cache
  fi
  if ! mv -T "$tmp" "$CACHE" 2>/dev/null; then
    rm -rf "$tmp" # lost a race with a concurrent fetch; use its result
    cache_ok || die "could not install the jar cache at $CACHE"
  fi
  log "fetched $(find "$CACHE" -name '*.jar' | wc -l) jars in $((SECONDS - start))s"
}

# Run a Kafka class (tool) from the cache, logging warnings to stderr.
run_class() {
  "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$CONF_DIR/tools-log4j2.yaml" \
    -cp "$CACHE/*" "$@"
}

# --- process state --------------------------------------------------------------

# Print the broker pid if the pid file names a live broker of this data dir.
broker_pid() {
  local pid args
  [[ -f $PIDFILE ]] || return 1
  pid=$(<"$PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  if [[ -r /proc/$pid/cmdline ]]; then
    args=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  else
    args=$(ps -ww -p "$pid" -o args= 2>/dev/null) || return 1
  fi
  # Guard against pid reuse: it must be our kafka.Kafka with our properties.
  [[ $args == *kafka.Kafka*"$PROPS"* ]] || return 1
  echo "$pid"
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Send a Kafka ApiVersions v0 request and check for a well-formed, error-free
# answer: proof that the broker processes Kafka requests, not just that the
# port is open.
api_versions_ok() {
  local resp
  resp=$(
    exec 2>/dev/null
    exec 3<>"/dev/tcp/127.0.0.1/$PORT" || exit 1
    # size=15 | api_key=18 | api_version=0 | correlation_id=0x5e6d | client_id="probe"
    printf '\x00\x00\x00\x0f\x00\x12\x00\x00\x00\x00\x5e\x6d\x00\x05probe' >&3
    timeout 3 head -c 10 <&3 | od -An -v -tx1 | tr -d ' \n'
  ) || return 1
  # response: size(4) correlation_id(4) error_code(2)
  [[ ${resp:8:8} == 00005e6d && ${resp:16:4} == 0000 ]]
}

show_logs() {
  local n=40
  if [[ -s $SERVER_LOG ]]; then
    echo "----- last $n lines of $SERVER_LOG -----" >&2
    tail -n "$n" "$SERVER_LOG" >&2
  fi
  if [[ -s $OUT_LOG ]]; then
    echo "----- last $n lines of $OUT_LOG -----" >&2
    tail -n "$n" "$OUT_LOG" >&2
  fi
}

# --- data dir --------------------------------------------------------------------

# Remove and recreate $DATA. Refuses to wipe a non-empty directory that this
# script did not create (no marker file), so a mistyped SEGMENTER_KAFKA_DIR
# cannot delete anything else.
fresh_data_dir() {
  if [[ -d $DATA && -n "$(ls -A "$DATA")" && ! -f $MARKER ]]; then
    die "$DATA exists, is not empty and was not created by kafka.sh; refusing to wipe it"
  fi
  rm -rf "$DATA"
  mkdir -p "$DATA" "$LOGDIR"
  : >"$MARKER"
}

write_properties() {
  local tmpl
  if ((NODES > 1)); then
    local voters="" i replication=$((NODES < 3 ? NODES : 3))
    for i in $(seq 1 "$NODES"); do
      voters+="${voters:+,}$i@127.0.0.1:$((ROOT_PORT + 2 * (i - 1) + 1))"
    done
    tmpl=$(<"$CONF_DIR/server.properties.cluster.template")
    tmpl=${tmpl//@NODE_ID@/$NODE_ID}
    tmpl=${tmpl//@VOTERS@/$voters}
    tmpl=${tmpl//@REPLICATION@/$replication}
    tmpl=${tmpl//@MIN_ISR@/$((replication > 1 ? replication - 1 : 1))}
  else
    tmpl=$(<"$CONF_DIR/server.properties.template")
  fi
  tmpl=${tmpl//@PORT@/$PORT}
  tmpl=${tmpl//@CONTROLLER_PORT@/$CONTROLLER_PORT}
  tmpl=${tmpl//@DATA_DIR@/$DATA}
  {
    printf '%s\n' "$tmpl"
    if [[ -n ${KAFKA_EXTRA_CONFIG:-} ]]; then
      printf '\n# from KAFKA_EXTRA_CONFIG\n%s\n' "$KAFKA_EXTRA_CONFIG"
    fi
  } >"$PROPS"
}

random_cluster_id() {
  # A Kafka Uuid: 16 random bytes, base64url without padding (22 chars). Avoid
  # a leading '-' (Kafka's own generator does too: it looks like an option).
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)
    [[ $id != -* ]] && break
  done
  echo "$id"
}

format_storage() {
  local cid=${CLUSTER_ID:-} quorum=(--standalone)
  [[ -n $cid ]] || cid=$(random_cluster_id)
  # A cluster's static quorum (controller.quorum.voters) needs no bootstrap flag.
  ((NODES > 1)) && quorum=()
  if ! run_class kafka.tools.StorageTool format "${quorum[@]}" \
    --cluster-id "$cid" --config "$PROPS" >"$LOGDIR/format.log" 2>&1; then
    cat "$LOGDIR/format.log" >&2
    die "formatting the KRaft storage in $DATA failed"
  fi
}

# --- commands --------------------------------------------------------------------

cmd_stop() {
  local pid deadline
  if ! pid=$(broker_pid); then
    rm -f "$PIDFILE"
    log "not running (port $PORT)"
    return 0
  fi
  log "stopping broker pid $pid (port $PORT) ..."
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "broker pid $pid still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
      break
    fi
    sleep 0.2
  done
  rm -f "$PIDFILE"
  log "stopped"
}

# Start the broker of the current globals in the background (fresh data unless
# $1 = 1); sets LAUNCHED_PID and LOG_OFFSET for await_broker.
launch_broker() {
  local keep=$1 pid
  if pid=$(broker_pid); then
    if ((keep)); then
      log "restarting broker pid $pid, keeping $DATA"
    else
      log "broker pid $pid already running on port $PORT; stopping it for a fresh start"
    fi
    cmd_stop
  fi

  local p
  for p in "$PORT" "$CONTROLLER_PORT"; do
    port_open "$p" && die "port $p on 127.0.0.1 is already in use by another process"
  done

  if ((keep)) && [[ -f $PROPS && -f $DATA/kraft-data/meta.properties ]]; then
    mkdir -p "$LOGDIR"
  else
    ((keep)) && log "no formatted data in $DATA, starting fresh"
    fresh_data_dir
    write_properties
    format_storage
  fi

  rm -f "$PIDFILE"
  echo "===== $(date '+%Y-%m-%d %H:%M:%S') start =====" >>"$OUT_LOG"
  # server.log is appended to across restarts: only look at what this run logs.
  LOG_OFFSET=0
  [[ -f $SERVER_LOG ]] && LOG_OFFSET=$(wc -c <"$SERVER_LOG")
  # HEAP_OPTS is a list of JVM options; the bash -c script expands its own args.
  # shellcheck disable=SC2086,SC2016
  (
    cd "$DATA"
    exec setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PIDFILE" \
      "$JAVA" $HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
      -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
      -Dkafka.logs.dir="$LOGDIR" -Dlog4j2.configurationFile="$CONF_DIR/log4j2.yaml" \
      -cp "$CACHE/*" kafka.Kafka "$PROPS"
  ) >>"$OUT_LOG" 2>&1 </dev/null &

  local pid_deadline=$((SECONDS + 15))
  while [[ ! -s $PIDFILE ]]; do
    if ((SECONDS >= pid_deadline)); then
      show_logs
      die "broker process did not start (no pid in $PIDFILE)"
    fi
    sleep 0.1
  done
  LAUNCHED_PID=$(<"$PIDFILE")
}

# Wait until the broker of the current globals (pid $1, logging from offset $2)
# answers Kafka requests; started at $3 (SECONDS) for the message.
await_broker() {
  local pid=$1 log_offset=$2 start=$3 deadline=$((SECONDS + START_TIMEOUT))

  # Ready = the broker logged "Kafka Server started" AND answers ApiVersions.
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      show_logs
      rm -f "$PIDFILE"
      die "broker (pid $pid) exited during startup; logs in $LOGDIR"
    fi
    if grep -q 'Kafka Server started' < <(tail -c +$((log_offset + 1)) "$SERVER_LOG" 2>/dev/null) &&
      api_versions_ok; then
      break
    fi
    if ((SECONDS >= deadline)); then
      show_logs
      log "broker (pid $pid) not ready on 127.0.0.1:$PORT after ${START_TIMEOUT}s; stopping it"
      cmd_stop
      die "broker not ready after ${START_TIMEOUT}s; logs in $LOGDIR"
    fi
    sleep 0.2
  done
  log "broker ready on 127.0.0.1:$PORT (pid $pid, controller port $CONTROLLER_PORT, data $DATA) in $((SECONDS - start))s"
}

cmd_start() {
  local keep=${1:-${KAFKA_RESTART_KEEP_DATA:-0}} start=$SECONDS i
  [[ $keep == 1 || $keep == true || $keep == yes ]] && keep=1 || keep=0
  ensure_jars
  if ((NODES == 1)); then
    launch_broker "$keep"
    await_broker "$LAUNCHED_PID" "$LOG_OFFSET" "$start"
    return
  fi
  # Every node is launched before any is awaited: none is ready before a quorum of
  # controllers is up.
  if ! ((keep)); then
    for i in $(seq 1 "$NODES"); do
      use_node "$i"
      cmd_stop
    done
    DATA=$ROOT_DATA
    set_paths
    fresh_data_dir
    CLUSTER_ID=$(random_cluster_id)
  fi
  local pids=() offsets=()
  for i in $(seq 1 "$NODES"); do
    use_node "$i"
    launch_broker "$keep"
    pids+=("$LAUNCHED_PID")
    offsets+=("$LOG_OFFSET")
  done
  for i in $(seq 1 "$NODES"); do
    use_node "$i"
    await_broker "${pids[$((i - 1))]}" "${offsets[$((i - 1))]}" "$start"
  done
  log "cluster of $NODES nodes ready: bootstrap $(bootstrap_servers)"
}

bootstrap_servers() {
  local i out=""
  for i in $(seq 1 "$NODES"); do
    out+="${out:+,}127.0.0.1:$((ROOT_PORT + 2 * (i - 1)))"
  done
  echo "$out"
}

# SIGKILL one node of a cluster (a machine failure: no shutdown, data kept).
cmd_kill_node() {
  ((NODES > 1)) || die "kill-node needs a cluster (KAFKA_NODES > 1)"
  use_node "${1:-}"
  local pid
  pid=$(broker_pid) || die "node $NODE_ID is not running"
  kill -KILL "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  rm -f "$PIDFILE"
  log "killed node $NODE_ID (pid $pid, port $PORT)"
}

# Start one node of a cluster again, keeping its data, and wait until it answers.
cmd_start_node() {
  ((NODES > 1)) || die "start-node needs a cluster (KAFKA_NODES > 1)"
  use_node "${1:-}"
  local start=$SECONDS
  ensure_jars
  launch_broker 1
  await_broker "$LAUNCHED_PID" "$LOG_OFFSET" "$start"
}

cmd_status() {
  local pid
  if ((NODES > 1)); then
    local i down=0
    for i in $(seq 1 "$NODES"); do
      use_node "$i"
      if pid=$(broker_pid); then
        echo "kafka node $i running: pid $pid, port $PORT, controller port $CONTROLLER_PORT, data $DATA"
      else
        echo "kafka node $i not running (port $PORT)"
        down=$((down + 1))
      fi
    done
    ((down == 0)) || return 3
    return 0
  fi
  if pid=$(broker_pid); then
    echo "kafka running: pid $pid, port $PORT, controller port $CONTROLLER_PORT, data $DATA"
    return 0
  fi
  echo "kafka not running (port $PORT)"
  return 3
}

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
}

main() {
  local cmd=${1:-}
  [[ $# -gt 0 ]] && shift
  case $cmd in
    start) cmd_start ;;
    restart) cmd_start 1 ;;
    stop)
      local i
      for i in $(seq 1 "$NODES"); do
        use_node "$i"
        cmd_stop
      done
      ;;
    kill-node) cmd_kill_node "$@" ;;
    start-node) cmd_start_node "$@" ;;
    status) cmd_status ;;
    fetch) ensure_jars ;;
    classpath)
      ensure_jars
      echo "$CACHE/*"
      ;;
    tool)
      [[ $# -ge 1 ]] || die "usage: scripts/kafka.sh tool CLASS [ARGS...]"
      ensure_jars
      run_class "$@"
      ;;
    logs)
      use_node "${KAFKA_NODE:-1}"
      [[ -f $SERVER_LOG ]] || die "no log at $SERVER_LOG"
      tail -n "${1:-100}" "$SERVER_LOG"
      ;;
    -h | --help | help)
      usage
      ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"
