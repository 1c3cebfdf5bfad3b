"""The one rule for how a model is called and where its inputs sit in a batch (callback and export)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ncnnqat.qat.batches import (
    as_call,
    check_call,
    example_from_batch,
    from_call,
    inputs_like,
    model_input,
    positional_names,
)


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


def test_as_call_follows_lightning_convention() -> None:
    x, a = torch.randn(1, 3), torch.randn(1, 2)
    args, kwargs = as_call(x)
    assert args[0] is x and kwargs == {}
    assert as_call((x, a))[0] == (x, a) and as_call([x, a])[0] == (x, a)
    args, kwargs = as_call({"img": x, "aux": a})
    assert args == () and kwargs["img"] is x and kwargs["aux"] is a
    with pytest.raises(TypeError, match="got int"):
        as_call(3)
    with pytest.raises(TypeError, match="str keys"):
        as_call({0: x})
    assert from_call((x,), {}) is x and from_call((x, a), {}) == (x, a)
    assert from_call((), {"img": x})["img"] is x


def test_inputs_like_multi_input_batches() -> None:
    img, aux, y = torch.randn(4, 3, 8, 8), torch.randn(4, 1, 8, 8), torch.arange(4)
    ex = (img[:1], aux[:1])
    args, kwargs = inputs_like((img, aux, y), ex, {})
    assert args[0] is img and args[1] is aux and kwargs == {}
    # trailing shapes must match the example's
    assert inputs_like((img, y, aux), ex, {}) is None
    assert inputs_like((img,), ex, {}) is None
    assert inputs_like(img, ex, {}) is None
    # a dict batch, read under forward's parameter names
    got = inputs_like({"aux": aux, "img": img, "label": y}, ex, {}, names=["img", "aux"])
    assert got is not None and got[0][0] is img and got[0][1] is aux
    assert inputs_like({"aux": aux, "img": img}, ex, {}) is None  # no names: the order is unknown
    # keyword inputs: those keys of a dict batch
    got = inputs_like({"img": img, "aux": aux, "y": y}, (), {"img": img[:1], "aux": aux[:1]})
    assert got is not None and got[0] == () and got[1]["img"] is img and got[1]["aux"] is aux
    assert inputs_like({"img": img}, (), {"img": img[:1], "aux": aux[:1]}) is None
    # a non-tensor value of the example is a constant of the call, kept
    got = inputs_like((img, aux), (img[:1], 0.5), {})
    assert got is not None and got[0][1] == 0.5
    # one positional tensor: model_input's rule, unchanged
    got = inputs_like({"label": y, "image": img}, (img[:1],), {})
    assert got is not None and got[0][0] is img


class _TwoIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 2, 1)

    def forward(self, img: torch.Tensor, aux: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.c(img) + aux / temperature


def test_check_call_names_the_missing_parameter() -> None:
    m = _TwoIn()
    x, a = torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)
    check_call(m, (x, a), {})
    check_call(m, (), {"img": x, "aux": a})
    with pytest.raises(TypeError, match=r"parameter 'aux' of _TwoIn.forward has no default.*tuple"):
        check_call(m, (x,), {})
    with pytest.raises(TypeError, match=r"cannot be called"):
        check_call(m, (x, a), {"bogus": 1})
    assert positional_names(m) == ["img", "aux", "temperature"]


def test_example_from_batch_uses_forward_arity() -> None:
    img, aux, y = torch.randn(4, 3, 8, 8), torch.randn(4, 2, 8, 8), torch.arange(4)
    args, _ = example_from_batch((img, aux, y), _TwoIn())
    assert len(args) == 2 and args[1] is aux
    args, _ = example_from_batch({"aux": aux, "img": img}, _TwoIn())
    assert args[0] is img and args[1] is aux
    assert example_from_batch((img,), _TwoIn()) is None
    args, _ = example_from_batch((img, y), nn.Conv2d(3, 2, 1))  # one input: model_input's rule
    assert args == (img,)
