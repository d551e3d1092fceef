"""Reproductions of published experiments (thin scripts over the library)."""

from . import jgh20

__all__ = ["jgh20"]
