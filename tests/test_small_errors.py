"""Error messages stay readable: a value formatted into one is summarised, a message is bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lightning_ncnnqat as q
from lightning_ncnnqat.errors import MESSAGE_LIMIT, ConfigError, ExportError, NcnnQatError, bound, config_error, show


def test_a_huge_tensor_value_is_shown_by_shape_and_dtype_not_numbers() -> None:
    value = torch.randn(64, 3, 224, 224)
    err = config_error("example_input", value, "must be a batch of one")
    assert "shape=(64, 3, 224, 224)" in str(err) and "torch.float32" in str(err)
    assert len(str(err)) < 200 and err.value is value  # the value itself is kept whole


def test_a_numpy_array_and_a_small_tensor() -> None:
    assert show(np.zeros((1000, 10), dtype=np.int64)).startswith("ndarray(shape=(1000, 10), dtype=int64")
    assert show(torch.tensor([1.5, 2.0])) == "tensor([1.5000, 2.0000])"  # a few numbers are shown


def test_a_long_list_and_a_dict_are_summarised() -> None:
    long = list(range(100_000))
    text = show(long)
    assert text.startswith("list of 100000: [0, 1, 2") and len(text) < 200
    d = {f"key{i}": torch.randn(100, 100) for i in range(50)}
    text = show(d)
    assert text.startswith("dict of 50 keys ('key0', 'key1'") and len(text) < 200


def test_a_callback_example_input_without_tensors_is_bounded() -> None:
    with pytest.raises(q.errors.ConfigTypeError) as info:
        q.QATCallback(example_input=[0.5] * 50_000)
    assert "`example_input` holds no Tensor: list of 50000: [0.5, 0.5" in str(info.value)
    assert len(str(info.value)) < 300


def test_a_traced_output_dump_inside_an_export_error_keeps_head_and_tail() -> None:
    dump = "Tracer cannot infer type of (" + repr(torch.arange(40_000.0).reshape(200, 200).tolist()) + ")"
    e = ExportError("pnnx", "head", dump, written=["model.onnx"])
    text = str(e)
    assert len(text) <= MESSAGE_LIMIT + 100
    assert text.startswith("export failed at step 'pnnx', layer 'head': Tracer cannot infer type")
    assert text.endswith("(files written before the failure: model.onnx)")
    assert "characters left out" in text
    assert len(e.message) <= MESSAGE_LIMIT + 100 and all(len(m) <= MESSAGE_LIMIT + 100 for _, _, m in e.failures)


def test_bound_is_idempotent_and_short_messages_are_untouched() -> None:
    assert bound("short") == "short"
    once = bound("x" * 50_000)
    assert bound(once) == once and len(once) <= MESSAGE_LIMIT + 100
    err = NcnnQatError("y" * 10_000)
    assert len(str(err)) <= MESSAGE_LIMIT + 100
    assert isinstance(ConfigError("z" * 10_000), NcnnQatError) and len(str(ConfigError("z" * 10_000))) < 2200
