"""``python -m lightning_ncnnqat.ncnn.targets {setup,check,status,where,profile}``: build / verify the ARM64 emulation.

    setup [--force]   build the environment into the user cache (no-op when present)
    check | status    run a tiny ncnn job on x86 and every ARM profile; print ncnn's version and
                      the CPU features it detects (exit status 1 when a target fails)
    where             print the environment folder and whether it is usable
    profile           on a board: time an export's models and layers, write a profile (board_profile.py)
    attach            add a board profile to an export (report.json, DEPLOY.md show its speed)
"""

from __future__ import annotations

import argparse
import sys

from lightning_ncnnqat.ncnn.targets.profile import ProfileError, attach_profile, board_speed_lines
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
    sub.add_parser("profile", help="on a board: time an export's float and int8 models and layers, write a "
                   "profile JSON (`profile --help`; see docs/targets.md)")
    a = sub.add_parser("attach", help="add a board profile to an export: report.json and DEPLOY.md show its speed")
    a.add_argument("export_dir", help="the export folder (model.int8.param, report.json, DEPLOY.md)")
    a.add_argument("profile", help="the profile JSON written on the board")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["profile"]:  # its own parser: board_profile.py also runs copied alone to a board
        from lightning_ncnnqat.ncnn.targets.board_profile import main as profile_main  # imports ncnn

        return profile_main(argv[1:])
    args = ap.parse_args(argv)

    if args.cmd == "where":
        problem = environment_problem()
        print(f"{arm_home()}: {'ready' if problem is None else problem}")
        if problem is None:
            stamp = read_stamp() or {}
            print(f"ncnn {stamp.get('ncnn')}, numpy {stamp.get('numpy')}, {stamp.get('qemu_version')}")
        return 0 if problem is None else 1
    if args.cmd == "attach":
        try:
            summary = attach_profile(args.export_dir, args.profile)
        except ProfileError as e:
            print(f"attach failed: {e}", file=sys.stderr)
            return 1
        print("\n".join(board_speed_lines([summary])))
        return 0
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
