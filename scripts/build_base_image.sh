#!/usr/bin/env bash
# Builds a local Python base image from Debian packages, for machines that reach Debian's
# package mirror but no image registry (so `FROM python:3.11-slim` cannot be pulled).
#
#   sudo scripts/build_base_image.sh                  # -> nextchar-base:bookworm (python3.11)
#   docker build --build-arg BASE_IMAGE=nextchar-base:bookworm -f docker/Dockerfile .
#
# debootstrap --variant=minbase bookworm + python3, python3-venv and ca-certificates, pruned of
# apt caches and docs, then `docker import`. Re-running is a no-op while the tag exists
# (REBUILD=1 forces). Needs root and a running Docker engine; installs Debian's debootstrap
# when it is missing.
set -euo pipefail

tag=${1:-nextchar-base:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [[ -z ${REBUILD:-} ]] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists (REBUILD=1 to rebuild)"
  exit 0
fi
# A fresh machine has no debootstrap: install Debian's, as scripts/docker_engine.sh does docker.io.
if ! command -v debootstrap >/dev/null; then
  [[ $(id -u) == 0 ]] || { echo "needs debootstrap (apt-get install -y debootstrap) or root to install it" >&2; exit 1; }
  echo "base image: installing Debian's debootstrap" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
fi

root=$(mktemp -d /tmp/nextchar-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"

# What a container never needs: package caches, docs, man pages, locales, byte-code caches.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/usr/share/locale/* "$root"/var/log/*
find "$root"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +

tar --numeric-owner -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  - "$tag" >/dev/null
echo "built $tag: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'), \
$(docker run --rm "$tag" python3 --version)"
