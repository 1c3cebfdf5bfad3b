"""One error base: every error the package raises on purpose is an NcnnQatError and names what it is about."""

from __future__ import annotations

import pickle

import pytest

import lightning_ncnnqat as q
from lightning_ncnnqat.cli_inputs import UsageError
from lightning_ncnnqat.errors import ConfigError, ConfigTypeError, NcnnQatError, UnsupportedModelError, config_error
from lightning_ncnnqat.errors import ExportError, LayerError
from lightning_ncnnqat.ncnn.isolated import NcnnRuntimeError
from lightning_ncnnqat.ncnn.bin_layout import NcnnFormatError


@pytest.mark.parametrize(
    "cls, builtin",
    [
        (ConfigError, ValueError),
        (ConfigTypeError, TypeError),
        (UnsupportedModelError, TypeError),
        (LayerError, ValueError),
        (ExportError, RuntimeError),
        (NcnnRuntimeError, RuntimeError),
        (NcnnFormatError, ValueError),
        (UsageError, ValueError),
    ],
)
def test_every_error_type_has_the_one_base_and_its_builtin(cls: type, builtin: type) -> None:
    assert issubclass(cls, NcnnQatError) and issubclass(cls, builtin)


def test_config_error_names_the_argument_and_value_and_survives_pickling() -> None:
    err = config_error("start_epoch", 7, "is not before max_epochs=5")
    assert str(err) == "`start_epoch`=7: is not before max_epochs=5"
    assert (err.argument, err.value, err.has_value) == ("start_epoch", 7, True)
    again = pickle.loads(pickle.dumps(err))  # DDP broadcasts and child processes pickle errors
    assert isinstance(again, ConfigError) and str(again) == str(err)


def test_export_and_layer_errors_carry_the_layer() -> None:
    assert LayerError("conv1", "scale is 0").layer == "conv1"
    e = ExportError("int8", "conv1", "layer 'conv1': scale is 0")
    assert e.layer == "conv1" and e.step == "int8" and "layer 'conv1'" in str(e)
    assert not NcnnQatError("plain").has_value


@pytest.mark.parametrize("kwargs, argument", [({"momentum": 2.0}, "momentum"), ({"ranges": "ema"}, "ranges"),
                                             ({"six_bit_3x3": 1}, "six_bit_3x3")])
def test_bad_settings_raise_the_base_naming_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(NcnnQatError, match=f"`{argument}`"):
        q.QATConfig(**kwargs)
