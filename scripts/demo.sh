#!/usr/bin/env bash
# Installs everything, then compresses SmolLM2-135M to INT8 and prints what it gained and lost.
# Extra arguments go to `qruntime demo` (e.g. --preset w4a16-g128-gptq --eval-tokens 4096).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/install.sh"
python -m qruntime demo "$@"
