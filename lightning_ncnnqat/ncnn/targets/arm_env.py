"""Emulated ARM64 targets: CPU profiles, where their environment lives, and how to run a script there.

The real aarch64 ``ncnn`` wheel from PyPI runs on an x86 machine under qemu user-mode emulation
with a Debian arm64 Python sysroot (see ``python -m lightning_ncnnqat.ncnn.targets setup``). Each
profile is a ``QEMU_CPU`` model: ncnn detects the CPU features of that core and picks the same
kernels (NEON int8, fp16 storage/arithmetic, dot product) as on the device. Emulated wall times
say nothing about device speed.

Standard library only, and nothing from the parent package: ``scripts/setup_arm.sh`` imports this
package without importing torch.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

#: Environment variable overriding where the emulation environment is built.
HOME_ENV = "LIGHTNING_NCNNQAT_ARM_HOME"
#: Environment variable naming the qemu aarch64 user-mode binary (default: found on PATH).
QEMU_ENV = "LIGHTNING_NCNNQAT_QEMU"
#: The command that builds the environment (said in every "unavailable" message).
SETUP_COMMAND = "python -m lightning_ncnnqat.ncnn.targets setup"
#: Python of the aarch64 sysroot (Debian 12 ``python3.11``); the wheels are fetched for it.
GUEST_PYTHON = "3.11"
#: Layout version of the stamp; a different one means "rebuild".
STAMP_FORMAT = 1


@dataclass(frozen=True)
class Profile:
    """One emulated ARM CPU: the target name, qemu's CPU model and what it stands for."""

    name: str
    qemu_cpu: str
    isa: str
    description: str


#: The emulated targets, by name. ``arm64-a53``: ARMv8.0 (NEON, no fp16 arithmetic, no dot
#: product), like Raspberry Pi 3 / Zero 2 and older phones. ``arm64-a76``: ARMv8.2-A with fp16
#: arithmetic (asimdhp) and dot product (asimddp), like most current phones and Raspberry Pi 5;
#: ncnn runs float layers in fp16 there by default.
PROFILES: dict[str, Profile] = {
    "arm64-a53": Profile("arm64-a53", "cortex-a53", "ARMv8.0-A", "Cortex-A53 (no fp16 arithmetic, no dot product)"),
    "arm64-a76": Profile("arm64-a76", "cortex-a76", "ARMv8.2-A", "Cortex-A76 (fp16 arithmetic, dot product)"),
}


class TargetUnavailable(RuntimeError):
    """An emulated target cannot run here: its environment is absent, stale or incomplete.

    The message says why and gives the set-up command.
    """


def arm_home() -> Path:
    """Folder of the emulation environment: ``$LIGHTNING_NCNNQAT_ARM_HOME`` or the user cache."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "lightning_ncnnqat" / "arm64"


@dataclass(frozen=True)
class Layout:
    """Paths inside the environment folder ``home``."""

    home: Path

    @property
    def sysroot(self) -> Path:
        """Unpacked Debian arm64 packages (libc, libstdc++, libgomp, python3.11)."""
        return self.home / "sysroot"

    @property
    def site(self) -> Path:
        """Unzipped aarch64 wheels (ncnn, numpy): the guest's only import path besides the stdlib."""
        return self.home / "site"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / f"python{GUEST_PYTHON}"

    @property
    def stamp(self) -> Path:
        """JSON record of what was installed (versions, packages, qemu); written last."""
        return self.home / "stamp.json"


def host_ncnn_version() -> str | None:
    """Version of the host's installed ``ncnn`` distribution (the one the ARM wheel must match)."""
    try:
        return importlib.metadata.version("ncnn")
    except importlib.metadata.PackageNotFoundError:
        return None


def find_qemu() -> str | None:
    """Path of qemu's aarch64 user-mode emulator: ``$LIGHTNING_NCNNQAT_QEMU`` or on PATH."""
    override = os.environ.get(QEMU_ENV)
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


def read_stamp(home: Path | None = None) -> dict | None:
    """The stamp of the environment at ``home`` (default :func:`arm_home`), or None."""
    path = Layout(home or arm_home()).stamp
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def environment_problem(home: Path | None = None) -> str | None:
    """Why the environment at ``home`` cannot run the ARM targets, or None when it can."""
    lay = Layout(home or arm_home())
    stamp = read_stamp(lay.home)
    if stamp is None:
        return f"the ARM64 emulation environment is not set up (no {lay.stamp})"
    if stamp.get("format") != STAMP_FORMAT:
        return f"the ARM64 emulation environment at {lay.home} has an old layout"
    host = host_ncnn_version()
    if host is not None and stamp.get("ncnn") != host:
        return f"the ARM64 environment has ncnn {stamp.get('ncnn')}, the host has ncnn {host}"
    if not lay.python.is_file() or not (lay.site / "ncnn").is_dir():
        return f"the ARM64 emulation environment at {lay.home} is incomplete"
    if find_qemu() is None:
        return "qemu-aarch64-static is not installed (Debian/Ubuntu package qemu-user-static)"
    return None


def _unavailable(target: str, problem: str) -> TargetUnavailable:
    home = arm_home()
    where = f" (with {HOME_ENV}={home})" if os.environ.get(HOME_ENV) else ""
    return TargetUnavailable(
        f"target '{target}' is unavailable: {problem}. Set it up with `{SETUP_COMMAND}`{where}, "
        f"or `bash scripts/setup_arm.sh` in a checkout."
    )


def worker_command(target: str) -> tuple[list[str], dict[str, str]]:
    """argv prefix and extra environment that run a Python script on an emulated ARM target.

    ``[*argv, script.py, args...]`` runs ``script.py`` with the aarch64 Python under qemu, with
    ``QEMU_CPU`` set to the profile's core. The guest imports only its own stdlib and the site
    folder of aarch64 wheels (``-S``: no site module, so no host ``site-packages`` or user site).

    Raises:
        ValueError: ``target`` is not a name in :data:`PROFILES`.
        TargetUnavailable: the environment is absent, stale (other ncnn version) or incomplete;
            the message gives the set-up command.
    """
    profile = PROFILES.get(target)
    if profile is None:
        raise ValueError(f"target must be one of {sorted(PROFILES)}, got {target!r}")
    problem = environment_problem()
    if problem is not None:
        raise _unavailable(target, problem)
    lay = Layout(arm_home())
    qemu = find_qemu()
    assert qemu is not None  # environment_problem checked it
    argv = [qemu, "-L", str(lay.sysroot), str(lay.python), "-S", "-s"]
    env = {
        "QEMU_CPU": profile.qemu_cpu,
        "QEMU_LD_PREFIX": str(lay.sysroot),
        "PYTHONHOME": str(lay.sysroot / "usr"),
        "PYTHONPATH": str(lay.site),
        "PYTHONNOUSERSITE": "1",
        # host values would reach the guest's dynamic loader (x86 libraries): clear them
        "LD_LIBRARY_PATH": "",
        "LD_PRELOAD": "",
    }
    return argv, env


def available_targets() -> list[str]:
    """Names of the emulated targets that can run now (empty when the environment is absent)."""
    return sorted(PROFILES) if environment_problem() is None else []
