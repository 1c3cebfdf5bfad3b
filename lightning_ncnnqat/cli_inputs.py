"""What the export command reads: the checkpoint, the model and datamodule classes it names, the
held batch and the preprocessing, each checked with a one-line :class:`UsageError` that names the
argument and the value (the command prints it and exits with 2)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_ncnnqat.qat.batches import (
    INPUT_KEYS,
    Call,
    as_call,
    example_from_batch,
    from_call,
    inputs_like,
    map_tensors,
    positional_names,
)
from lightning_ncnnqat.qat.checkpoint import CheckpointMismatchError, restore_from_checkpoint
from lightning_ncnnqat.errors import NcnnQatError
from lightning_ncnnqat.export.config import ExportConfig, field_docs
from lightning_ncnnqat.ncnn.int8_writer import FLOAT_WEIGHTS
from lightning_ncnnqat.qat.plan_state import checkpoint_plan, plan_key_in, state_of, without_plan
from lightning_ncnnqat.qat.prepared import strip_wrapper_prefixes
from lightning_ncnnqat.preprocessing import Preprocessing


class UsageError(NcnnQatError, ValueError):
    """A mistake in the command's arguments or files: printed as one line, exit code 2."""


def _load_class(spec: str, flag: str = "--model") -> type:
    mod_name, sep, cls_name = spec.partition(":")
    if not sep or not mod_name or not cls_name:
        raise UsageError(f"{flag} must be 'package.module:ClassName', got {spec!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"{flag}: cannot import module '{mod_name}': {e}") from e
    obj: Any = mod
    for part in cls_name.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{flag}: module '{mod_name}' has no attribute '{cls_name}'")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise UsageError(f"{flag}: '{spec}' is not a class")
    if flag == "--model" and not issubclass(obj, torch.nn.Module):
        raise UsageError(f"--model: '{spec}' is not an nn.Module / LightningModule class")
    return obj


def _init_kwargs(cls: type, hparams: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters ``cls.__init__`` accepts (all of them if it takes ``**kwargs``)."""
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return hparams
    return {k: v for k, v in hparams.items() if k in params}


# ---- checkpoint and model


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint saved after QAT started (full or weights-only, or a QAT model's
    ``state_dict()``); UsageError naming what is wrong (a float checkpoint, a weights-only one
    without the plan)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"checkpoint '{p}' does not exist")
    if p.is_dir():
        raise UsageError(f"checkpoint '{p}' is a directory, not a checkpoint file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 (torch.load raises many types for a foreign file)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"'{p}' is not a PyTorch checkpoint (torch.load failed: {type(e).__name__}: {first})") from e
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and plan_key_in(ckpt) is not None:
        ckpt = {"state_dict": ckpt}  # a QAT model's bare state_dict(): it carries the plan
    if not isinstance(ckpt, dict) or not ({"state_dict", "ncnnqat"} & set(ckpt)):
        what = f"a dict with keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UsageError(f"'{p}' is not a Lightning checkpoint: it holds {what}, no 'state_dict'")
    try:
        plan = checkpoint_plan(ckpt)
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"'{p}' holds a QAT plan that cannot be read: {e}") from e
    if plan is None and any(".input_quantizer." in str(k) for k in state_of(ckpt)):
        raise UsageError(
            f"'{p}' holds QAT weights (input ranges) but not the QAT plan: a weights-only checkpoint saved by an "
            "older lightning-ncnnqat. Export a full checkpoint of the run (ModelCheckpoint(save_weights_only=False)), "
            "or save it again with this version"
        )
    if plan is None:
        start = next(
            (v.get("start_epoch") for k, v in (ckpt.get("callbacks") or {}).items()
             if "QATCallback" in str(k) and isinstance(v, dict)),
            None,
        )
        when = f"at epoch {ckpt['epoch']}" if "epoch" in ckpt else ""
        if start is not None:
            when += f" (QATCallback start_epoch={start})"
        kind = "" if "callbacks" in ckpt else " (weights-only)"
        raise UsageError(
            f"'{p}' is a float checkpoint{kind}: it was saved {when + ' ' if when else ''}before QAT started, so it "
            "holds no QAT state. Export a checkpoint saved after QAT started (e.g. the last one of the run), "
            "or train on past start_epoch with trainer.fit(model, ckpt_path=...)"
        )
    return ckpt


def _key_diff(model_keys: set[str], ckpt_keys: set[str]) -> str:
    missing = sorted(model_keys - ckpt_keys)
    unexpected = sorted(ckpt_keys - model_keys)
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:3]}" + (f" ({len(missing)} in all)" if len(missing) > 3 else ""))
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:3]}" + (f" ({len(unexpected)} in all)" if len(unexpected) > 3 else ""))
    return ", ".join(parts)


def build_model(ckpt: dict[str, Any], model_spec: str) -> torch.nn.Module:
    """``model_spec`` built from the checkpoint's hyper-parameters, QAT plan applied, weights loaded."""

    cls = _load_class(model_spec)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    try:
        model = cls(**_init_kwargs(cls, hparams))
    except Exception as e:  # noqa: BLE001 (a user class may raise anything)
        raise UsageError(
            f"--model {model_spec}: cannot build it from the checkpoint's hyper-parameters {sorted(hparams)}: "
            f"{type(e).__name__}: {e}"
        ) from e
    state = without_plan(strip_wrapper_prefixes(state_of(ckpt)))
    plain_keys = set(model.state_dict())
    try:
        restore_from_checkpoint(model, ckpt)
    except CheckpointMismatchError as e:  # keys or shapes, found before anything loaded
        raise UsageError(f"--model {model_spec} does not fit the checkpoint: {e.problem}") from e
    except (ValueError, TypeError, KeyError) as e:  # the QAT plan names modules this class lacks
        diff = _key_diff(plain_keys, {k for k in state if ".input_quantizer." not in k})
        raise UsageError(
            f"--model {model_spec} does not fit the checkpoint: {diff or e} (is it the class the checkpoint was trained with?)"
        ) from e
    except RuntimeError as e:  # load_state_dict: keys or shapes
        diff = _key_diff(set(model.state_dict()), set(state))
        if not diff:
            diff = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise UsageError(f"--model {model_spec} does not fit the checkpoint: {diff}") from e
    return model.eval()


# ---- held batch


def read_held_file(path: str | Path) -> Any:
    """What a held-batch file holds: a Tensor (``.npy``), ``{name: Tensor}`` (``.npz``), or the
    ``torch.save``'d tensor / tuple / dict (``.pt``, ``.pth``; loaded with ``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--held-batch '{p}' does not exist")
    try:
        if p.suffix == ".npy":
            return torch.from_numpy(np.load(p, allow_pickle=False))
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - numpy / torch.load raise many types for a foreign file; re-raised naming it
        raise UsageError(f"--held-batch '{p}' cannot be read as .npy/.npz/.pt: {type(e).__name__}: {e}") from e


def held_call(raw: Any, model: Any, example: Any, what: str) -> Call:
    """The model inputs in ``raw`` (a file's content or a dataloader batch) as a call
    ``(args, kwargs)`` structured like ``example`` (or, without one, like forward's required
    positional inputs). Float tensors with a batch dimension; UsageError naming ``what``."""
    if example is None:
        call = example_from_batch(raw, model)
        if call is None:
            raise UsageError(f"{what} holds no model input (a tensor, an (inputs, targets) batch or a dict of them)")
        args, kwargs = call
    else:
        args, kwargs = as_call(example)
    single = not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor)
    if single and isinstance(raw, dict) and not any(k in raw for k in INPUT_KEYS):
        tensors = [k for k, v in raw.items() if isinstance(v, torch.Tensor)]
        if len(tensors) > 1:
            raise UsageError(f"{what} holds arrays {tensors}: keep one, or name the input one of {list(INPUT_KEYS)}")
    got = inputs_like(raw, args, kwargs, positional_names(model))
    if got is None:
        want = ", ".join(
            [f"{type(a).__name__}{tuple(a.shape[1:]) if isinstance(a, torch.Tensor) else ''}" for a in args]
            + [f"{k}=..." for k in kwargs]
        )
        raise UsageError(f"{what} does not hold the model's inputs ({want}, per sample) in a matching structure")
    for t in [*got[0], *got[1].values()]:
        if isinstance(t, torch.Tensor):
            if not t.is_floating_point():
                raise UsageError(f"{what} holds {t.dtype} values: give the float model inputs (after normalisation)")
            if t.dim() < 2 or len(t) == 0:
                raise UsageError(f"{what} must hold a batch [N, ...] of inputs, got shape {tuple(t.shape)}")
    return map_tensors(lambda t: t.detach().cpu().float(), got)


def load_held_batch(path: str | Path, model: Any = None, example: Any = None) -> Any:
    """Held batch from a file, in the example's form (Tensor, tuple or dict): ``.npy`` (one
    input), ``.npz`` (one array or one named x/input/inputs/image/images; for several inputs,
    arrays named after forward's parameters), ``.pt`` (a tensor, an ``(inputs, targets)`` batch,
    a dict). Without ``example`` and ``model``: the first input tensor."""
    if example is None and model is None:
        example = torch.zeros(1, 1)  # one tensor input, any shape: model_input's rule
    return from_call(*held_call(read_held_file(path), model, example, f"--held-batch '{Path(path)}'"))


def batch_size_of(held: Any) -> int:
    """Samples in a held batch (its first tensor's dim 0)."""
    args, kwargs = as_call(held)
    return next(len(t) for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))


def first_samples(held: Any, n: int) -> Any:
    return from_call(*map_tensors(lambda t: t[:n], as_call(held)))


def build_datamodule(spec: str, ckpt: dict[str, Any]) -> Any:
    """``spec`` built from the checkpoint's datamodule hyper-parameters and state, set up."""
    cls = _load_class(spec, "--datamodule")
    hparams = dict(ckpt.get("datamodule_hyper_parameters") or {})
    try:
        dm = cls(**_init_kwargs(cls, hparams))
        state = ckpt.get(cls.__qualname__)
        if isinstance(state, dict) and hasattr(dm, "load_state_dict"):
            dm.load_state_dict(state)
        if hasattr(dm, "prepare_data"):
            dm.prepare_data()
        if hasattr(dm, "setup"):
            dm.setup("validate")
    except Exception as e:  # noqa: BLE001 (a user class may raise anything)
        raise UsageError(f"--datamodule {spec}: {type(e).__name__}: {e}") from e
    return dm


def held_from_datamodule(dm: Any, spec: str, n: int, model: Any, example: Any) -> Any:
    """The first ``n`` inputs of ``dm.val_dataloader()``, in the example's form."""
    what = f"--datamodule {spec}: a validation batch"
    calls: list[Call] = []
    got = 0
    try:
        loader = dm.val_dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        for batch in loader:
            call = held_call(batch, model, example, what)
            if example is None:
                example = from_call(*call)
            calls.append(call)
            got += batch_size_of(from_call(*call))
            if got >= n:
                break
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's datamodule may raise anything; re-raised naming it
        raise UsageError(f"--datamodule {spec}: val_dataloader() failed: {type(e).__name__}: {e}") from e
    if not calls:
        raise UsageError(f"--datamodule {spec}: the validation loader is empty")
    args = [torch.cat([c[0][i] for c in calls]) if isinstance(a, torch.Tensor) else a for i, a in enumerate(calls[0][0])]
    kwargs = {k: torch.cat([c[1][k] for c in calls]) if isinstance(v, torch.Tensor) else v for k, v in calls[0][1].items()}
    return first_samples(from_call(tuple(args), kwargs), n)


def parse_preprocessing(text: str) -> Preprocessing:
    p = Path(text)
    try:
        d = json.loads(p.read_text() if p.suffix == ".json" and p.is_file() else text)
        return Preprocessing.from_dict(d)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise UsageError(f"--preprocessing: {e} (give JSON like '{{\"mean\": [0.5], \"std\": [0.25], \"channel_order\": \"GRAY\"}}' or a .json file)") from e


def checkpoint_preprocessing(ckpt: dict[str, Any]) -> Preprocessing | None:
    """A datamodule's ``state_dict()`` saved in the checkpoint with a ``preprocessing`` entry."""
    for v in ckpt.values():
        if isinstance(v, dict) and isinstance(v.get("preprocessing"), dict):
            return Preprocessing.from_dict(v["preprocessing"])
    return None


def check_export_dir(path: str | Path) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--export-dir '{p}' exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise UsageError(f"--export-dir '{p}' cannot be created or written: {e.strerror or e}") from e
    return p


# ---- the export's settings: one flag per ExportConfig field

#: ExportConfig fields the command takes, in --help order (``preflight`` is the callback's alone).
EXPORT_FLAGS = (
    "dir", "targets", "float_weights", "preprocessing", "held_batch_size", "layer_check_samples", "timing_runs",
    "timing_threads", "check_onnx", "opset", "target_time_limit_s", "board_profile",
)


def flag_of(field: str) -> str:
    """The command-line flag of an ExportConfig field (``dir`` is ``--export-dir``)."""
    return "--export-dir" if field == "dir" else "--" + field.replace("_", "-")


def _number(kind: type, none_ok: bool) -> Any:
    def parse(text: str) -> Any:
        if none_ok and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            return text  # ExportConfig names the flag's field and the value
    return parse


_PARSE: dict[str, Any] = {
    "targets": lambda t: t if t == "auto" else [x for x in t.split(",") if x],
    "held_batch_size": _number(int, False),
    "layer_check_samples": _number(int, False),
    "timing_runs": _number(int, False),
    "timing_threads": _number(int, True),
    "opset": _number(int, False),
    "target_time_limit_s": _number(float, True),
    "board_profile": lambda t: None if t.strip().lower() == "none" else t,
}

_EXTRA_HELP = {
    "dir": "",
    "targets": " Comma-separated, e.g. x86,arm64-a53.",
    "timing_threads": " 'none': ncnn's default.",
    "target_time_limit_s": " 'none': no limit.",
    "preprocessing": ' JSON or a .json file: {"mean": [...], "std": [...], "input_range": 1.0, '
                     '"channel_order": "RGB"}; default here: the datamodule\'s or the checkpoint\'s.',
    "held_batch_size": " Default: 64 from --datamodule, all of --held-batch.",
}


def add_export_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ExportConfig field the command takes, its help the field's documentation
    (written once, in ExportConfig's docstring). Values are parsed here and checked by
    ExportConfig when :func:`export_config_from_flags` makes it."""
    docs = field_docs(ExportConfig)
    defaults = ExportConfig()
    for field in EXPORT_FLAGS:
        text = docs[field] + _EXTRA_HELP.get(field, f" Default: {getattr(defaults, field)}.")
        kw: dict[str, Any] = {"dest": f"export_{field}", "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if field != "check_onnx":
            kw["metavar"] = field.upper()
        if field == "dir":
            kw["required"] = True
        elif field == "check_onnx":
            kw["action"] = argparse.BooleanOptionalAction
        elif field == "float_weights":
            kw["choices"] = list(FLOAT_WEIGHTS)
        elif field in _PARSE:
            kw["type"] = _PARSE[field]
        parser.add_argument(flag_of(field), **kw)


def export_config_from_flags(args: argparse.Namespace) -> ExportConfig:
    """The ExportConfig the flags give (an absent flag: the field's default).

    Raises:
        UsageError: a value ExportConfig refuses, named by its flag.
    """
    values = {f: getattr(args, f"export_{f}") for f in EXPORT_FLAGS if hasattr(args, f"export_{f}")}
    if "preprocessing" in values:
        values["preprocessing"] = parse_preprocessing(values["preprocessing"])
    try:
        return ExportConfig(**values)
    except NcnnQatError as e:
        flag = flag_of(e.argument) if e.argument in EXPORT_FLAGS else "error"
        raise UsageError(f"{flag}: {e}") from e
