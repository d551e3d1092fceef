"""Eigenpairs of Π = K/N (JGH §IV.2) and positive-definiteness diagnostics.

Under the JGH cost ``C = ½·mean_i ‖f(x_i) − y_i‖²`` the function-space flow on the training
set is ``∂_t f = −Π (f − y)`` with ``Π = K/N``; its eigenvalues are the decay rates of the
dynamics along the kernel principal components. ``normalize="jgh"`` returns the eigenpairs
of ``K/N``; ``normalize="none"`` those of ``K``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch

from .._validation import as_square_kernel, check_choice, check_positive_int

METHODS = ("auto", "eigh", "lanczos", "lobpcg", "power")
# "auto" uses a full eigh up to this size, or when more than this fraction of the spectrum is
# asked for; otherwise implicitly restarted Lanczos (ARPACK) on the top k.
AUTO_EIGH_MAX_N = 2000
AUTO_EIGH_MAX_FRACTION = 0.1


class ConvergenceWarning(UserWarning):
    """An iterative eigensolver did not reach the requested tolerance."""


@dataclass
class Eigen:
    """Eigenpairs in descending order of ``values``.

    ``values``: ``(k,)``; ``vectors``: ``(N, k)`` orthonormal columns (unit Euclidean norm);
    ``residuals``: ``‖A v − λ v‖ / λ_1`` per pair, measured on the returned pairs (``None``
    for a full decomposition, ``k=None``, where measuring them would cost another O(N³)
    product; LAPACK's backward stability bounds them by ~N·ε there);
    ``converged`` and ``iterations`` per pair (``None`` for direct methods).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    method: str
    normalize: str
    residuals: torch.Tensor | None
    converged: torch.Tensor | None = None
    iterations: list[int] | None = None

    def __len__(self) -> int:
        return int(self.values.shape[0])


def as_kernel_matrix(K: Any, name: str = "K") -> torch.Tensor:
    """``K`` as a non-empty, finite float64 ``(N, N)`` matrix, symmetric to ntkit's one
    tolerance (:func:`ntkit._validation.symmetry_tolerance`) and then made exactly
    symmetric, so that every eigensolver sees the same matrix whichever triangle it reads."""
    return as_square_kernel(K, name, dtype=torch.float64)


def _pick(n: int, k: int | None, method: str) -> str:
    if method != "auto":
        return method
    if k is None or n <= AUTO_EIGH_MAX_N or k > AUTO_EIGH_MAX_FRACTION * n:
        return "eigh"
    return "lanczos"


def _residuals(A: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    scale = max(float(values.abs().max()), 1e-300) if values.numel() else 1.0
    return (A @ vectors - vectors * values).norm(dim=0) / scale


def _power(A: torch.Tensor, k: int, tol: float, max_iter: int, seed: int):
    """Power iteration with deflation ``A' = A − λ v vᵀ`` (JGH's method).

    The deflation is applied implicitly, ``A' x = A x − Σ_j λ_j v_j (v_jᵀ x)``, which is the
    same operator without an extra N x N copy. A pair stops when ``‖A' v − λ v‖ ≤ tol·|λ_1|``.
    The convergence factor per iteration estimates ``|λ_{i+1}/λ_i|``; when it predicts more
    iterations than ``max_iter`` (a small gap), a :class:`ConvergenceWarning` says so.
    """
    n = A.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    values, vectors, iterations, converged = [], [], [], []
    top = None
    for i in range(k):
        v = torch.randn(n, generator=gen, dtype=A.dtype).to(A.device)
        basis = torch.stack(vectors, 1) if vectors else None
        lams = torch.stack(values) if values else None

        def apply(x, basis=basis, lams=lams):
            y = A @ x
            if basis is not None:
                y = y - basis @ (lams * (basis.T @ x))
            return y

        v = v / v.norm()
        lam = torch.dot(v, apply(v))
        previous_residual, factor, done, it = None, float("nan"), False, 0
        for it in range(1, max_iter + 1):
            w = apply(v)
            lam = torch.dot(v, w)
            residual = float((w - lam * v).norm())
            scale = abs(float(lam)) if top is None else top
            if residual <= tol * max(scale, 1e-300):
                done = True
                break
            if previous_residual:
                factor = residual / previous_residual
            previous_residual = residual
            v = w / w.norm()
        if top is None:
            top = abs(float(lam))
        if not done:
            needed = (math.log(tol) / math.log(factor) if 0 < factor < 1 else float("inf"))
            warnings.warn(
                f"power iteration: eigenpair {i} did not converge to tol={tol:g} in {max_iter} "
                f"iterations (residual {residual / max(top, 1e-300):.2e}). The convergence factor "
                f"{factor:.6f} ≈ |λ_{i + 1}/λ_{i}| means the eigenvalue gap is too small for this "
                f"tolerance: about {needed:.3g} iterations would be needed. Raise max_iter, "
                "loosen tol, or use method='eigh'/'lanczos'.", ConvergenceWarning, stacklevel=3)
        values.append(lam)
        vectors.append(v)
        iterations.append(it)
        converged.append(done)
    vals = torch.stack(values)
    vecs = torch.stack(vectors, 1)
    order = torch.argsort(vals, descending=True)
    return (vals[order], vecs[:, order], torch.tensor(converged)[order.cpu()],
            [iterations[j] for j in order.tolist()])


def eigen(K: Any, k: int | None = None, *, normalize: str = "jgh", method: str = "auto",
          tol: float = 1e-12, max_iter: int = 10_000, seed: int = 0) -> Eigen:
    """Top-``k`` eigenpairs of ``Π = K/N`` (``normalize="jgh"``) or of ``K`` (``"none"``).

    Args:
        K: ``(N, N)`` symmetric kernel matrix (tensor or array); computed in float64.
        k: number of leading eigenpairs (``None``: all, which needs ``eigh``).
        method:
            * ``"eigh"``: full dense decomposition (LAPACK), O(N³);
            * ``"lanczos"``: implicitly restarted Lanczos (ARPACK ``eigsh``) on the top k,
              O(N² ·iterations), for large N and small k;
            * ``"lobpcg"``: block LOBPCG (scipy) on the top k;
            * ``"power"``: JGH's power iteration with deflation; reports per-pair
              convergence and warns when the gap is too small for ``tol``. It finds the
              pairs of largest |λ|, which are the top ones for a PSD kernel;
            * ``"auto"``: ``eigh`` when ``k`` is None, ``N <= 2000`` or ``k > N/10``, else
              ``lanczos`` (N = 10,000, k = 3: ~11 s vs ~370 s for eigh on 2 CPU cores; see
              ``benchmarks/results/spectral.md``).

            ``lanczos`` and ``lobpcg`` run in scipy on the host (CUDA inputs are copied
            over and the result copied back); ``eigh`` and ``power`` stay on K's device.
        tol: relative tolerance of the iterative methods (residual ``‖Av − λv‖/λ_1``).
        max_iter: iteration cap of the iterative methods.
        seed: seed of the power iteration's start vectors.
    Returns:
        :class:`Eigen` (values descending, vectors as unit columns), on ``K``'s device.
    """
    A = as_kernel_matrix(K)
    n = A.shape[0]
    check_choice(normalize, "normalize", ("jgh", "none"))
    check_choice(method, "method", METHODS)
    if k is not None:
        k = check_positive_int(k, "k")
        if k > n:
            raise ValueError(f"k={k} exceeds the matrix size N={n}.")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number; got {tol!r}.")
    max_iter = check_positive_int(max_iter, "max_iter")
    if normalize == "jgh":
        A = A / n
    chosen = _pick(n, k, method)
    if k is None and chosen != "eigh":
        raise ValueError(f"method={method!r} computes the top k eigenpairs; pass k.")
    kk = n if k is None else k
    converged, iterations = None, None

    if chosen == "eigh":
        vals, vecs = torch.linalg.eigh(A)
        vals, vecs = vals.flip(0)[:kk], vecs.flip(1)[:, :kk]
    elif chosen == "power":
        vals, vecs, converged, iterations = _power(A, kk, tol, max_iter, seed)
    else:
        host = A.detach().cpu().numpy()
        if chosen == "lanczos":
            if kk >= n - 1:  # ARPACK needs k < N - 1
                vals_np, vecs_np = scipy.linalg.eigh(host, subset_by_index=[n - kk, n - 1])
            else:
                v0 = np.random.default_rng(seed).standard_normal(n)
                vals_np, vecs_np = scipy.sparse.linalg.eigsh(host, k=kk, which="LA", tol=0,
                                                             maxiter=max_iter, v0=v0)
        else:
            x0 = np.random.default_rng(seed).standard_normal((n, kk))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # scipy's own, re-reported below
                vals_np, vecs_np = scipy.sparse.linalg.lobpcg(host, x0, largest=True,
                                                              tol=tol, maxiter=max_iter)
        order = np.argsort(vals_np)[::-1]
        vals = torch.as_tensor(vals_np[order].copy(), device=A.device)
        vecs = torch.as_tensor(vecs_np[:, order].copy(), device=A.device)
    residuals = None if k is None else _residuals(A, vals, vecs)
    if chosen == "lobpcg" and float(residuals.max()) > max(tol, 1e-8) * 10:
        warnings.warn(f"lobpcg: largest relative residual {float(residuals.max()):.2e} exceeds "
                      f"tol={tol:g}; raise max_iter or use method='lanczos'.",
                      ConvergenceWarning, stacklevel=2)
    return Eigen(values=vals, vectors=vecs, method=chosen, normalize=normalize,
                 residuals=residuals, converged=converged, iterations=iterations)


def min_eigenvalue(K: Any) -> float:
    """The smallest eigenvalue of the symmetric matrix ``K`` (float64, dense LAPACK)."""
    A = as_kernel_matrix(K)
    return float(torch.linalg.eigvalsh(A)[0])


def condition_number(K: Any) -> float:
    """``λ_max / λ_min`` of the symmetric matrix ``K``; ``inf`` if ``λ_min <= 0`` (singular or
    not positive definite at float64 precision)."""
    A = as_kernel_matrix(K)
    vals = torch.linalg.eigvalsh(A)
    lo, hi = float(vals[0]), float(vals[-1])
    return hi / lo if lo > 0 else math.inf
