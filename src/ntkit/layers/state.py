"""The kernel state that flows through a network's kernel maps: :class:`PairKernel`.

One ``PairKernel`` describes the infinite-width kernels of a batch of input pairs at one
point of the network. Its tensors have a *batch* part and a *spatial* part:

* batch ``B``: ``(B1, B2)`` for a tile of pairs ``(x1[i], x2[j])`` ("full" mode), or
  ``(N,)`` for the pairs ``(x[i], x[i])`` (``diagonal=True``);
* spatial ``S``, set by ``layout``:

  ==================  ================  =================================================
  ``layout``          ``S``             ``cov[..., s]``
  ==================  ================  =================================================
  ``"dense"``         ``()``            Cov(z(x), z(x')) per feature (fully connected)
  ``"pixels"``        ``(H, W)``        Cov(z_hw(x), z_hw(x')): same pixel in both inputs
  ``"pixel_pairs"``   ``(H, W, H, W)``  Cov(z_hw(x), z_h'w'(x')): every pair of pixels
  ==================  ================  =================================================

``cov`` and ``ntk`` have shape ``B + S``. ``var1``/``var2`` hold the self-covariances
``k(x, x)`` and ``k(x', x')`` of the same entries and broadcast against ``cov``: in full mode
a column ``(B1, 1, *S1)`` and a row ``(1, B2, *S2)``, where for ``"pixel_pairs"`` ``S1 =
(H, W, 1, 1)`` and ``S2 = (1, 1, H, W)`` (the variance of each pixel of each input); in
diagonal mode with ``"dense"`` or ``"pixels"`` they are ``cov`` itself
(:attr:`PairKernel.variances_are_cov`).

Layers whose kernel map is elementwise in the entries (activations, ``FanInSum``,
``Parallel``, ``FanOut``, ``Identity``) work on every layout unchanged; layers that mix
features across the spatial axes (Dense, LayerNorm) refuse the spatial layouts until a
layer that pools or flattens them has produced ``"dense"``.

Conventions (see DESIGN.md):

* ``cov`` is the NNGP covariance of the current representation. Before the first layer it
  is the input Gram ``x . x' / n0``.
* ``ntk`` is the per-output NTK accumulated so far (``None`` when the NTK is not asked; a
  0-d zero before the first layer, which broadcasts).
* ``width`` is the declared feature (channel) count of the current representation; the
  standard parameterization's NTK needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

#: The spatial layouts a kernel state may hold (see the module docstring).
DENSE, PIXELS, PIXEL_PAIRS = "dense", "pixels", "pixel_pairs"
LAYOUTS = (DENSE, PIXELS, PIXEL_PAIRS)
_SPATIAL_NDIM = {DENSE: 0, PIXELS: 2, PIXEL_PAIRS: 4}


@dataclass(frozen=True)
class PairKernel:
    """Infinite-width kernels of a batch of input pairs at one point of the network.

    Fields: ``cov`` and ``ntk`` of shape ``B + S``; ``var1``/``var2`` broadcastable to it;
    ``width`` the feature count; ``diagonal`` whether ``B = (N,)`` holds the pairs (x, x);
    ``layout`` one of :data:`LAYOUTS` (see the module docstring for the shapes).
    """

    cov: torch.Tensor
    var1: torch.Tensor
    var2: torch.Tensor
    ntk: torch.Tensor | None
    width: int
    diagonal: bool = False
    layout: str = DENSE

    def __post_init__(self):
        if self.layout not in _SPATIAL_NDIM:
            raise ValueError(f"PairKernel layout must be one of {LAYOUTS}; got "
                             f"{self.layout!r}.")

    def replace(self, **changes: Any) -> "PairKernel":
        """A copy with the given fields changed (the state is immutable)."""
        return replace(self, **changes)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """``S``: ``()`` for ``"dense"``, ``(H, W)`` or ``(H, W, H, W)`` otherwise."""
        n = _SPATIAL_NDIM[self.layout]
        return tuple(self.cov.shape[self.cov.dim() - n:]) if n else ()

    @property
    def variances_are_cov(self) -> bool:
        """Whether ``var1`` and ``var2`` are ``cov`` itself (diagonal mode, one entry per
        pixel): then a map of ``cov`` is also the map of the variances."""
        return self.diagonal and self.layout != PIXEL_PAIRS


KernelState = Any
"""A :class:`PairKernel`, or a tuple of states (one per branch) after ``FanOut``."""


def require_dense(layout: Any, layer: object) -> None:
    """Raise a ValueError unless ``layout`` is ``"dense"``, the one ``layer`` can consume."""
    if layout != DENSE:
        raise ValueError(
            f"{layer!r} mixes all features, so it needs the 'dense' kernel layout (one "
            f"covariance per pair of inputs); it received the {layout!r} layout (per-pixel "
            "covariances). Pool or flatten the spatial axes first.")
