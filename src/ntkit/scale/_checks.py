"""Checks shared by the modules of :mod:`ntkit.scale`, kept apart so that none of them has
to import another just for these (``distributed`` is imported lazily by ``store``, which
``tiled`` imports: a check living in ``tiled`` would close that loop)."""

from __future__ import annotations

from typing import Any

from ..layers.base import Layer

#: the kernels ``ntkit.scale`` computes and stores, by name
KERNEL_CHOICES = ("ntk", "nngp")


def check_net(net: Any, name: str = "net") -> Layer:
    """``net`` itself if it is an ntkit network, else a ValueError naming ``name``."""
    if not isinstance(net, Layer):
        raise ValueError(f"{name} must be an ntkit network (an nk.Layer such as nk.mlp(...)); "
                         f"got {type(net).__name__}.")
    return net
