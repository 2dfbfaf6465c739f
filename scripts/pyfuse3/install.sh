#!/usr/bin/env bash
# Build and install pyfuse3 with this directory's patches (fallocate.patch,
# release-gil.patch) into a Python environment.
#
#   scripts/pyfuse3/install.sh [PYTHON]     (default: python3)
#
# See README.md beside this file for why. Idempotent and quick when the
# installed pyfuse3 already has both (`Operations.fallocate` and
# `ECFS_NOGIL_MIN`). Otherwise: download the pyfuse3 sdist of
# PYFUSE3_VERSION from PyPI, apply the patches in name order, and `pip install` the
# patched tree (pip builds it in an isolated environment with setuptools,
# setuptools_scm and Cython from PyPI, against the system's libfuse3-dev).
# Needs: gcc, pkg-config, libfuse3-dev, the Python headers (scripts/install.sh
# installs them) and `patch` or `git`. No stdin is read.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${1:-python3}
version=${PYFUSE3_VERSION:-3.5.0}

say() { printf '[pyfuse3] %s\n' "$*"; }

patched() {
    "$python" -c 'import sys, pyfuse3
sys.exit(not (hasattr(pyfuse3.Operations, "fallocate")
              and hasattr(pyfuse3, "ECFS_NOGIL_MIN")))' 2>/dev/null
}

if patched; then
    say "pyfuse3 with ecfs's patches is installed"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "downloading the pyfuse3 $version sdist"
"$python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$work" "pyfuse3==$version"
tar xzf "$work/pyfuse3-$version.tar.gz" -C "$work"
src=$work/pyfuse3-$version
for p in "$here"/*.patch; do
    say "applying $(basename "$p")"
    if command -v patch >/dev/null 2>&1; then
        patch -s -p1 -d "$src" <"$p"
    else
        (cd "$src" && git apply "$p")
    fi
done
say "building and installing the patched pyfuse3 $version (about a minute)"
# --force-reinstall --no-deps: replace an unpatched 3.5.0 of the same version,
# keep its dependency (trio) as installed.
"$python" -m pip install -q --disable-pip-version-check --no-cache-dir \
    --force-reinstall --no-deps "$src"
"$python" -c 'import trio' 2>/dev/null \
    || "$python" -m pip install -q --disable-pip-version-check "trio>=0.15"
if ! patched; then
    say "the installed pyfuse3 still lacks a patch"
    exit 1
fi
say "done"
