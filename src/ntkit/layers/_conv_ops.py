"""Numerical primitives of the convolutional kernel maps: window sums, average pooling, the
pixel-pair diagonal and spatial means of per-pixel covariances.

Every function works on a tensor ``t`` of shape ``B + S``: any number of leading batch axes
``B`` (a tile of pairs ``(B1, B2)``, or ``(N,)`` in diagonal mode) and trailing spatial axes
``S``. With ``d`` spatial dimensions (``d = len(kernel_size)``: 2 for images, 1 for
sequences) the spatial part is

* ``pairs=False``: ``S = (H, W)`` (or ``(L,)``): one entry per pixel, the same pixel in both
  images (the ``"pixels"`` layout of :class:`ntkit.layers.state.PairKernel`);
* ``pairs=True``: ``S = (H, W, H, W)`` (or ``(L, L)``): a pixel of image 1 by a pixel of
  image 2 (the ``"pixel_pairs"`` layout).

Padding conventions (those of TensorFlow/XLA and neural-tangents 0.6.5), per spatial
dimension of size ``n`` with window ``k`` and stride ``s``:

* ``"same"``: zero padding; ``n_out = ceil(n / s)``; total padding
  ``max((n_out - 1) s + k - n, 0)``, of which ``total // 2`` goes before;
* ``"valid"``: no padding; ``n_out = (n - k) // s + 1`` (``n >= k`` required);
* ``"circular"``: wrap-around padding with the sizes of ``"same"``.

How they are computed, and why. The kernel maps are memory-bound (a few flops per entry
of a possibly huge ``(B1, B2, H, W, H, W)`` tile), so these functions never build a padded
copy and never loop over the ``k^d`` window offsets jointly: a ``d``-dimensional window
sum is ``d`` one-dimensional passes (separability: a 3x3 window is 2 + 2 shifted adds, not
9). Each one-dimensional pass writes its output once (a copy of the offset that covers the
whole output, then in-place adds of strided views of the input for the other offsets);
zero padding is the absence of an add on the padded part, circular padding is an add of
the wrapped part as a separate block. The common stride-1 ``"same"`` case has a faster
path: each image's pixels are viewed as one flattened axis so the shifted adds run over
long contiguous stretches (a 0/1 mask drops the entries that wrap across a row), the first
shifted add is fused with the copy of the centre, and on the CPU large tensors are summed
in cache-sized chunks of the batch axes (:data:`CHUNK_BYTES`). Only additions and exact
multiplications by 0 or 1 touch an entry, so every entry is rounded the same way wherever
it sits in the tensor (the evaluator's exact equalities between tilings and layouts rely
on it); ``scale``/``bias``/``add`` follow as separate in-place operations.

All operations are differentiable (autograd sees copies and in-place adds on a fresh
tensor), work in any floating dtype and on any device.

Cost of :func:`window_sum` on a stride-1 3x3 pixel-pair tile, measured on this project's
2-core machine (1 thread, float64, 14x14 images): about 2.4 ns per entry when the tile
fits the caches and 6 ns for a 39 MB tile, against 1.2-2 ns for a plain copy of the tile
(``benchmarks/conv_kernels.py`` has the micro-benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from itertools import product

import torch

PADDINGS = ("same", "valid", "circular")

# One run of a one-dimensional window pass: output positions p0 .. p0 + length - 1 receive
# the input positions i0, i0 + s, ..., i0 + s (length - 1).
_Run = tuple[int, int, int]


def _check_padding(padding: str) -> str:
    if not isinstance(padding, str) or padding.lower() not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}; got {padding!r}.")
    return padding.lower()


def _as_tuple(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * ndim
    value = tuple(value)
    if len(value) != ndim or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                     for v in value):
        raise ValueError(f"{name} must be {ndim} positive integers; got {value!r}.")
    return value


def output_size(n: int, k: int, s: int, padding: str) -> tuple[int, int]:
    """``(n_out, pad_before)`` of one spatial dimension of size ``n`` under a window ``k``,
    stride ``s`` and ``padding`` (see the module docstring)."""
    padding = _check_padding(padding)
    if padding == "valid":
        if n < k:
            raise ValueError(f"a 'valid' window of size {k} does not fit a spatial size {n}; "
                             "use padding='same' or a smaller window.")
        return (n - k) // s + 1, 0
    n_out = -(-n // s)
    total = max((n_out - 1) * s + k - n, 0)
    return n_out, total // 2


@lru_cache(maxsize=1024)
def _offset_runs(n: int, k: int, s: int, padding: str) -> tuple[int, tuple[tuple[_Run, ...], ...]]:
    """``(n_out, runs)``: for each window offset ``o`` the runs of output positions ``p``
    whose input position ``s p + o - pad_before`` exists (zero padding) or wraps
    (circular), each a maximal arithmetic progression of step ``s`` in the input."""
    n_out, before = output_size(n, k, s, padding)
    runs_per_offset = []
    for o in range(k):
        runs: list[list[int]] = []
        for p in range(n_out):
            i = s * p + o - before
            if padding == "circular":
                i %= n
            elif not 0 <= i < n:
                continue
            if runs and runs[-1][0] + runs[-1][2] == p and runs[-1][1] + s * runs[-1][2] == i:
                runs[-1][2] += 1
            else:
                runs.append([p, i, 1])
        runs_per_offset.append(tuple(tuple(r) for r in runs))
    return n_out, tuple(runs_per_offset)


def _shift_sum(t: torch.Tensor, axes: tuple[int, ...], n: int, k: int, s: int,
               padding: str) -> torch.Tensor:
    """One-dimensional window sum applied *jointly* on ``axes`` (negative axis indices, all
    of size ``n``): ``out[p_1, ..., p_m] = Σ_o t_pad[s p_1 + o, ..., s p_m + o]`` -- the same
    offset on every listed axis. One axis: a box sum; two axes (image 1's and image 2's
    copy of one spatial dimension): the pixel-pair window sum of a convolution."""
    n_out, runs = _offset_runs(n, k, s, padding)
    out_shape = list(t.shape)
    for a in axes:
        out_shape[a] = n_out
    index = [slice(None)] * t.dim()

    def block(sel: tuple[_Run, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        out_index, in_index = list(index), list(index)
        for a, (p0, i0, length) in zip(axes, sel):
            out_index[a] = slice(p0, p0 + length)
            in_index[a] = slice(i0, i0 + s * (length - 1) + 1, s)
        return tuple(out_index), tuple(in_index)

    # Start from a copy of an offset that covers every output position (the centre offset of
    # "same"/"circular", any offset of "valid"): the output is written once, never zeroed.
    full = next((o for o, r in enumerate(runs) if len(r) == 1 and r[0][0] == 0
                 and r[0][2] == n_out), None)
    if full is None:  # cannot happen for the paddings above; kept for safety
        out = t.new_zeros(out_shape)
    else:
        _, in_index = block((runs[full][0],) * len(axes))
        out = torch.empty(out_shape, dtype=t.dtype, device=t.device)
        out.copy_(t[in_index])
    for o, offset_runs in enumerate(runs):
        if o == full:
            continue
        for sel in product(offset_runs, repeat=len(axes)):
            out_index, in_index = block(sel)
            out[out_index] += t[in_index]
    return out


@lru_cache(maxsize=256)
def _flat_mask(spatial: tuple[int, ...], d: int, delta: int, pairs: bool, dtype: torch.dtype,
               device: str) -> torch.Tensor:
    """0/1 mask over flattened output pixels (``(P,)``, or ``(P, P)`` for pairs) whose
    coordinate ``d`` shifted by ``delta`` stays inside the image (the rest are zero
    padding)."""
    coords = torch.arange(math.prod(spatial), device=device)
    inner = math.prod(spatial[d + 1:])
    c = (coords // inner) % spatial[d] + delta
    m = ((c >= 0) & (c < spatial[d])).to(dtype)
    return m[:, None] * m[None, :] if pairs else m


def _complement(r: slice, n: int, pairs: bool) -> list[tuple]:
    """Index tuples (on trailing axes) of the part of ``range(n)`` (pairs: of
    ``range(n) x range(n)``) outside ``r`` (pairs: outside ``r x r``)."""
    outside = [sl for sl in (slice(0, r.start), slice(r.stop, n)) if sl.stop > sl.start]
    if not pairs:
        return [(Ellipsis, sl) for sl in outside]
    return ([(Ellipsis, sl, slice(None)) for sl in outside]
            + [(Ellipsis, r, sl) for sl in outside])


def _same_stride1_pass(t: torch.Tensor, spatial: tuple[int, ...], d: int, k: int,
                       pairs: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fast path of one dimension of a stride-1 ``"same"`` window sum: the spatial
    axes of each image are flattened to one pixel axis ``P`` (a view), so each shifted add
    runs over long contiguous stretches (``P - |shift|`` entries) instead of rows of ``W``.
    A shift along dimension ``d`` is a shift by ``delta * prod(spatial[d+1:])`` of ``P``;
    positions whose coordinate ``d`` leaves the image are excluded by the range for the
    outermost dimension and by a 0/1 mask (one fused multiply-add) for the others. Exact:
    the mask multiplies by 0 or 1 (a non-finite entry next to the border would turn into
    NaN instead of being dropped; the evaluator refuses non-finite tiles anyway). Only
    additions (and exact multiplications by 0 or 1), so every entry is rounded the same way
    wherever it sits in the tensor. ``out``: a contiguous tensor of ``t``'s shape to write
    into (not under autograd)."""
    ndim = len(spatial)
    n_pix = math.prod(spatial)
    batch = t.shape[:t.dim() - (2 * ndim if pairs else ndim)]
    flat_shape = (*batch, n_pix, n_pix) if pairs else (*batch, n_pix)
    src = t.reshape(flat_shape)
    # out= writes are not differentiable: under autograd, start from a copy of the centre.
    first = not (torch.is_grad_enabled() and t.requires_grad)
    if out is not None and first:
        out = out.view(flat_shape)
    elif first:
        out = torch.empty(flat_shape, dtype=t.dtype, device=t.device)
    else:
        out = src.clone(memory_format=torch.contiguous_format)
    before = (k - 1) // 2
    step = math.prod(spatial[d + 1:])
    fused = first
    for o in range(k):
        delta = o - before
        if delta == 0 or abs(delta) >= spatial[d]:
            continue  # the centre is the first write's base; a window in the padding adds 0
        shift = delta * step
        lo, hi = max(0, -shift), n_pix - max(0, shift)
        r_out, r_in = slice(lo, hi), slice(lo + shift, hi + shift)
        if pairs:
            o_view, i_view = out[..., r_out, r_out], src[..., r_in, r_in]
        else:
            o_view, i_view = out[..., r_out], src[..., r_in]
        mask = None
        if d != 0:
            mask = _flat_mask(spatial, d, delta, pairs, t.dtype, str(t.device))
            mask = mask[r_out, r_out] if pairs else mask[r_out]
        if first:
            # The first write: centre + this offset in one pass over the shifted block
            # (instead of a copy and an add), the centre alone copied to the rest.
            base = src[..., r_out, r_out] if pairs else src[..., r_out]
            if mask is None:
                torch.add(base, i_view, out=o_view)
            else:
                torch.addcmul(base, i_view, mask, out=o_view)
            for block in _complement(r_out, n_pix, pairs):
                out[block] = src[block]
            first = False
        elif mask is None:
            o_view += i_view
        else:
            o_view.addcmul_(i_view, mask)
    if fused and first:  # every offset but the centre lies in the padding
        out.copy_(src)
    return out.reshape(t.shape)


#: Bytes of input per chunk of a large stride-1 "same" window sum on the CPU: both passes
#: of a chunk run while it is in cache (measured on a 39 MB pixel-pair tile of 14x14 images,
#: 1 core: 12.7 ns per entry whole, 7.1 in chunks of 4 pairs = 1.2 MB).
CHUNK_BYTES = 1 << 21


def _same_stride1(t: torch.Tensor, spatial: tuple[int, ...], kernel_size: tuple[int, ...],
                  pairs: bool, passes: list[int]) -> torch.Tensor:
    """All passes of a stride-1 ``"same"`` window sum, chunk by chunk along the batch axes
    on the CPU (each chunk's intermediate stays in cache; the last pass writes straight
    into the output), in one piece on other devices or under autograd."""
    n_sp = 2 * len(spatial) if pairs else len(spatial)
    item = math.prod(t.shape[t.dim() - n_sp:]) * t.element_size()
    items = math.prod(t.shape[:t.dim() - n_sp])
    chunk = max(1, CHUNK_BYTES // item)
    if (t.device.type != "cpu" or items <= chunk
            or (torch.is_grad_enabled() and t.requires_grad)):
        for d in passes:
            t = _same_stride1_pass(t, spatial, d, kernel_size[d], pairs)
        return t
    src = t.reshape((items,) + tuple(t.shape[t.dim() - n_sp:]))
    out = torch.empty(src.shape, dtype=t.dtype, device=t.device)
    for start in range(0, items, chunk):
        part = src[start:start + chunk]
        for j, d in enumerate(passes):
            target = out[start:start + chunk] if j == len(passes) - 1 else None
            part = _same_stride1_pass(part, spatial, d, kernel_size[d], pairs, out=target)
    return out.view(t.shape)


def _spatial_shape(t: torch.Tensor, ndim: int, pairs: bool, name: str) -> tuple[int, ...]:
    n_spatial = 2 * ndim if pairs else ndim
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} needs a floating-point tensor; got "
                        f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}.")
    if t.dim() < n_spatial:
        raise ValueError(f"{name}: a tensor with {n_spatial} trailing spatial axes expected "
                         f"({ndim}-d {'pixel pairs' if pairs else 'pixels'}); got shape "
                         f"{tuple(t.shape)}.")
    shape = tuple(t.shape[t.dim() - n_spatial:])
    if pairs and shape[:ndim] != shape[ndim:]:
        raise ValueError(f"{name}: pixel pairs need the same spatial shape for both images; "
                         f"got {shape[:ndim]} and {shape[ndim:]}.")
    return shape[:ndim]


def window_sum(t: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int] | int = 1,
               padding: str = "same", pairs: bool = False, *,
               scale: float | torch.Tensor = 1.0, bias: float | torch.Tensor = 0.0,
               add: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the window offsets of a convolution, at the same offset in both images.

    ``t`` has shape ``B + S`` (module docstring), ``d = len(kernel_size)`` spatial
    dimensions. Returns, with ``t_pad`` the padded ``t`` (zeros for ``"same"``, wrapped for
    ``"circular"``) and ``o`` running over the ``prod(kernel_size)`` window offsets,

    * ``pairs=False``: ``out[p] = Σ_o t_pad[s·p + o]``, shape ``B + S_out``;
    * ``pairs=True``: ``out[p, q] = Σ_o t_pad[s·p + o, s·q + o]``, shape
      ``B + S_out + S_out``;

    where ``S_out`` follows :func:`output_size` per dimension. The SUM, not the mean: a
    convolution with ``W_std² / (C k^d)`` variance per weight scales it. Cost: ``d`` passes,
    each one copy plus ``k_i - 1`` shifted in-place adds over the (shrinking) tensor.

    ``scale``, ``bias``, ``add``: return ``scale * out + bias + add`` instead (``add`` a
    tensor of the output's shape, or broadcastable to it) -- a convolution's
    ``Σ' = W_std²/|w| · Σ_o Σ + b_std²`` and ``Θ' = Σ' + W_std²/|w| · Σ_o Θ`` -- in place on
    the fresh sum (no temporaries), bit for bit the unfused expression. Tensor
    ``scale``/``bias`` (kernel learning) are applied out of place, so gradients flow to
    them. The result is always a fresh tensor.
    """
    kernel_size = tuple(kernel_size) if not isinstance(kernel_size, int) else (kernel_size,)
    ndim = len(kernel_size)
    kernel_size = _as_tuple(kernel_size, ndim, "kernel_size")
    stride = _as_tuple(stride, ndim, "stride")
    padding = _check_padding(padding)
    spatial = _spatial_shape(t, ndim, pairs, "window_sum")
    # Dimensions that shrink the tensor most go first, so later passes touch less memory.
    order = sorted(range(ndim), key=lambda d: output_size(spatial[d], kernel_size[d],
                                                          stride[d], padding)[0] / spatial[d])
    if isinstance(scale, torch.Tensor) or isinstance(bias, torch.Tensor):
        out = window_sum(t, kernel_size, stride, padding, pairs)
        out = out * scale + bias
        return out if add is None else out + add
    scale, bias = float(scale), float(bias)
    if padding == "same" and all(st == 1 for st in stride):
        # The common case (3x3 "same" convolutions): flattened-pixel shifted adds, with
        # the scale on the first pass and the constant terms on the last.
        passes = [d for d in range(ndim) if kernel_size[d] > 1]
        if not passes:
            return _affine_(t.clone(memory_format=torch.contiguous_format), scale, bias, add)
        return _affine_(_same_stride1(t, spatial, kernel_size, pairs, passes), scale, bias,
                        add)
    for d in order:
        if pairs:
            axes = (d - 2 * ndim, d - ndim)
        else:
            axes = (d - ndim,)
        t = _shift_sum(t, axes, spatial[d], kernel_size[d], stride[d], padding)
    return _affine_(t, scale, bias, add)


def _affine_(t: torch.Tensor, scale: float, bias: float, add: torch.Tensor | None
             ) -> torch.Tensor:
    """``t * scale + bias + add`` on the fresh tensor ``t``, in place: one rounding per
    operation, in this order, so the result is bit for bit the unfused expression whatever
    the tensor's shape (no fused multiply-add, whose vector lanes and scalar tails would
    round differently and break exact equalities between tilings and layouts)."""
    if scale != 1.0:
        t.mul_(scale)
    if bias != 0.0:
        t.add_(bias)
    if add is not None:
        t = t.add_(add) if torch.broadcast_shapes(add.shape, t.shape) == t.shape else t + add
    return t


def avg_pool(t: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int] | int | None = None,
             padding: str = "valid", pairs: bool = False) -> torch.Tensor:
    """Average pooling of each image's pixels independently.

    ``pairs=False``: ``out[p] = Σ_o t_pad[s·p + o] / prod(k)`` over the trailing ``d``
    axes. ``pairs=True``: image 1's axes and image 2's axes are pooled separately,
    ``out[p, q] = Σ_{o, o'} t_pad[s·p + o, s·q + o'] / prod(k)²`` -- the covariance of
    the pooled features. ``stride`` defaults to the window. ``"same"`` divides by the full
    window, padded zeros included (neural-tangents' ``normalize_edges=False``).
    """
    kernel_size = tuple(kernel_size) if not isinstance(kernel_size, int) else (kernel_size,)
    ndim = len(kernel_size)
    kernel_size = _as_tuple(kernel_size, ndim, "kernel_size")
    stride = kernel_size if stride is None else _as_tuple(stride, ndim, "stride")
    padding = _check_padding(padding)
    spatial = _spatial_shape(t, ndim, pairs, "avg_pool")
    n_spatial = 2 * ndim if pairs else ndim
    for a in range(n_spatial):
        d = a % ndim
        t = _shift_sum(t, (a - n_spatial,), spatial[d], kernel_size[d], stride[d], padding)
    return t * (1.0 / math.prod(kernel_size) ** (2 if pairs else 1))


def pair_diagonal(t: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """The same-pixel entries of a pixel-pair tensor: ``(..., H, W, H, W) -> (..., H, W)``
    (``ndim=1``: ``(..., L, L) -> (..., L)``). A view of ``t`` (no copy)."""
    _spatial_shape(t, ndim, True, "pair_diagonal")
    for j in range(ndim):
        # After j steps the axes are (..., image-1 rest, image-2 rest, diagonals so far):
        # diagonal() drops the first remaining axis of each image and appends their diagonal,
        # so after ndim steps the diagonals come out in spatial order.
        m = ndim - j
        t = t.diagonal(0, -(2 * m + j), -(m + j))
    return t


def mean_spatial(t: torch.Tensor, pairs: bool = False, ndim: int = 2) -> torch.Tensor:
    """The mean over the trailing spatial axes: ``B + S -> B`` (the covariance of globally
    average-pooled features when ``pairs=True``; with ``pairs=False`` the mean of the
    same-pixel entries, which is what a ``Flatten`` readout's ``1/(H W)`` scaling gives)."""
    _spatial_shape(t, ndim, pairs, "mean_spatial")
    n_spatial = 2 * ndim if pairs else ndim
    return t.mean(dim=tuple(range(-n_spatial, 0)))

