"""What the export command reads: the checkpoint, the model and datamodule classes it names, the
held batch and the preprocessing, each checked with a one-line :class:`UsageError` that names the
argument and the value (the command prints it and exits with 2)."""

from __future__ import annotations

import importlib
import inspect
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batches import INPUT_KEYS, model_input
from .preprocessing import Preprocessing

DEFAULT_HELD_BATCH_SIZE = 64


class UsageError(ValueError):
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
    """A Lightning checkpoint saved after QAT started; UsageError naming what is wrong."""
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
    if not isinstance(ckpt, dict) or not ({"state_dict", "ncnnqat"} & set(ckpt)):
        what = f"a dict with keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UsageError(f"'{p}' is not a Lightning checkpoint: it holds {what}, no 'state_dict'")
    if "ncnnqat" not in ckpt:
        start = next(
            (v.get("start_epoch") for k, v in (ckpt.get("callbacks") or {}).items()
             if "QATCallback" in str(k) and isinstance(v, dict)),
            None,
        )
        when = f"at epoch {ckpt['epoch']}" if "epoch" in ckpt else ""
        if start is not None:
            when += f" (QATCallback start_epoch={start})"
        raise UsageError(
            f"'{p}' is a float checkpoint: it was saved {when + ' ' if when else ''}before QAT started, so it "
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
    from .prepare import restore_from_checkpoint, strip_wrapper_prefixes

    cls = _load_class(model_spec)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    try:
        model = cls(**_init_kwargs(cls, hparams))
    except Exception as e:  # noqa: BLE001 (a user class may raise anything)
        raise UsageError(
            f"--model {model_spec}: cannot build it from the checkpoint's hyper-parameters {sorted(hparams)}: "
            f"{type(e).__name__}: {e}"
        ) from e
    state = strip_wrapper_prefixes(ckpt.get("state_dict") or {})
    plain_keys = set(model.state_dict())
    try:
        restore_from_checkpoint(model, ckpt)
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


def load_held_batch(path: str | Path) -> torch.Tensor:
    """Model inputs ``[N, ...]`` from ``.npy``, ``.npz`` (one array, or one named x/input/inputs/
    image/images) or a ``torch.save``'d tensor / batch / dict (``.pt``, ``.pth``)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--held-batch '{p}' does not exist")
    try:
        if p.suffix == ".npy":
            x: Any = torch.from_numpy(np.load(p, allow_pickle=False))
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                names = list(z.files)
                name = names[0] if len(names) == 1 else next((k for k in INPUT_KEYS if k in names), None)
                if name is None:
                    raise UsageError(
                        f"--held-batch '{p}' holds arrays {names}: keep one, or name the inputs one of {list(INPUT_KEYS)}"
                    )
                x = torch.from_numpy(z[name])
        else:
            x = model_input(torch.load(p, map_location="cpu", weights_only=True))
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--held-batch '{p}' cannot be read as .npy/.npz/.pt: {type(e).__name__}: {e}") from e
    if x is None:
        raise UsageError(f"--held-batch '{p}' holds no tensor (a tensor, an (inputs, targets) batch or a dict of them)")
    if not x.is_floating_point():
        raise UsageError(f"--held-batch '{p}' holds {x.dtype} values: give the float model inputs (after normalisation)")
    if x.dim() < 2 or len(x) == 0:
        raise UsageError(f"--held-batch '{p}' must be a batch [N, ...] of inputs, got shape {tuple(x.shape)}")
    return x.float()


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


def held_from_datamodule(dm: Any, spec: str, n: int) -> torch.Tensor:
    """The first ``n`` inputs of ``dm.val_dataloader()``."""
    try:
        loader = dm.val_dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        chunks, got = [], 0
        for batch in loader:
            x = model_input(batch)
            if x is None:
                raise UsageError(f"--datamodule {spec}: a validation batch holds no input tensor")
            chunks.append(x.detach().cpu().float())
            got += len(x)
            if got >= n:
                break
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--datamodule {spec}: val_dataloader() failed: {type(e).__name__}: {e}") from e
    if not chunks:
        raise UsageError(f"--datamodule {spec}: the validation loader is empty")
    return torch.cat(chunks)[:n]


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
