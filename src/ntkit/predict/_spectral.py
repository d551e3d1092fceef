"""Spectral helpers of the closed-form predictors: the factorisations of a train kernel
(cached), the tolerances that call an eigenvalue zero, and the per-eigenmode arithmetic of
the MSE flow shared by :class:`~ntkit.predict.MSEPredictor` and
:class:`~ntkit.predict.EnsemblePredictor` (:class:`SpectralFlow`).
"""

from __future__ import annotations

import math
from functools import cached_property

import torch

from ._checks import check_result, normalization


def eigh(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the symmetric ``k``."""
    # Symmetrise so that rounding asymmetry cannot leak into the eigenvectors.
    return torch.linalg.eigh(0.5 * (k + k.T))


def relative_tolerance(n: int, dtype: torch.dtype) -> float:
    """Eigenvalues below this times ``λ_max`` are numerically zero: the rounding of an
    ``N x N`` kernel's entries moves its eigenvalues by about ``sqrt(N)·eps·λ_max``
    (``N·eps`` is the worst case, and would refuse float32 kernels of condition number
    ~1e4 at N = 2000 that solve to 1e-3)."""
    return 10 * math.sqrt(n) * torch.finfo(dtype).eps


def singular_tolerance(evals: torch.Tensor) -> float:
    return float(evals.abs().max()) * relative_tolerance(evals.shape[0], evals.dtype)


def require_invertible(evals: torch.Tensor, name: str, diag_reg: float, why: str) -> None:
    """Raise (naming the smallest eigenvalue) if ``K`` is singular or not positive definite."""
    lam_min, lam_max = float(evals[0]), float(evals[-1])
    if lam_min > singular_tolerance(evals):
        return
    kind = "not positive semi-definite" if lam_min < 0 else "singular (numerically)"
    hint = ("pass diag_reg > 0 (e.g. diag_reg=1e-6) to add a ridge" if diag_reg == 0 else
            f"diag_reg={diag_reg:g} is too small here; increase it")
    raise ValueError(f"{name} is {kind}: smallest eigenvalue {lam_min:.3e}, largest "
                     f"{lam_max:.3e}. {why} needs an invertible kernel; {hint}, or use a finite "
                     "t. (Duplicate training inputs make the kernel singular.)")


def require_psd(evals: torch.Tensor, name: str) -> None:
    lam_min = float(evals[0])
    if lam_min < -singular_tolerance(evals):
        raise ValueError(f"{name} is not positive semi-definite: smallest eigenvalue "
                         f"{lam_min:.3e}, largest {float(evals[-1]):.3e}. Kernel regression at "
                         "t = inf needs a PSD kernel; check how the kernel was computed.")


def step_limit(k: torch.Tensor, norm: int) -> float:
    """``2 · norm / λ_max(K)``: the learning rate at and beyond which discrete gradient
    descent on the MSE normalised by ``norm`` diverges (see ``max_learning_rate``)."""
    lam_max = float(torch.linalg.eigvalsh(0.5 * (k + k.T))[-1])
    if lam_max <= 0:
        raise ValueError(f"k_train_train has no positive eigenvalue (largest {lam_max:.3e}); "
                         "gradient descent does not move, so no learning-rate bound exists.")
    return 2.0 * norm / lam_max


def safe_cholesky(k: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of ``K``, or ``None`` unless ``K`` is safely positive definite:
    its smallest eigenvalue, estimated by inverse iteration with the factor (an estimate from
    above that approaches it fast), must exceed twice the singular tolerance of
    :func:`require_invertible` (bounding ``λ_max`` by the largest row sum)."""
    L, info = torch.linalg.cholesky_ex(k)
    if int(info) != 0:
        return None
    n = k.shape[0]
    tol = float(k.abs().sum(dim=1).max()) * relative_tolerance(n, k.dtype)
    if float(L.diagonal().min()) ** 2 <= 2 * tol:  # λ_min <= min_i L_ii²
        return None
    generator = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(n, 1, generator=generator, dtype=k.dtype).to(k.device)
    for _ in range(8):  # two triangular solves: unlike cholesky_solve, L is not copied
        v = torch.linalg.solve_triangular(L, v / v.norm(), upper=False)
        v = torch.linalg.solve_triangular(L.mT, v, upper=True)
    lam_min_estimate = 1.0 / float(v.norm())
    return L if lam_min_estimate > 2 * tol else None


def mode_factors(evals: torch.Tensor, times: torch.Tensor, rate: float, discrete: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-eigenmode factors, each ``(T, N)``.

    ``decay``: the factor of a residual mode, ``exp(−rate λ t)`` or ``(1 − rate λ)^t``.
    ``gain``: ``(1 − decay) / λ`` (so that ``K · gain = 1 − decay``), continuous in λ at 0,
    where it equals ``rate · t``. At ``t = inf`` decay is 0 and gain is ``1 / λ``.
    """
    lam = evals[None, :]
    t = times.to(evals)[:, None]
    inf = torch.isinf(t).expand(-1, lam.shape[1])
    t_fin = torch.where(torch.isinf(t), torch.zeros_like(t), t)
    x = (rate * lam).expand(t.shape[0], -1)
    if not discrete:
        z = x * t_fin
        decay = torch.exp(-z)
        # −expm1(−z)/z is accurate for tiny z; its z → 0 limit is 1.
        ratio = torch.where(z == 0, torch.ones_like(z), -torch.expm1(-z) / torch.where(
            z == 0, torch.ones_like(z), z))
        gain = rate * t_fin * ratio
    else:
        base = 1 - x
        small = x.abs() < 0.5
        # (1 − x)^k via log1p where it is accurate; the power directly elsewhere (x ≥ 1 too).
        log_pow = t_fin * torch.log1p(-torch.where(small, x, torch.zeros_like(x)))
        decay = torch.where(small, torch.exp(log_pow), base ** t_fin)
        one_minus = torch.where(small, -torch.expm1(log_pow), 1 - decay)
        safe_x = torch.where(x == 0, torch.ones_like(x), x)
        gain = rate * torch.where(x == 0, t_fin.expand_as(x), one_minus / safe_x)
    decay = torch.where(inf, torch.zeros_like(decay), decay)
    inv = 1 / torch.where(lam == 0, torch.ones_like(lam), lam)
    gain = torch.where(inf, inv.expand_as(gain), gain)
    return decay, gain


class SpectralFlow:
    """The closed-form MSE flow, mode by mode: the residual ``r(t) = e^{−aKt} r(0)`` (or
    ``(I − aK)^t r(0)`` with ``discrete``) under the regularised train kernel ``K``,
    ``a = rate``, and the dual coefficients built from it.

    A base of :class:`~ntkit.predict.MSEPredictor`, whose fields it reads (``k_train_train``
    with the ridge added, ``y_train``, ``learning_rate``, ``cost``, ``discrete``,
    ``diag_reg``, ``rate``, ``pseudo_inverse``, ``name``); the ensemble reaches the flow
    through these public methods. The factorisations of ``K`` are computed on first use and
    cached: the eigendecomposition (``evals``, ``evecs``) and, when ``K`` is safely positive
    definite, a Cholesky factor that answers ``t = inf`` alone, several times faster than the
    eigendecomposition.
    """

    @cached_property
    def _eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        return eigh(self.k_train_train)

    @property
    def evals(self) -> torch.Tensor:
        """Eigenvalues of ``K`` (ascending), computed on first use."""
        return self._eigen[0]

    @property
    def evecs(self) -> torch.Tensor:
        """Eigenvectors of ``K`` (columns), computed on first use."""
        return self._eigen[1]

    @cached_property
    def _cholesky(self) -> torch.Tensor | None:
        # None leaves t = inf to the eigendecomposition, which finds null modes
        # (pseudo_inverse) or names the smallest eigenvalue in its error.
        return safe_cholesky(self.k_train_train)

    def uses_cholesky(self, times: torch.Tensor) -> bool:
        """Whether ``times`` are answered by the Cholesky factor alone (all ``inf``)."""
        return (not self.discrete and bool(torch.isinf(times).all())
                and self._cholesky is not None)

    def factors(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-mode ``(decay, gain)``, each ``(T, N)`` (see :func:`mode_factors`). With
        ``pseudo_inverse``, the numerically null modes stay frozen at ``t = inf`` (decay 1,
        gain 0): the pseudo-inverse, which is also the flow's limit on those modes."""
        evals = self.evals
        decay, gain = mode_factors(evals, times, self.rate, self.discrete)
        if self.pseudo_inverse and bool(torch.isinf(times).any()):
            require_psd(evals, self.name)
            null = ((evals <= singular_tolerance(evals))[None, :]
                    & torch.isinf(times).to(evals.device)[:, None])
            decay = torch.where(null, torch.ones_like(decay), decay)
            gain = torch.where(null, torch.zeros_like(gain), gain)
        return decay, gain

    def check_times(self, times: torch.Tensor) -> None:
        """Raise if some time is ``inf`` and the flow has no limit there."""
        if not bool(torch.isinf(times).any()):
            return
        if not self.pseudo_inverse and (self.discrete or self._cholesky is None):
            require_invertible(self.evals, self.name, self.diag_reg, "t = inf")
        norm = normalization(self.cost, *self.y_train.shape)
        if self.discrete and self.learning_rate >= step_limit(self.k_train_train, norm):
            raise ValueError(
                f"learning_rate={self.learning_rate:g} is at or above max_learning_rate "
                f"({2 / (self.rate / self.learning_rate) / float(self.evals[-1]):.6g}), so "
                "discrete gradient descent does not converge and t = inf is undefined; "
                "lower learning_rate or use finite step counts.")

    def residual(self, times: torch.Tensor, r0: torch.Tensor) -> torch.Tensor:
        """``r(t)`` ``(T, N, O)`` from ``r(0)`` ``(N, O)``."""
        if self.uses_cholesky(times):  # K positive definite at t = inf: every mode converged
            return torch.zeros_like(r0).expand(times.shape[0], *r0.shape)
        decay, _ = self.factors(times)
        v = self.evecs
        return v @ (decay[:, :, None] * (v.T @ r0))

    def apply_gain(self, times: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """``G(t) M``, shape ``(T, N, k)``, with ``G(t) = K⁻¹ (I − e^{−aKt})`` (flow) or
        ``K⁻¹ (I − (I − aK)^t)`` (gradient descent), ``G(∞) = K⁻¹`` (``K⁺`` with
        ``pseudo_inverse``)."""
        if self.uses_cholesky(times):
            out = torch.cholesky_solve(M, self._cholesky)
            return out.unsqueeze(0).expand(times.shape[0], *out.shape)
        _, gain = self.factors(times)
        v = self.evecs
        return v @ (gain[:, :, None] * (v.T @ M))

    def alpha(self, times: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        """Dual coefficients ``α(t) = G(t) (y − f0)``, ``(T, N, O)``, from the initial
        training outputs ``f0`` ``(N, O)``; raises if they overflow."""
        alpha = self.apply_gain(times, self.y_train - f0)
        check_result(alpha, self, "The dual coefficients")
        return alpha
