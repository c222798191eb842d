#!/usr/bin/env bash
# The services the cluster profile needs (deploy/cluster/): PostgreSQL and Redis from Debian.
#
#   scripts/services.sh install                 install the Debian packages postgresql and redis-server
#                                               where missing (as root; otherwise say what to run)
#   scripts/services.sh pg-start DIR PORT       a throwaway PostgreSQL cluster in DIR (initdb the first
#                                               time), on 127.0.0.1:PORT, its socket in DIR
#   scripts/services.sh pg-stop DIR             stop it (by the pid in DIR/data/postmaster.pid)
#   scripts/services.sh pg-psql DIR PORT [ARGS] psql on it as its superuser (through the socket)
#   scripts/services.sh redis-start DIR PORT    a Redis on 127.0.0.1:PORT, its files and pid in DIR
#   scripts/services.sh redis-stop DIR          stop it (by the pid in DIR/redis.pid)
#
# PostgreSQL refuses to run as root: when we are root the cluster runs as the `postgres` user, in
# a folder chowned to it (DIR's parents must be searchable by others: not under a 0700 folder).
# Local (socket) connections are trusted; TCP connections need a password (scram-sha-256).
set -euo pipefail

die() { echo "services: $*" >&2; exit 1; }

install_packages() {
  local missing=()
  compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || missing+=(postgresql)
  command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
  [ ${#missing[@]} = 0 ] && return 0
  if [ "$(id -u)" = 0 ]; then
    echo "services: installing the Debian packages ${missing[*]} (the cluster profile and its tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
      apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
      || die "apt-get could not install ${missing[*]}; install them by hand, then run this again"
    # Debian starts a freshly installed service; the cluster runs its own, on its own ports.
    if command -v service >/dev/null; then
      for s in "${missing[@]}"; do service "$s" stop >/dev/null 2>&1 || true; done
    fi
  else
    echo "services: ${missing[*]} missing (the cluster profile needs them). Install with:" >&2
    echo "          sudo apt-get install ${missing[*]}" >&2
    return 1
  fi
}

pg_bin() {
  local found
  found=$(compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" | sort -V | tail -n 1) \
    || die "PostgreSQL is not installed: run scripts/services.sh install as root (or sudo apt-get install postgresql)"
  dirname "$found"
}

# Run a PostgreSQL binary as the cluster's owner: `postgres` when we are root, else ourselves.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_start() {
  local dir=$1 port=$2 bin
  bin=$(pg_bin)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$dir"
    chmod 0700 "$dir"
    runuser -u postgres -- test -x "$dir" \
      || die "the postgres user cannot enter $dir: pick a folder whose parents others may search (chmod o+x), e.g. under /tmp or the repository"
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$dir/data" -U postgres -E UTF8 --auth-local=trust --auth-host=scram-sha-256 \
      >"$dir/initdb.log" 2>&1 || { tail -n 20 "$dir/initdb.log" >&2; die "initdb failed in $dir/data (log: $dir/initdb.log)"; }
  fi
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null \
    || { tail -n 20 "$dir/server.log" >&2; die "PostgreSQL did not start on 127.0.0.1:$port (log: $dir/server.log)"; }
  head -n 1 "$dir/data/postmaster.pid"
}

pg_stop() {
  local dir=$1 bin
  [ -f "$dir/data/postmaster.pid" ] || return 0
  bin=$(pg_bin)
  as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1 || return 0  # not running (a stale pid file)
  as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
}

pg_psql() {
  local dir=$1 port=$2 bin
  shift 2
  bin=$(pg_bin)
  dir=$(cd "$dir" && pwd)
  as_pg "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres "$@"
}

redis_start() {
  local dir=$1 port=$2 pid
  command -v redis-server >/dev/null \
    || die "redis-server is not installed: run scripts/services.sh install as root (or sudo apt-get install redis-server)"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  # In the foreground of its own session (so stop can find it by pid), no persistence: a broker.
  setsid redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save "" --appendonly no \
    --daemonize no --protected-mode yes --logfile "$dir/redis.log" </dev/null >/dev/null 2>&1 &
  pid=$!
  echo "$pid" >"$dir/redis.pid"
  for _ in $(seq 100); do
    if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then echo "$pid"; return 0; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  tail -n 20 "$dir/redis.log" >&2 2>/dev/null || true
  die "Redis did not answer on 127.0.0.1:$port (log: $dir/redis.log)"
}

redis_stop() {
  local dir=$1 pid
  [ -f "$dir/redis.pid" ] || return 0
  pid=$(cat "$dir/redis.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$dir/redis.pid"
}

cmd=${1:-}
shift || true
case "$cmd" in
  install) install_packages ;;
  pg-start) [ $# = 2 ] || die "usage: $0 pg-start DIR PORT"; pg_start "$@" ;;
  pg-stop) [ $# = 1 ] || die "usage: $0 pg-stop DIR"; pg_stop "$@" ;;
  pg-psql) [ $# -ge 2 ] || die "usage: $0 pg-psql DIR PORT [psql args]"; pg_psql "$@" ;;
  redis-start) [ $# = 2 ] || die "usage: $0 redis-start DIR PORT"; redis_start "$@" ;;
  redis-stop) [ $# = 1 ] || die "usage: $0 redis-stop DIR"; redis_stop "$@" ;;
  *) die "usage: $0 install | pg-start DIR PORT | pg-stop DIR | pg-psql DIR PORT [ARGS] | redis-start DIR PORT | redis-stop DIR" ;;
esac
