"""Int8 speed against float: the thresholds and the rules that judge a timing (issue 20).

Timings are made in :mod:`lightning_ncnnqat.speed` (one child process, float and int8
interleaved, ncnn's default options; at one thread on process CPU time, which a busy machine's
preemption does not inflate); what a ratio MEANS is decided here. Standard library only.
"""

from __future__ import annotations

from .findings import Finding, note, warning

#: A ratio of medians (float / int8) within this fraction of 1 is a tie: the run-to-run noise of
#: one interleaved CPU-time timing on this machine (repeat runs of one export moved by 1-3%).
SPEED_TIE_TOLERANCE = 0.03
#: An int8 layer timed alone is a candidate to keep float when float / int8 is below
#: ``1 - SPEED_LAYER_MARGIN`` by the medians and by the fastest runs. Alone it pays the quantize
#: of its input and the dequantize of its output, and a tiny layer's ratio moves between runs (at
#: load 8 here a 3x3 conv near the margin read 0.81-1.12x by medians over four runs, 0.92-1.08x by
#: fastest runs), so ratios just under 1 are noise or chain effects; the losers this is for are far
#: below (3x3 depthwise 0.42-0.78x, ResNet's 1x1 downsample 0.73-0.80x on this AMD EPYC,
#: docs/speed.md). The whole-model timing decides after.
SPEED_LAYER_MARGIN = 0.10
#: Layers are kept float only when the whole model then gains at least this much (or when the
#: int8 model without that is slower than float): beyond run-to-run noise (two QAT starts of the
#: main job read its all-int8 model at 1.37x and 1.35x float at load 10-12; the 3% tie tolerance
#: is of that size), and a smaller gain is not worth a layer's int8 size.
SPEED_KEEP_FLOAT_GAIN = 0.05
#: Interleaved timed runs per chain unit and per whole model at QAT start (after warm-up). The
#: whole-model rounds are split in two halves (pairs of rounds alternately): a plan with more layers
#: float is taken only where it pays on both (two measurements then decide alike), the second
#: half's figures are the ones reported, and the safety step looks at both.
SPEED_LAYER_RUNS = 30
SPEED_MODEL_RUNS = 60
#: Interleaved runs of the confirming timing (float, the chosen plan, the next safer plan): a
#: figure of its own, so the one reported is not the best of several noisy readings (the QAT
#: start's figure read 4-5% above the export's own timing on four zoo runs without it).
SPEED_CONFIRM_RUNS = 30
#: ncnn layer kinds that may lose in int8 even inside a requantize chain, so a chain holding them
#: is also timed with them float (its other layers int8 in the pieces left): ncnn's x86 int8
#: depthwise (``src/layer/x86/convolutiondepthwise_x86.cpp``, ``forward_int8_x86``) is SSE only
#: while its float depthwise has AVX/AVX-512 kernels (docs/speed.md). Measured, not assumed: where
#: the chain wins whole (a CPU with fast int8 depthwise) it stays int8.
SPEED_SPLIT_KINDS = ("ConvolutionDepthWise",)
#: A difference of less than this many ms per inference between int8 and float is a tie whatever
#: the ratio: it is within the fixed cost of one ncnn Extractor run here (a Linear 64->10 alone
#: times at 5-10 us), no application notices it, and on toy models (8x8 inputs, a few channels:
#: tens of us in all) ratios of such differences move the plan from one run to the next.
SPEED_MIN_DIFF_MS = 0.01
#: The export's timing is judged (faster / tie / slower) only from this many interleaved runs:
#: the median of fewer per-round ratios is one or two rounds' noise (export(timing_runs=1) is a
#: smoke test of the timing, not a measurement).
SPEED_MIN_JUDGED_RUNS = 10
#: int8 "pays in size" only where its weights file (.bin) is at least this many times smaller than
#: the float model's: a model whose int8 layers are a few small ones (7 of 8 layers kept float:
#: 34608 B float vs 33380 B int8, 1.04x) gains nothing worth an int8 deployment when it does not
#: gain speed either; an all-int8 model of 8-bit weights is about 4x smaller (2x against fp16).
SIZE_PAYS_RATIO = 1.5
#: How a speed-up figure reads in every line that shows one next to medians: it is the median of
#: per-round float/int8 ratios (each int8 run against the float run beside it, so a drift of the
#: machine cancels), not the ratio of the two medians shown, which may point the other way on a
#: noisy machine.
PER_ROUND = "per round"
#: ``QATConfig.prefer``: "speed" keeps float the int8 layers that lose on the measured target;
#: "int8" measures and reports but keeps every layer int8; "size" times nothing (every layer int8).
PREFERS = ("speed", "int8", "size")


def speed_verdict(speedup: float, diff_ms: float | None = None) -> str:
    """``"faster"``, ``"slower"`` or ``"tie"``: int8 against float by ``speedup`` (float time /
    int8 time: a ratio of medians, or the median of per-round ratios of an interleaved timing);
    within :data:`SPEED_TIE_TOLERANCE` of 1, or ``diff_ms`` (float ms - int8 ms, where known)
    under :data:`SPEED_MIN_DIFF_MS`, a tie. Raises ValueError for a speed-up that is not > 0."""
    if not speedup > 0:
        raise ValueError(f"speed_verdict: a speed-up must be > 0, got {speedup!r}")
    if diff_ms is not None and abs(diff_ms) < SPEED_MIN_DIFF_MS:
        return "tie"
    if speedup >= 1 + SPEED_TIE_TOLERANCE:
        return "faster"
    if speedup <= 1 - SPEED_TIE_TOLERANCE:
        return "slower"
    return "tie"


def size_pays(float_bytes: int | None, int8_bytes: int | None) -> bool | None:
    """Whether the int8 weights file is smaller enough to pay in size (:data:`SIZE_PAYS_RATIO`);
    None when a size is not known."""
    if not float_bytes or not int8_bytes:
        return None
    return float_bytes / int8_bytes >= SIZE_PAYS_RATIO


def sizes_text(float_bytes: int | None, int8_bytes: int | None) -> str:
    """``"weights float N B, int8 M B (Rx smaller)"``; empty when a size is not known."""
    if not float_bytes or not int8_bytes:
        return ""
    return f"weights (.bin) float {float_bytes} B, int8 {int8_bytes} B ({float_bytes / int8_bytes:.2f}x smaller)"


def tie_message(target: str, figures: str, float_bytes: int | None = None, int8_bytes: int | None = None) -> str:
    """What an int8 model that ties with float on ``target`` gives: size only where
    :func:`size_pays` (with the size figures), else plainly nothing: deploy the float model."""
    sizes = sizes_text(float_bytes, int8_bytes)
    if size_pays(float_bytes, int8_bytes) is False:
        return (f"int8 ties with float on {target} ({figures}) and is barely smaller ({sizes}): int8 pays neither "
                "in speed nor much in size here: deploy the float model (model.ncnn.*)")
    return f"int8 ties with float on {target} ({figures}): it pays in size only" + (f" ({sizes})" if sizes else "")


def int8_layer_loses(float_ms: float, int8_ms: float) -> bool:
    """Whether an int8 layer timed alone loses clearly to its float twin (beyond the margin)."""
    return int8_ms > 0 and float_ms / int8_ms < 1 - SPEED_LAYER_MARGIN


def int8_layer_wins(float_ms: float, int8_ms: float) -> bool:
    """Whether an int8 layer or chain timed alone wins clearly over its float twin (beyond the
    margin): the fallback plan keeps only such units int8."""
    return int8_ms > 0 and float_ms / int8_ms > 1 + SPEED_LAYER_MARGIN


def keep_float_pays(gain: float, current_speedup: float, saved_ms: float, current_diff_ms: float | None = None) -> bool:
    """Whether an int8 model with more layers float should replace the current one: it runs
    ``gain`` times as fast as the current one (``saved_ms`` less per inference), which runs
    ``current_speedup`` times as fast as float (``current_diff_ms``: float ms - its ms). It must
    save :data:`SPEED_MIN_DIFF_MS` and gain :data:`SPEED_KEEP_FLOAT_GAIN` (beyond the noise, so
    two QAT starts decide alike), or, where the current model is slower than float, beyond the
    tie tolerance."""
    if saved_ms < SPEED_MIN_DIFF_MS:
        return False
    if gain >= 1 + SPEED_KEEP_FLOAT_GAIN:
        return True
    return speed_verdict(current_speedup, current_diff_ms) == "slower" and gain >= 1 + SPEED_TIE_TOLERANCE


def judge_speed(
    target: str, speedup: float, figures: str, runs: int = SPEED_MIN_JUDGED_RUNS, diff_ms: float | None = None,
    sizes: tuple[int | None, int | None] = (None, None),
) -> list[Finding]:
    """The export's int8 vs float timing on ``target`` (``speedup``: float time / int8 time, over
    ``runs`` interleaved runs): int8 slower is a warning that says plainly that int8 does not pay
    there; a tie a note (size only); faster a note with the figures; fewer than
    :data:`SPEED_MIN_JUDGED_RUNS` runs a note that the figure is not judged. ``figures``: how it
    was timed, for the message; ``diff_ms``: float ms - int8 ms (a smaller difference than
    :data:`SPEED_MIN_DIFF_MS` is a tie); ``sizes``: the float and int8 .bin bytes (a tie with
    a small size gain says to deploy float, :func:`tie_message`)."""
    if runs < SPEED_MIN_JUDGED_RUNS:
        return [note("speed_not_judged", f"int8 vs float on {target} not judged: {runs} run(s) ({figures}); "
                     f"time with timing_runs >= {SPEED_MIN_JUDGED_RUNS} for a verdict", value=speedup)]
    verdict = speed_verdict(speedup, diff_ms)
    if verdict == "slower":
        return [warning(
            "int8_slower_than_float",
            f"int8 does NOT pay on {target}: the int8 model is SLOWER than the float model ({figures}); deploy "
            "model.ncnn.* there, or run QAT with prefer='speed' (the default) so the layers that lose stay float",
            value=speedup, bar=1 - SPEED_TIE_TOLERANCE)]
    if verdict == "tie":
        code = "int8_pays_nothing" if size_pays(*sizes) is False else "int8_ties_float"
        return [note(code, tie_message(target, figures, *sizes), value=speedup, bar=1 - SPEED_TIE_TOLERANCE)]
    return [note("int8_faster", f"int8 is faster than float on {target} ({figures})", value=speedup,
                 bar=1 + SPEED_TIE_TOLERANCE)]


def speed_not_measured(error: str) -> Finding:
    """The export's int8 vs float timing failed (``error`` named): a note; the files stand."""
    return note("speed_not_measured", f"int8 vs float speed not measured on this machine: {error}")
