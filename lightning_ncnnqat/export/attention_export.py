"""The export's part for attention QAT trained as ncnn's dynamic int8 (``qat/attention_plan.py``).

A planned ``nn.MultiheadAttention`` is found among pnnx's ``MultiHeadAttention`` layers by its
weights (q/k/v/out equal to the trained ones, bit for bit: pnnx passes float32 weights through)
and written int8 by ``ncnn/int8_attention.write_mha_int8``; its weight scales are then the ones
the QAT forward used (both ``127 / absmax`` per row of the same float32 values). A unit of Linear
layers pnnx fused into one MultiHeadAttention (``QATPlan.fused_attention``, ``qat/fused_attention.py``)
is found and written the same way, by its parts' weights. SDPA layers are
written int8 (18=2, as ncnn2int8 does) only when QAT trained the model's SDPA calls in int8, and
then only when pnnx wrote as many SDPA layers as the plan counted calls; otherwise they stay float
(a model QAT trained with float SDPA) and the report says so.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.ncnn.bin_layout import locate
from lightning_ncnnqat.ncnn.int8_attention import mha_weights
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.qat.attention import mha_module_weights
from lightning_ncnnqat.qat.fused_attention import unit_weights
from lightning_ncnnqat.qat.attention_plan import MHA_KIND
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.wrappers import unwrap
from lightning_ncnnqat.verification.attention_checks import AttentionRef
from lightning_ncnnqat.verification.report import LayerReport

_ROLES = ("q_weight", "k_weight", "v_weight", "out_weight")


def _same(ncnn_w: dict[str, np.ndarray], torch_w: dict[str, torch.Tensor]) -> bool:
    for r in _ROLES:
        t = torch_w[r].detach().float().cpu().numpy()
        if ncnn_w[r].shape != t.shape or not np.array_equal(ncnn_w[r], t):
            return False
    return True


def _trained_mha(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{label: weights}`` of every attention the plan of ``model`` trains as ncnn's int8
    MultiHeadAttention: its ``nn.MultiheadAttention`` modules and the converter-fused units of Linear
    layers (``QATPlan.fused_attention``, labelled as in the plan)."""
    plan = get_plan(model)
    if plan is None:
        return {}
    modules = dict(unwrap(model).named_modules())
    out = {name: mha_module_weights(modules[name]) for name in plan.attention_layers}
    out.update({label: unit_weights(modules, unit) for label, unit in plan.fused_attention.items()})
    return out


def match_mha(model: nn.Module, param: NcnnParam, bin_bytes: bytes) -> dict[str, str]:
    """``{torch name: ncnn MultiHeadAttention name}`` of every attention the plan of ``model`` runs
    in int8 (:func:`_trained_mha`). Raises LayerError naming the layer when no ncnn layer, or more
    than one, holds its weights (the converter wrote it as something else, or two layers share them)."""
    trained = _trained_mha(model)
    if not trained:
        return {}
    layout = locate(param.layers, bin_bytes)
    ncnn = {lay.name: mha_weights(lay, layout[i], bin_bytes) for i, lay in enumerate(param.layers)
            if lay.type == MHA_KIND}
    out: dict[str, str] = {}
    for name, tw in trained.items():
        hits = [n for n, w in ncnn.items() if _same(w, tw)]
        if len(hits) != 1:
            what = "no ncnn MultiHeadAttention holds its weights" if not hits else f"ncnn layers {hits} all hold its weights"
            raise LayerError(
                name, f"layer '{name}' (trained as ncnn's int8 MultiHeadAttention): {what}; keep it in float "
                f"(QATCallback(skip=[{name!r}]) / QATConfig(skip=...))",
            )
        out[name] = hits[0]
    return out


def sdpa_int8(model: nn.Module, param: NcnnParam) -> tuple[bool, list[str]]:
    """Whether the SDPA layers of ``param`` are written int8 (QAT trained the model's SDPA calls
    so), and the report's note. Raises LayerError when the plan counted another number of calls
    than pnnx wrote SDPA layers (some would run in a precision QAT did not train)."""
    plan = get_plan(model)
    trained = sum(plan.sdpa_calls.values()) if plan is not None else 0
    layers = [lay.name for lay in param.layers if lay.type == "SDPA"]
    if not layers:
        return False, []
    if not trained:
        return False, [f"{len(layers)} SDPA layer(s) stay float: QAT did not train the model's scaled_dot_product_attention "
                       "calls in int8 (ncnn2int8 would set 18=2 on them)"]
    if trained != len(layers):
        where = ", ".join(f"'{n or '(model)'}': {c}" for n, c in plan.sdpa_calls.items())
        raise LayerError(
            None, f"QAT trained {trained} scaled_dot_product_attention call(s) in int8 ({where}) but the converter wrote "
            f"{len(layers)} SDPA layer(s) ({', '.join(layers[:6])}): they cannot be told apart",
        )
    return True, [f"{len(layers)} SDPA layer(s) are int8 (18=2): Q, QK^T per row and K, V per tensor quantized at "
                  "run time, as QAT trained them"]


#: Why a MatMul of two activations stays float (checked in ncnn's source, commit a4d2ea1 of
#: 2026-07-22: ``src/layer/matmul.cpp`` reads only ``0=transB``, the x86/arm MatMul layers have
#: no int8 path, ncnn2int8 has no MatMul pass; measured on ncnn 1.0.20261020: a MatMul with 18=2,
#: 18=1 or 8=1 under ``use_int8_inference`` computes the float product, max error 2.4e-7).
MATMUL_FLOAT_REASON = (
    "ncnn has no int8 MatMul (src/layer/matmul.cpp reads only transB; ncnn2int8 has no MatMul pass; "
    "int8 params are ignored): a product of two activations (linear attention, manual attention pnnx "
    "leaves apart) runs in float in ncnn, as QAT trained it"
)


def matmul_float_layers(param: NcnnParam) -> list[dict[str, str]]:
    """The report's float-layer entries of the converted model's ``MatMul`` layers (ncnn names:
    they are functions of the model, not modules), each with :data:`MATMUL_FLOAT_REASON`."""
    return [{"name": f"{lay.name} (ncnn MatMul)", "reason": MATMUL_FLOAT_REASON}
            for lay in param.layers if lay.type == "MatMul"]


def attention_layer_reports(refs: list[AttentionRef], param: NcnnParam) -> list[LayerReport]:
    """One report line per int8 MultiHeadAttention / SDPA (no input scale: activations are
    quantized at run time; no weight scale for SDPA, which has no weights)."""
    return [LayerReport(r.torch_name, None, r.ncnn_name, param.layer(r.ncnn_name).type, 8, 0.0, 0, r.torch_name)
            for r in refs]


def attention_refs(model: nn.Module, mha: dict[str, str], param: NcnnParam, sdpa: bool) -> list[AttentionRef]:
    """The per-layer check entries of the attention layers written int8: each MultiheadAttention
    with the weights QAT trained, each SDPA (in the order of the graph, named after the module
    making the call: ``"<module>:sdpa<i>"``, which no module computes alone, so no chain figure)."""
    plan = get_plan(model)
    modules = dict(unwrap(model).named_modules())
    trained = _trained_mha(model)
    refs = []
    for t, n in mha.items():
        w = {k: v.detach().float().cpu().clone() for k, v in trained[t].items()}
        heads = plan.fused_attention[t]["heads"] if t in plan.fused_attention else modules[t].num_heads
        refs.append(AttentionRef(t, n, w, heads))
    if sdpa:
        labels = [f"{m or '(model)'}:sdpa{i}" for m, c in plan.sdpa_calls.items() for i in range(c)]
        layers = [lay.name for lay in param.layers if lay.type == "SDPA"]
        refs += [AttentionRef(label, n) for label, n in zip(labels, layers)]
    return refs
