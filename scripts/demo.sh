#!/usr/bin/env bash
# The main job: `dagster dev` on the vismem code location, with a demo feed that drops
# Fashion-MNIST image sets into the inbox over the first minutes (the last brings two classes
# the memory has never seen). Open http://127.0.0.1:3000 and watch the sensors fire.
set -euo pipefail
cd "$(dirname "$0")/.."
export VISMEM_HOME=${VISMEM_HOME:-$PWD/vismem_home}
export DAGSTER_HOME=${DAGSTER_HOME:-$PWD/.dagster_home}
export VISMEM_QUERY_SET=${VISMEM_QUERY_SET:-queries/fashion-test}
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || cp dagster_project/dagster.yaml "$DAGSTER_HOME/dagster.yaml"

.venv/bin/python -m dagster_project.demo feed &
FEED=$!
trap 'kill $FEED 2>/dev/null || true' EXIT
echo "demo: memory home $VISMEM_HOME, Dagster home $DAGSTER_HOME; UI at http://${DAGSTER_HOST:-127.0.0.1}:${DAGSTER_PORT:-3000}"
.venv/bin/dagster dev -w workspace.yaml -h "${DAGSTER_HOST:-127.0.0.1}" -p "${DAGSTER_PORT:-3000}"
