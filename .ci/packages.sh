#!/usr/bin/env bash
# Installs the Debian packages the tests need, those that are missing, in one apt-get session
# (so two of them never wait on dpkg's lock):
#   slurm     munge, slurmctld, slurmd and the client commands, without starting the
#             distribution's services (.ci/slurm.sh runs its own daemons);
#   container podman, runc, netavark and debootstrap, for the image of deploy/container and the
#             Kubernetes manifests run in it (.ci/container.sh; runc runs containers where crun
#             cannot; netavark is the network backend podman records in its storage on first use,
#             which it then needs even for --network=none);
#   chromium  the headless browser of docs/images/check-report.sh.
# Usage (as root): .ci/packages.sh slurm|container|chromium...   Prints nothing when all are installed.
set -euo pipefail
slurm=
container=
chromium=
for what in "$@"; do
    case $what in
    slurm)
        for c in munged slurmctld slurmd sbatch; do
            command -v "$c" >/dev/null || slurm=1
        done
        ;;
    container)
        for p in podman runc netavark debootstrap; do
            dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q ' installed$' || container=1
        done
        ;;
    chromium) command -v chromium >/dev/null || chromium=1 ;;
    *)
        echo "usage: $0 slurm|container|chromium..." >&2
        exit 2
        ;;
    esac
done
[ -n "$slurm$container$chromium" ] || exit 0
export DEBIAN_FRONTEND=noninteractive
policy_created=
cleanup() { [ -z "$policy_created" ] || rm -f /usr/sbin/policy-rc.d; }
trap cleanup EXIT
apt-get update -qq
if [ -n "$slurm" ]; then
    # The packages' scripts would start the distribution's services.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_created=1
    fi
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
    cleanup
    policy_created=
fi
if [ -n "$container" ]; then
    # Without recommends: no rootless helpers (uidmap, slirp4netns, fuse-overlayfs), as the
    # tests run podman as root with the kernel's overlay.
    apt-get install -y -qq --no-install-recommends podman runc netavark debootstrap >/dev/null
fi
if [ -n "$chromium" ]; then
    apt-get install -y -qq chromium >/dev/null
fi
