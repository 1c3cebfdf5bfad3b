"""Command line: export a QAT checkpoint to ncnn int8 with a parity report and a deployment kit.

    python -m lightning_ncnnqat export CHECKPOINT --model pkg.module:ClassName --export-dir DIR
        [--datamodule pkg.module:ClassName | --held-batch FILE] [--held-batch-size N]
        [--input-shape 1,3,32,32] [--preprocessing JSON_OR_FILE] [--quiet]

Rebuilds the model from a Lightning checkpoint (its ``hyper_parameters`` are passed to the
class), re-applies the QAT plan the checkpoint carries (full and weights-only checkpoints and a
QAT model's ``state_dict()`` carry it; keys with ``module.`` / ``_forward_module.`` prefixes
from DataParallel/DDP are accepted) and exports it.

The held batch (real inputs the int8 model is compared on, in ncnn, against the PyTorch QAT
model) comes from ``--held-batch FILE`` (``.npy``, ``.npz`` or ``torch.save``'d ``.pt``: model
inputs after normalisation, ``[N, ...]``, or an ``(inputs, targets)`` batch; for a model with
several inputs, an ``.npz`` with arrays named after forward's parameters or a ``.pt`` tuple/dict
batch), or from the validation loader of ``--datamodule`` (built from the checkpoint's
datamodule hyper-parameters), ``--held-batch-size`` samples (default 64). Without either, parity is measured on the one example
input, which the report calls weak evidence.

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
    DEFAULT_HELD_BATCH_SIZE,
    UsageError,
    batch_size_of,
    build_datamodule,
    build_model,
    check_export_dir,
    checkpoint_preprocessing,
    first_samples,
    held_from_datamodule,
    load_checkpoint,
    load_held_batch,
    parse_preprocessing,
)
from lightning_ncnnqat.preprocessing import Preprocessing, find_preprocessing


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated ints like 1,3,32,32, got {text!r}")
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--input-shape must be positive ints, got {text!r}")
    return shape


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--held-batch-size must be an int >= 1, got {text!r}")
    return n


# ---- the command


def export_checkpoint(
    checkpoint: str | Path,
    model_spec: str,
    export_dir: str | Path,
    input_shape: tuple[int, ...] | None = None,
    held_batch: str | Path | None = None,
    verbose: bool = True,
    *,
    datamodule: str | None = None,
    held_batch_size: int | None = None,
    preprocessing: Preprocessing | dict[str, Any] | None = None,
    targets: str | list[str] = "auto",
    float_weights: str = "fp32",
) -> Any:
    """Rebuild ``model_spec`` from ``checkpoint`` and export it (what the CLI runs).

    Raises:
        UsageError: a missing/foreign/float checkpoint, a class that does not fit it, an
            unreadable held batch or datamodule, an unwritable export dir, no input shape.
        ExportError: an export step failed.
    """
    from lightning_ncnnqat.export import export

    from lightning_ncnnqat.export.api import resolve_targets

    if held_batch is not None and datamodule is not None:
        raise UsageError("give --held-batch or --datamodule, not both")
    try:
        resolve_targets(targets)
    except ValueError as e:
        raise UsageError(f"--targets: {e}") from e
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
        if held_batch_size is not None:
            held = first_samples(held, held_batch_size)
        source = f"{batch_size_of(held)} inputs from {held_batch}"
    elif datamodule is not None:
        dm = build_datamodule(datamodule, ckpt)
        held = held_from_datamodule(dm, datamodule, held_batch_size or DEFAULT_HELD_BATCH_SIZE, model, example)
        source = f"first {batch_size_of(held)} inputs of {datamodule}.val_dataloader()"
    if example is None:
        if held is None:
            raise UsageError(
                f"{type(model).__name__} has no example_input_array: pass --input-shape (e.g. --input-shape "
                "1,3,32,32), or a held batch (--held-batch / --datamodule) whose first sample is used"
            )
        example = first_samples(held, 1)
    pre = find_preprocessing(preprocessing, dm, model) or checkpoint_preprocessing(ckpt)
    out = check_export_dir(export_dir)
    if held is None and verbose:
        print(
            "note: no held batch: parity is measured on the example input only; pass --datamodule "
            "pkg.module:DataModule or --held-batch FILE for real samples",
            file=sys.stderr,
        )
    try:
        return export(
            model, out, example_input=example, held_batch=held, held_batch_source=source, verbose=verbose,
            targets=targets, preprocessing=pre, float_weights=float_weights,
        )
    except (TypeError, ValueError) as e:  # argument checks of export() (held batch shape, targets, ...)
        raise UsageError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["setup-arm"]:  # the emulated ARM targets' set-up (lightning_ncnnqat.ncnn.targets)
        from lightning_ncnnqat.ncnn.targets import main as targets_main

        return targets_main(["setup", *argv[1:]])
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
    ex.add_argument("--export-dir", required=True, help="directory to write the export into (created)")
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
    ex.add_argument(
        "--held-batch-size", type=_positive, default=None,
        help=f"samples of the held batch to compare on (default {DEFAULT_HELD_BATCH_SIZE} from --datamodule; "
        "all of --held-batch)",
    )
    ex.add_argument(
        "--preprocessing", default=None,
        help='input normalisation for DEPLOY.md, JSON or a .json file: {"mean": [...], "std": [...], '
        '"input_range": 1.0, "channel_order": "RGB"} (default: the datamodule\'s `preprocessing`)',
    )
    ex.add_argument(
        "--targets", default="auto", type=lambda t: t if t == "auto" else [x for x in t.split(",") if x],
        help="where parity runs: 'auto' (this machine + every emulated ARM profile that is set up) or a "
        "comma-separated list of x86, arm64-a53, arm64-a76",
    )
    ex.add_argument(
        "--float-weights", default="fp32", choices=["fp32", "fp16"],
        help="how model.int8.bin stores the weights of layers kept in float: fp32 (as trained) or fp16 "
        "(byte-identical to ncnn2int8)",
    )
    ex.add_argument("--quiet", action="store_true", help="do not print progress and the summary")
    sub.add_parser(
        "setup-arm",
        help="build the emulated ARM64 targets (qemu + the aarch64 ncnn wheel) into a user cache, once; "
        "same as `python -m lightning_ncnnqat.ncnn.targets setup`",
        add_help=False,
    )
    args = parser.parse_args(argv)
    from lightning_ncnnqat.export import ExportError

    try:
        pre = None if args.preprocessing is None else parse_preprocessing(args.preprocessing)
        report = export_checkpoint(
            args.checkpoint, args.model, args.export_dir, args.input_shape, args.held_batch, not args.quiet,
            datamodule=args.datamodule, held_batch_size=args.held_batch_size, preprocessing=pre,
            targets=args.targets, float_weights=args.float_weights,
        )
    except (UsageError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
