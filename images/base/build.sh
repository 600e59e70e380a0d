#!/usr/bin/env bash
# Builds the local base image for every chunk-ops image: Debian bookworm (minbase) with
# Python 3.11, venv and CA certificates, made with debootstrap and `docker import`, so no
# image registry is needed. Production builds pass a registry base instead
# (BASE_IMAGE=python:3.11-slim, or an NVIDIA CUDA runtime for the GPU worker).
#
#   images/base/build.sh [TAG]     default TAG: chunk-ops-base:bookworm
#
# Needs root, debootstrap and a Debian mirror (MIRROR, default: the host's apt source).
# An existing image of that tag is kept (FORCE=1 rebuilds it).
set -euo pipefail

TAG="${1:-chunk-ops-base:bookworm}"
DOCKER="${DOCKER:-docker}"

if [[ "${FORCE:-0}" != 1 ]] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists (FORCE=1 rebuilds it)" >&2
    exit 0
fi

if [[ -z "${MIRROR:-}" ]]; then
    # the first http(s) Debian source of the host (deb822 or one-line format)
    MIRROR="$(grep -rhE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
              | grep -oE 'https?://[^ ]+/debian/?' | head -n1 || true)"
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
fi

ROOTFS="$(mktemp -d /tmp/chunk-ops-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT

echo "debootstrap bookworm from $MIRROR" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >&2
# what a container needs no more of: apt lists, docs, man pages
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/*

tar -C "$ROOTFS" -c . | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$TAG" >&2
echo "$TAG"
