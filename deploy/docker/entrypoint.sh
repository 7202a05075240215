#!/bin/sh
# The image's entrypoint: `parley SERVICE [ARGS...]`, where SERVICE is web, realtime,
# worker, migrate, manage (or dev, --help, --version). Anything else runs as given, for
# debugging: `docker run --rm -it parley sh`.
#
# PARLEY_WAIT_FOR_DATABASE=SECONDS waits up to that long for DATABASE_URL to accept
# connections before starting (docker-compose.yml sets it for `migrate`, which Podman
# older than 4.6 starts without waiting for Postgres to be healthy).
set -eu

case "${1:-}" in
  web|worker)
    # Gunicorn's and Celery's processes share their Prometheus samples through files
    # in this folder; under /tmp, the one writable path of a read-only root.
    : "${PROMETHEUS_MULTIPROC_DIR:=/tmp/parley-metrics-$1}"
    export PROMETHEUS_MULTIPROC_DIR
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    ;;
esac

case "${1:-}" in
  web|realtime|worker|migrate|manage|dev|-h|--help|--version)
    if [ "${PARLEY_WAIT_FOR_DATABASE:-0}" != 0 ]; then
      parley-probe wait-for-database --timeout "$PARLEY_WAIT_FOR_DATABASE"
    fi
    # exec: the server becomes PID 1 and receives the runtime's SIGTERM itself.
    exec parley "$@"
    ;;
  "")
    exec parley --help
    ;;
  *)
    exec "$@"
    ;;
esac
