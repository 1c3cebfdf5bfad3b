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

from lightning_ncnnqat.conversion.model_io import FlatModel

_IGNORE_RE = re.compile(r"^ignore (\S+) (\S+) param (\w+)=(\S+)\s*$")
_NAME_OP_RE = re.compile(r"^((?:torch|Tensor|F)\.[A-Za-z][A-Za-z0-9_]*?)_\d+(?:_|$)")
_INT32_MAX = 2**31 - 1  # pnnx clamps an open end (INT64_MAX) to this: not comparable


def _aten_kinds(pnnx_type: str) -> set[str]:
    """aten kinds a pnnx op type may come from: ``Tensor.slice_copy`` -> slice, copy_, slice_copy..."""
    base = pnnx_type[len("aten::"):] if pnnx_type.startswith("aten::") else pnnx_type.rsplit(".", 1)[-1]
    names = {base, *base.split("_")} - {""}
    return {f"aten::{n}" for n in names} | {f"aten::{n}_" for n in names}


def _candidate_kinds(layer: str, pnnx_type: str) -> list[set[str]]:
    """Kinds to look for, most specific first: the op the layer is NAMED after (pnnx names a
    helper it inserted after the op it serves: ``torch.unbind_94_ncnnbatch2dim_0`` is a
    ``Tensor.reshape`` for ``torch.unbind``), then the layer's own type."""
    m = _NAME_OP_RE.match(layer)
    named = _aten_kinds(m.group(1)) if m and m.group(1) != pnnx_type else set()
    return [k for k in (named, _aten_kinds(pnnx_type)) if k]


def _value(text: str) -> tuple[int, ...] | None:
    """A logged parameter value as a tuple of ints (``3`` -> (3,), ``(1,2)`` -> (1, 2)); None if not ints."""
    try:
        return tuple(int(v) for v in text.strip("()[]").split(",") if v.strip())
    except ValueError:
        return None


def _logged_params(log: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{ncnn layer: {param: int values}}`` from pnnx's ``ignore ... param k=v`` lines; plural
    names of merged ops (``dims``, ``steps``) are singular (the aten argument's name)."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for line in log.splitlines():
        m = _IGNORE_RE.match(line.strip())
        v = _value(m.group(4)) if m else None
        if m and v:
            name = m.group(3)
            out.setdefault(m.group(2), {})[name[:-1] if name.endswith("s") and len(v) > 1 else name] = v
    return out


def _score(node: torch._C.Node, params: dict[str, tuple[int, ...]]) -> int:
    """How many logged parameters equal the node's constant argument of the same name."""
    try:
        args = torch._C.parse_schema(node.schema()).arguments
    except Exception:  # noqa: BLE001 - no schema (prim ops): nothing to compare
        return 0
    score = 0
    for arg, value in zip(args, node.inputs()):
        want = [w for w in params.get(arg.name, ()) if abs(w) < _INT32_MAX]
        if not want or value.node().kind() != "prim::Constant":
            continue
        got = value.toIValue()
        score += int(isinstance(got, int) and got in want)
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
    """The innermost Python frame the node was traced from (``file(line): function``), shortened;
    frames of this package (a ``TorchFunctionMode`` the trace runs under) are passed over."""
    lines = (node.sourceRange() or "").strip().splitlines()
    src = [ln for ln in lines if "/lightning_ncnnqat/" not in ln.split("(", 1)[0]] or lines
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
        kinds = next((k for k in _candidate_kinds(layer, typ) if any(n.kind() in k for n in nodes)), set())
        cands = [n for n in nodes if n.kind() in kinds]
        if not cands:
            continue
        scores = [_score(n, params.get(layer, {})) for n in cands]
        best = max(scores)
        where: dict[str, list[str]] = {}
        for n in (n for n, s in zip(cands, scores) if s == best):
            frames = where.setdefault(_module_name(n, root), [])
            f = _frame(n)
            if f and f not in frames:
                frames.append(f)
        # every node of the kind is a culprit when pnnx left at least as many such ops unconverted
        all_bad = len(cands) <= sum(_aten_kinds(t) == kinds for _, t in bad)
        if best == 0 and len(where) > 3 and not all_bad:  # too common to pin down without parameters
            continue
        out[layer] = (next(iter(where)), _describe(where, modules))
    return out


def _describe(where: dict[str, list[str]], modules: dict[str, nn.Module]) -> str:
    """``module 'a' (Cls) at f.py(3): fn`` for up to 3 modules; more: their count and classes."""
    def label(name: str) -> str:
        cls = type(modules[name]).__name__ if name in modules else "?"
        return f"module '{name}' ({cls})" if name else f"the model's own forward ({cls})"

    if len(where) <= 3:
        return " or ".join(label(n) + (f" at {'; '.join(f[:2])}" if f else "") for n, f in where.items())
    classes = sorted({type(modules[n]).__name__ for n in where if n in modules})
    frames = sorted({f for fs in where.values() for f in fs})
    return (f"{len(where)} modules of class {', '.join(classes)} ({label(next(iter(where)))}, ...)"
            + (f" at {'; '.join(frames[:2])}" if frames else ""))


EXPORT_FORM_HINT = (
    "If the model has an export form a converter can express (as ultralytics heads have: a "
    "boolean `export` attribute, set automatically), give that module a `ncnn_export_form()` "
    "method returning a context manager that switches it (see lightning_ncnnqat.qat.export_form); "
    "otherwise rewrite the op (e.g. a strided slice as view + index) or keep it out of forward()"
)
