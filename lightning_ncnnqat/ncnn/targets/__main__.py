"""``python -m lightning_ncnnqat.ncnn.targets``: see :mod:`lightning_ncnnqat.ncnn.targets.cli`."""

import sys

from lightning_ncnnqat.ncnn.targets.cli import main

sys.exit(main())
