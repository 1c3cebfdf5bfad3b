"""Layer speeds measured on a board, for the QAT start's keep-float rule (issue 20, item 3).

A board profile (``python -m lightning_ncnnqat.ncnn.targets profile`` run on the device, read by
:func:`lightning_ncnnqat.ncnn.targets.profile.load_profile`) times every ncnn layer of an export
in int8 and in float there. :func:`board_layer_speeds` turns the layers of the QAT plan into the
:class:`~lightning_ncnnqat.speed.decide.LayerSpeed` records the x86 measurement gives, so
:func:`~lightning_ncnnqat.speed.decide.layers_to_keep_float` decides for that board by the same
rule. ncnn layer names are the converter's (pnnx), the same for every export of one architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lightning_ncnnqat.ncnn.targets.profile import BoardProfile, ProfileError, load_profile
from lightning_ncnnqat.speed.decide import LayerSpeed

__all__ = ["board_layer_speeds"]


def board_layer_speeds(
    profile: BoardProfile | str | Path, ncnn_names: Mapping[str, str], threads: int = 1, *, allow_emulated: bool = False
) -> dict[str, LayerSpeed]:
    """torch module name -> its int8 and float ms on the board, for the layers of ``ncnn_names``
    (torch name -> ncnn layer name, the int8 layers of the plan) that the profile timed, in
    ``ncnn_names``' order. A layer the profiled int8 model ran in float has no int8 time there: it
    is left out (``BoardProfile.float_in_int8``). ``allow_emulated``: tests of the mechanics only.

    Raises:
        EmulatedProfileError: the profile was measured under emulation (its times are not speeds).
        ProfileError: malformed, ``threads`` not measured, or none of the layers in it (a profile
            of another architecture); the message names the file.
    """
    prof = profile if isinstance(profile, BoardProfile) else load_profile(profile)
    timed = {n: t for n, t in prof.layer_ms(threads, allow_emulated=allow_emulated).items() if n not in prof.float_in_int8}
    kinds = {n: t for n, (t, _) in prof.times[threads]["int8"][1].items()}
    out = {
        t: LayerSpeed(t, timed[n][0], timed[n][1], kinds.get(n, ""))
        for t, n in ncnn_names.items() if n in timed
    }  # fmt: skip
    if ncnn_names and not out:
        some = ", ".join(list(ncnn_names.values())[:4])
        raise ProfileError(
            f"board profile {prof.path}: none of the model's int8 layers ({some}, ...) was timed in it: it profiles "
            "another model (profile an export of this architecture on the board)", argument="profile", value=str(prof.path),
        )
    return out
