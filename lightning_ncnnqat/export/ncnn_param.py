"""Read and write ncnn ``.param`` text and walk the ``.bin`` weight layout.

The ``.param`` grammar (ncnn ``src/net.cpp`` / ``src/paramdict.cpp``)::

    7767517
    <layer_count> <blob_count>
    <Type> <name> <n_bottom> <n_top> <bottom...> <top...> <id>=<value> ...

A value is an int, a float (it contains ``.`` or ``e``), or an array written
``-<23300+id>=<len>,v0,v1,...``. We keep every ``id=value`` token verbatim so a layer we do
not touch is written back byte for byte; only the ids we change are replaced.

The ``.bin`` holds, for each layer in ``.param`` order, the data its ``load_model`` reads
(ncnn ``src/modelbin.cpp``): "tagged" arrays (a 4-byte tag, then float32 / float16 / int8
payload padded to 4 bytes) for convolution-like weights, and "raw" float32 arrays (no tag)
for biases, scales and the like. :func:`bin_layout` knows the layout of the layer types a
CNN converted by pnnx contains and refuses anything else by name, so the int8 writer never
guesses where a layer's bytes end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

MAGIC = 7767517
TAG_FP32 = 0x00000000
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_RAW_SCALED = 0x0002C056

#: Layer types whose load_model reads nothing from the .bin.
WEIGHTLESS_TYPES = frozenset(
    """
    AbsVal ArgMax BNLL BinaryOp Cast CELU Clip Concat CopyTo Crop CumulativeSum DeepCopy Diag Dropout
    ELU Einsum Eltwise Erf Exp ExpandDims Flatten Fold GELU GLU GridSample HardSigmoid HardSwish
    Input Interp Log LRN Mish MVN Noop Packing Permute PixelShuffle Pooling Pooling1D Pooling3D Power
    Reduction ReLU Reorg Reshape SELU Shrink ShuffleChannel Sigmoid Slice Softmax Softplus Split
    Squeeze Swish TanH Threshold Tile UnaryOp Unfold
    """.split()
)

#: Types ncnn2int8 quantizes (or rewrites) without any table row: out of scope here.
UNSUPPORTED_TYPES = frozenset(
    "Embed Gemm MultiHeadAttention RNN LSTM GRU DeformableConv2D Quantize Dequantize Requantize SDPA".split()
)

CONV_TYPES = ("Convolution", "ConvolutionDepthWise")
INT8_TYPES = ("Convolution", "ConvolutionDepthWise", "InnerProduct")


class NcnnFormatError(ValueError):
    """A .param/.bin that does not follow the ncnn format (message names the layer)."""


@dataclass
class NcnnLayer:
    """One line of a .param file."""

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: list[tuple[str, str]] = field(default_factory=list)  # (key token, value text), in file order

    def _find(self, pid: int) -> tuple[int, bool] | None:
        for i, (k, _) in enumerate(self.params):
            n = int(k)
            if n == pid:
                return i, False
            if n <= -23300 and -n - 23300 == pid:
                return i, True
        return None

    def get_int(self, pid: int, default: int) -> int:
        hit = self._find(pid)
        if hit is None:
            return default
        i, is_array = hit
        if is_array or "," in self.params[i][1]:
            raise NcnnFormatError(f"layer '{self.name}': param {pid} is an array, expected an int")
        text = self.params[i][1]
        if _is_float_text(text):
            raise NcnnFormatError(f"layer '{self.name}': param {pid} is {text!r}, expected an int")
        return int(text)

    def get_float(self, pid: int, default: float) -> float:
        hit = self._find(pid)
        return default if hit is None else float(self.params[hit[0]][1])

    def get_array(self, pid: int) -> list[float]:
        """Array param ``pid`` (old ``-233xx=len,...`` or new ``id=a,b`` style); [] if absent."""
        hit = self._find(pid)
        if hit is None:
            return []
        i, is_array = hit
        parts = self.params[i][1].split(",")
        if is_array:
            n = int(parts[0])
            vals = parts[1:]
            if len(vals) != n:
                raise NcnnFormatError(f"layer '{self.name}': array param {pid} declares {n} values, has {len(vals)}")
        else:
            vals = parts
        return [float(v) for v in vals]

    def set_int(self, pid: int, value: int) -> None:
        """Set (replace or append) scalar int param ``pid``."""
        hit = self._find(pid)
        tok = (str(pid), str(int(value)))
        if hit is None:
            self.params.append(tok)
        else:
            self.params[hit[0]] = tok

    def line(self) -> str:
        head = f"{self.type:<24} {self.name:<24} {len(self.bottoms)} {len(self.tops)}"
        blobs = " ".join(self.bottoms + self.tops)
        params = " ".join(f"{k}={v}" for k, v in self.params)
        return " ".join(s for s in (head, blobs, params) if s)


def _is_float_text(v: str) -> bool:
    return "." in v or "e" in v.lower()


@dataclass
class NcnnParam:
    """A parsed .param file."""

    layers: list[NcnnLayer]

    @classmethod
    def parse(cls, text: str) -> NcnnParam:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines or lines[0].strip() != str(MAGIC):
            raise NcnnFormatError(f"not an ncnn .param: first line must be {MAGIC}")
        try:
            layer_count, blob_count = (int(t) for t in lines[1].split())
        except (IndexError, ValueError) as e:
            raise NcnnFormatError("ncnn .param: second line must be '<layer_count> <blob_count>'") from e
        layers = []
        for ln in lines[2:]:
            tok = ln.split()
            if len(tok) < 4:
                raise NcnnFormatError(f"ncnn .param: malformed layer line {ln!r}")
            typ, name = tok[0], tok[1]
            nb, nt = int(tok[2]), int(tok[3])
            blobs = tok[4 : 4 + nb + nt]
            if len(blobs) != nb + nt:
                raise NcnnFormatError(f"layer '{name}': declares {nb} inputs and {nt} outputs, lists {len(blobs)}")
            params = []
            for p in tok[4 + nb + nt :]:
                k, sep, v = p.partition("=")
                if not sep or not k.lstrip("-").isdigit():
                    raise NcnnFormatError(f"layer '{name}': malformed param {p!r}")
                params.append((k, v))
            layers.append(NcnnLayer(typ, name, blobs[:nb], blobs[nb:], params))
        if len(layers) != layer_count:
            raise NcnnFormatError(f"ncnn .param declares {layer_count} layers, has {len(layers)}")
        param = cls(layers)
        if param.blob_count() != blob_count:
            raise NcnnFormatError(f"ncnn .param declares {blob_count} blobs, has {param.blob_count()}")
        names = [lay.name for lay in layers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise NcnnFormatError(f"ncnn .param has duplicate layer names: {dup}")
        return param

    def blob_count(self) -> int:
        names: set[str] = set()
        for lay in self.layers:
            names.update(lay.bottoms)
            names.update(lay.tops)
        return len(names)

    def to_text(self) -> str:
        out = [str(MAGIC), f"{len(self.layers)} {self.blob_count()}"]
        out += [lay.line() for lay in self.layers]
        return "\n".join(out) + "\n"

    def layer(self, name: str) -> NcnnLayer:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(f"no layer '{name}' in the ncnn .param")

    def producer(self, blob: str) -> NcnnLayer | None:
        for lay in self.layers:
            if blob in lay.tops:
                return lay
        return None

    def consumers(self, blob: str) -> list[NcnnLayer]:
        return [lay for lay in self.layers if blob in lay.bottoms]


# ---------------------------------------------------------------------------------------------
# .bin layout


@dataclass
class BinEntry:
    """One array a layer's load_model reads: tagged (weights) or raw float32."""

    role: str  # "weight", "bias", "weight_scales", "input_scale", "output_scale", "data", ...
    count: int  # number of elements
    tagged: bool
    offset: int = 0  # byte offset of the entry (of its tag when tagged)
    nbytes: int = 0  # bytes in the file, tag and padding included
    tag: int | None = None

    def values(self, data: bytes) -> np.ndarray:
        """The entry decoded to float32 (int8 payloads are returned as their integer values)."""
        start = self.offset + (4 if self.tagged else 0)
        if not self.tagged or self.tag == TAG_FP32:
            return np.frombuffer(data, "<f4", self.count, start).copy()
        if self.tag == TAG_FP16:
            return np.frombuffer(data, "<f2", self.count, start).astype(np.float32)
        if self.tag == TAG_INT8:
            return np.frombuffer(data, np.int8, self.count, start).astype(np.float32)
        raise NcnnFormatError(f"unsupported weight tag 0x{self.tag:08X}")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _entries(lay: NcnnLayer) -> list[BinEntry]:
    """What ``lay``'s load_model reads, in order (before offsets are known)."""
    t, g = lay.type, lay.get_int
    if t in WEIGHTLESS_TYPES:
        return []
    if t in UNSUPPORTED_TYPES:
        raise NcnnFormatError(
            f"layer '{lay.name}' is {t}: ncnn2int8 treats this type without a table row and this "
            "exporter does not handle it (CNN layers only)"
        )
    if t in ("Convolution", "ConvolutionDepthWise"):
        if g(19, 0):
            return []
        num_output = g(0, 0)
        out = [BinEntry("weight", g(6, 0), True)]
        if g(5, 0):
            out.append(BinEntry("bias", num_output, False))
        term = g(8, 0)
        if term:
            if t == "Convolution":
                n_scales = num_output
            else:
                n_scales = g(7, 1) if term in (1, 101) else 1
            out += [BinEntry("weight_scales", n_scales, False), BinEntry("input_scale", 1, False)]
            if term > 100:
                out.append(BinEntry("output_scale", 1, False))
        return out
    if t == "InnerProduct":
        num_output = g(0, 0)
        out = [BinEntry("weight", g(2, 0), True)]
        if g(1, 0):
            out.append(BinEntry("bias", num_output, False))
        if g(8, 0):
            out += [BinEntry("weight_scales", num_output, False), BinEntry("input_scale", 1, False)]
        return out
    if t in ("Convolution1D", "ConvolutionDepthWise1D", "Convolution3D", "ConvolutionDepthWise3D"):
        if g(19, 0):
            return []
        out = [BinEntry("weight", g(6, 0), True)]
        return out + ([BinEntry("bias", g(0, 0), False)] if g(5, 0) else [])
    if t.startswith("Deconvolution"):
        if g(28, 0):
            return []
        out = [BinEntry("weight", g(6, 0), True)]
        return out + ([BinEntry("bias", g(0, 0), False)] if g(5, 0) else [])
    if t == "BatchNorm":
        c = g(0, 0)
        return [BinEntry(r, c, False) for r in ("slope", "mean", "var", "bias")]
    if t == "Bias":
        return [BinEntry("bias", g(0, 0), False)]
    if t == "Scale":
        n = g(0, 0)
        if n == -233:
            return []
        return [BinEntry("scale", n, False)] + ([BinEntry("bias", n, False)] if g(1, 0) else [])
    if t == "PReLU":
        return [BinEntry("slope", g(0, 0), False)]
    if t == "Normalize":
        return [BinEntry("scale", g(3, 0), False)]
    if t == "Padding":
        n = g(6, 0)
        return [BinEntry("per_channel_pad", n, False)] if n else []
    if t in ("LayerNorm", "RMSNorm"):
        if not g(2, 1):
            return []
        n = g(0, 0)
        return [BinEntry("gamma", n, False)] + ([BinEntry("beta", n, False)] if t == "LayerNorm" else [])
    if t in ("GroupNorm", "InstanceNorm"):
        if not g(3 if t == "GroupNorm" else 2, 1):
            return []
        c = g(1 if t == "GroupNorm" else 0, 0)
        return [BinEntry("gamma", c, False), BinEntry("beta", c, False)]
    if t == "MemoryData":
        if g(21, 1) != 1:
            raise NcnnFormatError(f"layer '{lay.name}': MemoryData with tagged data (21={g(21, 1)}) is not handled")
        dims = [v for v in (g(0, 0), g(1, 0), g(11, 0), g(2, 0)) if v]
        return [BinEntry("data", int(np.prod(dims)) if dims else 0, False)] if dims else []
    raise NcnnFormatError(
        f"layer '{lay.name}' has type {t}, whose .bin layout this exporter does not know; "
        "it cannot rewrite this model"
    )


def bin_layout(param: NcnnParam, data: bytes) -> dict[str, list[BinEntry]]:
    """Locate every layer's arrays in ``data``; the walk must consume the file exactly."""
    pos = 0
    out: dict[str, list[BinEntry]] = {}
    for lay in param.layers:
        entries = _entries(lay)
        for e in entries:
            e.offset = pos
            if e.tagged:
                if pos + 4 > len(data):
                    raise NcnnFormatError(f"layer '{lay.name}': .bin ends inside its {e.role}")
                (e.tag,) = struct.unpack_from("<I", data, pos)
                if e.tag == TAG_FP32:
                    e.nbytes = 4 + 4 * e.count
                elif e.tag == TAG_FP16:
                    e.nbytes = 4 + _align4(2 * e.count)
                elif e.tag == TAG_INT8:
                    e.nbytes = 4 + _align4(e.count)
                else:
                    raise NcnnFormatError(
                        f"layer '{lay.name}': {e.role} has tag 0x{e.tag:08X} (only float32, float16 and int8 are handled)"
                    )
            else:
                e.nbytes = 4 * e.count
            pos += e.nbytes
            if pos > len(data):
                raise NcnnFormatError(f"layer '{lay.name}': .bin ends inside its {e.role} ({pos} > {len(data)} bytes)")
        out[lay.name] = entries
    if pos != len(data):
        raise NcnnFormatError(f".bin has {len(data) - pos} bytes after the last layer's data: layout mismatch")
    return out


def tagged(tag: int, payload: bytes) -> bytes:
    """A tagged array: tag, payload, zero padding to 4 bytes."""
    pad = _align4(len(payload)) - len(payload)
    return struct.pack("<I", tag) + payload + b"\0" * pad


def raw_f32(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<f4").tobytes()
