"""Measured proof that the ncnn models compute what the PyTorch models compute.

* whole-model parity: PyTorch QAT model in eval mode vs ncnn int8, folded float model vs ncnn
  float32, on the held batch;
* per-layer parity of every quantized layer in the int8 runtime, so a layer ncnn computes
  wrongly is named. Two numbers per layer: **isolated** (ncnn's own input blob of the layer
  fed to the PyTorch QAT layer, compared with ncnn's output blob: only this layer's error) and
  **chain** (ncnn's output blob vs the PyTorch QAT model's value at that point: accumulated
  drift). A layer is flagged on its isolated numbers. Activations pnnx fused into the layer
  (param 9) are applied to the PyTorch value, and a requantized (int8) output is compared with
  the PyTorch value quantized with the same output scale, which is what the next layer reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ops import reference
from .ncnn_param import NcnnLayer, NcnnParam
from .ncnn_runtime import NcnnNet

#: Flag a layer whose isolated output has cosine below this ...
MIN_LAYER_COSINE = 0.999
#: ... or a max error above this fraction of its output's absmax (a correct layer stays within
#: about one quantization step, 1/127 = 0.8 %).
MAX_LAYER_REL_ERR = 0.05


@dataclass
class Agreement:
    """How closely ``got`` follows ``ref`` over a batch (``[N, K]`` each)."""

    n: int
    top1_agreement: float | None  # fraction of samples with the same argmax (None: not a [N, C>1] output)
    cosine: float  # over the whole batch, flattened
    min_sample_cosine: float
    max_abs_err: float
    max_rel_err: float  # max |got - ref| / max |ref|
    mean_abs_err: float


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def agreement(ref: np.ndarray, got: np.ndarray) -> Agreement:
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    got = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    if ref.shape != got.shape:
        raise ValueError(f"output shapes differ: PyTorch {ref.shape}, ncnn {got.shape}")
    err = np.abs(ref - got)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    finite = bool(np.isfinite(got).all())
    top1 = float((ref.argmax(1) == got.argmax(1)).mean()) if ref.shape[1] > 1 and finite else None
    return Agreement(
        n=len(ref),
        top1_agreement=top1 if finite or ref.shape[1] <= 1 else 0.0,
        cosine=_cos(ref, got) if finite else 0.0,
        min_sample_cosine=min(_cos(r, g) for r, g in zip(ref, got)) if finite else 0.0,
        max_abs_err=float(err.max()) if finite else float("inf"),
        max_rel_err=(float(err.max()) / scale if scale > 0 else float(err.max())) if finite else float("inf"),
        mean_abs_err=float(err.mean()) if finite else float("inf"),
    )


def ncnn_activation(lay: NcnnLayer, y: torch.Tensor) -> torch.Tensor:
    """Apply the activation fused into ``lay`` (param 9, params in 10) as ncnn does."""
    t = lay.get_int(9, 0)
    p = lay.get_array(10)
    if t == 0:
        return y
    if t == 1:
        return F.relu(y)
    if t == 2:
        return F.leaky_relu(y, p[0] if p else 0.0)
    if t == 3:
        return torch.clamp(y, p[0], p[1])
    if t == 4:
        return torch.sigmoid(y)
    if t == 5:
        return F.mish(y)
    if t == 6:
        alpha, beta = (p[0], p[1]) if len(p) >= 2 else (1 / 6, 0.5)
        return y * torch.clamp(y * alpha + beta, 0.0, 1.0)
    raise ValueError(f"ncnn layer '{lay.name}': unknown fused activation type {t}")


def _fq(y: torch.Tensor, scale: float) -> torch.Tensor:
    """Quantize-dequantize ``y`` with an ncnn output scale (what a requantized blob holds)."""
    s = torch.tensor(scale, dtype=torch.float32)
    return reference.round_half_away(torch.clamp(y.float() * s, -127.0, 127.0)) / s


def blob_int8_scale(param: NcnnParam, blob: str, out_scales: dict[str, float]) -> float | None:
    """The scale of ``blob`` if a requantizing layer wrote it as int8 (through Splits)."""
    prod = param.producer(blob)
    while prod is not None and prod.type == "Split":
        prod = param.producer(prod.bottoms[0])
    if prod is None:
        return None
    return out_scales.get(prod.name)


@dataclass
class LayerCheck:
    torch_name: str
    ncnn_name: str
    isolated_cosine: float
    isolated_max_rel_err: float
    chain_cosine: float
    chain_max_rel_err: float
    ok: bool | None  # None: not judged, ncnn's input to this layer was out of int8 conversion range
    ok_without_packing: bool | None = None  # set when flagged: rerun with use_packing_layout=False
    samples_checked: int = 0  # samples whose ncnn input blob could be judged (finite, |x * scale| < 2**30)

    def to_dict(self) -> dict:
        return asdict(self)


def _capture(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> tuple[dict, dict]:
    """Inputs and outputs of the named modules in one eval forward of ``model``."""
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    handles = []
    mods = dict(model.named_modules())
    for n in names:
        def hook(mod, args, out, n=n):
            ins[n] = args[0].detach().float().cpu()
            outs[n] = out.detach().float().cpu()

        handles.append(mods[n].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


def check_layers(
    model: nn.Module,
    net: NcnnNet,
    layer_map: dict[str, str],
    out_scales: dict[str, float],
    samples: torch.Tensor,
    input_scales: dict[str, float],
) -> list[LayerCheck]:
    """Per-layer parity of the quantized layers (``torch name -> ncnn name``) on ``samples``.

    ``model`` is the QAT model in eval mode; ``out_scales`` the output scale of every layer
    written with requantize fusion; ``input_scales`` each layer's input scale (torch names).
    A sample is judged only where ncnn's input to the layer is finite and small enough for
    ncnn's float->int conversion (``|x * scale| < 2**30``): garbage from a wrong upstream layer
    overflows it (x86 gives INT_MIN, i.e. -127), which says nothing about this layer.
    """
    mods = dict(model.named_modules())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    names = list(layer_map)
    blobs_needed = []
    for t in names:
        lay = net.param.layer(layer_map[t])
        blobs_needed += [lay.bottoms[0], lay.tops[0]]
    per_layer: dict[str, dict[str, list[np.ndarray]]] = {
        t: {"iso_ref": [], "chain_ref": [], "got": [], "finite": []} for t in names
    }
    for x in samples:
        x1 = x.unsqueeze(0)
        ins, outs = _capture(model, names, x1.to(device))
        got = net.blobs(x.numpy(), list(dict.fromkeys(blobs_needed)))
        for t in names:
            lay = net.param.layer(layer_map[t])
            x_in = got[lay.bottoms[0]]
            s_in = blob_int8_scale(net.param, lay.bottoms[0], out_scales)
            if s_in is not None:  # int8 values written by a requantizing producer
                x_in = x_in / np.float32(s_in)
            x_in_t = torch.from_numpy(np.ascontiguousarray(x_in, dtype=np.float32)).reshape(ins[t].shape)
            with torch.no_grad():
                iso = mods[t](x_in_t.to(device)).float().cpu()
            iso = ncnn_activation(lay, iso)
            chain = ncnn_activation(lay, outs[t])
            y = got[lay.tops[0]]
            if lay.name in out_scales:
                s = out_scales[lay.name]
                y = y / np.float32(s)
                iso, chain = _fq(iso, s), _fq(chain, s)
            per_layer[t]["iso_ref"].append(iso.numpy().ravel())
            per_layer[t]["chain_ref"].append(chain.numpy().ravel())
            per_layer[t]["got"].append(np.asarray(y, dtype=np.float32).ravel())
            ok_in = bool(np.isfinite(x_in).all()) and float(np.abs(x_in).max(initial=0.0)) * input_scales[t] < 2.0**30
            per_layer[t]["finite"].append(ok_in)
    checks = []
    for t in names:
        d = per_layer[t]
        got = np.stack(d["got"])
        chain = agreement(np.stack(d["chain_ref"]), got)
        keep = np.array(d["finite"])
        if keep.any():
            # judged only on samples whose ncnn input is in conversion range (see the docstring)
            iso = agreement(np.stack(d["iso_ref"])[keep], got[keep])
            ok: bool | None = iso.cosine >= MIN_LAYER_COSINE and iso.max_rel_err <= MAX_LAYER_REL_ERR
            iso_cos, iso_rel = iso.cosine, iso.max_rel_err
        else:
            ok, iso_cos, iso_rel = None, float("nan"), float("nan")
        checks.append(
            LayerCheck(t, layer_map[t], iso_cos, iso_rel, chain.cosine, chain.max_rel_err, ok, None, int(keep.sum()))
        )
    return checks


def torch_outputs(model: nn.Module, xs: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """``model`` outputs for ``xs`` (eval mode, no grad), flattened per sample, on the CPU."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    outs = []
    with torch.no_grad():
        for i in range(0, len(xs), batch_size):
            y = model(xs[i : i + batch_size].to(device))
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"the model returned {type(y).__name__}; parity needs a single output tensor")
            outs.append(y.detach().float().cpu().reshape(len(y), -1))
    return torch.cat(outs).numpy()
