"""A 2-process DDP fit whose export preflight fails on rank 0 (run as its own program).

Usage: python tests/surgery_ddp_run.py OUT_DIR dir|model
``dir``: export_dir cannot be created (fails in setup); ``model``: the model cannot be exported
(fails at QAT start). Each rank writes OUT_DIR/rank{r}.txt with the error it raised.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402

from lightning_ncnnqat import QATCallback  # noqa: E402
from lit_models import loader, make_data, make_module  # noqa: E402
from test_surgery_preflight import Lit  # noqa: E402


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode == "dir":
        blocker = os.path.join(out, "a_file")
        if not os.path.exists(blocker):
            with open(blocker, "w") as f:
                f.write("not a directory")
        model, export_dir = make_module(L.LightningModule), os.path.join(blocker, "export")
    else:
        model, export_dir = Lit(), os.path.join(out, "export")
    cb = QATCallback(start_epoch=1, export_dir=export_dir, verbose=False, log_every_n_steps=0)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb],
                        enable_progress_bar=False, enable_model_summary=False, logger=False,
                        enable_checkpointing=False, default_root_dir=out)
    try:
        trainer.fit(model, loader(make_data(32)))
        msg = "no error"
    except Exception as exc:  # noqa: BLE001
        msg = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out, f"rank{trainer.global_rank}.txt"), "w") as f:
        f.write(msg)


if __name__ == "__main__":
    main()
