"""``python -m lightning_ncnnqat.targets``: see :mod:`lightning_ncnnqat.targets.cli`."""

import sys

from .cli import main

sys.exit(main())
