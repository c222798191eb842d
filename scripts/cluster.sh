#!/usr/bin/env bash
# The cluster profile on one machine (deploy/cluster/): the same processes a cluster runs on many.
#
#   scripts/cluster.sh up       start, under $VISMEM_CLUSTER_DIR (default ./.cluster): PostgreSQL (the
#                               Dagster instance and the `vismem` ledger database), Redis (the broker),
#                               dagster-daemon, the webserver, embedding workers and one ledger worker,
#                               and, when VISMEM_SHARDS > 1, one shard worker per shard (`vismem
#                               shard-worker J`, queue vismem-shard-J); write $VISMEM_CLUSTER_DIR/cluster.env
#   scripts/cluster.sh down     stop exactly what `up` started, by its pid files
#   scripts/cluster.sh status   what runs: one line per process, its pid, alive or not
#   scripts/cluster.sh running  exit status 0 if the cluster's daemon runs
#   scripts/cluster.sh demo     the demo feed (dagster_project/demo.py) into the cluster's inbox
#
# Then `source .cluster/cluster.env` and `vismem ...` or `dagster ...` use this cluster.
# Ports: VISMEM_CLUSTER_PG_PORT (15432), VISMEM_CLUSTER_REDIS_PORT (16379), VISMEM_CLUSTER_WEB_PORT
# (3100; `dagster dev` keeps 3000). VISMEM_EMBED_WORKERS (2) embedding workers. VISMEM_HOME, if set,
# is the memory home (default: $VISMEM_CLUSTER_DIR/vismem_home); other VISMEM_* settings set at `up`
# (e.g. VISMEM_QUERY_SET) are kept in cluster.env for every process.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SERVICES="$REPO/scripts/services.sh"
VENV_BIN=${VISMEM_VENV_BIN:-$REPO/.venv/bin}

CLUSTER_DIR=$(realpath -m "${VISMEM_CLUSTER_DIR:-$REPO/.cluster}")  # created by `up` only
ENV_FILE="$CLUSTER_DIR/cluster.env"
PIDS="$CLUSTER_DIR/pids"
LOGS="$CLUSTER_DIR/logs"
PROCESSES=(webserver daemon ledger-worker)  # the embedding workers are added by their number

die() { echo "cluster: $*" >&2; exit 1; }

alive() { [ -f "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

embed_names() {
  local n=${VISMEM_EMBED_WORKERS:-2} i
  for ((i = 1; i <= n; i++)); do echo "embed-worker-$i"; done
}

# One shard worker per shard when the memory is split (VISMEM_SHARDS > 1); none otherwise.
shard_names() {
  local n=${VISMEM_SHARDS:-1} j
  ((n > 1)) || return 0
  for ((j = 0; j < n; j++)); do echo "shard-worker-$j"; done
}

# Start a command in a session of its own (pid = process group id), logging to logs/NAME.log.
spawn() {
  local name=$1
  shift
  (cd "$REPO" && exec setsid "$@" </dev/null >"$LOGS/$name.log" 2>&1) &
  echo $! >"$PIDS/$name.pid"
}

# SIGTERM the process group of a pid file, wait, then SIGKILL what is left of it.
stop_group() {
  local name=$1 pid i
  [ -f "$PIDS/$name.pid" ] || return 0
  pid=$(cat "$PIDS/$name.pid")
  if kill -0 "$pid" 2>/dev/null || kill -0 -- "-$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$PIDS/$name.pid"
}

wait_for() {  # what, seconds, command...
  local what=$1 seconds=$2 i
  shift 2
  for ((i = 0; i < seconds * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  return 1
}

worker_ready() { grep -q " ready\." "$LOGS/$1.log"; }

write_env() {
  local password
  if [ -f "$ENV_FILE" ]; then  # a second `up` keeps the password the databases were made with
    password=$(sed -n 's/^export VISMEM_DAGSTER_PG_PASSWORD=//p' "$ENV_FILE")
  fi
  password=${password:-$("$VENV_BIN/python" -c 'import secrets; print(secrets.token_hex(16))')}
  local pg_port=${VISMEM_CLUSTER_PG_PORT:-15432} redis_port=${VISMEM_CLUSTER_REDIS_PORT:-16379}
  local web_port=${VISMEM_CLUSTER_WEB_PORT:-3100} home=${VISMEM_HOME:-$CLUSTER_DIR/vismem_home}
  local threads=$(( $(nproc) / ${VISMEM_EMBED_WORKERS:-2} ))
  umask 077
  {
    echo "# Written by scripts/cluster.sh up: source it to use this cluster (vismem, dagster)."
    echo "export VISMEM_CLUSTER_DIR=$CLUSTER_DIR"
    echo "export VISMEM_CLUSTER_PG_PORT=$pg_port"
    echo "export VISMEM_CLUSTER_REDIS_PORT=$redis_port"
    echo "export VISMEM_CLUSTER_WEB_PORT=$web_port"
    echo "export VISMEM_HOME=$home"
    echo "export DAGSTER_HOME=$CLUSTER_DIR/dagster_home"
    echo "export VISMEM_LEDGER_URL=postgresql://vismem:$password@127.0.0.1:$pg_port/vismem"
    echo "export VISMEM_BROKER_URL=redis://127.0.0.1:$redis_port/0"
    echo "export VISMEM_BROKER_BACKEND=redis://127.0.0.1:$redis_port/1"
    echo "export VISMEM_DAGSTER_EXECUTOR=celery"
    echo "export VISMEM_DAGSTER_IO_DIR=$CLUSTER_DIR/dagster_io"
    echo "export VISMEM_EMBED_WORKERS=${VISMEM_EMBED_WORKERS:-2}"
    echo "export VISMEM_EMBED_THREADS=$(( threads > 0 ? threads : 1 ))"
    # Searches and forgets go through the shard workers (vismem_assets/shard_workers.py) when there are some.
    if (( ${VISMEM_SHARDS:-1} > 1 )); then echo "export VISMEM_SHARD_WORKERS=1"; fi
    echo "export VISMEM_DAGSTER_PG_USER=vismem"
    echo "export VISMEM_DAGSTER_PG_PASSWORD=$password"
    echo "export VISMEM_DAGSTER_PG_HOST=127.0.0.1"
    echo "export VISMEM_DAGSTER_PG_PORT=$pg_port"
    echo "export VISMEM_DAGSTER_PG_DB=dagster"
    # The memory's own settings given at `up` (VISMEM_QUERY_SET, VISMEM_INDEX_TYPE, ...), for every process.
    local kv var
    while IFS= read -r -d '' kv; do
      var=${kv%%=*}
      [[ $var =~ ^VISMEM_[A-Z0-9_]+$ ]] || continue
      [[ $var =~ ^VISMEM_(CLUSTER_.*|HOME|LEDGER_URL|BROKER_.*|DAGSTER_.*|EMBED_.*|SHARD_WORKERS|VENV_BIN)$ ]] && continue
      printf 'export %s=%q\n' "$var" "${kv#*=}"
    done < <(env -0)
  } >"$ENV_FILE"
  umask 022
}

up() {
  local name
  for name in "${PROCESSES[@]}" $(embed_names) $(shard_names); do
    alive "$name" && die "already up ($name runs, pid $(cat "$PIDS/$name.pid")): scripts/cluster.sh down first"
  done
  [ -x "$VENV_BIN/dagster-celery" ] || die "$VENV_BIN/dagster-celery is missing: run make setup first"
  bash "$SERVICES" install || die "PostgreSQL and Redis are needed (see above), then run this again"
  mkdir -p "$CLUSTER_DIR"
  # The postgres user must reach the cluster's folder: no private (0700) folder on the way.
  chmod 0755 "$CLUSTER_DIR"
  mkdir -p "$PIDS" "$LOGS"
  write_env
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  mkdir -p "$DAGSTER_HOME" "$VISMEM_HOME" "$VISMEM_DAGSTER_IO_DIR"
  cp "$REPO/deploy/cluster/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"

  echo "cluster: PostgreSQL on 127.0.0.1:$VISMEM_CLUSTER_PG_PORT ($CLUSTER_DIR/postgres)"
  bash "$SERVICES" pg-start "$CLUSTER_DIR/postgres" "$VISMEM_CLUSTER_PG_PORT" >/dev/null
  bash "$SERVICES" pg-psql "$CLUSTER_DIR/postgres" "$VISMEM_CLUSTER_PG_PORT" -d postgres <<SQL
SELECT 'CREATE ROLE vismem LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vismem') \gexec
ALTER ROLE vismem PASSWORD '$VISMEM_DAGSTER_PG_PASSWORD';
-- the ledger's original_name() reads names.bin in the shared home through the server
GRANT pg_read_server_files TO vismem;
SELECT 'CREATE DATABASE dagster OWNER vismem' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'dagster') \gexec
SELECT 'CREATE DATABASE vismem OWNER vismem' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'vismem') \gexec
SQL
  echo "cluster: Redis on 127.0.0.1:$VISMEM_CLUSTER_REDIS_PORT"
  bash "$SERVICES" redis-start "$CLUSTER_DIR/redis" "$VISMEM_CLUSTER_REDIS_PORT" >/dev/null
  # The instance's tables, once, before several processes open it at the same time.
  (cd "$REPO" && "$VENV_BIN/dagster" instance migrate >"$LOGS/instance-migrate.log" 2>&1) \
    || { tail -n 20 "$LOGS/instance-migrate.log" >&2; die "the Dagster instance on PostgreSQL did not migrate (log: $LOGS/instance-migrate.log)"; }
  # The ledger's pool, set before any run: left to the default, the first runs that start together
  # each insert its row, and the one that loses that race fails (a unique violation in Dagster).
  (cd "$REPO" && "$VENV_BIN/dagster" instance concurrency set vismem_ledger 1 >>"$LOGS/instance-migrate.log" 2>&1) \
    || { tail -n 20 "$LOGS/instance-migrate.log" >&2; die "could not set the vismem_ledger pool's limit (log: $LOGS/instance-migrate.log)"; }

  export PATH="$VENV_BIN:$PATH" PYTHONUNBUFFERED=1
  local celery_yaml="$REPO/deploy/cluster/celery.yaml"
  # The ledger worker: the steps that write the ledger, one at a time (and the default queue `dagster`).
  # One -q with a comma: celery keeps only the last of several -Q that dagster-celery passes on.
  spawn ledger-worker "$VENV_BIN/dagster-celery" worker start -A dagster_celery.app -y "$celery_yaml" \
    -q vismem-ledger,dagster -n vismem-ledger -- --concurrency=1
  for name in $(embed_names); do
    # Each embedding worker: one process (it loads the encoder once), VISMEM_EMBED_THREADS cores.
    VISMEM_ONNX_THREADS=$VISMEM_EMBED_THREADS OMP_NUM_THREADS=$VISMEM_EMBED_THREADS \
      spawn "$name" "$VENV_BIN/dagster-celery" worker start -A dagster_celery.app -y "$celery_yaml" \
      -q vismem-embed -n "vismem-$name" -- --concurrency=1
  done
  for name in $(shard_names); do
    # Each shard worker: one process holding its shard in memory, the queue vismem-shard-J alone.
    spawn "$name" "$VENV_BIN/python" -m vismem_assets.cli shard-worker "${name#shard-worker-}"
  done
  spawn daemon "$VENV_BIN/dagster-daemon" run -w "$REPO/workspace.yaml"
  spawn webserver "$VENV_BIN/dagster-webserver" -w "$REPO/workspace.yaml" -h 127.0.0.1 -p "$VISMEM_CLUSTER_WEB_PORT"

  for name in ledger-worker $(embed_names) $(shard_names); do
    wait_for "$name" 180 worker_ready "$name" \
      || { tail -n 30 "$LOGS/$name.log" >&2; die "$name did not become ready (log: $LOGS/$name.log); scripts/cluster.sh down to stop the rest"; }
  done
  wait_for webserver 180 curl -sf "http://127.0.0.1:$VISMEM_CLUSTER_WEB_PORT/server_info" \
    || { tail -n 30 "$LOGS/webserver.log" >&2; die "the webserver did not answer (log: $LOGS/webserver.log); scripts/cluster.sh down to stop the rest"; }
  alive daemon || { tail -n 30 "$LOGS/daemon.log" >&2; die "dagster-daemon exited (log: $LOGS/daemon.log)"; }
  echo "cluster: up. UI at http://127.0.0.1:$VISMEM_CLUSTER_WEB_PORT; memory home $VISMEM_HOME"
  echo "cluster: in a shell: source $ENV_FILE"
}

down() {
  local name
  for name in webserver daemon $(embed_names) $(shard_names) ledger-worker; do stop_group "$name"; done
  # Workers of an earlier `up` with more embedding workers than this one's setting.
  for pidfile in "$PIDS"/*.pid; do [ -e "$pidfile" ] && stop_group "$(basename "$pidfile" .pid)"; done
  bash "$SERVICES" redis-stop "$CLUSTER_DIR/redis"
  [ -d "$CLUSTER_DIR/postgres" ] && bash "$SERVICES" pg-stop "$CLUSTER_DIR/postgres"
  echo "cluster: down"
}

status() {
  local name pid state any=1
  for name in $(ls "$PIDS" 2>/dev/null | sed -n 's/\.pid$//p'); do
    pid=$(cat "$PIDS/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then state=alive; any=0; else state=dead; fi
    printf '%-16s pid %-8s %s\n' "$name" "$pid" "$state"
  done
  if [ -f "$CLUSTER_DIR/redis/redis.pid" ]; then
    pid=$(cat "$CLUSTER_DIR/redis/redis.pid")
    kill -0 "$pid" 2>/dev/null && { state=alive; any=0; } || state=dead
    printf '%-16s pid %-8s %s\n' redis "$pid" "$state"
  fi
  if [ -f "$CLUSTER_DIR/postgres/data/postmaster.pid" ]; then
    pid=$(head -n 1 "$CLUSTER_DIR/postgres/data/postmaster.pid")
    kill -0 "$pid" 2>/dev/null && { state=alive; any=0; } || state=dead
    printf '%-16s pid %-8s %s\n' postgres "$pid" "$state"
  fi
  [ "$any" = 0 ] || echo "cluster: nothing runs under $CLUSTER_DIR (scripts/cluster.sh up starts it)"
}

demo() {
  [ -f "$ENV_FILE" ] && alive daemon || die "the cluster is not up: scripts/cluster.sh up first"
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  echo "cluster: demo feed into $VISMEM_HOME/inbox/sets; watch it at http://127.0.0.1:$VISMEM_CLUSTER_WEB_PORT"
  cd "$REPO" && exec "$VENV_BIN/python" -m dagster_project.demo feed "$@"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  running) alive daemon ;;
  demo) shift; demo "$@" ;;
  *) die "usage: $0 up | down | status | running | demo [feed options]" ;;
esac
