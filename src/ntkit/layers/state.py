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
* ``gaussian`` says whether the current representation is, at infinite width, a centred
  Gaussian process over the inputs, which is what an activation's dual
  ``E[phi(u) phi(v)]`` assumes of its pre-activations. ``True``: the output of a Dense
  layer (whatever its input: a sum over infinitely many independent weights, CLT), and what
  keeps that property (LayerNorm, which divides by deterministic infinite-width quantities;
  an affine activation; FanInSum of such branches). ``False``: the raw inputs
  (deterministic), the output of a non-affine activation, and anything computed from those
  without a Dense layer. ``None``: unknown (a state built by hand, or after a user-defined
  layer that does not say): activations then apply their duals unchecked, as before the
  flag existed. An activation refuses a ``False`` state (see
  :class:`NonGaussianInputError`).
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
    ``var1``/``var2``, or ``None`` for unknown; see the module docstring); ``gaussian``
    whether the representation is a Gaussian process at infinite width (``True``/``False``,
    or ``None`` for unknown; see the module docstring).
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
    gaussian: bool | None = None

    def __post_init__(self):
        if self.layout not in _SPATIAL_NDIM:
            raise ValueError(f"PairKernel layout must be one of {LAYOUTS}; got "
                             f"{self.layout!r}.")

    def replace(self, **changes: Any) -> "PairKernel":
        """A copy with the given fields changed (the state is immutable).

        The per-example means become unknown (``None``) unless ``mean1``/``mean2`` are
        given: a kernel map that changes the kernels without saying what it does to the
        means (a user-defined layer written before the means existed) must not leave stale
        ones for a later LayerNorm to trust. For the same reason ``gaussian`` becomes unknown
        (``None``: activations after such a layer are not checked) unless given.
        """
        changes.setdefault("mean1", None)
        changes.setdefault("mean2", None)
        changes.setdefault("gaussian", None)
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


def all_gaussian(flags: Any) -> bool | None:
    """Whether a sum of independent branches with these ``gaussian`` flags is Gaussian:
    ``False`` if any branch is not (a Gaussian plus an independent non-Gaussian term is not
    Gaussian), ``True`` if all are, else unknown (``None``)."""
    flags = list(flags)
    if any(f is False for f in flags):
        return False
    if all(f is True for f in flags):
        return True
    return None


class NonGaussianInputError(ValueError):
    """An activation applied to a representation that is not Gaussian at infinite width.

    Its dual (``E[phi(u) phi(v)]`` for a centred Gaussian pair) would then not be the limit
    of the finite network, so ntkit refuses rather than return it. ``layer`` is the
    activation, ``path`` where it sits (filled in by the enclosing ``serial``/``parallel``
    as the error passes through them, outermost first).
    """

    def __init__(self, layer: object, path: tuple[str, ...] = ()):
        self.layer, self.path = layer, tuple(path)
        where = f" at {', '.join(self.path)} of the network" if self.path else ""
        super().__init__(
            f"{layer!r}{where} receives features that are not Gaussian at infinite width: "
            "the raw inputs, the output of another (non-affine) activation, LayerNorm of "
            "one, or a FanInSum with such a branch. Its analytic kernel would not be the limit of "
            "the finite network. Remedy: put a Dense layer before it; activations' kernels "
            "assume Gaussian pre-activations (infinite width). For a fixed feature map of "
            "the raw inputs, apply it to the inputs first: net.kernel(act(x)) (ntkit "
            "activations are callable on tensors).")

    def at(self, step: str) -> "NonGaussianInputError":
        """The same error, located one level further out (``step`` e.g. ``"layer 2"``)."""
        return NonGaussianInputError(self.layer, (step,) + self.path)


def require_dense(layout: Any, layer: object) -> None:
    """Raise a ValueError unless ``layout`` is ``"dense"``, the one ``layer`` can consume."""
    if layout != DENSE:
        raise ValueError(
            f"{layer!r} mixes all features, so it needs the 'dense' kernel layout (one "
            f"covariance per pair of inputs); it received the {layout!r} layout (per-pixel "
            "covariances). Pool or flatten the spatial axes first.")
