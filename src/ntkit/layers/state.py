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

``cov`` and ``ntk`` have shape ``B + S``. ``var1``/``var2`` hold the variances of the same
features in each input, ``k(x, x)`` and ``k(x', x')``, and broadcast against ``cov`` (the
*marginals* an elementwise dual needs): in full mode a column ``(B1, 1, *S1)`` and a row
``(1, B2, *S2)``, where for ``"pixel_pairs"`` ``S1 = (H, W, 1, 1)`` and ``S2 = (1, 1, H, W)``
(the variance of each pixel of each input); in diagonal mode they are ``cov`` itself
(:attr:`PairKernel.variances_are_cov`), which for ``"pixel_pairs"`` is each image's full
*self* pixel-pair covariance, whose pixel diagonal gives the marginals
(:meth:`PairKernel.marginals`, strided views).

Pooling is the one map that per-pixel variances cannot follow: the variance of an average
is the average of the window's covariances, so it needs each image's self pixel-pair
covariance. Rather than carry those ``B1 + B2`` self covariances through every tile (a
``1/B1 + 1/B2`` overhead that forbids small tiles), the evaluator first runs the network
once in diagonal mode over the images, where pooling layers *record* their output variances
on a :class:`VarianceTape`, and every tile of pairs *replays* them (``PairKernel.tape``).

Cost of the layouts, per pair of inputs and per layer (``|S|`` entries, a few flops each):
``"dense"`` 1 entry; ``"pixels"`` ``H·W`` entries (a ``Flatten`` readout needs no more:
each pixel's covariance only ever mixes with the same pixel of the other image, at the
same window offset); ``"pixel_pairs"`` ``(H·W)²`` entries (300 KB per pair of 14×14
images in float64; any pooling needs it), plus, once per image, its self covariance for
the tape.

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

from ._conv_ops import pair_diagonal

#: The spatial layouts a kernel state may hold (see the module docstring).
DENSE, PIXELS, PIXEL_PAIRS = "dense", "pixels", "pixel_pairs"
LAYOUTS = (DENSE, PIXELS, PIXEL_PAIRS)


@dataclass(frozen=True)
class PairKernel:
    """Infinite-width kernels of a batch of input pairs at one point of the network.

    Fields: ``cov`` and ``ntk`` of shape ``B + S``; ``var1``/``var2`` broadcastable to it;
    ``width`` the feature count; ``diagonal`` whether ``B = (N,)`` holds the pairs (x, x);
    ``layout`` one of :data:`LAYOUTS` (see the module docstring for the shapes);
    ``mean1``/``mean2`` the per-example feature means (``0.0``, a tensor shaped like
    ``var1``/``var2``, or ``None`` for unknown; see the module docstring); ``gaussian``
    whether the representation is a Gaussian process at infinite width (``True``/``False``,
    or ``None`` for unknown; see the module docstring); ``tape`` the pooled variances of the
    ``"pixel_pairs"`` layout (recorded in diagonal mode, replayed in full mode; ``None``
    otherwise), kept by :meth:`replace`.
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
    tape: "VarianceTape | None" = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
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
        """``S``: ``()`` for ``"dense"``, ``(H, W)`` or ``(H, W, H, W)`` otherwise (``(L,)``
        or ``(L, L)`` for sequences)."""
        n = self.cov.dim() - (1 if self.diagonal else 2)
        return tuple(self.cov.shape[self.cov.dim() - n:]) if n else ()

    @property
    def variances_are_cov(self) -> bool:
        """Whether ``var1`` and ``var2`` are ``cov`` itself (diagonal mode): then a map of
        ``cov`` is also the map of the self states."""
        return self.diagonal

    @property
    def image_ndim(self) -> int:
        """Number of image axes ``d``: 0 for ``"dense"``, 2 for images, 1 for sequences."""
        n = self.cov.dim() - (1 if self.diagonal else 2)
        return n // 2 if self.layout == PIXEL_PAIRS else n

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v1, v2)``: the variance of each entry's feature in input 1 and in input 2,
        broadcastable against ``cov``: what an elementwise dual needs. ``var1``/``var2``
        except in diagonal mode with ``"pixel_pairs"``, where ``cov`` is each image's self
        pixel-pair covariance and they are its pixel diagonal, as strided views
        ``(N, H, W, 1, 1)`` and ``(N, 1, 1, H, W)``."""
        if self.diagonal and self.layout == PIXEL_PAIRS:
            return self_marginals(self.cov, self.image_ndim)
        return self.var1, self.var2


class VarianceTape:
    """The per-pixel variances after each pooling layer, for every image: what a tile of
    pairs in the ``"pixel_pairs"`` layout cannot compute from its own state.

    Recording (diagonal mode, ``rows=None``): pooling layers :meth:`record` the variances of
    their outputs, in the order the network applies them. Replaying (full mode): a tape is
    made per tile from two recorded ones (the rows' and the columns' images) and
    :meth:`replay` hands each pooling layer, in the same order, the variances shaped as
    ``var1``/``var2``. The order of ``kernel_map`` calls is fixed by the network, so the
    position in the tape identifies the layer.

    ``same`` (``(B1, B2)`` bool, or ``None``) marks pairs of equal images: their pooled
    pixel-diagonal entries are set to the recorded variances, so that their correlation is
    exactly 1 (see :meth:`replay`).
    """

    def __init__(self, recorded: list[torch.Tensor] | None = None,
                 second: list[torch.Tensor] | None = None, rows: slice | None = None,
                 cols: slice | None = None, same: torch.Tensor | None = None):
        self.recorded = [] if recorded is None else recorded
        self.second = self.recorded if second is None else second
        self.rows, self.cols, self.same = rows, cols, same
        self.position = 0

    @property
    def recording(self) -> bool:
        return self.rows is None

    def record(self, var: torch.Tensor) -> None:
        """Append the variances ``(N, *S)`` (or ``(N,)`` after global pooling) of a pooling
        layer's output."""
        self.recorded.append(var)

    def replay(self, cov: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
        """``(cov, var1, var2)`` for the next pooling layer of a tile: its pooled ``cov``
        (``(B1, B2, *S, *S)``, or ``(B1, B2)`` with ``ndim=0``) with the pixel diagonal of
        equal images set to their variances, and those variances as ``(B1, 1, *S, 1s)`` and
        ``(1, B2, 1s, *S)`` (``(B1, 1)`` and ``(1, B2)``)."""
        if self.position >= len(self.recorded):
            raise RuntimeError("VarianceTape: more pooling layers in a tile than were recorded "
                               "(a network whose order of kernel maps changes between calls?).")
        v1 = self.recorded[self.position][self.rows]
        v2 = self.second[self.position][self.cols]
        self.position += 1
        ones = (1,) * ndim
        v1 = v1.reshape((v1.shape[0], 1) + tuple(v1.shape[1:]) + ones)
        v2 = v2.reshape((1, v2.shape[0]) + ones + tuple(v2.shape[1:]))
        return self.exact_diagonal(cov, v1, ndim), v1, v2

    def exact_diagonal(self, cov: torch.Tensor, var1: torch.Tensor, ndim: int) -> torch.Tensor:
        """``cov`` with the pixel diagonal of each pair of equal images (``same``) set to the
        first image's variances ``var1`` (marginal-shaped): their correlation stays exactly
        1 there, as it is. The tile and the per-pixel variances take different summation
        paths (window sums of pixel pairs vs of pixels), which may round differently in
        the last bit, and an arccos would turn that into a ~1e-8 error."""
        if self.same is None:
            return cov
        if cov.requires_grad:
            cov = cov.clone()
        diag = pair_diagonal(cov, ndim) if ndim else cov
        target = var1.reshape(var1.shape[:var1.dim() - ndim]) if ndim else var1
        diag[self.same] = target.expand(diag.shape)[self.same]
        return cov


def self_marginals(t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel variances of a self pixel-pair covariance ``t`` of shape ``B + S + S``
    (``S`` with ``ndim`` axes), as views broadcastable against ``t``: ``B + S + 1s`` (the
    first pixel's variance) and ``B + 1s + S`` (the second's). No copy."""
    diag = pair_diagonal(t, ndim)
    first = second = diag
    for _ in range(ndim):
        first = first.unsqueeze(-1)               # B + S + (1,)*ndim
        second = second.unsqueeze(-ndim - 1)      # B + (1,)*ndim + S
    return first, second


def is_branches(value: Any) -> bool:
    """Whether ``value`` (a dimension, layout, need or state) holds several branches (after
    ``FanOut``): a tuple, but not a ``torch.Size``, which is one image shape ``(C, H, W)``."""
    return isinstance(value, tuple) and not isinstance(value, torch.Size)


def strongest(need: Any) -> str:
    """The most demanding of one layout need or a (nested) tuple of them, in the order
    ``"dense"`` < ``"pixels"`` < ``"pixel_pairs"`` (each carries what the previous does)."""
    if not is_branches(need):
        return need
    return max((strongest(n) for n in need), key=LAYOUTS.index, default=DENSE)


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
            "covariances of images or sequences). Pool or flatten the spatial axes first: "
            "put nk.Flatten() or nk.GlobalAvgPool() before it.")
