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
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .errors import LayerError
from .matching import WeightOwner, match_by_weights
from .tracing import traceable

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


def _export_bytes(model: nn.Module, example: torch.Tensor, opset: int) -> tuple[bytes, str]:
    errors = []
    for dynamo in (False, True):
        buf = io.BytesIO()
        try:
            with traceable(model), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kwargs = dict(
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                    opset_version=opset if not dynamo else max(opset, 18),
                    dynamo=dynamo,
                )
                if dynamo:
                    kwargs["verbose"] = False
                torch.onnx.export(model, (example,), buf, **kwargs)
            return buf.getvalue(), ("dynamo" if dynamo else "torchscript")
        except Exception as e:  # noqa: BLE001  (try the other exporter, report both)
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(e).__name__}: {e}")
    raise LayerError(None, "torch.onnx.export failed: " + " | ".join(errors))


def export_onnx(model: nn.Module, example: torch.Tensor, opset: int = 17) -> OnnxResult:
    """Export and simplify; raise naming the cause if either fails."""
    import onnxsim

    data, exporter = _export_bytes(model.eval(), example, opset)
    proto = onnx.load_from_string(data)
    try:
        simplified, ok = onnxsim.simplify(proto)
    except Exception as e:  # noqa: BLE001
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
    for n in proto.graph.node:
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
        owners.append(WeightOwner(onnx2ncnn_name(n), kind, np.ascontiguousarray(w).ravel(), None))
    return owners


def onnx_names(model_bytes: bytes, infos: Sequence) -> dict[str, str]:
    """torch layer name -> ONNX (onnx2ncnn) layer name, by weight content."""
    return match_by_weights(infos, onnx_weight_owners(model_bytes), "ONNX graph")


def onnx_reference_output(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """Run the ONNX model with onnx's reference evaluator (no onnxruntime needed)."""
    from onnx.reference import ReferenceEvaluator

    return np.asarray(ReferenceEvaluator(onnx.load_from_string(model_bytes)).run(None, {INPUT_NAME: x})[0])
