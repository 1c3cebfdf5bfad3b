"""Copies of a model that follow its QAT plan: the copy-finding rules shared by the callback and
the checkpoint restore.

A copy (an EMA, an SWA average) is a deep copy of the model or of one of its submodules, made by
the user or by a callback, usually before QAT starts (a float model). It must hold the model's
plan, or the two state dicts differ in layout and every key-by-key or zipped average pairs
unrelated tensors. A copy may live inside the model itself, outside its forward (timm's
``ModelEmaV3`` as ``self.ema``, an ``AveragedModel`` attribute): then the model's own state dict
holds the copy's QAT buffers, so every plan switch of the model (QAT start, a checkpoint
restore) switches these copies too (:func:`follow_inner_copies`).
"""

from __future__ import annotations

import re
from dataclasses import replace

from torch import nn
from torch.optim.swa_utils import AveragedModel

from lightning_ncnnqat.qat.plan import QATPlan, get_plan
from lightning_ncnnqat.qat.plan_state import omit_plan_entry, same_plan
from lightning_ncnnqat.qat.prepare import apply_plan, unprepare
from lightning_ncnnqat.qat.wrappers import unwrap


AVERAGE_NAME = re.compile(r"av(era)?g|ema|swa|polyak|shadow", re.IGNORECASE)
"""Names of callback attributes that hold an averaged copy as a bare module (SWA's ``_average_model``)."""


def _shapes(m: nn.Module) -> list[tuple[int, ...]]:
    """The parameter shapes of ``m`` but its input quantizers' (a learned range is a parameter
    that only a QAT model has; a float original and its QAT copy are still the same model)."""
    return [tuple(p.shape) for n, p in m.named_parameters() if "input_quantizer." not in n]


def prefix_of(copy: nn.Module, model: nn.Module, plan: QATPlan | None, skip: tuple[str, ...] = ()) -> str | None:
    """The name of the submodule of ``model`` that ``copy`` copies ("" for the model itself), or
    None: same class, same parameter shapes, and (under a plan) holding every quantized layer.
    Submodules under a name of ``skip`` (the model's own averaged copies) are no originals."""
    for name, sub in model.named_modules():
        if type(sub) is not type(copy) or sub is copy or any(name == r or name.startswith(r + ".") for r in skip):
            continue
        if plan is not None and name and not all(n.startswith(name + ".") for n in plan.layers):
            continue
        if _shapes(sub) == _shapes(copy):
            return name
    return None


def inner_averages(model: nn.Module, plan: QATPlan | None) -> list[tuple[str, nn.Module]]:
    """The model's own submodules that hold an average (timm's ``ModelEmaV3`` as ``self.ema``, an
    ``AveragedModel``): an ``AveragedModel`` or a submodule whose attribute name says it averages,
    outside the model's forward (under a plan: no quantized layer inside; the plan is traced from
    the forward, so a subtree forward runs has its layers planned and is the model, not a copy)."""
    roots: list[tuple[str, nn.Module]] = []
    for name, sub in model.named_modules():
        if not name or any(name.startswith(r + ".") for r, _ in roots):
            continue
        if not isinstance(sub, AveragedModel) and not AVERAGE_NAME.search(name.rsplit(".", 1)[-1]):
            continue
        if plan is not None and any(n.startswith(name + ".") for n in plan.layers):
            continue  # called in the forward: part of the model
        roots.append((name, sub))
    return roots


def sub_plan(plan: QATPlan, prefix: str) -> QATPlan:
    """``plan`` with every name taken relative to the submodule ``prefix``."""
    if not prefix:
        return plan
    head = prefix + "."

    def cut(n: str) -> str:
        return n[len(head):] if n.startswith(head) else n

    layers = {
        cut(n): replace(p, input_owner=cut(p.input_owner), bn=None if p.bn is None else cut(p.bn))
        for n, p in plan.layers.items()
    }
    floats = {cut(n): r for n, r in plan.float_layers.items() if n.startswith(head)}
    notes = {cut(n): r for n, r in plan.notes.items() if n.startswith(head)}
    gemm = {cut(n): r for n, r in plan.gemm_layers.items() if n.startswith(head)}  # int8 Gemm layers (qat/gemm.py)
    attention = {cut(n): k for n, k in plan.attention_layers.items() if n.startswith(head)}  # qat/attention_plan.py
    sdpa = {cut(n): c for n, c in plan.sdpa_calls.items() if n.startswith(head)}
    return replace(plan, layers=layers, float_layers=floats, notes=notes, gemm_layers=gemm, attention_layers=attention,
                   sdpa_calls=sdpa)


def follow(copy: nn.Module, plan: QATPlan | None, whole: bool = True) -> None:
    """Make ``copy`` a model of ``plan`` (None: float); nothing when it already is. A copy of a
    submodule (``whole`` False) writes no plan entry in its state dict, as the submodule it copies
    (:func:`plan_state.omit_plan_entry`)."""
    if not whole:
        omit_plan_entry(copy)
    current = get_plan(copy)
    if same_plan(current, plan):
        return
    if current is not None:
        unprepare(copy)
    if plan is not None:
        apply_plan(copy, plan)


def inner_copies(model: nn.Module, plan: QATPlan | None) -> list[tuple[str, nn.Module, str]]:
    """``(name, copy, prefix)`` for each averaged copy inside ``model`` (:func:`inner_averages`):
    the first module of that subtree (the subtree itself, or its ``module``...) that copies a
    submodule of ``model`` outside every average (:func:`prefix_of`); ``name`` is its dotted name."""
    found: list[tuple[str, nn.Module, str]] = []
    roots = inner_averages(model, plan)
    skip = tuple(r for r, _ in roots)
    for root, sub in roots:
        for rel, m in sub.named_modules():
            prefix = None if isinstance(m, AveragedModel) else prefix_of(m, model, plan, skip)
            if prefix is not None:
                found.append((f"{root}.{rel}" if rel else root, m, prefix))
                break
    return found


def follow_inner_copies(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Bring every averaged copy inside ``model`` (:func:`inner_copies`) to ``model``'s plan
    (float when ``model`` is float). Returns ``(name, copy, prefix)`` for each copy."""
    model = unwrap(model)
    plan = get_plan(model)
    found = inner_copies(model, plan)
    for _, copy, prefix in found:
        follow(copy, None if plan is None else sub_plan(plan, prefix), whole=not prefix)
    return found
