#!/usr/bin/env bash
# The one check that CI and people both run: install, lint, the package
# (built, installed and used: scripts/check_package.sh), test.
#
#   bash scripts/check.sh                 # everything
#   bash scripts/check.sh -k layering -x  # extra arguments go to pytest
#   bash scripts/check.sh -n 0            # one process (pytest-xdist: -n auto by default)
#
# Exits non-zero if the install, ruff or pytest fails.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

bash scripts/install.sh

echo
echo "=== ruff check ecfs tests scripts ==="
if ! .venv/bin/ruff check ecfs tests scripts; then
    echo "=== FAILED: ruff found problems (run: .venv/bin/ruff check --fix ecfs tests scripts) ==="
    exit 1
fi

echo
echo "=== the package: wheel, fresh venv, pipx, a demo mount (scripts/check_package.sh) ==="
if ! bash scripts/check_package.sh; then
    echo "=== FAILED: ecfs does not work as an installed package ==="
    exit 1
fi

echo
echo "=== pytest $* ==="
status=0
.venv/bin/python -m pytest -q -n auto --maxprocesses 4 --durations=15 "$@" || status=$?
if [[ $status -ne 0 ]]; then
    echo "=== FAILED: pytest exited with $status ==="
    exit "$status"
fi
echo "=== all checks passed ==="
