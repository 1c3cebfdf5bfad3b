"""The callback with multi-input models: first-batch example, dict inputs, the held batch for parity."""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_ncnnqat import QATCallback
from lightning_ncnnqat.callbacks._held import held_batch
from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepared import input_quantizers


class Pairs(Dataset):
    """(img, aux, label) samples, or dicts of them."""

    def __init__(self, n: int = 32, as_dict: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.img = torch.randn(n, 3, 16, 16, generator=g)
        self.aux = torch.randn(n, 1, 16, 16, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.as_dict = as_dict

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):  # noqa: ANN204
        if self.as_dict:
            return {"label": self.y[i], "aux": self.aux[i], "img": self.img[i]}
        return self.img[i], self.aux[i], self.y[i]


class TwoInLit(L.LightningModule):
    def __init__(self, example: object = None) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(16, 4)
        self.example_input_array = example

    def forward(self, img: torch.Tensor, aux: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        f = torch.cat([F.relu(self.a(img)), F.relu(self.b(aux))], 1)
        return self.fc(F.adaptive_avg_pool2d(f, 1).flatten(1)) / temperature

    def _inputs(self, batch):  # noqa: ANN001, ANN202
        if isinstance(batch, dict):
            return batch["img"], batch["aux"], batch["label"]
        return batch

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        img, aux, y = self._inputs(batch)
        return F.cross_entropy(self(img, aux), y)

    def validation_step(self, batch, batch_idx) -> None:  # noqa: ANN001
        img, aux, y = self._inputs(batch)
        self.log("val_loss", F.cross_entropy(self(img, aux), y))

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, cb: QATCallback) -> L.Trainer:  # noqa: ANN001
    return L.Trainer(max_epochs=2, callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
                     logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)


def test_two_inputs_from_the_first_batch_and_exported_with_a_two_input_held_batch(tmp_path) -> None:  # noqa: ANN001
    cb = QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), verbose=False, held_batch_size=20,
                     preflight=False)
    model = TwoInLit()  # no example_input_array: traced on the first batch, two inputs (forward's arity)
    data = DataLoader(Pairs(), batch_size=8)
    _trainer(tmp_path, cb).fit(model, data, DataLoader(Pairs(), batch_size=8))
    assert set(get_plan(model).layers) == {"a", "b", "fc"}
    assert all(q.running_absmax.item() > 0 for q in input_quantizers(model).values())
    img, aux = cb._traced_example
    assert img.shape == (1, 3, 16, 16) and aux.shape == (1, 1, 16, 16)
    held, source = held_batch(model.trainer, model, cb._traced_example, 20)
    assert isinstance(held, tuple) and held[0].shape == (20, 3, 16, 16) and held[1].shape == (20, 1, 16, 16)
    assert torch.equal(held[1], Pairs().aux[:20]) and "validation" in source
    assert cb.export_report is not None and cb.export_report.ok
    assert (tmp_path / "export" / "model.int8.param").is_file()


def test_dict_example_and_dict_batches(tmp_path) -> None:  # noqa: ANN001
    example = {"img": torch.randn(2, 3, 16, 16), "aux": torch.randn(2, 1, 16, 16)}
    cb = QATCallback(start_epoch=0, export_dir=None, verbose=False)
    model = TwoInLit(example)
    data = DataLoader(Pairs(as_dict=True), batch_size=8)
    _trainer(tmp_path, cb).fit(model, data, data)
    assert set(get_plan(model).layers) == {"a", "b", "fc"}
    held, _ = held_batch(model.trainer, model, example, 64)
    assert set(held) == {"img", "aux"} and torch.equal(held["img"], Pairs().img)
