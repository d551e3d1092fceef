"""Deprecated alias of :mod:`ntkit.predict`; import from ``ntkit.predict`` instead.

Kept only while other modules still import this path; it re-exports the public API.
"""

from ..predict import *  # noqa: F401,F403
from ..predict import __all__  # noqa: F401
