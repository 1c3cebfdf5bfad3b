"""Whether a forward is activation checkpointing's recompute, so state updates run once per step.

``torch.utils.checkpoint.checkpoint`` (both forms) and ``checkpoint_sequential`` run the
checkpointed function a second time during backward, in training mode (torch 2.13,
``torch/utils/checkpoint.py``: the reentrant ``CheckpointFunction.backward`` calls it inside the
autograd Function's backward; the non-reentrant form calls ``recompute_fn`` from the saved-tensor
unpack hook, which autograd runs when a node needs the tensor). Both run inside a graph task of
autograd's engine, where ``torch._C._current_graph_task_id()`` is not -1 (thread-local, so a
backward on a device thread counts too). An ordinary forward never runs there. What a QAT
forward updates in place (moving-average input ranges and their all-reduce, a learned range's
first initialisation, folded BatchNorm statistics under ``freeze_bn_after``) is therefore
updated only when :func:`recomputing` is False: the recompute then reads the state the
original forward left, so it reproduces that forward's values exactly (the non-reentrant
checkpoint checks the recomputed tensors' metadata against them) and the run's numbers equal
those of the same run without checkpointing. (Torch's own ``_BatchNorm`` updates its running
statistics twice under checkpointing; a folded BatchNorm does not.)
"""

from __future__ import annotations

import torch


def recomputing() -> bool:
    """True while autograd's backward runs this forward (a checkpoint's recompute).

    False under ``torch.compile`` tracing (checked first, so dynamo never sees the engine query):
    a compiled graph's recompute is AOTAutograd's, and does not run the module's Python forward.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1
