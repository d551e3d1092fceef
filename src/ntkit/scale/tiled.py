"""Kernel matrices computed tile by tile, in memory or into a resumable on-disk zarr array.

A tile is ``net.kernel(X1[rows], X2[cols])``. The analytic kernels are elementwise functions
of the input Gram entries, so a tile does not depend on which other tiles are computed, when,
or in which process: rerunning the same tiling on the same machine and thread count gives the
same bits. A *different* tiling agrees to rounding only (BLAS sums the Gram entries in an order
that depends on the block shapes; about 1e-16 relative here).

On disk, each finished tile leaves a marker file next to the zarr chunks
(``PATH/ntkit_progress/<i>_<j>``) holding the sha256 of the tile's bytes. It is written only
*after* the tile's chunks are written and read back. A run killed while writing a chunk
therefore has no marker for it, and the tile is recomputed when the run resumes; a resume also
reads every finished tile back and recomputes those whose chunks were deleted, truncated or
altered since. The array's attributes mark the store as ntkit's (``ntkit_format``) and hold a
fingerprint of the inputs, the network (:mod:`ntkit._fingerprint`: what determines its
numbers, not its ``repr``) and the tiling, so a resume with anything different is refused
instead of silently mixing two kernels. Nothing ntkit did not write is ever overwritten or
deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._fingerprint import Fingerprint, fingerprint
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
# 2: tile markers hold a checksum, attributes mark the store as ntkit's, and the fingerprint
# describes the network's numbers (ntkit._fingerprint) instead of repr(net).
_FORMAT_VERSION = 2
_STORE_ENTRIES = ("zarr.json", "c", _PROGRESS_DIR)  # all that kernel_matrix writes under out


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


# ----------------------------------------------------------------------------- zarr stores
class _Foreign(ValueError):
    """``out`` holds something ntkit did not write."""


def _describe_existing(path: Path) -> dict | None:
    """The attributes of the ntkit store at ``path``; ``None`` if there is nothing to keep.

    Raises ``ValueError`` when ``path`` holds anything ntkit did not write (a file, a
    non-empty directory, a zarr group, a zarr array without ntkit's marker): those are never
    overwritten or deleted, whatever ``resume`` says.
    """
    if not path.exists():
        return None
    what = None
    if not path.is_dir():
        what = "a file"
    elif not any(path.iterdir()):
        return None
    else:
        try:
            meta = json.loads((path / "zarr.json").read_text())
            node_type = meta.get("node_type")
            attrs = meta.get("attributes") or {}
        except (OSError, ValueError, AttributeError):
            node_type, attrs = None, {}
            what = "a non-empty directory that is not a zarr v3 array"
        if what is None and node_type != "array":
            what = (f"a zarr {node_type}" if node_type
                    else "a directory with an unreadable zarr.json")
        elif what is None and not ({"ntkit_format", "ntkit_fingerprint"} & set(attrs)):
            what = "a zarr array without ntkit's marker attributes"
        if what is None:
            return attrs
    raise _Foreign(f"out={str(path)!r} exists and was not written by "
                   f"ntkit.scale.kernel_matrix: it is {what}. ntkit never overwrites or deletes "
                   "data it did not write. Choose another out path (a new or empty directory).")


def _remove_store(path: Path) -> None:
    """Delete what ``kernel_matrix`` writes at ``path``, and nothing else."""
    import shutil

    for name in _STORE_ENTRIES:
        entry = path / name
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()


def _tile_digest(block: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(block).tobytes()).hexdigest()


def _read_marker(marker: Path) -> str | None:
    try:
        text = marker.read_text().strip()
    except OSError:
        return None
    return text if len(text) == 64 else None


def _write_marker(marker: Path, digest: str) -> None:
    # Written to a temporary name and renamed, so a kill never leaves a half-written marker.
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(digest)
    os.replace(tmp, marker)


def _tile_intact(arr, i: int, j: int, rows: slice, cols: slice, symmetric: bool,
                 digest: str) -> bool:
    """Whether the stored tile (and, off the diagonal of a symmetric kernel, its mirror) has
    the bytes whose checksum the marker recorded."""
    try:
        if _tile_digest(arr[rows, cols]) != digest:
            return False
        return not (symmetric and i != j) or _tile_digest(arr[cols, rows].T) == digest
    except Exception:  # a truncated or unreadable chunk: zarr's codecs raise various errors
        return False


def _open_or_create(path: Path, n1: int, n2: int, tile: int, dtype: torch.dtype,
                    fp: Fingerprint, resume: bool):
    import zarr

    attrs = _describe_existing(path)
    if attrs is not None and resume:
        if attrs.get("ntkit_format") != _FORMAT_VERSION:
            raise ValueError(f"out={str(path)!r} holds a kernel store written by an older ntkit, "
                             "whose tiles cannot be verified; pass resume=False to overwrite it "
                             "(it was written by ntkit) or choose another path.")
        if fp.opaque is not None:
            raise ValueError(
                f"out={str(path)!r} holds a kernel store, but this network cannot be "
                f"fingerprinted: {fp.opaque} cannot be described. Without a fingerprint "
                "ntkit cannot check that the stored tiles come from this network, so it does "
                "not resume. Write to a new out path, or pass resume=False to overwrite this "
                "store (it was written by ntkit).")
        if attrs.get("ntkit_fingerprint") != fp.digest:
            raise ValueError(f"out={str(path)!r} holds a kernel of different inputs, network, "
                             "kernel, tile size or dtype than this call; pass resume=False to "
                             "overwrite it (it was written by ntkit) or choose another path.")
        arr = zarr.open_array(store=str(path), mode="r+")
        (path / _PROGRESS_DIR).mkdir(exist_ok=True)
        return arr
    if attrs is not None:
        _remove_store(path)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    arr = zarr.create_array(store=str(path), shape=(n1, n2), chunks=(tile, tile),
                            dtype=np_dtype, compressors=None, fill_value=np.nan,
                            attributes={"ntkit_format": _FORMAT_VERSION,
                                        "ntkit_fingerprint": fp.digest,
                                        "ntkit_fingerprint_opaque": fp.opaque,
                                        "ntkit_complete": False})
    (path / _PROGRESS_DIR).mkdir(exist_ok=True)
    return arr


def _store_fingerprint(net: Layer, X1: torch.Tensor, X2: torch.Tensor | None, get: str,
                       tile: int, dtype: torch.dtype) -> Fingerprint:
    """What determines the stored numbers: inputs (bytes), network (see
    :mod:`ntkit._fingerprint`), kernel, tiling and dtype."""
    h = hashlib.sha256()
    for t in (X1,) if X2 is None else (X1, X2):
        arr = t.detach().cpu().contiguous().numpy()
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    net_fp = fingerprint(net, "net")
    h.update(net_fp.digest.encode())
    h.update(json.dumps([get, tile, str(dtype), X2 is None, _FORMAT_VERSION]).encode())
    return Fingerprint(h.hexdigest(), net_fp.opaque)


def _kernel_to_zarr(net, t1, t2, get, tile, symmetric, n1, n2, path: Path, resume: bool,
                    progress: bool):
    fp = _store_fingerprint(net, t1, t2, get, tile, t1.dtype)
    arr = _open_or_create(path, n1, n2, tile, t1.dtype, fp, resume)
    progress_dir = path / _PROGRESS_DIR
    for leftover in progress_dir.glob("*.tmp"):
        leftover.unlink()
    tiles = list(iter_tiles(n1, n2, tile, symmetric))
    todo, damaged = [], 0
    for tl in tiles:
        i, j, rows, cols = tl
        marker = progress_dir / f"{i}_{j}"
        if not marker.exists():
            todo.append(tl)
            continue
        digest = _read_marker(marker)
        if digest is None or not _tile_intact(arr, i, j, rows, cols, symmetric, digest):
            marker.unlink()
            damaged += 1
            todo.append(tl)
    if damaged:
        warnings.warn(f"{damaged} of the {len(tiles) - len(todo) + damaged} finished tiles in "
                      f"{str(path)!r} failed verification (missing, truncated or altered "
                      "chunks) and are recomputed.", RuntimeWarning, stacklevel=3)
    if todo and arr.attrs.get("ntkit_complete"):
        arr.attrs["ntkit_complete"] = False
    bar = _progress_bar(len(tiles), progress, f"{get} kernel -> {path.name}")
    if bar is not None:
        bar.update(len(tiles) - len(todo))
    for i, j, rows, cols in todo:
        block = np.ascontiguousarray(
            kernel_tile(net, t1, t2, rows, cols, get, symmetric).cpu().numpy())
        digest = _tile_digest(block)
        arr[rows, cols] = block
        if symmetric and i != j:
            arr[cols, rows] = block.T
        # Read back before the marker: a tile is finished only once the store returns its
        # bytes. The marker is written last, so a kill before it means recomputation.
        if not _tile_intact(arr, i, j, rows, cols, symmetric, digest):
            raise OSError(f"tile ({i}, {j}) of {str(path)!r} reads back different bytes than "
                          "were written; the storage under out= is not reliable.")
        _write_marker(progress_dir / f"{i}_{j}", digest)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if not arr.attrs.get("ntkit_complete"):
        arr.attrs["ntkit_complete"] = True
    return arr
