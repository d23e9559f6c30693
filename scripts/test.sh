#!/usr/bin/env bash
# Installs everything, then runs the test suite (GPU tests are skipped without a GPU).
# Extra arguments go to pytest (e.g. -m "not slow" to skip the real-model tests).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/install.sh"
python -m pytest -q "$@"
