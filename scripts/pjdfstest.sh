#!/usr/bin/env bash
# Run the pjdfstest POSIX conformance suite against a fresh ecfs mount.
#
#     sudo scripts/pjdfstest.sh PJDFSTEST_SOURCE_DIR
#
# PJDFSTEST_SOURCE_DIR is a checkout of https://github.com/pjd/pjdfstest
# (not vendored here: it is someone else's suite, and CI has no network
# beyond PyPI and Debian). It is built in place if needed (autoconf,
# automake and a C compiler: `apt-get install autoconf automake gcc make`).
# The suite needs root (it changes owners and modes) and perl's `prove`.
#
# A 4+2 volume is made on six directories under a temporary directory, mounted
# with the checkout's ecfs (this script's repository), `prove -r` runs every
# test from inside the mount, then the volume is unmounted and checked with
# `ecfs fsck`. Exit status: prove's, or fsck's if the suite passed. The mount
# and the temporary directory are removed on any exit.
set -euo pipefail

src=${1:?usage: $0 PJDFSTEST_SOURCE_DIR}
src=$(cd "$src" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${ECFS_PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3
ecfs() { PYTHONPATH="$repo" "$python" -m ecfs "$@"; }

if [ "$(id -u)" != 0 ]; then
    echo "pjdfstest.sh: run as root (the suite changes owners and modes)" >&2
    exit 1
fi
if [ ! -x "$src/pjdfstest" ]; then
    (cd "$src" && autoreconf -ifs && ./configure && make pjdfstest) >/dev/null
fi

work=$(mktemp -d /var/tmp/ecfs-pjdfstest.XXXXXX)
stores=("$work"/s{0..5})
mnt=$work/mnt
cleanup() {
    cd /
    if mountpoint -q "$mnt"; then
        ecfs umount "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" || umount -l "$mnt"
    fi
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "${stores[@]}" "$mnt"
ecfs mkfs --data 4 --parity 2 --allow-shared-domains "${stores[@]}" >/dev/null
ecfs mount "${stores[@]}" "$mnt"

status=0
(cd "$mnt" && prove -r "$src/tests") || status=$?
ecfs umount "$mnt"
if [ "$status" = 0 ]; then
    ecfs fsck "${stores[@]}" || status=$?
fi
exit "$status"
