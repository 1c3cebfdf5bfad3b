"""``python -m lightning_ncnnqat.ncnn.targets {setup,check,status}``: build / verify the ARM64 emulation.

    setup [--force]   build the environment into the user cache (no-op when present)
    check | status    run a tiny ncnn job on x86 and every ARM profile; print ncnn's version and
                      the CPU features it detects (exit status 1 when a target fails)
    where             print the environment folder and whether it is usable
"""

from __future__ import annotations

import argparse
import sys

from lightning_ncnnqat.ncnn.targets.arm_env import (
    HOME_ENV,
    PROFILES,
    SETUP_COMMAND,
    arm_home,
    environment_problem,
    read_stamp,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the set-up command; returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="python -m lightning_ncnnqat.ncnn.targets",
        description="Emulated ARM64 targets (qemu user-mode + the real aarch64 ncnn wheel). "
        f"Profiles: {', '.join(f'{p.name} ({p.description})' for p in PROFILES.values())}. "
        f"Folder: ${HOME_ENV} or ~/.cache/lightning_ncnnqat/arm64.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="build the emulation environment (no-op when present)")
    s.add_argument("--force", action="store_true", help="rebuild even when the environment is current")
    s.add_argument("--no-check", action="store_true", help="skip the tiny ncnn run on each profile afterwards")
    sub.add_parser("check", help="run a tiny ncnn job on every target and print what ncnn detects")
    sub.add_parser("status", help="same as check")
    sub.add_parser("where", help="print the environment folder and whether it is usable")
    args = ap.parse_args(argv)

    if args.cmd == "where":
        problem = environment_problem()
        print(f"{arm_home()}: {'ready' if problem is None else problem}")
        if problem is None:
            stamp = read_stamp() or {}
            print(f"ncnn {stamp.get('ncnn')}, numpy {stamp.get('numpy')}, {stamp.get('qemu_version')}")
        return 0 if problem is None else 1
    if args.cmd == "setup":
        from lightning_ncnnqat.ncnn.targets.build import SetupError, setup

        try:
            setup(force=args.force)
        except SetupError as e:
            print(f"ARM64 set-up failed: {e}", file=sys.stderr)
            return 1
        if args.no_check:
            return 0
    from lightning_ncnnqat.ncnn.targets.check import check

    problem = environment_problem()
    if problem is not None:
        print(f"ARM64 targets unavailable: {problem}. Set up with `{SETUP_COMMAND}`.", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in check()) else 1
