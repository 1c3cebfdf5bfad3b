"""The callback's own work leaves the user's random streams where they were.

Checking the held batch at fit start, calibrating and running the export preflight at QAT start
iterate the user's DataLoaders, and every new DataLoader iterator draws its base seed from
torch's global generator (``torch.utils.data.dataloader._BaseDataLoaderIter``): without this, the
callback would change the order of the user's shuffled batches and their augmentations in the
epochs after it ran, so a run with QAT would not be the run the user validated up to
``start_epoch`` (and a seed that trained fine could diverge).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def user_rng_untouched() -> Iterator[None]:
    """Run the block, then restore Python's, numpy's and torch's global generators (CPU, and the
    current CUDA device where CUDA is in use) to their states before it."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
