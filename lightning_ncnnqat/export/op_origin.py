"""Where an op pnnx could not convert comes from: the module and the source line of the user's model.

pnnx keeps an op it cannot express as a layer named after the torch op (``Tensor.slice_5`` of
type ``Tensor.slice``) and logs its parameters (``ignore Tensor.slice Tensor.slice_5 param
step=3``). Neither names the module. The TorchScript trace pnnx converted does: every node has
a scope (``__module.model.head``) and the Python frame it was traced from
(``head.py(650): kpts_decode``). :func:`op_origins` finds the trace nodes of the op's aten kind
whose constant arguments equal the logged parameters (by argument name), so an error can say
which module's forward holds the op, not only which ncnn layer.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .model_io import FlatModel

_IGNORE_RE = re.compile(r"^ignore (\S+) (\S+) param (\w+)=(-?\d+)\s*$")
_INT32_MAX = 2**31 - 1  # pnnx clamps an open end (INT64_MAX) to this: not comparable


def _aten_kinds(pnnx_type: str) -> set[str]:
    """aten kinds a pnnx op type may come from: ``Tensor.slice_copy`` -> slice, copy_, slice_copy..."""
    base = pnnx_type[len("aten::"):] if pnnx_type.startswith("aten::") else pnnx_type.rsplit(".", 1)[-1]
    names = {base, *base.split("_")} - {""}
    return {f"aten::{n}" for n in names} | {f"aten::{n}_" for n in names}


def _logged_params(log: str) -> dict[str, dict[str, int]]:
    """``{ncnn layer: {param: int value}}`` from pnnx's ``ignore ... param k=v`` lines."""
    out: dict[str, dict[str, int]] = {}
    for line in log.splitlines():
        m = _IGNORE_RE.match(line.strip())
        if m:
            out.setdefault(m.group(2), {})[m.group(3)] = int(m.group(4))
    return out


def _score(node: torch._C.Node, params: dict[str, int]) -> int:
    """How many logged parameters equal the node's constant argument of the same name."""
    try:
        args = torch._C.parse_schema(node.schema()).arguments
    except Exception:  # noqa: BLE001 - no schema (prim ops): nothing to compare
        return 0
    score = 0
    for arg, value in zip(args, node.inputs()):
        want = params.get(arg.name)
        if want is None or abs(want) >= _INT32_MAX or value.node().kind() != "prim::Constant":
            continue
        got = value.toIValue()
        score += int(isinstance(got, int) and got == want)
    return score


def _module_name(node: torch._C.Node, root: nn.Module) -> str:
    """The traced module path of ``node`` relative to the user's model ('' = its own forward)."""
    scope = node.scopeName().split("/")[-1]
    name = scope[len("__module."):] if scope.startswith("__module.") else ""
    if name == "__module":
        name = ""
    if isinstance(root, FlatModel):
        name = "" if name == "model" else name[len("model."):] if name.startswith("model.") else name
    return name


def _frame(node: torch._C.Node) -> str:
    """The innermost Python frame the node was traced from (``file(line): function``), shortened."""
    src = (node.sourceRange() or "").strip().splitlines()
    return src[0].rsplit("site-packages/", 1)[-1].strip() if src else ""


def op_origins(
    traced: torch.jit.ScriptModule, root: nn.Module, bad: list[tuple[str, str]], log: str
) -> dict[str, tuple[str, str]]:
    """``{ncnn layer: (module name, description)}`` for the unconvertible ``bad`` layers
    (``(ncnn layer name, pnnx op type)``) of the conversion of ``traced`` (traced from ``root``).

    The description names the module, its class and the source frame(s), e.g. ``"module 'head'
    (Head) at head.py(650): kpts_decode"``. Layers whose origin cannot be told are left out.
    """
    try:
        return _origins(traced, root, bad, log)
    except Exception:  # noqa: BLE001 - only an error message's detail: never a second failure
        return {}


def _origins(
    traced: torch.jit.ScriptModule, root: nn.Module, bad: list[tuple[str, str]], log: str
) -> dict[str, tuple[str, str]]:
    params = _logged_params(log)
    inner = root.model if isinstance(root, FlatModel) else root
    modules = dict(inner.named_modules())
    nodes = list(traced.inlined_graph.nodes())
    out: dict[str, tuple[str, str]] = {}
    for layer, typ in bad:
        kinds = _aten_kinds(typ)
        cands = [n for n in nodes if n.kind() in kinds]
        if not cands:
            continue
        scores = [_score(n, params.get(layer, {})) for n in cands]
        best = max(scores)
        picked = [n for n, s in zip(cands, scores) if s == best]
        where: dict[str, list[str]] = {}
        for n in picked:
            frames = where.setdefault(_module_name(n, root), [])
            f = _frame(n)
            if f and f not in frames:
                frames.append(f)
        if len(where) > 3:  # too common an op to pin down (e.g. every slice of the model)
            continue
        parts = []
        for name, frames in where.items():
            cls = type(modules[name]).__name__ if name in modules else "?"
            label = f"module '{name}' ({cls})" if name else f"the model's own forward ({cls})"
            parts.append(label + (f" at {'; '.join(frames[:2])}" if frames else ""))
        out[layer] = (next(iter(where)), " or ".join(parts))
    return out


EXPORT_FORM_HINT = (
    "If the model has an export form a converter can express (as ultralytics heads have: "
    "export/format attributes, set automatically), give that module a `ncnn_export_form()` "
    "method returning a context manager that switches it (see lightning_ncnnqat.export_form); "
    "otherwise rewrite the op (e.g. a strided slice as view + index) or keep it out of forward()"
)
