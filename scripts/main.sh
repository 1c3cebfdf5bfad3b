#!/usr/bin/env bash
# The main job: set up, then the example QAT run on the embedded offline dataset
# (float training, QAT from the configured epoch, export of the int8 ncnn model + parity report).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
python examples/cifar10.py fit --config examples/qat.yaml "$@"
