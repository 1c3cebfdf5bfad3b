"""Emulated ARM64 targets: run the real aarch64 ncnn under qemu with a Cortex-A53 or A76 CPU profile.

    python -m lightning_ncnnqat.ncnn.targets setup     # build the environment once (user cache)
    python -m lightning_ncnnqat.ncnn.targets check     # tiny ncnn run on each profile

:func:`worker_command` gives the argv prefix and environment that run a Python script (the
``ncnn/worker.py``) on a target; :func:`available_targets` lists the usable ones.
Nothing here imports torch or the parent package (``scripts/setup_arm.sh`` relies on it).
"""

from lightning_ncnnqat.ncnn.targets.arm_env import (
    HOME_ENV,
    PROFILES,
    SETUP_COMMAND,
    Profile,
    TargetUnavailable,
    arm_home,
    available_targets,
    environment_problem,
    worker_command,
)
from lightning_ncnnqat.ncnn.targets.cli import main

__all__ = [
    "HOME_ENV",
    "PROFILES",
    "SETUP_COMMAND",
    "Profile",
    "TargetUnavailable",
    "arm_home",
    "available_targets",
    "environment_problem",
    "main",
    "worker_command",
]
