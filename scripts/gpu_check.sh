#!/usr/bin/env bash
# On a machine with a GPU and a CUDA build of torch: build the CUDA kernels, run the ops and GPU
# tests (also under compute-sanitizer) and the GPU benchmarks. Logs go to ${OUT:-gpu_logs}/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-gpu_logs}; mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 LIGHTNING_NCNNQAT_REQUIRE_KERNELS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 $PY -m pip install -q --no-build-isolation --no-deps -e . \
  >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
$PY -c "import lightning_ncnnqat.ops as o; print('kernels:', o.STATUS)" | tee -a "$out/gpu.txt"
$PY -m pytest tests/test_ops.py tests/test_ops_cuda.py tests/test_fold_op.py tests/test_ops_learned.py tests/test_learned_quantizer.py tests/test_dynamic_ops.py tests/test_gemm_ops.py tests/test_gpu_fit.py -q -p no:cacheprovider -x \
  2>&1 | tail -5 | tee "$out/tests.txt"
compute-sanitizer --tool memcheck $PY -m pytest tests/test_ops_cuda.py tests/test_fold_op.py tests/test_ops_learned.py tests/test_dynamic_ops.py -q -p no:cacheprovider -x \
  -k "not compile and not opcheck and not cpu" 2>&1 | tail -4 | tee "$out/sanitizer.txt"
for args in "--with-reference" "--batch 512" "--amp bf16"; do
  $PY benchmarks/qat_step.py --device cuda $args 2>&1 | grep -v Warn | tee -a "$out/qat_step.txt"
done
$PY benchmarks/step_profile.py --device cuda --ablate >"$out/step_profile.txt" 2>&1; grep === "$out/step_profile.txt"
$PY benchmarks/ops.py --device cuda 2>&1 | tee "$out/ops.txt"
$PY benchmarks/ops.py --device cuda --layers 2>&1 | tee "$out/ops_layers.txt"
