"""Kernel regression solves that scale: tiled kernel operators, preconditioned conjugate
gradients and a Nyström preconditioner.

The system is ``(K + λ I) α = y`` with ``K`` the ``N x N`` train kernel. ``method="cg"``
never holds ``K``: each conjugate-gradient step is one tiled mat-vec, recomputing the kernel
tile by tile (O(tile²) memory). Only the tiles on and above the diagonal are computed; each
is used twice (``K_ij v_j`` and ``K_ijᵀ v_i``).

The Nyström preconditioner follows the randomized-Nyström recipe (Frangella, Tropp & Udell,
2021; Falkon, Rudi et al. 2017 uses the same landmark approximation): from ``m`` landmark
columns ``C = K[:, S]`` and ``W = K[S, S]`` form ``K̂ = C W⁺ Cᵀ = U Λ Uᵀ`` and precondition with

    P⁻¹ = U diag((λ_m + μ) / (Λ + μ)) Uᵀ + (I − U Uᵀ),

``μ`` the ridge and ``λ_m`` the smallest kept Nyström eigenvalue. The preconditioned matrix
has its top ``m`` eigenvalues squeezed to about ``λ_m + μ``, so CG needs tens of iterations
when the kernel spectrum beyond ``m`` is small against ``μ``, instead of thousands.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .._validation import (
    as_inputs,
    as_square_kernel,
    as_targets,
    check_choice,
    check_get,
    check_nonnegative,
    check_positive_int,
    resolve_dtype,
    resolve_ridge,
)
from ..layers.base import Layer
from .tiled import (
    DEFAULT_TILE,
    _progress_bar,
    check_dense_fits,
    iter_tiles,
    kernel_tile,
    tile_slices,
)


class LinearKernelOperator(Protocol):
    """What :func:`solve` needs from a symmetric positive semi-definite ``N x N`` kernel."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmul(self, v: torch.Tensor) -> torch.Tensor: ...
    def diagonal(self) -> torch.Tensor: ...
    def columns(self, index: torch.Tensor) -> torch.Tensor: ...


class KernelOperator:
    """The train kernel ``K = k(X, X)`` of a network as a matrix-free operator.

    Args:
        net: an ntkit network.
        X: ``(N, d)`` training inputs (numpy or torch); the computation runs on its device.
        get: ``"ntk"`` or ``"nngp"`` (per-output kernel).
        tile: tile side for the mat-vecs; memory use is a few ``tile x tile`` blocks.
        dtype: ``torch.float64`` (default) or ``torch.float32``.
    """

    def __init__(self, net: Layer, X: Any, *, get: str = "ntk", tile: int = DEFAULT_TILE,
                 dtype: Any = None, progress: bool = False):
        from .tiled import check_net

        self._setup(check_net(net), as_inputs(X, "X", dtype=resolve_dtype(dtype)),
                    check_get(get), check_positive_int(tile, "tile"), progress)

    @classmethod
    def from_validated(cls, net: Layer, X: torch.Tensor, *, get: str, tile: int = DEFAULT_TILE,
                       progress: bool = False) -> KernelOperator:
        """The operator of a network and a finite ``(N, d)`` floating tensor ``X`` that the
        caller validated (the estimators); nothing is checked again."""
        op = cls.__new__(cls)
        op._setup(net, X, get, tile, progress)
        return op

    def _setup(self, net: Layer, X: torch.Tensor, get: str, tile: int, progress: bool) -> None:
        self.net, self.X, self.get, self.tile = net, X, get, tile
        n = self.X.shape[0]
        self.shape = (n, n)
        self.dtype = self.X.dtype
        self.device = self.X.device
        self.progress = progress
        self.n_matmuls = 0

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        """``K v`` for ``v`` of shape ``(N,)`` or ``(N, k)``, computed tile by tile."""
        vec = v.ndim == 1
        v2 = v.reshape(v.shape[0], -1)
        out = torch.zeros_like(v2)
        tiles = list(iter_tiles(self.shape[0], self.shape[0], self.tile, True))
        bar = _progress_bar(len(tiles), self.progress, "K @ v")
        for i, j, rows, cols in tiles:
            block = kernel_tile(self.net, self.X, None, rows, cols, self.get, True)
            out[rows] += block @ v2[cols]
            if i != j:
                out[cols] += block.T @ v2[rows]
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        self.n_matmuls += 1
        return out[:, 0] if vec else out

    def diagonal(self) -> torch.Tensor:
        """``diag(K)``, shape ``(N,)``, in O(N d)."""
        return self.net.kernel(self.X, get=self.get, diagonal=True, dtype=self.dtype)[self.get]

    def columns(self, index: torch.Tensor) -> torch.Tensor:
        """``K[:, index]``, shape ``(N, m)``, computed in row tiles."""
        landmarks = self.X[index]
        out = torch.empty(self.shape[0], len(index), dtype=self.dtype, device=self.device)
        for rows in tile_slices(self.shape[0], self.tile):
            out[rows] = self.net.kernel(self.X[rows], landmarks, get=self.get,
                                        dtype=self.dtype)[self.get]
        return out


class DenseOperator:
    """A kernel matrix already in memory, behind the same interface as :class:`KernelOperator`.

    ``K`` is checked as every train kernel in ntkit (:func:`ntkit._validation.as_square_kernel`:
    finite, symmetric to one tolerance, then made exactly symmetric): CG and the Nyström
    preconditioner assume a symmetric matrix, and read it by rows and by columns."""

    def __init__(self, K: Any, dtype: Any = None):
        k = as_square_kernel(K, "K", dtype=resolve_dtype(dtype) if dtype is not None else None)
        self.K = k
        self.shape = tuple(k.shape)
        self.dtype = k.dtype
        self.device = k.device
        self.n_matmuls = 0

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        self.n_matmuls += 1
        return self.K @ v

    def diagonal(self) -> torch.Tensor:
        return self.K.diagonal().clone()

    def columns(self, index: torch.Tensor) -> torch.Tensor:
        return self.K[:, index]


class NystromPreconditioner:
    """``P⁻¹ ≈ (K + μ I)⁻¹`` from ``m`` uniformly sampled landmark columns of ``K``.

    Memory: one ``(N, m)`` matrix. Setup: ``N m`` kernel entries and one ``N m²`` product;
    each application costs O(N m).

    Args:
        operator: the kernel operator (needs ``columns``).
        mu: the ridge ``μ > 0`` of the system.
        n_landmarks: ``m``; at most ``N``.
        seed: seed of the landmark sample.
    """

    def __init__(self, operator: LinearKernelOperator, mu: float, n_landmarks: int,
                 seed: int | None = 0):
        n = operator.shape[0]
        m = min(check_positive_int(n_landmarks, "n_landmarks"), n)
        if not mu > 0:
            raise ValueError("The Nyström preconditioner needs diag_reg > 0 (a positive ridge); "
                             f"got an absolute ridge of {mu}.")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else int(seed))
        index = torch.randperm(n, generator=gen)[:m].sort().values.to(operator.device)
        C = operator.columns(index)                      # (N, m)
        W = C[index]
        W = 0.5 * (W + W.T)                              # (m, m)
        # W^{-1/2} as a pseudo-inverse square root: landmarks may repeat a point.
        evals, evecs = torch.linalg.eigh(W)
        keep = evals > evals.max().clamp(min=0) * m * torch.finfo(W.dtype).eps
        W_isqrt = evecs[:, keep] / evals[keep].sqrt()
        # K̂ = C W⁺ Cᵀ = U Λ Uᵀ with U = C R: the eigenvectors come from the small matrix
        # W^{-1/2} CᵀC W^{-1/2} = V Λ Vᵀ, so R = W^{-1/2} V Λ^{-1/2}. Keeping C and R instead
        # of U costs one N·m² product (CᵀC) rather than three.
        small = W_isqrt.T @ (C.T @ C) @ W_isqrt
        lam, V = torch.linalg.eigh(0.5 * (small + small.T))
        keep = lam > lam.max() * 1e-10
        lam, V = lam[keep], V[:, keep]
        self.C = C
        self.R = (W_isqrt @ V) / lam.sqrt()
        self.eigenvalues = lam                           # Nyström eigenvalues of K
        self.mu = float(mu)
        self.scale = (lam.min() + self.mu) / (lam + self.mu)
        self.index = index

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        vec = r.ndim == 1
        r2 = r.reshape(r.shape[0], -1)
        proj = self.R.T @ (self.C.T @ r2)                # Uᵀ r
        out = r2 + self.C @ (self.R @ ((self.scale[:, None] - 1.0) * proj))
        return out[:, 0] if vec else out


@dataclass
class SolveResult:
    """Solution of ``(K + λ I) α = y``.

    Attributes:
        coef: ``α``, shape of ``y`` (``(N,)`` or ``(N, k)``).
        method: the path that ran: ``"direct"``, ``"dense_cg"``, ``"disk_cg"``,
            ``"matrix_free_cg"``, or the former ``"cholesky"``/``"cg"``.
        ridge: the absolute ``λ`` added to the diagonal.
        iterations: CG iterations (0 for Cholesky).
        residual: final relative residual ``max_k ‖y − (K + λI)α‖ / ‖y‖`` (CG's recursive
            estimate; the exact value for Cholesky is not computed and is ``0``).
        converged: whether every column reached ``tol``.
        history: relative residual after each CG iteration.
        plan: the cost model's :class:`~ntkit.scale.plan.SolvePlan` (path, precision, reason,
            estimates); ``None`` for ``"cholesky"``/``"cg"``.
        timings: seconds by phase (``kernel``, ``preconditioner``, ``factorise``,
            ``solve``, ``total``) for the planned paths.
        details: path-specific figures (for ``"disk_cg"``: bytes read, reader seconds,
            seconds the arithmetic waited for the reader, the store path).
    """

    coef: torch.Tensor
    method: str
    ridge: float
    iterations: int = 0
    residual: float = 0.0
    converged: bool = True
    history: list[float] = field(default_factory=list)
    plan: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def conjugate_gradient(apply_A, b: torch.Tensor, *, preconditioner=None, tol: float = 1e-6,
                       max_iter: int = 1000, x0: torch.Tensor | None = None,
                       callback=None) -> tuple[torch.Tensor, int, torch.Tensor, list[float]]:
    """Preconditioned CG for ``A x = b`` with ``b`` of shape ``(N, k)``, each column run
    independently (its own step sizes) but sharing one ``A`` mat-vec per iteration.

    Stops when every column has ``‖r‖ ≤ tol ‖b‖``. Returns ``(x, iterations, relative
    residuals per column, history of the worst relative residual)``.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply_A(x) if x0 is not None else b.clone()
    bnorm = torch.linalg.vector_norm(b, dim=0).clamp(min=torch.finfo(b.dtype).tiny)
    z = preconditioner(r) if preconditioner is not None else r
    p = z.clone()
    rz = (r * z).sum(dim=0)
    rel = torch.linalg.vector_norm(r, dim=0) / bnorm
    history = [float(rel.max())]
    it = 0
    while float(rel.max()) > tol and it < max_iter:
        Ap = apply_A(p)
        pAp = (p * Ap).sum(dim=0)
        active = rel > tol
        # Converged columns stop moving (alpha = 0) so they cannot drift or divide by zero.
        alpha = torch.where(active & (pAp > 0), rz / torch.where(pAp > 0, pAp, 1.0), 0.0)
        x += alpha * p
        r -= alpha * Ap
        z = preconditioner(r) if preconditioner is not None else r
        rz_new = (r * z).sum(dim=0)
        beta = torch.where(active & (rz != 0), rz_new / torch.where(rz != 0, rz, 1.0), 0.0)
        p = z + beta * p
        rz = rz_new
        rel = torch.linalg.vector_norm(r, dim=0) / bnorm
        it += 1
        history.append(float(rel.max()))
        if callback is not None:
            callback(it, float(rel.max()))
    return x, it, rel, history


NEW_PATHS = ("direct", "dense_cg", "disk_cg", "matrix_free_cg")
METHODS = ("auto", "cholesky", "cg") + NEW_PATHS


def solve(net_or_operator: Layer | LinearKernelOperator | Any, X: Any, y: Any, *,
          method: str = "auto", preconditioner: str | None = None, diag_reg: float = 0.0,
          diag_reg_absolute_scale: bool = False, tol: float = 1e-6, max_iter: int = 1000,
          get: str = "ntk", n_landmarks: int = 1000, tile: int = DEFAULT_TILE,
          seed: int | None = 0, dtype: Any = None, progress: bool = False,
          callback=None, memory_budget: int | None = None,
          store: str | os.PathLike | None = None, client=None) -> SolveResult:
    """Solve the kernel regression system ``(K + λ I) α = y`` with ``K = k(X, X)``.

    Predictions are then ``k(X_test, X) α`` (:func:`ntkit.scale.predict` computes them in
    blocks). Every column of ``y`` is solved in the same pass (one factorisation, or one
    mat-vec per CG iteration for all columns).

    With a network, ``method="auto"`` (default) lets the cost model (:mod:`.plan`) choose
    among four paths from ``N``, the output count, ``memory_budget`` and the RAM and disk
    free now; the choice and its reason are logged (logger ``ntkit.scale``, INFO) and kept in
    ``result.plan``:

    * ``"direct"``: ``K`` in RAM, Cholesky — float64 where ``8 N²`` bytes fit, else a float32
      factor (``4 N²`` bytes in all) refined to float64 residuals by CG;
    * ``"dense_cg"``: ``K`` in RAM as float32, Nyström-preconditioned CG in float64;
    * ``"disk_cg"``: ``K`` in a resumable zarr store under ``store`` (float32;
      ``store/kernel-<fingerprint>/kernel``, one per inputs/network/kernel/tiling), CG
      streaming its blocks with a prefetching reader; needs ``store``;
    * ``"matrix_free_cg"``: CG recomputing ``K`` at each iteration (today's ``"cg"``).

    Kernel entries are computed in float64 on every path (rounded once to float32 where the
    plan stores them so); the CG paths need ``diag_reg > 0``. A forced path that cannot fit
    is refused (``MemoryError``) before anything is computed.

    Resuming and progress: ``"disk_cg"`` keeps finished kernel blocks (checksummed) and the
    CG state after every iteration under ``store``; rerunning the same call resumes both.
    ``"matrix_free_cg"`` checkpoints its CG state there too when ``store`` is given. The
    in-RAM paths restart from scratch (their kernel is one pass of the evaluator). Kernel
    blocks show a progress bar with ``progress=True``; each CG iteration's relative residual
    is logged and passed to ``callback``.

    Args:
        net_or_operator: an ntkit network (the kernel is ``net.kernel(X, X)[get]``), an
            operator such as :class:`KernelOperator`/:class:`DenseOperator`, or a dense
            ``(N, N)`` kernel matrix. With an operator or matrix ``X`` is ignored (pass None);
            ``"auto"`` then means ``"cholesky"`` for a matrix and ``"cg"`` for an operator.
        X: ``(N, d)`` training inputs (with a network).
        y: ``(N,)`` or ``(N, k)`` targets.
        method: ``"auto"``, one of the four paths above, or the former names
            ``"cholesky"`` (forms ``K`` in ``dtype`` and factorises it with torch) and
            ``"cg"`` (matrix-free CG in ``dtype``, optional ``preconditioner``).
        preconditioner: ``None`` or ``"nystrom"``, for ``method="cg"`` only (the new CG
            paths always use Nyström).
        diag_reg: the ridge. By default relative: ``λ = diag_reg · mean(diag K)``
            (neural-tangents' convention); with ``diag_reg_absolute_scale=True``, ``λ =
            diag_reg``.
        tol: CG stops when the *true* residual ``‖y − (K + λI)α‖ ≤ tol ‖y‖`` for every
            column (recomputed when the recursion claims convergence).
        max_iter: most CG iterations.
        get: ``"ntk"`` or ``"nngp"``.
        n_landmarks: Nyström landmarks ``m``.
        tile: kernel block side (zarr chunk for ``"disk_cg"``).
        seed: seed of the Nyström landmark sample.
        dtype: arithmetic of the kernel entries, ``torch.float64`` (default) or
            ``torch.float32``.
        progress: show progress bars over kernel blocks.
        callback: CG only; ``callback(iteration, relative_residual)`` after each iteration.
        memory_budget: most bytes of RAM the plan may use (the free RAM caps it anyway).
        store: a directory for the out-of-core kernel and CG checkpoints.
        client: a ``dask.distributed.Client``: kernel blocks of the ``"direct"``,
            ``"dense_cg"`` and ``"disk_cg"`` paths are computed on its workers (inputs
            scattered once) and gathered here.
    Returns:
        :class:`SolveResult`; ``coef`` is ``α`` with ``y``'s shape, float64 for the new paths;
        ``plan`` says which path ran and why.
    """
    method = check_choice(method, "method", METHODS)
    check_choice(preconditioner, "preconditioner", (None, "nystrom"))
    if preconditioner is not None and method != "cg":
        raise ValueError("preconditioner='nystrom' applies to method='cg'; the other methods "
                         "choose their own (pass preconditioner=None).")
    tol = check_nonnegative(tol, "tol")
    max_iter = check_positive_int(max_iter, "max_iter", minimum=0)

    if isinstance(net_or_operator, Layer):
        if X is None:
            raise ValueError("X is None; a network needs the (N, d) training inputs X.")
        if method not in ("cholesky", "cg"):
            return _solve_planned(net_or_operator, X, y, method=method, diag_reg=diag_reg,
                                  absolute=diag_reg_absolute_scale, tol=tol,
                                  max_iter=max_iter, get=check_get(get),
                                  n_landmarks=check_positive_int(n_landmarks, "n_landmarks"),
                                  tile=check_positive_int(tile, "tile"), seed=seed,
                                  dtype=resolve_dtype(dtype), progress=progress,
                                  callback=callback, memory_budget=memory_budget,
                                  store=store, client=client)
        op = KernelOperator(net_or_operator, X, get=get, tile=tile, dtype=dtype,
                            progress=progress)
    elif isinstance(net_or_operator, (np.ndarray, torch.Tensor)):
        op = DenseOperator(net_or_operator, dtype=dtype)
        method = {"auto": "cholesky", "direct": "cholesky"}.get(method, method)
    elif all(hasattr(net_or_operator, a) for a in ("matmul", "diagonal", "shape")):
        op = net_or_operator
        method = {"auto": "cg", "matrix_free_cg": "cg"}.get(method, method)
    else:
        raise ValueError("net_or_operator must be an ntkit network, a kernel operator (with "
                         "matmul/diagonal/shape) or a dense (N, N) kernel matrix; got "
                         f"{type(net_or_operator).__name__}.")
    if method not in ("cholesky", "cg"):
        raise ValueError(f"method={method!r} needs a network (it computes the kernel itself); "
                         "with a kernel matrix or operator use 'cholesky' or 'cg'.")
    Y, vec = as_targets(y, "y", op.shape[0], dtype=op.dtype, device=op.device)
    result = solve_validated(op, Y, method=method,
                             preconditioner=preconditioner, diag_reg=diag_reg,
                             diag_reg_absolute_scale=diag_reg_absolute_scale, tol=tol,
                             max_iter=max_iter, n_landmarks=n_landmarks, seed=seed,
                             progress=progress, callback=callback)
    if vec:
        result.coef = result.coef[:, 0]
    return result


def _count_dense(layer: Any, seen: set | None = None) -> int:
    """Dense layers in a network (the kernel-cost estimate's depth)."""
    from ..layers.dense import Dense

    if isinstance(layer, Dense):
        return 1
    seen = set() if seen is None else seen
    if id(layer) in seen:
        return 0
    seen.add(id(layer))
    total = 0
    children = list(vars(layer).values()) if hasattr(layer, "__dict__") else []
    for child in children:
        for item in (child if isinstance(child, (list, tuple)) else (child,)):
            if isinstance(item, Layer):
                total += _count_dense(item, seen)
    return total


def _solve_planned(net: Layer, X: Any, y: Any, *, method: str, diag_reg: float,
                   absolute: bool, tol: float, max_iter: int, get: str, n_landmarks: int,
                   tile: int, seed: int | None, dtype: torch.dtype, progress: bool, callback,
                   memory_budget: int | None, store, client) -> SolveResult:
    """:func:`solve` with a network along the path the cost model picks (or ``method``)."""
    import time
    from pathlib import Path

    from . import paths
    from .plan import plan_solve

    t = as_inputs(X, "X", dtype=dtype)
    n, d = t.shape
    Y, vec = as_targets(y, "y", n, dtype=torch.float64, device=t.device)
    diag_reg = check_nonnegative(diag_reg, "diag_reg")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    diag = net.kernel(t, get=get, diagonal=True, dtype=dtype)[get].to(torch.float64)
    ridge = resolve_ridge(diag_reg, diag, absolute)
    plan = plan_solve(n, Y.shape[1], n_features=d, depth=max(1, _count_dense(net)),
                      method=method, memory_budget=memory_budget, store=store,
                      ridge_positive=ridge > 0, n_landmarks=n_landmarks, tile=tile,
                      device=t.device)
    if t.device.type != "cpu" and plan.path in ("direct", "disk_cg"):
        raise ValueError(f"The {plan.path!r} path runs on the CPU (LAPACK / zarr); move X to "
                         "the CPU or pass method='dense_cg' or 'matrix_free_cg'.")
    details: dict[str, Any] = {}
    precond = None
    checkpoint = None
    key = paths.store_fingerprint_key(Y, ridge, tol, (n, get, tile, n_landmarks, seed))
    if plan.path == "direct":
        storage = torch.float64 if plan.precision == "float64" else torch.float32
        K = paths.fill_dense(net, t, get, storage, tile, progress, client)
        timings["kernel"] = time.perf_counter() - t0
        out = paths.solve_direct(K, Y, ridge, tol, max_iter, callback)
        del K
        timings.update(out.timings)
        coef, its, residual, converged, history = (out.coef, out.iterations, out.residual,
                                                   out.converged, out.history)
    else:
        if plan.path == "dense_cg":
            K = paths.fill_dense(net, t, get, torch.float32, tile, progress, client)
            op = paths.DenseFloat32Kernel(K)
            columns_op = op
        elif plan.path == "disk_cg":
            from .store import _store_fingerprint, kernel_to_zarr

            # One sub-directory per computation (inputs, network, kernel, tiling): the same
            # call resumes its own kernel and CG state; another (a cross-validation fold)
            # gets its own instead of being refused.
            fp = _store_fingerprint(net, t, None, get, tile, t.dtype, torch.float32)
            root = Path(store) / f"kernel-{fp.digest[:16]}"
            root.mkdir(parents=True, exist_ok=True)
            arr = kernel_to_zarr(net, t, None, get, tile, root / "kernel", True, progress,
                                 storage=torch.float32, client=client)
            op = paths.ZarrKernel(arr, tile)
            columns_op = KernelOperator.from_validated(net, t, get=get, tile=tile)
            checkpoint = root / "cg_checkpoint.pt"
            key += str(arr.attrs.get("ntkit_fingerprint"))
        else:
            op = KernelOperator.from_validated(net, t, get=get, tile=tile, progress=progress)
            columns_op = op
            if store is not None:
                Path(store).mkdir(parents=True, exist_ok=True)
                checkpoint = Path(store) / "cg_checkpoint.pt"
        timings["kernel"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        precond = NystromPreconditioner(columns_op, ridge, n_landmarks, seed=seed)
        if precond.C.dtype != torch.float64:
            precond.C, precond.R = precond.C.double(), precond.R.double()
            precond.scale = precond.scale.double()
        timings["preconditioner"] = time.perf_counter() - t1
        t1 = time.perf_counter()

        def apply_A(v: torch.Tensor) -> torch.Tensor:
            return op.matmul(v).to(torch.float64) + ridge * v

        apply_true = None
        if plan.path == "dense_cg":  # fast float32 products, exact residuals: refinement
            def apply_true(v: torch.Tensor) -> torch.Tensor:
                return op.matmul_exact(v) + ridge * v

        coef, its, rel, history = paths.pcg(apply_A, Y, preconditioner=precond, tol=tol,
                                            max_iter=max_iter, callback=callback,
                                            checkpoint=checkpoint, checkpoint_key=key,
                                            apply_true=apply_true)
        timings["solve"] = time.perf_counter() - t1
        residual, converged = float(rel.max()), bool((rel <= tol).all())
        if plan.path == "disk_cg":
            details.update(bytes_read=op.bytes_read, read_seconds=op.read_seconds,
                           wait_seconds=op.wait_seconds, store=str(root / "kernel"))
        if plan.path == "dense_cg":
            del K, op
    timings["total"] = time.perf_counter() - t0
    result = SolveResult(coef=coef[:, 0] if vec else coef, method=plan.path, ridge=ridge,
                         iterations=its, residual=residual, converged=converged,
                         history=history, plan=plan, timings=timings, details=details)
    if not converged:
        logging.getLogger("ntkit.scale").warning(
            "ntkit.scale.solve (%s) stopped after %d iterations at relative residual %.2e "
            "(tol %.0e).", plan.path, its, residual, tol)
    return result


def solve_validated(op: LinearKernelOperator, Y: torch.Tensor, *, method: str,
                    preconditioner: str | None, diag_reg: float,
                    diag_reg_absolute_scale: bool, tol: float, max_iter: int,
                    n_landmarks: int, seed: int | None = 0, progress: bool = False,
                    callback=None) -> SolveResult:
    """:func:`solve` for callers that validated already (the estimators): a kernel operator
    (e.g. :meth:`KernelOperator.from_validated`), finite ``(N, k)`` targets ``Y`` in its
    dtype and device, and checked settings; nothing is checked again. ``coef`` is
    ``(N, k)``."""
    n = op.shape[0]
    diag = op.diagonal()
    ridge = resolve_ridge(diag_reg, diag, diag_reg_absolute_scale)

    if method == "cholesky":
        if isinstance(op, DenseOperator):
            K = op.K.clone()
        elif isinstance(op, KernelOperator):
            from .tiled import kernel_matrix

            K = kernel_matrix(op.net, op.X, get=op.get, tile=op.tile, progress=progress)
        else:
            check_dense_fits(n, n, op.dtype, op.device)
            K = op.matmul(torch.eye(n, dtype=op.dtype, device=op.device))
        K.diagonal().add_(ridge)
        L, info = torch.linalg.cholesky_ex(K)
        if int(info) != 0:
            raise ValueError("The kernel matrix plus ridge is not positive definite (repeated "
                             "or nearly collinear inputs); increase diag_reg, e.g. diag_reg=1e-6.")
        coef = torch.cholesky_solve(Y, L)
        return SolveResult(coef=coef, method="cholesky", ridge=ridge)

    precond = None
    if preconditioner == "nystrom":
        precond = NystromPreconditioner(op, ridge, n_landmarks, seed=seed)

    def apply_A(v):
        return op.matmul(v) + ridge * v

    coef, iters, rel, history = conjugate_gradient(apply_A, Y, preconditioner=precond, tol=tol,
                                                   max_iter=max_iter, callback=callback)
    return SolveResult(coef=coef, method="cg", ridge=ridge,
                       iterations=iters, residual=float(rel.max()),
                       converged=bool((rel <= tol).all()), history=history)
