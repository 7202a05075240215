#!/bin/sh
# Builds the Parley image from this working tree (what `make image` runs), or the
# load-test image (`make image-loadtest`).
#
#   deploy/docker/build-image.sh [EXTRA BUILD OPTIONS...]
#   PARLEY_TARGET=loadtest deploy/docker/build-image.sh
#
# Environment:
#   PARLEY_TARGET    the Dockerfile stage: empty for the Parley image (the last stage,
#                    `runtime`), `loadtest` for Locust with the scenarios of loadtests/
#   PARLEY_IMAGE     tag of the Parley image (default localhost/parley:latest,
#                    docker-compose.yml's)
#   PARLEY_LOADTEST_IMAGE  tag of the load-test image (default localhost/parley-loadtest:latest)
#   CONTAINER_ENGINE podman or docker (default: podman when installed, else docker)
#   EXTRA_CA_FILE    PEM file of extra certificate authorities for pip in the build (a
#                    TLS-inspecting proxy). Default: the certificates this machine's
#                    administrator added under /usr/local/share/ca-certificates/, if any.
#                    EXTRA_CA_FILE=none turns this off.
set -eu
root="$(cd "$(dirname "$0")/../.." && pwd)"
target="${PARLEY_TARGET:-}"
case "$target" in
  "" | runtime) tag="${PARLEY_IMAGE:-localhost/parley:latest}" ;;
  loadtest) tag="${PARLEY_LOADTEST_IMAGE:-localhost/parley-loadtest:latest}" ;;
  *) echo "build-image: PARLEY_TARGET must be empty, runtime or loadtest, not $target" >&2; exit 2 ;;
esac
engine="${CONTAINER_ENGINE:-}"
if [ -z "$engine" ]; then
  if command -v podman >/dev/null 2>&1; then engine=podman; else engine=docker; fi
fi

bundle=""
cleanup() { [ -z "$bundle" ] || rm -f "$bundle"; }
trap cleanup EXIT INT TERM
ca="${EXTRA_CA_FILE:-}"
if [ -z "$ca" ]; then
  for cert in /usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt; do
    [ -f "$cert" ] || continue
    [ -n "$bundle" ] || bundle="$(mktemp "${TMPDIR:-/tmp}/parley-extra-ca.XXXXXX")"
    cat "$cert" >> "$bundle"
  done
  ca="$bundle"
elif [ "$ca" = none ]; then
  ca=""
fi

set -- -f "$root/deploy/docker/Dockerfile" -t "$tag" "$@"
[ -z "$target" ] || set -- --target "$target" "$@"
if [ -n "$ca" ]; then
  echo "build-image: pip in the build trusts the extra CA certificates in ${EXTRA_CA_FILE:-/usr/local/share/ca-certificates/}"
  set -- --secret "id=extra_ca,src=$ca" "$@"
fi
echo "build-image: $engine build -t $tag"
"$engine" build "$@" "$root"
