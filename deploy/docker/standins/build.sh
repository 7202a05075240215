#!/usr/bin/env bash
# Builds local stand-ins for the public images that deploy/docker/Dockerfile and
# docker-compose.yml name, from Debian bookworm packages, for machines that cannot pull
# from a registry (see docs/containers.md). Nothing here is used where images can be
# pulled: there, `docker compose up` fetches the real ones.
#
#   deploy/docker/standins/build.sh [--force] [base|services|all]   (default: all)
#
#   base      python:3.11-slim        debootstrap --variant=minbase + python3 (~1.5 min)
#   services  postgres, redis, nginx  built FROM the base with Debian's packages
#
# The stand-ins carry Debian's versions (Python 3.11, PostgreSQL 15, Redis 7.0,
# nginx 1.22) under the upstream names the files use, and mimic only the parts of the
# upstream images that Parley's files rely on (their environment variables, data paths,
# commands and health-check tools).
#
# Environment: PODMAN (default podman), DEBIAN_MIRROR (default http://deb.debian.org/debian),
# and the image names, which must match docker-compose.yml's defaults.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PODMAN="${PODMAN:-podman}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_LOCAL=localhost/debian-python:bookworm
PYTHON_IMAGE="${PYTHON_IMAGE:-docker.io/library/python:3.11-slim}"
POSTGRES_IMAGE="${POSTGRES_IMAGE:-docker.io/library/postgres:16-bookworm}"
REDIS_IMAGE="${REDIS_IMAGE:-docker.io/library/redis:7.2-bookworm}"
NGINX_IMAGE="${NGINX_IMAGE:-docker.io/library/nginx:1.27-bookworm}"

force=false
what=all
for arg in "$@"; do
  case "$arg" in
    --force) force=true ;;
    base|services|all) what="$arg" ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

rootfs=""
trap '[ -z "$rootfs" ] || rm -rf "$rootfs"' EXIT
say() { printf '==> %s\n' "$*" >&2; }
have() { ! $force && "$PODMAN" image exists "$1"; }

build_base() {
  if have "$PYTHON_IMAGE"; then
    say "$PYTHON_IMAGE exists (--force rebuilds it)"
    return
  fi
  command -v debootstrap >/dev/null || { echo "build.sh: debootstrap is not installed" >&2; exit 1; }
  rootfs="$(mktemp -d "${TMPDIR:-/tmp}/parley-rootfs.XXXXXX")"
  say "debootstrap bookworm into $rootfs (about 1.5 minutes)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >/dev/null
  # Like python:3.11-slim: pip may install into the system, `python` is python3.
  rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
  ln -sf python3 "$rootfs/usr/bin/python"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  say "importing $BASE_LOCAL"
  tar -C "$rootfs" -c . | "$PODMAN" import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$BASE_LOCAL" >/dev/null
  "$PODMAN" tag "$BASE_LOCAL" "$PYTHON_IMAGE"
}

build_service() {  # name image
  if have "$2"; then
    say "$2 exists (--force rebuilds it)"
    return
  fi
  say "building $2 (stand-in: $1 from Debian packages)"
  "$PODMAN" build --pull=never --quiet --build-arg "BASE=$PYTHON_IMAGE" \
    --label org.opencontainers.image.description="Parley test stand-in: Debian bookworm's $1" \
    -t "$2" "$here/$1" >/dev/null
}

case "$what" in
  base) build_base ;;
  services)
    build_service postgres "$POSTGRES_IMAGE"
    build_service redis "$REDIS_IMAGE"
    build_service nginx "$NGINX_IMAGE"
    ;;
  all)
    build_base
    build_service postgres "$POSTGRES_IMAGE"
    build_service redis "$REDIS_IMAGE"
    build_service nginx "$NGINX_IMAGE"
    ;;
esac
