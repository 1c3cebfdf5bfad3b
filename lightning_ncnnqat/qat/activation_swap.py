"""Swap activations that break ncnn's int8 chains for ones it chains (opt-in, before QAT).

Why: ncnn hands an int8 conv's output on as int8 (requantize, ``int8_scale_term`` + 100) only
when the next layer reading it is an int8 conv (``tools/quantize/ncnn2int8.cpp``,
``NetQuantize::fuse_requantize``: the producer's top must be the consumer's bottom). An
activation between them survives that only if the converter folded it into the conv's
``activation_type`` (param 9); pnnx folds ReLU / LeakyReLU (1, 2), Clip = ReLU6 / Hardtanh (3),
Sigmoid (4) and Mish (5) (``tools/pnnx/src/pass_ncnn/fuse_convolution_activation.cpp``), and
the x86/ARM requantize applies types 1-6 (``src/layer/x86/requantize_x86.cpp``,
``x86_activation.h``). SiLU (ncnn ``Swish``), GELU and HardSwish stay layers of their own, so
every conv before them dequantizes to float and every conv after them quantizes again.

:func:`swap_activations` replaces such activation MODULES in place, before ``prepare_qat`` /
QAT start, so the QAT epochs fine-tune the network to its new activations. A module is matched
by what it computes (``qat.activation_kinds.activation_kind``: yolov5's ``x * torch.sigmoid(x)``
module, an ``nn.SiLU`` subclass, a Swish with ``beta`` = 1, a tanh-form GELU), not by its class
name. Activations computed inline in a bigger forward (``F.silu(x)``, ``x * torch.sigmoid(x)``)
cannot be swapped by module surgery; they are found in one traced forward
(``activation_kinds.functional_forms``), counted (``SwapReport.functional``) and named with
their source line (``SwapReport.where``), never changed.

``QATConfig(chain_activations=...)`` is the one switch for QAT: :func:`apply_chain_activations`
swaps at QAT start and wherever the plan is applied again (a checkpoint restored into a fresh
model, an averaged copy), so a model always runs the activations its plan was trained with.
HardSwish is a chained target too: the export folds it into the conv (``conversion.activation_fold``)
and ncnn's requantize applies it (activation_type 6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_ncnnqat.qat.activation_kinds import BREAKING_KINDS, KIND_CLASS, activation_kind, functional_forms
from lightning_ncnnqat.qat.batches import as_call
from lightning_ncnnqat.qat.graph import trace_call
from lightning_ncnnqat.qat.wrappers import unwrap

#: Module activations that break int8 chains in ncnn -> the chained activation they become.
DEFAULT_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.SiLU: nn.ReLU,
    nn.GELU: nn.ReLU,
    nn.Hardswish: nn.ReLU,
}

#: Activations ncnn chains: folded into the conv (activation_type 1-6) by pnnx, HardSwish by the export.
CHAINED = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Sigmoid, nn.Mish, nn.Hardswish)

#: ``QATConfig.chain_activations`` -> the class SiLU and GELU (and Hardswish, unless it is the
#: target) become; ``"off"`` (the config's default) swaps nothing.
CHAIN_TARGETS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU, "hardswish": nn.Hardswish,
}



@dataclass
class SwapReport:
    """What :func:`swap_activations` changed: module name -> (old class, new class)."""

    swapped: dict[str, tuple[str, str]] = field(default_factory=dict)
    not_inplace: list[str] = field(default_factory=list)  # in-place modules after a swap, set inplace=False
    functional: dict[str, int] = field(default_factory=dict)  # inline breaker form ("F.silu", "x * sigmoid(x)") -> calls
    where: dict[str, list[str]] = field(default_factory=dict)  # the same forms -> their source lines
    kept: dict[str, str] = field(default_factory=dict)  # breaker modules not swapped (no target for their kind) -> kind
    # (parent, attribute, module it held) for every replaced slot and (module, old inplace) flags: what restore() puts back
    _undo: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list, repr=False)
    _inplace: list[tuple[nn.Module, bool]] = field(default_factory=list, repr=False)

    def restore(self) -> None:
        """Put the replaced modules and the changed ``inplace`` flags back (a failed QAT start)."""
        for parent, name, old in reversed(self._undo):
            setattr(parent, name, old)
        for m, flag in self._inplace:
            m.inplace = flag
        self._undo.clear()
        self._inplace.clear()

    def summary(self) -> str:
        lines = [f"swapped {len(self.swapped)} activation module(s)"]
        by_kind: dict[tuple[str, str], list[str]] = {}
        for name, pair in self.swapped.items():
            by_kind.setdefault(pair, []).append(name)
        lines += [f"  {old} -> {new}: {len(ns)} ({', '.join(ns[:6])}{', ...' if len(ns) > 6 else ''})"
                  for (old, new), ns in sorted(by_kind.items())]
        if self.not_inplace:
            lines.append(f"set inplace=False (they would overwrite a swapped activation's output): {', '.join(self.not_inplace)}")
        if self.kept:
            lines.append("not swapped (no swap for their kind): " + ", ".join(f"{n} ({k})" for n, k in self.kept.items()))
        if self.functional:
            calls = ", ".join(f"{k} x{v}" + (f" ({'; '.join(self.where[k])})" if self.where.get(k) else "")
                              for k, v in sorted(self.functional.items()))
            lines.append(f"not swapped (functional calls in forward; replace them in the code): {calls}")
        return "\n".join(lines)


def _check_swaps(swaps: Mapping[Any, Any]) -> None:
    for old, new in swaps.items():
        for what, cls in (("key", old), ("value", new)):
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise TypeError(f"swap_activations: every {what} of `swaps` must be an nn.Module class, got {cls!r}")
        try:
            new()
        except TypeError as e:
            raise TypeError(f"swap_activations: {new.__name__} must be constructible without arguments ({e})") from e


def functional_breakers(model: nn.Module, example_input: Any) -> dict[str, int]:
    """Chain-breaking activations computed inline (``F.silu``, ``F.gelu``, ``x * sigmoid(x)``...)
    in one eval forward of ``model`` on ``example_input``, outside activation modules: form ->
    count (no grad; the model's training flag is restored). See :func:`functional_breaker_lines`."""
    return {k: len(v) for k, v in functional_breaker_lines(model, example_input).items()}


def functional_breaker_lines(model: nn.Module, example_input: Any) -> dict[str, list[str]]:
    """As :func:`functional_breakers`, each form -> the source line of every call."""
    args, kwargs = as_call(example_input)
    out: dict[str, list[str]] = {}
    for form in functional_forms(trace_call(model, args, kwargs, training=False)):
        out.setdefault(form.form, []).append(form.where)
    return out


def _no_inplace_after(parent: nn.Module, child_name: str, parent_name: str, report: SwapReport) -> None:
    """In a Sequential, the module after a swapped activation must not overwrite its output in
    place: ReLU's backward reads its OUTPUT (torch saves the result for threshold_backward),
    where SiLU/GELU/Hardswish read their input, so e.g. torchvision MobileNetV3's
    ``Hardswish -> Dropout(inplace=True)`` would fail in backward after the swap."""
    if not isinstance(parent, nn.Sequential):
        return
    names = list(parent._modules)
    i = names.index(child_name)
    if i + 1 < len(names):
        nxt = parent._modules[names[i + 1]]
        if getattr(nxt, "inplace", False) is True:
            nxt.inplace = False
            report._inplace.append((nxt, True))
            report.not_inplace.append(f"{parent_name}.{names[i + 1]}" if parent_name else names[i + 1])


def swap_activations(
    model: nn.Module, swaps: Mapping[type[nn.Module], type[nn.Module]] | None = None, example_input: Any = None
) -> SwapReport:
    """Replace activation modules of ``model`` in place: ``swaps`` maps an exact class to the
    class put in its place (default :data:`DEFAULT_SWAPS`: SiLU, GELU, Hardswish -> ReLU).

    A module is matched by exact class, or else by what it computes
    (:func:`~lightning_ncnnqat.qat.activation_kinds.activation_kind`): a module computing SiLU
    takes the ``nn.SiLU`` entry's target, GELU ``nn.GELU``'s, HardSwish ``nn.Hardswish``'s; a
    SiLU / GELU module with no target is named in ``SwapReport.kept``. A module instance used at
    several places is replaced by one new instance everywhere. Call it before ``prepare_qat``
    (or QAT start) so the QAT fine-tuning trains the network with its new activations; the
    float accuracy drops until it has. ``example_input`` (optional) also counts functional
    breakers (``SwapReport.functional``, lines in ``SwapReport.where``), which are NOT swapped. A module with ``inplace=True``
    right after a swapped activation in a Sequential is set to ``inplace=False``
    (``SwapReport.not_inplace``); in-place ops in a forward's code cannot be seen here.

    Raises TypeError when ``model`` is not an nn.Module or ``swaps`` holds non-module classes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_activations: `model` must be an nn.Module, got {type(model).__name__}")
    swaps = dict(DEFAULT_SWAPS if swaps is None else swaps)
    _check_swaps(swaps)
    report = SwapReport()
    replaced: dict[int, nn.Module] = {}
    kinds: dict[int, str | None] = {}  # id(module) -> activation_kind, probed once per instance
    for parent_name, parent in list(model.named_modules()):
        # _modules, not named_children(): the latter hides a second name of the same child
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            target = _target(child, swaps, kinds)
            if target is None or type(child) is target:
                if kinds.get(id(child)) in BREAKING_KINDS and type(child) is not target:
                    report.kept[full] = kinds[id(child)]
                continue
            new = replaced.get(id(child))
            if new is None:
                new = target()
                replaced[id(child)] = new
            report._undo.append((parent, child_name, child))
            setattr(parent, child_name, new)
            report.swapped[full] = (type(child).__name__, type(new).__name__)
            _no_inplace_after(parent, child_name, parent_name, report)
    if example_input is not None:
        report.where = functional_breaker_lines(model, example_input)
        report.functional = {k: len(v) for k, v in report.where.items()}
    return report


def _target(child: nn.Module, swaps: Mapping[type[nn.Module], type[nn.Module]],
            kinds: dict[int, str | None]) -> type[nn.Module] | None:
    """The class ``child`` becomes: its exact class's entry, else its computed kind's class's entry."""
    if type(child) in swaps:
        return swaps[type(child)]
    if id(child) not in kinds:
        kinds[id(child)] = activation_kind(child)
    kind = kinds[id(child)]
    return swaps.get(KIND_CLASS[kind]) if kind is not None else None


def chain_swaps(chain_activations: str) -> dict[type[nn.Module], type[nn.Module]]:
    """The swaps ``QATConfig.chain_activations`` asks for ({} for ``"off"``); ValueError naming
    the argument and value for anything else."""
    if chain_activations == "off":
        return {}
    target = CHAIN_TARGETS.get(chain_activations) if isinstance(chain_activations, str) else None
    if target is None:
        raise ValueError(
            f"`chain_activations` must be 'off' or one of {sorted(CHAIN_TARGETS)}, got {chain_activations!r}"
        )
    return {old: target for old in DEFAULT_SWAPS if old is not target}


#: Where a model keeps the :class:`SwapReport` of the plan's swap (``restore_chain_activations`` reads it).
SWAP_ATTR = "_ncnnqat_chain_swap"


def apply_chain_activations(model: nn.Module, chain_activations: str) -> SwapReport | None:
    """Swap the chain-breaking activation modules of ``model`` (or the model inside its wrapper)
    as ``chain_activations`` says (``qat.prepare.apply_plan`` calls it with the plan's config);
    None for ``"off"``. What was swapped is kept on the model (:func:`chain_swap`) until
    :func:`restore_chain_activations` (``unprepare``) puts it back. Idempotent: a swapped model
    holds no breaker modules, so applying a plan again changes nothing."""
    swaps = chain_swaps(chain_activations)
    if not swaps:
        return None
    inner = unwrap(model)
    report = swap_activations(inner, swaps)
    if report.swapped:
        inner.__dict__[SWAP_ATTR] = report
    return report


def chain_swap(model: nn.Module) -> SwapReport | None:
    """The swap the model's plan made (None: none)."""
    return unwrap(model).__dict__.get(SWAP_ATTR)


def restore_chain_activations(model: nn.Module) -> None:
    """Put back the activation modules the plan's swap replaced (``unprepare``: the user's model as it was)."""
    report = unwrap(model).__dict__.pop(SWAP_ATTR, None)
    if report is not None:
        report.restore()
