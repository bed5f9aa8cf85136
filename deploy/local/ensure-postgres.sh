#!/usr/bin/env bash
# Make sure the PostgreSQL the tests use answers on 127.0.0.1:5432; start the local cluster if it is down.
set -euo pipefail
host=127.0.0.1 port=5432

ready() { pg_isready -q -h "$host" -p "$port"; }

if ready; then exit 0; fi
if ! command -v pg_ctlcluster >/dev/null; then
  echo "PostgreSQL is not answering on $host:$port and no local cluster can be started (pg_ctlcluster missing)." >&2
  echo "Start one, or point STILLHOUSE_TEST_POSTGRES_URL at a server." >&2
  exit 1
fi
for version in /etc/postgresql/*; do
  pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start || true
done
for _ in $(seq 1 30); do
  if ready; then exit 0; fi
  sleep 1
done
echo "PostgreSQL did not come up on $host:$port within 30 s." >&2
exit 1
