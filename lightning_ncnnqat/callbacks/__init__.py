"""Lightning callbacks."""

from lightning_ncnnqat.callbacks.qat import QATCallback

__all__ = ["QATCallback"]
