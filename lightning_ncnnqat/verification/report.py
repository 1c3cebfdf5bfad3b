"""What an export wrote and measured: :class:`ExportReport` (``report.json``) and its summary."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lightning_ncnnqat.policy import Finding, output_failing
from lightning_ncnnqat.verification.layer_checks import LayerCheck
from lightning_ncnnqat.verification.parity import Agreement

#: ncnn layer types whose int8 input is quantized per row at run time (no table scale)
DYNAMIC_INPUT_TYPES = frozenset({"Gemm", "MultiHeadAttention", "SDPA"})


@dataclass
class LayerReport:
    """One quantized layer, under each of its names."""

    torch_name: str
    onnx_name: str | None
    ncnn_name: str | None
    kind: str  # the ncnn layer type it runs as (the converter's, e.g. InnerProduct for a 1x1 conv on a 1x1 map)
    weight_bits: int
    input_scale: float
    num_weight_scales: int
    input_owner: str
    int8_scale_term: int | None = None  # param 8 in model.int8.param
    requantize_to: str | None = None  # first consumer whose input scale the output is requantized with
    output_scale: float | None = None


@dataclass
class OutputParity:
    """Parity of one output blob."""

    blob: str
    torch: str  # pytree path of the output in the PyTorch model's return value
    int8_vs_qat: Agreement | None = None
    float_vs_torch: Agreement | None = None
    float_vs_torch_fp32_storage: Agreement | None = None
    # cosine of the QAT model in float32 vs float64 (quantization unchanged): what int8 can reach at
    # best; measured only when the int8 cosine misses the absolute bar (see export.output_floor)
    float32_floor: float | None = None


@dataclass
class ExportReport:
    """What was written and how closely it matches the PyTorch models (also ``report.json``).

    ``int8_vs_qat`` / ``float_vs_torch`` are those of the output blob with the lowest int8
    cosine (the only one for single-output models); ``outputs`` has every output blob.
    """

    export_dir: str
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes, as on disk
    io: dict[str, Any] = field(default_factory=dict)  # input/output blobs and their PyTorch places
    layers: list[LayerReport] = field(default_factory=list)
    float_layers: list[dict[str, str]] = field(default_factory=list)
    held_batch: dict[str, Any] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)
    outputs: list[OutputParity] = field(default_factory=list)
    int8_vs_qat: Agreement | None = None  # ncnn int8 vs PyTorch QAT model (eval)
    float_vs_torch: Agreement | None = None  # ncnn float32 vs folded float model (default options)
    float_vs_torch_fp32_storage: Agreement | None = None  # same with use_fp16_storage=False
    float32_floor: float | None = None  # worst output's QAT float32-vs-float64 cosine, where measured
    # the float conversion judged on its own (export.conversion): "faithful" (None: not judged),
    # per-output cosines and floors, and "first_departure" (where the float ncnn model departs)
    conversion: dict[str, Any] = field(default_factory=dict)
    layer_checks: list[LayerCheck] = field(default_factory=list)
    # per target ("x86" = this machine, "arm64-a53"/"arm64-a76" emulated): ncnn version, CPU
    # features, the options it ran with, int8_vs_qat (worst output), and on ARM per-output
    # agreements, layer_checks and flagged_layers (or "error")
    runtime: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    board_profiles: list[dict[str, Any]] = field(default_factory=list)  # ExportConfig.board_profile's figures
    sizes: dict[str, Any] = field(default_factory=dict)
    float_weights: str | None = None  # float layers' weights in model.int8.bin: "fp32" or "fp16" (ncnn2int8's)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts that explain a figure, not problems
    failures: list[dict[str, str | None]] = field(default_factory=list)
    # the structured form of notes and warnings that policy's rules returned (verdicts.render files
    # both); not in report.json, whose notes and warnings carry the messages
    findings: list[Finding] = field(default_factory=list, repr=False)

    @property
    def flagged_layers(self) -> list[str]:
        """Torch names of quantized layers the int8 runtime computes wrongly (default options), on
        this machine or on any emulated target."""
        out = [c.torch_name for c in self.layer_checks if c.ok is False]
        for entry in self.runtime.values():
            out += [n for n in entry.get("flagged_layers", []) if n not in out]
        return out

    @property
    def conversion_departs(self) -> bool:
        """Whether the float ncnn model was measured to depart from the PyTorch model."""
        return self.conversion.get("faithful") is False

    @property
    def ok(self) -> bool:
        return not self.failures and not self.flagged_layers and not self.conversion_departs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["findings"]
        d["ok"] = self.ok
        d["flagged_layers"] = self.flagged_layers
        return jsonable(d)

    def summary(self) -> str:
        """A short human-readable summary: the layer table, the figures per output and target,
        sizes and timing, then every note and warning as rendered (``verdicts.render``)."""
        out = [f"ncnn export -> {self.export_dir}"]
        out += self._layer_lines()
        hb = self.held_batch
        if hb:
            out.append(f"  held batch: {hb.get('n')} samples ({hb.get('source')})")
        out += self._output_lines()
        out += self._target_lines()
        if self.sizes.get("ratio"):
            out.append(
                f"  .bin size: fp32 {self.sizes['float32_bin']} B, int8 {self.sizes['int8_bin']} B "
                f"({self.sizes['ratio']:.2f}x smaller)"
                + (f"; float layers' weights in {self.float_weights}" if self.float_weights else "")
            )
        if self.timing:
            t = self.timing
            out.append(
                f"  ncnn time/image ({t['threads']} threads): fp32 {t['float32_ms']:.3f} ms, "
                f"int8 {t['int8_ms']:.3f} ms (speed-up {t['speedup']:.2f}x)"
            )
        out += [f"  note: {msg}" for msg in self.notes]
        out += [f"  WARNING: {msg}" for msg in self.warnings]
        for f in self.failures:
            where = f" layer '{f['layer']}'" if f.get("layer") else ""
            out.append(f"  FAILED step '{f['step']}'{where}: {f['message']}")
        out.extend(self._next_steps())
        return "\n".join(out)

    def _layer_lines(self) -> list[str]:
        """The table of quantized layers with this machine's per-layer check, and the float ones."""
        out = []
        if self.layers:
            w = max(len(r.torch_name) for r in self.layers)
            wn = max(len(r.ncnn_name or "-") for r in self.layers)
            out.append(f"  {'layer':<{w}}  {'ncnn':<{wn}}  {'type':<20} bits  input scale   scales  int8 check")
            checks = {c.torch_name: c for c in self.layer_checks}
            for r in self.layers:
                c = checks.get(r.torch_name)
                if c is None:
                    verdict = "-"
                elif c.ok is None:
                    verdict = "not judged (its ncnn input is garbage from upstream)"
                else:
                    verdict = f"ok (cos {c.isolated_cosine:.5f})" if c.ok else f"WRONG (cos {c.isolated_cosine:.3f})"
                # Gemm / MultiHeadAttention / SDPA quantize their inputs per row at run time:
                # no fixed input scale exists (report.json holds 0 for them)
                scale = "dynamic" if r.input_scale == 0 and r.kind in DYNAMIC_INPUT_TYPES else f"{r.input_scale:.6g}"
                out.append(
                    f"  {r.torch_name:<{w}}  {r.ncnn_name or '-':<{wn}}  {r.kind:<20} {r.weight_bits:>4}  "
                    f"{scale:<12} {r.num_weight_scales:>6}  {verdict}"
                )
        out += [f"  float: {f['name']}: {f['reason']}" for f in self.float_layers]
        return out

    def _output_lines(self) -> list[str]:
        """This machine's figures per output (int8 vs QAT, float vs PyTorch) and the conversion."""
        out = []
        for o in self.outputs:
            name = f" {o.blob} ({o.torch})" if len(self.outputs) > 1 else ""
            if o.int8_vs_qat:
                a = o.int8_vs_qat
                top1 = "n/a" if a.top1_agreement is None else f"{100 * a.top1_agreement:.2f}%"
                if a.near_tie_flips and not output_failing(a.cosine, o.float32_floor):
                    top1 += f" ({a.near_tie_flips} near-tie flip(s) within the int8 noise)"
                # the floor is measured, and shown, only where this machine's figure was judged against it
                floor = "" if o.float32_floor is None else f" (float32 floor {o.float32_floor:.6f})"
                out.append(
                    f"  ncnn int8 vs PyTorch QAT{name}: top-1 {top1}, cosine {a.cosine:.6f}{floor}, "
                    f"max abs err {a.max_abs_err:.3g}, max rel err {a.max_rel_err:.3g}"
                )
            if o.float_vs_torch:
                a = o.float_vs_torch
                line = f"  ncnn fp32 vs PyTorch float{name}: cosine {a.cosine:.6f}, max abs err {a.max_abs_err:.3g}"
                if o.float_vs_torch_fp32_storage:
                    line += f" ({o.float_vs_torch_fp32_storage.max_abs_err:.3g} with use_fp16_storage=False)"
                out.append(line)
        if self.conversion_departs:
            d = self.conversion.get("first_departure") or {}
            at = f": first {d['where']} layer '{d['torch_layer']}' (ncnn '{d['ncnn_layer']}')" if d.get("torch_layer") else ""
            out.append(f"  conversion: the float ncnn model DEPARTS from PyTorch{at}")
        return out

    def _target_lines(self) -> list[str]:
        """One line per emulated target: its worst output, strict figure, floor, flagged layers."""
        out = []
        for target, e in self.runtime.items():
            a = e.get("int8_vs_qat")
            if target == "x86" or not e.get("emulated"):
                continue
            if a is None:
                out.append(f"  {target} ({e.get('profile')}): not checked ({e.get('error', 'no result')})")
                continue
            top1 = "n/a" if a.get("top1_agreement") is None else f"{100 * a['top1_agreement']:.2f}%"
            bad = e.get("flagged_layers") or []
            # the strict figure where it is higher, and this target's own floor (measured only where
            # one of its figures was judged against it)
            extra = []
            s = (e.get("int8_vs_qat_strict") or {}).get("cosine")
            if s is not None and f"{s:.6f}" != f"{a['cosine']:.6f}" and s > a["cosine"]:
                extra.append(f"{s:.6f} with fp16 and packing off")
            if e.get("float32_floor") is not None:
                extra.append(f"float32 floor {e['float32_floor']:.6f}")
            figures = f" ({'; '.join(extra)})" if extra else ""
            out.append(
                f"  ncnn int8 vs PyTorch QAT on {target} ({e.get('profile')}, emulated): top-1 {top1}, cosine "
                f"{a['cosine']:.6f}{figures}; layers flagged: {', '.join(bad) if bad else 'none'}"
            )
        return out

    def _next_steps(self) -> list[str]:
        """What to do with the files on disk: the deployment note, the runnable snippet, the report."""
        d = self.export_dir
        steps = []
        if "DEPLOY.md" in self.files:
            steps.append(f"  next: read {d}/DEPLOY.md (blob names, mean_vals/norm_vals, ncnn options per target)")
        if "run_int8.py" in self.files:
            steps.append(f"        run `python {d}/run_int8.py [input.npy]` (pip install ncnn numpy) on the device")
        if "report.json" in self.files:
            steps.append(f"        every figure above, and per-layer scales and checks: {d}/report.json")
        return steps


def jsonable(v: Any) -> Any:
    """``v`` with numpy scalars as Python numbers and non-finite floats as strings."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else str(f)
    if isinstance(v, np.integer):
        return int(v)
    return v
