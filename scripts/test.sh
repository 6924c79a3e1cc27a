#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the package and its test
# dependencies into .venv, makes sure PostgreSQL and Redis answer on 127.0.0.1
# (starting them, or installing them with apt-get, when they do not), then runs
# the linters and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet -e ".[test]"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() {  # wait_for SECONDS CMD...: poll a readiness check with a deadline
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then return 1; fi
    sleep 0.5
  done
}

ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then return; fi
  if ! command -v pg_ctlcluster >/dev/null; then
    echo "== installing PostgreSQL"
    apt_install postgresql postgresql-client
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "== starting PostgreSQL $version"
  if ! grep -q "^host all all 127.0.0.1/32 trust" "/etc/postgresql/$version/main/pg_hba.conf"; then
    # Tests connect as postgres over TCP without a password, as on the developers' machines.
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' \
      "/etc/postgresql/$version/main/pg_hba.conf"
  fi
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for 60 pg_isready -q -h 127.0.0.1 -p 5432 || { echo "PostgreSQL did not start"; exit 1; }
}

ensure_redis() {
  if command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    return
  fi
  if ! command -v redis-server >/dev/null; then
    echo "== installing Redis"
    apt_install redis-server
  fi
  echo "== starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for 30 redis-cli -h 127.0.0.1 -p 6379 ping || { echo "Redis did not start"; exit 1; }
}

ensure_postgres
ensure_redis

echo "== ruff"
.venv/bin/ruff check src tests
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest -p no:cacheprovider "$@"
