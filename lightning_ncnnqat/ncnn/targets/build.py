"""Build the ARM64 emulation environment from registry packages only.

1. ``qemu-user-static`` from apt (``qemu-aarch64-static``), installed system-wide when missing.
2. An aarch64 Python sysroot: Debian ``:arm64`` packages fetched with ``apt-get download`` and
   unpacked with ``dpkg-deb -x`` (no chroot, no binfmt): after ``dpkg --add-architecture arm64``.
3. aarch64 wheels of ncnn (the host's ncnn version) and numpy, fetched with the host's pip
   (``--platform manylinux*_aarch64 --only-binary=:all:``) and unzipped into one site folder.

Idempotent: the stamp (``stamp.json``) records what was installed and is written last; a
re-run with a matching stamp does nothing. Steps needing root (apt install, adding the arm64
architecture) fail with the exact command to run when not root.
"""

from __future__ import annotations

import compileall
import datetime as _dt
import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from lightning_ncnnqat.ncnn.targets.arm_env import (
    GUEST_PYTHON,
    STAMP_FORMAT,
    Layout,
    arm_home,
    environment_problem,
    find_qemu,
    host_ncnn_version,
)

#: Debian arm64 packages of the sysroot: glibc, the C++/OpenMP runtimes ncnn links, and
#: python3.11 with the shared libraries its stdlib extension modules load (about 12 MB).
SYSROOT_PACKAGES: tuple[str, ...] = (
    "libc6", "libgcc-s1", "libstdc++6", "libgomp1",
    f"python{GUEST_PYTHON}-minimal", f"libpython{GUEST_PYTHON}-minimal", f"libpython{GUEST_PYTHON}-stdlib",
    "zlib1g", "libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libsqlite3-0",
    "libncursesw6", "libtinfo6", "libreadline8", "libuuid1", "libcrypt1", "libdb5.3", "libnsl2",
    "libtirpc3", "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libcom-err2", "libkrb5support0",
    "libkeyutils1",
)  # fmt: skip

#: Wheel platforms for ``pip download`` (ncnn and numpy publish manylinux aarch64 wheels).
WHEEL_PLATFORMS: tuple[str, ...] = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")


class SetupError(RuntimeError):
    """A set-up step failed; the message names the step and, when it helps, the command to run."""


def _log(msg: str) -> None:
    print(f"[arm64 setup] {msg}", flush=True)


def _run(cmd: Sequence[str], what: str, cwd: Path | None = None) -> str:
    """Run ``cmd``; on failure raise SetupError naming ``what`` with the tail of its output."""
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-8:])
        raise SetupError(f"{what} failed (exit status {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def _is_root() -> bool:
    return os.geteuid() == 0


def _need_root(what: str, commands: Sequence[str]) -> SetupError:
    lines = "\n".join(f"    sudo {c}" for c in commands)
    return SetupError(f"{what} needs root. Run:\n{lines}\nthen run the set-up again.")


# ------------------------------------------------------------------------------ system packages


def _arm64_lists_present() -> bool:
    """True when apt knows an arm64 candidate for libc6 (architecture added and lists fetched)."""
    proc = subprocess.run(["apt-cache", "policy", "libc6:arm64"], capture_output=True, text=True, check=False)
    return proc.returncode == 0 and "Candidate:" in proc.stdout and "Candidate: (none)" not in proc.stdout


def ensure_system_packages() -> str:
    """qemu-aarch64-static installed and arm64 apt lists present; returns the qemu path.

    Raises:
        SetupError: not root (gives the sudo commands) or no apt-get (says what to install).
    """
    qemu = find_qemu()
    have_apt = shutil.which("apt-get") is not None and shutil.which("dpkg") is not None
    if not have_apt:
        if qemu is None:
            raise SetupError(
                "qemu-aarch64-static not found and this system has no apt-get: install qemu's user-mode "
                "aarch64 emulator (qemu-user-static) with your package manager. The aarch64 sysroot is "
                "built from Debian packages and needs apt-get and dpkg."
            )
        raise SetupError("the aarch64 sysroot is built from Debian arm64 packages and needs apt-get and dpkg")
    foreign = _run(["dpkg", "--print-foreign-architectures"], "listing dpkg architectures").split()
    todo: list[list[str]] = []
    if "arm64" not in foreign:
        todo.append(["dpkg", "--add-architecture", "arm64"])
    if todo or not _arm64_lists_present():
        todo.append(["apt-get", "update"])
    if qemu is None:
        todo.append(["apt-get", "install", "-y", "--no-install-recommends", "qemu-user-static"])
    if todo and not _is_root():
        raise _need_root("installing qemu-user-static / adding the arm64 architecture", [" ".join(c) for c in todo])
    for cmd in todo:
        _log(" ".join(cmd))
        _run(cmd, " ".join(cmd))
    qemu = find_qemu()
    if qemu is None:
        raise SetupError("qemu-user-static is installed but qemu-aarch64-static is not on PATH")
    return qemu


def _qemu_version(qemu: str) -> str:
    out = _run([qemu, "--version"], "qemu --version").splitlines()
    return out[0].strip() if out else "unknown"


def fetch_sysroot(dest: Path, work: Path) -> dict[str, str]:
    """Download :data:`SYSROOT_PACKAGES` (``:arm64``) into ``work`` and unpack them into ``dest``.

    Returns package -> Debian version.
    """
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    names = [f"{p}:arm64" for p in SYSROOT_PACKAGES]
    _log(f"apt-get download {len(names)} arm64 packages")
    # -o APT::Sandbox::User=root: apt's download user (_apt) may not be able to write to ``work``
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *names], "apt-get download", cwd=debs)
    versions: dict[str, str] = {}
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(dest)], f"dpkg-deb -x {deb.name}")
        pkg, version = deb.name.split("_")[:2]
        versions[pkg] = version.replace("%3a", ":")
    missing = sorted(set(SYSROOT_PACKAGES) - set(versions))
    if missing:
        raise SetupError(f"apt-get download did not fetch {missing}")
    return versions


def _host_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pip_download(requirements: Sequence[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    for plat in WHEEL_PLATFORMS:
        cmd += ["--platform", plat]
    cmd += ["--python-version", GUEST_PYTHON, "--implementation", "cp", "-d", str(dest), *requirements]
    _log(" ".join(["pip download", *requirements]))
    _run(cmd, "pip download of the aarch64 wheels")


def fetch_wheels(ncnn_version: str, dest: Path, work: Path) -> dict[str, str]:
    """Download the aarch64 ncnn (``ncnn_version``) and numpy wheels and unzip them into ``dest``.

    numpy is pinned to the host's version when an aarch64 wheel of it exists, else the newest.
    Returns distribution -> wheel file name.
    """
    wheels = work / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _pip_download([f"ncnn=={ncnn_version}"], wheels)
    numpy_version = _host_version("numpy")
    try:
        _pip_download([f"numpy=={numpy_version}" if numpy_version else "numpy"], wheels)
    except SetupError:
        if numpy_version is None:
            raise
        _log(f"no aarch64 cp{GUEST_PYTHON.replace('.', '')} wheel of numpy {numpy_version}; taking the newest")
        _pip_download(["numpy"], wheels)
    got: dict[str, str] = {}
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(dest)
        got[whl.name.split("-")[0].lower()] = whl.name
    if set(got) != {"ncnn", "numpy"}:
        raise SetupError(f"expected the ncnn and numpy wheels, got {sorted(got)}")
    return got


def _precompile(paths: Sequence[Path]) -> None:
    """Byte-compile the guest's stdlib and site with the host Python (same magic when same 3.x).

    Saves the emulated interpreter from compiling them itself (seconds per start otherwise,
    and the Debian packages ship no .pyc).
    """
    if f"{sys.version_info[0]}.{sys.version_info[1]}" != GUEST_PYTHON:
        return
    for p in paths:
        compileall.compile_dir(str(p), quiet=2, workers=1)


# ------------------------------------------------------------------------------ the whole set-up


def is_current(home: Path) -> bool:
    """True when ``home`` holds a complete environment for the host's ncnn (re-run is a no-op)."""
    return environment_problem(home) is None


def setup(home: Path | None = None, force: bool = False) -> dict:
    """Build the environment into ``home`` (default :func:`arm_home`); returns the stamp.

    A no-op (returns the existing stamp) when it is current, unless ``force``. Built under a
    temporary folder in ``home`` and moved into place, stamp last, so an interrupted set-up
    leaves no half environment that looks complete.

    Raises:
        SetupError: a step failed (the message names it and what to run).
    """
    import json

    home = Path(home or arm_home())
    home.mkdir(parents=True, exist_ok=True)
    lay = Layout(home)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two set-ups at once (parallel CI steps) build once
        if not force and is_current(home):
            stamp = json.loads(lay.stamp.read_text(encoding="utf-8"))
            _log(f"up to date at {home} (ncnn {stamp['ncnn']}, numpy {stamp['numpy']})")
            return stamp
        ncnn_version = host_ncnn_version()
        if ncnn_version is None:
            raise SetupError("ncnn is not installed in this Python: the ARM wheel must match its version")
        t0 = time.monotonic()
        qemu = ensure_system_packages()
        lay.stamp.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=home) as tmp:
            work = Path(tmp)
            sysroot, site = work / "sysroot", work / "site"
            debs = fetch_sysroot(sysroot, work)
            wheels = fetch_wheels(ncnn_version, site, work)
            _precompile([sysroot / "usr" / "lib" / f"python{GUEST_PYTHON}", site])
            for final, built in ((lay.sysroot, sysroot), (lay.site, site)):
                if final.exists():
                    shutil.rmtree(final)
                built.rename(final)
        stamp = {
            "format": STAMP_FORMAT,
            "ncnn": ncnn_version,
            "numpy": wheels["numpy"].split("-")[1],
            "python": GUEST_PYTHON,
            "qemu": qemu,
            "qemu_version": _qemu_version(qemu),
            "debian_packages": debs,
            "wheels": sorted(wheels.values()),
            "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "setup_seconds": round(time.monotonic() - t0, 1),
        }
        tmp_stamp = lay.stamp.with_suffix(".tmp")
        tmp_stamp.write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
        tmp_stamp.rename(lay.stamp)
        _log(f"built at {home} in {stamp['setup_seconds']} s (ncnn {ncnn_version}, numpy {stamp['numpy']})")
        return stamp
