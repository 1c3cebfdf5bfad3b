"""Lightning callbacks."""

from .qat import QATCallback

__all__ = ["QATCallback"]
