"""QATCallback: ncnn-faithful quantization-aware training from a chosen epoch.

Lightning hooks only; the surgery lives in :mod:`lightning_ncnnqat.qat.prepare`, the export in
:mod:`lightning_ncnnqat.export`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Literal, Optional, Union

from torch import Tensor

from lightning_ncnnqat.qat.batches import as_call, example_from_batch, from_call, map_tensors
from lightning_ncnnqat.qat.config import QATConfig
from lightning_ncnnqat.preprocessing import find_preprocessing
from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.prepared import check_ranges, input_quantizers
from lightning_ncnnqat.qat.prepare import check_skip
from lightning_ncnnqat.qat.checkpoint import follow_checkpoint_plan
from lightning_ncnnqat.start import start_qat
from lightning_ncnnqat.qat.dtypes import float32_example, float32_model
from lightning_ncnnqat.errors import ConfigError
from lightning_ncnnqat.callbacks._compat import CALLBACK_BASES, override, rank_zero_info, rank_zero_warn
from lightning_ncnnqat.callbacks._fit_start import (
    check_example_runs, check_max_epochs, check_precision, check_start_reachable, debug_run, model_example,
    note_debug_run, qat_start_epoch,
)
from lightning_ncnnqat.callbacks._averaging import AveragedCopies, averaging_window_warnings
from lightning_ncnnqat.callbacks._bn_stats import freeze_if_due
from lightning_ncnnqat.callbacks._computed_watch import ComputedWatch
from lightning_ncnnqat.callbacks._watch import CollapseWatch, divergence_hint, note_collapse
from lightning_ncnnqat.callbacks._held import check_held_batch, held_batch, model_probe
from lightning_ncnnqat.callbacks._rank_zero import on_rank_zero, ranges_unsynced
from lightning_ncnnqat.callbacks._rng import user_rng_untouched
from lightning_ncnnqat.callbacks._train_batches import train_inputs

class QATCallback(*CALLBACK_BASES):  # type: ignore[misc]
    """Quantization-aware training for ncnn int8, from epoch ``start_epoch`` to the end of fit.

    At the start of epoch ``start_epoch`` it folds every BatchNorm-like module (any
    ``_BatchNorm`` subclass, SyncBatchNorm, BN + activation modules such as timm's
    ``BatchNormAct2d``, frozen BNs) whose eval math is BN and that alone reads a Conv2d/Linear
    output into that layer (statistics frozen); a layer feeding a BN-like module that cannot be
    folded stays float. It fake-quantizes every layer ncnn runs in int8: weights per output
    channel (per group for depthwise convs), 6-bit for 3x3 stride-1 convs, inputs per tensor
    from a moving-average range shared by all readers of a tensor. Layers that run only in
    eval mode (no training step gives them a range) stay float. Ranges move only in training
    steps. At the end of fit (global rank 0) it exports the ONNX model, the ncnn tables, a
    ready-to-run int8 ncnn model and a parity report.

    Args:
        start_epoch: epoch at which QAT starts (0 = from the first epoch). Fine-tuning a
            trained float model for a few epochs is the usual recipe.
        momentum: weight of the newest batch in each input range's moving average, in (0, 1].
        six_bit_3x3: 6-bit weights for 3x3 stride-1 dilation-1 convs, as ncnn2table does.
        skip: module names or fnmatch patterns of layers to keep in float.
        quantize_grouped_convs: grouped convs (1 < groups < channels) in int8: ``"auto"``
            (default) runs them in int8 except where the preflight measures that a target
            computes them wrongly (kept in float before training, named per target); ``True``
            int8 without that; ``False`` float.
        sync_ranges: all-reduce input ranges across processes under DDP.
        export_dir: where ``on_fit_end`` writes the export; relative paths are resolved
            against ``trainer.default_root_dir``. ``None`` turns export off.
        example_input: input used to trace the model and export it; defaults to the
            LightningModule's ``example_input_array``, then to the first training batch (its
            first k elements, or its values under forward's names for a dict batch, where k is
            the number of forward's required positional parameters).
        held_batch_size: number of validation inputs the parity report compares on.
        log_every_n_steps: how often input ranges and clipped fractions are logged (0 = never).
        verbose: print the QAT summary and the export summary.
        preflight: when ``export_dir`` is set, check when fit starts that it can be written,
            and right after QAT starts run the export chain (ONNX, pnnx, layer matching, int8
            writer) on the just-prepared model, so a model that cannot export fails within
            seconds of QAT start, naming the step and layer, not after the last epoch; it also
            runs every int8 layer once on each target and keeps in float, before training, the
            layers a target computes wrongly.
        targets: where the export (and the preflight) checks the int8 model: ``"auto"`` (this
            machine plus the emulated ARM profiles that are set up: ``python -m
            lightning_ncnnqat setup-arm``), or a list of ``"x86"``, ``"arm64-a53"``, ``"arm64-a76"``.
        preprocessing: the input normalisation, for the deployment note (``{"mean": [...],
            "std": [...]}`` or a :class:`~lightning_ncnnqat.Preprocessing`); default: the
            datamodule's or the LightningModule's ``preprocessing`` attribute.
        range_init: where each input threshold starts: ``"first_batch"`` (the first QAT batch's
            absmax), or ncnn2table's calibration ``"absmax"``, ``"kl"``, ``"aciq"`` on the
            BN-folded float model over the first ``calibration_batches`` training batches
            (run at QAT start on global rank 0, broadcast to every rank).
        calibration_batches: training batches the calibrated start reads.
        ranges: how thresholds move during QAT: ``"moving_average"`` (with ``momentum``),
            ``"fixed"`` (where ``range_init`` put them) or ``"learned"`` (trained: Adam on
            ``log(threshold)`` with ``range_lr``, stepped with the first optimizer, gradients
            un-scaled under AMP and averaged over DDP ranks; its state is in the checkpoint).
        range_lr: learning rate of the learned thresholds' log.
        float_weights: how model.int8.bin stores the weights of layers kept in float:
            ``"fp32"`` (the float32 weights QAT trained; parity at the float32 floor) or
            ``"fp16"`` (what ncnn2int8 writes, byte-identical to the tool; smaller).
        freeze_bn_after: epochs after QAT starts during which the folded BatchNorms' statistics
            keep training (batch statistics in training steps, as torch.ao's ConvBn before
            ``freeze_bn_stats``); 0 (default): frozen when QAT starts.

    ``example_input`` follows Lightning's ``example_input_array`` convention: a Tensor (one
    input), a tuple/list (positional inputs, ``model(*x)``) or a dict (keyword inputs,
    ``model(**x)``). A required ``forward`` parameter it does not supply raises when QAT starts.

    Checkpoints cross the QAT boundary both ways (``fit``/``validate``/``test``/``predict`` with
    ``ckpt_path``): a checkpoint saved during QAT re-applies its plan to a float model before
    the weights load, and a float checkpoint loaded into a QAT-prepared model first returns the
    model to float (same Parameters; QAT starts again at ``start_epoch``).

    Fit-start rules (:mod:`._fit_start`): ``precision`` "32-true", "*-mixed" and "bf16-true" /
    "16-true" train with QAT (thresholds stay float32; the export and its preflight run on a
    float32 copy); "64-true", Transformer Engine and bitsandbytes are refused in ``setup``. A
    ``start_epoch`` that ``max_epochs`` or ``max_steps`` never reaches is refused before the
    first training step; ``max_time`` warns. Under ``fast_dev_run`` QAT starts at once and the
    export runs in a temporary directory (``export_dir`` is not touched).
    """

    def __init__(
        self,
        start_epoch: int = 0,
        momentum: float = 0.1,
        six_bit_3x3: bool = True,
        skip: Optional[list[str]] = None,
        quantize_grouped_convs: Union[bool, str] = "auto",
        sync_ranges: bool = True,
        export_dir: Optional[str] = "ncnn_export",
        example_input: Any = None,
        held_batch_size: int = 64,
        log_every_n_steps: int = 50,
        verbose: bool = True,
        preflight: bool = True,
        targets: Union[str, list[str]] = "auto",
        preprocessing: Any = None,
        range_init: Literal["first_batch", "absmax", "kl", "aciq"] = "first_batch",
        calibration_batches: int = 16,
        ranges: Literal["moving_average", "fixed", "learned"] = "moving_average",
        range_lr: float = 1e-3,
        float_weights: Literal["fp32", "fp16"] = "fp32",
        freeze_bn_after: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("start_epoch", start_epoch, 0),
            ("held_batch_size", held_batch_size, 1),
            ("log_every_n_steps", log_every_n_steps, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
        if export_dir is not None and not isinstance(export_dir, (str, os.PathLike)):
            raise TypeError(f"`export_dir` must be a path or None, got {export_dir!r}")
        if example_input is not None:
            try:
                args, kwargs = as_call(example_input)
            except TypeError as exc:
                raise TypeError(f"`example_input`: {exc}") from None
            if not any(isinstance(v, Tensor) for v in (*args, *kwargs.values())):
                raise TypeError(f"`example_input` holds no Tensor: {example_input!r}")
        for name, flag in (("verbose", verbose), ("preflight", preflight)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {flag!r}")
        self.config = QATConfig(
            momentum=momentum,
            six_bit_3x3=six_bit_3x3,
            skip=tuple(skip or ()),
            quantize_grouped_convs=quantize_grouped_convs,
            sync_ranges=sync_ranges,
            range_init=range_init,
            calibration_batches=calibration_batches,
            ranges=ranges,
            range_lr=range_lr,
            freeze_bn_after=freeze_bn_after,
        )
        self.start_epoch = start_epoch
        self.export_dir = None if export_dir is None else os.fspath(export_dir)
        self.example_input = example_input
        self.held_batch_size = held_batch_size
        self.log_every_n_steps = log_every_n_steps
        self.verbose = verbose
        self.preflight = preflight
        from lightning_ncnnqat.export.api import resolve_targets
        from lightning_ncnnqat.preprocessing import Preprocessing

        resolve_targets(targets)  # raises naming an unknown target
        self.targets = targets if isinstance(targets, str) else list(targets)
        self.preprocessing = None if preprocessing is None else Preprocessing.from_dict(preprocessing)
        from lightning_ncnnqat.ncnn.int8_writer import check_float_weights

        self.float_weights = check_float_weights(float_weights)
        self.plan: QATPlan | None = None
        self.export_report: Any = None
        self._traced_example: Any = None
        self._learned: Any = None  # ranges.LearnedRanges while thresholds are learned
        self._learned_state: Any = None  # its optimizer state, from a checkpoint
        self._copies = AveragedCopies()  # averaging callbacks' model copies follow the plan
        self._watch = CollapseWatch()  # validation across the QAT start
        self._computed: ComputedWatch | None = None  # weights pruned / parametrized after the start
        self._qat_epoch: int | None = None  # the epoch QAT started in (freeze_bn_after counts from it)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(start_epoch=self.start_epoch)

    @property
    def active(self) -> bool:
        """Whether the model is being trained with fake quantization."""
        return self.plan is not None

    # ---- set-up and resume ------------------------------------------------------------

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            check_max_epochs(trainer, self.start_epoch)
            for line in averaging_window_warnings(trainer, self.start_epoch):
                rank_zero_warn(line)
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy or "ModelParallel" in strategy:
            raise ConfigError(
                f"QATCallback does not support the {strategy} strategy: it shards parameters, so layers cannot "
                "be fake-quantized per output channel or exported from one rank. Use strategy='ddp' or 'ddp_spawn'.",
                argument="strategy", value=strategy,
            )
        check_precision(trainer)
        if stage == "fit" and get_plan(pl_module) is None:
            from lightning_ncnnqat.qat.ranges import check_one_input

            check_one_input(pl_module, self.config, "QATCallback")
        self.plan = get_plan(pl_module)
        self._install_restore_hook(pl_module)
        if stage == "fit" and debug_run(trainer):
            note_debug_run(trainer, self.start_epoch, self.export_dir)
        elif stage == "fit" and self.preflight and self.export_dir is not None:
            path = self._export_path(trainer)

            def check() -> None:
                from lightning_ncnnqat.export.preflight import check_export_dir

                check_export_dir(path)

            on_rank_zero(trainer, "export_dir check", check)

    def _install_restore_hook(self, pl_module: Any) -> None:
        """Re-apply the checkpoint's QAT plan before Lightning loads the state dict into the model.

        Lightning calls ``LightningModule.on_load_checkpoint`` with the loaded checkpoint just
        before loading the weights; the callbacks' own hook comes only after, too late to add the
        quantizer buffers and fold the BatchNorms the checkpoint's state dict expects.
        """
        if "on_load_checkpoint" in pl_module.__dict__:
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            # the plan of any checkpoint form (weights-only too); atomic: a checkpoint that does
            # not fit raises here and leaves the model as it was (lightning_ncnnqat.qat.checkpoint)
            before = get_plan(pl_module)
            follow_checkpoint_plan(pl_module, checkpoint, strict=pl_module.strict_loading)
            if pl_module._trainer is not None:  # averaging copies take the plan before their callbacks load
                self._copies.follow(pl_module._trainer, pl_module, self, sync=False)
            self.plan = get_plan(pl_module)
            if before is not None and self.plan is None:
                rank_zero_info(
                    "QATCallback: the checkpoint was saved before QAT started; the model is returned to float "
                    "to load it (QAT starts again at `start_epoch`)"
                )
            elif before is not None and self.plan is not before:
                rank_zero_info("QATCallback: the checkpoint was saved with another QAT plan; the model takes its plan")
            return original(checkpoint)

        pl_module.__dict__["on_load_checkpoint"] = on_load_checkpoint

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        pl_module.__dict__.pop("on_load_checkpoint", None)

    @override
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.plan is not None:
            checkpoint["ncnnqat"] = self.plan.to_dict()

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"start_epoch": self.start_epoch, "active": self.active, "qat_epoch": self._qat_epoch}
        learned = self._learned.state_dict() if self._learned is not None else self._learned_state
        if learned is not None:
            state["learned_ranges"] = learned
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._learned_state = state_dict.get("learned_ranges")
        self._qat_epoch = state_dict.get("qat_epoch", self._qat_epoch)
        if self._learned is not None:
            self._learned.load_state_dict(self._learned_state)

    # ---- switching QAT on -------------------------------------------------------------

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        check_start_reachable(trainer, pl_module, self.start_epoch)  # batches per epoch known, no step run
        if get_plan(pl_module) is None:  # after configure_model: every module exists
            check_skip(pl_module, self.config.skip, "QATCallback")
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            return
        example = model_example(trainer, pl_module, example)
        with user_rng_untouched():
            check_example_runs(pl_module, example, "example_input" if self.example_input is not None
                               else "example_input_array")
            if self.export_dir is not None:
                self._check_held(trainer, pl_module, example)

    def _check_held(self, trainer: Any, pl_module: Any, example: Any) -> None:
        warning = check_held_batch(trainer, pl_module, example, self.held_batch_size)
        if warning:
            rank_zero_warn(warning)

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.plan is None and trainer.current_epoch >= qat_start_epoch(trainer, self.start_epoch):
            example = self.example_input if self.example_input is not None else pl_module.example_input_array
            if example is not None:
                self._activate(trainer, pl_module, example)
        qat_epoch = self._qat_epoch if self._qat_epoch is not None else self.start_epoch
        if freeze_if_due(trainer, pl_module, self.plan, qat_epoch):
            self._copies.freeze_bn_stats(trainer, pl_module, self, frozen=True)
            if self.verbose:
                rank_zero_info(f"QATCallback: epoch {trainer.current_epoch}: folded BatchNorm statistics frozen")
        if self.plan is not None and self._computed is None:  # resumed: the plan came with the checkpoint
            self._computed = ComputedWatch(pl_module, self.plan)
        elif self.plan is not None:
            line = self._computed.at_epoch_start(pl_module, self.plan, trainer.current_epoch)
            if line and self.verbose:
                rank_zero_info(f"QATCallback: {line}")

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.plan is None and trainer.current_epoch >= qat_start_epoch(trainer, self.start_epoch):
            call = example_from_batch(batch, pl_module)
            if call is None:
                raise ValueError(
                    "QATCallback needs an example input to trace the model: set `example_input_array` on "
                    "the LightningModule or pass `example_input=` (the training batch does not hold the inputs "
                    "forward() takes: a Tensor, a list/tuple starting with them, or a dict holding them)"
                )
            self._activate(trainer, pl_module, from_call(*map_tensors(lambda t: t[:1], call)))
        if (
            self.plan is not None
            and self.log_every_n_steps
            and trainer.loggers
            and trainer.global_step % self.log_every_n_steps == 0
        ):
            for q in input_quantizers(pl_module).values():
                q.record_stats = True

    def _activate(self, trainer: Any, pl_module: Any, example: Any) -> None:
        example = model_example(trainer, pl_module, example)  # on its device, cast as batches are
        if self.export_dir is not None and self.example_input is None and pl_module.example_input_array is None:
            self._check_held(trainer, pl_module, example)  # traced on the first batch: not checked at train start
        self._traced_example = example
        measure = None
        if self.preflight and self.export_dir is not None:

            def measure(model: Any, ex: Any) -> dict[str, dict[str, float]]:
                from lightning_ncnnqat.export.preflight import preflight

                held, _ = held_batch(trainer, pl_module, ex, self.held_batch_size, model_probe(trainer, pl_module))
                return preflight(model, ex, verbose=self.verbose, targets=self.targets,  # ranges set from `held`
                                 float_weights=self.float_weights, held_batch=held)

        def log(line: str) -> None:
            if self.verbose:
                rank_zero_info(f"QATCallback: {line}")

        with user_rng_untouched():  # calibration and the preflight read the user's loaders
            self.plan = start_qat(
                pl_module, example, self.config, calibration=lambda n: train_inputs(trainer, pl_module, n),
                measure=measure, run_once=self._run_once(trainer, pl_module), log=log,
                warn=lambda line: rank_zero_warn(f"QATCallback: {line}"), who="QATCallback",
            )
        if self.verbose:
            rank_zero_info(f"\nEpoch {trainer.current_epoch}: " + self.plan.summary())
        self._qat_epoch = int(trainer.current_epoch)
        self._computed = ComputedWatch(pl_module, self.plan)
        self._watch.qat_started(trainer)
        copies = self._copies.follow(trainer, pl_module, self, sync=True)
        if copies and self.verbose:
            rank_zero_info(f"QATCallback: model copies follow the QAT plan: {', '.join(copies)}")

    @staticmethod
    def _run_once(trainer: Any, pl_module: Any) -> Any:
        """The QAT start's ``run_once``: ``fn`` on global rank 0 alone (ranges not all-reduced),
        its result broadcast so every rank starts from the same thresholds and plan."""

        def run_once(what: str, fn: Any) -> Any:
            box: dict[str, Any] = {}

            def run() -> None:
                with ranges_unsynced(pl_module):
                    box["result"] = fn()

            on_rank_zero(trainer, what, run)
            result = box.get("result")
            return trainer.strategy.broadcast(result, src=0) if trainer.world_size > 1 else result

        return run_once

    # ---- learned ranges ---------------------------------------------------------------

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.plan is None or self.plan.config.ranges != "learned":
            return
        if trainer.optimizers and optimizer is not trainer.optimizers[0]:
            return  # one threshold step per step of the first optimizer
        if self._learned is None:
            from lightning_ncnnqat.qat.ranges import LearnedRanges

            self._learned = LearnedRanges(pl_module, self.plan.config.range_lr)
            self._learned.load_state_dict(self._learned_state)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        divisor = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        reduce = None
        if trainer.world_size > 1:
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="mean")  # noqa: E731
        self._learned.step(divisor, reduce)

    # ---- monitoring -------------------------------------------------------------------

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.plan is not None:
            self._copies.after_step(pl_module)  # copies' ranges start from the first step's
        if self.plan is None or not self.log_every_n_steps:
            return
        metrics: dict[str, Tensor] = {}
        for name, q in input_quantizers(pl_module).items():
            if q.record_stats:
                q.record_stats = False
                metrics[f"qat_range/{name}"] = q.running_absmax.detach().reshape(())
                if q.last_clip_fraction is not None:
                    metrics[f"qat_clipped/{name}"] = q.last_clip_fraction
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=True, prog_bar=False)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.plan is not None:
            check_ranges(pl_module, hint=divergence_hint(trainer, self.start_epoch))

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        warning = self._watch.on_validation_end(trainer, self.plan is not None, self.start_epoch)
        if warning:
            rank_zero_warn(warning)

    # ---- export -----------------------------------------------------------------------

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        late = self._computed.at_fit_end(pl_module, self.plan) if self._computed and self.plan else None
        if late:  # pruned / parametrized after the last epoch started: the folded statistics predate it
            rank_zero_warn(f"QATCallback: {late}")
        if self.export_dir is None:
            return
        if self.plan is None:
            rank_zero_warn("QATCallback: QAT never started (fit ended before `start_epoch`); nothing exported.")
            return
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                self.export_report = self._export(trainer, pl_module)
                note_collapse(self.export_report, self._watch)  # the report names a collapsed QAT start
            except BaseException as exc:  # other ranks must not wait forever at the barrier
                error = exc
        trainer.strategy.barrier("ncnnqat_export")
        if error is not None:
            raise error

    def _export_path(self, trainer: Any) -> str:
        assert self.export_dir is not None
        if os.path.isabs(self.export_dir):
            return self.export_dir
        return os.path.join(trainer.default_root_dir, self.export_dir)

    def _example(self, pl_module: Any) -> Any:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        return self._traced_example if example is None else example  # else: traced on the first batch

    def _export(self, trainer: Any, pl_module: Any) -> Any:
        from lightning_ncnnqat.export import export

        example = float32_example(self._example(pl_module))
        held, source = held_batch(trainer, pl_module, example, self.held_batch_size, model_probe(trainer, pl_module))
        with contextlib.ExitStack() as stack:
            export_dir = self._export_path(trainer)
            if debug_run(trainer):  # Lightning's fast_dev_run writes nothing: a debug run never overwrites an export
                export_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ncnnqat_fast_dev_run_"))
            stack.enter_context(ranges_unsynced(pl_module))
            model = stack.enter_context(float32_model(pl_module))  # the float32 copy under a *-true precision
            debug = debug_run(trainer)
            report = export(
                model,
                export_dir,
                example_input=example,
                held_batch=held,
                held_batch_source=source,
                verbose=self.verbose and not debug,  # its summary would name files about to be removed
                targets=self.targets,
                preprocessing=find_preprocessing(self.preprocessing, getattr(trainer, "datamodule", None), pl_module),
                float_weights=self.float_weights,
            )
            if debug and self.verbose:
                rank_zero_info(
                    f"QATCallback: fast_dev_run: the export chain ran in a temporary directory, now removed "
                    f"(ok={report.ok}; {len(report.warnings)} warning(s)); a run without fast_dev_run writes "
                    f"{self._export_path(trainer)!r}"
                )
            return report
