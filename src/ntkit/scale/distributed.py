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

With ``client=`` (a ``dask.distributed.Client``), the inputs are *scattered once* to every
worker (``client.scatter(..., broadcast=True)``) and each block task holds only a reference
to them and its row ranges: no ``N x d`` data travels with the tasks. A symmetric kernel
then computes only the blocks on and above the diagonal; those below are their transposes
(exactly symmetric, half the work). :func:`client_blocks` is the same schedule feeding a
sink in this process (the in-RAM and on-disk solves of :func:`ntkit.scale.solve` with
``client=``).
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
from ._checks import KERNEL_CHOICES, check_net


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


def _scattered_block(x1: np.ndarray, x2: np.ndarray | None, net: Layer, r0: int, r1: int,
                     c0: int, c1: int, get: str, dtype_name: str, send: str) -> np.ndarray:
    """One block on a worker from the scattered inputs: rows ``r0:r1`` of ``x1`` against rows
    ``c0:c1`` of ``x2`` (``None``: of ``x1``, the symmetric kernel, whose diagonal blocks go
    through the symmetric path and are exactly symmetric). Returned as ``send`` (the dtype
    the receiver stores: casting on the worker halves the bytes sent for float32)."""
    import warnings

    dtype = resolve_dtype(dtype_name)
    with warnings.catch_warnings():  # scattered arrays are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        a = torch.from_numpy(x1[r0:r1]).to(dtype)
        other = x1 if x2 is None else x2
        b = None if (x2 is None and (r0, r1) == (c0, c1)) else torch.from_numpy(
            other[c0:c1]).to(dtype)
    try:
        block = net.kernel(a, b, get=get, dtype=dtype)[get]
    except ValueError as err:
        if "is not finite" not in str(err):
            raise
        names = ("X1",) if b is None else ("X1", "X1" if x2 is None else "X2")
        inputs = [(names[0], a)] + ([] if b is None else [(names[1], b)])
        raise _overflow_error(net, (get,), dtype, inputs, None,
                              row_offsets=(r0, c0)) from None
    return block.numpy().astype(send, copy=False)


def _scatter(client, x: np.ndarray):
    return client.scatter(x, broadcast=True, hash=False)


def client_blocks(client, net: Layer, t: torch.Tensor, get: str, sink, tile: int,
                  progress: bool, desc: str) -> None:
    """The blocks of the symmetric kernel ``k(t, t)`` (the evaluator's block schedule) on
    ``client``'s workers, written into ``sink`` (the :class:`~ntkit.layers.tiles.Sink`
    protocol) in this process as they finish. ``t`` is scattered once; blocks a durable
    sink already holds (``sink.done``) are not submitted."""
    from dask.distributed import as_completed

    from ..layers.tiles import block_schedule, progress_bar

    x = _scatter(client, t.detach().cpu().numpy())
    net_f = client.scatter(net, broadcast=True, hash=False)
    store = getattr(sink, "arr", None)
    buffers = getattr(sink, "_buffers", None) or {}
    target = store.dtype if store is not None else (
        buffers[get].dtype if get in buffers else t.dtype)
    send = np.dtype(str(target).replace("torch.", ""))
    skip = getattr(sink, "done", set())
    where = {}
    for i, j, rows, cols in block_schedule(t.shape[0], t.shape[0], tile, True):
        if (i, j) in skip:
            continue
        fut = client.submit(_scattered_block, x, None, net_f, rows.start, rows.stop,
                            cols.start, cols.stop, get, str(t.dtype).replace("torch.", ""),
                            send.name, pure=False)
        where[fut] = (i, j, rows, cols)
    bar = progress_bar(len(where), desc if progress else None)
    for fut in as_completed(list(where)):
        i, j, rows, cols = where.pop(fut)
        block = fut.result()
        fut.release()
        if sink.wants(i, j, rows, cols):
            sink.write(rows, cols, {get: torch.from_numpy(block)})
            sink.finish(i, j, rows, cols)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()


def _dask_kernel_on_client(client, net: Layer, x1: np.ndarray, x2: np.ndarray | None,
                           chunks: int, get: str, np_dtype):
    """:func:`dask_kernel` with scattered inputs (see the module docstring)."""
    import dask
    import dask.array as da

    from ..layers.tiles import spans

    f1 = _scatter(client, x1)
    f2 = None if x2 is None else _scatter(client, x2)
    net_f = client.scatter(net, broadcast=True, hash=False)
    r_spans = spans(x1.shape[0], chunks)
    c_spans = r_spans if x2 is None else spans(x2.shape[0], chunks)
    dtype_name = np.dtype(np_dtype).name
    grid: list[list] = [[None] * len(c_spans) for _ in r_spans]
    for i, r in enumerate(r_spans):
        for j, c in enumerate(c_spans):
            shape = (r.stop - r.start, c.stop - c.start)
            if x2 is None and j < i:
                continue
            task = dask.delayed(_scattered_block, pure=True)(
                f1, f2, net_f, r.start, r.stop, c.start, c.stop, get, dtype_name, dtype_name,
                dask_key_name=f"ntkit-block-{id(grid)}-{i}-{j}")
            grid[i][j] = da.from_delayed(task, shape=shape, dtype=np_dtype)
    if x2 is None:
        for i in range(len(r_spans)):
            for j in range(i):
                grid[i][j] = grid[j][i].T  # the mirror of a computed block: no recomputation
    return da.block(grid)


def dask_kernel(net: Layer, X1: Any, X2: Any | None = None, *, chunks: int = 2048,
                get: str = "ntk", dtype: Any = None, client=None):
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
        client: a ``dask.distributed.Client``: the inputs (numpy/torch) are scattered once to
            every worker instead of travelling with the tasks, and a symmetric kernel
            computes only the blocks on and above the diagonal (the others are their
            transposes). ``None``: the current scheduler, inputs embedded in the graph.
    Returns:
        A ``dask.array.Array`` of shape ``(N1, N2)`` with numpy blocks.
    """
    import dask.array as da

    net = check_net(net)
    get = check_choice(get, "get", KERNEL_CHOICES)
    chunks = check_positive_int(chunks, "chunks")
    dtype = resolve_dtype(dtype)
    if client is not None:
        if isinstance(X1, da.Array) or isinstance(X2, da.Array):
            raise ValueError("client= scatters in-memory inputs (numpy or torch); for a "
                             "dask.array input call dask_kernel without client= (its blocks "
                             "are read by the workers themselves).")
        t1 = as_inputs(X1, "X1", dtype=dtype)
        t2 = None if X2 is None else as_inputs(X2, "X2", dtype=dtype)
        if t2 is not None and t2.shape[1] != t1.shape[1]:
            raise ValueError(f"X1 has {t1.shape[1]} features but X2 has {t2.shape[1]}; both "
                             "must have the same number of features.")
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        return _dask_kernel_on_client(client, net, t1.cpu().numpy(),
                                      None if t2 is None else t2.cpu().numpy(), chunks, get,
                                      np_dtype)
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
