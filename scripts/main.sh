#!/usr/bin/env bash
# The main job: set up, then the example QAT run on the embedded offline dataset
# (float training, QAT from the configured epoch, export of the int8 ncnn model + parity report
# on this machine and on the emulated ARM64 Cortex-A53 / A76 targets).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
bash scripts/setup_arm.sh || echo "main job: the emulated ARM targets could not be set up (see above); the export checks x86 only"
python examples/cifar10.py fit --config examples/qat.yaml "$@"
