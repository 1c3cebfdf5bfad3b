"""``QATConfig(chain_activations=...)``: the activations ncnn chains, swapped at QAT start.

The swap happens in the one QAT start (``prepare_qat`` and ``QATCallback`` alike) and wherever
the plan is applied again (a restored checkpoint); a failed start puts the activations back.
The plan's summary counts the int8 convs that requantize into the next conv before and after,
and that predicted count is what the exported int8 model holds.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import QATConfig, export, prepare_qat, restore_from_checkpoint
from lightning_ncnnqat.errors import ConfigError
from lightning_ncnnqat.qat.activation_swap import CHAIN_TARGETS
from lightning_ncnnqat.qat.config import CHAIN_ACTIVATIONS
from lightning_ncnnqat.speed.chains import NOTE_KEY
from lightning_ncnnqat.speed.plan import count_chains
from test_chains import ChainNet, parity_failures

X1 = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))


class FunctionalSiLU(nn.Module):
    """Two convs with F.silu between them in forward: counted, named, never swapped."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.act(self.c2(F.silu(self.c1(x)))))


def _activations(model: nn.Module) -> list[str]:
    return [type(m).__name__ for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, (nn.SiLU, nn.GELU, nn.Hardswish, nn.ReLU,
                                                                         nn.ReLU6, nn.LeakyReLU))]


@pytest.mark.parametrize("bad", ["swish", "ReLU", None, 1, True])
def test_bad_value_is_refused_naming_argument_and_value(bad) -> None:
    with pytest.raises(ConfigError, match="chain_activations") as e:
        QATConfig(chain_activations=bad)
    assert e.value.argument == "chain_activations" and e.value.value == bad


def test_config_values_are_the_swap_targets() -> None:
    assert set(CHAIN_ACTIVATIONS) == {"off", *CHAIN_TARGETS}
    assert QATConfig().chain_activations == "off"
    assert QATConfig.from_dict(QATConfig(chain_activations="relu6").to_dict()).chain_activations == "relu6"


@pytest.mark.parametrize(
    "acts, value, expected",
    [
        ((nn.SiLU(), nn.SiLU(), nn.GELU()), "relu", ["ReLU"] * 4),
        ((nn.SiLU(), nn.GELU(), nn.Hardswish()), "hardswish", ["Hardswish"] * 4),
        ((nn.Hardswish(), nn.SiLU(), nn.SiLU()), "leaky_relu", ["LeakyReLU"] * 4),
    ],
)
def test_swap_at_start_counts_chains_and_the_export_holds_them(acts, value, expected, tmp_path) -> None:
    torch.manual_seed(0)
    model = ChainNet(*acts).train()
    plan = prepare_qat(model, X1, QATConfig(chain_activations=value))
    assert _activations(model) == expected
    note = plan.notes[NOTE_KEY]
    assert note.startswith("0 -> 2 of 3 int8 convs") or (value == "leaky_relu" and note.startswith("1 -> 2 of 3")), note
    assert f"chain_activations={value!r}" in note and NOTE_KEY in plan.summary()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16))
    model.eval()
    held = torch.randn(8, 3, 16, 16)
    report = export(model, tmp_path, held[:1], held, verbose=False, timing_runs=0, layer_check_samples=1,
                    targets=["x86"], check_onnx=False)
    chains = count_chains((tmp_path / "model.int8.param").read_text())
    assert (chains.requantized, chains.breakers) == (2, {}), chains  # what the note predicted
    assert report.ok and parity_failures(report) == []


def test_off_names_the_breakers_and_changes_nothing() -> None:
    model = ChainNet(nn.SiLU(), nn.GELU(), nn.SiLU())
    plan = prepare_qat(model, X1)
    assert _activations(model) == ["SiLU", "GELU", "SiLU", "SiLU"]
    note = plan.notes[NOTE_KEY]
    assert note.startswith("0 of 3 int8 convs") and "GELU x1" in note and "SiLU x1" in note, note


def test_functional_activation_is_counted_not_swapped(tmp_path) -> None:
    model = FunctionalSiLU()
    plan = prepare_qat(model, X1, QATConfig(chain_activations="relu"))
    note = plan.notes[NOTE_KEY]
    # c2 -> GELU (a module: swapped) -> c3 chains; c1 -> F.silu -> c2 cannot
    assert note.startswith("0 -> 1 of 3") and "still broken by SiLU x1" in note and "F.silu x1" in note, note
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 16, 16))
    export(model.eval(), tmp_path, X1, verbose=False, timing_runs=0, layer_check_samples=1, targets=["x86"],
           check_onnx=False)
    assert count_chains((tmp_path / "model.int8.param").read_text()).requantized == 1


def test_failed_start_puts_the_activations_back() -> None:
    model = nn.Sequential(nn.SiLU(), nn.Flatten(), nn.GELU())  # nothing ncnn runs in int8: the start fails
    with pytest.raises(ValueError, match="no layer ncnn can run in int8"):
        prepare_qat(model, X1, QATConfig(chain_activations="relu"))
    assert _activations(model) == ["SiLU", "GELU"]


def test_restored_checkpoint_runs_the_swapped_activations() -> None:
    torch.manual_seed(1)
    model = ChainNet(nn.SiLU(), nn.SiLU(), nn.GELU())
    prepare_qat(model, X1, QATConfig(chain_activations="relu6"))
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 16, 16))
    state = model.state_dict()
    fresh = ChainNet(nn.SiLU(), nn.SiLU(), nn.GELU())
    restore_from_checkpoint(fresh, state)
    assert _activations(fresh) == ["ReLU6"] * 4
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_callback_swaps_at_its_start_epoch() -> None:
    """QATCallback(config=QATConfig(chain_activations=...)): epoch 0 trains the SiLU model, QAT
    starts at epoch 1 with the swap, and the plan's note counts the chains."""
    from lightning_ncnnqat import QATCallback
    from lightning_ncnnqat.qat.plan import get_plan
    from lit_models import NetLit, loader, make_data, quiet_trainer

    seen: dict[int, list[str]] = {}

    class Spy(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            seen[trainer.current_epoch] = _activations(pl_module)

    torch.manual_seed(0)
    lit = NetLit(ChainNet(nn.SiLU(), nn.SiLU(), nn.GELU()), example=X1)
    cb = QATCallback(start_epoch=1, config=QATConfig(chain_activations="hardswish"), export=False, log_every_n_steps=0,
                     verbose=False)
    ds = make_data(32)
    quiet_trainer(max_epochs=2, callbacks=[cb, Spy()], limit_val_batches=0).fit(lit, loader(ds), loader(ds))
    assert seen == {0: ["SiLU", "SiLU", "SiLU", "GELU"], 1: ["Hardswish"] * 4}
    assert get_plan(lit).notes[NOTE_KEY].startswith("0 -> 2 of 3 int8 convs")


class SplitNet(nn.Module):
    """c1's output goes to two convs (pnnx: a Split) and to a shape-only ``new_full`` (folded to a
    constant by pnnx): it still chains. c2 -> SiLU -> c4 does not until swapped."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.c4, self.c5, self.act = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        scale = y.new_full((1, 8, 1, 1), 0.5)
        return self.c4(self.act(self.c2(y))) + self.c5(self.c3(y) * scale)


@pytest.mark.parametrize("value, before, after", [("off", 1, None), ("relu6", 1, 2)])
def test_predicted_count_is_the_exported_one(value: str, before: int, after: int | None, tmp_path) -> None:
    torch.manual_seed(4)
    model = SplitNet()
    plan = prepare_qat(model, X1, QATConfig(chain_activations=value))
    note = plan.notes[NOTE_KEY]
    want = after if after is not None else before
    assert note.startswith(f"{before} of 5" if after is None else f"{before} -> {after} of 5"), note
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 16, 16))
    export(model.eval(), tmp_path, X1, verbose=False, timing_runs=0, layer_check_samples=1, targets=["x86"],
           check_onnx=False)
    assert count_chains((tmp_path / "model.int8.param").read_text()).requantized == want


def test_unprepare_puts_the_activations_back_and_replan_swaps_again() -> None:
    from lightning_ncnnqat import unprepare

    model = ChainNet(nn.SiLU(), nn.GELU(), nn.SiLU())
    plan = prepare_qat(model, X1, QATConfig(chain_activations="relu"))
    assert _activations(model) == ["ReLU"] * 4
    unprepare(model)
    assert _activations(model) == ["SiLU", "GELU", "SiLU", "SiLU"]
    from lightning_ncnnqat.qat.prepare import apply_plan

    apply_plan(model, plan)  # what a restored checkpoint or an averaged copy does
    assert _activations(model) == ["ReLU"] * 4
