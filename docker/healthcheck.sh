#!/bin/sh
# Container HEALTHCHECKs: `healthcheck.sh api` (GET /healthz) or `healthcheck.sh worker` (Celery ping).
set -eu
APP_DIR="$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)"
cd "$APP_DIR"
export PYTHONPATH="$APP_DIR${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

case "${1:-api}" in
  api)
    exec "$PYTHON" -c "import sys, urllib.request; \
r = urllib.request.urlopen('http://127.0.0.1:${KDIGA_API_PORT:-8000}/healthz', timeout=4); \
sys.exit(0 if r.status == 200 else 1)"
    ;;
  worker)
    # The worker answers a remote-control ping within the timeout (it is connected and its loop runs).
    exec "$PYTHON" -m celery -A worker.celery_app inspect ping \
      --destination "kdiga@${HOSTNAME:-$(hostname)}" --timeout "${HEALTHCHECK_TIMEOUT_S:-10}"
    ;;
  *)
    echo "usage: healthcheck.sh api|worker" >&2
    exit 2
    ;;
esac
