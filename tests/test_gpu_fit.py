"""A QAT fit on a CUDA GPU with mixed precision (skipped without a GPU)."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from lightning_ncnnqat import QATCallback
from lightning_ncnnqat.ops import STATUS
from lightning_ncnnqat.qat.prepared import input_quantizers
from lit_models import LitMixed, loader, make_data

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_qat_fit_on_gpu_mixed_precision(tmp_path, precision: str) -> None:  # noqa: ANN001
    class RangeDevice(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            if cb.active:
                self.devices = {q.running_absmax.device.type for q in input_quantizers(pl_module).values()}

    ds = make_data()
    model = LitMixed()
    cb = QATCallback(start_epoch=1, export_dir=None)
    spy = RangeDevice()
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_epochs=3, callbacks=[cb, spy],
        enable_progress_bar=False, logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(model, loader(ds), loader(ds))
    assert spy.devices == {"cuda"}  # ranges lived on the GPU during training (teardown moves to CPU)
    assert all(q.running_absmax.item() > 0 for q in input_quantizers(model).values())
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    # the same frozen QAT model on CPU computes (nearly) the same outputs: the fake-quant ops are
    # bit-exact across devices; only the convolutions' float accumulation order differs
    x = ds.tensors[0][:16]
    model.eval()
    with torch.no_grad():
        gpu = model.cuda()(x.cuda()).float().cpu()
        cpu = model.cpu()(x)
    assert torch.nn.functional.cosine_similarity(gpu.flatten(), cpu.flatten(), dim=0) > 0.999
    assert STATUS.cuda, "the compiled CUDA kernels should be loaded on a GPU machine"
