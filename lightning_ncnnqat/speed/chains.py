"""Int8 chains counted at QAT start, before and after ``QATConfig.chain_activations``'s swap.

An int8 conv hands its output to the next conv as int8 (requantize) only where ncnn2int8's
``fuse_requantize`` finds the next layers reading it to be int8 convs (directly, or through a
Split whose every output goes to one); see ``ncnn.int8_writer.fuse_by_index``. Between them the
converted model may hold the conv's folded BatchNorm and ONE activation that the export folds
into the conv (ReLU, ReLU6 / Hardtanh / clamp, LeakyReLU, Sigmoid, Mish, HardSwish:
``conversion.activation_fold``); pnnx drops Identity and Dropout. Any other layer (SiLU, GELU,
an add, a pooling) leaves the conv dequantizing to float.

:func:`predict_chains` applies that rule to the traced data flow of the float model
(``qat.graph``) and the QAT plan (which convs are int8), so the count needs no export; the
tests check it against the exported int8 model's ``int8_scale_term`` (``speed.plan.count_chains``).
:class:`ChainStart` is what ``start.start_qat`` calls: it traces the model, applies the swap,
undoes it if the start fails, and puts the counts in the plan's notes (its summary).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_ncnnqat.qat.activation_kinds import BREAKING_KINDS, activation_kind, functional_forms
from lightning_ncnnqat.qat.activation_swap import CHAINED, chain_swap, chain_swaps
from lightning_ncnnqat.qat.batches import as_call
from lightning_ncnnqat.qat.bn_fold import is_bn_like
from lightning_ncnnqat.qat.export_form import export_form
from lightning_ncnnqat.qat.graph import DataFlow, Node, trace_call
from lightning_ncnnqat.qat.plan import QATPlan
from lightning_ncnnqat.qat.wrappers import unwrap

CONV_KINDS = ("Convolution", "ConvolutionDepthWise")

#: Functions the export folds into the conv before them (torch function names as traced).
FUSED_FUNCTIONS = frozenset({"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_",
                             "sigmoid", "mish", "hardswish", "hardswish_", "clamp", "clamp_", "clip"})
_CHAINED_BY_NAME = {c.__name__: c for c in CHAINED}
_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)
#: Functions that read a tensor's shape or dtype only (anchors made from a feature map's size):
#: pnnx folds them to constants, so they are no reader in the converted model.
_METADATA_READERS = frozenset({"new_full", "new_zeros", "new_ones", "new_empty", "new_tensor", "zeros_like",
                               "ones_like", "full_like", "empty_like", "size", "dim"})

NOTE_KEY = "int8 chains"


@dataclass
class PredictedChains:
    """Int8 convs of a plan and how many would requantize into the next conv."""

    int8_convs: int
    requantized: int
    breakers: dict[str, int] = field(default_factory=dict)  # activation between two int8 convs -> count


def _activation(module: nn.Module | None, name: str, renamed: Mapping[str, str]) -> str | None:
    """``"fused"``, the kind of a chain-breaking activation, or None (not an activation). A
    module is judged by what it computes (``activation_kind``: a yolov5 ``x * sigmoid(x)``
    module is SiLU, a HardSwish form is folded), else by its class."""
    if name in renamed:
        return "fused" if renamed[name] in _CHAINED_BY_NAME else renamed[name]
    kind = activation_kind(module)
    if kind is not None:
        return kind if kind in BREAKING_KINDS else "fused"
    if isinstance(module, CHAINED):
        return "fused"
    cls_name = type(module).__name__ if module is not None else ""
    if cls_name in ("Mish", "ELU", "SELU", "PReLU", "Hardsigmoid", "Tanh", "Softplus"):
        return cls_name
    return None


def _step(node: Node, conv: str, plan: QATPlan, renamed: Mapping[str, str]) -> str | None:
    """What one reader of a conv's output is to the chain rule: ``"pass"`` (folded BN, Identity,
    Dropout), ``"fused"``, a breaker's name, or None (anything else)."""
    m = node.module
    if m is None:
        if node.target in FUSED_FUNCTIONS:
            return "fused"
        return {"silu": "SiLU", "gelu": "GELU", "hardswish": "Hardswish"}.get(node.target)
    if isinstance(m, _PASS_THROUGH):
        return "pass"
    if is_bn_like(m) and plan.layers[conv].bn == node.target:
        tails = [_activation(m.get_submodule(t), f"{node.target}.{t}", renamed) for t in plan.layers[conv].bn_tail]
        tails = [t for t in tails if t is not None]
        return tails[0] if tails else "pass"
    return _activation(m, node.target, renamed)


def predict_chains(flow: DataFlow, plan: QATPlan, renamed: Mapping[str, str] | None = None) -> PredictedChains:
    """Count the plan's int8 convs that would requantize into the next conv (module doc's rule)
    in the traced ``flow``; ``renamed`` maps swapped activation modules to their new class name."""
    renamed = renamed or {}
    convs = {n for n, p in plan.layers.items() if p.kind in CONV_KINDS and len(flow.calls.get(n, [])) == 1}
    out = PredictedChains(len(convs), 0)
    for name in sorted(convs):
        v = flow.module_calls(name)[0].outputs[0]
        seen_act: str | None = None
        for _ in range(4):  # BN, Identity/Dropout and one activation at most
            readers = flow.consumers.get(v, [])
            if len(readers) != 1:
                break
            node = flow.nodes[readers[0]]
            what = _step(node, name, plan, renamed)
            if what is None or (what != "pass" and seen_act is not None) or len(node.outputs) != 1:
                break
            seen_act = seen_act if what == "pass" else what
            v = node.outputs[0]
        readers = [r for r in flow.consumers.get(v, []) if not _metadata_only(flow.nodes[r], v)]
        if not readers or v in flow.outputs:
            continue
        if all(flow.nodes[r].target in convs and flow.nodes[r].inputs[:1] == [v] for r in readers):
            if seen_act in (None, "fused"):
                out.requantized += 1
            else:
                out.breakers[seen_act] = out.breakers.get(seen_act, 0) + 1
    return out


def _metadata_only(node: Node, v: int) -> bool:
    """Whether ``node`` reads value ``v`` for its shape or dtype only (``x.type_as(v)``, ``v.new_full(...)``)."""
    if node.target == "type_as":
        return node.inputs.index(v) > 0
    return node.module is None and node.target in _METADATA_READERS


@dataclass
class ChainStart:
    """The QAT start's part in int8 chains: the float model's data flow before the plan's swap
    (``qat.prepare.apply_plan`` swaps; ``unprepare`` puts the modules back when a start fails)."""

    flow: DataFlow | None
    chain_activations: str = "off"

    @classmethod
    def begin(cls, model: nn.Module, example_input: Any, chain_activations: str) -> ChainStart:
        """Check ``chain_activations`` (ValueError naming it) and trace ``model`` in its export
        form, for the count; a model that cannot be traced is counted as nothing."""
        chain_swaps(chain_activations)
        try:
            args, kwargs = as_call(example_input)
            inner = unwrap(model)
            with export_form(inner):  # what the export converts (an ultralytics head's decoded outputs)
                flow = trace_call(inner, args, kwargs)
        except Exception:  # noqa: BLE001 - a count must never stop a QAT start; the plan's own trace reports errors
            flow = None
        return cls(flow, chain_activations)

    def note(self, model: nn.Module, plan: QATPlan, log: Callable[[str], None]) -> None:
        """Put the chain counts into ``plan.notes`` (the summary) and ``log`` them."""
        if self.flow is None:
            return
        before = predict_chains(self.flow, plan)
        swap = chain_swap(model)
        swapped = swap is not None and bool(swap.swapped)
        kinds: dict[str, int] = {}
        for old, new in (swap.swapped.values() if swap is not None else ()):
            kinds[f"{old} -> {new}"] = kinds.get(f"{old} -> {new}", 0) + 1
        if before.int8_convs == 0:
            if swapped:  # the swap changed the model even where no conv stays int8 (prefer='speed' kept them float)
                text = (f"chain_activations={self.chain_activations!r} swapped {_names(kinds)}; no int8 conv left to "
                        "chain (every conv is float in this plan)")
                plan.notes[NOTE_KEY] = text
                log(f"int8 chains: {text}")
            return
        text = f"{before.requantized} of {before.int8_convs} int8 convs hand their output on in int8 (requantize)"
        if swap is not None and swapped:
            after = predict_chains(self.flow, plan, {n: new for n, (_, new) in swap.swapped.items()})
            text = (f"{before.requantized} -> {after.requantized} of {before.int8_convs} int8 convs hand their output on "
                    f"in int8 (requantize) after chain_activations={self.chain_activations!r} swapped {_names(kinds)}")
            if after.breakers:
                text += f"; still broken by {_names(after.breakers)}"
        elif self.chain_activations == "off":
            found = before.breakers or self._module_breakers()
            if found:
                text += (f"; {_names(found)} break chains: QATConfig(chain_activations='relu' or 'hardswish') "
                         "swaps them at QAT start (docs/speed.md)")
        forms = functional_forms(self.flow)
        if forms:
            lines: dict[str, list[str]] = {}
            for f in forms:
                lines.setdefault(f"{f.form} [{f.kind}]" if f.form[:2] != "F." else f.form, []).append(f.where)
            named = ", ".join(f"{k} x{len(w)} at {'; '.join(sorted(set(w)))}" for k, w in sorted(lines.items()))
            text += f"; functional calls not swapped (replace them in the code): {named}"
        plan.notes[NOTE_KEY] = text
        log(f"int8 chains: {text}")

    def _module_breakers(self) -> dict[str, int]:
        """Chain-breaking activation modules anywhere in the traced forward (by kind, each module once)."""
        assert self.flow is not None
        found: dict[str, int] = {}
        for name in self.flow.calls:
            kind = activation_kind(self.flow.module_calls(name)[0].module)
            if kind in BREAKING_KINDS:
                found[kind] = found.get(kind, 0) + 1
        return found


def _names(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))
