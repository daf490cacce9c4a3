#!/usr/bin/env bash
# Copies the Grafana dashboards from deploy/grafana/dashboards (the source, mounted by
# docker-compose.yaml) into the Helm chart, which cannot read files outside itself.
# scripts/validate-deploy.sh (and so the test suite) fails while the copies differ.
set -euo pipefail
cd "$(dirname "$0")/.."
src=deploy/grafana/dashboards
dst=helm/taskpod/dashboards
mkdir -p "$dst"
rm -f "$dst"/*.json
cp "$src"/*.json "$dst"/
