"""The four solve paths of :func:`ntkit.scale.solve` (chosen by :mod:`.plan`).

All paths solve ``(K + λI) α = Y`` for ``Y`` of shape ``(N, k)`` in one pass: one
factorisation for every column (direct), or one mat-vec of ``K`` per CG iteration shared
by every column (CG; each column keeps its own step sizes).

Precision. Kernel entries are always computed in float64. Paths that hold ``K`` in float32
round each entry once (``K̃``); every other quantity (vectors, residuals, the CG recurrences)
is float64. A float32 ``K̃`` times a float64 vector ``v`` is computed as ``K̃ v_hi + K̃ v_lo``
(``v = v_hi + v_lo``, both float32, in one gemm with ``2k`` columns), in blocks of at most
:data:`ACCUMULATE` columns of ``K̃`` whose float32 partial sums are added in float64: the
product is then accurate to about ``1e-7 ‖K̃‖‖v‖`` — the same order as ``K̃``'s own rounding —
at the memory traffic of one float32 pass over ``K̃`` (what a mat-vec costs here).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..layers.base import Layer
from ..layers.evaluate import evaluate
from ..layers.tiles import TensorSink, block_schedule, spans

logger = logging.getLogger("ntkit.scale")

ACCUMULATE = 2048  # columns of K̃ per float32 partial sum (see the module docstring)


# ----------------------------------------------------------------------------- precision
def _hi_lo(v: torch.Tensor) -> torch.Tensor:
    """``(N, k)`` float64 -> ``(N, 2k)`` float32 ``[v_hi, v_lo]`` with ``v_hi + v_lo = v`` to
    about 2^-48 relative."""
    hi = v.to(torch.float32)
    lo = (v - hi.to(torch.float64)).to(torch.float32)
    return torch.cat([hi, lo], dim=1)


def _join(prod: torch.Tensor, k: int) -> torch.Tensor:
    """``(n, 2k)`` float32 ``[K v_hi, K v_lo]`` -> ``(n, k)`` float64 ``K v``."""
    p = prod.to(torch.float64)
    return p[:, :k] + p[:, k:]


def _symmetric_block_matvec(blocks: Iterator[tuple[slice, slice, torch.Tensor]], n: int,
                            v: torch.Tensor) -> torch.Tensor:
    """``K v`` in float64 for ``v`` ``(N, k)`` from the blocks on and above the diagonal of
    a symmetric ``K``: ``(rows, cols, block)`` with ``cols.start >= rows.start``, the diagonal
    blocks whole and symmetric. Each off-diagonal block is used twice. float32 blocks are
    widened to float64 one block at a time (exact products; the block is the unit read)."""
    out = torch.zeros(n, v.shape[1], dtype=torch.float64, device=v.device)
    for rows, cols, block in blocks:
        b = block.to(torch.float64)
        out[rows] += b @ v[cols]
        if cols.start != rows.start:
            out[cols] += b.T @ v[rows]
    return out


# ----------------------------------------------------------------------------- operators
class DenseFloat32Kernel:
    """Path 2: the whole ``K̃`` (float32, ``(N, N)``) in RAM.

    Two products, both taking and returning float64 ``(N, k)``:

    * :meth:`matmul` (fast, one float32 pass over ``K̃``): ``K̃ v_hi + K̃ v_lo`` in float32
      gemms over :data:`ACCUMULATE` columns at a time, partial sums added in float64. Its
      error is that of float32 accumulation, about ``1e-7 sqrt(ACCUMULATE)`` relative to
      ``|K̃||v|`` (not to ``|K̃ v|``): enough for CG's search directions, not for a residual
      of ``1e-8``.
    * :meth:`matmul_exact` (float64 accumulation): ``K̃`` widened to float64 in cache-sized
      blocks; about 2-2.5 times the time of :meth:`matmul`, used for the true residuals of
      the iterative refinement (:func:`pcg` with ``apply_true``).

    ``columns`` and ``diagonal`` are float64 views of ``K̃``'s entries, so the Nyström
    preconditioner is built from the very matrix CG multiplies by.
    """

    def __init__(self, K: torch.Tensor):
        self.K = K
        n = K.shape[0]
        self.shape = (n, n)
        self.dtype = torch.float64
        self.device = K.device
        self.n_matmuls = 0

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        vec = v.ndim == 1
        v2 = v.reshape(v.shape[0], -1).to(torch.float64)
        k = v2.shape[1]
        hl = _hi_lo(v2)
        out = torch.zeros(self.shape[0], k, dtype=torch.float64, device=self.device)
        for cols in spans(self.shape[0], ACCUMULATE):
            out += _join(self.K[:, cols] @ hl[cols], k)
        self.n_matmuls += 1
        return out[:, 0] if vec else out

    def matmul_exact(self, v: torch.Tensor, rows: int = 512, cols: int = 4096) -> torch.Tensor:
        v2 = v.reshape(v.shape[0], -1).to(torch.float64)
        n = self.shape[0]
        out = torch.empty(n, v2.shape[1], dtype=torch.float64, device=self.device)
        # One reused float64 buffer (16 MiB): a fresh allocation per block costs page faults
        # (measured 4x slower); the widened block is read back from cache by the gemm.
        buf = torch.empty(min(rows, n), min(cols, n), dtype=torch.float64, device=self.device)
        for r in spans(n, rows):
            acc = out[r]
            acc.zero_()
            for c in spans(n, cols):
                b = buf[:r.stop - r.start, :c.stop - c.start]
                b.copy_(self.K[r, c])
                acc.addmm_(b, v2[c])
        return out[:, 0] if v.ndim == 1 else out

    def diagonal(self) -> torch.Tensor:
        return self.K.diagonal().to(torch.float64)

    def columns(self, index: torch.Tensor) -> torch.Tensor:
        return self.K[:, index].to(torch.float64)


class TriangleKernel:
    """``K`` kept in the strict lower triangle of an ``(N, N)`` array (its diagonal aside)
    while a Cholesky factor occupies the upper triangle: the float64 residuals of the
    direct path. ``matmul`` reads ``K`` by ``tile``-sized blocks."""

    def __init__(self, A: torch.Tensor, diag: torch.Tensor, tile: int = ACCUMULATE):
        self.A, self.diag, self.tile = A, diag.to(torch.float64), tile
        n = A.shape[0]
        self.shape = (n, n)
        self.dtype = torch.float64
        self.device = A.device
        self.n_matmuls = 0

    def _blocks(self):
        d32 = self.diag.to(self.A.dtype)
        for rows in spans(self.shape[0], self.tile):
            for cols in spans(self.shape[0], self.tile):
                if cols.start < rows.start:
                    continue
                if cols.start == rows.start:
                    low = torch.tril(self.A[rows, rows], -1)
                    block = low + low.T
                    block.diagonal().copy_(d32[rows])
                else:  # K[rows, cols] = K[cols, rows]ᵀ, stored below the diagonal
                    block = self.A[cols, rows].T
                yield rows, cols, block

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        v2 = v.reshape(v.shape[0], -1).to(torch.float64)
        self.n_matmuls += 1
        if self.A.dtype == torch.float64:  # exact float64 storage: plain float64 products
            out = torch.zeros_like(v2)
            for rows, cols, block in self._blocks():
                out[rows] += block @ v2[cols]
                if cols.start != rows.start:
                    out[cols] += block.T @ v2[rows]
        else:
            out = _symmetric_block_matvec(self._blocks(), self.shape[0], v2)
        return out[:, 0] if v.ndim == 1 else out


class ZarrKernel:
    """Path 3: ``K̃`` in a (complete) zarr store of :func:`ntkit.scale.kernel_matrix`, read
    block by block, blocks on and above the diagonal only (half the bytes of ``K``), with a
    reader thread keeping ``prefetch`` blocks ahead of the arithmetic: disk I/O and the
    mat-vec overlap (numpy/zarr reads release the GIL)."""

    def __init__(self, arr, tile: int, prefetch: int = 4):
        self.arr, self.tile, self.prefetch = arr, tile, prefetch
        n = arr.shape[0]
        self.shape = (n, n)
        self.dtype = torch.float64
        self.device = torch.device("cpu")
        self.n_matmuls = 0
        self.read_seconds = 0.0      # reader thread, summed
        self.wait_seconds = 0.0      # time the arithmetic waited for the reader
        self.bytes_read = 0

    def _blocks(self):
        schedule = list(block_schedule(self.shape[0], self.shape[0], self.tile, True))
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def reader():
            try:
                for _, _, rows, cols in schedule:
                    if stop.is_set():
                        return
                    t0 = time.perf_counter()
                    block = np.asarray(self.arr[rows, cols])
                    self.read_seconds += time.perf_counter() - t0
                    self.bytes_read += block.nbytes
                    q.put((rows, cols, block))
                q.put(None)
            except BaseException as err:  # surfaced in the consumer
                q.put(err)

        thread = threading.Thread(target=reader, daemon=True, name="ntkit-zarr-prefetch")
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.wait_seconds += time.perf_counter() - t0
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                rows, cols, block = item
                yield rows, cols, torch.from_numpy(block)
        finally:
            stop.set()
            while thread.is_alive():  # drain so the reader can finish
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        v2 = v.reshape(v.shape[0], -1).to(torch.float64)
        self.n_matmuls += 1
        out = _symmetric_block_matvec(self._blocks(), self.shape[0], v2)
        return out[:, 0] if v.ndim == 1 else out


# ----------------------------------------------------------------------------- CG
@dataclass
class CGState:
    """Everything preconditioned CG carries between iterations (what a checkpoint holds)."""

    x: torch.Tensor
    r: torch.Tensor
    p: torch.Tensor
    rz: torch.Tensor
    iteration: int = 0
    history: list[float] = field(default_factory=list)


def _digest(*tensors: torch.Tensor, extra: Any = ()) -> str:
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().contiguous().numpy()
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    h.update(repr(extra).encode())
    return h.hexdigest()


def _save_checkpoint(path: Path, state: CGState, key: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "x": state.x, "r": state.r, "p": state.p, "rz": state.rz,
                "iteration": state.iteration, "history": state.history}, tmp)
    os.replace(tmp, path)  # a kill never leaves a half-written checkpoint


def _load_checkpoint(path: Path, key: str) -> CGState | None:
    if not path.exists():
        return None
    try:
        data = torch.load(path, weights_only=True)
    except Exception:  # unreadable: start over (CG state is cheap to rebuild)
        logger.warning("CG checkpoint %s is unreadable; starting CG over.", path)
        return None
    if data.get("key") != key:
        logger.warning("CG checkpoint %s belongs to another system; starting CG over.", path)
        return None
    return CGState(data["x"], data["r"], data["p"], data["rz"], int(data["iteration"]),
                   list(data["history"]))


def pcg(apply_A: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
        preconditioner: Callable | None, tol: float, max_iter: int,
        callback: Callable[[int, float], None] | None = None,
        checkpoint: Path | None = None, checkpoint_key: str = "",
        true_residual_restarts: int = 3,
        apply_true: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cycle_reduction: float = 1e-4
        ) -> tuple[torch.Tensor, int, torch.Tensor, list[float]]:
    """Preconditioned CG on float64 ``b`` ``(N, k)``: one ``apply_A`` per iteration for all
    columns, each column with its own step sizes (converged columns stop moving).

    The recursive residual drifts from the true one in finite precision, so on reaching
    ``tol`` the true residual ``b − A x`` is computed (one more mat-vec) and CG restarts
    from ``x`` if it is above ``tol`` (at most ``true_residual_restarts`` times).

    Iterative refinement: with ``apply_true`` (an accurate product, ``apply_A`` a fast one
    with a floor: float32 accumulation), the true residuals use ``apply_true``, each CG
    cycle stops once the recursive residual fell by ``cycle_reduction`` (below the fast
    product's floor nothing is gained), and cycles repeat (up to ``true_residual_restarts
    + 8``) until the true residual meets ``tol``.
    With ``checkpoint``, the state is saved after every iteration (atomically) and a run
    resumes from it when ``checkpoint_key`` matches. Each iteration is logged (logger
    ``ntkit.scale``) and passed to ``callback(iteration, worst relative residual)``.

    Returns ``(x, iterations, true relative residual per column, history of the worst
    relative residual)``.
    """
    bnorm = torch.linalg.vector_norm(b, dim=0).clamp(min=torch.finfo(b.dtype).tiny)

    def fresh(x: torch.Tensor, r: torch.Tensor, it: int, history: list[float]) -> CGState:
        z = preconditioner(r) if preconditioner is not None else r
        return CGState(x, r, z.clone(), (r * z).sum(dim=0), it, history)

    state = _load_checkpoint(checkpoint, checkpoint_key) if checkpoint is not None else None
    if state is not None:
        logger.info("CG resumed from %s at iteration %d (residual %.2e)", checkpoint,
                    state.iteration, state.history[-1] if state.history else float("nan"))
    else:
        state = fresh(torch.zeros_like(b), b.clone(), 0, [1.0])
    restarts = 0
    true_op = apply_A if apply_true is None else apply_true
    max_restarts = true_residual_restarts + (8 if apply_true is not None else 0)
    while True:
        rel = torch.linalg.vector_norm(state.r, dim=0) / bnorm
        target = tol if apply_true is None else max(tol, float(rel.max()) * cycle_reduction)
        while float(rel.max()) > target and state.iteration < max_iter:
            Ap = apply_A(state.p)
            pAp = (state.p * Ap).sum(dim=0)
            active = rel > target
            alpha = torch.where(active & (pAp > 0), state.rz / torch.where(pAp > 0, pAp, 1.0),
                                0.0)
            state.x += alpha * state.p
            state.r -= alpha * Ap
            z = preconditioner(state.r) if preconditioner is not None else state.r
            rz_new = (state.r * z).sum(dim=0)
            beta = torch.where(active & (state.rz != 0),
                               rz_new / torch.where(state.rz != 0, state.rz, 1.0), 0.0)
            state.p = z + beta * state.p
            state.rz = rz_new
            rel = torch.linalg.vector_norm(state.r, dim=0) / bnorm
            state.iteration += 1
            worst = float(rel.max())
            state.history.append(worst)
            logger.info("CG iteration %d: relative residual %.3e", state.iteration, worst)
            if callback is not None:
                callback(state.iteration, worst)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, state, checkpoint_key)
        # The recursion says converged (or iterations ran out): check the true residual.
        r_true = b - true_op(state.x)
        rel_true = torch.linalg.vector_norm(r_true, dim=0) / bnorm
        logger.info("CG true relative residual %.3e after %d iterations",
                    float(rel_true.max()), state.iteration)
        if (float(rel_true.max()) <= tol or restarts >= max_restarts
                or state.iteration >= max_iter):
            return state.x, state.iteration, rel_true, state.history
        restarts += 1
        state = fresh(state.x, r_true, state.iteration, state.history)


# ----------------------------------------------------------------------------- kernels
def fill_dense(net: Layer, t: torch.Tensor, get: str, storage: torch.dtype, tile: int,
               progress: bool, client=None) -> torch.Tensor:
    """The symmetric ``(N, N)`` kernel of validated float64 inputs ``t``, computed in
    float64 and stored in ``storage`` (rounded once), block by block (locally through the
    evaluator, or on ``client``'s workers)."""
    n = t.shape[0]
    K = torch.empty(n, n, dtype=storage, device=t.device)
    sink = TensorSink(n, n, True, {get: K})
    run_blocks(net, t, get, sink, tile, progress, f"{get} kernel ({storage})", client)
    return K


def run_blocks(net: Layer, t: torch.Tensor, get: str, sink, tile: int, progress: bool,
               desc: str, client=None) -> None:
    """The evaluator's blocks of ``k(t, t)`` into ``sink``: here, or on a Dask client
    (inputs scattered once, blocks gathered as they finish)."""
    if client is None:
        evaluate(net, t, None, (get,), sink, block=tile, labels=("X", "X"),
                 progress=desc if progress else None)
        return
    from .distributed import client_blocks

    client_blocks(client, net, t, get, sink, tile, progress, desc)


def predict(net: Layer, X_train: torch.Tensor, X_test: torch.Tensor, coef: torch.Tensor, *,
            get: str, block_rows: int = 2048, client=None) -> torch.Tensor:
    """``k(X_test, X_train) @ coef``, ``(n_test, k)`` float64, in blocks of ``block_rows``
    test rows (the test-train kernel is never held whole); kernel entries in float64."""
    out = torch.empty(X_test.shape[0], coef.shape[1], dtype=torch.float64,
                      device=X_train.device)
    for rows in spans(X_test.shape[0], block_rows):
        sink = TensorSink(rows.stop - rows.start, X_train.shape[0], False)
        evaluate(net, X_test[rows], X_train, (get,), sink, labels=("X_test", "X"))
        out[rows] = sink.results[get] @ coef
    return out


def _potrf(A: torch.Tensor) -> None:
    """In-place Cholesky of the symmetric positive definite ``A`` (C order): the factor
    ``U`` (``A = Uᵀ U``) overwrites the upper triangle, the strict lower triangle keeps
    ``A``. LAPACK's potrf sees the C array as its transpose (Fortran order) and writes the
    lower factor there."""
    from scipy.linalg import lapack

    a = A.numpy().T  # F-contiguous view of the same memory
    fn = lapack.dpotrf if A.dtype == torch.float64 else lapack.spotrf
    c, info = fn(a, lower=1, overwrite_a=1, clean=0)
    if not np.shares_memory(c, a):  # would double the memory: never expected
        raise RuntimeError("LAPACK potrf did not factorise in place.")
    if info != 0:
        raise ValueError("The kernel matrix plus ridge is not positive definite (repeated or "
                         "nearly collinear inputs"
                         + (", or a ridge below float32 resolution" if A.dtype ==
                            torch.float32 else "")
                         + "); increase diag_reg, e.g. diag_reg=1e-6.")


def _potrs(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve with the factor that :func:`_potrf` left in ``A``; ``b`` ``(N, k)``."""
    from scipy.linalg import lapack

    fn = lapack.dpotrs if A.dtype == torch.float64 else lapack.spotrs
    rhs = np.asfortranarray(b.to(A.dtype).numpy())
    x, info = fn(A.numpy().T, rhs, lower=1)
    if info != 0:
        raise RuntimeError(f"LAPACK potrs failed (info={info}).")
    return torch.from_numpy(np.ascontiguousarray(x))


@dataclass
class PathOutput:
    coef: torch.Tensor
    iterations: int
    residual: float
    converged: bool
    history: list[float]
    timings: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


def solve_direct(K: torch.Tensor, Y: torch.Tensor, ridge: float, tol: float, max_iter: int,
                 callback=None) -> PathOutput:
    """Path 1 on a filled symmetric ``K`` (float64 or float32; overwritten by the factor).

    float64: Cholesky, then one refinement step if the true residual is above ``tol``.
    float32: the float32 Cholesky preconditions float64 CG on ``K̃ + λI`` (iterative
    refinement that cannot diverge when ``cond · 2^-24`` is not small): a handful of
    iterations, each one pass over ``K̃``.
    """
    timings: dict[str, float] = {}
    diag = K.diagonal().to(torch.float64).clone()
    K.diagonal().add_(ridge)
    t0 = time.perf_counter()
    _potrf(K)
    timings["factorise"] = time.perf_counter() - t0
    op = TriangleKernel(K, diag)

    def apply_A(v):
        return op.matmul(v) + ridge * v

    t0 = time.perf_counter()
    if K.dtype == torch.float64:
        x = _potrs(K, Y)
        r = Y - apply_A(x)
        bnorm = torch.linalg.vector_norm(Y, dim=0).clamp(min=1e-300)
        rel = torch.linalg.vector_norm(r, dim=0) / bnorm
        history = [float(rel.max())]
        its = 0
        while float(rel.max()) > tol and its < 3:  # classic refinement, all float64
            x += _potrs(K, r)
            r = Y - apply_A(x)
            rel = torch.linalg.vector_norm(r, dim=0) / bnorm
            history.append(float(rel.max()))
            its += 1
    else:
        def precond(r):
            return _potrs(K, r).to(torch.float64)

        x, its, rel, history = pcg(apply_A, Y, preconditioner=precond, tol=tol,
                                   max_iter=max_iter, callback=callback)
    timings["solve"] = time.perf_counter() - t0
    return PathOutput(x, its, float(rel.max()), bool((rel <= tol).all()), history, timings)


def store_fingerprint_key(Y: torch.Tensor, ridge: float, tol: float, extra: Any) -> str:
    return _digest(Y, extra=(ridge, tol, extra))
