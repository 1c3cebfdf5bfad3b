"""QATCallback: ncnn-faithful quantization-aware training from a chosen epoch.

Lightning hooks only; the surgery lives in :mod:`lightning_ncnnqat.qat.prepare`, the export in
:mod:`lightning_ncnnqat.export`.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor

from lightning_ncnnqat.qat.batches import as_call, example_from_batch, from_call, map_tensors
from lightning_ncnnqat.qat.config import QATConfig
from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.prepared import check_ranges, input_quantizers
from lightning_ncnnqat.qat.prepare import check_skip
from lightning_ncnnqat.qat.ranges import LearnedRanges, check_one_input
from lightning_ncnnqat.start import start_qat
from lightning_ncnnqat.speed.decide import speed_check
from lightning_ncnnqat.errors import ConfigError, ConfigTypeError, show
from lightning_ncnnqat.export.config import ExportConfig
from lightning_ncnnqat.export.preflight import check_export_dir
from lightning_ncnnqat.preprocessing import find_preprocessing
from lightning_ncnnqat.callbacks._settings import export_config, qat_config, split_old
from lightning_ncnnqat.callbacks._export import export_at_fit_end, export_path, preflight_measure
from lightning_ncnnqat.callbacks._restore import install_restore_hook
from lightning_ncnnqat.callbacks._compat import CALLBACK_BASES, override, rank_zero_info, rank_zero_warn
from lightning_ncnnqat.callbacks._fit_start import (
    check_example_runs, check_max_epochs, check_precision, check_start_reachable, debug_run, model_example,
    note_debug_run, qat_start_epoch,
)
from lightning_ncnnqat.callbacks._averaging import AveragedCopies, averaging_window_warnings
from lightning_ncnnqat.callbacks._bn_stats import freeze_if_due
from lightning_ncnnqat.callbacks._computed_watch import ComputedWatch
from lightning_ncnnqat.callbacks._watch import CollapseWatch, divergence_hint, note_collapse
from lightning_ncnnqat.callbacks._held import check_held_batch
from lightning_ncnnqat.callbacks._rank_zero import on_rank_zero, rank_zero_once
from lightning_ncnnqat.callbacks._rng import user_rng_untouched
from lightning_ncnnqat.callbacks._train_batches import train_inputs


class QATCallback(*CALLBACK_BASES):  # type: ignore[misc]
    """Quantization-aware training for ncnn int8, from epoch ``start_epoch`` to the end of fit.

    At the start of epoch ``start_epoch`` it folds the BatchNorm-like modules into the layers
    they follow and fake-quantizes every layer ncnn runs in int8, as ncnn2table and ncnn2int8
    would (``config``); at the end of fit (global rank 0) it exports the int8 ncnn model with a
    parity report measured in ncnn (``export``). What and why: ``docs/manual.md``.

    Args:
        start_epoch: epoch at which QAT starts (0 = from the first epoch). Fine-tuning a
            trained float model for a few epochs is the usual recipe.
        config: what QAT quantizes and how (:class:`~lightning_ncnnqat.QATConfig`, or a dict of
            its fields); None: its defaults.
        export: the export at the end of fit (:class:`~lightning_ncnnqat.ExportConfig`: where,
            on which targets, the preflight at QAT start, ...; or a dict of its fields); True:
            its defaults (into ``ncnn_export`` under ``trainer.default_root_dir``); False or
            None: no export and no preflight.
        example_input: input used to trace the model and export it; defaults to the
            LightningModule's ``example_input_array``, then to the first training batch (its
            first k elements, or its values under forward's names for a dict batch, where k is
            the number of forward's required positional parameters).
        log_every_n_steps: how often input ranges and clipped fractions are logged (0 = never).
        verbose: print the QAT summary and the export summary.
        **deprecated: the keyword arguments of release 0.1 (``momentum=``, ``export_dir=``,
            ``targets=`` ...) still work for one release: each warns with a DeprecationWarning
            naming its place in ``config`` or ``export``; one given beside ``config`` /
            ``export`` with another value raises ConfigError.

    In LightningCLI YAML the two objects nest under the callback's ``init_args``::

        - class_path: lightning_ncnnqat.QATCallback
          init_args:
            start_epoch: 7
            config: {range_init: kl, calibration_batches: 8}
            export: {dir: runs/export, targets: [x86, arm64-a53]}

    ``example_input`` follows Lightning's ``example_input_array`` convention: a Tensor, a
    tuple/list (``model(*x)``) or a dict (``model(**x)``). Checkpoints cross the QAT boundary both
    ways (a QAT checkpoint's plan is re-applied before its weights load; a float one returns the
    model to float). What can be known at fit start is checked then (:mod:`._fit_start`:
    precision, a reachable ``start_epoch``, ``fast_dev_run`` exporting into a temporary directory).

    Raises:
        ConfigError / ConfigTypeError: a setting's value or type is wrong (named, with the value).
    """

    def __init__(
        self,
        start_epoch: int = 0,
        config: Optional[QATConfig] = None,
        export: Union[ExportConfig, bool, None] = True,
        example_input: Any = None,
        log_every_n_steps: int = 50,
        verbose: bool = True,
        **deprecated: Any,
    ) -> None:
        super().__init__()
        for name, value, low in (("start_epoch", start_epoch, 0), ("log_every_n_steps", log_every_n_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"`{name}` must be an int >= {low}, got {value!r}", argument=name, value=value)
        if example_input is not None:
            try:
                args, kwargs = as_call(example_input)
            except TypeError as exc:
                raise ConfigTypeError(f"`example_input`: {exc}", argument="example_input") from None
            if not any(isinstance(v, Tensor) for v in (*args, *kwargs.values())):
                raise ConfigTypeError(f"`example_input` holds no Tensor: {show(example_input)}", argument="example_input")
        if not isinstance(verbose, bool):
            raise ConfigTypeError(f"`verbose` must be a bool, got {verbose!r}", argument="verbose", value=verbose)
        old_qat, old_export = split_old(deprecated)
        self.config = qat_config(config, old_qat)
        self.export_config = export_config(export, old_export)  # None: no export
        self.start_epoch = start_epoch
        self.example_input = example_input
        self.log_every_n_steps = log_every_n_steps
        self.verbose = verbose
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

    # read-only views of ``export_config`` (None when there is no export)
    @property
    def export_dir(self) -> str | None:
        return None if self.export_config is None else self.export_config.dir

    @property
    def preflight(self) -> bool:
        return self.export_config is not None and self.export_config.preflight

    @property
    def targets(self) -> Any:
        return (self.export_config or ExportConfig()).targets

    @property
    def float_weights(self) -> str:
        return (self.export_config or ExportConfig()).float_weights

    @property
    def held_batch_size(self) -> int:
        return (self.export_config or ExportConfig()).held_batch_size

    @property
    def preprocessing(self) -> Any:
        return None if self.export_config is None else self.export_config.preprocessing

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
            check_one_input(pl_module, self.config, "QATCallback")
        self.plan = get_plan(pl_module)
        self._install_restore_hook(pl_module)
        if stage == "fit" and debug_run(trainer):
            note_debug_run(trainer, self.start_epoch, self.export_dir)
        elif stage == "fit" and self.preflight and self.export_dir is not None:
            path = self._export_path(trainer)

            on_rank_zero(trainer, "export_dir check", lambda: check_export_dir(path))
        if stage == "fit" and self.export_dir is not None:
            # the preprocessing DEPLOY.md will state, read now: a bad one fails before training
            find_preprocessing(self.preprocessing, getattr(trainer, "datamodule", None), pl_module)

    def _install_restore_hook(self, pl_module: Any) -> None:
        install_restore_hook(self, pl_module)

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
        measure = preflight_measure(trainer, pl_module, self.export_config, self.verbose)  # None: no preflight

        def log(line: str) -> None:
            if self.verbose:
                rank_zero_info(f"QATCallback: {line}")

        with user_rng_untouched():  # calibration and the preflight read the user's loaders
            self.plan = start_qat(
                pl_module, example, self.config, calibration=lambda n: train_inputs(trainer, pl_module, n),
                measure=measure, run_once=rank_zero_once(trainer, pl_module), log=log,
                speed=None if measure is None else speed_check(self.targets),  # int8 that pays (speed.decide)
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

    # ---- learned ranges ---------------------------------------------------------------

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.plan is None or self.plan.config.ranges != "learned":
            return
        if trainer.optimizers and optimizer is not trainer.optimizers[0]:
            return  # one threshold step per step of the first optimizer
        if self._learned is None:
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
        assert self.export_config is not None
        return export_path(self.export_config, trainer)

    def _export(self, trainer: Any, pl_module: Any) -> Any:
        assert self.export_config is not None
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        example = self._traced_example if example is None else example  # else: traced on the first batch
        return export_at_fit_end(trainer, pl_module, self.export_config, example, self.verbose)
