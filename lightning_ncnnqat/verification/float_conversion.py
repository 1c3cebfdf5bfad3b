"""Is the float ncnn model the PyTorch model? The conversion judged on its own, apart from int8.

A converter can change a model's meaning without failing: pnnx turns a circularly padded conv
into a zero-padded one (pytorch#86690, ncnn#4849), and the int8 model then follows the wrong float
model exactly (its per-layer checks pass). So the float32 ncnn model (fp32 storage, the runtime's
approximations off) is compared with the folded float PyTorch model per output, and judged with the
int8 rule (``output_failing``): below ``MIN_OUTPUT_COSINE`` and not at
the float model's own float32 floor (float32 vs float64 of the same folded model) is a departure.

A departure is then located: every matched weighted layer (torch name -> ncnn layer, in the ncnn
graph's order) has its input and output blob compared with the folded model's values at that
module (captured with hooks), under the same rule. The first point that departs says where the
meaning changed: IN a layer (its input agrees, its output not: the converter changed what the layer
computes, e.g. its padding), BEFORE it (its input departs: a weightless op between it and the
matched layers above, named on both sides), or AFTER the last matched layers (an output departs
while every layer agrees).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_ncnnqat.conversion.graph_match import Wiring
from lightning_ncnnqat.ncnn.isolated import NcnnRuntimeError, run_ncnn
from lightning_ncnnqat.verification.layer_checks import ncnn_activation
from lightning_ncnnqat.conversion.model_io import ModelIO, torch_outputs
from lightning_ncnnqat.ncnn.param import NcnnParam
from lightning_ncnnqat.policy import MIN_OUTPUT_COSINE, at_floor, conversion_departure, conversion_departs, output_failing
from lightning_ncnnqat.verification.output_floor import Float32Floor
from lightning_ncnnqat.verification.parity import agreement, cosine

#: The float ncnn run the conversion is judged on: one thread, fp32 storage, no Winograd, unpacked
#: (the runtime's own approximations off; runtime_checks.STRICT_OPTIONS is this dict, for int8 too).
FLOAT_OPTIONS = {
    "num_threads": 1,
    "use_winograd_convolution": False,
    "use_packing_layout": False,
    "use_fp16_storage": False,
    "use_fp16_packed": False,
    "use_fp16_arithmetic": False,
    "use_bf16_storage": False,
}
#: Samples the departure is located on.
LOCATE_SAMPLES = 4


def float64_copy(folded: nn.Module) -> nn.Module:
    """A float64 copy of the folded float model (for its float32 floor)."""
    return copy.deepcopy(folded).double().eval()


def _floors(folded: nn.Module, io: ModelIO, held: Sequence[torch.Tensor], ref: list[np.ndarray]) -> list[float] | None:
    """Per output, cosine(folded float32, folded float64): the float model's float32 floor."""
    try:
        got = torch_outputs(float64_copy(folded), io, [t.double() if t.is_floating_point() else t for t in held])
        return [cosine(r, g) for r, g in zip(ref, got)]
    except Exception:  # noqa: BLE001 - the user's model run in float64 may raise anything; it then keeps the absolute bar
        return None


def _capture(model: nn.Module, names: Sequence[str], io: ModelIO, xs: Sequence[torch.Tensor]) -> dict[str, tuple]:
    """(input, output) of each named module on ``xs``, stacked over samples, float64 numpy."""
    mods = dict(model.named_modules())
    got: dict[str, list] = {n: [] for n in names}
    handles = []
    for n in names:
        def hook(m, args, out, n=n):  # noqa: ANN001
            got[n].append((args[0].detach().double().cpu().numpy(), out.detach().double().cpu().numpy()))

        handles.append(mods[n].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for s in range(len(xs[0])):
                a, k = io.call([t[s : s + 1] for t in xs])
                model(*a, **k)
    finally:
        for h in handles:
            h.remove()
    return {n: (np.concatenate([i for i, _ in v]), np.concatenate([o for _, o in v])) for n, v in got.items() if v}


def _judge(ref: np.ndarray, got: np.ndarray, ref64: np.ndarray | None) -> tuple[float | None, bool]:
    """(cosine, departs) of ncnn's ``got`` vs PyTorch's ``ref``; None when the sizes differ."""
    ref = ref.reshape(len(ref), -1)
    if got.size != ref.size:
        return None, False
    c = agreement(ref, got.reshape(ref.shape), False).cosine
    floor = None if ref64 is None or c >= MIN_OUTPUT_COSINE else cosine(ref, ref64.reshape(ref.shape))
    return c, output_failing(c, floor)


def _between(w: Wiring, starts: Sequence[str], stop: set[str], limit: int = 8) -> list[str]:
    """Weightless nodes upstream of values ``starts`` up to the ``stop`` nodes (nearest first)."""
    producer = {v: (k, ins) for k, ins, outs in w.nodes for v in outs}
    seen, out, todo = set(), [], list(starts)
    while todo and len(out) < limit:
        v = todo.pop(0)
        if v not in producer:
            continue
        k, ins = producer[v]
        if k in seen or k in stop:
            continue
        seen.add(k)
        out.append(k.split("#")[0].split("@")[0])
        todo += ins
    return out


def locate_departure(
    param: NcnnParam, param_path: Path, bin_path: Path, folded: nn.Module, io: ModelIO, held: Sequence[torch.Tensor],
    anchors: Mapping[str, str], out_blobs: Sequence[str], wirings: tuple[Wiring, Wiring] | None = None,
) -> dict[str, Any]:
    """Where the float ncnn model first departs from ``folded``: see the module doc.

    ``anchors``: torch layer name -> ncnn layer name (the matched layers); ``wirings``: (torch,
    ncnn) graphs, to name the ops between. Returns ``{"where": "in"|"before"|"after", "torch_layer",
    "ncnn_layer", "input_cosine", "output_cosine", "torch_ops", "ncnn_layers", "message"}``.
    """
    index = {lay.name: i for i, lay in enumerate(param.layers)}
    order = sorted(anchors, key=lambda t: index.get(anchors[t], 0))
    xs = [t[:LOCATE_SAMPLES] for t in held]
    ref = _capture(folded, order, io, xs)
    ref64: dict[str, tuple] = {}
    try:
        ref64 = _capture(float64_copy(folded), order, io, [t.double() if t.is_floating_point() else t for t in xs])
    except Exception:  # noqa: BLE001 - the user's model run in float64 may raise anything; the absolute bar alone
        pass
    extract = list(dict.fromkeys(b for t in order for b in (param.layer(anchors[t]).bottoms[0], param.layer(anchors[t]).tops[0])))
    feeds = {b: t.numpy() for b, t in zip(io.input_names, xs)}
    got = run_ncnn(param_path, bin_path, feeds, extract, FLOAT_OPTIONS, light_mode=False).outputs
    for t in order:
        if t not in ref:
            continue
        lay = param.layer(anchors[t])
        x_ref, y_ref = ref[t]
        x64, y64 = ref64.get(t, (None, None))
        act = lambda y: ncnn_activation(lay, torch.from_numpy(y)).numpy()  # noqa: E731
        cin, bad_in = _judge(x_ref, got[lay.bottoms[0]], x64)
        cout, bad_out = _judge(act(y_ref), got[lay.tops[0]], None if y64 is None else act(y64))
        if bad_in or bad_out:
            where = "before" if bad_in else "in"
            res = {"where": where, "torch_layer": t, "ncnn_layer": lay.name, "input_cosine": cin, "output_cosine": cout,
                   "torch_ops": [], "ncnn_layers": []}
            if (bad_in or cin is None) and wirings is not None:
                res["torch_ops"] = _between(wirings[0], wirings[0].inputs_of(t), set(anchors))
                res["ncnn_layers"] = _between(wirings[1], lay.bottoms, {f"{n}#{index[n]}" for n in anchors.values()})
            res["message"] = _message(res, lay.type, dict(folded.named_modules()).get(t))
            return res
    res = {"where": "after", "torch_layer": order[-1] if order else None, "ncnn_layer": anchors[order[-1]] if order else None,
           "input_cosine": None, "output_cosine": None, "torch_ops": [], "ncnn_layers": []}
    if wirings is not None:
        res["torch_ops"] = _between(wirings[0], wirings[0].outputs, set(anchors))
        res["ncnn_layers"] = _between(wirings[1], list(out_blobs), {f"{n}#{index[n]}" for n in anchors.values()})
    res["message"] = _message(res, None, None)
    return res


def _message(res: dict[str, Any], kind: str | None, module: nn.Module | None) -> str:
    t, n = res["torch_layer"], res["ncnn_layer"]
    ops = f"; between them PyTorch runs {res['torch_ops']} and ncnn runs {res['ncnn_layers']}" if res["torch_ops"] or res["ncnn_layers"] else ""
    if res["where"] == "in" and res["input_cosine"] is None:
        return (
            f"the float ncnn model departs from PyTorch first at layer '{t}' (ncnn '{n}', {kind}): its output does not "
            f"agree (cosine {res['output_cosine']:.6f}) and its input differs in size from PyTorch's: the converter "
            f"merged the ops before it into this layer{ops.replace('between them', 'before it')}"
        )
    if res["where"] == "in":
        return (
            f"the float ncnn model departs from PyTorch first in layer '{t}' (ncnn '{n}', {kind}): its input agrees "
            f"(cosine {res['input_cosine']:.6f}) but its output does not (cosine {res['output_cosine']:.6f}); the "
            f"converter changed what this layer computes ({module!r})"
        )
    if res["where"] == "before":
        return (
            f"the float ncnn model departs from PyTorch first before layer '{t}' (ncnn '{n}'): its input departs "
            f"(cosine {res['input_cosine']:.6f}) while every matched layer before it agrees{ops}"
        )
    last = f" after the last matched layer '{t}' (ncnn '{n}')" if t else ""
    return f"the float ncnn model departs from PyTorch{last}: every matched layer agrees but an output does not{ops}"


def judge_conversion(
    folded: nn.Module, io: ModelIO, held: Sequence[torch.Tensor], f_ref: list[np.ndarray],
    got: Mapping[str, np.ndarray], out_blobs: Sequence[str], options: Mapping[str, Any] = FLOAT_OPTIONS,
    int8_failing: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """The verdict on the float conversion per output: ``{"faithful", "outputs": [{"blob",
    "cosine", "float32_floor", "float_failing", "departs"}], "cosine", "options"}`` (worst output).
    ``got``: the float ncnn model's outputs by blob, run with ``options``; ``f_ref`` the folded
    model's (``torch_outputs``). ``int8_failing[i]``: whether output i of the int8 model (the same
    converted graph) fails against the QAT model (``output_failing`` with the QAT floor).
    An output departs when its float figure fails AND the int8 one does: int8 accumulates exactly,
    so an int8 model at its QAT floor shows the converted graph means what PyTorch's does, and a
    float gap there is ncnn's float32 summation on a poorly conditioned model (a cancelling
    difference of large values), not the converter."""
    outs, cos = [], []
    for i, b in enumerate(out_blobs):
        try:
            cos.append(agreement(f_ref[i], got[b], False).cosine)
        except ValueError:  # a different size: nothing like the model
            cos.append(0.0)
    floors = _floors(folded, io, held, f_ref) if any(c < MIN_OUTPUT_COSINE for c in cos) else None
    for i, (b, c) in enumerate(zip(out_blobs, cos)):
        f = None if floors is None else floors[i]
        failing = output_failing(c, f)
        confirmed = None if int8_failing is None else bool(int8_failing[i])
        outs.append({"blob": b, "cosine": c, "float32_floor": f if c < MIN_OUTPUT_COSINE else None,
                     "at_float32_floor": None if f is None else at_floor(c, f), "float_failing": failing,
                     "int8_failing": confirmed, "departs": conversion_departs(failing, confirmed)})
    return {"faithful": not any(o["departs"] for o in outs), "cosine": min(cos) if cos else None, "outputs": outs,
            "options": {k: v for k, v in options.items() if k != "num_threads"}}


def _int8_failing(export_dir: Path, qmodel: nn.Module, io: ModelIO, held: Sequence[torch.Tensor],
                  out_blobs: Sequence[str]) -> list[bool]:
    """Per output, whether model.int8.* fails against the QAT model (bar, then its float32 floor)."""
    feeds = {n: t.numpy() for n, t in zip(io.input_names, held)}
    got = run_ncnn(export_dir / "model.int8.param", export_dir / "model.int8.bin", feeds, list(out_blobs),
                   {"num_threads": 1}).outputs
    q_ref = torch_outputs(qmodel, io, held)
    cos = [agreement(q_ref[i], got[b], False).cosine for i, b in enumerate(out_blobs)]
    floors = Float32Floor(qmodel, io, held, q_ref).cosines() if any(c < MIN_OUTPUT_COSINE for c in cos) else None
    return [output_failing(c, None if floors is None else floors[i]) for i, c in enumerate(cos)]


def check_conversion(
    export_dir: Path, param: NcnnParam, folded: nn.Module, io: ModelIO, held: Sequence[torch.Tensor],
    anchors: Mapping[str, str], out_blobs: Sequence[str], wirings: tuple[Wiring, Wiring] | None = None,
    qmodel: nn.Module | None = None,
) -> dict[str, Any]:
    """Run model.ncnn.* in ``export_dir`` on ``held`` and judge it (:func:`judge_conversion`);
    where it fails, run model.int8.* against ``qmodel`` to confirm, and locate a departure
    (:func:`locate_departure`, key ``first_departure``)."""
    p, b = export_dir / "model.ncnn.param", export_dir / "model.ncnn.bin"
    feeds = {n: t.numpy() for n, t in zip(io.input_names, held)}
    got = run_ncnn(p, b, feeds, list(out_blobs), FLOAT_OPTIONS).outputs
    f_ref = torch_outputs(folded, io, held)
    verdict = judge_conversion(folded, io, held, f_ref, got, out_blobs)
    if not verdict["faithful"] and qmodel is not None and (export_dir / "model.int8.param").is_file():
        verdict = judge_conversion(folded, io, held, f_ref, got, out_blobs,
                                   int8_failing=_int8_failing(export_dir, qmodel, io, held, out_blobs))
    if not verdict["faithful"]:
        verdict["first_departure"] = locate_departure(param, p, b, folded, io, held, anchors, out_blobs, wirings)
    return verdict


def conversion_message(verdict: Mapping[str, Any]) -> str | None:
    """The warning of a departing conversion (:func:`lightning_ncnnqat.policy.conversion_departure`)
    as one line; None when faithful or not judged."""
    found = conversion_departure(verdict)
    return found[0].message if found else None


def preflight_conversion(
    export_dir: Path, param: NcnnParam, folded: nn.Module, io: ModelIO, held: Sequence[torch.Tensor],
    anchors: Mapping[str, str], out_blobs: Sequence[str], wirings: tuple[Wiring, Wiring] | None = None,
    qmodel: nn.Module | None = None,
) -> dict[str, Any]:
    """:func:`check_conversion` for the preflight at QAT start; an ncnn run that fails (crash,
    timeout) is recorded (``{"faithful": None, "error": ...}``), not raised: the conversion is
    judged again at export. Any other exception is a fault of ours and propagates."""
    try:
        return check_conversion(export_dir, param, folded, io, held, anchors, out_blobs, wirings, qmodel)
    except NcnnRuntimeError as e:
        return {"faithful": None, "error": f"{type(e).__name__}: {e}"}
