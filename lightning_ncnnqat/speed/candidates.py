"""Which int8 layers to try float at QAT start: candidate plans from timed chain units (issue 20).

The units (``speed.segments``) are the int8 chains of the all-int8 model, each timed whole, int8
against float: a unit takes float in and gives float out, so units add up (keeping one float
changes no other unit's chain). Inside a chain some kinds lose in int8 even without the
quantize/dequantize around them (:data:`policy.SPEED_SPLIT_KINDS`: ncnn's x86 int8 depthwise has no
AVX kernel); for a chain holding such layers the *pieces* it breaks into with them float are timed
too (cut from an int8 model written with them float, so a piece's ends pay what they would pay).

Per chain three options: all int8 (``A``), all float (``B``), its split-kind layers float with each
piece int8 or float (``C``, estimated as the chain's float time with the pieces' differences). From
these, four plans (sets of torch layer names to keep float), from fewest layers float to most:

- ``split``: by structure, every chain holding split-kind layers in option C (pieces float only
  where they lose clearly), every other unit float only where it loses clearly (by
  :data:`policy.SPEED_LAYER_MARGIN`, by medians and fastest runs). It does not hang on the
  chain's own noisy estimate, so two measurements propose the same plan;
- ``loose``: per chain the cheapest option by the estimates, pieces float wherever they lose;
- ``floor``: every unit float unless it clearly wins in int8 (for a split chain: its pieces that
  clearly win): the fallback, estimated no slower than float;
- ``minimal``: every layer float but the unit with the best ratio (QAT needs one int8 layer):
  the last resort, always timed, so a plan as close to float as QAT allows is there to take.

The whole model decides among them (``choose`` in ``speed.decide``); none is trusted from the
estimates alone. Plain data, torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_ncnnqat.policy import speed as policy

__all__ = ["UnitSpeed", "Plan", "candidate_plans"]


@dataclass
class UnitSpeed:
    """One chain unit timed whole on one target: its int8 layers (torch names, model order),
    their ncnn kinds, median (and fastest-run) ms of its int8 and float forms; ``pieces``: for
    a chain holding split-kind layers, the units it breaks into with those layers float."""

    layers: tuple[str, ...]
    kinds: tuple[str, ...]
    int8_ms: float
    float_ms: float
    int8_min_ms: float | None = None
    float_min_ms: float | None = None
    pieces: list[UnitSpeed] = field(default_factory=list)
    paired: float | None = None  # float / int8, the median of per-round ratios (where timed side by side)

    @property
    def ratio(self) -> float:
        """float / int8: the median of per-round ratios where known (a drift of the machine between
        rounds cancels), else of the medians; above 1 int8 is faster."""
        if self.paired is not None:
            return self.paired
        return self.float_ms / self.int8_ms if self.int8_ms > 0 else 0.0

    @property
    def int8_est_ms(self) -> float:
        """The int8 ms that :attr:`ratio` gives against the float median (what the plans add up)."""
        return self.float_ms / self.ratio if self.ratio > 0 else self.int8_ms

    def _both(self, rule) -> bool:  # noqa: ANN001 - a policy rule (float_ms, int8_ms) -> bool
        by_min = self.int8_min_ms is None or self.float_min_ms is None or rule(self.float_min_ms, self.int8_min_ms)
        return rule(self.float_ms, self.int8_est_ms) and by_min

    @property
    def loses(self) -> bool:
        """int8 loses clearly (:func:`policy.int8_layer_loses`) by medians AND fastest runs."""
        return self._both(policy.int8_layer_loses)

    @property
    def wins(self) -> bool:
        """int8 wins clearly (:func:`policy.int8_layer_wins`) by medians AND fastest runs."""
        return self._both(policy.int8_layer_wins)

    @property
    def split_layers(self) -> tuple[str, ...]:
        """Its layers in no piece: the split-kind layers kept float in option C."""
        inside = {n for p in self.pieces for n in p.layers}
        return tuple(n for n in self.layers if n not in inside) if self.pieces else ()

    def describe(self, target: str, threads: int, clock: str) -> str:
        """The figures, for a reason: alone, or as one chain."""
        how = "alone" if len(self.layers) == 1 else f"its int8 chain of {len(self.layers)} layers timed as one"
        if len(self.layers) > 1 and set(self.kinds) == {"SDPA"}:  # speed.segments: one unit, never a chain
            how = f"the model's {len(self.layers)} SDPA layers timed together: int8 all together or not at all"
        verb = ("int8 slower than float" if self.ratio < 1 else "int8 not clearly faster than float" if not self.wins
                else "int8 faster alone, but the whole int8 model lost to float")
        return (f"{verb} on {target} ({how}, {threads} thread, {clock} time: int8 {self.int8_ms:.4f} ms "
                f"vs float {self.float_ms:.4f} ms, {self.ratio:.2f}x per round)")


@dataclass
class Plan:
    """A candidate: the torch layers kept float, the estimated ms saved against all-int8 (sum
    over units), and per layer why (the figures of the unit that decided it)."""

    name: str
    float_layers: list[str]
    saved_ms: float
    why: dict[str, str]


def _option_c(u: UnitSpeed, piece_float) -> tuple[list[str], float, float | None]:  # noqa: ANN001 - UnitSpeed -> bool
    """Option C of chain ``u``: its split-kind layers float, each piece float where ``piece_float``
    says; (float layers, estimated ms, estimated fastest-run ms or None)."""
    floats = list(u.split_layers)
    ms, low = u.float_ms, u.float_min_ms
    for p in u.pieces:
        if piece_float(p):
            floats += p.layers
            continue
        ms += p.int8_est_ms - p.float_ms
        if low is not None and p.int8_min_ms is not None and p.float_min_ms is not None:
            low += p.int8_min_ms - p.float_min_ms
        else:
            low = None
    return floats, max(ms, 1e-9), (max(low, 1e-9) if low is not None else None)


def _pick(u: UnitSpeed, mode: str) -> tuple[list[str], float, str]:
    """One chain's option under ``mode`` ("split", "loose", "floor"): (float layers, ms saved
    against all-int8, which option: "A" int8, "B" float, "C" split)."""
    rule = {"split": lambda p: p.loses, "loose": lambda p: p.ratio < 1, "floor": lambda p: not p.wins}[mode]
    opts: list[tuple[list[str], float, float | None, str]] = []
    if u.pieces:
        floats, ms, low = _option_c(u, rule)
        if len(floats) < len(u.layers):
            opts.append((floats, ms, low, "C"))
    opts.append((list(u.layers), u.float_ms, u.float_min_ms, "B"))
    if mode == "split":  # by structure: a split chain in option C, any other unit float where it loses clearly
        if u.pieces:
            return opts[0][0], u.int8_est_ms - opts[0][1], opts[0][3]
        return ([], 0.0, "A") if not u.loses else (list(u.layers), u.int8_est_ms - u.float_ms, "B")
    if mode == "floor":  # the fallback: int8 only where it clearly wins
        if u.wins:
            return [], 0.0, "A"
        return opts[0][0], u.int8_est_ms - opts[0][1], opts[0][3]

    ok = [o for o in opts if o[1] < u.int8_est_ms]  # "loose": the cheapest option
    if not ok:
        return [], 0.0, "A"
    pick = ok[0]
    for o in ok[1:]:  # more layers float only where clearly cheaper than fewer (beyond the tie tolerance)
        if o[1] < pick[1] * (1 - policy.SPEED_TIE_TOLERANCE):
            pick = o
    return pick[0], u.int8_est_ms - pick[1], pick[3]


def _why(u: UnitSpeed, layers: list[str], tag: str, target: str, threads: int, clock: str) -> dict[str, str]:
    """Per layer kept float by option ``tag`` of chain ``u``: the figures that decided it."""
    if tag == "B":
        return {n: u.describe(target, threads, clock) for n in layers}
    out = {}
    pieces = {n: p for p in u.pieces for n in p.layers}
    for n in layers:
        if n in pieces:
            out[n] = pieces[n].describe(target, threads, clock)
        else:
            out[n] = (f"int8 slower than float on {target} ({u.kinds[u.layers.index(n)]} in an int8 chain of "
                      f"{len(u.layers)} layers, {threads} thread, {clock} time: the chain int8 {u.int8_ms:.4f} ms, "
                      f"float {u.float_ms:.4f} ms; the whole model with its {', '.join(policy.SPEED_SPLIT_KINDS)} layers float ran faster)")
    return out


def candidate_plans(units: list[UnitSpeed], target: str = "x86", threads: int = 1, clock: str = "cpu") -> list[Plan]:
    """The ``split``, ``loose``, ``floor`` and ``minimal`` plans of ``units`` (module docstring),
    without duplicates and without the empty plan (all-int8 is always timed). ``minimal`` keeps
    int8 only the unit with the best ratio (QAT needs a layer to quantize): the last resort, so a
    plan as close to float as QAT allows is always timed; any plan that would keep every layer
    float keeps that unit int8 too (then the summary says int8 does not pay)."""
    every = [n for u in units for n in u.layers]
    order = {n: i for i, n in enumerate(every)}
    flat = [p for u in units for p in (u, *u.pieces)]
    best = max(flat, key=lambda p: p.ratio) if flat else None
    plans: list[Plan] = []
    for mode in ("split", "loose", "floor", "minimal"):
        floats, why, saved = [], {}, 0.0
        for u in units:
            layers, s, tag = _pick(u, "floor" if mode == "minimal" else mode)
            if mode == "minimal":  # every unit float: its pieces' figures say why where it has pieces
                layers, s, tag = list(u.layers), u.int8_est_ms - u.float_ms, "B"
            floats += layers
            saved += s
            why.update(_why(u, layers, tag, target, threads, clock))
        if best is not None and set(best.layers) <= set(floats) and len(floats) == len(every):
            floats = [n for n in floats if n not in best.layers]
            saved -= best.int8_est_ms - best.float_ms
        floats = sorted(set(floats), key=order.__getitem__)
        if floats and all(p.float_layers != floats for p in plans):
            plans.append(Plan(mode, floats, saved, {n: why[n] for n in floats if n in why}))
    return plans
