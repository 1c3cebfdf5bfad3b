"""Every pass/fail threshold of the package and the numeric rules that apply them.

A threshold has exactly one home: here. Each constant says where its value comes from. The rules
take numbers and return booleans; the rules that return :class:`~.findings.Finding` objects
(:mod:`.outputs`, :mod:`.layers`, :mod:`.steps`) are built on them. Standard library only.
"""

from __future__ import annotations

# ---- int8 output vs the QAT model ---------------------------------------------------------

#: The absolute bar: an int8 output at least this close (cosine) to the QAT model never needs the floor.
MIN_OUTPUT_COSINE = 0.9999
#: int8's error ``1 - cos`` may be this many times the float32 floor's. At-floor ratios measured on
#: the zoo (strict options, x86/A53, 20 models): up to 1.74 (mobilenet_v3_large); resnext50_32x4d
#: 1.06, regnet_x_400mf 0.96; ncnn's extra float32 rounding (requantize multiply, bias add) is a
#: second perturbation of the same size, hence ~2x at most. A wrong scale or weight is orders beyond 3x.
FLOOR_FACTOR = 3.0
#: Added to the allowance so that a floor of exactly 1.0 does not turn the rule into "no error at all".
FLOOR_MARGIN = 1e-6
#: Under a target's default options an output may fall below its strict (approximations off)
#: figure by the runtime's own approximations (fp16 storage, approximate requantize): a trained
#: ResNet-18 on Cortex-A76 0.999953 vs 0.999997; random-weight zoo models down to 0.947 there.
#: Users deploy with the default options, so an emulated target's default-options cosine below
#: this bar and not at the float32 floor is a warning even when its strict run is fine; between
#: this bar and :data:`MIN_OUTPUT_COSINE` the gap is the approximation's usual size: a note.
MIN_DEFAULT_OPTIONS_COSINE = 0.99
#: The smallest default-vs-strict cosine gap the notes name as the runtime's own approximation.
#: Below it the two figures agree to about five decimals and a note would stand on every A76
#: export (fp16 storage alone moves a well-conditioned model's cosine by ~1e-6); the trained
#: ResNet-18 of the main job (A76: 0.999953 vs 0.999997, a gap of 4.4e-5) keeps its note.
MIN_NOTED_GAP = 1e-5
#: int8 top-1 agreement with the QAT model below this is a warning unless every flip is a near-tie.
MIN_TOP1_AGREEMENT = 0.995
#: A top-1 flip is a near-tie when the reference margin is within this many sigmas of the int8
#: noise of the difference of two logits (``sqrt(2) * noise_rms``).
NEAR_TIE_SIGMAS = 4.0

# ---- one int8 layer on ncnn's own input ---------------------------------------------------

#: Flag a layer whose isolated output has cosine below this ...
MIN_LAYER_COSINE = 0.999
#: ... or a max error above this fraction of its output's absmax (a correct layer stays within
#: about one quantization step, 1/127 = 0.8 %).
MAX_LAYER_REL_ERR = 0.05


def needs_floor(cos: float, strict: float | None = None) -> bool:
    """Whether judging an output cosine ``cos`` (``strict``: the same with the runtime's
    approximations off, emulated targets) needs the model's float32 floor: the better figure misses
    :data:`MIN_OUTPUT_COSINE`, or only the default options are lower and below
    :data:`MIN_DEFAULT_OPTIONS_COSINE`. The floor (a float64 run of the model) is measured only then."""
    best = cos if strict is None else max(cos, strict)
    gap = strict is not None and strict > cos
    return best < MIN_OUTPUT_COSINE or (gap and cos < MIN_DEFAULT_OPTIONS_COSINE)


def at_floor(cos: float, floor: float) -> bool:
    """Whether an int8 cosine ``cos`` is as close to the QAT model as float32 can be (``floor``:
    the cosine of the QAT model in float32 vs float64 on the same inputs)."""
    return (1.0 - cos) <= FLOOR_FACTOR * (1.0 - floor) + FLOOR_MARGIN


def output_failing(cos: float, floor: float | None) -> bool:
    """Whether an output cosine ``cos`` is a defect signal: below the bar and not at the float32
    ``floor`` (None: not measured, so the bar alone)."""
    return cos < MIN_OUTPUT_COSINE and (floor is None or not at_floor(cos, floor))


def approximation_gap(default_cos: float, strict_cos: float) -> bool:
    """Whether a target's default-options int8 cosine is materially below its strict one: the gap
    is at least :data:`MIN_NOTED_GAP` and either the strict run alone meets the bar or the default
    options' error ``1 - cos`` is over twice the strict one's."""
    if strict_cos - default_cos < MIN_NOTED_GAP:
        return False
    return default_cos < MIN_OUTPUT_COSINE <= strict_cos or (1 - default_cos) > 2 * (1 - strict_cos)


def layer_ok(cosine: float, max_rel_err: float) -> bool:
    """Whether one int8 layer on ncnn's own input is right: cosine at least :data:`MIN_LAYER_COSINE`
    and max error at most :data:`MAX_LAYER_REL_ERR` of its output's absmax."""
    return cosine >= MIN_LAYER_COSINE and max_rel_err <= MAX_LAYER_REL_ERR


def layer_cosine_ok(cosine: float, attention: bool = False) -> bool:
    """Whether a flagged layer's output has the right shape (cosine passes) and only its max error
    fails: then it is rerun with the runtime's approximations off before it is called wrong. An
    attention layer (``attention``) must reach :data:`MIN_ATTENTION_COSINE_DEFAULTS` for that."""
    return cosine >= (MIN_ATTENTION_COSINE_DEFAULTS if attention else MIN_LAYER_COSINE)


#: ncnn's int8 MultiHeadAttention / SDPA on its own inputs against ``ops/attention_reference``
#: (docs/export.md "Attention in int8", measured 2026-12-07): x86, A53 and A76 with fp16 off agree
#: to float32 rounding (cosine >= 1 - 1e-14, every value within 1e-5 of the output's absmax; a
#: level may move one step where softmax's vectorised exp moves a product across .5).
MIN_ATTENTION_COSINE = 1 - 1e-8
MAX_ATTENTION_REL_ERR = 1 / 127  # that one step, of the output's absmax; the cosine bar judges the rest
#: ... and A76 under its default options (fp16 storage and arithmetic): 0.99995-0.999996 measured.
MIN_ATTENTION_COSINE_DEFAULTS = 0.9999


def attention_layer_ok(cosine: float, max_rel_err: float) -> bool:
    """Whether an int8 MultiHeadAttention / SDPA on ncnn's own inputs is right (the bars above)."""
    return cosine >= MIN_ATTENTION_COSINE and max_rel_err <= MAX_ATTENTION_REL_ERR


# ---- the float conversion (model.ncnn.* vs the folded PyTorch model) ----------------------


def conversion_departs(float_failing: bool, int8_failing: bool | None) -> bool:
    """Whether an output of the float ncnn model departs from PyTorch: its float figure fails
    (:func:`output_failing` with the folded model's own floor) and the int8 model's does too, or
    was not measured (None). int8 accumulates exactly, so an int8 model at its QAT floor shows the
    converted graph means what PyTorch's does, and a float gap there is ncnn's float32 summation."""
    return float_failing and int8_failing is not False


# ---- model.onnx vs PyTorch float (onnxruntime) ---------------------------------------------

#: model.onnx may differ from the folded PyTorch model (one sample, float32) by this fraction of the
#: larger of 1 and the outputs' absmax: onnxsim's constant folding and onnxruntime's kernels only
#: reorder float32 sums, a wrong op moves an output by a large part of its range.
MAX_ONNX_REL_ERR = 1e-3


def onnx_bar(ref_absmax: float) -> float:
    """The largest absolute error of model.onnx that passes, for outputs of absmax ``ref_absmax``."""
    return MAX_ONNX_REL_ERR * max(1.0, ref_absmax)


# ---- QAT start at the user's learning rate -------------------------------------------------

#: A higher-is-better validation metric (accuracy, top-1, F1...) has collapsed at QAT start when
#: its first QAT value is below this fraction of its last float value (the issue's run: 0.705
#: float, 0.098 after one QAT epoch at the float run's lr 0.05; a healthy start on the tests'
#: digits CNN moves it by a few points).
COLLAPSE_KEEP_FRACTION = 0.5
#: A lower-is-better one (a loss) has collapsed when its first QAT value is over this multiple of
#: its last float value ...
COLLAPSE_LOSS_FACTOR = 2.0
#: ... and higher by at least this much, so a near-zero float loss that doubles is not a collapse
#: (cross-entropy at chance on 10 classes is 2.3; a trained model's is a few tenths).
COLLAPSE_LOSS_MIN_RISE = 0.25
#: The learning-rate factor the collapse warning suggests for QAT fine-tuning (the QAT literature
#: fine-tunes at about a tenth of the float run's final rate).
QAT_LR_FACTOR = 0.1


def collapsed(before: float, after: float, higher_is_better: bool) -> bool:
    """Whether a validation metric went from ``before`` (last float validation) to ``after``
    (first QAT validation) by a collapse, not by QAT's usual small loss; a non-finite ``after``
    (from a finite ``before``) is one."""
    if before != before or before in (float("inf"), float("-inf")):
        return False
    if after != after or after in (float("inf"), float("-inf")):
        return True
    if higher_is_better:
        return before > 0 and after < COLLAPSE_KEEP_FRACTION * before
    return after > COLLAPSE_LOSS_FACTOR * before and after - before >= COLLAPSE_LOSS_MIN_RISE
