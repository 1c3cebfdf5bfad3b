"""Chain-breaking activations recognised by what they compute, not by class name (issue 20 item 4).

yolov5's own ``SiLU`` module (``x * torch.sigmoid(x)``), an ``nn.SiLU`` subclass, a Swish with
``beta`` = 1 and a tanh-form GELU module are swapped like ``nn.SiLU`` / ``nn.GELU``; modules that
compute something else are left alone; SiLU / GELU computed inline in a bigger forward are named
with their source line, not changed; with ``chain_activations="off"`` the plan's note names the
breakers and the option. The exported int8 model's ``Swish`` layers go down accordingly.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import QATConfig, export, prepare_qat
from lightning_ncnnqat.qat.activation_kinds import activation_kind, functional_forms
from lightning_ncnnqat.qat.activation_swap import swap_activations
from lightning_ncnnqat.qat.graph import trace_dataflow
from lightning_ncnnqat.speed.chains import NOTE_KEY
from lightning_ncnnqat.speed.plan import count_chains

X1 = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))


class Yolo5SiLU(nn.Module):  # ultralytics/yolov5 utils/activations.py
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Yolo5Hardswish(nn.Module):  # yolov5's export-friendly form
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * F.hardtanh(x + 3, 0.0, 6.0) / 6.0


class MySiLU(nn.SiLU):
    pass


class Swish(nn.Module):
    """x * sigmoid(beta * x) with a learnable beta: SiLU only where beta is 1."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(beta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


class GeluTanh(nn.Module):  # BERT / GPT-2 style
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Mish(nn.Module):  # x * tanh(softplus(x)): not GELU, pnnx folds F.mish
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tanh(F.softplus(x))


class Scale(nn.Module):  # x * w: elementwise, parameter-light, but no activation
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


@pytest.mark.parametrize(
    ("act", "kind"),
    [(MySiLU(), "SiLU"), (Yolo5SiLU(), "SiLU"), (Swish(1.0), "SiLU"), (GeluTanh(), "GELU"),
     (Yolo5Hardswish(), "Hardswish"), (nn.GELU(approximate="tanh"), "GELU")],
)
def test_modules_are_swapped_by_what_they_compute(act: nn.Module, kind: str) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), act, nn.Conv2d(4, 4, 1))
    assert activation_kind(act) == kind
    act.train()
    rep = swap_activations(m, example_input=X1)
    assert rep.swapped == {"1": (type(act).__name__, "ReLU")} and type(m[1]) is nn.ReLU
    assert act.training  # the probe restored the module's mode
    assert "(1)" in rep.summary() and rep.functional == {} and rep.kept == {}
    rep.restore()
    assert m[1] is act


@pytest.mark.parametrize("act", [Swish(1.5), Mish(), Scale(), nn.Conv2d(4, 4, 1), nn.Identity()])
def test_modules_computing_something_else_are_left(act: nn.Module) -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 1), act, nn.Conv2d(4, 4, 1))
    rep = swap_activations(m, example_input=X1)
    assert activation_kind(act) is None
    assert rep.swapped == {} and rep.kept == {} and m[1] is act


def test_breaker_without_target_is_named_kept() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 1), Yolo5SiLU(), nn.Conv2d(4, 4, 1), nn.GELU(), nn.Conv2d(4, 4, 1), MySiLU())
    rep = swap_activations(m, {nn.GELU: nn.ReLU6})
    assert rep.swapped == {"3": ("GELU", "ReLU6")}
    assert rep.kept == {"1": "SiLU", "5": "SiLU"} and "1 (SiLU), 5 (SiLU)" in rep.summary()


class Inline(nn.Module):
    """Activations computed in the forward itself: named (with their line), never swapped."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(3 if i == 0 else 8, 8, 1) for i in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        x = x * torch.sigmoid(x)  # SILU-LINE
        x = self.c2(x)
        x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))  # GELU-LINE
        x = self.c3(x)
        x = x * torch.tanh(F.softplus(x))  # Mish: chained by pnnx's F.mish fold, not named
        y = self.c4(x)
        return y * y + x.sigmoid()  # a square and a sigmoid of another tensor: no activation


def _line(marker: str) -> str:
    src, start = inspect.getsourcelines(Inline.forward)
    return f"test_swap_forms.py:{start + next(i for i, s in enumerate(src) if marker in s)} in forward"


def test_inline_forms_are_named_with_their_line() -> None:
    m = Inline()
    rep = swap_activations(m, example_input=X1)
    assert rep.swapped == {}
    assert rep.functional == {"x * sigmoid(x)": 1, "x * (1 + erf(...)) / 2": 1}
    assert rep.where == {"x * sigmoid(x)": [_line("SILU-LINE")], "x * (1 + erf(...)) / 2": [_line("GELU-LINE")]}
    assert _line("SILU-LINE") in rep.summary()
    kinds = [(f.kind, f.form) for f in functional_forms(trace_dataflow(m, X1))]
    assert kinds == [("SiLU", "x * sigmoid(x)"), ("GELU", "x * (1 + erf(...)) / 2")]


class SigmoidChild(nn.Module):
    """x * self.sig(x) with an nn.Sigmoid child: not a leaf, so named as an inline form."""

    def __init__(self) -> None:
        super().__init__()
        self.sig = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sig(x)


def test_form_through_a_sigmoid_module_is_named() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 1), SigmoidChild(), nn.Conv2d(4, 4, 1), nn.Sigmoid(), nn.Conv2d(4, 4, 1))
    rep = swap_activations(m, example_input=X1)
    assert rep.swapped == {} and rep.functional == {"x * sigmoid(x)": 1}, rep.functional
    assert rep.where["x * sigmoid(x)"][0].startswith("test_swap_forms.py:")


class PoolNet(nn.Module):
    """Breakers that sit between a conv and a pooling (no int8 conv after them), plus an inline SiLU."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.c1, self.act, self.c2 = nn.Conv2d(3, 8, 3, padding=1), act, nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.act(self.c1(x)), 2)
        x = self.c2(x)
        x = x * torch.sigmoid(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("act", [Yolo5SiLU(), MySiLU(), GeluTanh()])
def test_off_note_names_breakers_and_the_option(act: nn.Module) -> None:
    plan = prepare_qat(PoolNet(act), X1)
    note = plan.notes[NOTE_KEY]
    kind = activation_kind(act)
    assert f"{kind} x1 break chains" in note and "chain_activations=" in note, note
    assert "x * sigmoid(x) [SiLU] x1 at test_swap_forms.py:" in note, note


class SwishZoo(nn.Module):
    """Conv chain with four SiLU-computing modules, a tanh GELU module and one inline x * sigmoid(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3 if i % 2 else 1, padding=i % 2) for i in range(7))
        self.acts = nn.ModuleList([nn.SiLU(), MySiLU(), Yolo5SiLU(), Swish(1.0), GeluTanh()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x))
        x = self.convs[5](x)
        x = x * torch.sigmoid(x)
        return self.convs[6](x)


def _kinds(param_text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in param_text.splitlines()[2:]:
        if line.strip():
            out[line.split()[0]] = out.get(line.split()[0], 0) + 1
    return out


@pytest.mark.parametrize("value", ["off", "relu"])
def test_export_swish_layers_follow_the_swap(value: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = SwishZoo().train()
    plan = prepare_qat(model, X1, QATConfig(chain_activations=value))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    model.eval()
    held = torch.randn(8, 3, 16, 16)
    report = export(model, tmp_path, held[:1], held, verbose=False, timing_runs=0, layer_check_samples=1,
                    targets=["x86"], check_onnx=False)
    text = (tmp_path / "model.int8.param").read_text()
    kinds, chains = _kinds(text), count_chains(text)
    note = plan.notes[NOTE_KEY]
    assert "x * sigmoid(x) [SiLU] x1" in note, note
    if value == "off":
        assert (kinds.get("Swish"), kinds.get("GELU"), chains.requantized) == (5, 1, 0), (kinds, chains)
        assert "SiLU x" in note and "chain_activations=" in note, note
    else:
        assert kinds.get("Swish", 0) == 1 and "GELU" not in kinds, kinds  # only the inline form is left
        assert note.startswith("0 -> 5 of 7"), note
        assert chains.requantized == 5, chains
    assert report.ok, report.failures
