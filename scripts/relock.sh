#!/usr/bin/env bash
# Rebuilds constraints.txt, the set of versions that the README's commands and CI install, from the
# newest releases that pyproject.toml allows: installs them into a throwaway virtual env, runs the test
# suite there, and writes constraints.txt only if the suite passes. About 15 minutes on 2 cores.
#   bash scripts/relock.sh                 # then review `git diff constraints.txt` and commit it
#   bash scripts/relock.sh -m "not slow"   # extra arguments go to pytest
# torch is not part of the set (scripts/install.sh installs QRUNTIME_TORCH, default torch==2.13.0,
# only where none is installed); the packages torch needs are.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

work="$(mktemp -d "${TMPDIR:-/tmp}/qruntime-relock.XXXXXX")"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
unset PIP_CONSTRAINT
QRUNTIME_UNLOCKED=1 bash scripts/install.sh
# the C++ extension's build requirements, so the isolated build gets the same versions next time
python -m pip install --disable-pip-version-check -q --upgrade setuptools pybind11

{
  echo "# The versions that scripts/install.sh installs (the README's two commands and CI): the newest"
  echo "# releases on $(date -u +%Y-%m-%d), tested together by scripts/relock.sh with $(python -V),"
  echo "# torch $(python -c 'import torch; print(torch.__version__)'), on $(uname -m). Rebuild with: bash scripts/relock.sh"
  echo "# (QRUNTIME_UNLOCKED=1 bash scripts/install.sh installs the newest releases instead)."
  # torch itself is left to QRUNTIME_TORCH; pip is the venv's own; qruntime is this checkout
  python -m pip freeze --all --exclude-editable --disable-pip-version-check \
    | grep -viE '^(torch|pip|qruntime)==' | grep -v '^#' | sort -f
} > "$work/constraints.txt"

python -m pytest -q -p no:cacheprovider "$@"
cp "$work/constraints.txt" constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pins; the suite passed on them"
