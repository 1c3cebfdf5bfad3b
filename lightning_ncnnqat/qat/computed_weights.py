"""Weights a layer computes from other tensors: parametrizations and weight-computing pre-hooks.

Two forms exist in torch, and both keep the tensor a layer computes with out of its
``_parameters``:

* ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm`` / ``spectral_norm`` /
  ``orthogonal``, user parametrizations): the module's class is replaced by a dynamic subclass
  ``Parametrized<Class>`` whose ``weight`` is a property computed from
  ``parametrizations.weight.original`` (or ``original0``/``original1``) on every read.
* forward pre-hooks (the older ``torch.nn.utils.weight_norm`` / ``spectral_norm`` and
  ``torch.nn.utils.prune``, hence Lightning's ``ModelPruning``): before every call the hook sets a
  plain tensor attribute ``weight`` (``weight_g * weight_v / ||weight_v||``,
  ``weight_orig * weight_mask``, ``weight_orig / sigma``) in the module's ``__dict__``. Outside a
  forward that attribute is the value of the LAST call (one optimizer step old, and still holding
  its autograd graph, which is why ``copy.deepcopy`` refuses such a module after a training step).

QAT reads the weight inside forward (fresh in both forms); everything that reads it outside a
forward (the export, range checks, copies) goes through :func:`reading` / :func:`deepcopy_memo`,
and the float model handed to the converters gets plain Parameters from :func:`bake`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

#: Suffixes of the source tensors torch's hook-based APIs register next to the computed one:
#: prune ``<name>_orig``/``<name>_mask``, weight_norm ``<name>_g``/``<name>_v``, spectral_norm
#: ``<name>_orig``/``<name>_u``/``<name>_v`` (torch/nn/utils/{prune,weight_norm,spectral_norm}.py).
_SOURCE_SUFFIXES = ("_orig", "_mask", "_g", "_v", "_u")


def computing_hooks(m: nn.Module) -> list[tuple[int, Any, str]]:
    """``(handle id, hook, attribute)`` of every forward pre-hook of ``m`` that computes a tensor
    attribute: the hook names it (``name``: weight_norm / spectral_norm; ``_tensor_name``: prune)
    and ``m`` holds it as a plain tensor, not a registered Parameter."""
    out = []
    for key, hook in m._forward_pre_hooks.items():
        name = getattr(hook, "name", None) or getattr(hook, "_tensor_name", None)
        if isinstance(name, str) and name not in m._parameters and isinstance(m.__dict__.get(name), Tensor):
            out.append((key, hook, name))
    return out


def has_computed_weights(m: nn.Module) -> bool:
    """Whether ``m`` computes any of its tensors (a parametrization or a computing pre-hook)."""
    return parametrize.is_parametrized(m) or bool(computing_hooks(m))


def refresh(m: nn.Module, training: bool | None = None) -> None:
    """Recompute ``m``'s hook-computed attributes as its next call would (in ``training`` mode,
    default: the module's; eval mode runs no spectral-norm power iteration). Autograd follows the
    caller's grad mode. Parametrized tensors need nothing: they are computed on every read."""
    hooks = computing_hooks(m)
    if not hooks:
        return
    was = m.training
    m.training = was if training is None else training
    try:
        for _, hook, _ in hooks:
            hook(m, ())
    finally:
        m.training = was


@contextlib.contextmanager
def reading(*modules: nn.Module | None) -> Iterator[None]:
    """Read the weights of ``modules`` outside a forward: in eval mode (a spectral norm,
    parametrized or hooked, does no power iteration and so changes no state), with hook-computed
    attributes recomputed from their sources first. Training flags are restored afterwards."""
    mods = [m for m in modules if m is not None]
    flags = {sub: sub.training for m in mods for sub in m.modules()}
    try:
        for sub in flags:
            sub.training = False
        for m in mods:
            refresh(m)
        yield
    finally:
        for sub, mode in flags.items():
            sub.training = mode


def deepcopy_memo(model: nn.Module, memo: dict[int, Any]) -> None:
    """Put a detached clone of every hook-computed attribute into a ``copy.deepcopy`` memo: the
    attribute is a non-leaf tensor after a training forward (deepcopy refuses it), and the copy
    recomputes it before its own first call anyway."""
    for m in model.modules():
        for _, _, name in computing_hooks(m):
            t = m.__dict__[name]
            memo[id(t)] = t.detach().clone()


def strip(m: nn.Module) -> None:
    """Remove from ``m`` (in place) what computes its tensors: the ``parametrizations`` container
    (the class goes back to the one before parametrize) and the computing pre-hooks with their
    source tensors and state-dict hooks. The computed attributes are left unset; the caller
    registers their values."""
    if parametrize.is_parametrized(m):
        m._modules.pop("parametrizations")
        if type(m).__name__.startswith("Parametrized"):
            m.__class__ = type(m).__bases__[0]
    for key, hook, name in computing_hooks(m):
        del m._forward_pre_hooks[key]
        m.__dict__.pop(name, None)
        for suffix in _SOURCE_SUFFIXES:
            m._parameters.pop(name + suffix, None)
            m._buffers.pop(name + suffix, None)
        for hooks in (m._state_dict_hooks, m._load_state_dict_pre_hooks):
            for k, h in list(hooks.items()):
                if getattr(h, "fn", None) is hook or getattr(getattr(h, "hook", None), "fn", None) is hook:
                    del hooks[k]


def bake(model: nn.Module) -> None:
    """Every computed tensor of ``model`` becomes a plain Parameter (requires_grad False) holding
    its current eval-mode value, with :func:`strip` applied: what a converter should see (pnnx and
    ONNX then read the weight the layer computes with, never its sources)."""
    for m in list(model.modules()):
        if not has_computed_weights(m):
            continue
        names = [n for _, _, n in computing_hooks(m)]
        if parametrize.is_parametrized(m):
            names += list(m.parametrizations.keys())
        with reading(m), torch.no_grad():
            values = {n: getattr(m, n).detach().clone() for n in names}
        strip(m)
        for n, v in values.items():
            m.register_parameter(n, nn.Parameter(v, requires_grad=False))


def describe(m: nn.Module) -> str | None:
    """What computes ``m``'s tensors, for the plan (``"weight by _WeightNorm (parametrization)"``),
    or None when nothing does."""
    parts = [f"{name} by {type(hook).__name__} (forward pre-hook)" for _, hook, name in computing_hooks(m)]
    if parametrize.is_parametrized(m):
        parts += [
            f"{name} by {', '.join(type(p).__name__ for p in plist)} (parametrization)"
            for name, plist in m.parametrizations.items()
        ]
    return "; ".join(parts) or None


def fingerprint(m: nn.Module) -> tuple[Any, ...]:
    """What computes ``m``'s tensors now, as a cheap comparable value (no tensor is read).

    It changes when a pre-hook or a parametrization is added or removed (``prune.remove``,
    ``parametrize.remove_parametrizations``), and at each new pruning round: ``prune`` registers
    a new ``<name>_mask`` buffer (``torch/nn/utils/prune.py``, ``BasePruningMethod.apply``), and an
    in-place change of a mask bumps its version counter. The sources' own training steps do not
    change it (only the masks' versions are part of it)."""
    hooks = tuple((key, id(hook), name) for key, hook, name in computing_hooks(m))
    sources = tuple(sorted(
        (n, id(t), t._version if n.endswith("_mask") else 0)
        for n, t in (*m._parameters.items(), *m._buffers.items())
        if t is not None and n.endswith(_SOURCE_SUFFIXES)
    ))
    params: tuple[Any, ...] = ()
    if parametrize.is_parametrized(m):
        params = tuple((n, id(plist), len(plist)) for n, plist in m.parametrizations.items())
    return hooks, sources, params


def fingerprints(model: nn.Module, names: list[str]) -> dict[str, tuple[Any, ...]]:
    """:func:`fingerprint` of each named module of ``model`` (names not in the model are left out)."""
    modules = dict(model.named_modules())
    return {n: fingerprint(modules[n]) for n in names if n in modules}


def restore_class(m: nn.Module, orig: type[nn.Module]) -> None:
    """Give ``m`` back its class from before QAT, ``orig``, keeping a parametrization registered
    on ``m`` after QAT converted it: torch then made ``m`` a ``Parametrized<QATConv2d>`` (a class
    of its own, ``parametrize._inject_new_class``, holding the weight property), which is
    re-based onto ``orig`` instead of dropped (dropping it would lose the weight)."""
    cls = type(m)
    later = (
        parametrize.is_parametrized(m)
        and cls.__name__.startswith("Parametrized")
        and not orig.__name__.startswith("Parametrized")
        and len(cls.__bases__) == 1
    )
    if later:
        cls.__bases__ = (orig,)
    elif orig.__name__.startswith("Parametrized") and not parametrize.is_parametrized(m):
        m.__class__ = orig.__bases__[0]  # its parametrizations were removed under QAT: the plain class
    else:
        m.__class__ = orig
