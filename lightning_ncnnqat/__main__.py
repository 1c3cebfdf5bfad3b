"""Command line: export a QAT checkpoint to ncnn int8 with a parity report and a deployment kit.

    python -m lightning_ncnnqat export CHECKPOINT --model pkg.module:ClassName --export-dir DIR
        [--datamodule pkg.module:ClassName | --held-batch FILE] [--held-batch-size N]
        [--input-shape 1,3,32,32] [--preprocessing JSON_OR_FILE] [--targets x86,arm64-a53]
        [--float-weights fp16] [--timing-runs N] ... [--quiet]

Every field of :class:`~lightning_ncnnqat.ExportConfig` (the settings ``export()`` and
``QATCallback(export=...)`` take) is a flag: ``dir`` is ``--export-dir``, ``float_weights``
``--float-weights`` and so on; ExportConfig checks the values.

Rebuilds the model from a Lightning checkpoint (its ``hyper_parameters`` are passed to the
class), re-applies the QAT plan the checkpoint carries (full and weights-only checkpoints and a
QAT model's ``state_dict()`` carry it; keys with ``module.`` / ``_forward_module.`` prefixes
from DataParallel/DDP are accepted) and exports it.

The held batch (real inputs the int8 model is compared on, in ncnn, against the PyTorch QAT
model) comes from ``--held-batch FILE`` (``.npy``, ``.npz`` or ``torch.save``'d ``.pt``: model
inputs after normalisation, ``[N, ...]``, or an ``(inputs, targets)`` batch; for a model with
several inputs, an ``.npz`` with arrays named after forward's parameters or a ``.pt`` tuple/dict
batch), or from the validation loader of ``--datamodule`` (built from the checkpoint's
datamodule hyper-parameters), ``--held-batch-size`` samples (default 64). Without either,
parity is measured on the one example input, which the report calls weak evidence.

Mistakes in the arguments end in one line ``error: ...`` and exit code 2; an export whose
report flags a layer exits with 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from lightning_ncnnqat.cli_inputs import (
    UsageError,
    add_export_flags,
    batch_size_of,
    build_datamodule,
    build_model,
    check_export_dir,
    checkpoint_preprocessing,
    export_config_from_flags,
    first_samples,
    held_from_datamodule,
    load_checkpoint,
    load_held_batch,
)
from lightning_ncnnqat.errors import ExportError
from lightning_ncnnqat.export.api import export
from lightning_ncnnqat.export.config import ExportConfig
from lightning_ncnnqat.ncnn.targets import main as targets_main
from lightning_ncnnqat.preprocessing import find_preprocessing


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated ints like 1,3,32,32, got {text!r}")
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--input-shape must be positive ints, got {text!r}")
    return shape


# ---- the command


def export_checkpoint(
    checkpoint: str | Path,
    model_spec: str,
    config: ExportConfig,
    *,
    input_shape: tuple[int, ...] | None = None,
    held_batch: str | Path | None = None,
    datamodule: str | None = None,
    whole_held_file: bool = True,
    verbose: bool = True,
) -> Any:
    """Rebuild ``model_spec`` from ``checkpoint`` and export it with ``config`` (what the CLI runs;
    ``export()`` and ``QATCallback(export=...)`` take the same :class:`ExportConfig`).

    The held batch: the first ``config.held_batch_size`` inputs of ``datamodule``'s validation
    loader, or the inputs of the ``held_batch`` file (all of them with ``whole_held_file``).

    Raises:
        UsageError: a missing/foreign/float checkpoint, a class that does not fit it, an
            unreadable held batch or datamodule, an unwritable export dir, no input shape.
        ExportError: an export step failed.
    """
    if held_batch is not None and datamodule is not None:
        raise UsageError("give --held-batch or --datamodule, not both")
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt, model_spec)
    if input_shape is not None:
        example: Any = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    else:
        example = getattr(model, "example_input_array", None)
    dm = None
    held, source = None, "held batch"
    if held_batch is not None:
        held = load_held_batch(held_batch, model, example)
        if not whole_held_file:
            held = first_samples(held, config.held_batch_size)
        source = f"{batch_size_of(held)} inputs from {held_batch}"
    elif datamodule is not None:
        dm = build_datamodule(datamodule, ckpt)
        held = held_from_datamodule(dm, datamodule, config.held_batch_size, model, example)
        source = f"first {batch_size_of(held)} inputs of {datamodule}.val_dataloader()"
    if example is None:
        if held is None:
            raise UsageError(
                f"{type(model).__name__} has no example_input_array: pass --input-shape (e.g. --input-shape "
                "1,3,32,32), or a held batch (--held-batch / --datamodule) whose first sample is used"
            )
        example = first_samples(held, 1)
    pre = find_preprocessing(config.preprocessing, dm, model) or checkpoint_preprocessing(ckpt)
    out = check_export_dir(config.dir)
    if held is None and verbose:
        print(
            "note: no held batch: parity is measured on the example input only; pass --datamodule "
            "pkg.module:DataModule or --held-batch FILE for real samples",
            file=sys.stderr,
        )
    try:
        return export(
            model, out, example_input=example, held_batch=held, held_batch_source=source, config=config,
            verbose=verbose, preprocessing=pre,
        )
    except (TypeError, ValueError) as e:  # argument checks of export() (held batch shape, targets, ...)
        raise UsageError(str(e)) from e


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_ncnnqat",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "export",
        help="export a QAT checkpoint to ONNX + ncnn int8 with a parity report and a deployment kit",
        description="Export a QAT checkpoint: ONNX, ncnn float32 and int8 models, tables, report.json "
        "(parity of ncnn int8 vs the PyTorch QAT model) and a deployment kit (DEPLOY.md, run_int8.py, main.cpp).",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument(
        "checkpoint", help="Lightning checkpoint (.ckpt, full or weights-only) saved after QAT started"
    )
    ex.add_argument("--model", required=True, help="the LightningModule class, 'package.module:ClassName'")
    ex.add_argument(
        "--input-shape", type=_shape, default=None,
        help="trace input shape with batch, e.g. 1,3,32,32 (default: the model's example_input_array, "
        "else the held batch's first sample)",
    )
    held = ex.add_mutually_exclusive_group()
    held.add_argument(
        "--held-batch", default=None,
        help="real model inputs for the parity report: .npy / .npz / torch.save'd .pt, shape [N, ...] "
        "(after normalisation), or an (inputs, targets) batch; several inputs: .npz arrays named after "
        "forward's parameters, or a .pt tuple/dict batch",
    )
    held.add_argument(
        "--datamodule", default=None,
        help="'package.module:ClassName' of the LightningDataModule: built from the checkpoint's datamodule "
        "hyper-parameters; its validation loader gives the held batch (and its `preprocessing` the deploy note's)",
    )
    add_export_flags(ex)  # --export-dir, --targets, --float-weights ...: the fields of ExportConfig
    ex.add_argument("--quiet", action="store_true", help="do not print progress and the summary")
    sub.add_parser(
        "setup-arm",
        help="build the emulated ARM64 targets (qemu + the aarch64 ncnn wheel) into a user cache, once; "
        "same as `python -m lightning_ncnnqat.ncnn.targets setup`",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["setup-arm"]:  # the emulated ARM targets' set-up (lightning_ncnnqat.ncnn.targets)
        return targets_main(["setup", *argv[1:]])
    args = _parser().parse_args(argv)
    try:
        report = export_checkpoint(
            args.checkpoint, args.model, export_config_from_flags(args), input_shape=args.input_shape,
            held_batch=args.held_batch, datamodule=args.datamodule,
            whole_held_file=not hasattr(args, "export_held_batch_size"), verbose=not args.quiet,
        )
    except (UsageError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1

if __name__ == "__main__":
    sys.exit(main())
