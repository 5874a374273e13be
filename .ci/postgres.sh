#!/usr/bin/env bash
# Throwaway PostgreSQL on 127.0.0.1 for the tuner's storage test.
#   url=$(.ci/postgres.sh start)     # installs Debian's postgresql if missing, prints postgresql://…
#   export EDGETUNE_TEST_POSTGRES_URL=$url
#   .ci/postgres.sh stop             # stops THIS cluster (pg_ctl on its own data dir) and removes the dir
# State lives in $EDGETUNE_PG_DIR (default /tmp/edgetune-pg); the port is $EDGETUNE_PG_PORT or a free one.
set -euo pipefail
DIR=${EDGETUNE_PG_DIR:-/tmp/edgetune-pg}
DB=edgetune_test

pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$d" ] && [ -x "$d/pg_ctl" ] && echo "$d"
}

as_owner() {  # the server refuses to run as root: run as the data dir's owner
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
  local bin port
  bin=$(pg_bin || true)
  if [ -z "$bin" ]; then
    echo "installing Debian's postgresql…" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
    bin=$(pg_bin) || { echo "error: postgresql installed but no pg_ctl found" >&2; exit 1; }
  fi
  if [ -f "$DIR/port" ] && as_owner "$bin/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
    port=$(cat "$DIR/port")
  else
    rm -rf "$DIR"
    mkdir -p "$DIR"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR"
    port=${EDGETUNE_PG_PORT:-$(free_port)}
    as_owner "$bin/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1 \
      || { cat "$DIR/initdb.log" >&2; exit 1; }
    as_owner "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
      -o "-h 127.0.0.1 -p $port -k $DIR -c fsync=off" start >&2 \
      || { cat "$DIR/server.log" >&2; exit 1; }
    echo "$port" >"$DIR/port"
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$DB"
  fi
  echo "postgresql://postgres@127.0.0.1:$port/$DB"
}

stop() {
  local bin
  bin=$(pg_bin || true)
  if [ -n "$bin" ] && [ -d "$DIR/data" ]; then
    as_owner "$bin/pg_ctl" -D "$DIR/data" -m fast -w stop >&2 || true
  fi
  rm -rf "$DIR"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url) [ -f "$DIR/port" ] && echo "postgresql://postgres@127.0.0.1:$(cat "$DIR/port")/$DB" ;;
  *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
