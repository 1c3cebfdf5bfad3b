"""The held batch: real inputs for the export's parity report, taken from the Trainer's loaders."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..batches import as_call, from_call, inputs_like, map_tensors, positional_names


def held_batch(trainer: Any, pl_module: Any, example: Any, size: int) -> tuple[Any, str]:
    """Real inputs for the parity report, structured like ``example`` (Tensor, tuple or dict):
    from the validation loader, else the training loader; ``(None, "none")`` if neither holds them."""
    args, kwargs = as_call(example)
    names = positional_names(pl_module)
    for source, loaders in (("validation", trainer.val_dataloaders), ("training", trainer.train_dataloader)):
        if loaders is None:
            continue
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if isinstance(loader, dict):
            loader = next(iter(loader.values()))
        chunks: list[tuple[tuple, dict]] = []
        n = 0
        try:
            for batch in loader:
                call = inputs_like(batch, args, kwargs, names)
                if call is None:
                    break
                call = map_tensors(lambda t: t.detach().cpu(), call)
                first = next((t for t in (*call[0], *call[1].values()) if isinstance(t, Tensor)), None)
                if first is None:
                    break
                chunks.append(call)
                n += first.shape[0]
                if n >= size:
                    break
        except TypeError:
            continue
        if chunks:

            cat = lambda vals: torch.cat(vals)[:size] if isinstance(vals[0], Tensor) else vals[0]  # noqa: E731
            held_args = tuple(cat([c[0][i] for c in chunks]) for i in range(len(args)))
            held_kwargs = {key: cat([c[1][key] for c in chunks]) for key in kwargs}
            held = from_call(held_args, held_kwargs)
            count = next(len(t) for t in (*held_args, *held_kwargs.values()) if isinstance(t, Tensor))
            return held, f"first {count} inputs of the {source} dataloader"
    return None, "none"
