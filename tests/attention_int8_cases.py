"""Tiny MultiHeadAttention / SDPA ncnn models written by hand, in float and in int8, and the
agreement measure of tests/test_attention_int8*.py (helpers, no tests here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lightning_ncnnqat.ncnn.bin_layout import TAG_FP32, raw_f32, tagged
from lightning_ncnnqat.ncnn.int8_attention import write_mha_int8, write_sdpa_int8
from lightning_ncnnqat.ncnn.param import NcnnParam, bin_layout
from lightning_ncnnqat.ops.attention_reference import mha_int8, sdpa_int8

#: options that make the emulated ARM runs float32 outside the int8 products (NCNN_INT8.md).
FP32_OPTIONS = {"use_fp16_storage": False, "use_fp16_arithmetic": False, "use_fp16_packed": False}


@dataclass
class MhaCase:
    """One MultiHeadAttention: embed_dim, heads, query/key lengths, kdim/vdim, mask rank (0 none)."""

    embed: int
    heads: int
    seq_q: int
    seq_k: int
    kdim: int | None = None
    vdim: int | None = None
    mask: int = 0
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def cross(self) -> bool:
        return self.kdim is not None or self.seq_k != self.seq_q


@dataclass
class SdpaCase:
    """One SDPA: query heads, key/value heads (groups), lengths, head dims, mask rank, scale."""

    heads: int
    groups: int
    seq_q: int
    seq_k: int
    dim: int
    dim_v: int
    mask: int = 0
    scale: float = 0.0


def _mask(rng: np.random.Generator, rank: int, heads: int, lq: int, lk: int) -> np.ndarray:
    """Additive float mask: random values in [-2, 0] plus -1e4 above the diagonal (causal)."""
    m = rng.uniform(-2, 0, (lq, lk)).astype(np.float32) + np.triu(np.full((lq, lk), -1e4, np.float32), 1)
    return m if rank == 2 else np.stack([np.roll(m, h, axis=1) for h in range(heads)])


def mha_layer(c: MhaCase, rng: np.random.Generator, blobs: list[str], out: str) -> tuple[str, bytes]:
    """The .param line and float32 .bin bytes of ``c`` with random weights (kept in ``c.weights``)."""
    e, kd, vd = c.embed, c.kdim or c.embed, c.vdim or c.embed
    shapes = {"q": (e, e), "k": (e, kd), "v": (e, vd), "out": (e, e)}
    data = b""
    for p, s in shapes.items():
        w = (rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32)
        w[0] *= 3.0  # one row with a wider range: per-row scales matter
        b = (0.1 * rng.standard_normal(s[0])).astype(np.float32)
        c.weights[p + "_weight"], c.weights[p + "_bias"] = w, b
        data += tagged(TAG_FP32, w.tobytes()) + raw_f32(b)
    line = (f"MultiHeadAttention mha {len(blobs)} 1 {' '.join(blobs)} {out} "
            f"0={e} 1={c.heads} 2={e * e} 3={kd} 4={vd} 5={int(bool(c.mask))}")
    return line, data


def mha_inputs(c: MhaCase, rng: np.random.Generator, n: int, prefix: str) -> dict[str, np.ndarray]:
    """``n`` samples of the inputs of ``c`` as ncnn blobs (no batch dim per sample)."""
    out = {f"{prefix}q": rng.standard_normal((n, c.seq_q, c.embed)).astype(np.float32)}
    if c.cross:
        out[f"{prefix}k"] = rng.standard_normal((n, c.seq_k, c.kdim or c.embed)).astype(np.float32)
        out[f"{prefix}v"] = rng.standard_normal((n, c.seq_k, c.vdim or c.embed)).astype(np.float32)
    if c.mask:
        out[f"{prefix}m"] = np.stack([_mask(rng, c.mask, c.heads, c.seq_q, c.seq_k) for _ in range(n)])
    return out


def mha_reference(c: MhaCase, x: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    q = t[f"{prefix}q"]
    k, v = (t[f"{prefix}k"], t[f"{prefix}v"]) if c.cross else (q, q)
    w = {k2: torch.from_numpy(v2) for k2, v2 in c.weights.items()}
    m = t.get(f"{prefix}m")
    outs = [
        mha_int8(q[i : i + 1], k[i : i + 1], v[i : i + 1], w, c.heads, attn_mask=None if m is None else m[i])
        for i in range(len(q))
    ]
    return torch.cat(outs).numpy()


def sdpa_layer(c: SdpaCase, blobs: list[str], out: str) -> str:
    return f"SDPA sdpa {len(blobs)} 1 {' '.join(blobs)} {out} 5={int(bool(c.mask))} 6={c.scale:e}"


def sdpa_inputs(c: SdpaCase, rng: np.random.Generator, n: int, prefix: str) -> dict[str, np.ndarray]:
    out = {
        f"{prefix}q": rng.standard_normal((n, c.heads, c.seq_q, c.dim)).astype(np.float32),
        f"{prefix}k": rng.standard_normal((n, c.groups, c.seq_k, c.dim)).astype(np.float32),
        f"{prefix}v": rng.standard_normal((n, c.groups, c.seq_k, c.dim_v)).astype(np.float32),
    }
    if c.mask:
        out[f"{prefix}m"] = np.stack([_mask(rng, c.mask, c.heads, c.seq_q, c.seq_k) for _ in range(n)])
    return out


def sdpa_reference(c: SdpaCase, x: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    m = t.get(f"{prefix}m")
    outs = [
        sdpa_int8(t[f"{prefix}q"][i : i + 1], t[f"{prefix}k"][i : i + 1], t[f"{prefix}v"][i : i + 1],
                  None if m is None else m[i], c.scale)
        for i in range(len(t[f"{prefix}q"]))
    ]
    return torch.cat(outs).numpy()


def write_model(
    tmp: Path, mha: MhaCase | None, sdpa: SdpaCase | None, rng: np.random.Generator
) -> tuple[Path, Path, Path, Path]:
    """Float and int8 ``.param``/``.bin`` of one net holding ``mha`` (inputs ``aq``, ``ak``, ``av``,
    ``am``; output ``a``) and/or ``sdpa`` (``sq``.. ``sm``; output ``s``)."""
    inputs: list[str] = []
    layers: list[str] = []
    data = b""
    if mha is not None:
        blobs = ["aq"] + (["ak", "av"] if mha.cross else []) + (["am"] if mha.mask else [])
        line, data = mha_layer(mha, rng, blobs, "a")
        inputs += blobs
        layers.append(line)
    if sdpa is not None:
        blobs = ["sq", "sk", "sv"] + (["sm"] if sdpa.mask else [])
        inputs += blobs
        layers.append(sdpa_layer(sdpa, blobs, "s"))
    lines = [f"Input {b} 0 1 {b}" for b in inputs] + layers
    text = f"7767517\n{len(lines)} {len(inputs) + len(layers)}\n" + "\n".join(lines) + "\n"
    fp, fb, ip, ib = tmp / "f.param", tmp / "f.bin", tmp / "i8.param", tmp / "i8.bin"
    fp.write_text(text)
    fb.write_bytes(data)
    param = NcnnParam.parse(text)
    entries = bin_layout(param, data).by_index
    chunks: list[bytes] = []
    for lay, ents in zip(param.layers, entries):
        if lay.type == "MultiHeadAttention":
            chunks += write_mha_int8(lay, ents, data)[0]
        elif lay.type == "SDPA":
            write_sdpa_int8(lay)
    ip.write_text(param.to_text())
    ib.write_bytes(b"".join(chunks))
    return fp, fb, ip, ib


def float_reference(mha: MhaCase, sdpa: SdpaCase, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float32 outputs (blobs ``a``, ``s``) of ``mha`` and ``sdpa``: what an int8 run must differ from."""
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    w = {k: torch.from_numpy(v) for k, v in mha.weights.items()}
    q = t["aq"]
    k, v = (t["ak"], t["av"]) if mha.cross else (q, q)
    d = mha.embed // mha.heads

    def heads(y: torch.Tensor) -> torch.Tensor:
        return y.reshape(*y.shape[:-1], mha.heads, d).transpose(1, 2)

    qh, kh, vh = (heads(y @ w[p + "_weight"].T + w[p + "_bias"]) for y, p in ((q, "q"), (k, "k"), (v, "v")))
    m = t.get("am")
    m = m.unsqueeze(1) if m is not None and mha.mask == 2 else m  # [n, L, S] -> [n, 1, L, S]
    sm = t.get("sm")
    sm = sm.unsqueeze(1) if sm is not None and sdpa.mask == 2 else sm
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=m)
    a = o.transpose(1, 2).reshape(*q.shape[:-1], mha.embed) @ w["out_weight"].T + w["out_bias"]
    g = sdpa.heads // sdpa.groups
    s = torch.nn.functional.scaled_dot_product_attention(
        t["sq"], t["sk"].repeat_interleave(g, 1), t["sv"].repeat_interleave(g, 1), attn_mask=sm, scale=sdpa.scale or None
    )
    return {"a": a.numpy(), "s": s.numpy()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def agreement(ncnn_out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """cosine, the share of values equal to float32 rounding (relative 1e-5 of the tensor's
    absmax) and the largest difference in steps of 1/127 of the tensor's absmax."""
    scale = float(np.abs(ref).max())
    diff = np.abs(ncnn_out.astype(np.float64) - ref)
    return {
        "cosine": cosine(ncnn_out, ref),
        "close": float(np.mean(diff <= 1e-5 * scale)),
        "max_steps": float(diff.max() / (scale / 127.0)),
    }


def assert_matches(ncnn_out: np.ndarray, ref: np.ndarray, float_out: np.ndarray, what: str) -> dict[str, float]:
    """ncnn's int8 output equals the reference to float32 rounding except where one int8 level
    moved (the stated tolerance: < 1 step of the output's absmax / 127, in < 5% of values),
    and the int8 path really ran (it is farther from ncnn's float output than from the reference)."""
    assert ncnn_out.shape == ref.shape, (what, ncnn_out.shape, ref.shape)
    a = agreement(ncnn_out, ref)
    assert a["cosine"] >= 1 - 1e-8 and a["close"] >= 0.95 and a["max_steps"] < 1.0, (what, a)
    f = agreement(float_out, ref)
    assert f["close"] < a["close"] and f["cosine"] < a["cosine"], (what, "int8 run looks float", a, f)
    return a
