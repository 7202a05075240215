#!/bin/sh
# Creates .env for docker-compose.yml from .env.example, with a fresh SECRET_KEY and
# POSTGRES_PASSWORD. Leaves an existing .env alone. Run from anywhere.
#
#   deploy/docker/init-env.sh [PATH]      (default: .env next to docker-compose.yml)
set -eu
root="$(cd "$(dirname "$0")/../.." && pwd)"
target="${1:-$root/.env}"
if [ -e "$target" ]; then
  echo "init-env: $target exists; leaving it as it is"
  exit 0
fi
# Letters and digits only: both values end up in URLs and shell-free env files.
random() { LC_ALL=C tr -dc 'A-Za-z0-9' < /dev/urandom | head -c "$1"; }
secret_key="$(random 64)"
postgres_password="$(random 32)"
umask 077
sed -e "s/^SECRET_KEY=.*/SECRET_KEY=$secret_key/" \
    -e "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$postgres_password/" \
    "$root/.env.example" > "$target"
echo "init-env: created $target with a fresh SECRET_KEY and POSTGRES_PASSWORD"
