#!/usr/bin/env bash
# One entry point per role; docker compose, the Helm chart and the cluster test all run these.
#   entrypoint.sh ray-head     Ray head node: GCS, job API (dashboard) and metrics export
#   entrypoint.sh ray-worker   Ray worker node joining $RAY_HEAD_ADDRESS (host:port of the GCS)
#   entrypoint.sh gateway      the REST gateway; submits studies as Ray jobs to $SURGE_RAY_JOBS_ADDRESS
# Settings come from the environment (defaults in brackets):
#   RAY_GCS_PORT [6379] RAY_DASHBOARD_PORT [8265] RAY_METRICS_PORT [8080] RAY_NUM_CPUS [all] RAY_NUM_GPUS [all]
#   RAY_NODE_IP [auto] RAY_TEMP_DIR [Ray default]  SURGE_HOST [0.0.0.0] SURGE_PORT [8000] SURGE_STORE [/models]
# Ray's token authentication: every node and the gateway get the same RAY_AUTH_TOKEN (RAY_AUTH_MODE=token).
set -euo pipefail
role="${1:-}"
shift || true

ray_common=(--metrics-export-port="${RAY_METRICS_PORT:-8080}" --disable-usage-stats)
[[ -n "${RAY_NUM_CPUS:-}" ]] && ray_common+=(--num-cpus="$RAY_NUM_CPUS")
[[ -n "${RAY_NUM_GPUS:-}" ]] && ray_common+=(--num-gpus="$RAY_NUM_GPUS")
[[ -n "${RAY_NODE_IP:-}" ]] && ray_common+=(--node-ip-address="$RAY_NODE_IP")
[[ -n "${RAY_TEMP_DIR:-}" ]] && ray_common+=(--temp-dir="$RAY_TEMP_DIR")

case "$role" in
  ray-head)
    # --block keeps the container's main process alive for as long as the node runs.
    exec ray start --head --block \
      --port="${RAY_GCS_PORT:-6379}" \
      --dashboard-host=0.0.0.0 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
      "${ray_common[@]}" "$@"
    ;;
  ray-worker)
    : "${RAY_HEAD_ADDRESS:?set RAY_HEAD_ADDRESS to the GCS address of the head, e.g. ray-head:6379}"
    exec ray start --block --address="$RAY_HEAD_ADDRESS" "${ray_common[@]}" "$@"
    ;;
  gateway)
    exec surge serve --host "${SURGE_HOST:-0.0.0.0}" --port "${SURGE_PORT:-8000}" \
      --store "${SURGE_STORE:-/models}" "$@"
    ;;
  *)
    echo "usage: $0 {ray-head|ray-worker|gateway} [extra args]" >&2
    exit 2
    ;;
esac
