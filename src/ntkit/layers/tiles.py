"""The analytic evaluator's schedule: which tiles it computes, and where they go (sinks).

Two sizes, one schedule. This is the one place that defines both:

* A **block** is the unit of *output*: what a sink receives whole, stores, checksums and
  resumes. It is the chunk of a zarr store and the unit of resume in
  :func:`ntkit.scale.kernel_matrix` (its ``tile=`` argument) and the block of a Dask array in
  :func:`ntkit.scale.dask_kernel` (``chunks=``). ``net.kernel`` writes a single block
  covering the whole kernel.
* A **tile** is the unit of *computation* inside a block: every layer's kernel map runs on
  one ``tile x tile`` piece at a time, so the workspace (about a dozen tile-sized
  temporaries per layer, ``degree`` times more for a quadrature activation) stays small
  and in cache. Its side comes from ``memory_budget`` (``net.kernel``), by default 512 rows,
  256 for a network that ``uses_quadrature``; it is never larger than the block.

Blocks are square, ``block x block`` from the top-left corner; each block is split into
tiles starting at its own corner, so a block's values depend only on its own rows and
columns, never on which other blocks are computed, when, or in which process. For a
symmetric kernel (``x2=None``) only blocks on and above the diagonal are computed, and
within a diagonal block only tiles on and above the diagonal; the sink mirrors them.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch


def spans(n: int, size: int) -> list[slice]:
    """``[0, size), [size, 2 size), ...`` covering ``range(n)``."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def block_schedule(n1: int, n2: int, block: int, symmetric: bool
                   ) -> Iterator[tuple[int, int, slice, slice]]:
    """Blocks ``(i, j, rows, cols)`` of an ``(n1, n2)`` kernel, row by row; for a symmetric
    kernel only ``j >= i``."""
    row_spans, col_spans = spans(n1, block), spans(n2, block)
    for i, rows in enumerate(row_spans):
        for j, cols in enumerate(col_spans):
            if not (symmetric and j < i):
                yield i, j, rows, cols


def tile_schedule(rows: slice, cols: slice, tile: int, symmetric: bool
                  ) -> Iterator[tuple[slice, slice]]:
    """The tiles of the block ``(rows, cols)``, in global coordinates; in a symmetric
    kernel's diagonal block only those on and above the diagonal."""
    for r in spans(rows.stop - rows.start, tile):
        for c in spans(cols.stop - cols.start, tile):
            r_abs = slice(rows.start + r.start, rows.start + r.stop)
            c_abs = slice(cols.start + c.start, cols.start + c.stop)
            if not (symmetric and c_abs.start < r_abs.start):
                yield r_abs, c_abs


class Sink(Protocol):
    """Where the evaluator writes finished tiles.

    For each block of :func:`block_schedule` the evaluator asks :meth:`wants`; if yes, it
    calls :meth:`write` for each tile of the block (:func:`tile_schedule`), then
    :meth:`finish`. Tiles are ``{"nngp"|"ntk": (len(rows), len(cols)) tensor}``. For a
    symmetric kernel the sink receives only tiles on and above the diagonal (tiles *on* it
    are exactly symmetric) and fills the transpose below itself.

    ``durable`` sinks keep what they are given (a file): the evaluator checks each tile is
    finite *before* writing it, rather than once at the end, so a non-finite kernel never
    reaches the store. Other sinks are checked once, at the end; one that exposes
    ``results`` (the kernels by name, as :class:`TensorSink`) lets that error name the rows
    of non-finite entries off the diagonal.
    """

    durable: bool

    def wants(self, i: int, j: int, rows: slice, cols: slice) -> bool: ...
    def write(self, rows: slice, cols: slice, tiles: dict[str, torch.Tensor]) -> None: ...
    def finish(self, i: int, j: int, rows: slice, cols: slice) -> None: ...


class TensorSink:
    """The in-memory sink: ``(n1, n2)`` tensors by name, filled in place.

    ``out`` may supply the tensors (preallocated, by name); otherwise they are allocated on
    the first tile, in its dtype and device. If that tile requires grad (inputs or
    hyperparameters tracked by autograd), tiles are instead kept and joined by
    concatenation in :attr:`results`: in-place writes into one buffer would make backward
    copy the whole kernel once per tile.
    """

    durable = False

    def __init__(self, n1: int, n2: int, symmetric: bool,
                 out: dict[str, torch.Tensor] | None = None):
        self.shape, self.symmetric = (n1, n2), symmetric
        self._buffers = dict(out) if out is not None else None
        self._kept: dict[str, dict[tuple[int, int], torch.Tensor]] | None = None

    def wants(self, i: int, j: int, rows: slice, cols: slice) -> bool:
        return True

    def write(self, rows: slice, cols: slice, tiles: dict[str, torch.Tensor]) -> None:
        if self._buffers is None and self._kept is None:  # the first tile decides
            if any(t.requires_grad for t in tiles.values()):
                self._kept = {name: {} for name in tiles}
            else:
                some = next(iter(tiles.values()))
                self._buffers = {name: some.new_empty(self.shape) for name in tiles}
        for name, tile in tiles.items():
            if self._kept is not None:
                self._kept[name][rows.start, cols.start] = tile
                continue
            target = self._buffers[name]
            target[rows, cols] = tile
            if self.symmetric and cols.start != rows.start:
                target[cols, rows] = tile.T

    def finish(self, i: int, j: int, rows: slice, cols: slice) -> None:
        pass

    @property
    def results(self) -> dict[str, torch.Tensor]:
        """The kernels written so far, by name."""
        if self._kept is None:
            return dict(self._buffers or {})
        return {name: _assemble(tiles, self.symmetric) for name, tiles in self._kept.items()}


def _assemble(tiles: dict[tuple[int, int], torch.Tensor], symmetric: bool) -> torch.Tensor:
    """Join tiles keyed by their (row, column) starts into one kernel; for a symmetric
    kernel only the tiles on and above the diagonal are given."""
    row_starts = sorted({r for r, _ in tiles} | ({c for _, c in tiles} if symmetric else set()))
    col_starts = row_starts if symmetric else sorted({c for _, c in tiles})
    return torch.cat([
        torch.cat([tiles[r, c] if not symmetric or c >= r else tiles[c, r].T
                   for c in col_starts], dim=1)
        for r in row_starts], dim=0)


def progress_bar(total: int, desc: str | None):
    """A tqdm bar over ``total`` blocks, or ``None`` when ``desc`` is ``None``."""
    if desc is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tile", leave=False)
