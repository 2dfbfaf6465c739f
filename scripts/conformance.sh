#!/usr/bin/env bash
# Run standard conformance and data-integrity suites against a fresh ecfs
# mount: pjdfstest (POSIX semantics) and, given an xfstests checkout, fsx
# (random reads, writes, truncates, mmap, fallocate, punch hole, zero
# range, copy range and O_DIRECT, every byte checked against a model).
#
#     sudo scripts/conformance.sh PJDFSTEST_DIR [XFSTESTS_DIR]
#
# PJDFSTEST_DIR is a checkout of https://github.com/pjd/pjdfstest, XFSTESTS_DIR
# one of git://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git (or a mirror);
# neither is vendored here (someone else's suites; CI has no network beyond
# PyPI and Debian). pjdfstest is built in place if needed (autoconf, automake,
# gcc, make: `apt-get install autoconf automake gcc make`); fsx is compiled
# from ltp/fsx.c alone into the temporary directory. Both need root (owners,
# modes, O_DIRECT) and pjdfstest perl's `prove`.
#
# A 4+2 volume is made on six directories under a temporary directory and
# mounted with this repository's ecfs; `prove -r` runs every pjdfstest test
# from inside the mount; fsx runs four ways (large files with close/open and
# cache invalidation, small ones, O_SYNC, O_DIRECT); then the volume is
# unmounted and checked with `ecfs fsck`. Exit status: the first failure's.
# The mount and the temporary directory are removed on any exit.
set -euo pipefail

src=${1:?usage: $0 PJDFSTEST_DIR [XFSTESTS_DIR]}
src=$(cd "$src" && pwd)
xfstests=${2:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${ECFS_PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3
ecfs() { PYTHONPATH="$repo" "$python" -m ecfs "$@"; }

if [ "$(id -u)" != 0 ]; then
    echo "conformance.sh: run as root (the suite changes owners and modes)" >&2
    exit 1
fi
if [ ! -x "$src/pjdfstest" ]; then
    (cd "$src" && autoreconf -ifs && ./configure && make pjdfstest) >/dev/null
fi

work=$(mktemp -d /var/tmp/ecfs-conformance.XXXXXX)
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

fsx=""
if [ -n "$xfstests" ]; then
    # fsx.c needs a config.h (autoconf's, in xfstests): the few answers it uses.
    mkdir "$work/fsx-build"
    printf '#include <%s>\n' assert.h getopt.h >"$work/fsx-build/config.h"
    printf '#define HAVE_%s 1\n' SYS_TYPES_H SYS_STAT_H SYS_STATVFS_H SYS_TIME_H SYS_IOCTL_H \
        SYS_WAIT_H SYS_PARAM_H SYS_MMAN_H FCNTL_H UNISTD_H STRINGS_H ERRNO_H LINUX_FALLOC_H \
        FALLOCATE COPY_FILE_RANGE >>"$work/fsx-build/config.h"
    fsx=$work/fsx-build/fsx
    gcc -O2 -D_GNU_SOURCE -I"$work/fsx-build" -I"$xfstests/src" -I"$xfstests/include" \
        -o "$fsx" "$xfstests/ltp/fsx.c" 2>"$work/fsx-build/gcc.log" ||
        { cat "$work/fsx-build/gcc.log" >&2; exit 1; }
fi

status=0
(cd "$mnt" && prove -r "$src/tests") || status=$?
if [ -n "$fsx" ]; then
    mkdir "$work/fsx-logs"
    for run in "-N 5000 -l 20000000 -o 2000000 -c 50 -f -S 11" "-N 5000 -l 4000000 -o 300000 -S 7" \
               "-N 3000 -y -S 13" "-N 3000 -Z -R -W -r 4096 -w 4096 -t 4096 -S 17"; do
        echo "fsx $run"
        # shellcheck disable=SC2086  # the options are words
        (cd "$mnt" && "$fsx" -q $run -P "$work/fsx-logs" "fsx-${run##* }") || status=$?
    done
fi
ecfs umount "$mnt"
if [ "$status" = 0 ]; then
    ecfs fsck "${stores[@]}" || status=$?
fi
exit "$status"
