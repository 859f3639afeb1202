#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on loopback for the `postgres`-marked tests; print the URL to use.
#
#   export ROUTET2I_TEST_PG_URL="$(scripts/ensure_postgres.sh)"
#
# 1. Something already answers on 127.0.0.1:$PORT (default 5432): use it (and create database `test`).
# 2. Else install Debian's `postgresql` package if needed (apt-get, as root) and start a private cluster
#    (trust auth, listening on 127.0.0.1 only) in $ROUTET2I_PG_DIR (default /var/tmp/routet2i-pg).
# Only the URL goes to stdout; progress and errors go to stderr. Exit 1, with the reason, when impossible:
# the tests then skip with a message naming ROUTET2I_TEST_PG_URL.
set -euo pipefail

PORT="${ROUTET2I_PG_PORT:-5432}"
DATADIR="${ROUTET2I_PG_DIR:-/var/tmp/routet2i-pg}"
URL="postgresql://postgres@127.0.0.1:${PORT}/test"

say() { echo "ensure_postgres: $*" >&2; }
die() { say "cannot provide PostgreSQL: $*"; exit 1; }

answers() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h 127.0.0.1 -p "$PORT" -t 2
  else
    (exec 3<>"/dev/tcp/127.0.0.1/${PORT}") 2>/dev/null
  fi
}

pg_bin() {  # the newest installed server binaries
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@";
  elif [ "$(id -u)" = 0 ] && command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@";
  elif [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$(printf '%q ' "$@")";
  else "$@"; fi  # an ordinary user runs its own cluster
}

ensure_test_db() {
  command -v psql >/dev/null 2>&1 || return 0
  if ! psql -w -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" \
      2>/dev/null | grep -q 1; then
    psql -w -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -qc "CREATE DATABASE test" >/dev/null 2>&1 \
      || say "could not create database 'test' (does user postgres exist with trust auth?)"
  fi
}

if answers; then
  ensure_test_db
  echo "$URL"
  exit 0
fi

BIN="$(pg_bin || true)"
if [ -z "$BIN" ]; then
  command -v apt-get >/dev/null 2>&1 || die "nothing answers on 127.0.0.1:${PORT} and apt-get is not available to install Debian's postgresql package"
  [ "$(id -u)" = 0 ] || die "nothing answers on 127.0.0.1:${PORT} and installing postgresql needs root (run: sudo apt-get install -y postgresql)"
  say "installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql; } >&2 \
    || die "apt-get install postgresql failed (is a package mirror reachable?)"
  BIN="$(pg_bin || true)"
  [ -n "$BIN" ] || die "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"
fi

if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || die "user 'postgres' missing (the postgresql package creates it)"
  mkdir -p "$DATADIR" && chown postgres "$DATADIR" && chmod 700 "$DATADIR"
else
  mkdir -p "$DATADIR" && chmod 700 "$DATADIR"
fi
if [ ! -f "$DATADIR/PG_VERSION" ]; then
  say "creating a loopback-only cluster in $DATADIR"
  as_postgres "$BIN/initdb" -D "$DATADIR" -U postgres -A trust -E UTF8 >/dev/null \
    || die "initdb failed in $DATADIR"
fi
SOCKDIR="$DATADIR"
say "starting PostgreSQL on 127.0.0.1:${PORT}"
as_postgres "$BIN/pg_ctl" -D "$DATADIR" -l "$DATADIR/server.log" -w -t 30 \
  -o "-c listen_addresses=127.0.0.1 -p ${PORT} -c unix_socket_directories=${SOCKDIR}" start >/dev/null \
  || die "pg_ctl start failed; see $DATADIR/server.log"
for _ in $(seq 1 30); do answers && break; sleep 0.5; done
answers || die "the server started but does not answer on 127.0.0.1:${PORT}; see $DATADIR/server.log"
ensure_test_db
echo "$URL"
