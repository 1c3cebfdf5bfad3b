"""``deploy_speed.py`` on torchvision architectures the zoo list does not name (issue 20).

    PYTHONPATH=. .venv-zoo/bin/python benchmarks/deploy_speed_zoo_extra.py --zoo shufflenet_v2_x0_5 mnasnet0_5 --start

The issue's slower mobile families include ``shufflenet_v2_x0_5`` and ``mnasnet0_5``, which
``benchmarks/zoo.py`` does not list (it has the x1.0 forms). This adds every ``--zoo`` name that
``torchvision.models.list_models()`` knows to the zoo's table (3x224x224), then runs
``deploy_speed.main`` unchanged with the same arguments: the same build, QAT steps, export and
interleaved timing as every other zoo row.

Models whose train-mode output is not a tensor (torchvision's ``googlenet`` and ``inception_v3``
return a namedtuple with their auxiliary heads, segmentation models a dict) train on the first
tensor in it (``deploy_speed.logits``); eval returns the logits alone, so the deployed graph is
the one exported.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torchvision  # noqa: E402
import zoo  # noqa: E402  (the same module object deploy_speed.build imports)

import deploy_speed  # noqa: E402


def register(names: list[str]) -> list[str]:
    """Add the torchvision names among ``names`` that the zoo lacks; returns those added.

    Raises ValueError naming a model that neither the zoo nor torchvision knows."""
    known = set(torchvision.models.list_models())
    added = []
    for n in names:
        if n in zoo.ALL_MODELS:
            continue
        if n not in known:
            raise ValueError(f"--zoo: {n!r} is neither in benchmarks/zoo.py nor a torchvision model")
        zoo.ALL_MODELS[n] = ("torchvision", 224)
        added.append(n)
    return added


def _zoo_names(argv: list[str]) -> list[str]:
    names, on = [], False
    for tok in argv:
        if tok.startswith("--"):
            on = tok == "--zoo"
        elif on:
            names.append(tok)
    return names


if __name__ == "__main__":
    args = sys.argv[1:]
    register(_zoo_names(args))
    sys.exit(deploy_speed.main(args))
