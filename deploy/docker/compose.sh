#!/bin/sh
# Runs docker-compose.yml with Docker Compose, or with podman-compose where there is no
# Docker engine (what `make up`, `make down` and `make logs` call).
#
#   deploy/docker/compose.sh ARGS...        e.g. up -d | down | logs -f --tail=100 | ps
#
# COMPOSE="..." chooses the tool explicitly.
set -eu
cd "$(dirname "$0")/../.."
if [ -n "${COMPOSE:-}" ]; then
  # shellcheck disable=SC2086 # COMPOSE may be two words ("docker compose")
  exec $COMPOSE "$@"
fi
if docker compose version >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  exec docker compose "$@"
fi
for tool in podman-compose "$HOME/.cache/parley/container-tools/bin/podman-compose"; do
  if command -v "$tool" >/dev/null 2>&1; then
    exec "$tool" "$@"
  fi
done
echo "compose.sh: neither Docker Compose (with a running engine) nor podman-compose is" \
  "installed; see docs/containers.md" >&2
exit 1
