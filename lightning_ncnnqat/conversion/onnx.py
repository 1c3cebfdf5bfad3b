"""``model.onnx``: the folded float model exported to ONNX and simplified with onnxsim.

The TorchScript-based exporter is preferred: it names nodes after module paths (``/layer1/conv1/Conv``)
and exports ``nn.Linear`` on 2-D input as one ``Gemm`` (onnx2ncnn turns it into one
InnerProduct). If it is unavailable or fails, the dynamo exporter is used. Quantized layers are
then found in the graph by their weight initializers, not by name or order.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.conversion.graph_match import Wiring
from lightning_ncnnqat.conversion.matching import WeightOwner, _same, match_by_weights
from lightning_ncnnqat.conversion.tracing import traceable
from lightning_ncnnqat.qat.fast_path import python_paths

INPUT_NAME = "in0"
OUTPUT_NAME = "out0"


@dataclass
class OnnxResult:
    model_bytes: bytes
    exporter: str  # "torchscript" or "dynamo"
    opset: int
    node_names: list[str]  # onnx2ncnn layer name of every node, graph order


def onnx2ncnn_name(node: onnx.NodeProto) -> str:
    """The layer name onnx2ncnn gives ``node``: its name, or its first output when unnamed."""
    return node.name if node.name else (node.output[0] if node.output else "")


def _export_bytes(
    model: nn.Module, example: Sequence[torch.Tensor], input_names: list[str], output_names: list[str], opset: int
) -> tuple[bytes, str]:
    dynamic = {n: {0: "N"} for n, t in zip(input_names, example) if t.dim() and t.shape[0] == 1}
    with torch.no_grad():
        outs = model(*example)
    outs = outs if isinstance(outs, tuple) else (outs,)
    dynamic.update({n: {0: "N"} for n, o in zip(output_names, outs) if o.dim() and o.shape[0] == 1})
    errors = []
    for dynamo in (False, True):
        buf = io.BytesIO()
        try:
            # python_paths: nn.MultiheadAttention's eval fast path (aten::_native_multi_head_attention) has no ONNX export
            with traceable(model), python_paths(), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kwargs = dict(
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes=dynamic,
                    opset_version=opset if not dynamo else max(opset, 18),
                    dynamo=dynamo,
                )
                if dynamo:
                    kwargs["verbose"] = False
                torch.onnx.export(model, tuple(example), buf, **kwargs)
            return buf.getvalue(), ("dynamo" if dynamo else "torchscript")
        except Exception as e:  # noqa: BLE001  (try the other exporter, report both)
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(e).__name__}: {str(e)[:500]}")
    raise LayerError(None, "torch.onnx.export failed: " + " | ".join(errors))


def export_onnx(
    model: nn.Module,
    example: Sequence[torch.Tensor],
    opset: int = 17,
    input_names: Sequence[str] = (INPUT_NAME,),
    output_names: Sequence[str] = (OUTPUT_NAME,),
    strip_prefix: str | None = None,
) -> OnnxResult:
    """Export ``model(*example)`` and simplify; raise naming the cause if either fails.

    The graph's inputs are exactly ``input_names`` (one per example tensor) and its outputs
    ``output_names``; an exporter that adds an input (a non-tensor argument it did not freeze)
    is an error naming it. ``strip_prefix`` (the attribute under which a wrapper holds the
    user's model, e.g. ``"model"``) is removed from node and value names, so nodes keep the
    user's module paths (``/layer1/conv1/Conv``).
    """
    import onnxsim

    if isinstance(example, torch.Tensor):
        example = [example]
    data, exporter = _export_bytes(model.eval(), list(example), list(input_names), list(output_names), opset)
    proto = onnx.load_from_string(data)
    if strip_prefix:
        _strip_prefix(proto, strip_prefix)
    extra = [i.name for i in proto.graph.input if i.name not in input_names]
    inits = {t.name for t in proto.graph.initializer}
    extra = [n for n in extra if n not in inits]
    if extra:
        raise LayerError(None, f"the ONNX graph has inputs {extra} besides {list(input_names)}: a forward argument was not frozen")
    try:
        simplified, ok = onnxsim.simplify(proto)
    except Exception as e:  # noqa: BLE001 - onnxsim (not ours) raises anything; re-raised naming it
        raise LayerError(None, f"onnxsim failed: {type(e).__name__}: {e}") from e
    if not ok:
        raise LayerError(None, "onnxsim could not validate the simplified model")
    onnx.checker.check_model(simplified)
    names = [onnx2ncnn_name(n) for n in simplified.graph.node]
    opset_used = next((o.version for o in simplified.opset_import if o.domain in ("", "ai.onnx")), opset)
    return OnnxResult(simplified.SerializeToString(), exporter, int(opset_used), names)


def onnx_weight_owners(model_bytes: bytes) -> list[WeightOwner]:
    """Conv / Gemm / MatMul nodes with a constant weight, as candidates for matching."""
    proto = onnx.load_from_string(model_bytes)
    inits = {t.name: t for t in proto.graph.initializer}
    consts = {}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    owners = []
    for index, n in enumerate(proto.graph.node):
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        t = inits.get(n.input[1]) or consts.get(n.input[1])
        if t is None:
            continue
        w = numpy_helper.to_array(t).astype(np.float32)
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            kind = "Convolution" if group == 1 else "ConvolutionDepthWise"
        else:
            kind = "InnerProduct"
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0) if n.op_type == "Gemm" else 0
            if w.ndim != 2:
                continue
            if not trans_b:
                w = w.T  # stored [in, out]; torch Linear weight is [out, in]
        bias = _constant_bias(n, inits, consts, int(w.shape[0]))  # w is [out, ...] here
        owners.append(WeightOwner(onnx2ncnn_name(n), kind, np.ascontiguousarray(w).ravel(), bias, index))
    return owners


def _constant_bias(node: onnx.NodeProto, inits: dict, consts: dict, n_out: int) -> np.ndarray | None:
    """The constant per-output bias of a Conv / Gemm node (``[n_out]`` float32; a Gemm's ``C``
    times ``beta``), or None when it has none or it is not one value per output. It is evidence
    for matching: tied weights (one Parameter in two heads) differ only by their biases."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return None
    t = inits.get(node.input[2]) or consts.get(node.input[2])
    if t is None:
        return None
    b = numpy_helper.to_array(t).astype(np.float32).reshape(-1)
    if b.size != n_out:
        return None
    if node.op_type == "Gemm":
        b = b * np.float32(next((a.f for a in node.attribute if a.name == "beta"), 1.0))
    return b


def onnx_wiring(model_bytes: bytes) -> Wiring:
    """The ONNX graph's wiring (nodes keyed ``name#index`` as :func:`onnx_weight_owners`' owners)."""
    g = onnx.load_from_string(model_bytes).graph
    inits = {t.name for t in g.initializer}
    nodes = [(f"{onnx2ncnn_name(n)}#{i}", list(n.input), list(n.output)) for i, n in enumerate(g.node)]
    return Wiring(nodes, [i.name for i in g.input if i.name not in inits], [o.name for o in g.output])


def onnx_names(
    model_bytes: bytes, infos: Sequence, torch_graph: Wiring | None = None, notes: list[str] | None = None
) -> tuple[dict[str, str], dict[str, float]]:
    """torch layer name -> ONNX (onnx2ncnn) layer name, by weight content; and the factor ``c``
    of every layer whose ONNX weights are ``c * w`` (``c > 0``): onnxsim folds a constant scale of
    the layer's input (``conv(x * 0.5)``) into its weights, so that layer reads ``x`` and its table
    rows become ``input_scale * c`` and ``weight_scales / c`` (the same integers)."""
    owners = onnx_weight_owners(model_bytes)
    factors: dict[str, float] = {}
    probe = []
    for info in infos:
        w = info.weight.detach().cpu().float().numpy().ravel()
        if any(o.weight.shape == w.shape and _same(o.weight, w) for o in owners):
            probe.append(info)
            continue
        k = int(np.argmax(np.abs(w))) if w.size else 0
        for o in owners:
            if o.weight.shape != w.shape or not w.size or w[k] == 0:
                continue
            c = float(o.weight[k]) / float(w[k])
            if c > 0 and _same(o.weight, (w * np.float32(c)).astype(np.float32)):
                factors[info.name] = c
                probe.append(replace(info, weight=info.weight * c))
                break
        else:
            probe.append(info)
    graphs = None if torch_graph is None else (torch_graph, onnx_wiring(model_bytes))
    return match_by_weights(probe, owners, "ONNX graph", graphs=graphs, notes=notes), factors


def _strip_prefix(proto: onnx.ModelProto, prefix: str) -> None:
    """Rename ``/prefix/...`` and ``prefix....`` node and value names to the wrapped model's."""
    slash, dot = f"/{prefix}/", f"{prefix}."

    def fix(name: str) -> str:
        if name.startswith(slash):
            return "/" + name[len(slash) :]
        if name.startswith(dot):
            return name[len(dot) :]
        return name

    g = proto.graph
    for n in g.node:
        n.name = fix(n.name)
        n.input[:] = [fix(v) for v in n.input]
        n.output[:] = [fix(v) for v in n.output]
    for coll in (g.initializer, g.input, g.output, g.value_info):
        for v in coll:
            v.name = fix(v.name)


def run_onnx(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], str]:
    """Run the ONNX model on ``feeds``: with onnxruntime (the usual judge), else onnx's reference
    evaluator (which, for one, mis-sizes ceil-mode MaxPool). Returns (outputs, evaluator name)."""
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        outs = ReferenceEvaluator(onnx.load_from_string(model_bytes)).run(None, feeds)
        return [np.asarray(o) for o in outs], "onnx.reference"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)], f"onnxruntime {ort.__version__}"
