#!/bin/sh
# A base image for deploy/Dockerfile made from Debian's packages alone, for a builder that
# cannot reach Docker Hub (an air-gapped one, or this repository's CI):
#
#   deploy/base-image.sh base.tar                      # about 30 s, about 170 MB
#   docker import base.tar registry-proxy-base:bookworm
#   docker build --build-arg BASE_IMAGE=registry-proxy-base:bookworm \
#       -f deploy/Dockerfile -t registry-proxy .
#
# Debian bookworm with python3 (3.11), python3-venv and ca-certificates; no manuals,
# documentation or translations. MIRROR defaults to $DEBIAN_MIRROR or deb.debian.org;
# the security suite comes from $DEBIAN_SECURITY_MIRROR (default: its deb.debian.org
# counterpart). Needs mmdebstrap (Debian package) and root, or its unshare mode.
set -eu
out=${1:?usage: deploy/base-image.sh OUT.tar [MIRROR]}
mirror=${2:-${DEBIAN_MIRROR:-http://deb.debian.org/debian}}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
exec mmdebstrap --quiet --variant=apt \
    --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    bookworm "$out" "$mirror" "deb $security bookworm-security main"
