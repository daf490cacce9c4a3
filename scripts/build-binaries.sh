#!/usr/bin/env bash
# Builds taskpod's binaries: the one list of what ships and the one build command, so
# the container image (deploy/Dockerfile) and the end-to-end tests (scripts/test.sh) run
# the same binaries. Quiet unless something fails.
#
#   scripts/build-binaries.sh [--release] [--out DIR]   build (debug by default); with
#                                                       --out, copy the binaries to DIR
#   scripts/build-binaries.sh --list                    print the binaries, one a line
#
# It builds every bin target of the workspace (`--workspace`, so features unify exactly
# as in `cargo nextest run --workspace` and the tests reuse what it built); BINARIES
# must name them all, which tests/tests/deploy.rs checks against `cargo metadata`.
set -euo pipefail
cd "$(dirname "$0")/.."

BINARIES=(taskpod taskpod-api taskpod-worker)

profile=debug
out=
while [ $# -gt 0 ]; do
  case $1 in
    --release) profile=release ;;
    --out)
      [ $# -ge 2 ] || { echo "build-binaries.sh: --out needs a directory" >&2; exit 2; }
      out=$2
      shift
      ;;
    --list)
      printf '%s\n' "${BINARIES[@]}"
      exit 0
      ;;
    *) echo "build-binaries.sh: unknown argument $1 (--release, --out DIR, --list)" >&2; exit 2 ;;
  esac
  shift
done

flags=(--locked --workspace --bins --quiet)
[ "$profile" = release ] && flags+=(--release)
cargo build "${flags[@]}"

target_dir=${CARGO_TARGET_DIR:-target}
for bin in "${BINARIES[@]}"; do
  [ -x "$target_dir/$profile/$bin" ] || { echo "build-binaries.sh: $target_dir/$profile/$bin was not built" >&2; exit 1; }
done
if [ -n "$out" ]; then
  mkdir -p "$out"
  for bin in "${BINARIES[@]}"; do
    cp "$target_dir/$profile/$bin" "$out/$bin"
  done
fi
