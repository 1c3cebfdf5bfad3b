"""Work that global rank 0 does alone (the export preflight), without deadlocking the other ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from lightning_ncnnqat.qat.plan import get_plan
from lightning_ncnnqat.qat.prepared import input_quantizers


@contextlib.contextmanager
def ranges_unsynced(pl_module: Any) -> Iterator[None]:
    """Turn off the ranges' DDP all-reduce while rank 0 alone runs the export (or its preflight).

    The export fills ranges no training step set with one forward on a copy of the model; a
    collective there would wait forever for the other ranks. The flag is copied with the model.
    """
    qs = list(input_quantizers(pl_module).values()) if get_plan(pl_module) is not None else []
    flags = [q.sync for q in qs]
    for q in qs:
        q.sync = False
    try:
        yield
    finally:
        for q, flag in zip(qs, flags):
            q.sync = flag


def on_rank_zero(trainer: Any, what: str, fn: Callable[[], None]) -> None:
    """Run ``fn`` on global rank 0; if it raises, every rank raises (none waits in a collective)."""
    error: BaseException | None = None
    if trainer.is_global_zero:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below on every rank (none may wait in a collective)
            error = exc
    if trainer.world_size > 1:
        msg = None if error is None else f"{type(error).__name__}: {error}"
        msg = trainer.strategy.broadcast(msg, src=0)
        if error is None and msg is not None:
            raise RuntimeError(f"QATCallback: the {what} failed on global rank 0: {msg}")
    if error is not None:
        raise error


def rank_zero_once(trainer: Any, pl_module: Any) -> Callable[[str, Callable[[], Any]], Any]:
    """The QAT start's ``run_once``: ``fn`` on global rank 0 alone (ranges not all-reduced), its
    result broadcast so every rank starts from the same thresholds and plan."""

    def run_once(what: str, fn: Callable[[], Any]) -> Any:
        box: dict[str, Any] = {}

        def run() -> None:
            with ranges_unsynced(pl_module):
                box["result"] = fn()

        on_rank_zero(trainer, what, run)
        result = box.get("result")
        return trainer.strategy.broadcast(result, src=0) if trainer.world_size > 1 else result

    return run_once
