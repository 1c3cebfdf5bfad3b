"""``python -m lightning_ncnnqat.targets``: release 0.1's command, now ``python -m lightning_ncnnqat.ncnn.targets``."""

import sys

from lightning_ncnnqat.ncnn.targets.cli import main

sys.exit(main())
