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
# documentation or translations. The certificate authorities this machine adds to
# Debian's (/usr/local/share/ca-certificates/*.crt: an internal package index, a
# TLS-inspecting proxy) are added too, so the build's pip trusts what this machine trusts.
# MIRROR defaults to $DEBIAN_MIRROR or deb.debian.org; the security suite comes from
# $DEBIAN_SECURITY_MIRROR (default: its deb.debian.org counterpart). Needs mmdebstrap
# (Debian package) and root.
set -eu
out=${1:?usage: deploy/base-image.sh OUT.tar [MIRROR]}
mirror=${2:-${DEBIAN_MIRROR:-http://deb.debian.org/debian}}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
local_cas=/usr/local/share/ca-certificates
set --
if ls "$local_cas"/*.crt >/dev/null 2>&1; then
    set -- --customize-hook="copy-in $local_cas /usr/local/share" \
        --customize-hook='chroot "$1" update-ca-certificates --fresh >/dev/null 2>&1'
fi
exec mmdebstrap --quiet --variant=apt \
    --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    "$@" \
    bookworm "$out" "$mirror" "deb $security bookworm-security main"
