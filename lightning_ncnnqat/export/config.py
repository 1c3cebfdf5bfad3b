"""``ExportConfig``: the export's settings, one object that ``QATCallback(export=...)``,
``export(config=...)`` and ``python -m lightning_ncnnqat export`` share, validated once when made.

Every check of an export setting lives here (``__post_init__``); the callback, ``export()`` and
the command line only build an :class:`ExportConfig` and read it. Torch-free: the settings are
plain values (numpy and ncnn's tooling only come in through the modules named below).
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from lightning_ncnnqat.errors import ConfigError, ConfigTypeError
from lightning_ncnnqat.ncnn.int8_writer import FLOAT_WEIGHTS
from lightning_ncnnqat.ncnn.isolated import HOST
from lightning_ncnnqat.ncnn.targets import PROFILES, available_targets
from lightning_ncnnqat.ncnn.targets.profile import board_profile_argument
from lightning_ncnnqat.preprocessing import Preprocessing

DEFAULT_EXPORT_DIR = "ncnn_export"


def known_targets() -> list[str]:
    """Every target name ``targets`` may list: this machine and the emulated ARM profiles."""
    return [HOST, *PROFILES]


def check_targets(targets: Any) -> Union[str, tuple[str, ...]]:
    """``"auto"``, or the names as a tuple (a single name becomes a one-name tuple).

    Raises:
        ConfigError: a name not in :func:`known_targets` (the message names them all).
        ConfigTypeError: not a string or a sequence of strings.
    """
    if targets == "auto":
        return "auto"
    names = (targets,) if isinstance(targets, str) else targets
    if not isinstance(names, Sequence) or not all(isinstance(t, str) for t in names):
        raise ConfigTypeError(
            f"`targets` must be 'auto' or a list of target names, got {targets!r}", argument="targets", value=targets
        )
    known = known_targets()
    bad = [t for t in names if t not in known]
    if bad:
        raise ConfigError(
            f"`targets` has unknown target(s) {bad}; known: {known} or 'auto'", argument="targets", value=targets
        )
    return tuple(names)


def resolve_targets(targets: Any) -> list[str]:
    """The targets ``targets`` means now: this machine first, then the named ARM profiles;
    ``"auto"``: every profile, set-up ones first (an absent one stays listed so the report
    names it with the set-up command). Raises as :func:`check_targets`."""
    checked = check_targets(targets)
    if checked == "auto":
        ready = set(available_targets())
        return [HOST] + [t for t in PROFILES if t in ready] + [t for t in PROFILES if t not in ready]
    wanted = list(checked)
    return wanted if HOST in wanted else [HOST, *wanted]


def _int(name: str, value: Any, low: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        tail = " or None" if none_ok else ""
        raise ConfigError(f"`{name}` must be an int >= {low}{tail}, got {value!r}", argument=name, value=value)


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigTypeError(
            f"`{name}` must be a bool, got {value!r} ({type(value).__name__})", argument=name, value=value
        )


@dataclass(frozen=True)
class ExportConfig:
    """How a QAT model is exported for ncnn and checked: where, on which targets, how.

    One object for ``QATCallback(export=ExportConfig(...))``, ``export(model, config=...)`` and
    the export command (each field is a flag there: ``--export-dir``, ``--targets``,
    ``--float-weights``, ``--timing-runs`` ...). Every field is checked when the object is made.

    Args:
        dir: directory the export writes into (created; earlier outputs of an export are
            replaced). Under QATCallback a relative path is under ``trainer.default_root_dir``.
        targets: where parity and the per-layer checks run: ``"x86"`` (this machine's ncnn) and
            the emulated ARM profiles ``"arm64-a53"`` / ``"arm64-a76"`` (the real aarch64 ncnn
            under qemu with its default options; set up once with ``python -m lightning_ncnnqat
            setup-arm``). ``"auto"``: this machine plus every ARM profile that is set up; an
            absent one is named in the report's notes with the set-up command, never a failure.
            QATCallback's preflight measures the int8 layers on the same targets.
        float_weights: how model.int8.bin stores the weights of layers kept in float: ``"fp32"``
            (default) the float32 weights QAT trained, which ncnn computes exactly so on x86 and
            ARMv8.0 (ARMv8.2's default fp16 storage converts them at load); ``"fp16"`` what
            ncnn2int8 writes (byte-identical to the tool, smaller, but rounded weights QAT never
            saw). ``report.json`` records it.
        preprocessing: the input normalisation (:class:`~lightning_ncnnqat.Preprocessing` or its
            dict form ``{"mean": [...], "std": [...]}``), written into ``DEPLOY.md`` and
            ``run_int8.py`` in ncnn's terms (``mean_vals``/``norm_vals``); default: the
            datamodule's or the model's ``preprocessing`` attribute.
        held_batch_size: inputs the parity report compares on: QATCallback takes the first ones
            of the validation loader, the command those of ``--datamodule`` (or the first of
            ``--held-batch`` when given); ``export()`` compares on the ``held_batch`` it is given.
        preflight: (QATCallback) check at fit start that ``dir`` can be written, and right
            after QAT starts run the export chain (ONNX, pnnx, layer matching, int8 writer) on
            the just-prepared model and every int8 layer once on each target, so a model that
            cannot export fails within seconds, naming the step and layer, and layers a target
            computes wrongly stay float before training.
        layer_check_samples: samples of the held batch the per-layer check runs on.
        timing_runs: timed inferences per model (median reported); 0 skips timing.
        timing_threads: ncnn threads for the timing (None: ncnn's default). One thread by
            default: stable numbers on a shared or busy machine.
        check_onnx: also run model.onnx with onnxruntime against PyTorch (a warning only).
        opset: ONNX opset of model.onnx.
        target_time_limit_s: wall seconds all ncnn runs on ONE emulated ARM target may take
            (qemu runs a large model's checks slowly); once spent, that target's remaining
            checks are skipped with a warning naming it. None: no limit. x86 has none.
        board_profile: path of a board profile (``python -m lightning_ncnnqat.ncnn.targets
            profile`` run on the board on an export of this architecture): its int8 vs float
            figures go into report.json (``board_profiles``), the summary and DEPLOY.md, judged
            like this machine's, plainly when int8 does not pay on that board. Checked when the
            config is made; a profile of another architecture fails the export's
            ``board_profile`` step (the other files land). None: no board figures.

    Raises:
        ConfigError / ConfigTypeError: a field's value is wrong; the message and the error's
            ``argument`` / ``value`` name the field and the value.
    """

    dir: str = DEFAULT_EXPORT_DIR
    targets: Union[str, tuple[str, ...]] = "auto"
    float_weights: str = "fp32"
    preprocessing: Optional[Union[Preprocessing, dict[str, Any]]] = None
    held_batch_size: int = 64
    preflight: bool = True
    layer_check_samples: int = 4
    timing_runs: int = 30
    timing_threads: Optional[int] = 1
    check_onnx: bool = True
    opset: int = 17
    target_time_limit_s: Optional[float] = 1800.0
    board_profile: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.dir, (str, os.PathLike)) or not os.fspath(self.dir):
            raise ConfigTypeError(
                f"`dir` must be a path, got {self.dir!r} ({type(self.dir).__name__})", argument="dir", value=self.dir
            )
        object.__setattr__(self, "dir", os.fspath(self.dir))
        object.__setattr__(self, "targets", check_targets(self.targets))
        if self.float_weights not in FLOAT_WEIGHTS:
            raise ConfigError(
                f"`float_weights` must be one of {FLOAT_WEIGHTS}, not {self.float_weights!r}",
                argument="float_weights", value=self.float_weights,
            )
        object.__setattr__(self, "preprocessing", _preprocessing(self.preprocessing))
        _int("held_batch_size", self.held_batch_size, 1)
        _int("layer_check_samples", self.layer_check_samples, 1)
        _int("timing_runs", self.timing_runs, 0)
        _int("timing_threads", self.timing_threads, 1, none_ok=True)
        _int("opset", self.opset, 7)  # the oldest opset torch.onnx exports
        for name in ("preflight", "check_onnx"):
            _bool(name, getattr(self, name))
        v = self.target_time_limit_s
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise ConfigError(
                f"`target_time_limit_s` must be a number of seconds > 0 or None, got {v!r}",
                argument="target_time_limit_s", value=v,
            )
        object.__setattr__(self, "target_time_limit_s", None if v is None else float(v))
        object.__setattr__(self, "board_profile", board_profile_argument(self.board_profile))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def replace(self, who: str = "ExportConfig", **changes: Any) -> ExportConfig:
        """A copy with ``changes`` (checked again); an unknown name raises ConfigTypeError naming
        it and ``who`` (the function that was given it)."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigTypeError(
                f"{who} got unexpected setting(s) {unknown}; ExportConfig's are {list(self.field_names())}",
                argument=unknown[0], value=changes[unknown[0]],
            )
        values = {f: getattr(self, f) for f in self.field_names()}
        return ExportConfig(**{**values, **changes})

    @classmethod
    def coerce(cls, value: Any, argument: str = "config") -> ExportConfig:
        """``value`` as an ExportConfig: itself, None -> the defaults, a mapping -> its fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls().replace(f"`{argument}`", **value)
        raise ConfigTypeError(
            f"`{argument}` must be an ExportConfig or a dict of its fields, got {value!r} ({type(value).__name__})",
            argument=argument, value=value,
        )


def _preprocessing(value: Any) -> Optional[Preprocessing]:
    if value is None or isinstance(value, Preprocessing):
        return value
    if not isinstance(value, Mapping):
        raise ConfigTypeError(
            f"`preprocessing` must be a Preprocessing or a dict like {{'mean': [...], 'std': [...]}}, got {value!r}",
            argument="preprocessing", value=value,
        )
    try:
        return Preprocessing.from_dict(dict(value))
    except (TypeError, ValueError) as e:  # Preprocessing's own ConfigErrors too: one wording here
        raise ConfigError(f"`preprocessing`: {e}", argument="preprocessing", value=value) from None


def field_docs(cls: type = ExportConfig) -> dict[str, str]:
    """Each field's text in ``cls``'s docstring ``Args:`` section, on one line without rST
    markup: the export command's ``--help`` shows the documentation written once, here."""
    docs: dict[str, str] = {}
    name = None
    in_args = False
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        if line.strip() == "Args:":
            in_args = True
        elif in_args and line and not line.startswith(" "):
            break  # the next section
        elif in_args:
            m = re.match(r"    (\w+): (.*)", line)
            if m:
                name = m.group(1)
                docs[name] = m.group(2)
            elif name is not None and line.strip():
                docs[name] += " " + line.strip()
    return {k: re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", v).replace("``", "") for k, v in docs.items()}
