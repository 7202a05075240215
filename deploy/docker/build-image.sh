#!/bin/sh
# Builds the Parley image from this working tree (what `make image` runs).
#
#   deploy/docker/build-image.sh [EXTRA BUILD OPTIONS...]
#
# Environment:
#   PARLEY_IMAGE     tag to build (default localhost/parley:latest, docker-compose.yml's)
#   CONTAINER_ENGINE podman or docker (default: podman when installed, else docker)
#   EXTRA_CA_FILE    PEM file of extra certificate authorities for pip in the build (a
#                    TLS-inspecting proxy). Default: the certificates this machine's
#                    administrator added under /usr/local/share/ca-certificates/, if any.
#                    EXTRA_CA_FILE=none turns this off.
set -eu
root="$(cd "$(dirname "$0")/../.." && pwd)"
tag="${PARLEY_IMAGE:-localhost/parley:latest}"
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
if [ -n "$ca" ]; then
  echo "build-image: pip in the build trusts the extra CA certificates in ${EXTRA_CA_FILE:-/usr/local/share/ca-certificates/}"
  set -- --secret "id=extra_ca,src=$ca" "$@"
fi
echo "build-image: $engine build -t $tag"
"$engine" build "$@" "$root"
