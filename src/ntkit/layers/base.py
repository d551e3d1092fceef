"""The layer protocol: one declaration, a forward map (``build``) and a kernel map.

Every built-in layer is a frozen dataclass: an immutable value whose fields are its
parameters, with equality, hashing and ``repr`` over them. A layer knows

* how to build its finite-width ``torch.nn.Module`` (``build``, ``out_dim``);
* how the infinite-width kernels of a batch of input pairs change when it is applied
  (``kernel_map``, on the :class:`~ntkit.layers.state.PairKernel` state);
* what the evaluator needs to know about it, so that the evaluator never inspects types:
  ``uses_quadrature`` (pick a smaller tile) and ``kernel_layout`` (which kernel-state
  layout it consumes and produces; Dense refuses per-pixel covariances).

A user-defined layer subclasses :class:`Layer` and implements ``kernel_map`` (and ``build``
and ``out_dim`` for the finite network); a composite that holds its sublayers as attributes
answers ``uses_quadrature`` from them without further code.

Gaussian pre-activations. Activations' kernel maps assume their input is a centred Gaussian
process at infinite width; the state says whether it is (``PairKernel.gaussian``: raw
inputs no, Dense yes, LayerNorm and affine activations keep it, FanInSum of Gaussians yes,
a non-affine activation no) and an activation refuses a non-Gaussian one with a ValueError
naming its position. A user-defined layer's ``kernel_map`` may say it through
``k.replace(..., gaussian=True)`` (its output is Gaussian, e.g. a random linear map with
fresh weights) or ``gaussian=False``; one that says nothing leaves it unknown, and the
activations after it are applied unchecked, as they were before ntkit tracked it (refusing
would break working custom layers, and assuming "preserved" would refuse a custom Dense).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .evaluate import Kernels, analytic_kernel
from .state import KernelState, PairKernel, is_branches

__all__ = ["KernelState", "Layer", "PairKernel", "is_branches"]


class Layer:
    """Base class of every ntkit layer and network (a ``serial`` is a layer too)."""

    def out_dim(self, in_dim: Any) -> Any:
        """The feature dimension this layer maps to, given the input's: an int for flat
        features, a ``torch.Size`` ``(C, H, W)`` (or ``(C, L)``) for images (sequences), a
        tuple of those after ``FanOut``. Raises ValueError for one it cannot take."""
        return in_dim

    def kernel_map(self, k: KernelState) -> KernelState:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def uses_quadrature(self) -> bool:
        """Whether this layer's kernel map evaluates a numerical quadrature rule.

        The evaluator uses it to pick a smaller tile (a quadrature layer keeps
        ``degree``-sized temporaries per entry). The default answers for composites
        without being told: a layer uses quadrature if any :class:`Layer` held in its
        attributes (directly, or in a tuple or list) does, so a user-defined block wrapping
        ``nk.Tanh()`` is tiled like the built-in combinators. Leaf layers that integrate
        numerically override it to return True.
        """
        return any(child.uses_quadrature for child in _child_layers(self))

    def kernel_layout(self, layout: Any) -> Any:
        """The layout of the kernel state this layer produces from one in ``layout``.

        ``layout`` is one of :data:`~ntkit.layers.state.LAYOUTS` (``"dense"``, ``"pixels"``,
        ``"pixel_pairs"``) or, after ``FanOut``, a tuple of them. Raises ValueError for a
        layout the kernel map cannot consume. The default keeps the layout, as every map
        that is elementwise in the kernel entries does; the evaluator asks it once before
        computing any tile.
        """
        return layout

    def required_layout(self, layout: Any) -> Any:
        """The layout this layer needs of its input, given the one ``layout`` that the rest
        of the network needs of its output: the evaluator's backward question, asked once
        (``serial`` folds it from the last layer to the first) to pick the cheapest state
        that serves the whole network.

        The answers are ordered ``"dense"`` < ``"pixels"`` < ``"pixel_pairs"`` (each
        carries what the previous one does): a ``Flatten`` readout needs ``"pixels"``, a
        convolution passes its output's need through (it maps same-pixel entries to
        same-pixel entries), pooling needs ``"pixel_pairs"`` whatever follows, Dense needs
        ``"dense"``. After ``FanOut`` the need is a tuple (one per branch). The default
        passes the need through, as every map that is elementwise in the entries does.
        """
        return layout

    def build(self, in_dim: Any, generator: torch.Generator | None, dtype: torch.dtype,
              device: torch.device | None) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    # ----------------------------------------------------------------- the three views
    def module(self, in_dim: int | None = None, seed: int | None = None, *,
               in_shape: Sequence[int] | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.nn.Module:
        """View 1: a finite-width ``torch.nn.Module`` initialised as the parameterization says.

        Args:
            in_dim: number of input features (flat inputs ``(N, in_dim)``).
            seed: seed of a private ``torch.Generator``; ``None`` uses torch's global RNG.
            in_shape: instead of ``in_dim``, the shape of one input: ``(C, H, W)`` for images
                ``(N, C, H, W)``, ``(C, L)`` for sequences (convolutional networks).
            dtype: parameter dtype (default: ``torch.get_default_dtype()``).
            device: parameter device (default: CPU).
        Returns:
            A module mapping ``(N, in_dim)`` (or ``(N, *in_shape)``) inputs to
            ``(N, out_dim)`` outputs.
        """
        from .._validation import check_positive_int

        if (in_dim is None) == (in_shape is None):
            raise ValueError("module() needs exactly one of in_dim (flat inputs, an int) and "
                             "in_shape ((C, H, W) images or (C, L) sequences).")
        if in_shape is not None:
            shape = tuple(in_shape) if not isinstance(in_shape, int) else (in_shape,)
            if len(shape) not in (1, 2, 3):
                raise ValueError(f"in_shape must be (d,), (C, L) or (C, H, W); got {in_shape!r}.")
            shape = tuple(check_positive_int(n, "in_shape") for n in shape)
            in_dim = shape[0] if len(shape) == 1 else torch.Size(shape)
        else:
            check_positive_int(in_dim, "in_dim")
        self.out_dim(in_dim)  # shapes checked before any parameter is drawn
        generator = None
        if seed is not None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(int(seed))
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        device = torch.device(device) if device is not None else None
        return self.build(in_dim, generator, dtype, device)

    def kernel(self, x1: Any, x2: Any | None = None, get: str | Sequence[str] = ("nngp", "ntk"),
               diagonal: bool = False, *, dtype: Any = None,
               memory_budget: int | None = None) -> "Kernels":
        """View 2: the analytic infinite-width kernels.

        Args:
            x1: ``(N1, d)`` inputs (tensor or array), or images ``(N1, C, H, W)`` /
                sequences ``(N1, C, L)`` for a convolutional network. The result lives on
                ``x1``'s device.
            x2: ``(N2, ...)`` inputs of the same shape per row, or ``None`` for ``x2 = x1``
                (computed once, mirrored, exactly symmetric).
            get: ``"nngp"``, ``"ntk"`` or both.
            diagonal: if True, return only ``k(x, x)`` for each row of ``x1``, shape ``(N1,)``,
                in O(N1 d) time.
            dtype: ``torch.float64`` (default) or ``torch.float32`` (opt-in, for speed).
            memory_budget: bytes of workspace for the tiles (default: a cache-sized tile;
                for images the tile is sized in pairs × entries per pair, see
                :mod:`ntkit.layers.state` for what each layout costs).
        Returns:
            :class:`~ntkit.kernels.Kernels` with ``.nngp`` and ``.ntk``, each
            ``(N1, N2)`` (or ``(N1,)``): the per-output kernel; the full kernel over
            ``n_out`` outputs is ``k ⊗ I``.
        """
        return analytic_kernel(self, x1, x2, get=get, diagonal=diagonal, dtype=dtype,
                               memory_budget=memory_budget)

    def __repr__(self) -> str:
        fields = getattr(self, "__dataclass_fields__", {})
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in fields)
        return f"{type(self).__name__}({args})"


def _child_layers(layer: Layer) -> list[Layer]:
    """The layers held in ``layer``'s instance attributes, directly or in a tuple/list."""
    children: list[Layer] = []
    for value in getattr(layer, "__dict__", {}).values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        children.extend(item for item in items if isinstance(item, Layer) and item is not layer)
    return children
