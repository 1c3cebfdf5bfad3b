"""Which activation a module or an inline expression computes: recognised by its values, not its name.

ncnn chains int8 convs only through activations its converter folds into the conv (see
``qat.activation_swap``), so what matters is what a forward COMPUTES: yolov5's own
``SiLU`` (``x * torch.sigmoid(x)``), a ``class MySiLU(nn.SiLU)``, a ``Swish`` whose ``beta`` is 1
and ``nn.SiLU`` all become ncnn ``Swish`` layers that break the chain alike.

- :func:`activation_kind`: a user-written module is run on fixed probe inputs and compared
  with SiLU, GELU (erf and tanh forms) and HardSwish, as ``bn_fold.is_bn_like`` checks BN-like
  modules by numbers. Only small, stateless leaf modules are probed (no children, no buffers,
  at most :data:`MAX_PROBE_PARAMS` parameter values), in eval mode and without grad; torch's
  own classes are known by class.
- :func:`functional_forms`: activations computed inline in a bigger forward (``F.silu(x)``,
  ``x * torch.sigmoid(x)``, ``0.5 * x * (1 + torch.erf(x / 1.414))``), found in the traced data
  flow (``qat.graph``) as a product of two values derived from ONE tensor by elementwise ops, one
  of them through a sigmoid, erf or tanh. They cannot be swapped by module surgery; they are
  named with their source line so the user can change the code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ncnnqat.qat.graph import DataFlow

#: Activation kind -> torch's class for it (what ``swaps`` mappings are keyed by).
KIND_CLASS: dict[str, type[nn.Module]] = {"SiLU": nn.SiLU, "GELU": nn.GELU, "Hardswish": nn.Hardswish}
#: Kinds that break ncnn's int8 chains (HardSwish is folded into the conv: by pnnx for yolov5's
#: ``x * F.hardtanh(x + 3, 0, 6) / 6``, by ``conversion.activation_fold`` for ``nn.Hardswish``).
BREAKING_KINDS = ("SiLU", "GELU")
#: Parameter values a probed module may hold (a Swish's ``beta``); larger modules are layers, not activations.
MAX_PROBE_PARAMS = 16

_REFERENCES: dict[str, tuple] = {
    "SiLU": (F.silu,),
    "GELU": (F.gelu, lambda x: F.gelu(x, approximate="tanh")),
    "Hardswish": (F.hardswish,),
}


def _probes(device: torch.device) -> list[Tensor]:
    """Two [2, 3, 6, 6] float32 inputs: an even sweep of [-8, 8] and a seeded normal * 3."""
    g = torch.Generator().manual_seed(0)
    return [torch.linspace(-8.0, 8.0, 216).reshape(2, 3, 6, 6).to(device),
            (torch.randn(2, 3, 6, 6, generator=g) * 3).to(device)]


def _probe_candidate(m: nn.Module) -> bool:
    if next(iter(m.children()), None) is not None or next(iter(m.buffers()), None) is not None:
        return False
    if "_ncnnqat_orig_class" in m.__dict__:  # a QAT module
        return False
    return sum(p.numel() for p in m.parameters()) <= MAX_PROBE_PARAMS


def activation_kind(m: nn.Module | None) -> str | None:
    """``"SiLU"``, ``"GELU"`` or ``"Hardswish"`` when ``m`` computes that activation, else None.

    torch's own ``nn`` classes are known by exact class (other builtins: None); any other module
    that passes the candidate rule (module doc) must match a reference within rtol 1e-4 /
    atol 1e-5 on every probe input, same shape. A module that raises on the probe is None.
    """
    if m is None:
        return None
    for kind, cls in KIND_CLASS.items():
        if type(m) is cls:
            return kind
    if type(m).__module__.startswith("torch.") or not _probe_candidate(m):
        return None
    param = next(iter(m.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = m.training
    try:
        m.training = False
        with torch.no_grad():
            xs = _probes(device)
            outs = [m(x) for x in xs]
    except Exception:  # noqa: BLE001 - a module that cannot run on the probe is not an elementwise activation
        return None
    finally:
        m.training = was_training
    if not all(isinstance(o, Tensor) and o.shape == x.shape and o.is_floating_point() for o, x in zip(outs, xs)):
        return None
    for kind, refs in _REFERENCES.items():
        for ref in refs:
            if all(torch.allclose(o.float(), ref(x), rtol=1e-4, atol=1e-5) for o, x in zip(outs, xs)):
                return kind
    return None


@dataclass(frozen=True)
class FunctionalForm:
    """A chain-breaking activation computed inline: its kind, the form (``"F.silu"``,
    ``"x * sigmoid(x)"``) and where in the user's code (``"net.py:12 in forward"``)."""

    kind: str
    form: str
    where: str


#: Elementwise arithmetic an activation's expression is made of (torch function names as traced).
_ARITH = frozenset(
    f"{pre}{op}{post}" for op in ("mul", "add", "sub", "div", "truediv", "pow", "neg", "rsub")
    for pre, post in (("", ""), ("", "_"), ("__", "__"), ("__r", "__"), ("__i", "__"))
) | {"sqrt", "rsqrt", "exp", "reciprocal"}
#: The nonlinearity that names the form's kind (x * tanh(softplus(x)), Mish, is not one: softplus
#: is no elementwise arithmetic, so the walk stops there and the two sides have different roots).
_MARKS = {"sigmoid": "SiLU", "sigmoid_": "SiLU", "erf": "GELU", "erf_": "GELU", "tanh": "GELU", "tanh_": "GELU"}
_MARK_MODULES: dict[type, str] = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_MULS = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__"})
_DIRECT = {"silu": "SiLU", "silu_": "SiLU", "gelu": "GELU"}
_MAX_DEPTH = 10


def _root(flow: DataFlow, v: int, stops: set[int], depth: int = 0) -> tuple[int, frozenset[str]]:
    """The one tensor ``v`` is computed from by elementwise functions alone (not looking past the
    values in ``stops``: activations already found), and those functions."""
    p = flow.producer.get(v)
    if p is None or v in stops or depth >= _MAX_DEPTH:
        return v, frozenset()
    node = flow.nodes[p]
    # an nn.Sigmoid / nn.Tanh module (``x * self.sig(x)``) is the function it computes
    target = _MARK_MODULES.get(type(node.module), "") if node.module is not None else node.target
    if len(node.outputs) != 1 or not node.inputs or (target not in _ARITH and target not in _MARKS):
        return v, frozenset()
    roots = [_root(flow, i, stops, depth + 1) for i in node.inputs]
    if len({r for r, _ in roots}) != 1:
        return v, frozenset()
    return roots[0][0], frozenset().union(*(ops for _, ops in roots)) | {target}


def functional_forms(flow: DataFlow) -> list[FunctionalForm]:
    """SiLU / GELU computed by function calls outside activation modules in the traced ``flow``
    (``F.silu``, ``F.gelu``, and the inline products the module doc describes), in call order,
    one per computed activation."""
    found: list[FunctionalForm] = []
    seen: set[tuple[int, str]] = set()
    stops: set[int] = set()  # outputs of the activations found: a later form starts from them
    for node in flow.nodes:
        if node.module is not None:
            continue
        if node.target in _DIRECT:
            found.append(FunctionalForm(_DIRECT[node.target], f"F.{node.target.rstrip('_')}", node.where))
            stops.update(node.outputs)
            continue
        if node.target not in _MULS or len(node.inputs) != 2:
            continue
        (ra, opa), (rb, opb) = (_root(flow, v, stops) for v in node.inputs)
        ops = opa | opb
        marks = {_MARKS[o] for o in ops if o in _MARKS}
        if ra != rb or len(marks) != 1 or (ra, next(iter(marks))) in seen:
            continue
        kind = marks.pop()
        seen.add((ra, kind))
        stops.update(node.outputs)
        mark = next(o for o in sorted(ops) if o in _MARKS).rstrip("_")
        found.append(FunctionalForm(kind, f"x * {mark}(x)" if kind == "SiLU" else f"x * (1 + {mark}(...)) / 2",
                                    node.where))
    return found
