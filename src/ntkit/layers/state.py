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
* ``mean1``/``mean2`` are the per-example means over features of the current
  representation at infinite width, ``m(x) = lim (1/n) sum_i h_i(x)``, shaped and broadcast
  like ``var1``/``var2`` (in diagonal mode both are the ``(N,)`` means of the rows). Only
  LayerNorm, which centres each example, needs them. Three kinds of value: the Python float
  ``0.0`` (known to be exactly zero: after Dense, whose zero-mean weights and biases average
  out over infinitely many features, or after LayerNorm), a tensor (raw inputs: the mean of
  each row; an activation of zero-mean Gaussian pre-activations: ``E[phi(u)]``), or ``None``
  (unknown: LayerNorm refuses it rather than guess).
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
    ``layout`` one of :data:`LAYOUTS` (see the module docstring for the shapes);
    ``mean1``/``mean2`` the per-example feature means (``0.0``, a tensor shaped like
    ``var1``/``var2``, or ``None`` for unknown; see the module docstring).
    """

    cov: torch.Tensor
    var1: torch.Tensor
    var2: torch.Tensor
    ntk: torch.Tensor | None
    width: int
    diagonal: bool = False
    layout: str = DENSE
    mean1: torch.Tensor | float | None = None
    mean2: torch.Tensor | float | None = None

    def __post_init__(self):
        if self.layout not in _SPATIAL_NDIM:
            raise ValueError(f"PairKernel layout must be one of {LAYOUTS}; got "
                             f"{self.layout!r}.")

    def replace(self, **changes: Any) -> "PairKernel":
        """A copy with the given fields changed (the state is immutable).

        The per-example means become unknown (``None``) unless ``mean1``/``mean2`` are
        given: a kernel map that changes the kernels without saying what it does to the
        means (a user-defined layer written before the means existed) must not leave stale
        ones for a later LayerNorm to trust.
        """
        changes.setdefault("mean1", None)
        changes.setdefault("mean2", None)
        return replace(self, **changes)

    @property
    def means_are_zero(self) -> bool:
        """Whether both per-example means are known to be exactly zero (the float 0.0)."""
        return is_zero_mean(self.mean1) and is_zero_mean(self.mean2)

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


def is_zero_mean(mean: Any) -> bool:
    """Whether a ``mean1``/``mean2`` value is the exact-zero marker (the float ``0.0``)."""
    return isinstance(mean, float) and mean == 0.0


KernelState = Any
"""A :class:`PairKernel`, or a tuple of states (one per branch) after ``FanOut``."""


def require_dense(layout: Any, layer: object) -> None:
    """Raise a ValueError unless ``layout`` is ``"dense"``, the one ``layer`` can consume."""
    if layout != DENSE:
        raise ValueError(
            f"{layer!r} mixes all features, so it needs the 'dense' kernel layout (one "
            f"covariance per pair of inputs); it received the {layout!r} layout (per-pixel "
            "covariances). Pool or flatten the spatial axes first.")
