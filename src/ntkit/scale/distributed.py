"""Kernel matrices as Dask arrays: one task per kernel tile, on any Dask scheduler.

Every block is a pure function of the network (a small picklable value) and two chunks of
inputs; the inputs travel to the workers through Dask's own serialization, so no shared
memory or shared filesystem is assumed.

Multi-machine use
-----------------
Start a scheduler on one machine and workers on the others, each with ntkit (and the same
torch) installed::

    machine-a$ dask scheduler                       # listens on tcp://machine-a:8786
    machine-b$ dask worker tcp://machine-a:8786 --nworkers 1 --nthreads 8
    machine-c$ dask worker tcp://machine-a:8786 --nworkers 1 --nthreads 8

then, in the client process::

    from dask.distributed import Client
    client = Client("tcp://machine-a:8786")          # becomes Dask's default scheduler
    K = ntkit.scale.dask_kernel(net, X, chunks=4096)  # lazy (N, N) dask.array
    K.to_zarr("s3://bucket/kernel.zarr")              # or K @ v, K.sum(0), ... without gathering

A worker with one process and ``--nthreads T`` runs T tiles at once, each on torch's
intra-op threads; on a machine with P cores use ``T * torch_threads <= P`` (Dask's nanny sets
``OMP_NUM_THREADS=1`` in worker processes by default, so torch then uses one thread per
tile). For inputs too large to embed in the task graph (more than ~100 MB), pass ``X1`` as a
``dask.array`` read by the workers themselves (``da.from_zarr``, ``da.from_npy_stack``...).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._validation import (
    _describe_rows,
    as_inputs,
    check_choice,
    check_positive_int,
    resolve_dtype,
)
from ..layers.base import Layer
from ..layers.evaluate import _overflow_error
from .tiled import KERNEL_CHOICES, check_net


def _kernel_block(x1: np.ndarray, x2: np.ndarray, rows1: np.ndarray, rows2: np.ndarray,
                  net: Layer, get: str, dtype_name: str, names: tuple[str, str]) -> np.ndarray:
    """One kernel block on a worker (numpy in, numpy out): the analytic evaluator with this
    block as its only block, cache-sized tiles inside it (see :mod:`ntkit.layers.tiles`).
    ``rows1``/``rows2`` are the block's global row indices, so that an overflow error names
    the user's rows rather than the block's."""
    dtype = resolve_dtype(dtype_name)
    t1 = torch.from_numpy(np.ascontiguousarray(x1)).to(dtype)
    symmetric = x1 is x2 or (x1.shape == x2.shape and np.array_equal(x1, x2))
    t2 = t1 if symmetric else torch.from_numpy(np.ascontiguousarray(x2)).to(dtype)
    try:
        # A diagonal block of a symmetric kernel: the symmetric path makes it exactly symmetric.
        return net.kernel(t1, None if symmetric else t2, get=get, dtype=dtype)[get].numpy()
    except ValueError as err:
        if "is not finite" not in str(err):
            raise
        offsets = (int(rows1[0]) if len(rows1) else 0, int(rows2[0]) if len(rows2) else 0)
        raise _overflow_error(net, (get,), dtype, list(zip(names, (t1, t2))), None,
                              row_offsets=offsets) from None


def _finite_block(block: np.ndarray, arg_name: str, block_info: dict | None = None) -> np.ndarray:
    """``block`` unchanged if finite; else raise naming ``name`` and the *global* rows.

    The kernel blocks would catch a NaN too, but under the kernel's own argument names and
    with block-local rows (a NaN in row 13 of X1 read as "x2 ... rows [5]").
    """
    finite = np.isfinite(block)
    if finite.all():
        return block
    offset = block_info[0]["array-location"][0][0] if block_info else 0
    bad = np.nonzero(~finite.reshape(block.shape[0], -1).all(axis=1))[0] + offset
    raise ValueError(f"{arg_name} contains NaN or infinite values in rows "
                     f"[{_describe_rows(torch.from_numpy(bad))}]; remove or impute them before "
                     "computing kernels.")


def _as_dask_inputs(X: Any, name: str, chunks: int, dtype: torch.dtype):
    import dask.array as da

    if isinstance(X, da.Array):
        if X.ndim != 2:
            raise ValueError(f"{name} must have shape (N, d); got shape {X.shape}.")
        # Checked lazily, block by block on the workers (the data need not fit here).
        x = X.astype(np.float64 if dtype == torch.float64 else np.float32).rechunk(
            (chunks, -1))
        return x.map_blocks(_finite_block, arg_name=name, dtype=x.dtype, meta=x._meta)
    t = as_inputs(X, name, dtype=dtype)
    return da.from_array(t.detach().cpu().numpy(), chunks=(chunks, -1), name=False)


def dask_kernel(net: Layer, X1: Any, X2: Any | None = None, *, chunks: int = 2048,
                get: str = "ntk", dtype: Any = None):
    """The ``(N1, N2)`` kernel ``get`` of ``net`` as a lazy ``dask.array``.

    Block ``(i, j)`` is ``net.kernel(X1[i-th chunk], X2[j-th chunk])[get]``: the evaluator's
    block of :func:`ntkit.scale.kernel_matrix` with ``tile=chunks`` (``chunks`` is the block
    side of :mod:`ntkit.layers.tiles`), so the same bits on and above the diagonal on the
    same machine and thread count; below the diagonal the blocks are computed rather than
    mirrored, equal to rounding (gemm of the swapped operands). A NaN or
    infinity in a ``dask.array`` input is reported on compute, naming ``X1``/``X2`` and the
    global rows. Nothing is computed until
    ``.compute()``, ``.to_zarr(...)`` or a reduction is evaluated; then the blocks run on the
    current Dask scheduler: the local threaded one by default, or a
    ``dask.distributed.Client`` when one is active (see the module docstring for a
    multi-machine cluster).

    Args:
        net: an ntkit network (picklable; it is shipped to the workers).
        X1: ``(N1, d)`` inputs: numpy/torch (embedded in the graph) or a ``dask.array``.
        X2: ``(N2, d)`` inputs, or ``None`` for ``X2 = X1``.
        chunks: rows per block; blocks are ``chunks x chunks``.
        get: ``"ntk"`` or ``"nngp"`` (per-output kernel).
        dtype: ``torch.float64`` (default) or ``torch.float32``.
    Returns:
        A ``dask.array.Array`` of shape ``(N1, N2)`` with numpy blocks.
    """
    import dask.array as da

    net = check_net(net)
    get = check_choice(get, "get", KERNEL_CHOICES)
    chunks = check_positive_int(chunks, "chunks")
    dtype = resolve_dtype(dtype)
    x1 = _as_dask_inputs(X1, "X1", chunks, dtype)
    x2 = x1 if X2 is None else _as_dask_inputs(X2, "X2", chunks, dtype)
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"X1 has {x1.shape[1]} features but X2 has {x2.shape[1]}; both must "
                         "have the same number of features.")
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    rows1 = da.arange(x1.shape[0], chunks=x1.chunks[0])
    rows2 = rows1 if X2 is None else da.arange(x2.shape[0], chunks=x2.chunks[0])
    names = ("X1", "X1" if X2 is None else "X2")
    return da.blockwise(_kernel_block, "ij", x1, "ik", x2, "jk", rows1, "i", rows2, "j",
                        concatenate=True, dtype=np_dtype, net=net, get=get,
                        dtype_name=str(np_dtype.__name__), names=names,
                        meta=np.empty((0, 0), dtype=np_dtype))
