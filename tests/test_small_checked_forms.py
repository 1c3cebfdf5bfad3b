"""qat/checked_forms.py: a rewritten forward is kept only where it computes the module's values,
training flags come back, and the instance attributes go on exit (also on error)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_ncnnqat.qat.checked_forms import checked_form, probe_output, seeded_probe

MARK = "_test_form"


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)  # differs between train and eval: the probe must run in eval

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.lin(x)) * 2.0


def _same_math(m: nn.Module, x: Tensor) -> Tensor:
    return m.lin(x) + m.lin(x)  # = lin(x) * 2 up to rounding, in eval


def _other_math(m: nn.Module, x: Tensor) -> Tensor:
    return m.lin(x) * 3.0


def _raises(m: nn.Module, x: Tensor) -> Tensor:
    raise RuntimeError("this form does not apply")


def _probe(m: nn.Module) -> Tensor | None:
    return probe_output(m, seeded_probe(3, 4))


def test_a_form_with_the_same_values_is_kept_for_the_block_only() -> None:
    torch.manual_seed(0)
    m = Scale().train()
    with checked_form(m, _same_math, MARK, "sum form", _probe) as same:
        assert same and m.__dict__[MARK] == "sum form"
        assert all(mod.training for mod in m.modules())  # flags restored after probing in eval
        twin = copy.deepcopy(m)  # the export's copies get a forward bound to the copy
        assert twin.forward.__self__ is twin
        m.eval()
        x = torch.randn(2, 4)
        assert torch.allclose(m(x), twin.eval()(x))
    assert "forward" not in m.__dict__ and MARK not in m.__dict__


@pytest.mark.parametrize("form", [_other_math, _raises])
def test_a_form_with_other_values_or_an_error_is_refused(form) -> None:  # noqa: ANN001
    m = Scale().eval()
    x = torch.randn(2, 4)
    before = m(x)
    with checked_form(m, form, MARK, "wrong", _probe) as same:
        assert not same and "forward" not in m.__dict__ and MARK not in m.__dict__
        assert torch.equal(m(x), before)


def test_inner_forms_are_undone_with_a_refused_outer_form() -> None:
    m = Scale()
    inner_m = m.lin
    entered: list[str] = []

    @contextlib.contextmanager
    def mark_inner():  # noqa: ANN202
        inner_m.__dict__[MARK] = "inner"
        entered.append("in")
        try:
            yield
        finally:
            inner_m.__dict__.pop(MARK, None)
            entered.append("out")

    with checked_form(m, _other_math, MARK, "outer", _probe, lambda stack: stack.enter_context(mark_inner())) as same:
        assert not same and MARK not in inner_m.__dict__ and entered == ["in", "out"]


def test_attributes_go_when_the_block_raises_and_an_existing_forward_is_left_alone() -> None:
    m = Scale()
    with pytest.raises(ValueError):
        with checked_form(m, _same_math, MARK, "sum form", _probe) as same:
            assert same
            raise ValueError("user code failed inside the block")
    assert "forward" not in m.__dict__ and MARK not in m.__dict__
    m.__dict__["forward"] = lambda x: x  # someone else's rewrite
    with checked_form(m, _same_math, MARK, "sum form", _probe) as same:
        assert not same and MARK not in m.__dict__
