#!/usr/bin/env bash
# Set up, then run the whole test suite (CUDA tests skip with a reason when no GPU is present).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
python -m pytest -q -p no:cacheprovider -rs "$@"
