"""Read and write ncnn ``.param`` text and walk the ``.bin`` weight layout.

The ``.param`` grammar (ncnn ``src/net.cpp`` / ``src/paramdict.cpp``)::

    7767517
    <layer_count> <blob_count>
    <Type> <name> <n_bottom> <n_top> <bottom...> <top...> <id>=<value> ...

A value is an int, a float (it contains ``.`` or ``e``), a string (``6="0w,-1"``), or an array
written ``-<23300+id>=<len>,v0,v1,...`` or ``id=v0,v1``. Every ``id=value`` token is kept
verbatim (:meth:`NcnnParam.to_text` writes the file back byte for byte);
:mod:`lightning_ncnnqat.ncnn.model_writer` writes the canonical form ncnn's own tools write.

The ``.bin`` holds, for each layer in ``.param`` order, the data its ``load_model`` reads
(ncnn ``src/modelbin.cpp``): "tagged" arrays (a 4-byte tag, then float32 / float16 / int8
payload padded to 4 bytes) for convolution-like weights, and "raw" float32 arrays (no tag)
for biases, scales and the like: see :mod:`lightning_ncnnqat.ncnn.bin_layout`.

Layer names need not be unique: pnnx names the Split after a shared MemoryData constant from a
second counter, so two layers can be called ``splitncnn_0``, and ncnn loads such files (it finds
blobs by name, layers by index). Everything here works by layer index; a lookup by a name that
several layers carry raises instead of picking one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lightning_ncnnqat.ncnn.bin_layout import (  # noqa: F401  (re-exported: this module's earlier API)
    DATA_TYPES,
    TAG_FP16,
    TAG_FP32,
    TAG_INT8,
    WEIGHTLESS_TYPES,
    BinEntry,
    NcnnFormatError,
    locate,
    raw_f32,
    tagged,
)

MAGIC = 7767517

CONV_TYPES = ("Convolution", "ConvolutionDepthWise")
INT8_TYPES = ("Convolution", "ConvolutionDepthWise", "InnerProduct")


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
            raise NcnnFormatError(f"layer '{self.name}': param {pid} is an array, expected an int", layer=self.name)
        text = self.params[i][1]
        if _is_float_text(text):
            raise NcnnFormatError(f"layer '{self.name}': param {pid} is {text!r}, expected an int", layer=self.name)
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
                raise NcnnFormatError(f"layer '{self.name}': array param {pid} declares {n} values, has {len(vals)}", layer=self.name)
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


_TOKENS = re.compile(r'(?:[^\s"]+|"[^"]*")+')


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
            tok = _TOKENS.findall(ln)  # a quoted string value may hold spaces
            if len(tok) < 4:
                raise NcnnFormatError(f"ncnn .param: malformed layer line {ln!r}")
            typ, name = tok[0], tok[1]
            nb, nt = int(tok[2]), int(tok[3])
            blobs = tok[4 : 4 + nb + nt]
            if len(blobs) != nb + nt:
                raise NcnnFormatError(f"layer '{name}': declares {nb} inputs and {nt} outputs, lists {len(blobs)}", layer=name)
            params = []
            for p in tok[4 + nb + nt :]:
                k, sep, v = p.partition("=")
                if not sep or not k.lstrip("-").isdigit():
                    raise NcnnFormatError(f"layer '{name}': malformed param {p!r}", layer=name)
                params.append((k, v))
            layers.append(NcnnLayer(typ, name, blobs[:nb], blobs[nb:], params))
        if len(layers) != layer_count:
            raise NcnnFormatError(f"ncnn .param declares {layer_count} layers, has {len(layers)}")
        param = cls(layers)
        if param.blob_count() != blob_count:
            raise NcnnFormatError(f"ncnn .param declares {blob_count} blobs, has {param.blob_count()}")
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

    def indices(self, name: str) -> list[int]:
        """Indices of the layers called ``name`` (several when the converter repeated a name)."""
        return [i for i, lay in enumerate(self.layers) if lay.name == name]

    def index(self, name: str) -> int:
        """Index of the one layer called ``name``; KeyError if none or several carry it."""
        hits = self.indices(name)
        if len(hits) != 1:
            what = "no layer" if not hits else f"{len(hits)} layers (indices {hits})"
            raise KeyError(f"{what} called '{name}' in the ncnn .param")
        return hits[0]

    def layer(self, name: str) -> NcnnLayer:
        """The one layer called ``name``; KeyError if none or several carry it (never a guess)."""
        return self.layers[self.index(name)]

    def duplicate_names(self) -> list[str]:
        """Layer names carried by more than one layer (sorted)."""
        seen: dict[str, int] = {}
        for lay in self.layers:
            seen[lay.name] = seen.get(lay.name, 0) + 1
        return sorted(n for n, k in seen.items() if k > 1)

    def producer(self, blob: str) -> NcnnLayer | None:
        for lay in self.layers:
            if blob in lay.tops:
                return lay
        return None

    def id_inputs(self) -> set[str]:
        """Input blobs read (through Split copies) only by ``Embed`` layers. Embed reads its input
        Mat's memory as int32 token ids (ncnn ``src/layer/embed.cpp``): such an input takes int32
        values, and floats holding the ids read wrong rows with no error."""

        def kinds(blob: str) -> set[str]:
            out: set[str] = set()
            for lay in self.consumers(blob):
                out |= set().union(*(kinds(t) for t in lay.tops)) if lay.type == "Split" else {lay.type}
            return out

        inputs = [t for lay in self.layers if lay.type == "Input" for t in lay.tops]
        return {b for b in inputs if kinds(b) == {"Embed"}}

    def consumers(self, blob: str) -> list[NcnnLayer]:
        return [lay for lay in self.layers if blob in lay.bottoms]




class BinLayout(dict):
    """``bin_layout``'s result: layer name -> its entries, plus ``by_index`` (one list per layer).

    A name several layers carry maps to ``[]`` when none of them has data (pnnx's repeated
    ``splitncnn_N``); looking up a repeated name of a layer with data raises KeyError: use
    ``by_index``.
    """

    def __init__(self, by_index: list[list[BinEntry]], layers: list[NcnnLayer]) -> None:
        super().__init__()
        self.by_index = by_index
        self._ambiguous: set[str] = set()
        count: dict[str, int] = {}
        for lay in layers:
            count[lay.name] = count.get(lay.name, 0) + 1
        for lay, entries in zip(layers, by_index):
            if count[lay.name] == 1:
                self[lay.name] = entries
            elif any(by_index[i] for i, m in enumerate(layers) if m.name == lay.name):
                self._ambiguous.add(lay.name)
            else:
                self[lay.name] = []

    def __missing__(self, name: str) -> list[BinEntry]:
        if name in self._ambiguous:
            raise KeyError(f"several layers with data are called '{name}': look them up by index (by_index)")
        raise KeyError(name)


def bin_layout(param: NcnnParam, data: bytes) -> BinLayout:
    """Locate every layer's arrays in ``data`` (see :class:`BinLayout`); the walk must consume
    the file exactly, else NcnnFormatError naming the layer."""
    return BinLayout(locate(param.layers, data), param.layers)
