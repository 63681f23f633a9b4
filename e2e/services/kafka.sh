#!/usr/bin/env bash
# Test-bed service: a real Apache Kafka broker, single node, KRaft mode
# (combined broker + controller), listening on 127.0.0.1 only.
#
#   kafka.sh install   resolve the Kafka jars from Maven into the cache (once);
#                      apt-get install libssl-dev unless there (Herald's clients)
#   kafka.sh start     format a fresh data dir, start the broker, wait until it
#                      answers a metadata request, write $HERALD_RUN/kafka.env
#   kafka.sh stop      stop the broker started by `start`
#   kafka.sh crash     SIGKILL it, keeping its data (fault tests)
#   kafka.sh resume    start the crashed broker again on the same port and data
#
# The jars come from Maven (the same repositories the machine's Maven settings
# already use), not from the binary tarball, so no extra download host is
# needed. Helper files live in e2e/services/kafka/.
#
# Tests read HERALD_KAFKA_BROKERS (host:port, PLAINTEXT) from $HERALD_RUN/kafka.env.
# The broker also has a SASL_SSL listener (certificates made at start by
# openssl, lib.sh make_certs; a SCRAM user written into the storage at format
# time); kafka.env names it:
#   HERALD_KAFKA_SASL_SSL_BROKERS   host:port of that listener
#   HERALD_KAFKA_TLS_CA             the CA that signed its certificate
#   HERALD_KAFKA_SASL_USER, HERALD_KAFKA_SASL_PASSWORD   SCRAM-SHA-256 and -512
# To run a Kafka command-line class by hand against the running broker:
#   java -Dlog4j2.configurationFile=e2e/services/kafka/tools-log4j2.properties \
#     -cp "$HERALD_CACHE/kafka-<version>/libs/*" org.apache.kafka.tools.TopicCommand \
#     --bootstrap-server "$HERALD_KAFKA_BROKERS" --list

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# 4.1.1 runs on Java 17 (4.x brokers need >= 17) and resolves cleanly from
# Maven Central. Bumping it only means changing this line: the pom takes the
# version as a property and the cache directory is per version.
KAFKA_VERSION=4.1.1

KAFKA_FILES="$HERALD_ROOT/e2e/services/kafka"
KAFKA_HOME="$HERALD_CACHE/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_HOME/libs"
KAFKA_RUN="$HERALD_RUN/kafka"
KAFKA_LOG="$KAFKA_RUN/server.log"
READY_TIMEOUT=60

# Main classes (all in the resolved jars):
STORAGE_TOOL=kafka.tools.StorageTool               # kafka_2.13: formats KRaft storage
BROKER_MAIN=kafka.Kafka                            # kafka_2.13: the server
TOPIC_COMMAND=org.apache.kafka.tools.TopicCommand  # kafka-tools: readiness probe

# JVM for Kafka command-line classes: quiet logging (warnings on stderr) and
# settings that favour start-up time, since each tool runs for a second or two
# (C1 only: no time spent on optimising compiles that would never pay off).
# An array rather than a function so it also works under `timeout`.
KAFKA_TOOL=(java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true
  -Dlog4j2.configurationFile="$KAFKA_FILES/tools-log4j2.properties" -cp "$KAFKA_LIBS/*")

install() {
  # Herald's Kafka clients (librdkafka, the rdkafka crate's `ssl` feature) build
  # against the system OpenSSL for SSL/SASL_SSL and SCRAM: its headers and
  # pkg-config file; libssl3 comes with it (running needs only that).
  if ! dpkg-query -W -f='${Status}' libssl-dev 2>/dev/null | grep -q 'ok installed'; then
    log "installing libssl-dev and pkg-config (librdkafka's TLS and SCRAM)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libssl-dev pkg-config >/dev/null
  fi
  # The marker is written last, so an interrupted install is redone, not trusted.
  if [[ -f $KAFKA_HOME/.installed ]]; then
    log "kafka $KAFKA_VERSION already installed in $KAFKA_HOME"
    return 0
  fi
  command -v java >/dev/null || die "java not found (Kafka $KAFKA_VERSION needs Java 17+)"
  command -v mvn >/dev/null || die "mvn not found (used to resolve the Kafka jars)"
  log "resolving kafka_2.13:$KAFKA_VERSION and its runtime dependencies with Maven"
  # Copy into a scratch dir and rename at the end, so a failed or concurrent
  # run never leaves a half-filled libs/ that a later start would pick up.
  local tmp="$KAFKA_HOME/libs.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$KAFKA_HOME"
  # Maven's output goes to a file (it is noise when things work, and Maven 3.8
  # prints colour codes even in batch mode); shown only when resolution fails.
  mvn -B -q -f "$KAFKA_FILES/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
    >"$KAFKA_HOME/maven.log" 2>&1 ||
    { tail -n 30 "$KAFKA_HOME/maven.log" >&2; rm -rf "$tmp"; die "maven could not resolve the Kafka jars"; }
  [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar && -f $tmp/kafka-tools-$KAFKA_VERSION.jar ]] ||
    { rm -rf "$tmp"; die "maven finished but the Kafka jars are missing from $tmp"; }
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
  touch "$KAFKA_HOME/.installed"
  log "kafka $KAFKA_VERSION installed: $(ls "$KAFKA_LIBS" | wc -l) jars, $(du -sh "$KAFKA_LIBS" | cut -f1)"
}

# random_cluster_id: a Kafka Uuid string (16 random bytes, base64url, no
# padding), as `StorageTool random-uuid` prints, without paying for a JVM start.
# Like Kafka's Uuid.randomUuid it never returns an id starting with '-'.
random_cluster_id() {
  python3 -c '
import base64, os
while True:
    s = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    if not s.startswith("-"):
        print(s)
        break'
}

# On a failed start: show why (log tail) and do not leave a broker behind.
start_failed() {
  local rc=$?
  trap - EXIT
  if ((rc != 0)); then
    if [[ -f $KAFKA_LOG ]]; then
      log "kafka did not start; last lines of $KAFKA_LOG:"
      tail -n 40 "$KAFKA_LOG" >&2
    fi
    if [[ -s $KAFKA_RUN/probe.log ]]; then
      log "last lines of the readiness probe's stderr ($KAFKA_RUN/probe.log):"
      tail -n 10 "$KAFKA_RUN/probe.log" >&2
    fi
    stop_pids kafka
    rm -f "$HERALD_RUN/kafka.env"
  fi
  exit "$rc"
}

start() {
  [[ -f $KAFKA_HOME/.installed ]] || install
  # A start always gives a fresh, empty broker: end any earlier one from this
  # test-bed instance and throw its data away.
  stop_pids kafka
  rm -rf "$KAFKA_RUN" "$HERALD_RUN/kafka.env"
  mkdir -p "$KAFKA_RUN/data"
  trap start_failed EXIT

  local port cport sport tls="$KAFKA_RUN/tls" user=herald password
  port=$(free_port)
  cport=$(free_port)
  while [[ $cport == "$port" ]]; do cport=$(free_port); done
  sport=$(free_port)
  while [[ $sport == "$port" || $sport == "$cport" ]]; do sport=$(free_port); done
  password=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
  make_certs "$tls"

  sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$cport|g" \
    -e "s|@SASL_SSL_PORT@|$sport|g" -e "s|@TLS_DIR@|$tls|g" \
    -e "s|@DATA_DIR@|$KAFKA_RUN/data|g" \
    "$KAFKA_FILES/server.properties.in" >"$KAFKA_RUN/server.properties"

  # KRaft refuses to start on an unformatted log dir. --standalone makes this
  # node the sole voter of the (dynamic) controller quorum. --add-scram writes
  # the SASL_SSL listener's user into the metadata log before the first start.
  "${KAFKA_TOOL[@]}" "$STORAGE_TOOL" format --standalone -t "$(random_cluster_id)" \
    -c "$KAFKA_RUN/server.properties" \
    --add-scram "SCRAM-SHA-256=[name=$user,password=$password]" \
    --add-scram "SCRAM-SHA-512=[name=$user,password=$password]" >>"$KAFKA_LOG" 2>&1 ||
    die "formatting $KAFKA_RUN/data failed"

  # log4j2 writes to $KAFKA_LOG via kafka.logs.dir; stdout/stderr are appended to
  # the same file to catch JVM errors that happen before logging is set up.
  # A small heap and ZGC: a test broker with a handful of clients needs little
  # memory, and its pauses are what the benchmarks' latency tails measure.
  # With SerialGC a young collection every 2 s stopped the broker for 20-40 ms
  # (p99 of a 1,000/s produce->answer 6-11 ms, max 30-50 ms); G1 with a 5 ms
  # pause goal collected every second for ~10 ms (p99 7-11 ms); ZGC collects
  # concurrently (p99 4-5 ms, max 12 ms, which is this VM's own stalls).
  log "starting kafka $KAFKA_VERSION on 127.0.0.1:$port (controller 127.0.0.1:$cport)"
  echo "$port" >"$KAFKA_RUN/port"
  launch "$port"
  {
    echo "export HERALD_KAFKA_BROKERS=127.0.0.1:$port"
    echo "export HERALD_KAFKA_SASL_SSL_BROKERS=127.0.0.1:$sport"
    echo "export HERALD_KAFKA_TLS_CA=$tls/ca.pem"
    echo "export HERALD_KAFKA_SASL_USER=$user"
    echo "export HERALD_KAFKA_SASL_PASSWORD=$password"
  } >"$HERALD_RUN/kafka.env"
  trap - EXIT
}

# launch PORT: run the broker on the prepared $KAFKA_RUN and wait until it
# answers a metadata request.
launch() {
  local port=$1
  java -Xmx512m -Xms512m -XX:+UseZGC -Djava.awt.headless=true \
    -Dkafka.logs.dir="$KAFKA_RUN" \
    -Dlog4j2.configurationFile="$KAFKA_FILES/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$BROKER_MAIN" "$KAFKA_RUN/server.properties" \
    >>"$KAFKA_LOG" 2>&1 </dev/null &
  local pid=$!
  record_pid kafka "$pid"

  local deadline=$((SECONDS + READY_TIMEOUT))
  wait_port "$port" "$READY_TIMEOUT" "$pid"
  until timeout "$((deadline - SECONDS > 1 ? deadline - SECONDS : 1))" \
    "${KAFKA_TOOL[@]}" "$TOPIC_COMMAND" --bootstrap-server "127.0.0.1:$port" --list \
    >/dev/null 2>>"$KAFKA_RUN/probe.log"; do
    kill -0 "$pid" 2>/dev/null || die "kafka (pid $pid) exited during start-up"
    ((SECONDS < deadline)) || die "kafka did not answer a metadata request within ${READY_TIMEOUT}s"
    sleep 0.5
  done
  log "kafka ready at 127.0.0.1:$port (pid $pid, log $KAFKA_LOG)"
}

# For fault tests: SIGKILL the broker (no clean shutdown), keeping its data
# and kafka.env, so `resume` brings the same broker back on the same port.
crash() {
  local file="$HERALD_RUN/kafka.pids" pid i
  [[ -f $file ]] || die "no kafka started in $HERALD_RUN"
  while read -r pid; do
    [[ -n $pid ]] || continue
    kill -KILL "$pid" 2>/dev/null || continue
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  done <"$file"
  rm -f "$file"
  log "kafka killed (data kept in $KAFKA_RUN/data)"
}

resume() {
  [[ -f $KAFKA_RUN/port ]] || die "no crashed kafka to resume in $HERALD_RUN"
  [[ ! -f $HERALD_RUN/kafka.pids ]] || die "kafka in $HERALD_RUN is still running"
  launch "$(cat "$KAFKA_RUN/port")"
}

stop() {
  stop_pids kafka
  rm -f "$HERALD_RUN/kafka.env"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  crash) crash ;;
  resume) resume ;;
  *) die "usage: $0 install|start|stop|crash|resume" ;;
esac
