"""A module's forward rewritten for one ``with`` block, kept only where it computes the same values.

The export forms (``qat/conv_attention_forms.py``, ``qat/grid_forms.py``, ``qat/patch_forms.py``)
recognise modules by their attributes (duck typing, no timm or ultralytics import), so a module
with the right names may still compute something else. :func:`checked_form` is the one rule they
share: run the module on a fixed probe, put the rewritten forward in place (an instance attribute
``forward``, a bound method so ``copy.deepcopy`` rebinds it to a copy, and a marker attribute
naming the form), run the probe again, and keep the form only when both outputs are tensors of
one shape that agree (``allclose``, rtol 1e-4). Probing runs in eval mode; every training flag is
restored. On exit, also on error, the instance attributes go and the class's forward is back.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

PROBE_RTOL = 1e-4
PROBE_ATOL = 1e-5


def probe_output(m: nn.Module, x: Tensor) -> Tensor | None:
    """``m(x)`` under no_grad, ``x`` moved to ``m``'s first parameter's device and dtype; None
    when the call fails or does not return one tensor (a module this form does not compute)."""
    p = next(iter(m.parameters()), None)
    if p is not None:
        x = x.to(p.device, p.dtype)
    try:
        with torch.no_grad():
            y = m(x)
        return y if isinstance(y, Tensor) else None
    except Exception:  # noqa: BLE001 - a module this form does not compute is simply not rewritten
        return None


def seeded_probe(*shape: int) -> Tensor:
    """A fixed random float32 probe of ``shape`` (seed 0: the same decision on every call)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _same(want: Tensor | None, got: Tensor | None, atol: float) -> bool:
    return want is not None and got is not None and want.shape == got.shape and bool(
        torch.allclose(want, got, rtol=PROBE_RTOL, atol=atol))


def _remove(m: nn.Module, marker: str) -> None:
    m.__dict__.pop("forward", None)
    m.__dict__.pop(marker, None)


@contextlib.contextmanager
def checked_form(
    m: nn.Module,
    forward: Callable[..., Tensor],
    marker: str,
    name: str,
    probe: Callable[[nn.Module], Tensor | None],
    inner: Callable[[contextlib.ExitStack], object] | None = None,
    atol: float = PROBE_ATOL,
) -> Iterator[bool]:
    """``m.forward`` as ``forward`` (``forward(m, x)``) for the block when ``probe(m)`` gives the
    same output before and after; yields whether ``m`` was rewritten.

    ``marker`` is the instance attribute set to ``name`` while the form is in place (tests and
    reports read it). ``inner(stack)``, when given, enters the forms of ``m``'s submodules on
    ``stack`` before the second probe (MobileViT's attention modules); they are undone with ``m``'s
    form, at once when the outputs differ. A module already holding an instance ``forward`` is
    left alone (yields False).
    """
    if "forward" in m.__dict__:
        yield False
        return
    flags = [(mod, mod.training) for mod in m.modules()]
    m.eval()
    with contextlib.ExitStack() as stack:
        try:
            want = probe(m)
            if inner is not None:
                inner(stack)
            m.__dict__["forward"] = types.MethodType(forward, m)  # deepcopy rebinds it to a copy
            m.__dict__[marker] = name
            got = probe(m)
        except BaseException:
            _remove(m, marker)
            raise
        finally:
            for mod, flag in flags:
                mod.training = flag
        same = _same(want, got, atol)
        try:
            if not same:  # not this computation: everything undone before the block runs
                _remove(m, marker)
                stack.close()
            yield same
        finally:
            _remove(m, marker)
