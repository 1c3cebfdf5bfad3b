"""float32 ncnn model from the folded float model, with pnnx from PyPI.

We trace with ``torch.jit.trace`` ourselves and call the ``pnnx`` binary directly (instead of
``pnnx.export``): ``pnnx.convert`` ignores the converter's exit status and imports the Python
file it generated, so a failure would surface as an unrelated ImportError. Everything runs in
a private temporary directory; only the checked ``.ncnn.param``/``.ncnn.bin`` are handed back.
pnnx keeps ops it cannot convert as layers of their torch name (``torch.cumprod``) and exits
0, so the result is checked against the layer types this ncnn build can create.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_ncnnqat.errors import LayerError
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.conversion.op_origin import EXPORT_FORM_HINT, op_origins
from lightning_ncnnqat.conversion.tracing import traceable
from lightning_ncnnqat.qat.attention_plan import float_attention_masks
from lightning_ncnnqat.qat.fast_path import python_paths


@dataclass
class PnnxResult:
    param_text: str
    bin_bytes: bytes
    log: str


#: pnnx's ``inputshape`` type suffixes (pnnx ``README``: f32 f64 f16 i32 i64 i16 i8 u8 bool).
_PNNX_TYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.float64: "f64", torch.int64: "i64", torch.int32: "i32",
    torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool",
}


def _inputshape(x: torch.Tensor) -> str:
    """``[1,3,224,224]f32`` / ``[1,24]i64``: the shape and dtype pnnx traces the input with."""
    if x.dtype not in _PNNX_TYPES:
        raise ValueError(f"an input of dtype {x.dtype} cannot be given to pnnx (supported: {sorted(map(str, _PNNX_TYPES))})")
    return "[" + ",".join(str(int(d)) for d in x.shape) + "]" + _PNNX_TYPES[x.dtype]


def unknown_layer_types(param: NcnnParam) -> list[tuple[str, str]]:
    """(layer name, type) of layers this ncnn build cannot create."""
    import ncnn

    return [(lay.name, lay.type) for lay in param.layers if ncnn.layer_to_index(lay.type) < 0]


def convert_with_pnnx(
    model: nn.Module, example: torch.Tensor | Sequence[torch.Tensor], timeout_s: float = 600.0
) -> PnnxResult:
    """Trace ``model(*example)`` (batch 1) and convert it to a float32 ncnn model.

    pnnx names the input blobs ``in0..inK`` in argument order and the output blobs
    ``out0..outM`` in the order of the returned tuple.
    """
    import pnnx

    example = [example] if isinstance(example, torch.Tensor) else list(example)
    model = model.eval()
    with tempfile.TemporaryDirectory(prefix="ncnnqat_pnnx_") as tmp:
        tmpdir = Path(tmp)
        pt = tmpdir / "model.pt"
        # python_paths: torch's fused eval ops (aten::_transformer_encoder_layer_fwd, ...) have no pnnx conversion
        # float_attention_masks: a bool attention mask traced as the float mask ncnn must add
        with traceable(model), python_paths(), float_attention_masks(model), torch.no_grad():
            traced = torch.jit.trace(model, tuple(example), check_trace=False)
        traced.save(str(pt))
        shapes = ",".join(_inputshape(x) for x in example)
        cmd = [pnnx.EXEC_PATH, str(pt), f"inputshape={shapes}", "device=cpu", "fp16=0"]
        proc = subprocess.run(cmd, cwd=tmpdir, capture_output=True, text=True, timeout=timeout_s)
        log = proc.stdout + proc.stderr
        param_path, bin_path = tmpdir / "model.ncnn.param", tmpdir / "model.ncnn.bin"
        if proc.returncode != 0 or not param_path.is_file() or not bin_path.is_file():
            tail = "\n".join(log.strip().splitlines()[-15:])
            raise LayerError(None, f"pnnx failed (exit status {proc.returncode}):\n{tail}")
        text = param_path.read_text()
        data = bin_path.read_bytes()
    param = NcnnParam.parse(text)
    bad = unknown_layer_types(param)
    if bad:
        name, typ = bad[0]
        ignored = [ln for ln in log.splitlines() if ln.startswith("ignore ")]
        hint = f" (pnnx: {ignored[0]})" if ignored else ""
        ints = [f"in{i} ({x.dtype})" for i, x in enumerate(example) if not x.is_floating_point()]
        if ints and typ == "Tensor.to":
            hint += (
                f"; the model casts an integer input ({', '.join(ints)}) and ncnn has no such cast (its blobs are "
                "float32, only Embed reads ids): feed that input as float, or use the ids only in nn.Embedding"
            )
        where = op_origins(traced, model, bad, log).get(name, (None, "a module not found in the trace"))[1]
        raise LayerError(
            name,
            f"pnnx could not convert op '{typ}' (ncnn layer '{name}') in {where} to an ncnn layer{hint}; "
            f"all unconvertible: {', '.join(f'{n} ({t})' for n, t in bad)}. {EXPORT_FORM_HINT}",
        )
    return PnnxResult(text, data, log)
