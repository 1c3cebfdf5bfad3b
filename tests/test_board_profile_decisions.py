"""A board profile given to QAT and to the export (issue 20, items 3 and 6).

``QATConfig(board_profile=)``: at QAT start the board's per-layer int8 vs float times decide which
int8 layers stay float (named in the summary with the board's figures); a profile of another
architecture or input size is an error naming the file; a missing or malformed one a ConfigError
when the config is made. ``ExportConfig(board_profile=)``: the board's figures, judged, in
report.json, the summary and DEPLOY.md.

The profiles here are WRITTEN with constructed layer times for the decision logic (the layer
names and types are those of a real export of the same model; the times are chosen so a given
layer loses): they test the mechanics, and no figure here is a speed. The emulated-ARM test runs
the real profile command under the emulated Cortex-A53 (``allow_emulated_profiles``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ncnnqat import ExportConfig, QATConfig, export, prepare_qat
from lightning_ncnnqat.errors import ConfigError, ConfigTypeError, ExportError, NcnnQatError
from lightning_ncnnqat.ncnn.targets import SETUP_COMMAND, board_profile, environment_problem, worker_command
from lightning_ncnnqat.ncnn.targets.profile import ProfileError, allow_emulated_profiles
from lightning_ncnnqat.qat.plan import get_plan

_problem = environment_problem()
if _problem is not None and os.environ.get("LIGHTNING_NCNNQAT_REQUIRE_ARM") == "1":
    raise RuntimeError(f"LIGHTNING_NCNNQAT_REQUIRE_ARM=1 but {_problem}")
needs_arm = pytest.mark.skipif(_problem is not None, reason=f"{_problem}; run `{SETUP_COMMAND}`")


def _plain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 5))  # fmt: skip


def _mobile() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                         nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))  # fmt: skip


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        y = torch.relu(self.b(y)) + y
        return self.fc(y.mean((2, 3)))


#: name -> (builder, input shape, the torch layer the constructed profile makes lose on the board)
MODELS = {"plain": (_plain, (3, 8, 8), "2"), "mobile": (_mobile, (3, 16, 16), "2"),
          "residual": (_Residual, (1, 16, 16), "fc")}  # fmt: skip


def _trained(name: str, config: QATConfig | None = None, shape: tuple[int, ...] | None = None, **kw) -> tuple[nn.Module, torch.Tensor]:
    make, default, _ = MODELS[name]
    torch.manual_seed(0)
    model = make().train()
    x = torch.randn(8, *(shape or default))
    prepare_qat(model, x[:1], config, **kw)
    with torch.no_grad():
        model(x)
    return model.eval(), x


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """One x86 export of each model: the layer names and types a board profile of it holds."""
    out = {}
    for name in MODELS:
        model, x = _trained(name)
        d = tmp_path_factory.mktemp(f"board_{name}")
        export(model, d, x[:1], x, verbose=False, timing_runs=0, layer_check_samples=1, targets="x86", check_onnx=False)
        out[name] = d
    return out


def _ncnn_name(d: Path, torch_name: str) -> str:
    (name,) = [r["ncnn_name"] for r in json.loads((d / "report.json").read_text())["layers"] if r["torch_name"] == torch_name]
    return name


def write_profile(d: Path, out: Path, losers: dict[str, float] = {}, *, label: str = "RK3588 (A76 cores)",
                  float_in_int8: tuple[str, ...] = (), int8_gain: float = 2.0, emulated: bool = False) -> Path:
    """A profile of export ``d`` with CONSTRUCTED times: every layer 1 ms in float; in the int8
    model an int8 layer ``1 / int8_gain`` ms, a layer of ``losers`` (ncnn name -> int8 ms) that,
    other layers 1 ms. ``float_in_int8``: layers the profiled int8 model ran in float."""
    ftext, qtext = (d / "model.ncnn.param").read_text(), (d / "model.int8.param").read_text()
    runs_int8 = board_profile.int8_layers(qtext)
    fl = {n: {"type": t, "ms": 1.0} for t, n, _, _ in board_profile.layer_lines(ftext) if t != "Input"}
    ql = {}
    for t, n, _, _ in board_profile.layer_lines(qtext):
        if t == "Input":
            continue
        is_int8 = runs_int8.get(n, False) and n not in float_in_int8
        ql[n] = {"type": t, "ms": losers.get(n, 1.0 / int8_gain if is_int8 else 1.0)}
        if n in runs_int8:
            ql[n]["int8"] = is_int8
    io = json.loads((d / "report.json").read_text())["io"]
    prof = {
        "format": board_profile.FORMAT, "version": board_profile.VERSION, "label": label, "emulated": emulated,
        "emulation_evidence": ["environment variable QEMU_CPU is set"] if emulated else [],
        "device": {"machine": "aarch64", "cpu_parts": ["0xd0b"], "cpu_count": 8, "ncnn_version": "1.0.20261020"},
        "runs": 15, "warmup": 3, "threads": [1], "inputs": {i["blob"]: i["shape"] for i in io["inputs"]},
        "models": {"int8": {"file": "model.int8.param", "sha256": hashlib.sha256(qtext.encode()).hexdigest()}},
        "results": {"1": {"float": {"model_ms": sum(e["ms"] for e in fl.values()), "layers": fl},
                          "int8": {"model_ms": sum(e["ms"] for e in ql.values()), "layers": ql}}},
    }  # fmt: skip
    out.write_text(json.dumps(prof))
    return out


# ---- config time: a missing, malformed or emulated profile is a ConfigError naming the argument


@pytest.mark.parametrize("make", [QATConfig, ExportConfig], ids=["QATConfig", "ExportConfig"])
@pytest.mark.parametrize("content, match", [
    (None, "no board profile at"), ("{oops", "not JSON"), ('{"format": "x"}', "field 'format'"),
    ('{"format": "lightning_ncnnqat.board_profile", "version": 1}', "field 'emulated' is missing"),
])  # fmt: skip
def test_missing_or_malformed_profile_fails_when_the_config_is_made(tmp_path: Path, make, content, match) -> None:
    f = tmp_path / "board.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError, match=match) as e:
        make(board_profile=str(f))
    assert e.value.argument == "board_profile" and e.value.value == str(f) and "board_profile" in str(e.value)


@pytest.mark.parametrize("make", [QATConfig, ExportConfig], ids=["QATConfig", "ExportConfig"])
def test_emulated_profile_is_refused_outside_tests_and_a_path_is_required(exports, tmp_path: Path, make) -> None:
    f = write_profile(exports["plain"], tmp_path / "qemu.json", emulated=True)
    with pytest.raises(ConfigError, match="emulation.*not the device's speed"):
        make(board_profile=f)
    with allow_emulated_profiles():
        assert make(board_profile=f).board_profile == str(f.resolve())
    with pytest.raises(ConfigTypeError, match="path of a board profile"):
        make(board_profile=3)


def test_a_checkpoints_config_keeps_the_path_without_reading_it(exports, tmp_path: Path) -> None:
    f = write_profile(exports["plain"], tmp_path / "b.json")
    cfg = QATConfig(board_profile=os.path.relpath(f))
    assert cfg.board_profile == str(f.resolve())  # absolute: a later working directory changes nothing
    d = cfg.to_dict()
    f.unlink()
    assert QATConfig.from_dict(d).board_profile == str(f.resolve())  # where the checkpoint loads, no file


# ---- QAT start: the board decides


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_layer_that_loses_on_the_board_is_kept_float_with_its_figures(exports, tmp_path: Path, capsys, name) -> None:
    d = exports[name]
    loser = MODELS[name][2]
    f = write_profile(d, tmp_path / "rk.json", {_ncnn_name(d, loser): 3.0})  # int8 3x slower than float there
    model, _ = _trained(name, QATConfig(board_profile=str(f)), verbose=True)
    plan = get_plan(model)
    assert list(plan.float_layers) == [loser], plan.float_layers
    reason = plan.float_layers[loser]
    assert "RK3588 (A76 cores)" in reason and str(f) in reason and "int8 3.0000 ms vs float 1.0000 ms, 0.33x" in reason
    assert "not confirmed as a whole model" in reason
    out = capsys.readouterr().out
    assert f"kept float for the board ({loser})" in out and "NOT confirmed as a whole model" in out
    assert "RK3588 (A76 cores), CPU parts 0xd0b, 8 cores" in out and "1 thread(s)" in out
    assert "int8 does NOT pay" not in out  # the others gain 2x there
    assert "(speed on the board)" in plan.summary()


@pytest.mark.parametrize("name", ["plain", "residual"])
def test_prefer_int8_and_size_keep_every_layer_int8(exports, tmp_path: Path, capsys, name) -> None:
    d = exports[name]
    loser = MODELS[name][2]
    f = write_profile(d, tmp_path / "rk.json", {_ncnn_name(d, loser): 3.0})
    with pytest.warns(UserWarning, match=r"int8 does NOT pay on the board"):  # 3 ms lost, as profiled
        model, _ = _trained(name, QATConfig(board_profile=str(f), prefer="int8"), verbose=True)
    assert not get_plan(model).float_layers
    assert f"1 lose alone on the board: {loser}" in capsys.readouterr().out
    model, _ = _trained(name, QATConfig(board_profile=str(f), prefer="size"), verbose=True)
    assert not get_plan(model).float_layers
    assert "the board profile decides nothing" in capsys.readouterr().out


def test_a_board_where_int8_does_not_pay_says_so(exports, tmp_path: Path) -> None:
    """Every int8 layer slower on the board: all but the best stay float, and the warning says
    plainly that int8 does not pay there (the estimate stays slower than float)."""
    d = exports["mobile"]
    names = [r["ncnn_name"] for r in json.loads((d / "report.json").read_text())["layers"]]
    f = write_profile(d, tmp_path / "slow.json", {n: 1.5 + 0.1 * i for i, n in enumerate(names)})
    with pytest.warns(UserWarning, match=r"int8 does NOT pay on the board \(RK3588"):
        model, _ = _trained("mobile", QATConfig(board_profile=str(f)))
    plan = get_plan(model)
    assert len(plan.layers) == 1 and len(plan.float_layers) == len(names) - 1


def test_a_layer_the_profiled_model_ran_float_stays_float(exports, tmp_path: Path) -> None:
    d = exports["plain"]
    f = write_profile(d, tmp_path / "rk.json", float_in_int8=(_ncnn_name(d, "0"),))
    model, _ = _trained("plain", QATConfig(board_profile=str(f)))
    plan = get_plan(model)
    assert list(plan.float_layers) == ["0"] and "no int8 time there" in plan.float_layers["0"]


@pytest.mark.parametrize("profiled, qat, shape, match", [
    ("plain", "residual", None, "another architecture"),
    ("mobile", "plain", None, "another architecture"),
    ("residual", "residual", (1, 8, 8), r"timed input shape\(s\)"),
])  # fmt: skip
def test_a_profile_of_another_architecture_is_an_error_at_qat_start(exports, tmp_path, profiled, qat, shape, match) -> None:
    f = write_profile(exports[profiled], tmp_path / "other.json")
    make = MODELS[qat][0]
    torch.manual_seed(0)
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, *(shape or MODELS[qat][1]))
    with pytest.raises(ProfileError, match=match) as e:
        prepare_qat(model, x[:1], QATConfig(board_profile=str(f)))
    assert str(f) in str(e.value) and isinstance(e.value, NcnnQatError)
    assert get_plan(model) is None and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_board_decides_and_x86_only_reports(exports, tmp_path: Path, capsys) -> None:
    d = exports["residual"]
    f = write_profile(d, tmp_path / "rk.json", {_ncnn_name(d, "a"): 2.5})
    model, _ = _trained("residual", QATConfig(board_profile=str(f)), targets=["x86"], verbose=True)
    assert list(get_plan(model).float_layers) == ["a"]
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "REPORTED ONLY (the board profile decides)" in ln)
    assert line.startswith("int8 speed on x86") and "int8 as planned for the board" in line
    assert out.index("kept float for the board (a)") < out.index(line)


# ---- export: the board's figures in report.json, the summary and DEPLOY.md


@pytest.mark.parametrize("name, gain, verdict", [("plain", 2.0, "faster"), ("mobile", 0.5, "slower"),
                                                 ("residual", 1.0, "tie")])  # fmt: skip
def test_export_carries_the_board_speed_judged(exports, tmp_path: Path, name, gain, verdict) -> None:
    f = write_profile(exports[name], tmp_path / "rk.json", int8_gain=gain)
    model, x = _trained(name)
    out = tmp_path / "e"
    rep = export(model, out, x[:1], x, verbose=False, timing_runs=0, layer_check_samples=1, targets="x86",
                 check_onnx=False, board_profile=str(f))  # fmt: skip
    (board,) = json.loads((out / "report.json").read_text())["board_profiles"]
    row = board["threads"]["1"]
    assert row["verdict"] == verdict and row["speedup"] == pytest.approx(row["float_ms"] / row["int8_ms"])
    assert board["same_int8_model"] is True and (out / "profiles" / "rk.json").is_file()
    deploy = (out / "DEPLOY.md").read_text()
    line = next(ln for ln in deploy.splitlines() if "RK3588" in ln)
    assert f"({row['speedup']:.2f}x)" in line
    assert ("int8 does not pay on this board" in line) == (verdict == "slower")
    text = rep.summary()
    if verdict == "slower":
        assert any("int8 does NOT pay on the board RK3588" in w for w in rep.warnings), rep.warnings
        assert any(f"QATConfig(board_profile={str(f)!r})" in n for n in rep.notes), rep.notes
    else:
        assert "the board RK3588" in text and not any("RK3588" in w for w in rep.warnings)


def test_export_with_a_profile_of_another_export_or_architecture(exports, tmp_path: Path) -> None:
    f = write_profile(exports["plain"], tmp_path / "rk.json")
    model, x = _trained("plain", QATConfig(skip=("0",)))  # same architecture, another int8 model
    rep = export(model, tmp_path / "e", x[:1], x, verbose=False, timing_runs=0, layer_check_samples=1, targets="x86",
                 check_onnx=False, board_profile=str(f))  # fmt: skip
    assert rep.board_profiles[0]["same_int8_model"] is False
    assert any("timed another int8 model of this architecture" in n for n in rep.notes)
    other, xo = _trained("residual")
    with pytest.raises(ExportError, match="another architecture") as e:
        export(other, tmp_path / "o", xo[:1], xo, verbose=False, timing_runs=0, layer_check_samples=1, targets="x86",
               check_onnx=False, board_profile=str(f))  # fmt: skip
    assert e.value.step == "board_profile" and str(f) in str(e.value)
    assert (tmp_path / "o" / "model.int8.param").is_file() and (tmp_path / "o" / "report.json").is_file()


# ---- the real profile command under the emulated Cortex-A53: the names match (mechanics only)


@needs_arm
def test_an_emulated_profile_feeds_the_qat_start_in_tests_only(exports, tmp_path: Path, capsys) -> None:
    script = tmp_path / "board_profile.py"
    shutil.copy(board_profile.__file__, script)
    argv, env = worker_command("arm64-a53")
    out = tmp_path / "a53.json"
    proc = subprocess.run([*argv, str(script), str(exports["mobile"]), "-o", str(out), "--runs", "1", "--warmup", "0",
                           "--threads", "1"], env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pytest.raises(ConfigError, match="emulation"):
        QATConfig(board_profile=str(out))
    with allow_emulated_profiles(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*does NOT pay")  # no speed verdict from emulated times
        model, _ = _trained("mobile", QATConfig(board_profile=str(out), prefer="int8"), verbose=True)
    text = capsys.readouterr().out
    assert "EMULATED board profile" in text and "(EMULATED)" in text
    board_lines = [ln for ln in text.splitlines() if "on the board" in ln or "speed on the board" in ln]
    assert board_lines and not any(" ms" in ln or "does NOT pay" in ln for ln in board_lines), board_lines
    assert not get_plan(model).float_layers  # prefer="int8": every layer timed there, none moved
    with allow_emulated_profiles():
        model, x = _trained("mobile")
        rep = export(model, tmp_path / "e", x[:1], x, verbose=False, timing_runs=0, layer_check_samples=1,
                     targets="x86", check_onnx=False, board_profile=str(out))  # fmt: skip
    (board,) = rep.board_profiles
    assert board["emulated"] and "threads" not in board  # no emulated time reaches the report
    assert any("measured under emulation" in n for n in rep.notes) and not any("a53" in w.lower() for w in rep.warnings)
    deploy = (tmp_path / "e" / "DEPLOY.md").read_text()
    section = deploy[deploy.index("<!-- board-profiles -->"):deploy.index("<!-- /board-profiles -->")]
    assert "emulation" in section and " ms" not in section


# ---- the export command's flag


def test_the_export_command_takes_board_profile(exports, tmp_path: Path, capsys) -> None:
    from lightning_ncnnqat.__main__ import _parser, main
    from lightning_ncnnqat.cli_inputs import export_config_from_flags

    f = write_profile(exports["plain"], tmp_path / "rk.json")
    base = ["export", "none.ckpt", "--model", "m:M", "--export-dir", str(tmp_path / "o")]
    assert export_config_from_flags(_parser().parse_args([*base, "--board-profile", str(f)])).board_profile == str(f)
    assert export_config_from_flags(_parser().parse_args([*base, "--board-profile", "none"])).board_profile is None
    for bad in (str(tmp_path / "absent.json"), str(exports["plain"] / "report.json")):
        rc = main([*base, "--board-profile", bad])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: --board-profile") and bad in err and err.count("\n") == 0, err


def test_qat_callback_decides_for_the_board_and_its_export_reports_it(exports, tmp_path: Path) -> None:
    """QATCallback (the other entry to the one QAT start): the board's loser is float in the
    callback's plan; the export at fit end carries the board's figures and says that the profile
    timed the model before that decision (another int8 model of this architecture)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ncnnqat import QATCallback
    from lit_models import NetLit

    d = exports["mobile"]
    f = write_profile(d, tmp_path / "rk.json", {_ncnn_name(d, "2"): 3.0})
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    lit = NetLit(_mobile(), example=x[:1])
    data = DataLoader(TensorDataset(x, torch.randint(0, 4, (8,))), batch_size=4)
    cb = QATCallback(start_epoch=0, config=QATConfig(board_profile=str(f)), verbose=False,
                     export=ExportConfig(dir=str(tmp_path / "export"), targets=["x86"], timing_runs=0, preflight=False,
                                         layer_check_samples=1, check_onnx=False, board_profile=str(f)))  # fmt: skip
    trainer = L.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1)  # fmt: skip
    trainer.fit(lit, data, data)
    assert list(cb.plan.float_layers) == ["net.2"] and "RK3588" in cb.plan.float_layers["net.2"]
    (board,) = json.loads((tmp_path / "export" / "report.json").read_text())["board_profiles"]
    assert board["same_int8_model"] is False and board["threads"]["1"]["verdict"] == "slower"
    assert "int8 does not pay on this board" in (tmp_path / "export" / "DEPLOY.md").read_text()


def test_the_profile_command_records_which_layers_ran_int8(tmp_path: Path) -> None:
    """The real profile command (here, on this machine: the mechanics) on an export with layer
    "0" kept float: its int8 flags say so, the reader knows it, and a QAT start from that profile
    keeps "0" float (no int8 time for it there) while the other layers are judged by their times."""
    from lightning_ncnnqat.ncnn.targets.profile import load_profile

    model, x = _trained("plain", QATConfig(skip=("0",)))
    d = tmp_path / "e"
    export(model, d, x[:1], x, verbose=False, timing_runs=0, layer_check_samples=1, targets="x86", check_onnx=False)
    prof = board_profile.profile([str(d)], [], 1, 0, [1], True, "this machine")
    flags = {n: e.get("int8") for n, e in prof["results"]["1"]["int8"]["layers"].items()}
    first = next(n for n in flags if n.startswith("conv"))
    assert flags[first] is False and sum(v is True for v in flags.values()) == 2, flags  # conv 2 and the Linear
    f = tmp_path / "here.json"
    f.write_text(json.dumps(prof))
    assert load_profile(f).float_in_int8 == {first}
    model, _ = _trained("plain", QATConfig(board_profile=str(f)))
    reason = get_plan(model).float_layers["0"]
    assert "no int8 time there" in reason and "this machine" in reason
