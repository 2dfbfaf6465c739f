#!/usr/bin/env bash
# Install everything ecfs needs to build, run and test, on Debian.
#
# Idempotent, and safe with no stdin (CI): system packages are installed only
# when missing, the venv (.venv in the repo) is created only when missing, and
# `pip install -e '.[test]'` is skipped when pyproject.toml has not changed
# since the last successful install (ECFS_FORCE_INSTALL=1 forces it).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

say() { printf '[install] %s\n' "$*"; }

# --- privileges -------------------------------------------------------------
sudo_cmd=()
if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        if [[ -t 0 ]]; then sudo_cmd=(sudo); else sudo_cmd=(sudo -n); fi
    fi
fi

apt_updated=0
apt_install() {
    # apt_install PKG...: install Debian packages, running `apt-get update` once.
    if ! command -v apt-get >/dev/null 2>&1; then
        say "apt-get not found: please install $* by hand"
        return 1
    fi
    if [[ $EUID -ne 0 && ${#sudo_cmd[@]} -eq 0 ]]; then
        say "not root and no sudo: please install $* by hand"
        return 1
    fi
    if [[ $apt_updated -eq 0 ]]; then
        say "apt-get update"
        "${sudo_cmd[@]}" apt-get update -qq
        apt_updated=1
    fi
    say "apt-get install $*"
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- system packages --------------------------------------------------------
python=${PYTHON:-python3}
missing=()
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists fuse3; then
    missing+=(libfuse3-dev)
fi
# pyfuse3 is built from source: it needs a C compiler and the Python headers.
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
if ! "$python" -c 'import os, sysconfig, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        2>/dev/null; then
    missing+=(python3-dev)
fi
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi
# scripts/pyfuse3/install.sh patches pyfuse3's source (scripts/pyfuse3/*.patch).
command -v patch >/dev/null 2>&1 || command -v git >/dev/null 2>&1 || missing+=(patch)

if [[ ${#missing[@]} -gt 0 ]]; then
    apt_install "${missing[@]}"
else
    say "system packages present (fuse3, libfuse3-dev, pkg-config, gcc, Python headers)"
fi

# fio is only used by the benchmarks: never fail the install because of it.
if ! command -v fio >/dev/null 2>&1; then
    apt_install fio || say "could not install fio (only needed for benchmarks); continuing"
fi

# rsync is one of the real programs the tests run on a mount.
if ! command -v rsync >/dev/null 2>&1; then
    apt_install rsync || say "could not install rsync; its test will be skipped"
fi

# tmux runs `ecfs iostat` in a real terminal in its test (tests/test_iostat.py).
if ! command -v tmux >/dev/null 2>&1; then
    apt_install tmux || say "could not install tmux; the iostat terminal test will be skipped"
fi

# groff and man render the man pages (tests/test_manpages.py checks them).
if ! command -v groff >/dev/null 2>&1 || ! command -v man >/dev/null 2>&1; then
    apt_install man-db groff-base || say "could not install man-db/groff-base; man page rendering tests will be skipped"
fi

[[ -e /dev/fuse ]] || say "warning: /dev/fuse does not exist; mount tests will be skipped"

# --- Python environment -----------------------------------------------------
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    say "ecfs needs Python >= 3.11; $python is $("$python" --version 2>&1)"
    exit 1
}

venv=$repo/.venv
if [[ ! -x $venv/bin/python ]]; then
    say "creating virtual environment $venv"
    "$python" -m venv "$venv"
else
    say "virtual environment $venv exists"
fi

# pyfuse3 3.5.0 has no fallocate handler and copies requests and replies
# with the GIL held: build it with our patches (see
# scripts/pyfuse3/README.md). First, so that the install of ecfs below finds
# pyfuse3==3.5.0 present and keeps it; quick when it is installed already.
bash "$repo/scripts/pyfuse3/install.sh" "$venv/bin/python"

stamp=$venv/.ecfs-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ${ECFS_FORCE_INSTALL:-0} != 1 && -f $stamp && $(cat "$stamp") == "$want" ]] \
        && "$venv/bin/python" -c 'import pyfuse3, trio, zfec, xxhash, click, pytest' 2>/dev/null; then
    say "ecfs and its test tools are installed and pyproject.toml is unchanged"
else
    say "pip install -e '.[test]' (quiet; takes a minute the first time)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
    echo "$want" >"$stamp"
fi
# --- man pages and mount helpers ---------------------------------------------
# A regular `pip install` puts man/*.8 into PREFIX/share/man/man8 (pyproject's
# data-files); an editable install does not, so link them there: `man ecfs`
# then works whenever .venv/bin is in PATH.
mkdir -p "$venv/share/man/man8"
for page in "$repo"/man/*.8; do
    ln -sfn "$page" "$venv/share/man/man8/"
done

# mount(8) and umount(8) run /sbin/mount.fuse.ecfs and /sbin/umount.fuse.ecfs
# for type fuse.ecfs (mount -t fuse.ecfs, /etc/fstab, systemd .mount units).
# Only links (or nothing) are replaced: a helper installed otherwise stays.
for helper in mount.fuse.ecfs umount.fuse.ecfs; do
    target=/sbin/$helper
    if [[ $EUID -ne 0 ]]; then
        [[ -e $target ]] || say "not root: for mount -t fuse.ecfs, run: sudo ln -s $repo/scripts/$helper $target"
    elif [[ -e $target && ! -L $target ]]; then
        say "$target exists and is not a link: leaving it"
    elif [[ $(readlink "$target" 2>/dev/null) != "$repo/scripts/$helper" ]]; then
        ln -sfn "$repo/scripts/$helper" "$target"
        say "linked $target -> $repo/scripts/$helper"
    fi
done
say "done: use $venv/bin/ecfs, or $venv/bin/python -m pytest"
