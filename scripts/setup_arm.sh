#!/usr/bin/env bash
# Idempotent set-up of the emulated ARM64 targets (qemu user-mode + the real aarch64 ncnn wheel),
# built from registry packages into ${LIGHTNING_NCNNQAT_ARM_HOME:-~/.cache/lightning_ncnnqat/arm64}.
# A cheap no-op when present (the ncnn layer it runs imports no torch).
# Needs root for apt (qemu-user-static, the arm64 architecture); otherwise prints the sudo commands.
#   bash scripts/setup_arm.sh           # set up (or confirm), no emulated run
#   bash scripts/setup_arm.sh --check   # and run a tiny ncnn job on each profile
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
run_targets() {
  # the ncnn layer imports neither torch nor the rest of the package
  "$PY" -m lightning_ncnnqat.ncnn.targets "$@"
}
run_targets setup --no-check
if [ "${1:-}" = "--check" ]; then
  run_targets check
fi
