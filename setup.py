"""Builds the compiled fake-quant kernels (metadata lives in pyproject.toml).

* ``lightning_ncnnqat._C``: C++ CPU kernels, always built.
* ``lightning_ncnnqat._C_cuda``: CUDA kernels, built only when the installed torch is a CUDA
  build AND a CUDA toolkit (nvcc) is found. A visible GPU is not needed, and a missing toolkit
  never fails the install: the package then uses the reference on CUDA tensors.

Environment: ``LIGHTNING_NCNNQAT_CPU_ONLY=1`` skips the CUDA extension;
``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default: a list that includes sm_90).

Build against the installed torch: ``pip install --no-build-isolation -e .``
"""

from __future__ import annotations

import os
import platform
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - the build needs torch
    sys.exit(f"lightning-ncnnqat: building the kernels needs torch installed first ({exc}); "
             "use `pip install --no-build-isolation -e .`")

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"

# Kernels must be bit-exact with the reference: no FMA contraction, no fast math.
# -fno-trapping-math / -fno-math-errno change no value (only FP exception flags and errno, as in
# torch's own build); without them GCC will not vectorise the selects of the quantize loop.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fno-math-errno"]
if platform.system() != "Windows":
    CXX_FLAGS.append("-fopenmp")  # at::parallel_for is OpenMP, inlined from torch's headers
LINK_FLAGS = ["-fopenmp"] if platform.system() != "Windows" else []
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo"]
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _log(msg: str) -> None:
    print(f"lightning-ncnnqat setup: {msg}", file=sys.stderr)


def _cuda_toolkit() -> str | None:
    """Return the CUDA toolkit root if the CUDA extension should be built, else None."""
    if os.environ.get("LIGHTNING_NCNNQAT_CPU_ONLY", "") == "1":
        _log("LIGHTNING_NCNNQAT_CPU_ONLY=1: building the CPU kernels only")
        return None
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} has no CUDA: building the CPU kernels only")
        return None
    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    if nvcc is None or not (os.path.exists(nvcc) or os.path.exists(nvcc + ".exe")):
        nvcc = shutil.which("nvcc")
        home = os.path.dirname(os.path.dirname(nvcc)) if nvcc else None
    if not home:
        _log("no CUDA toolkit (nvcc) found: building the CPU kernels only; "
             "set CUDA_HOME to build the CUDA kernels")
        return None
    return home


def extensions() -> list:
    exts = [
        cpp_extension.CppExtension(
            "lightning_ncnnqat._C",
            sources=[
                os.path.join(CSRC, name)
                for name in (
                    "fake_quant_cpu_forward.cpp",
                    "fake_quant_cpu_backward.cpp",
                    "fake_quant_cpu_dynamic.cpp",
                    "fake_quant_cpu_register.cpp",
                    "autograd.cpp",
                )
            ],
            include_dirs=[os.path.join(ROOT, CSRC)],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    ]
    if _cuda_toolkit() is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        _log(f"building the CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        exts.append(
            cpp_extension.CUDAExtension(
                "lightning_ncnnqat._C_cuda",
                sources=[
                    os.path.join(CSRC, "cuda", "fake_quant_cuda.cpp"),
                    os.path.join(CSRC, "cuda", "fake_quant_kernels.cu"),
                    os.path.join(CSRC, "cuda", "dynamic_quant_kernels.cu"),
                ],
                include_dirs=[os.path.join(ROOT, CSRC), os.path.join(ROOT, CSRC, "cuda")],
                extra_compile_args={"cxx": ["-O3", "-ffp-contract=off"], "nvcc": NVCC_FLAGS},
            )
        )
    return exts


def _strict() -> bool:
    return os.environ.get("LIGHTNING_NCNNQAT_STRICT_BUILD", "") == "1"


class OptionalBuildExt(cpp_extension.BuildExtension):
    """Builds each kernel library if it can. A failed build (no C++ compiler, an nvcc that does
    not match torch's CUDA) leaves the package installed on the pure-PyTorch reference, which the
    import then says in one warning. ``LIGHTNING_NCNNQAT_STRICT_BUILD=1`` makes failures fatal.

    A library that failed is dropped from ``self.extensions`` once the build loop is over, so
    nothing after it (the in-place copy of an editable install, the outputs a wheel or ``install
    --record`` lists) looks for it; a copy left in the source tree by an earlier build is removed,
    since it was built from other sources or for another torch.
    """

    def build_extensions(self) -> None:
        self._failed: dict[str, str] = {}
        try:  # torch checks the compiler (and its ABI) here, before any extension is built
            super().build_extensions()
        except Exception as exc:  # noqa: BLE001
            if _strict():
                raise
            _log(f"could not build the kernels ({type(exc).__name__}: {exc}); "
                 "installing without them: the pure-PyTorch reference computes the same numbers, slower")
            self._failed.update({ext.name: str(exc) for ext in self.extensions})
        self._dropped = [ext for ext in self.extensions if ext.name in self._failed]
        self.extensions = [ext for ext in self.extensions if ext.name not in self._failed]

    def run(self) -> None:
        self._dropped: list = []
        super().run()  # builds, then (editable / --inplace) copies what was built into the source tree
        if self.inplace:
            for ext in self._dropped:
                self._remove_stale_inplace_copy(ext)

    def build_extension(self, ext) -> None:  # noqa: ANN001
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - compilers fail in many ways
            if _strict():
                raise
            _log(f"could not build {ext.name} ({type(exc).__name__}: {exc}); "
                 "installing without it: the pure-PyTorch reference computes the same numbers, slower")
            self._failed[ext.name] = str(exc)

    def _remove_stale_inplace_copy(self, ext) -> None:  # noqa: ANN001
        """An editable install loads the library from the source tree: drop an older build of it."""
        build_py = self.get_finalized_command("build_py")
        fullname = self.get_ext_fullname(ext.name)
        package_dir = build_py.get_package_dir(".".join(fullname.split(".")[:-1]))
        stale = os.path.join(package_dir, os.path.basename(self.get_ext_filename(fullname)))
        if os.path.exists(stale):
            _log(f"removing {stale}, an earlier build of {ext.name} that would not match these sources")
            os.remove(stale)


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt.with_options(use_ninja=True)},
)
