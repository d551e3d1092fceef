"""Deprecated alias of :mod:`ntkit.predict`; import from ``ntkit.predict`` instead.

Kept only while modules and tests still import this path. Every public name of
``ntkit.predict`` is here; so is ``_eigh``, the one private name of the former single module
that a test patches: reading or setting it here reads or sets the eigendecomposition the
predictors use (``ntkit.predict._spectral.eigh``), so such a patch still takes effect.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ..predict import *  # noqa: F401,F403  (the alias re-exports the whole public API)
from ..predict import __all__  # noqa: F401
from ..predict import _spectral

_MOVED = {"_eigh": (_spectral, "eigh")}  # old private name -> (module, name) now


class _Alias(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name in _MOVED:
            module, new = _MOVED[name]
            return getattr(module, new)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _MOVED:
            module, new = _MOVED[name]
            setattr(module, new, value)
        else:
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Alias
