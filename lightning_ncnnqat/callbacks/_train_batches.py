"""Training batches for the calibrated start, read without disturbing the fit loop's own iterator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_ncnnqat.qat.batches import example_from_batch


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)) and loaders:
        return _first_loader(loaders[0])
    if isinstance(loaders, dict) and loaders:
        return _first_loader(next(iter(loaders.values())))
    return loaders


def _side_loader(loader: Any) -> Any:
    """A loader over the same batches that shares no worker or iterator with the fit loop's.

    A DataLoader with ``persistent_workers`` hands every new iterator the same worker pool, so
    iterating the trainer's own loader here would reset the iterator the fit loop is using.
    """
    if not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)


def train_inputs(trainer: Any, pl_module: Any, num_batches: int) -> list[Tensor]:
    """The model inputs of this rank's first ``num_batches`` training batches (fewer if the loader
    has fewer), on the module's device, after the LightningModule's batch hooks
    (``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``),
    taken from each batch as the callback takes its example (:func:`example_from_batch`).

    Raises:
        ValueError: no training dataloader, or a batch holding no single model input.
    """
    inputs: list[Tensor] = []
    for i, batch in enumerate(train_batches(trainer, pl_module, num_batches)):
        call = example_from_batch(batch, pl_module)
        if call is None or len(call[0]) != 1 or call[1]:
            raise ValueError(
                f"QATCallback's calibrated start: training batch {i} ({type(batch).__name__}) does not hold the one "
                "input tensor forward() takes; it needs a model with one input, and a batch that is that tensor, a "
                "tuple/list starting with it, or a dict holding it under forward's parameter name or 'x'/'input'/'image'"
            )
        inputs.append(call[0][0])
    return inputs


def train_batches(trainer: Any, pl_module: Any, num_batches: int) -> Iterator[Any]:
    """The first ``num_batches`` training batches of this rank, on the module's device, after
    the LightningModule's batch hooks, as a training step would see them.

    Raises:
        ValueError: the Trainer has no training dataloader.
    """
    loader = _first_loader(getattr(trainer, "train_dataloader", None))
    if loader is None:
        raise ValueError("QATCallback: the calibrated start needs the training dataloader, and the Trainer has none")
    call_hook = getattr(pl_module, "_call_batch_hook", None)
    transfer = getattr(pl_module, "_apply_batch_transfer_handler", None)
    for i, batch in enumerate(_side_loader(loader)):
        if i >= num_batches:
            break
        if call_hook is not None and transfer is not None:
            batch = call_hook("on_before_batch_transfer", batch, 0)
            batch = transfer(batch)
        plugin = getattr(trainer, "precision_plugin", None)
        yield batch if plugin is None else plugin.convert_input(batch)  # bf16/fp16 under "*-true", as in a step
