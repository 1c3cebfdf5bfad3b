"""A QAT fit run as its own program, for the DDP tests (Lightning's DDP launchers re-run scripts).

Usage: python tests/ddp_run.py OUT_DIR STRATEGY DEVICES BATCH_SIZE [RESUME_CKPT]
Writes OUT_DIR/rank{r}.pt with every rank's quantizer ranges and weights after fit.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402

from lightning_ncnnqat import QATCallback  # noqa: E402
from lightning_ncnnqat.qat.prepared import input_quantizers
from lit_models import make_data, make_module  # noqa: E402


class Interleaved(torch.utils.data.Sampler):
    """Rank r reads items r, r+W, r+2W...: W ranks with batch B see exactly the global batches
    one process with batch W*B sees (Lightning's own distributed sampler shuffles)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _rank_world(self) -> tuple[int, int]:
        dist = torch.distributed
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self):  # noqa: ANN204
        r, w = self._rank_world()
        return iter(range(r, self.n, w))

    def __len__(self) -> int:
        r, w = self._rank_world()
        return len(range(r, self.n, w))


class Dump(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        state = {
            "ranges": {n: q.running_absmax.detach().cpu().clone() for n, q in input_quantizers(pl_module).items()},
            "params": {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()},
            "world_size": trainer.world_size,
            "log_thresholds": {
                n: q.log_threshold.detach().cpu().clone()
                for n, q in input_quantizers(pl_module).items() if getattr(q, "learned", False)
            },
        }
        torch.save(state, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main() -> None:
    out, strategy, devices, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    resume = sys.argv[5] if len(sys.argv) > 5 else None
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    ds = make_data(n=64)
    model = make_module(L.LightningModule)
    ckpt = L.callbacks.ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_top_k=-1, every_n_epochs=1)
    # QAT from epoch 0 with every BN folded (frozen statistics): per-rank batch statistics would
    # otherwise differ from one process's (SyncBatchNorm needs GPUs), and so would the weights.
    # NCNNQAT_TEST_RANGES="learned": thresholds from an ACIQ start, then trained
    ranges = os.environ.get("NCNNQAT_TEST_RANGES") or "moving_average"
    cb = QATCallback(
        start_epoch=0,
        quantize_grouped_convs=True,
        export_dir=os.environ.get("NCNNQAT_TEST_EXPORT") or None,
        log_every_n_steps=0,
        ranges=ranges,
        range_init="first_batch" if ranges == "moving_average" else "aciq",
        calibration_batches=2,
        range_lr=0.05,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=3,
        callbacks=[cb, ckpt, Dump(out)],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=out,
        deterministic=True,
        use_distributed_sampler=False,
    )
    data = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=Interleaved(len(ds)))
    trainer.fit(model, data, ckpt_path=resume)


if __name__ == "__main__":
    main()
