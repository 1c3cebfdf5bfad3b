"""The held batch: real inputs for the export's parity report, taken from the Trainer's loaders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_ncnnqat.qat.batches import Call, as_call, from_call, inputs_like, map_tensors, positional_names


Probe = Callable[[Any], Optional[str]]
"""Feeds a held-batch candidate (example form, a few samples) to the model: None, or why it failed."""


def _kind(t: Tensor) -> str:
    if t.is_floating_point() or t.is_complex():
        return "floating"
    return "bool" if t.dtype == torch.bool else "integer"


def misfit(call: Call, args: tuple, kwargs: dict[str, Any]) -> Optional[str]:
    """Why the batch inputs ``call`` cannot stand for the example call ``(args, kwargs)``, or None.

    Each tensor must have the example's shape but for dim 0 (the export traces and compares at
    that shape: ``export.model_io.held_inputs``) and its kind of dtype (floating vs integer:
    token ids are not images)."""
    pairs = list(zip(call[0], args)) + [(call[1].get(k), v) for k, v in kwargs.items()]
    for got, ex in pairs:
        if not isinstance(ex, Tensor):
            continue
        if not isinstance(got, Tensor):
            return f"holds {type(got).__name__} where the example input holds a tensor"
        if got.shape[1:] != ex.shape[1:] or got.dim() != ex.dim() or _kind(got) != _kind(ex):
            return (f"holds a {got.dtype} tensor of shape {list(got.shape)} where the example input is "
                    f"{ex.dtype} {list(ex.shape)}")
    return None


def model_probe(trainer: Any, pl_module: Any, samples: int = 2) -> Probe:
    """A :data:`Probe` running the module in eval mode, without gradients, on the first
    ``samples`` inputs of a candidate (cast as the precision plugin casts batches); the
    modules' train flags are restored and no state moves (eval BN, eval quantizers)."""
    plugin = getattr(trainer, "precision_plugin", None)

    def probe(candidate: Any) -> Optional[str]:
        a, k = map_tensors(lambda t: t[:samples].to(pl_module.device), as_call(candidate))
        if plugin is not None:
            a, k = plugin.convert_input(a), plugin.convert_input(k)
        modes = {m: m.training for m in pl_module.modules()}
        try:
            pl_module.eval()
            with torch.no_grad():
                pl_module(*a, **k)
        except Exception as exc:  # noqa: BLE001  (any failure means: not this source)
            return f"the model's forward fails on it: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        finally:
            for m, flag in modes.items():
                m.training = flag
        return None

    return probe


def held_batch(
    trainer: Any, pl_module: Any, example: Any, size: int,
    probe: Optional[Probe] = None, rejected: Optional[dict[str, str]] = None,
) -> tuple[Any, str]:
    """Real inputs for the parity report, structured like ``example`` (Tensor, tuple or dict):
    from the validation loader, else the training loader; ``(None, "none")`` if neither holds them.

    A source whose inputs do not fit the example (:func:`misfit`: a GAN's noise input vs its
    validation images) or that ``probe`` rejects is skipped; ``rejected`` collects
    ``{source: why}``."""
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
                why = misfit(call, args, kwargs)
                if why is None and probe is not None and not chunks:
                    why = probe(from_call(*call))
                if why is not None:
                    if rejected is not None:
                        rejected[source] = why
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


def check_held_batch(trainer: Any, pl_module: Any, example: Any, size: int) -> Optional[str]:
    """When fit or QAT starts: find the held batch the export will compare on, feeding a few of
    its inputs to the model (:func:`model_probe`). Returns a one-line warning when no loader holds
    inputs the model takes (the parity report then compares on the example input alone), naming
    each source and why; None when a held batch fits."""
    rejected: dict[str, str] = {}
    held, _ = held_batch(trainer, pl_module, example, min(size, 2), model_probe(trainer, pl_module), rejected)
    if held is not None or not rejected:
        return None
    why = "; ".join(f"the {src} batches' inputs {w}" for src, w in rejected.items())
    return (f"QATCallback: no dataloader holds inputs the model takes ({why}); the export's parity report will "
            "compare on the example input alone (weak evidence; an `example_input=` of many real samples "
            "gives it more)")
