#!/usr/bin/env bash
# `buf lint` over proto/ (STANDARD and COMMENTS rules, see buf.yaml), with buf from the
# npm registry: no system install needed beyond Node.js.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v npx >/dev/null 2>&1; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
npx --yes @bufbuild/buf@1.75.0 lint
echo "buf lint: clean"
