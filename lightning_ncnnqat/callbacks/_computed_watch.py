"""Weights that become computed (or stop being computed) after QAT started.

Lightning's ``ModelPruning(apply_pruning=lambda epoch: epoch >= k)`` adds prune's forward
pre-hooks (``weight_orig`` * ``weight_mask``) at an epoch end, possibly after QAT converted the
layers; a user may call ``parametrize.register_parametrization`` or ``prune.remove`` there too.
The QAT forward already reads the weight the layer computes with (the hook runs before it, a
parametrized weight is a property), and the export bakes what is there at export time. What goes
stale is what was decided from the weights at the QAT start:

* the folded BatchNorm statistics, frozen at the start (``freeze_bn_after=0``): pruning 30% of a
  conv's weights shrinks its output, and a BN whose statistics no longer move cannot follow. A
  float BN in training re-normalizes at once. Measured on the 8x8 digits TinyNet (SGD lr 0.05,
  QAT from epoch 1 of 4, global L1 pruning 30% from epoch 2): validation accuracy at epoch 3 was
  0.531 with frozen statistics, 0.781 with them training (the float run's figure, 0.781);
* the plan's notes (which tensor is computed, and how).

:class:`ComputedWatch` compares, at each epoch start, what computes each quantized layer's and
its folded BN's tensors with what it saw last (:func:`..computed_weights.fingerprint`, no tensor
read), lets the changed layers' folded BN statistics train again for that epoch (the callback's
``freeze_if_due`` freezes them at the next epoch start, as ``freeze_bn_after`` does), and updates
the plan's notes. At fit end, a change with no epoch left to follow it is warned about.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_ncnnqat.qat.bn_fold import can_train_stats, set_stats_live, stats_live
from lightning_ncnnqat.qat.computed_weights import describe, fingerprints
from lightning_ncnnqat.qat.plan import QATPlan
from lightning_ncnnqat.qat.wrappers import unwrap

_NOTE = "computed {how}: QAT fake-quantizes the computed weight, the export writes its value"


def _zeros(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Zeros of each named module's weight: of prune's ``weight_mask`` when it has one, else of a
    plain ``weight`` Parameter (training makes no exact zeros; pruning made permanent does).
    One comparison per layer, at each epoch start."""
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        m = modules.get(n)
        t = None if m is None else m._buffers.get("weight_mask", m._parameters.get("weight"))
        if isinstance(t, Tensor):
            out[n] = int((t == 0).sum())
    return out


def _watched(plan: QATPlan) -> list[str]:
    """Names of the quantized layers and of the BNs folded into them."""
    return list(plan.layers) + [p.bn for p in plan.layers.values() if p.bn]


class ComputedWatch:
    """What computed each quantized layer's (and folded BN's) tensors when last looked at."""

    def __init__(self, model: nn.Module, plan: QATPlan) -> None:
        self._seen = fingerprints(unwrap(model), _watched(plan))
        self._zeros = _zeros(unwrap(model), _watched(plan))

    def changed(self, model: nn.Module, plan: QATPlan) -> dict[str, bool]:
        """Quantized layers whose weight, or whose folded BN's, is computed differently than when
        last looked at (a pre-hook or parametrization added or removed, a new pruning mask), each
        with whether its values may have changed: something computes its tensors now, or pruning
        made permanent holds more zeros than the last mask seen (False: only a removal such as
        ``prune.remove``, which keeps the computed value as the weight). The new state becomes the
        one seen, and the plan's note of each such layer says it now."""
        model = unwrap(model)
        now = fingerprints(model, _watched(plan))
        zeros = _zeros(model, _watched(plan))
        # a plain weight holding more zeros than last seen: pruned and made permanent in between
        pruned_since = {n for n, z in zeros.items() if z > self._zeros.get(n, z) and not any(now.get(n, ()))}
        moved = {n for n, f in now.items() if self._seen.get(n) != f} | pruned_since
        self._seen, self._zeros = now, zeros
        modules = dict(model.named_modules())
        out = {
            n: any(any(now.get(m, ())) or m in pruned_since for m in (n, p.bn) if m)
            for n, p in plan.layers.items() if n in moved or (p.bn and p.bn in moved)
        }
        for name in out:
            bn = plan.layers[name].bn
            parts = [describe(modules[name])]
            if bn and bn in modules and describe(modules[bn]):
                parts.append(f"its folded {bn}: {describe(modules[bn])}")
            how = "; ".join(p for p in parts if p)
            if how:
                plan.notes[name] = _NOTE.format(how=how) + " (changed after QAT started)"
            else:
                plan.notes.pop(name, None)
        return out

    def at_epoch_start(self, model: nn.Module, plan: QATPlan, epoch: int) -> str | None:
        """Let the folded BN statistics of the changed layers train this epoch; a line saying so
        (for the callback's log), or None when nothing changed."""
        names = self.changed(model, plan)
        if not names:
            return None
        modules = dict(unwrap(model).named_modules())
        live = []
        for name in [n for n, computed in names.items() if computed]:  # a removal keeps the values
            bn = plan.layers[name].bn
            if bn and bn in modules and not stats_live(modules[bn]) and can_train_stats(modules[bn]):
                set_stats_live(modules[bn], True)
                live.append(bn)
        line = (f"epoch {epoch}: {', '.join(names)} compute their weights differently than at the last epoch start "
                "(a pruning mask or parametrization added or removed)")
        if live:
            line += f"; the folded statistics of {', '.join(live)} train again this epoch (frozen at the next start)"
        return line

    def at_fit_end(self, model: nn.Module, plan: QATPlan) -> str | None:
        """A warning when a layer with a folded BN changed after the last epoch started: its folded
        statistics predate the change (as a float BN's running statistics would), or None."""
        names = [n for n, computed in self.changed(model, plan).items() if computed and plan.layers[n].bn]
        if not names:
            return None
        return (
            f"the weights of {', '.join(names)} changed after the last training epoch started (pruning or a "
            "parametrization at the final epoch end): the folded BatchNorm statistics the export uses predate it; "
            "prune before the final epoch (ModelPruning's apply_pruning) so one epoch follows the change"
        )
