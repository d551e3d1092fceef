"""Analytic infinite-width NNGP and NTK kernels, evaluated tile by tile.

The only O(N² d) work is the input Gram ``x1 x2ᵀ``; every layer after it is elementwise on
the tile. Tiles are small enough to stay in cache, so the peak memory is the output plus a
few tiles, never several ``N x N`` temporaries. With ``x2=None`` only the tiles on and
above the diagonal are computed, and mirrored, so the result is exactly symmetric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .._validation import as_input_pair, available_memory, format_bytes, resolve_dtype
from ..layers.base import Layer, PairKernel

KERNEL_NAMES = ("nngp", "ntk")
# Bytes of elementwise workspace per tile entry: about a dozen live temporaries per layer.
_WORKSPACE_FACTOR = 16
_DEFAULT_TILE = 512


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


def _tiles(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _tile_size(memory_budget: int | None, n_kernels: int, itemsize: int, heavy: bool) -> int:
    if memory_budget is None:
        return 256 if heavy else _DEFAULT_TILE
    per_entry = _WORKSPACE_FACTOR * (n_kernels + 1) * itemsize * (64 if heavy else 1)
    side = int(math.sqrt(max(memory_budget, 1) / per_entry))
    if side < 1:
        raise ValueError(f"memory_budget={memory_budget} bytes is too small for even one "
                         f"kernel entry ({per_entry} bytes); raise it.")
    return side


def _uses_quadrature(net: Layer) -> bool:
    from ..layers.activations import Elementwise
    from ..layers.combinators import Parallel, Serial

    if isinstance(net, Elementwise):
        return True
    if isinstance(net, Serial):
        return any(_uses_quadrature(layer) for layer in net.layers)
    if isinstance(net, Parallel):
        return any(_uses_quadrature(b) for b in net.branches)
    return False


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
    bits = (t + 0.0).contiguous().reshape(t.shape[0], -1)
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


def analytic_kernel(net: Layer, x1: Any, x2: Any | None = None,
                    get: str | Sequence[str] = KERNEL_NAMES, diagonal: bool = False, *,
                    dtype: Any = None, memory_budget: int | None = None,
                    out: dict[str, torch.Tensor] | None = None) -> Kernels:
    """Compute ``net``'s infinite-width kernels; see :meth:`ntkit.layers.base.Layer.kernel`.

    ``out`` may supply preallocated ``(N1, N2)`` tensors by name (used by the out-of-core
    paths); they are filled in place.
    """
    names = normalize_get(get)
    dtype = resolve_dtype(dtype)
    t1, t2 = as_input_pair(x1, x2, dtype=dtype)
    n0 = t1.shape[1]
    want_ntk = "ntk" in names

    if diagonal:
        if t2 is not None:
            raise ValueError("diagonal=True computes k(x, x) for x1 only; pass x2=None.")
        var = (t1 * t1).sum(dim=1) / n0
        state = PairKernel(cov=var, var1=var, var2=var,
                           ntk=torch.zeros_like(var) if want_ntk else None, width=n0,
                           diagonal=True)
        final = _final(net.kernel_map(state))
        return Kernels(nngp=final.cov if "nngp" in names else None,
                       ntk=final.ntk if want_ntk else None)

    symmetric = t2 is None
    t2 = t1 if symmetric else t2
    n1, n2 = t1.shape[0], t2.shape[0]
    itemsize = torch.finfo(dtype).bits // 8
    need = n1 * n2 * itemsize * len(names)
    results: dict[str, torch.Tensor] = {}
    if out is None:
        free = available_memory(t1.device)
        if need > 0.9 * free:
            raise MemoryError(
                f"The dense {n1} x {n2} {'/'.join(names)} kernel needs {format_bytes(need)} "
                f"but only {format_bytes(free)} is available on {t1.device}. Compute it out of "
                "core with ntkit.scale.kernel_matrix(..., out=PATH), or solve without forming "
                "it with ntkit.scale.solve(..., method='cg').")
        for name in names:
            results[name] = torch.empty(n1, n2, dtype=dtype, device=t1.device)
    else:
        for name in names:
            buf = out[name]
            if tuple(buf.shape) != (n1, n2):
                raise ValueError(f"out[{name!r}] has shape {tuple(buf.shape)}; need {(n1, n2)}.")
            results[name] = buf

    sq1 = torch.linalg.vecdot(t1, t1) / n0
    sq2 = sq1 if symmetric else torch.linalg.vecdot(t2, t2) / n0
    ids1, ids2 = _shared_row_ids(t1, None if symmetric else t2)
    quadrature = _uses_quadrature(net)
    size = _tile_size(memory_budget, len(names), itemsize, quadrature)
    # The NTK of the raw input is 0; a 0-d tensor broadcasts without filling a tile.
    zero = torch.zeros((), dtype=dtype, device=t1.device)
    for rows in _tiles(n1, size):
        for cols in _tiles(n2, size):
            if symmetric and cols.start < rows.start:
                continue
            cov = (t1[rows] @ t2[cols].T).div_(n0)
            if ids1 is not None:
                same = ids1[rows, None] == ids2[None, cols]
                cov = torch.where(same, sq1[rows, None].expand_as(cov), cov)
            if symmetric and cols == rows:
                # A Gram tile from gemm is symmetric only up to rounding, and its diagonal may
                # differ from the row norms in the last bit (which arccos would amplify to
                # ~1e-8 at rho = 1). Make both exact.
                cov = (cov + cov.T).mul_(0.5)
                cov.diagonal().copy_(sq1[rows])
            state = PairKernel(cov=cov, var1=sq1[rows, None], var2=sq2[None, cols],
                               ntk=zero if want_ntk else None, width=n0)
            final = _final(net.kernel_map(state))
            for name in names:
                tile = final.cov if name == "nngp" else final.ntk
                if quadrature and symmetric and cols == rows:
                    # Closed forms are symmetric already; a quadrature rule treats its two
                    # arguments differently and is symmetric only to its accuracy.
                    tile = (tile + tile.T).mul_(0.5)
                target = results[name]
                target[rows, cols] = tile
                if symmetric and cols.start != rows.start:
                    target[cols, rows] = tile.T
    return Kernels(nngp=results.get("nngp"), ntk=results.get("ntk"))
