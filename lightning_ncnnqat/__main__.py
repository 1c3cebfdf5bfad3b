"""Command line: ``python -m lightning_ncnnqat export CHECKPOINT --model pkg.module:ClassName --export-dir DIR``.

Rebuilds the model from a Lightning checkpoint (its ``hyper_parameters`` are passed to the
class), re-applies the QAT plan the checkpoint carries (``restore_from_checkpoint``: keys with
``module.`` / ``_forward_module.`` prefixes from DataParallel/DDP are accepted) and exports it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

import torch


def _load_class(spec: str) -> type:
    mod_name, sep, cls_name = spec.partition(":")
    if not sep or not mod_name or not cls_name:
        raise SystemExit(f"--model must be 'package.module:ClassName', got {spec!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise SystemExit(f"--model: cannot import module '{mod_name}': {e}") from e
    obj = mod
    for part in cls_name.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"--model: module '{mod_name}' has no attribute '{cls_name}'")
        obj = getattr(obj, part)
    if not isinstance(obj, type) or not issubclass(obj, torch.nn.Module):
        raise SystemExit(f"--model: '{spec}' is not an nn.Module / LightningModule class")
    return obj


def _init_kwargs(cls: type, hparams: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters ``cls.__init__`` accepts (all of them if it takes ``**kwargs``)."""
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return hparams
    return {k: v for k, v in hparams.items() if k in params}


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated ints like 1,3,32,32, got {text!r}")
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--input-shape must be positive ints, got {text!r}")
    return shape


def export_checkpoint(
    checkpoint: str | Path,
    model_spec: str,
    export_dir: str | Path,
    input_shape: tuple[int, ...] | None = None,
    held_batch: str | Path | None = None,
    verbose: bool = True,
) -> Any:
    """Rebuild ``model_spec`` from ``checkpoint`` and export it (what the CLI runs)."""
    from .export import export
    from .prepare import restore_from_checkpoint

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict):
        raise SystemExit(f"{checkpoint}: not a checkpoint dict (got {type(ckpt).__name__})")
    cls = _load_class(model_spec)
    model = cls(**_init_kwargs(cls, dict(ckpt.get("hyper_parameters") or {})))
    restore_from_checkpoint(model, ckpt)
    model.eval()
    example = None
    if input_shape is not None:
        example = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    held = None
    if held_batch is not None:
        held = torch.load(held_batch, map_location="cpu", weights_only=False)
    return export(model, export_dir, example_input=example, held_batch=held, verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_ncnnqat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="export a QAT checkpoint to ONNX + ncnn int8 with a parity report")
    ex.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) saved during/after QAT")
    ex.add_argument("--model", required=True, help="the LightningModule class, 'package.module:ClassName'")
    ex.add_argument("--export-dir", required=True, help="directory to write the export into")
    ex.add_argument("--input-shape", type=_shape, default=None, help="e.g. 1,3,32,32 (default: example_input_array)")
    ex.add_argument("--held-batch", default=None, help="torch.save'd tensor (or (inputs, targets)) for parity")
    ex.add_argument("--quiet", action="store_true", help="do not print the summary")
    args = parser.parse_args(argv)
    from .export import ExportError

    try:
        report = export_checkpoint(
            args.checkpoint, args.model, args.export_dir, args.input_shape, args.held_batch, not args.quiet
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
