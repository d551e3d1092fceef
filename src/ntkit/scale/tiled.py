"""Kernel matrices computed tile by tile, in memory or into a resumable on-disk zarr array.

A tile is ``net.kernel(X1[rows], X2[cols])``. The analytic kernels are elementwise functions
of the input Gram entries, so a tile does not depend on which other tiles are computed, when,
or in which process: an interrupted run that is restarted gives the same bits.

On disk, each finished tile leaves an empty marker file next to the zarr chunks
(``PATH/ntkit_progress/<i>_<j>``), created only *after* the tile's chunks are written. A run
killed while writing a chunk therefore has no marker for it, and the tile is recomputed when
the run resumes. The array's attributes hold a fingerprint of the inputs, the network and the
tiling, so a resume with different inputs is refused instead of silently mixing two kernels.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._validation import (
    as_input_pair,
    available_memory,
    check_choice,
    check_positive_int,
    format_bytes,
    resolve_dtype,
)
from ..layers.base import Layer

KERNEL_CHOICES = ("ntk", "nngp")
DEFAULT_TILE = 2048
_PROGRESS_DIR = "ntkit_progress"
_FORMAT_VERSION = 1


def check_net(net: Any, name: str = "net") -> Layer:
    if not isinstance(net, Layer):
        raise ValueError(f"{name} must be an ntkit network (an nk.Layer such as nk.mlp(...)); "
                         f"got {type(net).__name__}.")
    return net


def tile_slices(n: int, tile: int) -> list[slice]:
    return [slice(s, min(s + tile, n)) for s in range(0, n, tile)]


def kernel_tile(net: Layer, X1: torch.Tensor, X2: torch.Tensor | None, rows: slice,
                cols: slice, get: str, symmetric: bool) -> torch.Tensor:
    """One ``(len(rows), len(cols))`` tile of the kernel.

    For a symmetric kernel the diagonal tiles are computed with ``x2=None`` so they are
    exactly symmetric, as in the full computation.
    """
    if symmetric and rows == cols:
        return net.kernel(X1[rows], None, get=get, dtype=X1.dtype)[get]
    other = X1 if X2 is None else X2
    return net.kernel(X1[rows], other[cols], get=get, dtype=X1.dtype)[get]


def iter_tiles(n1: int, n2: int, tile: int, symmetric: bool
               ) -> Iterator[tuple[int, int, slice, slice]]:
    """Tile indices ``(i, j, rows, cols)``; for a symmetric kernel only ``j >= i``."""
    rs, cs = tile_slices(n1, tile), tile_slices(n2, tile)
    for i, rows in enumerate(rs):
        for j, cols in enumerate(cs):
            if symmetric and j < i:
                continue
            yield i, j, rows, cols


def _fingerprint(net: Layer, X1: torch.Tensor, X2: torch.Tensor | None, get: str, tile: int,
                 dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    for t in (X1,) if X2 is None else (X1, X2):
        arr = t.detach().cpu().contiguous().numpy()
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    h.update(repr(net).encode())
    h.update(json.dumps([get, tile, str(dtype), X2 is None, _FORMAT_VERSION]).encode())
    return h.hexdigest()


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tile", leave=False)


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
        tile: side of a square tile, and of a zarr chunk when ``out`` is given.
        out: ``None`` for a dense in-memory tensor, or a directory path for a chunked zarr
            array written tile by tile. An existing array at ``out`` made from the same inputs,
            network and tiling is resumed (with ``resume=True``).
        resume: with ``out``, keep the tiles a previous (possibly killed) run finished. With
            ``resume=False`` an existing array at ``out`` is overwritten.
        progress: show a tqdm progress bar over tiles.
        dtype: ``torch.float64`` (default) or ``torch.float32``.
    Returns:
        A ``(N1, N2)`` torch tensor on ``X1``'s device, or, with ``out``, the ``zarr.Array``
        (read it with ``arr[...]`` or wrap it with ``dask.array.from_zarr``).
    Raises:
        MemoryError: for ``out=None`` when the dense kernel would not fit in available memory;
            raised before anything is allocated, with the size needed.
    """
    net = check_net(net)
    get = check_choice(get, "get", KERNEL_CHOICES)
    tile = check_positive_int(tile, "tile")
    dtype = resolve_dtype(dtype)
    t1, t2 = as_input_pair(X1, X2, dtype=dtype, names=("X1", "X2"))
    symmetric = t2 is None
    n1, n2 = t1.shape[0], (t1 if symmetric else t2).shape[0]
    if out is None:
        return _kernel_in_memory(net, t1, t2, get, tile, symmetric, n1, n2, progress)
    return _kernel_to_zarr(net, t1, t2, get, tile, symmetric, n1, n2, Path(out), resume,
                           progress)


def check_dense_fits(n1: int, n2: int, dtype: torch.dtype, device: torch.device,
                     what: str = "kernel") -> None:
    """Raise ``MemoryError`` if a dense ``(n1, n2)`` array would not fit on ``device``."""
    itemsize = torch.finfo(dtype).bits // 8
    need = n1 * n2 * itemsize
    free = available_memory(device)
    if need > 0.9 * free:
        raise MemoryError(
            f"The dense {n1} x {n2} {what} needs {format_bytes(need)} but only "
            f"{format_bytes(free)} is available on {device}. Write it to disk tile by tile with "
            "ntkit.scale.kernel_matrix(net, X, out=PATH), or solve without forming it with "
            "ntkit.scale.solve(net, X, y, method='cg', preconditioner='nystrom').")


def _kernel_in_memory(net, t1, t2, get, tile, symmetric, n1, n2, progress) -> torch.Tensor:
    check_dense_fits(n1, n2, t1.dtype, t1.device, f"{get} kernel")
    result = torch.empty(n1, n2, dtype=t1.dtype, device=t1.device)
    tiles = list(iter_tiles(n1, n2, tile, symmetric))
    bar = _progress_bar(len(tiles), progress, f"{get} kernel")
    for _, _, rows, cols in tiles:
        block = kernel_tile(net, t1, t2, rows, cols, get, symmetric)
        result[rows, cols] = block
        if symmetric and rows != cols:
            result[cols, rows] = block.T
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return result


def _open_or_create(path: Path, n1: int, n2: int, tile: int, dtype: torch.dtype,
                    fingerprint: str, resume: bool):
    import zarr

    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    progress_dir = path / _PROGRESS_DIR
    if resume and path.exists():
        try:
            arr = zarr.open_array(store=str(path), mode="r+")
        except Exception as err:  # not a zarr array: refuse to clobber an unrelated directory
            raise ValueError(f"out={str(path)!r} exists but is not a zarr array written by "
                             f"kernel_matrix ({err}); choose another path or pass "
                             "resume=False to overwrite it.") from err
        found = arr.attrs.get("ntkit_fingerprint")
        if found != fingerprint:
            raise ValueError(f"out={str(path)!r} holds a kernel of different inputs, network, "
                             "kernel or tile size than this call; pass resume=False to "
                             "overwrite it or choose another path.")
        progress_dir.mkdir(exist_ok=True)
        return arr
    if path.exists() and not resume:
        import shutil

        if not (path / "zarr.json").exists() and any(path.iterdir()):
            raise ValueError(f"out={str(path)!r} is a non-empty directory that is not a zarr "
                             "array; refusing to delete it. Choose another path.")
        shutil.rmtree(path)
    arr = zarr.create_array(store=str(path), shape=(n1, n2), chunks=(tile, tile),
                            dtype=np_dtype, compressors=None, fill_value=np.nan,
                            attributes={"ntkit_fingerprint": fingerprint,
                                        "ntkit_complete": False})
    progress_dir.mkdir(exist_ok=True)
    return arr


def _kernel_to_zarr(net, t1, t2, get, tile, symmetric, n1, n2, path: Path, resume: bool,
                    progress: bool):
    fingerprint = _fingerprint(net, t1, t2, get, tile, t1.dtype)
    arr = _open_or_create(path, n1, n2, tile, t1.dtype, fingerprint, resume)
    progress_dir = path / _PROGRESS_DIR
    done = {p.name for p in progress_dir.iterdir()}
    todo = [tl for tl in iter_tiles(n1, n2, tile, symmetric) if f"{tl[0]}_{tl[1]}" not in done]
    total = len(list(iter_tiles(n1, n2, tile, symmetric)))
    bar = _progress_bar(total, progress, f"{get} kernel -> {path.name}")
    if bar is not None:
        bar.update(total - len(todo))
    for i, j, rows, cols in todo:
        block = kernel_tile(net, t1, t2, rows, cols, get, symmetric).cpu().numpy()
        arr[rows, cols] = block
        if symmetric and i != j:
            arr[cols, rows] = block.T
        # The marker is written last: a tile without one is recomputed on resume.
        (progress_dir / f"{i}_{j}").touch()
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    arr.attrs["ntkit_complete"] = True
    return arr
