#!/usr/bin/env bash
# The first command on a fresh Debian machine: installs what `taskpod dev` needs and is
# missing (PostgreSQL's server binaries, Redis, a C toolchain for the build), then runs
# `taskpod dev` with this script's arguments, for example `scripts/dev.sh --once`.
#
# It runs from the repository root, so the default data folder is `.taskpod/dev` there
# (git-ignored) and a relative --data-dir is taken from the root too.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

log() {
  printf 'dev.sh: %s\n' "$*" >&2
}

# The same places `taskpod dev` looks: pg_config's bindir, Debian's per-major folders
# (not on PATH), then PATH.
have_postgres_server() {
  local bindir
  if bindir="$(pg_config --bindir 2>/dev/null)" && [[ -x "${bindir}/initdb" ]]; then
    return 0
  fi
  if compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    return 0
  fi
  command -v initdb >/dev/null 2>&1
}

as_root() {
  if [[ "${EUID}" -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    log "need root to run: $* (and sudo is not installed)"
    exit 1
  fi
}

missing=()
have_postgres_server || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)

if ((${#missing[@]} > 0)); then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "missing ${missing[*]}, and there is no apt-get: install them with your package manager"
    exit 1
  fi
  log "installing ${missing[*]}"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [[ -x "${HOME:-}/.cargo/bin/cargo" ]]; then
    PATH="${HOME}/.cargo/bin:${PATH}"
  else
    log "cargo not found: install Rust from https://rustup.rs, then run this again"
    exit 1
  fi
fi

# `taskpod dev` runs the server binaries it finds beside itself: build them all.
cargo build --release --bins -p taskpod-cli -p taskpod-api -p taskpod-worker
exec cargo run --release -p taskpod-cli --bin taskpod -- dev "$@"
