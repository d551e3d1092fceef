"""Kernel matrices in memory or in a resumable on-disk zarr array: :func:`kernel_matrix`.

Both destinations are sinks of the one analytic evaluator
(:func:`ntkit.layers.evaluate.evaluate`): ``tile=`` is its *block*, the unit a sink
receives, stores and resumes, and the chunk of the zarr array; inside a block the evaluator
computes cache-sized tiles (:mod:`ntkit.layers.tiles` defines both). A block does not depend
on which other blocks are computed, when, or in which process: rerunning the same ``tile``
on the same machine and thread count gives the same bits, in memory and on disk alike. A
*different* ``tile`` agrees to rounding only (BLAS sums the Gram entries in an order that
depends on the block shapes; about 1e-16 relative here). The on-disk bookkeeping
(fingerprint, checksummed block markers, verification, ownership) is :mod:`.store`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._validation import as_input_pair, check_choice, check_positive_int, resolve_dtype
from ..layers.base import Layer
from ..layers.evaluate import check_dense_fits, evaluate
from ..layers.tiles import TensorSink, block_schedule, progress_bar, spans
from ._checks import KERNEL_CHOICES, check_net
from .store import kernel_to_zarr

__all__ = ["DEFAULT_TILE", "KERNEL_CHOICES", "check_dense_fits", "check_net", "iter_tiles",
           "kernel_matrix", "kernel_tile", "tile_slices"]

DEFAULT_TILE = 2048
tile_slices = spans  # the spans of the evaluator's schedule
iter_tiles = block_schedule


def kernel_tile(net: Layer, X1: torch.Tensor, X2: torch.Tensor | None, rows: slice,
                cols: slice, get: str, symmetric: bool) -> torch.Tensor:
    """One ``(len(rows), len(cols))`` block of the kernel, for callers that consume blocks
    one at a time (the solvers' mat-vecs): the evaluator on those rows and columns, so the
    same values as :func:`kernel_matrix`'s block. A diagonal block of a symmetric kernel is
    computed with ``x2=None``, exactly symmetric as in the full computation.
    """
    if symmetric and rows == cols:
        return net.kernel(X1[rows], None, get=get, dtype=X1.dtype)[get]
    other = X1 if X2 is None else X2
    return net.kernel(X1[rows], other[cols], get=get, dtype=X1.dtype)[get]


def _progress_bar(total: int, enabled: bool, desc: str):
    return progress_bar(total, desc if enabled else None)


def kernel_matrix(net: Layer, X1: Any, X2: Any | None = None, *, get: str = "ntk",
                  tile: int = DEFAULT_TILE, out: str | os.PathLike | None = None,
                  resume: bool = True, progress: bool = True, dtype: Any = None):
    """Compute the ``(N1, N2)`` kernel ``get`` of ``net`` tile by tile.

    Args:
        net: an ntkit network (``nk.Layer``).
        X1: ``(N1, d)`` inputs (numpy or torch); the computation runs on its device.
        X2: ``(N2, d)`` inputs, or ``None`` for the symmetric ``k(X1, X1)``: then only tiles on
            and above the diagonal are computed and mirrored, so the result is exactly
            symmetric.
        get: ``"ntk"`` or ``"nngp"`` — the per-output kernel (the kernel over ``n_out``
            outputs is ``k ⊗ I``).
        tile: side of the square blocks the kernel is computed, stored and resumed in (the
            evaluator's *block*, see :mod:`ntkit.layers.tiles`), and of a zarr chunk when
            ``out`` is given. The evaluator's workspace is independent of it (cache-sized
            tiles inside each block); on disk, memory use is one block.
        out: ``None`` for a dense in-memory tensor, or a directory path (new or empty) for a
            chunked zarr array written tile by tile. An existing ntkit store at ``out`` made
            from the same inputs, network, kernel, tiling and dtype is resumed (with
            ``resume=True``). Anything else at ``out`` that ntkit did not write (a file, a
            directory, a zarr group or array) is refused, never overwritten.
        resume: with ``out``, keep the tiles a previous (possibly killed) run finished, after
            reading each back and checking it against its checksum: tiles whose chunks are
            missing, truncated or altered are recomputed, with a warning. That check reads
            the whole stored array once (I/O bound: about the cost of reading the file). If
            the network holds something that cannot be fingerprinted (an opaque callable),
            resuming is refused, naming the object. With ``resume=False`` an existing ntkit
            store at ``out`` is overwritten.
        progress: show a tqdm progress bar over tiles.
        dtype: ``torch.float64`` (default) or ``torch.float32``.
    Returns:
        A ``(N1, N2)`` torch tensor on ``X1``'s device, or, with ``out``, the ``zarr.Array``
        (read it with ``arr[...]`` or wrap it with ``dask.array.from_zarr``).
    Raises:
        MemoryError: for ``out=None`` when the dense kernel would not fit in available memory;
            raised before anything is allocated, with the size needed.
        ValueError: for ``out`` holding data ntkit did not write, or (with ``resume=True``) a
            store of a different or unfingerprintable computation.
        OSError: when a written tile reads back different bytes (unreliable storage).
    """
    net = check_net(net)
    get = check_choice(get, "get", KERNEL_CHOICES)
    tile = check_positive_int(tile, "tile")
    dtype = resolve_dtype(dtype)
    t1, t2 = as_input_pair(X1, X2, dtype=dtype, names=("X1", "X2"))
    if out is None:
        return _kernel_in_memory(net, t1, t2, get, tile, progress)
    return kernel_to_zarr(net, t1, t2, get, tile, Path(out), resume, progress)


def _kernel_in_memory(net: Layer, t1: torch.Tensor, t2: torch.Tensor | None, get: str,
                      tile: int, progress: bool) -> torch.Tensor:
    n1, n2 = t1.shape[0], (t1 if t2 is None else t2).shape[0]
    check_dense_fits(n1, n2, t1.dtype, t1.device, f"{get} kernel")
    sink = TensorSink(n1, n2, t2 is None)
    evaluate(net, t1, t2, (get,), sink, block=tile, labels=("X1", "X2"),
             progress=f"{get} kernel" if progress else None)
    return sink.results[get]
