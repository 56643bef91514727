#!/bin/sh
# Builds (or checks up to date) the kernel GRE peer VM artifacts: see README.md.
# Usage: tests/kgre/build.sh [--force] [--cache DIR]
# Needs: root (apt-get download into /var/cache/tpb-kgre), python3, dpkg-deb,
# apt-get, iproute2, gcc; qemu-system-x86 only to run the VM, not to build.
set -e
exec python3 "$(dirname "$0")/build.py" "$@"
