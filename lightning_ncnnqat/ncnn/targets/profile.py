"""Read a board profile (written by :mod:`.board_profile` on the device) for QAT and the export.

:func:`load_profile` checks the file and returns a :class:`BoardProfile`; a malformed file raises
:class:`ProfileError` naming the file and the field. The figures a decision needs come as plain
numbers: :meth:`BoardProfile.layer_ms` (ncnn layer name -> (int8 ms, float ms)) and
:meth:`BoardProfile.model_ms`. A profile measured under emulation (qemu) loads, but asking it
for speeds raises :class:`EmulatedProfileError`: emulated times say nothing about the device
(``allow_emulated=True`` gives them to tests of the mechanics, never to a report;
:func:`allow_emulated_profiles` lets a test hand such a profile to ``QATConfig(board_profile=)``).
:func:`check_architecture` says whether a profile timed the layers of a given float model.

Standard library only (and the package's error types); no torch, no ncnn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import os

from lightning_ncnnqat.errors import ConfigError, ConfigTypeError, NcnnQatError

#: What :mod:`.board_profile` writes (kept equal to its FORMAT / VERSION; a test checks it).
FORMAT = "lightning_ncnnqat.board_profile"
VERSION = 1
#: The whole-model variants a profile may hold: ``int8_fp16_blobs`` is the int8 model with the
#: float32-blob feature mask removed (``ncnn/fp32_blobs.py``), timed where the model carries it.
VARIANTS = ("float", "int8", "int8_fp16_blobs")


class ProfileError(NcnnQatError, ValueError):
    """A board profile that cannot be used: the message names the file and the field."""


class EmulatedProfileError(ProfileError):
    """Speeds asked of a profile measured under emulation: its times are not the device's."""


_ALLOW_EMULATED = [0]


@contextlib.contextmanager
def allow_emulated_profiles() -> Iterator[None]:
    """Inside this block ``QATConfig(board_profile=)``, ``ExportConfig(board_profile=)`` and the QAT
    start accept a profile measured under emulation: for TESTS of the mechanics (the emulated ARM
    targets), never for a decision that matters; every line that shows its times says EMULATED."""
    _ALLOW_EMULATED[0] += 1
    try:
        yield
    finally:
        _ALLOW_EMULATED[0] -= 1


def emulated_allowed() -> bool:
    """Whether :func:`allow_emulated_profiles` is active."""
    return _ALLOW_EMULATED[0] > 0


def _fail(path: Path, where: str, msg: str, value: Any = None) -> ProfileError:
    return ProfileError(f"board profile {path}: field '{where}' {msg}", argument=where, value=value)


def _ms(path: Path, where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _fail(path, where, f"must be a finite time in ms >= 0, got {v!r}", v)
    return float(v)


def _get(path: Path, d: Any, key: str, where: str, typ: type | tuple[type, ...]) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _fail(path, where, "is missing")
    v = d[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):  # JSON true is not a number
        raise _fail(path, where, f"must be {getattr(typ, '__name__', typ)}, got {type(v).__name__} {v!r:.60}", v)
    return v


@dataclass(frozen=True)
class BoardProfile:
    """A checked board profile. ``times[threads][variant]`` is ``(model_ms, {layer: (type, ms)})``."""

    path: Path
    label: str
    emulated: bool
    evidence: tuple[str, ...]
    device: dict
    threads: tuple[int, ...]
    times: dict[int, dict[str, tuple[float, dict[str, tuple[str, float]]]]] = field(repr=False)
    models: dict = field(default_factory=dict)
    runs: int = 0  # timed runs per median on the board (0: not recorded)
    #: layers the profiled int8 model ran in float (its ``int8`` flags): their "int8" time is a float time
    float_in_int8: frozenset[str] = frozenset()
    inputs: dict = field(default_factory=dict)  # input blob -> shape it was timed at (no batch dim)

    def describe(self) -> str:
        """One line naming the device: label, board, CPU parts, core count, ncnn version."""
        d = self.device
        bits = [self.label or d.get("board") or d.get("machine", "?")]
        if d.get("cpu_parts"):
            bits.append("CPU parts " + ",".join(d["cpu_parts"]))
        bits.append(f"{d.get('cpu_count')} cores, ncnn {d.get('ncnn_version')}")
        return ", ".join(str(b) for b in bits if b) + (" (EMULATED)" if self.emulated else "")

    def _checked(self, threads: int, allow_emulated: bool) -> dict:
        if self.emulated and not allow_emulated:
            raise EmulatedProfileError(
                f"board profile {self.path} was measured under emulation ({'; '.join(self.evidence)}): its times are not "
                "the device's speed; run `python -m lightning_ncnnqat.ncnn.targets profile` on the board itself",
                argument="profile", value=str(self.path),
            )
        if threads not in self.times:
            raise ProfileError(
                f"board profile {self.path}: no times at {threads} thread(s) (measured: {list(self.threads)})",
                argument="threads", value=threads,
            )
        return self.times[threads]

    def model_ms(self, threads: int = 1, *, allow_emulated: bool = False) -> dict[str, float]:
        """Whole-model median ms per variant (``float``, ``int8``, maybe ``int8_fp16_blobs``).

        Raises EmulatedProfileError (emulated profile, unless ``allow_emulated``), ProfileError
        (``threads`` not measured)."""
        return {v: t[0] for v, t in self._checked(threads, allow_emulated).items()}

    def layer_ms(self, threads: int = 1, *, allow_emulated: bool = False) -> dict[str, tuple[float, float]]:
        """ncnn layer name -> (int8 ms, float ms) for the layers timed in both models (their names
        are the same: the int8 model is the float one with tables applied). Same errors as :meth:`model_ms`."""
        t = self._checked(threads, allow_emulated)
        q, f = t["int8"][1], t["float"][1]
        return {n: (q[n][1], f[n][1]) for n in q if n in f}

    def speed_summary(self) -> dict:
        """What the report and DEPLOY.md show: per thread count float / int8 ms and the speed-up;
        for an emulated profile no times, only that they are not speeds."""
        out: dict[str, Any] = {"path": str(self.path), "device": self.describe(), "emulated": self.emulated}
        if self.emulated:
            out["note"] = "measured under emulation: its times are not speeds and are not shown"
            return out
        rows = {}
        for n in self.threads:
            m = self.model_ms(n)
            row = {"float_ms": m["float"], "int8_ms": m["int8"], "speedup": m["float"] / m["int8"] if m["int8"] else None}
            if "int8_fp16_blobs" in m:
                row["int8_fp16_blobs_ms"] = m["int8_fp16_blobs"]
            rows[str(n)] = row
        out["threads"] = rows
        return out


def _variant(path: Path, v: Any, where: str) -> tuple[float, dict[str, tuple[str, float]]]:
    model = _ms(path, f"{where}.model_ms", _get(path, v, "model_ms", f"{where}.model_ms", (int, float)))
    layers = _get(path, v, "layers", f"{where}.layers", dict)
    out = {}
    for name, e in layers.items():
        lw = f"{where}.layers.{name}"
        out[name] = (str(_get(path, e, "type", f"{lw}.type", str)), _ms(path, f"{lw}.ms", _get(path, e, "ms", f"{lw}.ms", (int, float))))
        if "int8" in e:
            _get(path, e, "int8", f"{lw}.int8", bool)
    return model, out


def _float_in_int8(raw: dict) -> frozenset[str]:
    """Layers whose ``int8`` flag says the profiled int8 model ran them in float (checked by :func:`_variant`)."""
    return frozenset(n for r in raw["results"].values() for n, e in r["int8"]["layers"].items() if e.get("int8") is False)


def load_profile(path: str | Path) -> BoardProfile:
    """Read and check the board profile at ``path``.

    Raises:
        ProfileError: unreadable, not JSON, another format or version, or a field missing or of
            the wrong type or value; the message names the file and the field (``results.1.int8.model_ms``).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ProfileError(f"board profile {path}: cannot be read ({e})", argument="profile", value=str(path)) from e
    except ValueError as e:
        raise ProfileError(f"board profile {path}: not JSON ({e})", argument="profile", value=str(path)) from e
    if not isinstance(raw, dict):
        raise _fail(path, "<top>", f"must be a JSON object, got {type(raw).__name__}")
    if _get(path, raw, "format", "format", str) != FORMAT:
        raise _fail(path, "format", f"must be {FORMAT!r} (written by `python -m lightning_ncnnqat.ncnn.targets profile`), "
                                    f"got {raw['format']!r}", raw["format"])  # fmt: skip
    if _get(path, raw, "version", "version", int) != VERSION:
        raise _fail(path, "version", f"must be {VERSION} (this package reads version {VERSION}), got {raw['version']!r}", raw["version"])
    emulated = _get(path, raw, "emulated", "emulated", bool)
    evidence = tuple(str(e) for e in raw.get("emulation_evidence") or ())
    device = _get(path, raw, "device", "device", dict)
    threads = _get(path, raw, "threads", "threads", list)
    if not threads or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in threads):
        raise _fail(path, "threads", f"must be a non-empty list of thread counts > 0, got {threads!r}", threads)
    results = _get(path, raw, "results", "results", dict)
    times: dict[int, dict] = {}
    for n in threads:
        r = _get(path, results, str(n), f"results.{n}", dict)
        times[n] = {}
        for v in VARIANTS:
            if v in r or v != "int8_fp16_blobs":
                times[n][v] = _variant(path, _get(path, r, v, f"results.{n}.{v}", dict), f"results.{n}.{v}")
    runs = raw.get("runs") if isinstance(raw.get("runs"), int) and not isinstance(raw.get("runs"), bool) else 0
    return BoardProfile(path, str(raw.get("label") or ""), emulated, evidence, device, tuple(threads), times,
                        raw.get("models") if isinstance(raw.get("models"), dict) else {}, runs,
                        _float_in_int8({"results": {str(n): results[str(n)] for n in threads}}),
                        raw.get("inputs") if isinstance(raw.get("inputs"), dict) else {})  # fmt: skip


def check_architecture(prof: BoardProfile, float_param_text: str, model: str = "this model",
                       inputs: dict[str, list[int]] | None = None) -> None:
    """Raise :class:`ProfileError` (naming the profile's file and the layers that differ) unless
    ``prof`` timed the layers of the float ncnn model ``float_param_text`` (``model.ncnn.param``):
    the same layer names with the same types. pnnx names layers by their place in the graph, so
    every export of one architecture has the same names; another architecture, another input
    form or another activation (``chain_activations``) differs. A profile without per-layer
    times (``--no-layers``) raises too: no layer can be judged from it. ``inputs`` (blob ->
    shape without the batch dim): where both are known, a profile timed at another input shape
    raises (its times are of another workload)."""
    lines = [ln.split() for ln in float_param_text.splitlines()[2:] if ln.strip()]
    want = {f[1]: f[0] for f in lines if len(f) > 1 and f[0] != "Input"}
    have = {n: t for n, (t, _) in prof.times[prof.threads[0]]["float"][1].items()}
    if not have:
        raise ProfileError(f"board profile {prof.path} has no per-layer times (profiled with --no-layers): profile the "
                           "export again on the board without it", argument="board_profile", value=str(prof.path))  # fmt: skip
    missing = [f"{n} ({t})" for n, t in want.items() if n in have and have[n] != t or n not in have]
    extra = [n for n in have if n not in want]
    if missing or extra:
        raise ProfileError(
            f"board profile {prof.path} timed another architecture than {model}: {len(missing)} of its {len(want)} "
            f"float ncnn layers not in the profile as they are here ({', '.join(missing[:4]) or '-'}), {len(extra)} "
            f"profiled layers not in it ({', '.join(extra[:4]) or '-'}); profile an export of this model (same "
            "architecture, input size and chain_activations) on the board", argument="board_profile", value=str(prof.path),
        )
    timed = {k: [int(d) for d in v] for k, v in prof.inputs.items() if isinstance(v, list)}
    here = {k: [int(d) for d in v] for k, v in (inputs or {}).items()}
    if timed and here and timed != here:
        raise ProfileError(f"board profile {prof.path} timed input shape(s) {timed}, {model} takes {here}: profile an "
                           "export at this input size on the board", argument="board_profile", value=str(prof.path))


def board_profile_argument(value: Any, argument: str = "board_profile") -> str | None:
    """The checked value of a ``board_profile`` setting (``QATConfig`` / ``ExportConfig``): None,
    or the profile's absolute path (so a later working directory does not change it). The file
    is read and checked now, so a wrong one fails when the config is made.

    Raises:
        ConfigTypeError: not a path.
        ConfigError: the file is missing or malformed (the field named), or it was measured under
            emulation (outside :func:`allow_emulated_profiles`): ``argument`` and the value named.
    """
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigTypeError(f"`{argument}` must be the path of a board profile (JSON written by `python -m "
                              f"lightning_ncnnqat.ncnn.targets profile`), got {value!r} ({type(value).__name__})",
                              argument=argument, value=value)  # fmt: skip
    path = Path(os.fspath(value)).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"`{argument}`: no board profile at {str(value)!r} ({path} is not a file)", argument=argument,
                          value=str(value))  # fmt: skip
    try:
        prof = load_profile(path)
    except ProfileError as e:
        raise ConfigError(f"`{argument}`={str(value)!r}: {e}", argument=argument, value=str(value)) from None
    if prof.emulated and not emulated_allowed():
        raise ConfigError(
            f"`{argument}`={str(value)!r} was measured under emulation ({'; '.join(prof.evidence)}): its times are not "
            "the device's speed; run `python -m lightning_ncnnqat.ncnn.targets profile` on the board itself",
            argument=argument, value=str(value),
        )
    return str(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def board_speed_lines(summaries: list[dict]) -> list[str]:
    """DEPLOY.md lines for board profiles (:meth:`BoardProfile.speed_summary` dicts): int8 vs
    float per board and thread count, plainly when int8 does not pay there; emulated ones say
    that their times are not speeds. A row's ``verdict`` (``policy.speed.speed_verdict``, added by
    the export, :mod:`lightning_ncnnqat.export.board_speed`) decides the wording; without one
    (the ``attach`` command, which uses no other room) int8 slower than float is said plainly."""
    out = ["## Speed on boards (measured there with `python -m lightning_ncnnqat.ncnn.targets profile`)", ""]
    for s in summaries:
        if s.get("emulated"):
            out.append(f"- {s['device']}: profiled under emulation; its times are not speeds and are not shown.")
            continue
        for n, r in s.get("threads", {}).items():
            line = (f"- **{s['device']}**, {n} thread(s), ncnn's default options: float {r['float_ms']:.3f} ms, "
                    f"int8 {r['int8_ms']:.3f} ms ({r['speedup']:.2f}x)")
            verdict = r.get("verdict") or ("slower" if r["speedup"] is not None and r["speedup"] < 1.0 else None)
            if verdict == "slower":
                line += "; **int8 does not pay on this board: it is slower than float; deploy model.ncnn.* there**"
            elif verdict == "tie":
                line += "; int8 ties with float on this board: it pays in size only"
            if "int8_fp16_blobs_ms" in r:
                line += (f"; int8 with fp16 blobs (feature mask removed) {r['int8_fp16_blobs_ms']:.3f} ms: the cost of "
                         "float32 blobs on this board")
            out.append(line + ".")
    return out + [""]


_BEGIN, _END = "<!-- board-profiles -->", "<!-- /board-profiles -->"
#: The markers around DEPLOY.md's board section: ``attach`` replaces what is between them.
BOARD_SECTION = (_BEGIN, _END)


def attach_profile(export_dir: str | Path, profile_path: str | Path) -> dict:
    """Add a board profile to an export: copied to ``EXPORT_DIR/profiles/``, its speed summary
    into ``report.json`` (``board_profiles``) and a "Speed on boards" section into ``DEPLOY.md``
    (replacing the section an earlier attach wrote). Returns the summary.

    Raises:
        ProfileError: the profile is malformed (file and field named), or it timed another int8
            model than the export's ``model.int8.param`` (its sha256 differs).
    """
    d = Path(export_dir)
    prof = load_profile(profile_path)
    int8 = d / "model.int8.param"
    want = (prof.models.get("int8") or {}).get("sha256")
    if int8.is_file() and want and want != _sha256(int8):
        raise ProfileError(
            f"board profile {prof.path}: field 'models.int8.sha256' does not match {int8} (the profile timed another int8 "
            "model: profile this export's files on the board)", argument="models.int8.sha256", value=want,
        )
    (d / "profiles").mkdir(exist_ok=True)
    copy = d / "profiles" / Path(profile_path).name
    if copy.resolve() != Path(profile_path).resolve():
        copy.write_bytes(Path(profile_path).read_bytes())
    summaries = []
    for p in sorted((d / "profiles").glob("*.json")):
        try:
            summaries.append(load_profile(p).speed_summary())
        except ProfileError:
            continue  # an unrelated or broken file there: the one asked for was checked above
    report = d / "report.json"
    if report.is_file():
        data = json.loads(report.read_text(encoding="utf-8"))
        data["board_profiles"] = summaries
        report.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    deploy = d / "DEPLOY.md"
    if deploy.is_file():
        text = deploy.read_text(encoding="utf-8")
        if _BEGIN in text and _END in text:
            text = text[: text.index(_BEGIN)] + text[text.index(_END) + len(_END) :].lstrip("\n")
        section = "\n".join([_BEGIN, *board_speed_lines(summaries), _END])
        deploy.write_text(text.rstrip("\n") + "\n\n" + section + "\n", encoding="utf-8")
    return prof.speed_summary()
