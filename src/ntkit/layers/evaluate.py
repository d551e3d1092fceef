"""The analytic evaluator: a network's infinite-width NNGP and NTK kernels, tile by tile.

It folds the network's ``kernel_map`` over :class:`~ntkit.layers.state.PairKernel` tiles and
asks the network (never its type) what it needs to know: ``uses_quadrature`` for the tile
size, ``required_layout`` (backward: the cheapest kernel-state layout that serves every
layer; for images ``"pixels"`` when the readout is ``Flatten`` and nothing pools,
``"pixel_pairs"`` when anything pools) and ``kernel_layout`` (forward: refuse, before any
tile, a network that cannot consume the inputs or does not end with one covariance per pair).

Images ``(N, C, H, W)`` and sequences ``(N, C, L)``: the input covariance is the per-pixel
channel mean ``Σ_c x_cp x'_cq / C``, and tiles are sized in *pairs × entries per pair*
(``H·W`` for ``"pixels"``, ``(H·W)²`` for ``"pixel_pairs"``), so nothing of size
``N² (H·W)²`` is ever allocated; a budget (or a device) that cannot hold one pair raises,
naming what to change. For ``"pixel_pairs"`` a diagonal pass over each input's images comes
first: it records what pooling layers need of each image (its pooled variances, on a
:class:`~ntkit.layers.state.VarianceTape`) and ``k(x, x)`` for the exact diagonal, once per
image rather than once per tile.
It lives beside the layers so that ``Layer.kernel`` needs nothing from ``ntkit.kernels``;
``ntkit.kernels.analytic`` re-exports it.

The only O(N² d) work is the input Gram ``x1 x2ᵀ``; every layer after it is elementwise on
the tile. Tiles are small enough to stay in cache, so the peak memory is the output plus a
few tiles, never several ``N x N`` temporaries. With ``x2=None`` only the tiles on and
above the diagonal are computed, and mirrored, so the result is exactly symmetric.

:func:`evaluate` is the one tiler of the analytic kernels: it walks the schedule of
:mod:`ntkit.layers.tiles` (blocks, the unit a sink stores; tiles, the unit computed) and
hands finished tiles to a sink: in-memory tensors for ``net.kernel``, a resumable zarr
store for ``ntkit.scale.kernel_matrix(out=PATH)``; a Dask block is one ``net.kernel`` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .._validation import (_describe_rows, as_input_pair, available_memory, format_bytes,
                           resolve_dtype)
from .state import (DENSE, PIXEL_PAIRS, PIXELS, PairKernel, VarianceTape, is_branches,
                    strongest)
from .activations import fused
from .tiles import Sink, TensorSink, block_schedule, progress_bar, spans, tile_schedule

if TYPE_CHECKING:
    from .base import Layer

KERNEL_NAMES = ("nngp", "ntk")
# Bytes of elementwise workspace per tile entry: about a dozen live temporaries per layer.
_WORKSPACE_FACTOR = 16
_DEFAULT_TILE = 512
# Default tile of the "pixels" layout, in entries of one tensor (16 MiB in float64).
_SPATIAL_TILE_ENTRIES = 1 << 21
# Default tile of the "pixel_pairs" layout on the CPU (6 MiB per float64 tensor: 4 x 4 pairs
# of 14x14 images). Pooled variances come from the tape, so small tiles cost no extra work,
# and a tile whose dozen passes per layer stay near the caches beats a DRAM-bound one:
# measured on this project's 2-core machine, 1 thread, nk.cnn(3, 64, pool="gap"), 14x14,
# fused dual: 1.9-2.1 ms per entry at 3x3 or 4x4 pairs, 2.3-2.5 at 7x7 (the old 1 << 21).
# One pair per tile is slower again (3.7: the per-tile Python work dominates).
_PAIR_TILE_ENTRIES = 3 << 18
# On a GPU a tile's ~100 kernel launches cost ~1 ms whatever its size, and memory is
# plentiful: 32M entries (256 MiB per float64 tensor) keep the launches negligible.
_SPATIAL_TILE_ENTRIES_CUDA = 1 << 25


@dataclass
class Kernels:
    """Infinite-width kernels: ``nngp`` and ``ntk`` are ``(N1, N2)`` per-output kernels (or
    ``(N1,)`` diagonals); an entry is ``None`` when it was not requested. The kernel over
    ``n_out`` outputs is ``k ⊗ I_{n_out}``."""

    nngp: torch.Tensor | None = None
    ntk: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in KERNEL_NAMES:
            raise KeyError(f"{name!r}; kernels are {KERNEL_NAMES}")
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"{name!r} was not computed; pass get=({name!r}, ...)")
        return value


def normalize_get(get: str | Sequence[str]) -> tuple[str, ...]:
    names = (get,) if isinstance(get, str) else tuple(get)
    if not names or any(n not in KERNEL_NAMES for n in names):
        raise ValueError(f"get must be 'nngp', 'ntk' or a tuple of them; got {get!r}.")
    return names


def _tile_size(memory_budget: int | None, n_kernels: int, itemsize: int, heavy: bool) -> int:
    """The side of a square tile of input pairs in the ``"dense"`` layout."""
    if memory_budget is None:
        return 256 if heavy else _DEFAULT_TILE
    per_entry = _WORKSPACE_FACTOR * (n_kernels + 1) * itemsize * (64 if heavy else 1)
    side = int(math.sqrt(max(memory_budget, 1) / per_entry))
    if side < 1:
        raise ValueError(f"memory_budget={memory_budget} bytes is too small for even one "
                         f"kernel entry ({per_entry} bytes); raise it.")
    return side


def _spatial_tile_size(memory_budget: int | None, n_kernels: int, itemsize: int, heavy: bool,
                       layout: str, per_pair: int, spatial: tuple[int, ...],
                       device: torch.device | None = None) -> int:
    """The side ``b`` of a square tile of image pairs in a spatial layout: ``per_pair``
    entries per pair (``|S|``), so ``b²·|S|`` entries per tile tensor. Raises ValueError,
    naming what to change, when not even one pair fits the budget (or, without a budget,
    the device's free memory)."""
    per_pair_bytes = (_WORKSPACE_FACTOR * (n_kernels + 1) * itemsize * (64 if heavy else 1)
                      * per_pair)
    cuda = device is not None and torch.device(device).type == "cuda"
    if memory_budget is None:
        free = available_memory(device if device is not None else "cpu")
        if per_pair_bytes > free:
            _raise_no_pair(f"only {format_bytes(free)} is free on "
                           f"{device if device is not None else 'cpu'}", per_pair_bytes,
                           layout, per_pair, spatial,
                           f"Use a machine (or GPU) with {format_bytes(per_pair_bytes)} free")
        target = (_SPATIAL_TILE_ENTRIES_CUDA if cuda else
                  _PAIR_TILE_ENTRIES if layout == PIXEL_PAIRS else _SPATIAL_TILE_ENTRIES)
        target //= 4 if heavy else 1
        return max(1, math.isqrt(target // per_pair))
    side = math.isqrt(max(memory_budget, 1) // per_pair_bytes)
    if side < 1:
        _raise_no_pair(f"memory_budget={memory_budget} bytes cannot hold one tile",
                       per_pair_bytes, layout, per_pair, spatial,
                       f"Raise memory_budget to at least {per_pair_bytes}")
    return side


def _raise_no_pair(why: str, need: int, layout: str, per_pair: int,
                   spatial: tuple[int, ...], remedy: str) -> None:
    what = ("every pixel pair's covariance, which pooling needs" if layout == PIXEL_PAIRS
            else "each pixel's covariance")
    raise ValueError(
        f"{why}: one pair of inputs of spatial size {'x'.join(map(str, spatial))} needs "
        f"{format_bytes(need)} of workspace in the {layout!r} layout ({per_pair} entries per "
        f"pair: {what}). {remedy}, or use smaller images (downsample)" + (
            ", or read out by Flatten() instead of pooling (H·W entries per pair)."
            if layout == PIXEL_PAIRS else "."))


def input_layout(net: Layer, t: torch.Tensor) -> str:
    """The kernel-state layout of ``net``'s inputs ``t``, checked against the network.

    Flat rows ``(N, d)`` give ``"dense"``. Images and sequences give ``"pixel_pairs"`` if
    some layer needs every pixel pair (``net.required_layout``, asked from the readout
    backwards), else ``"pixels"``; their shape is checked through the network
    (``net.out_dim``: windows that do not fit, kernel sizes of the wrong dimension). Raises
    ValueError, before any tile, for a network that cannot consume the layout or does not end
    with one covariance per pair of inputs.
    """
    if t.dim() == 2:
        layout = DENSE
    else:
        layout = PIXEL_PAIRS if strongest(net.required_layout(DENSE)) == PIXEL_PAIRS else PIXELS
        net.out_dim(torch.Size(t.shape[1:]))
    out = net.kernel_layout(layout)
    if is_branches(out):
        raise ValueError(f"The network ends with {len(out)} branches; end it with FanInSum().")
    if out != DENSE:
        raise ValueError(
            f"The network ends with per-pixel covariances ({out!r} layout) of inputs of shape "
            f"{tuple(t.shape[1:])}: end it with nk.Flatten() or nk.GlobalAvgPool() and a "
            "Dense readout, so that each pair of inputs gets one kernel value.")
    return layout


def _final(state: Any) -> PairKernel:
    if not isinstance(state, PairKernel):
        raise ValueError(f"The network ends with {len(state)} branches; end it with FanInSum().")
    return state


def _row_fingerprints(t: torch.Tensor) -> torch.Tensor:
    """An integer per row, equal for equal rows: the sum of the rows' bit patterns.

    Integer sums (wrapping in int32) are exact and order-free, so equal rows get equal
    fingerprints whatever the reduction order; ``+ 0.0`` maps -0.0 to 0.0 first. One pass
    over the inputs, where ``torch.unique(dim=0)`` sorts whole rows.
    """
    bits = (t.detach() + 0.0).contiguous().reshape(t.shape[0], -1)
    if t.element_size() == 2:
        return bits.view(torch.int16).sum(dim=1, dtype=torch.int32)
    return bits.view(torch.int32).sum(dim=1, dtype=torch.int32)


def _shared_row_ids(t1: torch.Tensor, t2: torch.Tensor | None):
    """Ids that are equal exactly where a row of ``t1`` equals a row of ``t2`` (or, with
    ``t2=None``, another row of ``t1``); ``(None, None)`` if no row is shared.

    For x = x' the correlation must be exactly 1: the gemm value of x·x' differs from |x|² in
    the last bit, which arccos turns into a 1e-8 error of the ReLU-family kernels. Rows are
    first grouped by a cheap fingerprint; only rows whose fingerprint recurs are compared
    exactly.
    """
    rows = t1 if t2 is None else torch.cat([t1, t2])
    n1 = t1.shape[0]
    _, group, counts = torch.unique(_row_fingerprints(rows), return_inverse=True,
                                    return_counts=True)
    candidates = (counts[group] > 1).nonzero().flatten()
    if candidates.numel() == 0:
        return None, None
    _, exact = torch.unique(rows[candidates], dim=0, return_inverse=True)
    # Unique ids: rows outside every candidate group keep their own index; candidates share
    # the id (offset past every index) of their exact-equality class.
    ids = torch.arange(rows.shape[0], device=rows.device)
    ids[candidates] = rows.shape[0] + exact
    if t2 is None:
        if candidates.numel() == int(exact.max()) + 1:
            return None, None  # fingerprints collided, but no two rows are equal
        return ids, ids
    ids1, ids2 = ids[:n1], ids[n1:]
    if not bool(torch.isin(ids1, ids2).any()):
        return None, None
    return ids1, ids2


def _upper_mask(size: int, device: torch.device) -> torch.Tensor:
    """``(size, size)`` bool mask of the upper triangle, diagonal included."""
    return torch.ones(size, size, dtype=torch.bool, device=device).triu_()


def _mirror_upper(tile: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The square ``tile`` with its strict lower triangle replaced by the upper one.

    Elementwise maps are symmetric in their two arguments only up to rounding: the
    vectorised body and the scalar tail of a loop, or FMA contraction, may round the
    (i, j) and (j, i) entries differently depending on the machine. Copying one triangle
    makes ``K == K.T`` hold by construction, at one pass over the tile.
    """
    m = tile.shape[0]
    return torch.where(upper[:m, :m], tile, tile.T)


def _not_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: does ``t`` hold NaN or infinity? One pass, no mask, no sync."""
    lo, hi = torch.aminmax(t.detach())
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def _overflow_error(net: Layer, names: tuple[str, ...], dtype: torch.dtype,
                    inputs: Sequence[tuple[str, torch.Tensor]],
                    results: dict[str, torch.Tensor] | None, offset: int = 0,
                    row_offsets: Sequence[int] | None = None) -> ValueError:
    """The error for a non-finite kernel, naming the rows that cause it.

    A kernel entry is bounded by its rows' self-kernels, so the rows to blame are those
    whose self-kernel ``k(x, x)`` is not finite: found in O(N d) by the diagonal mode. If no
    self-kernel overflows (an activation misbehaving off the diagonal), the rows holding
    non-finite entries are named instead, from ``results``: the whole kernels, or one tile
    whose first row is row ``offset`` of the first input. ``row_offsets`` shifts the rows
    named for each input (a block of a larger input, as in a Dask block).
    """
    parts: list[str] = []
    largest = 0.0
    for index, (label, t) in enumerate(inputs):
        with torch.no_grad():
            diag = _diagonal_kernels(net, t.detach(), names)
        # The input's own Gram entry, then what the network makes of it.
        flat = t.detach().reshape(t.shape[0], -1)
        bad = ~torch.isfinite(torch.linalg.vecdot(flat, flat) / flat.shape[1])
        for name in names:
            bad |= ~torch.isfinite(getattr(diag, name))
        rows = bad.nonzero().flatten()
        if rows.numel():
            if row_offsets is not None:
                rows = rows + row_offsets[index]
            parts.append(f"rows [{_describe_rows(rows.cpu())}] of {label}")
            local = rows - (row_offsets[index] if row_offsets is not None else 0)
            largest = max(largest, float(t.detach()[local].abs().max()))
    if not parts and results is not None:
        for name in names:
            bad = ~torch.isfinite(results[name])
            if bool(bad.any()):
                rows = bad.any(dim=1).nonzero().flatten().cpu() + offset
                parts.append(f"rows [{_describe_rows(rows)}]"
                             f" of {inputs[0][0]} (entries off the diagonal)")
                break
    where = " and ".join(parts) if parts else "some rows"
    scale = f" Their largest |feature| is {largest:.3g}." if largest else ""
    remedy = ("rescale the inputs (e.g. standardise the features)"
              + (" or compute in dtype=torch.float64" if dtype != torch.float64 else "")
              + ", or reduce W_std or the depth if the network amplifies its input")
    return ValueError(
        f"The {'/'.join(names)} kernel is not finite (NaN or infinity) for {where}: the "
        f"kernel values overflow {dtype} (largest finite value "
        f"{torch.finfo(dtype).max:.3g}).{scale} To fix it, {remedy}.")


def _diagonal_kernels(net: Layer, t1: torch.Tensor, names: tuple[str, ...],
                      memory_budget: int | None = None) -> Kernels:
    """``k(x, x)`` for each row of ``t1``: ``(N,)`` kernels in O(N d) (images: in chunks of
    rows sized like tiles, each image with its own pixels)."""
    if t1.dim() == 2:
        n0 = t1.shape[1]
        var = (t1 * t1).sum(dim=1) / n0
        mean = t1.sum(dim=1) / n0  # per-row feature means: LayerNorm centres by them
        state = PairKernel(cov=var, var1=var, var2=var,
                           ntk=torch.zeros_like(var) if "ntk" in names else None, width=n0,
                           diagonal=True, mean1=mean, mean2=mean, gaussian=False)
        final = _final(net.kernel_map(state))
        return Kernels(nngp=final.cov if "nngp" in names else None,
                       ntk=final.ntk if "ntk" in names else None)
    layout = input_layout(net, t1)
    kernels, _ = _image_diagonal(net, _Images(t1), names, layout, memory_budget)
    return kernels


def _image_diagonal(net: Layer, images: _Images, names: tuple[str, ...], layout: str,
                    memory_budget: int | None) -> tuple[Kernels, list[torch.Tensor]]:
    """The diagonal pass over images: ``k(x, x)`` per image, and (``"pixel_pairs"``) the
    variances every pooling layer records on a :class:`VarianceTape`, joined over chunks:
    what the tiles of pairs replay. Each chunk holds its images' self covariances,
    ``(n, *S, *S)``, so chunks are sized like tiles."""
    itemsize = torch.finfo(images.x.dtype).bits // 8
    side = _spatial_tile_size(memory_budget, len(names), itemsize, bool(net.uses_quadrature),
                              layout, images.entries(layout), images.spatial, images.x.device)
    zero = images.x.new_zeros(())
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    tapes: list[list[torch.Tensor]] = []
    for rows in spans(images.x.shape[0], side * side):
        cov, mean = images.self_state(rows, layout)
        tape = VarianceTape() if layout == PIXEL_PAIRS else None
        state = PairKernel(cov=cov, var1=cov, var2=cov, ntk=zero if "ntk" in names else None,
                           width=images.channels, diagonal=True, layout=layout,
                           mean1=mean[0], mean2=mean[1], gaussian=False, tape=tape)
        final = _final(net.kernel_map(state))
        for name in names:
            parts[name].append(final.cov if name == "nngp" else final.ntk)
        if tape is not None:
            tapes.append(tape.recorded)
    joined = {name: torch.cat(parts[name]) for name in names}
    recorded = [torch.cat(chunk) for chunk in zip(*tapes)] if tapes else []
    return Kernels(nngp=joined.get("nngp"), ntk=joined.get("ntk")), recorded


class _Images:
    """Images ``(N, C, *S)`` as ``(N, C, P)`` pixels, and the covariances every tile of them
    starts from: the per-pixel channel mean of products, ``Σ_c x_cp x'_cq / C``."""

    def __init__(self, t: torch.Tensor):
        self.channels, self.spatial = t.shape[1], tuple(t.shape[2:])
        self.d = len(self.spatial)
        self.x = t.reshape(t.shape[0], self.channels, -1)
        self.pixels = self.x.shape[2]
        # Per-pixel self variances and channel means, (N, P): O(N C P), once.
        self.var = (self.x * self.x).sum(dim=1) / self.channels
        self.mean = self.x.sum(dim=1) / self.channels

    def entries(self, layout: str) -> int:
        return self.pixels * self.pixels if layout == PIXEL_PAIRS else self.pixels

    @staticmethod
    def entries_of(t: torch.Tensor, layout: str) -> int:
        """Entries per pair of images ``t`` (``(N, C, *S)``) in ``layout``."""
        pixels = math.prod(t.shape[2:])
        return pixels * pixels if layout == PIXEL_PAIRS else pixels

    def self_state(self, rows: slice, layout: str):
        """``cov`` ``(n, *S)`` or ``(n, *S, *S)`` of the rows with themselves, and the means
        shaped like its two marginals."""
        n, s = rows.stop - rows.start, self.spatial
        mean = self.mean[rows]
        if layout == PIXELS:
            m = mean.reshape((n,) + s)
            return self.var[rows].reshape((n,) + s), (m, m)
        ones = (1,) * self.d
        return (self._self_pairs(rows).reshape((n,) + s + s),
                (mean.reshape((n,) + s + ones), mean.reshape((n,) + ones + s)))

    def _self_pairs(self, rows: slice) -> torch.Tensor:
        x = self.x[rows]
        return torch.bmm(x.transpose(1, 2), x).div_(self.channels)  # (n, P, P)


def check_dense_fits(n1: int, n2: int, dtype: torch.dtype, device: torch.device,
                     what: str = "kernel", count: int = 1) -> None:
    """Raise ``MemoryError`` if ``count`` dense ``(n1, n2)`` arrays would not fit on
    ``device``: checked before anything is allocated, naming the size and the remedies."""
    need = n1 * n2 * (torch.finfo(dtype).bits // 8) * count
    free = available_memory(device)
    if need > 0.9 * free:
        raise MemoryError(
            f"The dense {n1} x {n2} {what} needs {format_bytes(need)} but only "
            f"{format_bytes(free)} is available on {device}. Write it to disk tile by tile with "
            "ntkit.scale.kernel_matrix(net, X, out=PATH), or solve without forming it with "
            "ntkit.scale.solve(net, X, y, method='cg', preconditioner='nystrom').")


def analytic_kernel(net: Layer, x1: Any, x2: Any | None = None,
                    get: str | Sequence[str] = KERNEL_NAMES, diagonal: bool = False, *,
                    dtype: Any = None, memory_budget: int | None = None,
                    out: dict[str, torch.Tensor] | None = None) -> Kernels:
    """Compute ``net``'s infinite-width kernels; see :meth:`ntkit.layers.base.Layer.kernel`.

    ``out`` may supply preallocated ``(N1, N2)`` tensors by name; they are filled in place
    (a :class:`~ntkit.layers.tiles.TensorSink`). Other destinations (a zarr store, a Dask
    block) call :func:`evaluate` with their own sink.

    A kernel that is not finite raises ``ValueError`` naming the rows of ``x1``/``x2`` whose
    self-kernels overflow. The result is differentiable with respect to inputs that require
    grad (and tensor hyperparameters such as ``Dense(W_std=tensor)``); tiles are then joined
    by concatenation rather than written in place.
    """
    names = normalize_get(get)
    dtype = resolve_dtype(dtype)
    t1, t2 = as_input_pair(x1, x2, dtype=dtype)
    input_layout(net, t1)  # refuse a network that cannot take these inputs, before any tile

    if diagonal:
        if t2 is not None:
            raise ValueError("diagonal=True computes k(x, x) for x1 only; pass x2=None.")
        kernels = _diagonal_kernels(net, t1, names, memory_budget)
        if bool(_not_finite(torch.stack([getattr(kernels, n) for n in names]))):
            raise _overflow_error(net, names, dtype, [("x1", t1)], None)
        return kernels

    n1, n2 = t1.shape[0], (t1 if t2 is None else t2).shape[0]
    if out is None:
        check_dense_fits(n1, n2, dtype, t1.device, f"{'/'.join(names)} kernel", len(names))
    else:
        for name in names:
            if tuple(out[name].shape) != (n1, n2):
                raise ValueError(f"out[{name!r}] has shape {tuple(out[name].shape)}; "
                                 f"need {(n1, n2)}.")
    sink = TensorSink(n1, n2, t2 is None, out)
    evaluate(net, t1, t2, names, sink, memory_budget=memory_budget)
    results = sink.results
    return Kernels(nngp=results.get("nngp"), ntk=results.get("ntk"))


@dataclass
class _Pair:
    """One evaluation's validated inputs and what every tile reads from them."""

    net: Layer
    t1: torch.Tensor
    t2: torch.Tensor  # t1 itself for a symmetric kernel
    names: tuple[str, ...]
    symmetric: bool
    sq1: torch.Tensor  # (N1,) input Gram diagonal x.x / d
    sq2: torch.Tensor
    ids1: torch.Tensor | None  # equal ids mark equal rows (see _shared_row_ids)
    ids2: torch.Tensor | None
    upper: torch.Tensor | None  # upper-triangle mask of the largest tile (symmetric only)
    zero: torch.Tensor  # the NTK of the raw input: 0-d, broadcast without filling a tile
    layout: str = DENSE  # of the input state (see input_layout)
    images1: _Images | None = None  # images/sequences: their pixels (None for flat rows)
    images2: _Images | None = None
    recorded1: list[torch.Tensor] | None = None  # pooled variances of images1 ("pixel_pairs")
    recorded2: list[torch.Tensor] | None = None
    self1: Kernels | None = None  # k(x, x) of images1 from the diagonal pass ("pixel_pairs")


def evaluate(net: Layer, t1: torch.Tensor, t2: torch.Tensor | None, names: tuple[str, ...],
             sink: Sink, *, block: int | None = None, memory_budget: int | None = None,
             progress: str | None = None, labels: tuple[str, str] = ("x1", "x2")) -> None:
    """Write ``net``'s kernels ``names`` of validated inputs into ``sink``, block by block.

    This is the one tiler of ntkit's analytic kernels (:mod:`ntkit.layers.tiles` defines
    the schedule, blocks and tiles). ``t1`` is ``(N1, d)``, ``t2`` is ``(N2, d)`` or ``None``
    for the symmetric ``k(t1, t1)``: finite floating tensors of one dtype and device, as
    :func:`~ntkit._validation.as_input_pair` returns them (not checked again). ``block`` is
    the side of the square blocks ``sink`` receives (``None``: one block, the whole kernel);
    tiles are sized from ``memory_budget``. ``progress`` is the description of a tqdm bar
    over blocks, or ``None`` for none. ``labels`` name the inputs in error messages.

    Raises ``ValueError`` for a non-finite kernel, naming the (global) rows of the inputs
    whose self-kernels overflow; a ``durable`` sink is never handed a non-finite tile.
    """
    layout = input_layout(net, t1)
    # Big convolutional evaluations may compile fused duals (activations/fused.py); dense
    # ones keep the eager path (cache-sized tiles, already near their floor).
    work = (0 if layout == DENSE else
            t1.shape[0] * (t1 if t2 is None else t2).shape[0] * _Images.entries_of(t1, layout))
    with fused.allowed(work):
        _evaluate(net, t1, t2, names, sink, block, memory_budget, progress, labels, layout)


def _evaluate(net, t1, t2, names, sink, block, memory_budget, progress, labels, layout):
    p = _prepare(net, t1, t2, names, labels, layout)
    n1, n2 = p.t1.shape[0], p.t2.shape[0]
    itemsize = torch.finfo(t1.dtype).bits // 8
    images = p.images1
    heavy = bool(net.uses_quadrature)
    if layout == PIXEL_PAIRS:
        # Every image's pooled variances, once (N (H W)² work, beside N1 N2 (H W)²).
        p.self1, p.recorded1 = _image_diagonal(net, p.images1, names, layout, memory_budget)
        p.recorded2 = (p.recorded1 if p.symmetric else
                       _image_diagonal(net, p.images2, ("nngp",), layout, memory_budget)[1])
    size = (_tile_size(memory_budget, len(names), itemsize, heavy) if images is None else
            _spatial_tile_size(memory_budget, len(names), itemsize, heavy, layout,
                               images.entries(layout), images.spatial, t1.device))
    block = max(n1, n2, 1) if block is None else block
    if p.symmetric:
        p.upper = _upper_mask(min(size, block, n1), t1.device)
    inputs = _labelled(p, labels)
    blocks = list(block_schedule(n1, n2, block, p.symmetric))
    bar = progress_bar(len(blocks), progress)
    # One 0-d flag accumulated on the device: no host sync per tile (but per tile for a
    # durable sink, so that a non-finite tile is refused before it is stored).
    not_finite = torch.zeros((), dtype=torch.bool, device=t1.device)
    for i, j, rows, cols in blocks:
        if sink.wants(i, j, rows, cols):
            for tile_rows, tile_cols in tile_schedule(rows, cols, size, p.symmetric):
                tiles = _compute_tile(p, tile_rows, tile_cols)
                for tile in tiles.values():
                    not_finite |= _not_finite(tile)
                if sink.durable and bool(not_finite):
                    raise _overflow_error(net, names, t1.dtype, inputs, tiles, tile_rows.start)
                sink.write(tile_rows, tile_cols, tiles)
            sink.finish(i, j, rows, cols)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if bool(not_finite):
        raise _overflow_error(net, names, t1.dtype, inputs, getattr(sink, "results", None))


def _labelled(p: _Pair, labels: tuple[str, str]) -> list[tuple[str, torch.Tensor]]:
    return [(labels[0], p.t1)] if p.symmetric else [(labels[0], p.t1), (labels[1], p.t2)]


def _prepare(net: Layer, t1: torch.Tensor, t2: torch.Tensor | None, names: tuple[str, ...],
             labels: tuple[str, str], layout: str = DENSE) -> _Pair:
    symmetric = t2 is None
    t2 = t1 if symmetric else t2
    f1, f2 = t1.reshape(t1.shape[0], -1), t2.reshape(t2.shape[0], -1)
    n0 = f1.shape[1]
    sq1 = torch.linalg.vecdot(f1, f1) / n0
    sq2 = sq1 if symmetric else torch.linalg.vecdot(f2, f2) / n0
    ids1, ids2 = _shared_row_ids(f1, None if symmetric else f2)
    p = _Pair(net, t1, t2, names, symmetric, sq1, sq2, ids1, ids2, None,
              torch.zeros((), dtype=t1.dtype, device=t1.device), layout)
    if layout != DENSE:
        p.images1 = _Images(t1)
        p.images2 = p.images1 if symmetric else _Images(t2)
    # An input whose own Gram entry overflows has no usable kernel, even where a layer
    # would turn inf into a finite number (LayerNorm: x.x'/sqrt(inf) = 0): refuse it here.
    if bool(_not_finite(sq1) | _not_finite(sq2)):
        raise _overflow_error(net, names, t1.dtype, _labelled(p, labels), None)
    return p


def _compute_tile(p: _Pair, rows: slice, cols: slice) -> dict[str, torch.Tensor]:
    """The ``(len(rows), len(cols))`` tiles of ``p``'s kernels by name. A tile on the
    diagonal of a symmetric kernel is exactly symmetric, with the exact diagonal."""
    on_diagonal = p.symmetric and cols == rows
    state = _input_state(p, rows, cols, on_diagonal)
    final = _final(p.net.kernel_map(state))
    tiles = {}
    for name in p.names:
        tile = final.cov if name == "nngp" else final.ntk
        if on_diagonal and p.self1 is not None:
            # k(x, x) as the diagonal pass (diagonal=True) computed it: the tile's entries
            # for x = x' took the pixel-pair path, which may differ in the last bit.
            tile = tile.clone() if tile.requires_grad else tile
            tile.diagonal().copy_(p.self1[name][rows])
        tiles[name] = _mirror_upper(tile, p.upper) if on_diagonal else tile
    return tiles


def _input_state(p: _Pair, rows: slice, cols: slice, on_diagonal: bool) -> PairKernel:
    """The kernel state of the raw inputs ``x1[rows]``, ``x2[cols]`` in ``p.layout``.

    Entries of equal rows (and the diagonal of a symmetric tile) are copied from the self
    covariances, so that their correlations are exactly 1 where they should be: a gemm entry
    may differ from a row's own products in the last bit, which arccos amplifies to ~1e-8.
    """
    same = p.ids1[rows, None] == p.ids2[None, cols] if p.ids1 is not None else None
    if p.layout == DENSE:
        n0 = p.t1.shape[1]
        t1, t2 = p.t1, p.t2
        cov = (t1[rows] @ t2[cols].T).div_(n0)
        if same is not None:
            cov = torch.where(same, p.sq1[rows, None].expand_as(cov), cov)
        if on_diagonal:
            # A Gram tile from gemm is symmetric only up to rounding, and its diagonal may
            # differ from the row norms in the last bit. Make both exact.
            cov = _mirror_upper(cov, p.upper)
            cov.diagonal().copy_(p.sq1[rows])
        # Per-row feature means (O(tile x d), beside the O(tile² x d) Gram): LayerNorm
        # centres by them.
        return PairKernel(cov=cov, var1=p.sq1[rows, None], var2=p.sq2[None, cols],
                          ntk=p.zero if "ntk" in p.names else None, width=n0,
                          mean1=t1[rows].sum(dim=1, keepdim=True) / n0,
                          mean2=(t2[cols].sum(dim=1) / n0)[None, :], gaussian=False)
    im1, im2 = p.images1, p.images2
    b1, b2 = rows.stop - rows.start, cols.stop - cols.start
    a, b = im1.x[rows], im2.x[cols]  # (B1, C, P), (B2, C, P)
    spatial, d, channels = im1.spatial, im1.d, im1.channels
    if on_diagonal:
        eye = torch.eye(b1, dtype=torch.bool, device=a.device)
        same = eye if same is None else same | eye
    if same is not None and not bool(same.any()):
        same = None
    if p.layout == PIXELS:
        # (P, B1, C) @ (P, C, B2): one small gemm per pixel.
        cov = torch.bmm(a.permute(2, 0, 1), b.permute(2, 1, 0)).permute(1, 2, 0)
        cov = cov.div_(channels).reshape((b1, b2) + spatial)
        var1 = im1.var[rows].reshape((b1, 1) + spatial)
        var2 = im2.var[cols].reshape((1, b2) + spatial)
        mean1 = im1.mean[rows].reshape((b1, 1) + spatial)
        mean2 = im2.mean[cols].reshape((1, b2) + spatial)
        if same is not None:
            cov = torch.where(same.view((b1, b2) + (1,) * d), var1, cov)
        tape = None
    else:
        # (B1 P, C) @ (C, B2 P), then pixel axes after the pair axes: every pixel pair.
        g = a.transpose(1, 2).reshape(-1, channels) @ b.permute(1, 0, 2).reshape(channels, -1)
        g = g.div_(channels) if not g.requires_grad else g / channels
        # One copy puts the pixel axes after the pair axes.
        cov = g.view(b1, im1.pixels, b2, im1.pixels).permute(0, 2, 1, 3).reshape(
            (b1, b2) + spatial + spatial)
        if same is not None:
            # Equal images: the self covariances exactly as the diagonal pass computed them.
            self1 = im1.self_state(rows, PIXEL_PAIRS)[0].unsqueeze(1)
            cov = torch.where(same.view((b1, b2) + (1,) * (2 * d)), self1, cov)
        ones = (1,) * d
        var1 = im1.var[rows].reshape((b1, 1) + spatial + ones)
        var2 = im2.var[cols].reshape((1, b2) + ones + spatial)
        mean1 = im1.mean[rows].reshape((b1, 1) + spatial + ones)
        mean2 = im2.mean[cols].reshape((1, b2) + ones + spatial)
        tape = VarianceTape(p.recorded1, p.recorded2, rows, cols, same)
    # Means per pixel (over channels), shaped like the marginals; ntk: the raw inputs' 0.
    return PairKernel(cov=cov, var1=var1, var2=var2, ntk=p.zero if "ntk" in p.names else None,
                      width=channels, layout=p.layout, mean1=mean1, mean2=mean2,
                      gaussian=False, tape=tape)
