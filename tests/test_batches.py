"""The one rule for finding the model input in a batch (used by the callback and the export)."""

from __future__ import annotations

import importlib

import pytest
import torch

from lightning_ncnnqat.batches import model_input


def test_model_input_rules() -> None:
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    assert model_input(x) is x
    assert model_input((x, y)) is x
    assert model_input([x, y]) is x
    assert model_input(["path", x]) is None  # the input must come first
    assert model_input(()) is None
    assert model_input({"label": y, "image": x}) is x  # a known key wins over order
    assert model_input({"label": y, "pixels": x}) is y  # else the first tensor value
    assert model_input({"name": "a"}) is None
    assert model_input(3) is None


def test_export_names_the_argument_when_no_input_is_found() -> None:
    api = importlib.import_module("lightning_ncnnqat.export.api")
    assert api._first_tensor({"image": torch.ones(1)}, "held_batch").shape == (1,)
    with pytest.raises(TypeError, match=r"`held_batch` must be a tensor.*keys x, input.*got dict"):
        api._first_tensor({"name": "a"}, "held_batch")
