#!/usr/bin/env bash
# Runs every test: installs what is missing, starts a throwaway PostgreSQL and Redis on
# free loopback ports, runs the whole workspace's tests against them, and stops the
# servers however the tests end. Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh

ensure_packages
ensure_deploy_tools

work=$(mktemp -d /tmp/taskpod-test.XXXXXX)
chmod 0755 "$work"
cleanup() {
  stop_postgres "$work/postgres"
  stop_redis "$work/redis"
  rm -rf "$work"
}
trap cleanup EXIT

pg_port=$(free_port)
# Durability off: these databases live for one run. Never use these for benchmarks.
start_postgres "$work/postgres" "$pg_port" \
  fsync=off synchronous_commit=off full_page_writes=off max_connections=400 shared_preload_libraries=pg_stat_statements
redis_port=$(free_port)
start_redis "$work/redis" "$redis_port"

# sqlx::test makes a fresh database per test from this server.
export DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
export TASKPOD_TEST_REDIS_URL="redis://127.0.0.1:$redis_port"
echo "postgres on 127.0.0.1:$pg_port, redis on 127.0.0.1:$redis_port" >&2

# The end-to-end tests run the real binaries; build them with the same profile first,
# with the script the container image is built with.
scripts/build-binaries.sh
if cargo nextest --version >/dev/null 2>&1; then
  # The crash storm (tests/tests/crash_storm.rs) and the network partitions
  # (tests/tests/network_partitions.rs, two clusters at a time) run alone, after the
  # rest: their bounds (exec overlap, takeover, the hang detector) assume two cores are
  # not also running the suite.
  status=0
  cargo nextest run --workspace --no-fail-fast \
    -E 'not (binary(crash_storm) | binary(network_partitions))' "$@" || status=$?
  cargo nextest run -p taskpod-e2e --test network_partitions --no-fail-fast --no-tests=pass \
    --test-threads 2 "$@" || status=$?
  cargo nextest run -p taskpod-e2e --test crash_storm --no-fail-fast --no-tests=pass "$@" || status=$?
  exit "$status"
else
  cargo test --workspace --no-fail-fast "$@"
fi
