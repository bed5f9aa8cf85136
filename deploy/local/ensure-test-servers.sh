#!/usr/bin/env bash
# Make sure the servers the tests talk to answer: PostgreSQL on 127.0.0.1:5432 and Redis on
# 127.0.0.1:6379. Each is started from the local installation if it is down.
set -euo pipefail

postgres_ready() { pg_isready -q -h 127.0.0.1 -p 5432; }
redis_ready() { redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; }

wait_for() {
  local name=$1 check=$2
  for _ in $(seq 1 30); do
    if $check; then return 0; fi
    sleep 1
  done
  echo "$name did not come up within 30 s." >&2
  exit 1
}

if ! postgres_ready; then
  if ! command -v pg_ctlcluster >/dev/null; then
    echo "PostgreSQL is not answering on 127.0.0.1:5432 and no local cluster can be started." >&2
    echo "Start one, or point STILLHOUSE_TEST_POSTGRES_URL at a server." >&2
    exit 1
  fi
  for version in /etc/postgresql/*; do
    pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start || true
  done
  wait_for PostgreSQL postgres_ready
fi

if ! redis_ready; then
  if ! command -v redis-server >/dev/null; then
    echo "Redis is not answering on 127.0.0.1:6379 and redis-server is not installed." >&2
    echo "Start one, or point STILLHOUSE_TEST_REDIS_URL at a server." >&2
    exit 1
  fi
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_for Redis redis_ready
fi
