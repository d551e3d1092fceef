"""The cost model of :func:`ntkit.scale.solve`: which of four paths solves ``(K + λI) α = Y``.

The paths, from most to least memory:

1. ``"direct"`` — ``K`` in RAM and a Cholesky factorisation. In float64 when the ``8 N²``
   bytes fit; otherwise float32 (``4 N²`` bytes: the factor overwrites one triangle of
   ``K``, the other keeps ``K`` for float64 residuals), refined to float64 accuracy by
   conjugate gradients preconditioned with the float32 factor.
2. ``"dense_cg"`` — ``K`` in RAM in float32 (``4 N²`` bytes), CG with a Nyström
   preconditioner; mat-vecs accumulate in float64 (see :mod:`.paths`).
3. ``"disk_cg"`` — ``K`` out of core in the resumable zarr store of
   :func:`~ntkit.scale.kernel_matrix` (float32, ``4 N²`` bytes of disk), CG streaming its
   blocks with a prefetching reader.
4. ``"matrix_free_cg"`` — CG recomputing ``K`` tile by tile at every iteration (the only
   path when neither RAM nor disk holds ``K``; its cost is one kernel per iteration).

Every path computes kernel entries in float64 (float32 storage, where used, rounds the
entries once: measured 1.5e-7 relative on predictions, where float32 *arithmetic* costs
1.3e-6, see ``benchmarks/results/solve_paths.md``).

The model needs only sizes: ``N``, the output count ``k``, the feature count, the memory
budget, and the RAM and disk free now. Times are estimated from rates measured on a 2-core
AMD EPYC with 24 GiB (:data:`RATES`); they only rank the paths, and the one chosen is
logged (logger ``ntkit.scale``) with the reason and recorded on the result
(``SolveResult.plan``). A path that cannot fit is refused before anything is computed.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .._validation import available_memory, format_bytes

logger = logging.getLogger("ntkit.scale")

PATHS = ("direct", "dense_cg", "disk_cg", "matrix_free_cg")
# Fraction of the free RAM a plan may use: the rest is left to the OS, the page cache (the
# out-of-core path streams through it) and whatever else runs.
RAM_FRACTION = 0.8
DISK_FRACTION = 0.9

# Rates that rank the paths (2 cores, AMD EPYC, torch 2.13 CPU; measured with
# benchmarks/solve_paths.py). Units: seconds per kernel entry (float64 arithmetic, per input
# feature for the Gram and per entry for the layers), flop/s, bytes/s.
RATES = {
    "gram_flops": 9.0e10,         # float64 gemm of the input Gram
    "entry_seconds": 2.5e-8,      # elementwise layers, per kernel entry and Dense+activation
    "potrf64_flops": 4.5e10,      # Cholesky, float64
    "potrf32_flops": 9.0e10,      # Cholesky, float32
    "ram_bandwidth": 8.0e9,       # a float32 mat-vec streams K once
    "disk_read": 1.0e9,
    "disk_write": 1.0e9,
}
CG_ITERATIONS = 40   # assumed for ranking; Nyström-preconditioned CG at tol 1e-8 (measured 20-60)
REFINE_ITERATIONS = 4


def available_ram() -> int:
    """Bytes of RAM free now (``MemAvailable``); the tests replace this function."""
    return available_memory("cpu")


def available_disk(path: str | os.PathLike | None) -> int | None:
    """Bytes free on the filesystem that would hold ``path`` (its nearest existing parent);
    ``None`` when no path is given (the out-of-core path then is not possible)."""
    if path is None:
        return None
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return int(shutil.disk_usage(p).free)


@dataclass(frozen=True)
class SolvePlan:
    """What :func:`plan_solve` decided, and why.

    Attributes:
        path: one of :data:`PATHS`.
        precision: ``"float64"`` (K held in float64), ``"float32+refinement"`` (float32
            factor, float64 residuals) or ``"float32 storage"`` (float32 K, float64
            arithmetic elsewhere); ``"float64 recomputed"`` for the matrix-free path.
        reason: one sentence, as logged.
        ram_bytes, disk_bytes: what the chosen path needs.
        ram_limit, disk_free: what was available to it (``disk_free`` ``None``: no store).
        estimates: estimated seconds of every path that fits, by name (``inf``: does not
            fit or not applicable).
        needs: bytes of RAM (and disk for ``disk_cg``) each path would need.
    """

    path: str
    precision: str
    reason: str
    n: int
    n_outputs: int
    ram_bytes: int
    disk_bytes: int
    ram_limit: int
    disk_free: int | None
    estimates: dict[str, float] = field(default_factory=dict)
    needs: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.path} ({self.precision}): {self.reason}"


def _kernel_seconds(n1: int, n2: int, d: int, depth: int, symmetric: bool) -> float:
    entries = n1 * n2 * (0.5 if symmetric else 1.0)
    return entries * (2 * d / RATES["gram_flops"] + depth * RATES["entry_seconds"])


def path_needs(n: int, k: int, d: int, n_landmarks: int, tile: int) -> dict[str, tuple[int, int]]:
    """``(RAM bytes, disk bytes)`` each path needs for ``N = n``, ``k`` outputs."""
    m = min(n_landmarks, n)
    vectors = 8 * n * k * 8 + 2 * 8 * n * d          # CG's float64 vectors, inputs
    nystrom = 2 * 8 * n * m                           # C (N, m) float64 and one product
    panel = 2 * 4 * tile * tile * max(1, math.ceil(n / tile))  # two row panels in flight
    workspace = 48 * 8 * 512 * 512                    # the evaluator's tiles
    return {
        "direct64": (8 * n * n + vectors + workspace, 0),
        "direct32": (4 * n * n + vectors + workspace, 0),
        "dense_cg": (4 * n * n + vectors + nystrom + workspace, 0),
        "disk_cg": (vectors + nystrom + panel + 8 * tile * tile + workspace, 4 * n * n),
        "matrix_free_cg": (vectors + nystrom + 8 * tile * tile + workspace, 0),
    }


def plan_solve(n: int, n_outputs: int = 1, *, n_features: int = 1, depth: int = 2,
               method: str = "auto", memory_budget: int | None = None,
               store: str | os.PathLike | None = None, ridge_positive: bool = True,
               n_landmarks: int = 1000, tile: int = 2048, device=None) -> SolvePlan:
    """Choose the path for an ``N x N`` kernel system with ``n_outputs`` right-hand sides.

    Args:
        n: training points ``N``.
        n_outputs: target columns ``k`` (all solved in one pass: one factorisation, or one
            mat-vec per CG iteration for all columns).
        n_features: input features ``d`` (kernel cost).
        depth: Dense layers of the network (kernel cost).
        method: ``"auto"`` or one of :data:`PATHS` to force a path (still refused if it
            cannot fit).
        memory_budget: most bytes of RAM the solve may use; ``None``: :data:`RAM_FRACTION`
            of the free RAM (:func:`available_ram`). The smaller of the two always applies.
        store: directory for the out-of-core kernel; ``None`` rules out ``"disk_cg"``.
        ridge_positive: whether ``λ > 0``; the CG paths need it (Nyström preconditioner,
            convergence), so with ``λ = 0`` only ``"direct"`` is possible.
        n_landmarks, tile: as in :func:`ntkit.scale.solve`.
        device: where ``K`` would live; for a CUDA device its free memory replaces the
            free RAM (the direct and out-of-core paths run on the CPU and are refused for
            CUDA inputs by :func:`ntkit.scale.solve`).
    Returns:
        :class:`SolvePlan`.
    Raises:
        MemoryError: no path fits (or the forced one does not), naming what each needs.
    """
    if method != "auto" and method not in PATHS:
        raise ValueError(f"method must be 'auto' or one of {PATHS}; got {method!r}.")
    on_gpu = device is not None and str(device).startswith("cuda")
    free = available_memory(device) if on_gpu else available_ram()
    ram_limit = int(RAM_FRACTION * free)
    if memory_budget is not None:
        ram_limit = min(ram_limit, int(memory_budget))
    disk_free = available_disk(store)
    disk_limit = None if disk_free is None else int(DISK_FRACTION * disk_free)
    needs = path_needs(n, n_outputs, n_features, n_landmarks, tile)

    def fits(name: str) -> bool:
        ram, disk = needs[name]
        if ram > ram_limit:
            return False
        return disk == 0 or (disk_limit is not None and disk <= disk_limit)

    kernel = _kernel_seconds(n, n, n_features, depth, True)
    iters = CG_ITERATIONS
    m = min(n_landmarks, n)
    nystrom = 2 * n * m * m / RATES["gram_flops"]
    solve_rhs = 2 * n * n * n_outputs / RATES["gram_flops"]
    est = {
        "direct64": kernel + n ** 3 / 3 / RATES["potrf64_flops"] + solve_rhs,
        "direct32": kernel + n ** 3 / 3 / RATES["potrf32_flops"]
        + REFINE_ITERATIONS * 4 * n * n / RATES["ram_bandwidth"],
        "dense_cg": kernel + nystrom + iters * 4 * n * n / RATES["ram_bandwidth"],
        "disk_cg": kernel + 4 * n * n / RATES["disk_write"] + nystrom
        + iters * 2 * n * n / RATES["disk_read"],  # the upper half of K per iteration
        "matrix_free_cg": (iters + 1) * kernel + nystrom,
    }
    usable = {name: fits(name) for name in needs}
    if not ridge_positive:
        for name in ("dense_cg", "disk_cg", "matrix_free_cg"):
            usable[name] = False

    def describe(name: str) -> str:
        ram, disk = needs[name]
        return f"{name} needs {format_bytes(ram)} RAM" + (
            f" and {format_bytes(disk)} disk" if disk else "")

    limits = (f"RAM limit {format_bytes(ram_limit)} ({RAM_FRACTION:.0%} of "
              f"{format_bytes(free)} free" + (f", memory_budget {format_bytes(memory_budget)}"
                                              if memory_budget is not None else "") + ")"
              + (f", disk free {format_bytes(disk_free)} at {str(store)!r}"
                 if disk_free is not None else ", no store= for an out-of-core kernel"))
    estimates = {name: (est[name] if usable[name] else math.inf) for name in est}

    if method != "auto":
        candidates = ["direct64", "direct32"] if method == "direct" else [method]
        ok = [c for c in candidates if usable[c]]
        if not ok:
            why = ("needs a positive ridge (diag_reg > 0)" if not ridge_positive
                   and method != "direct" else "cannot fit")
            raise MemoryError(f"method={method!r} {why} for N = {n:,}, {n_outputs} outputs: "
                              + "; ".join(describe(c) for c in candidates) + f"; {limits}.")
        choice = ok[0]
        reason = f"forced by method={method!r}; {describe(choice)} ({limits})"
    else:
        fitting = [name for name in est if usable[name]]
        if not fitting:
            hint = ("" if ridge_positive else " With diag_reg = 0 only the direct path "
                    "applies; a positive ridge allows the CG paths.")
            raise MemoryError(f"No solve path fits N = {n:,} with {n_outputs} outputs: "
                              + "; ".join(describe(c) for c in est) + f"; {limits}. Pass "
                              "store=PATH on a disk with room for the kernel, or raise "
                              "memory_budget." + hint)
        best = min(fitting, key=lambda name: est[name])
        # Exact float64 is preferred while it costs little more: its time does not rest on
        # an assumed iteration count.
        if usable["direct64"] and est["direct64"] <= max(2 * est[best], est[best] + 10.0):
            choice = "direct64"
        else:
            choice = best
        reason = (f"estimated {est[choice]:.0f} s, fastest that fits"
                  if choice == best else
                  f"estimated {est[choice]:.0f} s, within 2x of the fastest "
                  f"({best}, {est[best]:.0f} s), exact float64")
        reason += f"; {describe(choice)}; {limits}"
    path = "direct" if choice.startswith("direct") else choice
    precision = {"direct64": "float64", "direct32": "float32+refinement",
                 "dense_cg": "float32 storage", "disk_cg": "float32 storage",
                 "matrix_free_cg": "float64 recomputed"}[choice]
    plan = SolvePlan(path=path, precision=precision, reason=reason, n=n,
                     n_outputs=n_outputs, ram_bytes=needs[choice][0],
                     disk_bytes=needs[choice][1], ram_limit=ram_limit, disk_free=disk_free,
                     estimates=estimates, needs={k: v[0] + v[1] for k, v in needs.items()})
    logger.info("ntkit.scale.solve: N=%d, %d outputs -> %s", n, n_outputs, plan)
    return plan
