"""Block planning under a memory budget, and the block loop every method runs.

A method describes its memory per row of each side and per pair of blocks; ``_plan`` finds
the largest block of rows that fits the budget, and ``_run_blocks`` fills the
``(N1, N2, *tail)`` kernel block by block (only blocks on and above the diagonal when
``x2`` is None, mirrored).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..._validation import available_memory, format_bytes
from .gram import _mirror_upper_, _mirrored, _slices
from .setup import _Setup


class MemoryBudgetError(ValueError, MemoryError):
    """One block of the computation does not fit in ``memory_budget``."""


@dataclass(frozen=True)
class Request:
    """What ``empirical_ntk`` was asked for, validated: the arguments every method takes."""

    output: str                 # "trace", "diagonal" or "full"
    per_param: bool
    budget: int                 # bytes this call may allocate, result included
    batch_size: int | None      # the most rows per block, or None for "as the budget allows"

    def n_tensors(self, n_parts: int) -> int:
        """Kernel-sized tensors held: the total, and each of ``n_parts`` parts if per_param."""
        return 1 + (n_parts if self.per_param else 0)


@dataclass
class _Plan:
    rows: int
    cache: bool


def _default_budget(device: torch.device) -> int:
    return int(0.5 * available_memory(device))


def _budget(memory_budget: Any, device: torch.device) -> int:
    """The validated ``memory_budget`` argument in bytes (default: half the free memory)."""
    if memory_budget is None:
        return _default_budget(device)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) \
            or not memory_budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes; got "
                         f"{memory_budget!r}.")
    return int(memory_budget)


def _tail(setup: _Setup, output: str) -> tuple[int, ...]:
    o = setup.n_out
    return {"trace": (), "diagonal": (o,), "full": (o, o)}[output]


def _plan(n1: int, n2: int, *, feat1: float, feat2: float, pair: Callable[[int, int], float],
          out_bytes: float, budget: int, batch_size: int | None, what: str) -> _Plan:
    """Largest block of rows (≤ batch_size) whose features and workspace fit the budget.

    ``feat1``/``feat2``: bytes per row of the x1/x2-side features; ``pair(b1, b2)``: bytes
    of workspace to contract two blocks; ``out_bytes``: the result itself.
    """
    work = budget - out_bytes
    need_one = out_bytes + feat1 + feat2 + pair(1, 1)
    if work <= 0 or feat1 + feat2 + pair(1, 1) > work:
        raise MemoryBudgetError(
            f"{what} needs at least {format_bytes(need_one)} (result "
            f"{format_bytes(out_bytes)} + one block of one row "
            f"{format_bytes(need_one - out_bytes)})"
            f" but memory_budget is {format_bytes(budget)}; raise memory_budget, use fewer "
            "inputs or parameters (params=...), or another method.")
    hi = max(n1, n2) if batch_size is None else min(batch_size, max(n1, n2))
    lo = 1
    while lo < hi:  # binary search for the largest block that fits
        mid = (lo + hi + 1) // 2
        if mid * (feat1 + feat2) + pair(mid, mid) <= work:
            lo = mid
        else:
            hi = mid - 1
    rows = lo
    # Keeping every x2-side block avoids recomputing them once per x1 block.
    cache = n1 > rows and n2 * feat2 + rows * feat1 + pair(rows, rows) <= work
    return _Plan(rows, cache)


def _plan_kernel(setup: _Setup, req: Request, *, feat1: float, feat2: float,
                 pair: Callable[[int, int], float], n_tensors: int, what: str) -> _Plan:
    """``_plan`` for this call's kernel: the result is ``n_tensors`` tensors of shape
    ``(N1, N2, *tail)`` in the computation dtype."""
    width = math.prod(_tail(setup, req.output))
    return _plan(setup.n1, setup.n2, feat1=feat1, feat2=feat2, pair=pair,
                 out_bytes=setup.n1 * setup.n2 * width * setup.itemsize * n_tensors,
                 budget=req.budget, batch_size=req.batch_size, what=what)


def _write(dst: torch.Tensor, block: torch.Tensor, s1: slice, s2: slice, mirror: bool) -> None:
    dst[s1, s2] = block
    if mirror:
        dst[s2, s1] = _mirrored(block)


def _run_blocks(setup: _Setup, req: Request, plan: _Plan,
                feat1: Callable[[torch.Tensor], Any], feat2: Callable[[torch.Tensor], Any],
                contract: Callable[[Any, Any], dict[str, torch.Tensor]],
                same_features: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fill the (N1, N2, *tail) kernel block by block; mirror when ``x2`` is None.

    ``feat1``/``feat2`` map a block of x1/x2 rows to that side's features (``same_features``:
    they are the same map, so a diagonal block reuses one side); ``contract(f1, f2)`` returns
    ``{"total": block}``, or ``{name: block}`` per parameter tensor when ``per_param``.
    """
    x1, x2 = setup.x1, setup.x2
    per_param = req.per_param
    tail = _tail(setup, req.output)
    symmetric = x2 is None
    n1, n2 = setup.n1, setup.n2
    xs2 = x1 if symmetric else x2
    opts = {"dtype": setup.dtype, "device": x1.device}
    total = torch.zeros((n1, n2, *tail), **opts)
    parts: dict[str, torch.Tensor] = {}
    blocks1 = _slices(n1, plan.rows)
    blocks2 = blocks1 if symmetric else _slices(n2, plan.rows)
    cache: dict[int, Any] = {}

    def side2(j: int) -> Any:
        if j in cache:
            return cache[j]
        value = feat2(xs2[blocks2[j]])
        if plan.cache:
            cache[j] = value
        return value

    for i, s1 in enumerate(blocks1):
        f1 = side2(i) if symmetric and same_features else feat1(x1[s1])
        for j, s2 in enumerate(blocks2):
            if symmetric and j < i:
                continue
            f2 = f1 if symmetric and same_features and i == j else side2(j)
            result = contract(f1, f2)
            mirror = symmetric and i != j
            if per_param:
                for name, block in result.items():
                    if name not in parts:
                        parts[name] = torch.zeros((n1, n2, *tail), **opts)
                    if symmetric and i == j:
                        _mirror_upper_(block)
                    _write(parts[name], block, s1, s2, mirror)
                block = sum(result.values())
            else:
                (block,) = result.values()
            if symmetric and i == j:
                # Whatever the contraction (ntk_vp's pushed-forward columns, diagonal
                # output's bmm), a diagonal block of Θ(x, x) is made symmetric by copying.
                _mirror_upper_(block)
            _write(total, block, s1, s2, mirror)
            del result, block, f2
        del f1
    return total, parts
