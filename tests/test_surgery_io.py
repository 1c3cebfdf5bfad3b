"""Prepare-side I/O signatures: tuple/dict example inputs, non-tensor forward parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import prepare_qat


class TwoIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, img: torch.Tensor, aux: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
        f = torch.cat([F.relu(self.a(img)), F.relu(self.b(aux))], 1)
        return self.fc(F.adaptive_avg_pool2d(f, 1).flatten(1)) / temperature


@pytest.mark.parametrize("as_dict", [False, True])
def test_two_inputs_tuple_or_dict(as_dict: bool) -> None:
    img, aux = torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8)
    m = TwoIn()
    example = {"img": img, "aux": aux} if as_dict else (img, aux)
    plan = prepare_qat(m, example)
    assert set(plan.layers) == {"a", "b", "fc"}
    assert plan.layers["a"].input_owner == "a" and plan.layers["b"].input_owner == "b"  # two input blobs
    m.train()
    m(img, aux)
    assert m.a.input_quantizer.running_absmax.item() > 0 and m.b.input_quantizer.running_absmax.item() > 0


def test_missing_required_parameter_fails_at_prepare_naming_it() -> None:
    m = TwoIn()
    with pytest.raises(TypeError, match=r"parameter 'aux' of TwoIn.forward has no default.*tuple.*dict"):
        prepare_qat(m, torch.randn(1, 3, 8, 8))
    assert not any(type(x).__name__.startswith("QAT") for x in m.modules())  # nothing changed


def test_non_tensor_default_and_supplied_constant_are_fine() -> None:
    img, aux = torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8)
    assert set(prepare_qat(TwoIn(), (img, aux)).layers) == {"a", "b", "fc"}
    assert set(prepare_qat(TwoIn(), (img, aux, 0.5)).layers) == {"a", "b", "fc"}
    with pytest.raises(TypeError, match="got set"):
        prepare_qat(TwoIn(), {img})
