#!/usr/bin/env bash
# Idempotent set-up of .venv-zoo, the environment of benchmarks/zoo.py (the real-architecture zoo).
#
# torchvision and timm need torch==2.14.1 torchvision==0.29.1 (pip takes both from this machine's
# disk: a CUDA build that runs on the CPU, about 5.5 GB), so the zoo lives in its own venv, away
# from the main .venv (CPU torch 2.13.0). Everything else is requirements.txt's pins, plus timm and
# ultralytics. This package is installed NON-editably from a copy of the source tree, so the main
# venv's in-tree kernels (lightning_ncnnqat/_C*.so) and build/ are never touched; it is reinstalled
# whenever the package sources change (only its Python files are replaced when the kernel sources
# are those of the last install: seconds instead of a compile). Then:
#
#   .venv-zoo/bin/python benchmarks/zoo.py            # or: bash scripts/zoo_env.sh --run [zoo args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV=${ZOO_VENV:-$ROOT/.venv-zoo}
PY=${PYTHON:-python3}
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
ZOO_PKGS=("timm==1.0.31" "ultralytics==8.4.190")

if [ ! -x "$VENV/bin/python" ]; then
  avail_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "$avail_gb" -lt 12 ]; then
    echo "zoo_env: ${avail_gb} GB free under $(dirname "$VENV"); the zoo venv needs about 12 GB" >&2
    exit 1
  fi
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# pip without the one-line notes about this machine's local package folders (its exit status kept)
pip_q() { python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

stamp="$VENV/.requirements.sha"
want=$( (cat requirements.txt; printf '%s\n' "${TORCH_PINS[@]}" "${ZOO_PKGS[@]}") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip_q install -q --upgrade pip
  # requirements.txt pins torch 2.13.0 (the main venv's): every other pin is kept as it is
  grep -vE '^torch==' requirements.txt >"$VENV/requirements-zoo.txt"
  pip_q install -q "${TORCH_PINS[@]}" -r "$VENV/requirements-zoo.txt" "${ZOO_PKGS[@]}"
  echo "$want" >"$stamp"
fi

# Non-editable install from a scratch copy of the sources: a build in place would write build/ and
# lightning_ncnnqat/_C*.so beside the main venv's. The copy is the committed HEAD (a consistent
# state even while the working tree is being edited); ZOO_SOURCE=worktree takes the working tree
# (tracked and untracked, not ignored files) instead.
PKG_PATHS=(setup.py pyproject.toml README.md csrc lightning_ncnnqat)
if [ "${ZOO_SOURCE:-head}" = worktree ]; then
  src=$(git ls-files -co --exclude-standard -- "${PKG_PATHS[@]}" | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1)
else
  src=$(git rev-parse "${PKG_PATHS[@]/#/HEAD:}" | sha256sum | cut -d' ' -f1)
fi
# The kernels (csrc, setup.py, pyproject.toml) take most of an install to compile: when only the
# Python sources changed since the last install, those are replaced in place (kernels kept).
KERNEL_PATHS=(setup.py pyproject.toml csrc)
# "path blob-id" lines: the same hash for the same sources from HEAD or from the working tree
if [ "${ZOO_SOURCE:-head}" = worktree ]; then
  ksrc=$(git ls-files -co --exclude-standard -- "${KERNEL_PATHS[@]}" | LC_ALL=C sort \
    | while read -r f; do echo "$f $(git hash-object "$f")"; done | sha256sum | cut -d' ' -f1)
else
  ksrc=$(git ls-tree -r HEAD -- "${KERNEL_PATHS[@]}" | awk '{print $4, $3}' | LC_ALL=C sort | sha256sum | cut -d' ' -f1)
fi
if [ "$(cat "$VENV/.build.sha" 2>/dev/null)" != "$src" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if [ "${ZOO_SOURCE:-head}" = worktree ]; then
    git ls-files -co --exclude-standard -- "${PKG_PATHS[@]}" | tar -cf - -T - | tar -xf - -C "$tmp"
  else
    git archive HEAD -- "${PKG_PATHS[@]}" | tar -xf - -C "$tmp"
  fi
  site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  if [ "$(cat "$VENV/.kernels.sha" 2>/dev/null)" = "$ksrc" ] && [ -d "$site/lightning_ncnnqat" ]; then
    echo "zoo_env: kernels unchanged; replacing lightning-ncnnqat's Python files ($(git rev-parse --short HEAD)${ZOO_SOURCE:+, $ZOO_SOURCE}) in $VENV" >&2
    find "$site/lightning_ncnnqat" -name '*.py' -delete
    (cd "$tmp" && find lightning_ncnnqat -name '*.py' | tar -cf - -T -) | tar -xf - -C "$site"
  else
    echo "zoo_env: installing lightning-ncnnqat ($(git rev-parse --short HEAD)${ZOO_SOURCE:+, $ZOO_SOURCE}) into $VENV" >&2
    pip_q install -q --no-build-isolation --no-deps --force-reinstall "$tmp"
    echo "$ksrc" >"$VENV/.kernels.sha"
  fi
  echo "$src" >"$VENV/.build.sha"
  echo "$(git rev-parse --short HEAD)${ZOO_SOURCE:+ + $ZOO_SOURCE}" >"$VENV/.build.commit"
fi
(cd /tmp && python -c "import torch, lightning_ncnnqat.ops as o; s=o.STATUS; \
print(f'zoo env: torch {torch.__version__}, lightning_ncnnqat kernels: cpu={s.cpu} cuda={s.cuda}')")

if [ "${1:-}" = "--run" ]; then
  shift
  exec nice -n 10 python "$ROOT/benchmarks/zoo.py" "$@"
fi
