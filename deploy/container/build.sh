#!/usr/bin/env bash
# Builds the fapm image from a fapm binary, with no container registry: a Debian root file
# system made by debootstrap (--variant=minbase) is imported as the base image, and the
# Containerfile beside this script copies the binary onto it.
#
#   deploy/container/build.sh FAPM_BINARY [IMAGE]       (as root, with podman and debootstrap)
#   deploy/container/build.sh --base                    only the base image (tests/all.sh makes
#                                                       it in the background)
#
# IMAGE defaults to localhost/fapm:VERSION (VERSION from `FAPM_BINARY --version`), the name the
# manifests of deploy/kubernetes use. The root file system is made once and kept as
# $FAPM_ROOTFS_CACHE/SUITE-minbase.tar (default /var/cache/fapm-container), and imported once as
# localhost/fapm-base:SUITE; later builds only copy the binary (seconds). SUITE is the Debian
# release of this machine (bookworm elsewhere; FAPM_DEBIAN_SUITE=NAME to choose), so that its
# glibc is the one the binary was linked against, or newer. FAPM_DEBIAN_MIRROR=URL sets the
# mirror (default http://deb.debian.org/debian). Prints the image's name on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fail() {
    echo "error: $*" >&2
    exit 1
}
if [ $# -lt 1 ] || [ $# -gt 2 ] || { [ "$1" = --base ] && [ $# -ne 1 ]; }; then
    echo "usage: $0 FAPM_BINARY [IMAGE] | --base" >&2
    exit 2
fi
fapm=
if [ "$1" != --base ]; then
    fapm=$(realpath "$1")
    if [ ! -f "$fapm" ] || [ ! -x "$fapm" ]; then
        fail "$1 is not an executable file"
    fi
    version=$("$fapm" --version | awk '{ print $2 }')
    [ -n "$version" ] || fail "$fapm --version printed no version"
    image=${2:-localhost/fapm:$version}
fi
suite=${FAPM_DEBIAN_SUITE:-}
if [ -z "$suite" ]; then
    # shellcheck disable=SC1091 # the machine's, read if there
    suite=$(. /etc/os-release 2>/dev/null && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}") || true
    suite=${suite:-bookworm}
fi
mirror=${FAPM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${FAPM_ROOTFS_CACHE:-/var/cache/fapm-container}
rootfs=$cache/$suite-minbase.tar
base=localhost/fapm-base:$suite
command -v podman >/dev/null || fail "podman is not installed (Debian: apt-get install podman debootstrap)"

tmp=
cleanup() { [ -z "$tmp" ] || rm -rf "$tmp"; }
trap cleanup EXIT

if ! podman image exists "$base"; then
    if [ ! -f "$rootfs" ]; then
        command -v debootstrap >/dev/null || fail "debootstrap is not installed (Debian: apt-get install debootstrap)"
        mkdir -p "$cache"
        tmp=$(mktemp -d "$cache/rootfs.XXXXXX")
        echo "build.sh: debootstrap --variant=minbase $suite (once; kept as $rootfs)" >&2
        if ! debootstrap --variant=minbase "$suite" "$tmp/root" "$mirror" >"$tmp/log" 2>&1; then
            tail -n 20 "$tmp/log" >&2
            fail "debootstrap of $suite from $mirror failed"
        fi
        # What a container never reads: package lists and caches, documentation, logs.
        rm -rf "$tmp"/root/var/lib/apt/lists/* "$tmp"/root/var/cache/apt/* \
            "$tmp"/root/var/cache/debconf/*-old "$tmp"/root/var/log/* \
            "$tmp"/root/usr/share/doc/* "$tmp"/root/usr/share/man/* "$tmp"/root/usr/share/info/* \
            "$tmp"/root/usr/share/locale/*
        tar --numeric-owner -C "$tmp/root" -cf "$tmp/rootfs.tar" .
        mv "$tmp/rootfs.tar" "$rootfs"
        rm -rf "$tmp"
        tmp=
    fi
    echo "build.sh: importing $rootfs as $base" >&2
    podman import --quiet --change 'CMD ["/bin/sh"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$rootfs" "$base" >/dev/null
fi

if [ -z "$fapm" ]; then
    echo "$base"
    exit 0
fi
# The build context: the binary alone. No intermediate images (--layers=false), and the image
# this one replaces under its name is removed, so that rebuilds leave nothing behind.
tmp=$(mktemp -d)
cp "$fapm" "$tmp/fapm"
old=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null) || old=
podman build --quiet --layers=false --pull=never --network=none -f "$here/Containerfile" \
    --build-arg "BASE=$base" -t "$image" "$tmp" >/dev/null
new=$(podman image inspect --format '{{.Id}}' "$image")
if [ -n "$old" ] && [ "$old" != "$new" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true # still used by a container: left
fi
echo "$image"
