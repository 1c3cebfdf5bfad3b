"""How a model is called, and which tensors of a batch are its inputs: one rule for everything.

The callback (tracing, the held batch for parity), ``prepare_qat`` and the export all use it.
An example input follows Lightning's ``example_input_array`` convention: a Tensor is the one
positional input, a tuple/list holds the positional inputs (``model(*x)``), a dict the keyword
inputs (``model(**x)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

INPUT_KEYS = ("x", "input", "inputs", "image", "images")
"""Keys tried, in order, for a dict batch before its first tensor value."""

Call = tuple[tuple[Any, ...], dict[str, Any]]


def model_input(batch: Any) -> Tensor | None:
    """The model input of a batch, or None if it holds no tensor where one is looked for.

    A tensor is its own input; a list or tuple gives its first element (``(x, y)`` batches) if
    that is a tensor; a dict gives the value of the first of :data:`INPUT_KEYS` it has, else its
    first tensor value.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)):
        return batch[0] if batch and isinstance(batch[0], Tensor) else None
    if isinstance(batch, dict):
        for k in INPUT_KEYS:
            if isinstance(batch.get(k), Tensor):
                return batch[k]
        return next((v for v in batch.values() if isinstance(v, Tensor)), None)
    return None


def as_call(example: Any) -> Call:
    """``(args, kwargs)`` of the call ``model(*args, **kwargs)`` an example input stands for.

    Tensor -> ``((x,), {})``; tuple/list -> ``(tuple(x), {})``; dict -> ``((), dict(x))``.
    Raises TypeError naming the type for anything else.
    """
    if isinstance(example, Tensor):
        return (example,), {}
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    if isinstance(example, dict):
        bad = [k for k in example if not isinstance(k, str)]
        if bad:
            raise TypeError(f"a dict example input needs str keys (forward's parameter names), got {bad!r}")
        return (), dict(example)
    raise TypeError(
        "an example input must be a Tensor, a tuple/list of positional inputs or a dict of keyword inputs, "
        f"got {type(example).__name__}"
    )


def from_call(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The example-input form of a call (the inverse of :func:`as_call`): Tensor, tuple or dict."""
    if kwargs and args:
        raise TypeError("a call with both positional and keyword inputs has no example-input form")
    if kwargs:
        return dict(kwargs)
    if len(args) == 1 and isinstance(args[0], Tensor):
        return args[0]
    return tuple(args)


def _same_trailing(t: Any, ex: Tensor) -> bool:
    return isinstance(t, Tensor) and t.dim() == ex.dim() and (ex.dim() == 0 or t.shape[1:] == ex.shape[1:])


def _fits(t: Any, ex: Tensor) -> bool:
    """``t`` could be the example's input: a tensor of its trailing shape and kind of dtype."""
    return _same_trailing(t, ex) and t.is_floating_point() == ex.is_floating_point()


def _one_input_like(batch: Any, ex: Tensor) -> Tensor | None:
    """The one-tensor model input of ``batch``: :func:`model_input`'s rule when that tensor fits
    ``ex``; else the only top-level tensor of a tuple/list/dict batch that fits it (``(y, x)``,
    ``(meta, x, y)`` layouts); else :func:`model_input`'s tensor (the caller judges it)."""
    x = model_input(batch)
    if x is not None and _fits(x, ex):
        return x
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    fitting = [v for v in values if _fits(v, ex)]
    return fitting[0] if len(fitting) == 1 else x


def inputs_like(
    batch: Any, args: Sequence[Any], kwargs: dict[str, Any], names: Sequence[str] | None = None
) -> Call | None:
    """The model inputs in a dataloader batch, in the structure of the example call ``(args, kwargs)``.

    * one positional tensor, no keywords: :func:`model_input`'s rule, or the batch's only tensor
      of the example's trailing shape and kind when that rule's tensor does not fit;
    * k positional inputs: the first k elements of a tuple/list batch, or the values of a dict
      batch under ``names`` (forward's first k parameter names) when given;
    * keyword inputs: those keys of a dict batch.

    Where the example holds a tensor, the batch must hold a tensor with the same trailing
    shape (all but dim 0); where it holds anything else, that value is a constant of the call
    and is kept from the example. Returns None when the batch does not hold the inputs.
    """
    args, kwargs = tuple(args), dict(kwargs)
    if not kwargs and len(args) == 1 and isinstance(args[0], Tensor):
        x = _one_input_like(batch, args[0])
        return None if x is None else ((x,), {})
    out_args: list[Any] = []
    if args:
        if isinstance(batch, (list, tuple)):
            found = list(batch[: len(args)])
        elif isinstance(batch, dict) and names is not None and len(names) >= len(args):
            found = [batch.get(n) for n in names[: len(args)]]
        else:
            return None
        if len(found) < len(args):
            return None
        for got, ex in zip(found, args):
            if isinstance(ex, Tensor):
                if not _same_trailing(got, ex):
                    return None
                out_args.append(got)
            else:
                out_args.append(ex)
    out_kwargs: dict[str, Any] = {}
    if kwargs:
        if not isinstance(batch, dict):
            return None
        for k, ex in kwargs.items():
            if isinstance(ex, Tensor):
                if not _same_trailing(batch.get(k), ex):
                    return None
                out_kwargs[k] = batch[k]
            else:
                out_kwargs[k] = ex
    return tuple(out_args), out_kwargs


def _forward_of(model: Any) -> Callable[..., Any]:
    return getattr(model, "forward", model)


def required_positional(model: Any) -> list[str]:
    """Names of ``model.forward``'s positional parameters that have no default, in order."""
    try:
        sig = inspect.signature(_forward_of(model))
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind in kinds and p.default is inspect.Parameter.empty]


def positional_names(model: Any) -> list[str]:
    """Names of ``model.forward``'s positional parameters, in order (for dict batches)."""
    try:
        sig = inspect.signature(_forward_of(model))
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def check_call(model: Any, args: Sequence[Any], kwargs: dict[str, Any], argument: str = "example_input") -> None:
    """Raise TypeError, before any training, if ``model.forward`` cannot be called with ``(args, kwargs)``.

    Names the ``forward`` parameter that is missing (or unexpected) and the fix. Parameters
    with defaults may be left out: the export freezes their defaults.
    """
    try:
        sig = inspect.signature(_forward_of(model))
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        missing = [
            p.name
            for p in list(sig.parameters.values())[len(args) :]
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and p.name not in kwargs
        ]
        owner = f"{type(model).__name__}.forward"
        if missing:
            what = f"parameter {missing[0]!r} of {owner} has no default and `{argument}` does not supply it"
        else:
            what = f"{owner}{sig} cannot be called with `{argument}` ({exc})"
        raise TypeError(
            f"{what}. Pass every input the model needs: `{argument}` may be a Tensor (one input), a tuple "
            "(positional inputs, model(*x)) or a dict (keyword inputs, model(**x)); or give the parameter a default"
        ) from None


def example_from_batch(batch: Any, model: Any) -> Call | None:
    """The call a training batch stands for when no example input was given, or None.

    ``forward`` with one required positional parameter: a dict batch's value under that
    parameter's name if it has one, else :func:`model_input`'s rule. With k > 1:
    the first k elements of a tuple/list batch, or the dict batch's values under those names.
    """
    required = required_positional(model)
    if len(required) <= 1:
        if isinstance(batch, dict) and required and isinstance(batch.get(required[0]), Tensor):
            return ((batch[required[0]],), {})  # the value under forward's own parameter name
        x = model_input(batch)
        return None if x is None else ((x,), {})
    if isinstance(batch, (list, tuple)) and len(batch) >= len(required):
        found = list(batch[: len(required)])
    elif isinstance(batch, dict) and all(n in batch for n in required):
        found = [batch[n] for n in required]
    else:
        return None
    return (tuple(found), {}) if all(isinstance(t, Tensor) for t in found) else None


def map_tensors(fn: Callable[[Tensor], Any], call: Call) -> Call:
    """Apply ``fn`` to every tensor of a call's args and kwargs (others unchanged)."""
    args, kwargs = call
    f = lambda v: fn(v) if isinstance(v, Tensor) else v  # noqa: E731
    return tuple(f(a) for a in args), {k: f(v) for k, v in kwargs.items()}


def to_model(t: Tensor, device: Any, dtype: Any) -> Tensor:
    """``t`` as the model takes it: on ``device``; a floating tensor in the model's floating
    ``dtype`` (a float64 batch from numpy into a float32 model); integer and bool tensors (token
    ids, indices, masks) keep their dtype: casting ids to float breaks ``nn.Embedding``."""
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)
