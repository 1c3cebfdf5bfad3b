"""ExportConfig and QATCallback's settings: one object for the callback, ``export()`` and the
export command, validated once; every nested field reachable from LightningCLI YAML; the
callback's keyword arguments of release 0.1 forwarded with a DeprecationWarning."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_ncnnqat import ConfigError, ExportConfig, QATCallback, QATConfig, export
from lightning_ncnnqat.__main__ import _parser, main
from lightning_ncnnqat.cli_inputs import EXPORT_FLAGS, export_config_from_flags, flag_of
from lightning_ncnnqat.errors import ConfigTypeError, NcnnQatError
from lit_models import LitMixed

# a valid value other than the default for each field (a field added later is set to its default)
QAT_VALUES: dict[str, Any] = {
    "momentum": 0.25, "six_bit_3x3": False, "skip": ["net.fc", "head.*"], "quantize_grouped_convs": False,
    "sync_ranges": False, "range_init": "kl", "calibration_batches": 3, "ranges": "learned", "range_lr": 0.01,
    "freeze_bn_after": 2, "prefer": "int8", "chain_activations": "relu",
}
EXPORT_VALUES: dict[str, Any] = {
    "dir": "runs/e", "targets": ["x86", "arm64-a53"], "float_weights": "fp16",
    "preprocessing": {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.1], "input_range": 255.0, "channel_order": "BGR"},
    "held_batch_size": 8, "preflight": False, "layer_check_samples": 2, "timing_runs": 0, "timing_threads": None,
    "check_onnx": False, "opset": 13, "target_time_limit_s": 60.0,
}


def _yaml_values(cls: type, chosen: dict[str, Any]) -> dict[str, Any]:
    """``chosen`` for the fields it names, the default of any other field of ``cls``."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in chosen:
            out[f.name] = chosen[f.name]
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out[f.name] = list(default) if isinstance(default, tuple) else default
    return out


def _cli(args: list[str]) -> LightningCLI:
    return LightningCLI(
        LitMixed, run=False, args=args, save_config_callback=None,
        trainer_defaults={"logger": False, "enable_progress_bar": False, "enable_model_summary": False},
    )


def _callback(cli: LightningCLI) -> QATCallback:
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, QATCallback)]
    return cb


# ---- LightningCLI reaches every field


def test_yaml_reaches_every_nested_field(tmp_path: Path) -> None:
    qat, exp = _yaml_values(QATConfig, QAT_VALUES), _yaml_values(ExportConfig, EXPORT_VALUES)
    cfg = {"trainer": {"callbacks": [{"class_path": "lightning_ncnnqat.QATCallback", "init_args": {
        "start_epoch": 1, "config": qat, "export": exp, "log_every_n_steps": 7, "verbose": False}}]}}
    path = tmp_path / "qat.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = _cli(["--config", str(path)])
    cb = _callback(cli)
    assert cb.config == QATConfig(**qat) and cb.config.skip == ("net.fc", "head.*")
    assert cb.export_config == ExportConfig(**exp)
    assert cb.export_config.preprocessing.channel_order == "BGR" and cb.export_config.targets == ("x86", "arm64-a53")
    assert (cb.start_epoch, cb.log_every_n_steps, cb.verbose) == (1, 7, False)
    # what SaveConfigCallback writes parses back to the same settings
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(cli.parser.dump(cli.config, skip_none=False))
    again = _callback(_cli(["--config", str(dumped)]))
    assert again.config == cb.config and again.export_config == cb.export_config


def test_dotted_flags_and_export_switch(tmp_path: Path) -> None:
    cb = _callback(_cli([
        "--trainer.callbacks+=lightning_ncnnqat.QATCallback", "--trainer.callbacks.start_epoch=2",
        "--trainer.callbacks.config.range_init=aciq", "--trainer.callbacks.export.targets=[x86]",
        "--trainer.callbacks.export.float_weights=fp16",
    ]))
    assert cb.config == QATConfig(range_init="aciq")
    assert cb.export_config == ExportConfig(targets=("x86",), float_weights="fp16")
    cfg = {"trainer": {"callbacks": [{"class_path": "lightning_ncnnqat.QATCallback",
                                      "init_args": {"start_epoch": 0, "export": False}}]}}
    (tmp_path / "off.yaml").write_text(yaml.safe_dump(cfg))
    off = _callback(_cli(["--config", str(tmp_path / "off.yaml")]))
    assert off.export_config is None and off.export_dir is None and not off.preflight


def test_a_bad_yaml_value_names_the_field(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    cfg = {"trainer": {"callbacks": [{"class_path": "lightning_ncnnqat.QATCallback",
                                      "init_args": {"export": {"targets": ["riscv"]}}}]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises((SystemExit, ValueError)) as e:  # raised when jsonargparse makes the ExportConfig
        _cli(["--config", str(tmp_path / "bad.yaml")])
    assert "`targets` has unknown target(s) ['riscv']" in str(e.value) + capsys.readouterr().err


# ---- keyword arguments of release 0.1

OLD = [  # (old keyword, a non-default value, where it lives now)
    *[(k, QAT_VALUES[k], "config") for k in (
        "momentum", "six_bit_3x3", "skip", "quantize_grouped_convs", "sync_ranges", "range_init",
        "calibration_batches", "ranges", "range_lr", "freeze_bn_after")],
    ("export_dir", "out/e", "export.dir"), ("held_batch_size", 8, "export"), ("preflight", False, "export"),
    ("targets", ["x86"], "export"), ("preprocessing", EXPORT_VALUES["preprocessing"], "export"),
    ("float_weights", "fp16", "export"),
]


@pytest.mark.parametrize("old, value, place", OLD, ids=[o[0] for o in OLD])
def test_old_keyword_forwards_and_warns(old: str, value: Any, place: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = QATCallback(start_epoch=1, **{old: value})
    (w,) = caught
    field = "dir" if old == "export_dir" else old
    new = f"config=QATConfig({field}=...)" if place == "config" else f"export=ExportConfig({field}=...)"
    assert issubclass(w.category, DeprecationWarning) and str(w.message) == (
        f"QATCallback({old}=...) is deprecated: use {new}")
    assert w.filename == __file__  # points at the caller's line
    if place == "config":
        assert cb.config == QATConfig(**{field: value}) and cb.export_config == ExportConfig()
    else:
        assert cb.export_config == ExportConfig(**{field: value}) and cb.config == QATConfig()


def test_old_export_dir_none_turns_export_off() -> None:
    with pytest.warns(DeprecationWarning, match=r"QATCallback\(export_dir=\.\.\.\) is deprecated: use export=None"):
        cb = QATCallback(export_dir=None, targets=["x86"])
    assert cb.export_config is None


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"config": QATConfig(momentum=0.2), "momentum": 0.3}, "momentum"),
        ({"config": QATConfig(skip=("a",)), "skip": ["b"]}, "skip"),
        ({"export": ExportConfig(dir="a"), "export_dir": "b"}, "export_dir"),
        ({"export": ExportConfig(targets="x86"), "targets": ["x86", "arm64-a76"]}, "targets"),
        ({"export": False, "export_dir": "b"}, "export_dir"),
        ({"export": ExportConfig(), "export_dir": None}, "export_dir"),
        ({"export": {"float_weights": "fp16"}, "float_weights": "fp32"}, "float_weights"),
    ],
)
def test_old_beside_new_with_another_value_raises(kwargs: dict[str, Any], argument: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ConfigError, match=rf"`{argument}`=.* conflicts with `(config|export)"):
            QATCallback(**kwargs)
        # the same value given both ways is no conflict
        cb = QATCallback(config=QATConfig(momentum=0.2), momentum=0.2, export=ExportConfig(dir="a"), export_dir="a")
    assert cb.config.momentum == 0.2 and cb.export_dir == "a"


def test_signature_is_as_small_as_lightnings_callbacks() -> None:
    import inspect

    params = inspect.signature(QATCallback).parameters
    named = [p for p in params.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert len(named) <= 11, list(params)  # EarlyStopping takes 11, ModelCheckpoint 15
    with pytest.raises(ConfigTypeError, match=r"unexpected keyword argument 'expot_dir'"):
        QATCallback(expot_dir="x")


# ---- one validation, named the same everywhere

BAD = [  # (field, bad value, text of the message)
    ("dir", 3, "`dir` must be a path, got 3"),
    ("targets", ["riscv"], "unknown target(s) ['riscv']"),
    ("targets", 5, "`targets` must be 'auto' or a list"),
    ("float_weights", "bf16", "`float_weights` must be one of ('fp32', 'fp16'), not 'bf16'"),
    ("preprocessing", {"mean": [0.5], "std": [0.0], "channel_order": "GRAY"}, "`preprocessing`: Preprocessing: `std[0]`"),
    ("held_batch_size", 0, "`held_batch_size` must be an int >= 1, got 0"),
    ("preflight", "yes", "`preflight` must be a bool, got 'yes'"),
    ("layer_check_samples", 0, "`layer_check_samples` must be an int >= 1, got 0"),
    ("timing_runs", -1, "`timing_runs` must be an int >= 0, got -1"),
    ("timing_threads", 0, "`timing_threads` must be an int >= 1 or None, got 0"),
    ("check_onnx", 1, "`check_onnx` must be a bool, got 1"),
    ("opset", 2.5, "`opset` must be an int >= 7, got 2.5"),
    ("target_time_limit_s", -5, "`target_time_limit_s` must be a number of seconds > 0 or None, got -5"),
]


@pytest.mark.parametrize("field, value, text", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_a_bad_value_names_the_field_wherever_it_is_given(field: str, value: Any, text: str) -> None:
    makers = [
        lambda: ExportConfig(**{field: value}),
        lambda: QATCallback(export={field: value}),
        lambda: export(torch.nn.Linear(2, 2), example_input=torch.randn(1, 2), **{field: value}),
    ]
    if field in ("held_batch_size", "preflight", "targets", "preprocessing", "float_weights"):  # 0.1's keywords
        makers.append(lambda: QATCallback(**{field: value}))
    for make in makers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with pytest.raises(NcnnQatError) as e:
                make()
        assert text in str(e.value), str(e.value)
        assert e.value.argument == field and e.value.has_value and e.value.value == value


@pytest.mark.parametrize("field, value, text", [b for b in BAD if b[0] not in ("dir", "preflight", "check_onnx")],
                         ids=[f"{b[0]}" for b in BAD if b[0] not in ("dir", "preflight", "check_onnx")])
def test_the_command_names_the_flag(field: str, value: Any, text: str, capsys) -> None:  # noqa: ANN001
    if field == "float_weights":
        with pytest.raises(SystemExit):  # argparse's choices name the flag
            main(["export", "none.ckpt", "--model", "m:M", "--export-dir", "o", flag_of(field), str(value)])
        assert "--float-weights" in capsys.readouterr().err
        return
    shown = ",".join(value) if isinstance(value, list) else str(value)
    if field == "preprocessing":
        import json

        shown = json.dumps(value)
    rc = main(["export", "none.ckpt", "--model", "m:M", "--export-dir", "o", flag_of(field), shown])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"error: {flag_of(field)}") and err.count("\n") == 0, err
    assert "none.ckpt" not in err  # the settings are checked before the checkpoint is read


def test_export_rejects_an_unknown_setting() -> None:
    with pytest.raises(ConfigTypeError, match=r"export\(\) got unexpected setting\(s\) \['timing_run'\]"):
        export(torch.nn.Linear(2, 2), "unused", example_input=torch.randn(1, 2), timing_run=0)


def test_flags_make_the_same_config_as_python(tmp_path: Path) -> None:
    cfg = ExportConfig(**{**EXPORT_VALUES, "dir": str(tmp_path / "x"), "preflight": True})
    argv = ["export", "c.ckpt", "--model", "m:M"]
    for field in EXPORT_FLAGS:
        value = getattr(cfg, field)
        if field == "check_onnx":
            argv.append("--check-onnx" if value else "--no-check-onnx")
        elif field == "preprocessing":
            import json

            argv += [flag_of(field), json.dumps(value.to_dict())]
        else:
            argv += [flag_of(field), ",".join(value) if isinstance(value, tuple) else str(value)]
    assert export_config_from_flags(_parser().parse_args(argv)) == cfg
    # every field but the callback's preflight is a flag
    assert set(EXPORT_FLAGS) == set(ExportConfig.field_names()) - {"preflight"}
