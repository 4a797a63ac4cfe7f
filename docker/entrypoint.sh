#!/bin/sh
# One entrypoint for the kdiga images (design.md §2, scale-out column).
#   migrate  wait for the database, run `alembic upgrade head`, create the bootstrap admin key, exit
#   api      the REST API under uvicorn (migrations are the `migrate` service's job)
#   worker   one Celery worker process: concurrency 1, one per GPU (CUDA_VISIBLE_DEVICES per container)
#   flower   the Celery monitor (when flower is installed in the image)
# Anything else is run as a command. Configuration is the KDIGA_* environment (kdiga_service/settings.py).
set -eu

APP_DIR="$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)"
cd "$APP_DIR"
export PYTHONPATH="$APP_DIR${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

cmd="${1:-api}"
[ $# -gt 0 ] && shift

case "$cmd" in
  migrate)
    exec "$PYTHON" "$APP_DIR/docker/wait_and_migrate.py" "$@"
    ;;
  api)
    # Several uvicorn workers: prometheus_client's multiprocess mode makes /metrics add up their
    # counters (a folder of per-process files, emptied at each start).
    export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-/tmp/kdiga-prometheus}"
    rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    exec "$PYTHON" -m uvicorn api.main:create_app --factory \
      --host "${KDIGA_API_HOST:-0.0.0.0}" --port "${KDIGA_API_PORT:-8000}" \
      --workers "${KDIGA_API_WORKERS:-2}" --proxy-headers --forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-127.0.0.1}" \
      --timeout-graceful-shutdown 20 --no-server-header "$@"
    ;;
  worker)
    exec "$PYTHON" -m worker \
      --queues "${KDIGA_WORKER_QUEUES:-gpu}" \
      --concurrency "${KDIGA_WORKER_CONCURRENCY:-1}" \
      --pool "${KDIGA_WORKER_POOL:-prefork}" \
      --hostname "kdiga@${HOSTNAME:-$(hostname)}" "$@"
    ;;
  flower)
    exec "$PYTHON" -m celery --broker "${KDIGA_BROKER_URL:?KDIGA_BROKER_URL is required}" flower \
      --port="${FLOWER_PORT:-5555}" "$@"
    ;;
  *)
    exec "$cmd" "$@"
    ;;
esac
