#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the pinned requirements (CPU torch 2.13.0)
# and this package installed in editable mode, building the C++ kernels (and the CUDA ones when a
# CUDA toolkit and a CUDA build of torch are present). Sourced by scripts/main.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
# A long step says it is alive: "setup: <what>: 30 s ..." every 30 s; its exit status is kept.
with_heartbeat() {
  local what=$1 t=0 pid
  shift
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    t=$((t + 1))
    if [ $((t % 30)) -eq 0 ] && kill -0 "$pid" 2>/dev/null; then echo "setup: $what: ${t} s ..."; fi
  done
  wait "$pid"
}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the pinned requirements into .venv (torch 2.13.0 CPU build; a few minutes the first time)"
  python -m pip install -q --upgrade pip
  with_heartbeat "installing the requirements" python -m pip install -q -r requirements.txt
  echo "$want" >"$stamp"
fi
# Rebuild the extension whenever its sources changed (cheap no-op otherwise).
src=$(cat setup.py csrc/*.cpp csrc/*.h csrc/cuda/* 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.build.sha 2>/dev/null)" != "$src" ]; then
  echo "setup: building the C++ fake-quant kernels against torch (2-3 minutes on 2 cores)"
  with_heartbeat "building the kernels" python -m pip install -q --no-build-isolation --no-deps -e .
  echo "$src" >.venv/.build.sha
fi
python -c "import lightning_ncnnqat.ops as o; s=o.STATUS; print(f'lightning_ncnnqat kernels: cpu={s.cpu} cuda={s.cuda}')"
