"""Resumable on-disk kernels: a zarr store that :func:`ntkit.layers.evaluate.evaluate`
writes into block by block (:class:`ZarrSink`), and its bookkeeping.

A block of the store is a zarr chunk (``kernel_matrix(tile=)``). Each finished block leaves
a marker file next to the chunks (``PATH/ntkit_progress/<i>_<j>``) holding the sha256 of the
block's bytes. It is written only *after* the block's chunks are written and read back. A
run killed while writing a chunk therefore has no marker for it, and the block is recomputed
when the run resumes; a resume also reads every finished block back and recomputes those
whose chunks were deleted, truncated or altered since. The array's attributes mark the store
as ntkit's (``ntkit_format``) and hold a fingerprint of the inputs, the network
(:mod:`ntkit._fingerprint`: what determines its numbers, not its ``repr``) and the blocks,
so a resume with anything different is refused instead of silently mixing two kernels.
Nothing ntkit did not write is ever overwritten or deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .._fingerprint import Fingerprint, fingerprint
from ..layers.base import Layer
from ..layers.evaluate import evaluate
from ..layers.tiles import block_schedule

_PROGRESS_DIR = "ntkit_progress"
# 2: tile markers hold a checksum, attributes mark the store as ntkit's, and the fingerprint
# describes the network's numbers (ntkit._fingerprint) instead of repr(net).
_FORMAT_VERSION = 2
_STORE_ENTRIES = ("zarr.json", "c", _PROGRESS_DIR)  # all that kernel_matrix writes under out


# ----------------------------------------------------------------------------- ownership
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
    """The zarr array at ``path``, resumed or new; ``dtype`` is the *storage* dtype."""
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
                       tile: int, dtype: torch.dtype,
                       storage: torch.dtype | None = None) -> Fingerprint:
    """What determines the stored numbers: inputs (bytes), network (see
    :mod:`ntkit._fingerprint`), kernel, tiling, dtype (of the arithmetic) and, when it
    differs, the storage dtype."""
    h = hashlib.sha256()
    for t in (X1,) if X2 is None else (X1, X2):
        arr = t.detach().cpu().contiguous().numpy()
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    net_fp = fingerprint(net, "net")
    h.update(net_fp.digest.encode())
    fields = [get, tile, str(dtype), X2 is None, _FORMAT_VERSION]
    if storage is not None and storage != dtype:  # older stores keep their fingerprints
        fields.append(f"stored as {storage}")
    h.update(json.dumps(fields).encode())
    return Fingerprint(h.hexdigest(), net_fp.opaque)


class ZarrSink:
    """The evaluator's sink for a zarr array: block ``(i, j)`` is filled from its tiles in a
    host buffer, then written (and, off the diagonal of a symmetric kernel, its transpose
    at ``(j, i)``), read back, and marked finished with its checksum.

    ``done`` holds the blocks a previous run finished and that passed verification; they
    are skipped.
    """

    durable = True  # the evaluator refuses a non-finite tile before it is stored

    def __init__(self, arr, progress_dir: Path, symmetric: bool, done: set[tuple[int, int]]):
        self.arr, self.progress_dir, self.symmetric, self.done = (arr, progress_dir, symmetric,
                                                                  done)
        self._buffer: np.ndarray | None = None
        self._origin = (0, 0)

    def wants(self, i: int, j: int, rows: slice, cols: slice) -> bool:
        if (i, j) in self.done:
            return False
        self._buffer = np.empty((rows.stop - rows.start, cols.stop - cols.start),
                                dtype=self.arr.dtype)
        self._origin = (rows.start, cols.start)
        return True

    def write(self, rows: slice, cols: slice, tiles: dict[str, torch.Tensor]) -> None:
        (tile,) = tiles.values()
        r0, c0 = self._origin
        r = slice(rows.start - r0, rows.stop - r0)
        c = slice(cols.start - c0, cols.stop - c0)
        values = tile.detach().cpu().numpy()
        self._buffer[r, c] = values
        if self.symmetric and r0 == c0 and cols.start != rows.start:
            self._buffer[c, r] = values.T  # strictly above the diagonal of a diagonal block

    def finish(self, i: int, j: int, rows: slice, cols: slice) -> None:
        block, self._buffer = self._buffer, None
        digest = _tile_digest(block)
        self.arr[rows, cols] = block
        if self.symmetric and i != j:
            self.arr[cols, rows] = block.T
        # Read back before the marker: a block is finished only once the store returns its
        # bytes. The marker is written last, so a kill before it means recomputation.
        if not _tile_intact(self.arr, i, j, rows, cols, self.symmetric, digest):
            raise OSError(f"tile ({i}, {j}) of {str(self.progress_dir.parent)!r} reads back "
                          "different bytes than were written; the storage under out= is not "
                          "reliable.")
        _write_marker(self.progress_dir / f"{i}_{j}", digest)


def _verified_blocks(arr, progress_dir: Path, n1: int, n2: int, tile: int, symmetric: bool
                     ) -> tuple[set[tuple[int, int]], int, int]:
    """The finished blocks whose chunks still hold the bytes their markers recorded; also
    the number of blocks in all and of those that failed verification (markers removed)."""
    for leftover in progress_dir.glob("*.tmp"):
        leftover.unlink()
    done, damaged, total = set(), 0, 0
    for i, j, rows, cols in block_schedule(n1, n2, tile, symmetric):
        total += 1
        marker = progress_dir / f"{i}_{j}"
        if not marker.exists():
            continue
        digest = _read_marker(marker)
        if digest is None or not _tile_intact(arr, i, j, rows, cols, symmetric, digest):
            marker.unlink()
            damaged += 1
            continue
        done.add((i, j))
    return done, total, damaged


def kernel_to_zarr(net: Layer, t1: torch.Tensor, t2: torch.Tensor | None, get: str,
                   tile: int, path: Path, resume: bool, progress: bool,
                   storage: torch.dtype | None = None, client=None):
    """:func:`ntkit.scale.kernel_matrix` with ``out=path``, for validated inputs: the zarr
    array, complete, with ``tile x tile`` chunks (= the evaluator's blocks).

    ``storage``: the array's dtype when it differs from the inputs' (float64 arithmetic
    stored as float32: each entry rounded once; the out-of-core solve). ``client``: compute
    the blocks on a ``dask.distributed.Client`` (inputs scattered once); this process
    writes, verifies and marks them as they arrive.
    """
    symmetric = t2 is None
    n1, n2 = t1.shape[0], (t1 if symmetric else t2).shape[0]
    storage = t1.dtype if storage is None else storage
    fp = _store_fingerprint(net, t1, t2, get, tile, t1.dtype, storage)
    arr = _open_or_create(path, n1, n2, tile, storage, fp, resume)
    progress_dir = path / _PROGRESS_DIR
    done, total, damaged = _verified_blocks(arr, progress_dir, n1, n2, tile, symmetric)
    if damaged:
        warnings.warn(f"{damaged} of the {len(done) + damaged} finished tiles in "
                      f"{str(path)!r} failed verification (missing, truncated or altered "
                      "chunks) and are recomputed.", RuntimeWarning, stacklevel=3)
    if len(done) < total and arr.attrs.get("ntkit_complete"):
        arr.attrs["ntkit_complete"] = False
    sink = ZarrSink(arr, progress_dir, symmetric, done)
    if client is not None and symmetric:
        from .distributed import client_blocks

        client_blocks(client, net, t1, get, sink, tile, progress,
                      f"{get} kernel -> {path.name}")
    else:
        evaluate(net, t1, t2, (get,), sink, block=tile, labels=("X1", "X2"),
                 progress=f"{get} kernel -> {path.name}" if progress else None)
    if not arr.attrs.get("ntkit_complete"):
        arr.attrs["ntkit_complete"] = True
    return arr
