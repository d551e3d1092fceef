"""Closed-form and ODE predictions of kernel gradient dynamics (JGH §I.3, §IV).

Under a fixed kernel ``K`` (the NTK at initialisation, or any kernel) gradient flow on a
cost ``C`` moves the network outputs on the training inputs as

    d f_train / dt = −η · K · ∇_f C(f_train),      d f_test / dt = −η · K_test,train · ∇_f C.

Everything here works with the *per-output* kernel ``K`` (``(N, N)``), the full kernel over
``n_out`` outputs being ``K ⊗ I``: every output column evolves independently under ``K``.

Two normalisations of the mean squared error are offered, and every function names the one
it uses with ``cost=``:

* ``cost="jgh"`` — JGH's cost ``C = ½ · mean_i ‖f(x_i) − y_i‖²`` (mean over the ``N``
  examples, sum over outputs). The flow is driven by ``Π = K / N``:
  ``f_train(t) = y + exp(−η t K / N) (f_train(0) − y)``.
* ``cost="nt"`` — neural-tangents' ``C = 1 / (2 N n_out) · Σ_i ‖f(x_i) − y_i‖²``. The flow is
  driven by ``K / (N · n_out)``. Both agree when ``n_out = 1``.

``diag_reg`` follows neural-tangents: unless ``diag_reg_absolute_scale=True`` it is relative
to the mean of the kernel's diagonal, i.e. ``K + diag_reg · (tr K / N) · I`` is used.

Test outputs depend on the test inputs only through ``K_*x``: ``f_test(t) = f_test(0) +
K_*x α(t)``. The predictors' ``dual_coefficients(t)`` return ``α(t)`` (``N × O`` numbers), so
a fitted flow can predict any number of later test batches with one product each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import torch

from .._validation import (Tensorish, as_inputs, as_tensor, check_choice, check_nonnegative,
                           finite_max_abs)

COSTS = ("jgh", "nt")

__all__ = ["COSTS", "EnsemblePrediction", "EnsemblePredictor", "FlowCoefficients",
           "FlowPredictor", "GPPosterior", "MSEPredictor", "Prediction", "ensemble",
           "gp_inference", "gradient_descent_mse", "gradient_flow", "max_learning_rate"]


# ----------------------------------------------------------------------------- validation
def _as_square_kernel(k: Tensorish, name: str) -> torch.Tensor:
    if k is None:
        raise ValueError(f"{name} is None; expected an (N, N) kernel matrix.")
    t = as_tensor(k, name)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{name} must be a square (N, N) per-output kernel; got shape "
                         f"{tuple(t.shape)}. (For n_out outputs pass the per-output kernel K, "
                         "not K ⊗ I.)")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty; need at least one training point.")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    scale = _check_finite_kernel(t, name)
    asym = float((t - t.T).abs_().max())
    if asym > 1e-8 * max(scale, 1e-300):
        raise ValueError(f"{name} is not symmetric (max |K − Kᵀ| = {asym:.3e}, max |K| = "
                         f"{scale:.3e}); a train-train kernel must be symmetric.")
    return t


def _check_finite_kernel(t: torch.Tensor, name: str) -> float:
    """Raise if ``t`` holds NaN or inf; return ``max |t|``."""
    scale = finite_max_abs(t)
    if scale is not None:
        return scale
    bad = (~torch.isfinite(t)).sum().item()
    raise ValueError(f"{name} has {bad} NaN or infinite entries; kernels must be finite "
                     "(check the inputs and the kernel computation).")


def _as_cross_kernel(k: Tensorish, name: str, n_train: int, like: torch.Tensor) -> torch.Tensor:
    t = as_tensor(k, name, dtype=like.dtype, device=like.device)
    if t.ndim != 2 or t.shape[1] != n_train:
        raise ValueError(f"{name} must have shape (M, {n_train}) (test rows, train columns); "
                         f"got {tuple(t.shape)}.")
    _check_finite_kernel(t, name)
    return t


def _as_targets(y: Tensorish, name: str, n: int, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(N, O)`` targets; a 1-D ``(N,)`` vector is one output (results are squeezed back)."""
    if y is None:
        raise ValueError(f"{name} is None; expected targets of shape (N, n_out) or (N,).")
    t = as_tensor(y, name, dtype=like.dtype, device=like.device)
    squeeze = t.ndim == 1
    if squeeze:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n}, n_out) or ({n},) to match the "
                         f"{n} training points of the kernel; got {tuple(t.shape)}.")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no output columns.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return t, squeeze


def _as_initial(f0: Tensorish | None, name: str, shape: tuple[int, int],
                like: torch.Tensor) -> torch.Tensor:
    """Initial outputs; ``None`` means 0 (the mean of the infinite-width prior)."""
    if f0 is None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    t = as_tensor(f0, name, dtype=like.dtype, device=like.device)
    if t.ndim == 1 and shape[1] == 1:
        t = t[:, None]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape} (rows × outputs); got "
                         f"{tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return t


def _as_times(t: Any, *, discrete: bool) -> tuple[torch.Tensor, bool]:
    """Times (float64, shape (T,)) and whether ``t`` was a scalar. Rejects NaN and t < 0."""
    if t is None:
        raise ValueError("t is None; pass a time (or array of times, or math.inf).")
    try:
        arr = np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t,
                         dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"t must be a number or an array of numbers; got {t!r}.") from err
    scalar = arr.ndim == 0
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError("t is empty; pass at least one time.")
    if np.isnan(arr).any():
        raise ValueError("t contains NaN; times must be numbers >= 0 (math.inf allowed).")
    if (arr < 0).any():
        raise ValueError(f"t must be >= 0 (the dynamics start at t = 0); got min t = "
                         f"{arr.min()}.")
    if discrete:
        finite = arr[np.isfinite(arr)]
        if (finite != np.round(finite)).any():
            raise ValueError("with discrete=True, t counts gradient-descent steps and must hold "
                             f"whole numbers (or math.inf); got {arr.tolist()[:8]}.")
    return torch.from_numpy(arr), scalar


def _regularize(k: torch.Tensor, diag_reg: float, absolute: bool) -> torch.Tensor:
    if diag_reg == 0:
        return k
    scale = 1.0 if absolute else float(torch.diagonal(k).mean())
    out = k.clone()  # the ridge on the diagonal only, without an (N, N) identity
    out.diagonal().add_(diag_reg * scale)
    return out


def _normalization(cost: str, n: int, n_out: int) -> int:
    return n if cost == "jgh" else n * n_out


def _eigh(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Symmetrise so that rounding asymmetry cannot leak into the eigenvectors.
    return torch.linalg.eigh(0.5 * (k + k.T))


def _relative_tolerance(n: int, dtype: torch.dtype) -> float:
    """Eigenvalues below this times ``λ_max`` are numerically zero: the rounding of an
    ``N x N`` kernel's entries moves its eigenvalues by about ``sqrt(N)·eps·λ_max``
    (``N·eps`` is the worst case, and would refuse float32 kernels of condition number
    ~1e4 at N = 2000 that solve to 1e-3)."""
    return 10 * math.sqrt(n) * torch.finfo(dtype).eps


def _singular_tolerance(evals: torch.Tensor) -> float:
    return float(evals.abs().max()) * _relative_tolerance(evals.shape[0], evals.dtype)


def _require_invertible(evals: torch.Tensor, name: str, diag_reg: float, why: str) -> None:
    """Raise (naming the smallest eigenvalue) if ``K`` is singular or not positive definite."""
    lam_min, lam_max = float(evals[0]), float(evals[-1])
    if lam_min > _singular_tolerance(evals):
        return
    kind = "not positive semi-definite" if lam_min < 0 else "singular (numerically)"
    hint = ("pass diag_reg > 0 (e.g. diag_reg=1e-6) to add a ridge" if diag_reg == 0 else
            f"diag_reg={diag_reg:g} is too small here; increase it")
    raise ValueError(f"{name} is {kind}: smallest eigenvalue {lam_min:.3e}, largest "
                     f"{lam_max:.3e}. {why} needs an invertible kernel; {hint}, or use a finite "
                     "t. (Duplicate training inputs make the kernel singular.)")


# ----------------------------------------------------------------------- mode functions
def _mode_factors(evals: torch.Tensor, times: torch.Tensor, rate: float, discrete: bool
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


def _finish(out: torch.Tensor, scalar: bool, squeeze: bool) -> torch.Tensor:
    if squeeze:
        out = out[..., 0]
    return out[0] if scalar else out


def _check_result(out: torch.Tensor, owner: Any, what: str) -> None:
    """Raise if ``out`` is not finite; ``owner.evals`` (the spectrum, for the message) is only
    looked at then, so a Cholesky-only predictor does not need an eigendecomposition."""
    if not bool(torch.isfinite(out).all()):
        evals = owner.evals
        raise ValueError(f"{what} overflowed to inf/NaN: the train kernel's eigenvalues span "
                         f"[{float(evals[0]):.3e}, {float(evals[-1]):.3e}]; negative eigenvalues "
                         "(a non-PSD kernel) or a learning rate above max_learning_rate make "
                         "the dynamics diverge. Use a PSD kernel, a smaller learning_rate or "
                         "diag_reg.")


def _require_psd(evals: torch.Tensor, name: str) -> None:
    lam_min = float(evals[0])
    if lam_min < -_singular_tolerance(evals):
        raise ValueError(f"{name} is not positive semi-definite: smallest eigenvalue "
                         f"{lam_min:.3e}, largest {float(evals[-1]):.3e}. Kernel regression at "
                         "t = inf needs a PSD kernel; check how the kernel was computed.")


# ------------------------------------------------------------------------ MSE closed form
class Prediction(NamedTuple):
    """Outputs at time(s) t: ``train`` ``(N, O)`` and ``test`` ``(M, O)`` (``None`` without
    ``k_test_train``); with an array of ``T`` times each gains a leading ``T`` axis."""

    train: torch.Tensor
    test: torch.Tensor | None


@dataclass(frozen=True)
class MSEPredictor:
    """Closed-form MSE dynamics under one train kernel ``K`` (built by
    :func:`gradient_descent_mse`).

    Call it with times to get :class:`Prediction`; :meth:`dual_coefficients` gives the
    weights ``α(t)`` of the training points in the test outputs (so any later test inputs
    need only their kernel against the training inputs), and :meth:`covariance` the
    covariance over random initialisations (the infinite ensemble).

    The factorisations of ``K`` are computed on first use and cached, so every call shares
    them: the eigendecomposition ``K = V diag(λ) Vᵀ`` (``evals``, ``evecs``) and, with
    when ``K`` is safely positive definite, a Cholesky factor that answers ``t = inf`` alone,
    several times faster than the eigendecomposition.
    """

    k_train_train: torch.Tensor  # with the ridge added
    y_train: torch.Tensor
    learning_rate: float
    cost: str
    discrete: bool
    diag_reg: float
    rate: float
    squeeze: bool
    pseudo_inverse: bool = False
    name: str = "k_train_train"  # how error messages call K

    # ------------------------------------------------------------------ factorisations
    @cached_property
    def _eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _eigh(self.k_train_train)

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
        """Lower Cholesky factor of ``K``, or ``None`` unless ``K`` is safely positive
        definite: its smallest eigenvalue, estimated by inverse iteration with the factor
        (an estimate from above that approaches it fast), must exceed twice the singular
        tolerance of :func:`_require_invertible` (bounding ``λ_max`` by the largest row
        sum). Otherwise the eigendecomposition decides: it finds null modes
        (``pseudo_inverse``) or names the smallest eigenvalue in its error."""
        k = self.k_train_train
        L, info = torch.linalg.cholesky_ex(k)
        if int(info) != 0:
            return None
        n = k.shape[0]
        tol = float(k.abs().sum(dim=1).max()) * _relative_tolerance(n, k.dtype)
        if float(L.diagonal().min()) ** 2 <= 2 * tol:  # λ_min <= min_i L_ii²
            return None
        generator = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(n, 1, generator=generator, dtype=k.dtype).to(k.device)
        for _ in range(8):  # two triangular solves: unlike cholesky_solve, L is not copied
            v = torch.linalg.solve_triangular(L, v / v.norm(), upper=False)
            v = torch.linalg.solve_triangular(L.mT, v, upper=True)
        lam_min_estimate = 1.0 / float(v.norm())
        return L if lam_min_estimate > 2 * tol else None

    def _uses_cholesky(self, times: torch.Tensor) -> bool:
        return (not self.discrete and bool(torch.isinf(times).all())
                and self._cholesky is not None)

    def _factors(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-mode ``(decay, gain)``, each ``(T, N)`` (see :func:`_mode_factors`). With
        ``pseudo_inverse``, the numerically null modes stay frozen at ``t = inf`` (decay 1,
        gain 0): the pseudo-inverse, which is also the flow's limit on those modes."""
        evals = self.evals
        decay, gain = _mode_factors(evals, times, self.rate, self.discrete)
        if self.pseudo_inverse and bool(torch.isinf(times).any()):
            _require_psd(evals, self.name)
            null = ((evals <= _singular_tolerance(evals))[None, :]
                    & torch.isinf(times).to(evals.device)[:, None])
            decay = torch.where(null, torch.ones_like(decay), decay)
            gain = torch.where(null, torch.zeros_like(gain), gain)
        return decay, gain

    def _check_inf(self, times: torch.Tensor) -> None:
        if not bool(torch.isinf(times).any()):
            return
        if not self.pseudo_inverse and (self.discrete or self._cholesky is None):
            _require_invertible(self.evals, self.name, self.diag_reg, "t = inf")
        if self.discrete and self.learning_rate >= max_learning_rate(
                self.k_train_train, cost=self.cost, output_dim=self.y_train.shape[1],
                diag_reg=0.0):
            raise ValueError(
                f"learning_rate={self.learning_rate:g} is at or above max_learning_rate "
                f"({2 / (self.rate / self.learning_rate) / float(self.evals[-1]):.6g}), so "
                "discrete gradient descent does not converge and t = inf is undefined; "
                "lower learning_rate or use finite step counts.")

    def _apply_gain(self, times: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """``G(t) M``, shape ``(T, N, k)``, with ``G(t) = K⁻¹ (I − e^{−aKt})`` (flow) or
        ``K⁻¹ (I − (I − aK)^t)`` (gradient descent), ``G(∞) = K⁻¹`` (``K⁺`` with
        ``pseudo_inverse``)."""
        if self._uses_cholesky(times):
            out = torch.cholesky_solve(M, self._cholesky)
            return out.unsqueeze(0).expand(times.shape[0], *out.shape)
        _, gain = self._factors(times)
        v = self.evecs
        return v @ (gain[:, :, None] * (v.T @ M))

    def _alpha(self, times: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        alpha = self._apply_gain(times, self.y_train - f0)
        _check_result(alpha, self, "The dual coefficients")
        return alpha

    # ------------------------------------------------------------------ public
    def __call__(self, t: Any, fx_train_0: Tensorish | None = None,
                 fx_test_0: Tensorish | None = None,
                 k_test_train: Tensorish | None = None) -> Prediction:
        """Outputs at time ``t``.

        Args:
            t: a time (continuous flow) or step count (``discrete=True``), an array of them,
                or ``math.inf``. Must be >= 0.
            fx_train_0: ``(N, O)`` outputs on the training inputs at t = 0 (default 0, the
                mean of the infinite-width prior).
            fx_test_0: ``(M, O)`` outputs on the test inputs at t = 0 (default 0).
            k_test_train: ``(M, N)`` kernel between test and training inputs; without it only
                the training outputs are returned.
        Returns:
            :class:`Prediction` ``(train, test)``; shapes ``(N, O)``/``(M, O)`` for a scalar
            ``t`` and ``(T, N, O)``/``(T, M, O)`` for ``T`` times (the output axis is dropped
            if ``y_train`` was 1-D). The test outputs are
            ``fx_test_0 + k_test_train @ dual_coefficients(t, fx_train_0)``.
        """
        times, scalar = _as_times(t, discrete=self.discrete)
        self._check_inf(times)
        y = self.y_train
        n, n_out = y.shape
        f0 = _as_initial(fx_train_0, "fx_train_0", (n, n_out), y)
        if self._uses_cholesky(times):  # K positive definite at t = inf: every mode converged
            train = y.expand(times.shape[0], n, n_out).clone()
        else:
            decay, _ = self._factors(times)
            v = self.evecs
            train = y + v @ (decay[:, :, None] * (v.T @ (f0 - y)))
        _check_result(train, self, "The training-set prediction")
        test = None
        if k_test_train is not None:
            k_tx = _as_cross_kernel(k_test_train, "k_test_train", n, y)
            g0 = _as_initial(fx_test_0, "fx_test_0", (k_tx.shape[0], n_out), y)
            test = g0 + k_tx @ self._alpha(times, f0)
            _check_result(test, self, "The test-set prediction")
            test = _finish(test, scalar, self.squeeze)
        elif fx_test_0 is not None:
            raise ValueError("fx_test_0 was given without k_test_train; pass the (M, N) "
                             "test-train kernel to predict test outputs.")
        return Prediction(_finish(train, scalar, self.squeeze), test)

    def dual_coefficients(self, t: Any, fx_train_0: Tensorish | None = None) -> torch.Tensor:
        """Weights ``α(t)`` of the training points in the test outputs at time ``t``.

        For any test inputs, ``f_test(t) = f_test(0) + k_test_train @ α(t)`` with
        ``α(t) = G(t) (y − f_train(0))``, ``G(t) = K⁻¹ (I − e^{−aKt})`` (flow) or its
        gradient-descent analogue; ``α(∞) = K⁻¹ (y − f_train(0))`` are the kernel-regression
        weights. Computing them once makes each later prediction one ``(M, N)`` product.

        Args:
            t: time(s) or ``math.inf``, as for ``__call__``.
            fx_train_0: ``(N, O)`` outputs on the training inputs at t = 0 (default 0).
        Returns:
            ``(N, O)``, or ``(T, N, O)`` for ``T`` times (``(N,)`` if ``y_train`` was 1-D).
        """
        times, scalar = _as_times(t, discrete=self.discrete)
        self._check_inf(times)
        f0 = _as_initial(fx_train_0, "fx_train_0", tuple(self.y_train.shape), self.y_train)
        return _finish(self._alpha(times, f0), scalar, self.squeeze)

    def covariance(self, t: Any, k_test_train: Tensorish, prior_test_test: Tensorish,
                   prior_test_train: Tensorish, prior_train_train: Tensorish) -> torch.Tensor:
        """Covariance over random initialisations of the test outputs at time ``t``.

        If the initial outputs on (test, train) inputs are a centred Gaussian with
        covariance ``[[P_**, P_*x], [P_x*, P_xx]]`` (per output) and the targets are fixed,
        the outputs at time ``t`` are Gaussian with (Lee et al. 2019)

            ``Σ(t) = P_** − Δ P_x* − P_*x Δᵀ + Δ P_xx Δᵀ``,  ``Δ(t) = K_*x G(t)``,

        ``G(t)`` as in :meth:`dual_coefficients` and ``K_*x`` the trained kernel. For an
        infinitely wide network ``P`` is the NNGP and ``K`` the NTK (or the NNGP when only
        the readout is trained); this is what :func:`ensemble` computes. Adding observation
        noise ``σ²`` to ``P_xx`` (and ``σ²`` as the ridge of ``K``) makes the NNGP flow at
        ``t = inf`` the GP posterior of :func:`gp_inference` with noise ``σ²``.

        Args:
            t: time(s) or ``math.inf``, as for ``__call__``.
            k_test_train: ``(M, N)`` trained kernel between test and training inputs.
            prior_test_test: ``P_**``: ``(M, M)`` for the covariance, or its diagonal ``(M,)``
                for the variances only (then nothing ``(M, M)`` is formed).
            prior_test_train: ``(M, N)`` ``P_*x``.
            prior_train_train: ``(N, N)`` ``P_xx``.
        Returns:
            ``(M, M)`` covariance or ``(M,)`` variances; a leading ``T`` axis for ``T``
            times.
        """
        times, scalar = _as_times(t, discrete=self.discrete)
        self._check_inf(times)
        like = self.y_train
        n = like.shape[0]
        k_tx = _as_cross_kernel(k_test_train, "k_test_train", n, like)
        m = k_tx.shape[0]
        p_tx = _as_cross_kernel(prior_test_train, "prior_test_train", n, like)
        if p_tx.shape[0] != m:
            raise ValueError(f"prior_test_train must have shape ({m}, {n}) like k_test_train; "
                             f"got {tuple(p_tx.shape)}.")
        p_xx = as_tensor(prior_train_train, "prior_train_train", dtype=like.dtype,
                         device=like.device)
        if tuple(p_xx.shape) != (n, n):
            raise ValueError(f"prior_train_train must have shape ({n}, {n}); got "
                             f"{tuple(p_xx.shape)}.")
        _check_finite_kernel(p_xx, "prior_train_train")
        p_tt = as_tensor(prior_test_test, "prior_test_test", dtype=like.dtype,
                         device=like.device)
        if tuple(p_tt.shape) not in ((m,), (m, m)):
            raise ValueError(f"prior_test_test must have shape ({m}, {m}) or ({m},); got "
                             f"{tuple(p_tt.shape)}.")
        _check_finite_kernel(p_tt, "prior_test_test")
        d = self._apply_gain(times, k_tx.T)  # Δᵀ, (T, N, M)
        if p_tt.ndim == 1:
            out = p_tt + (d * (p_xx @ d)).sum(dim=1) - 2.0 * (d * p_tx.T).sum(dim=1)
        else:
            dt = d.transpose(-1, -2)
            cross = dt @ p_tx.T  # Δ P_x*
            out = p_tt - cross - cross.transpose(-1, -2) + dt @ p_xx @ d
            out = 0.5 * (out + out.transpose(-1, -2))
        _check_result(out, self, "The ensemble covariance")
        return out[0] if scalar else out


def gradient_descent_mse(k_train_train: Tensorish, y_train: Tensorish, *,
                         learning_rate: float = 1.0, cost: str = "jgh", diag_reg: float = 0.0,
                         diag_reg_absolute_scale: bool = False, discrete: bool = False,
                         pseudo_inverse: bool = False) -> MSEPredictor:
    """Closed-form outputs of a kernel trained by gradient flow/descent on the MSE.

    With the residual ``r(t) = f_train(t) − y`` and ``a = η / N`` (``cost="jgh"``) or
    ``η / (N n_out)`` (``cost="nt"``):

    * flow: ``r(t) = exp(−a K t) r(0)``;
      ``f_test(t) = f_test(0) − K_*x K⁻¹ (I − exp(−a K t)) r(0)``;
    * ``discrete=True`` (exact gradient-descent steps, ``t`` = number of steps):
      ``r(k) = (I − a K)^k r(0)`` and the test outputs accumulate the same steps;
    * ``t = inf``: ``f_train = y`` and ``f_test = f_test(0) − K_*x K⁻¹ r(0)`` (kernel
      regression); this needs an invertible ``K`` (or ``diag_reg > 0``, or
      ``pseudo_inverse=True``).

    ``K`` is factorised once, on first use, and the returned predictor evaluates any number of
    times from it. ``K⁻¹(I − e^{−aKt})`` is evaluated per eigenvalue as ``(1 − e^{−aλt}) / λ``
    with its λ → 0 limit ``a t``, so singular kernels are fine at finite t.

    Args:
        k_train_train: ``(N, N)`` per-output train kernel (the full kernel is ``K ⊗ I``).
            Its dtype and device are used throughout (float64 for numpy input).
        y_train: ``(N, O)`` targets (or ``(N,)``, in which case outputs are 1-D too).
        learning_rate: η.
        cost: ``"jgh"`` or ``"nt"`` (see the module docstring).
        diag_reg: ridge added to ``K`` (relative to mean(diag K) unless
            ``diag_reg_absolute_scale``).
        discrete: exact gradient-descent steps instead of continuous flow.
        pseudo_inverse: at ``t = inf``, use ``K⁺`` where ``K`` is numerically singular
            (eigenvalues below ``10 · N · eps · λ_max`` are dropped: the minimum-norm
            kernel-regression solution, and the flow's limit on those modes) instead of
            raising. A positive-definite ``K`` is then solved by Cholesky at ``t = inf``,
            without an eigendecomposition (several times faster for large ``N``); a kernel
            with a clearly negative eigenvalue still raises.
    Returns:
        :class:`MSEPredictor` ``p(t, fx_train_0=None, fx_test_0=None, k_test_train=None)``,
        with ``p.dual_coefficients(t)`` and ``p.covariance(...)``.
    """
    check_choice(cost, "cost", COSTS)
    lr = check_nonnegative(learning_rate, "learning_rate")
    if lr == 0:
        raise ValueError("learning_rate must be > 0.")
    reg = check_nonnegative(diag_reg, "diag_reg")
    k = _as_square_kernel(k_train_train, "k_train_train")
    y, squeeze = _as_targets(y_train, "y_train", k.shape[0], k)
    k = _regularize(k, reg, diag_reg_absolute_scale)
    rate = lr / _normalization(cost, k.shape[0], y.shape[1])
    return MSEPredictor(k, y, lr, cost, bool(discrete), reg, rate, squeeze,
                        pseudo_inverse=bool(pseudo_inverse))


def max_learning_rate(k_train_train: Tensorish, *, cost: str = "jgh", output_dim: int = 1,
                      diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False) -> float:
    """The learning rate at and beyond which discrete gradient descent on the MSE diverges.

    A residual mode with eigenvalue λ is multiplied by ``1 − η λ / n`` each step (``n = N``
    for ``cost="jgh"``, ``N · output_dim`` for ``"nt"``), so GD converges iff
    ``η < 2 n / λ_max``; that bound is returned. ``η = 1 n / λ_max`` is the fastest rate
    for the top mode.
    """
    check_choice(cost, "cost", COSTS)
    if isinstance(output_dim, bool) or not isinstance(output_dim, (int, np.integer)) \
            or output_dim < 1:
        raise ValueError(f"output_dim must be an integer >= 1; got {output_dim!r}.")
    k = _as_square_kernel(k_train_train, "k_train_train")
    k = _regularize(k, check_nonnegative(diag_reg, "diag_reg"), diag_reg_absolute_scale)
    lam_max = float(torch.linalg.eigvalsh(0.5 * (k + k.T))[-1])
    if lam_max <= 0:
        raise ValueError(f"k_train_train has no positive eigenvalue (largest {lam_max:.3e}); "
                         "gradient descent does not move, so no learning-rate bound exists.")
    return 2.0 * _normalization(cost, k.shape[0], int(output_dim)) / lam_max


# --------------------------------------------------------------------------- GP inference
class GPPosterior(NamedTuple):
    """Posterior ``mean`` ``(M, O)`` and ``covariance`` ``(M, M)`` (or the variances
    ``(M,)`` when a diagonal ``k_test_test`` was given; ``None`` without it), per output."""

    mean: torch.Tensor
    covariance: torch.Tensor | None


def gp_inference(k_train_train: Tensorish, y_train: Tensorish, k_test_train: Tensorish,
                 k_test_test: Tensorish | None = None, diag_reg: float = 0.0, *,
                 diag_reg_absolute_scale: bool = False) -> GPPosterior:
    """Exact Bayesian posterior of a GP prior with kernel ``K`` given ``(x_train, y_train)``.

    ``mean = K_*x (K + σ² I)⁻¹ y`` and ``cov = K_** − K_*x (K + σ² I)⁻¹ K_x*``, with the
    observation-noise variance ``σ² = diag_reg · mean(diag K)`` (or ``diag_reg`` itself with
    ``diag_reg_absolute_scale=True``). With the NNGP kernel and ``diag_reg = 0`` this is the
    t = inf ensemble of last-layer training.

    Args:
        k_train_train: ``(N, N)``; k_test_train: ``(M, N)``; k_test_test: ``(M, M)`` for the
            full covariance, ``(M,)`` for the variances only, or ``None`` for the mean only.
        y_train: ``(N, O)`` or ``(N,)``.
    """
    reg = check_nonnegative(diag_reg, "diag_reg")
    k = _as_square_kernel(k_train_train, "k_train_train")
    y, squeeze = _as_targets(y_train, "y_train", k.shape[0], k)
    k_tx = _as_cross_kernel(k_test_train, "k_test_train", k.shape[0], k)
    k = _regularize(k, reg, diag_reg_absolute_scale)
    evals, evecs = _eigh(k)
    _require_invertible(evals, "k_train_train", reg, "GP inference")
    proj = (k_tx @ evecs) / evals  # K_*x V Λ⁻¹
    mean = proj @ (evecs.T @ y)
    cov = None
    if k_test_test is not None:
        k_tt = as_tensor(k_test_test, "k_test_test", dtype=k.dtype, device=k.device)
        m = k_tx.shape[0]
        _check_finite_kernel(k_tt, "k_test_test")
        left = k_tx @ evecs
        if k_tt.ndim == 1 and k_tt.shape[0] == m:
            cov = k_tt - (proj * left).sum(dim=1)
        elif k_tt.shape == (m, m):
            cov = k_tt - proj @ left.T
            cov = 0.5 * (cov + cov.T)
        else:
            raise ValueError(f"k_test_test must have shape ({m}, {m}) or ({m},); got "
                             f"{tuple(k_tt.shape)}.")
    return GPPosterior(mean[:, 0] if squeeze else mean, cov)


# --------------------------------------------------------------------- infinite ensembles
class EnsemblePrediction(NamedTuple):
    """``mean`` ``(M, O)`` and per-output ``covariance`` ``(M, M)`` (``None`` unless
    requested) of the ensemble; a leading ``T`` axis with an array of times."""

    mean: torch.Tensor
    covariance: torch.Tensor | None


KernelFn = Callable[[torch.Tensor, "torch.Tensor | None", tuple], Any]


def _kernel_source(net_or_kernel_fn: Any) -> KernelFn:
    from ..layers import Layer

    if isinstance(net_or_kernel_fn, Layer):
        net = net_or_kernel_fn
        return lambda x1, x2, get: net.kernel(x1, x2, get=get)
    if callable(net_or_kernel_fn):
        fn = net_or_kernel_fn
        return lambda x1, x2, get: fn(x1, x1 if x2 is None else x2, get)
    raise ValueError("net_or_kernel_fn must be an ntkit Layer (e.g. nk.mlp(...)) or a callable "
                     f"kernel_fn(x1, x2, get) -> object with .nngp/.ntk; got "
                     f"{type(net_or_kernel_fn).__name__}.")


def _get_kernel(kernels: Any, which: str, shape: tuple[int, int], what: str) -> torch.Tensor:
    k = getattr(kernels, which, None)
    if k is None:
        raise ValueError(f"the kernel function returned no .{which} for {what}; it must return an "
                         f"object with .{which} when asked for get={which!r}.")
    k = as_tensor(k, f"{what} ({which})")
    if not k.is_floating_point():
        k = k.to(torch.float64)
    if tuple(k.shape) != shape:
        raise ValueError(f"the kernel function returned .{which} of shape {tuple(k.shape)} for "
                         f"{what}; expected {shape} (the per-output kernel).")
    _check_finite_kernel(k, f"{what} ({which})")
    return k


@dataclass(frozen=True)
class EnsemblePredictor:
    """Mean and covariance of the infinite ensemble (built by :func:`ensemble`): the MSE flow
    ``flow`` under the trained kernel, with the NNGP ``nngp_train`` as the prior covariance
    of the initial training outputs (see :meth:`MSEPredictor.covariance`)."""

    kernel_fn: KernelFn
    x_train: torch.Tensor
    kernel: str
    flow: MSEPredictor         # the flow under Θ (or K for "nngp"), regularised
    nngp_train: torch.Tensor   # K on the training inputs
    flow_diagonal: torch.Tensor  # diagonal of the flow's kernel before the ridge, (N,)

    def __call__(self, t: Any, x_test: Tensorish | None = None, *,
                 compute_cov: bool = True) -> EnsemblePrediction:
        """Ensemble statistics at time ``t`` (scalar, array or ``math.inf``).

        Args:
            t: training time in the units of the flow (see ``cost``).
            x_test: ``(M, d)`` inputs (default: the training inputs).
            compute_cov: also return the ``(M, M)`` covariance (needs ``K(x_test, x_test)``).
        Returns:
            :class:`EnsemblePrediction`: mean ``(M, O)``, covariance ``(M, M)``; with ``T``
            times ``(T, M, O)`` and ``(T, M, M)``.
        """
        times, scalar = _as_times(t, discrete=False)
        self.flow._check_inf(times)
        xtr = self.x_train
        n = xtr.shape[0]
        if x_test is None:
            xt, m = None, n
        else:
            xt = as_inputs(x_test, "x_test", dtype=xtr.dtype, device=xtr.device)
            if xt.shape[1] != xtr.shape[1]:
                raise ValueError(f"x_test has {xt.shape[1]} features but x_train has "
                                 f"{xtr.shape[1]}.")
            m = xt.shape[0]
        get = ("nngp", "ntk") if (compute_cov and self.kernel == "ntk") else (self.kernel,)
        if xt is None:
            # The test-train kernel on the training inputs is the kernel without the ridge,
            # which sits on the diagonal only.
            k_flow_tx = self.flow.k_train_train
            if self.flow.diag_reg != 0:
                k_flow_tx = k_flow_tx.clone()
                k_flow_tx.diagonal().copy_(self.flow_diagonal)
            k_nngp_tx = self.nngp_train
        else:
            ks = self.kernel_fn(xt, xtr, get)
            k_flow_tx = _get_kernel(ks, self.kernel, (m, n), "k(x_test, x_train)")
            k_nngp_tx = (_get_kernel(ks, "nngp", (m, n), "k(x_test, x_train)")
                         if "nngp" in get else None)
        like = self.flow.y_train
        k_flow_tx = k_flow_tx.to(like)
        # μ(t) = Δ(t) y = K_*x α(t), α(t) = K⁻¹ (I − e^{−aKt}) y: the flow from f = 0.
        mean = k_flow_tx @ self.flow._alpha(times, torch.zeros_like(like))
        _check_result(mean, self.flow, "The ensemble mean")
        cov = None
        if compute_cov:
            if xt is None:
                k_tt = self.nngp_train
            else:
                k_tt = _get_kernel(self.kernel_fn(xt, None, ("nngp",)), "nngp", (m, m),
                                   "k(x_test, x_test)")
            # The prior over initialisations is the NNGP; Δ carries the training flow.
            cov = self.flow.covariance(t, k_flow_tx, k_tt.to(like), k_nngp_tx.to(like),
                                       self.nngp_train.to(like))
        return EnsemblePrediction(_finish(mean, scalar, self.flow.squeeze), cov)


def ensemble(net_or_kernel_fn: Any, x_train: Tensorish, y_train: Tensorish, *,
             kernel: str = "ntk", learning_rate: float = 1.0, cost: str = "jgh",
             diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False
             ) -> EnsemblePredictor:
    """Infinite ensemble of infinitely wide networks trained on the MSE (Lee et al. 2019).

    Over random initialisations, the outputs at time t are Gaussian (per output, i.i.d.
    across outputs) with

    * mean ``μ(t) = Δ(t) y`` where ``Δ(t) = Θ_*x Θ⁻¹ (I − exp(−a Θ t))``;
    * covariance ``Σ(t) = K_** − Δ K_x* − K_*x Δᵀ + Δ K_xx Δᵀ``;

    with ``Θ`` the NTK (``kernel="ntk"``: all layers trained) or ``Θ = K`` the NNGP
    (``kernel="nngp"``: only the last layer trained; then ``Σ = K_** − K_*x K⁻¹ (I −
    e^{−2aKt}) K_x*``), ``K`` the NNGP, and ``a = η / N`` (``cost="jgh"``) or
    ``η / (N n_out)`` (``cost="nt"``). At ``t = inf`` the mean is kernel regression
    ``Θ_*x Θ⁻¹ y`` and the variance vanishes on the training points (JGH §IV.3); with
    ``kernel="nngp"`` and ``diag_reg = 0`` it is the GP posterior (:func:`gp_inference`).
    (``diag_reg`` regularises ``Θ`` only; ``K_xx`` above stays the NNGP. For the ridge as
    observation noise in ``K_xx`` too, use :meth:`MSEPredictor.covariance` directly.)

    Args:
        net_or_kernel_fn: an ntkit ``Layer`` (its analytic ``net.kernel``) or a callable
            ``kernel_fn(x1, x2, get) -> obj`` with ``obj.nngp``/``obj.ntk`` ``(N1, N2)``
            per-output kernels (``get`` is a tuple of names).
        x_train: ``(N, d)``; y_train: ``(N, O)`` or ``(N,)``.
        kernel: ``"ntk"`` or ``"nngp"``.
        diag_reg: ridge added to the train-train kernel that drives the flow.
    Returns:
        :class:`EnsemblePredictor` ``p(t, x_test=None, compute_cov=True)``.
    """
    check_choice(kernel, "kernel", ("ntk", "nngp"))
    check_choice(cost, "cost", COSTS)
    lr = check_nonnegative(learning_rate, "learning_rate")
    if lr == 0:
        raise ValueError("learning_rate must be > 0.")
    reg = check_nonnegative(diag_reg, "diag_reg")
    source = _kernel_source(net_or_kernel_fn)
    xtr = as_inputs(x_train, "x_train")
    if not xtr.is_floating_point() or xtr.dtype != torch.float64:
        xtr = xtr.to(torch.float64)
    n = xtr.shape[0]
    ks = source(xtr, None, ("nngp", "ntk") if kernel == "ntk" else ("nngp",))
    nngp = _get_kernel(ks, "nngp", (n, n), "k(x_train, x_train)")
    flow = _get_kernel(ks, "ntk", (n, n), "k(x_train, x_train)") if kernel == "ntk" else nngp
    y, squeeze = _as_targets(y_train, "y_train", n, flow)
    flow_reg = _regularize(flow, reg, diag_reg_absolute_scale)
    rate = lr / _normalization(cost, n, y.shape[1])
    mse = MSEPredictor(flow_reg, y, lr, cost, False, reg, rate, squeeze,
                       name=f"the train-train {kernel.upper()}")
    return EnsemblePredictor(source, xtr, kernel, mse, nngp, flow.diagonal().clone())


# -------------------------------------------------------------- general losses, ODE flow
def _mse_cost(norm: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda f, y: 0.5 * ((f - y) ** 2).sum() / norm


def _cross_entropy_cost(norm: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda f, y: -(y * torch.log_softmax(f, dim=1)).sum() / norm


HessianFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mse_hessian(norm: int) -> HessianFn:
    def hessian(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
        return eye.expand(f.shape[0], -1, -1) / norm
    return hessian


def _cross_entropy_hessian(norm: int) -> HessianFn:
    def hessian(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # ∂²/∂f² of −Σ_o y_o log softmax(f)_o is (Σ_o y_o) (diag p − p pᵀ), p = softmax(f).
        p = torch.softmax(f, dim=1)
        block = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return y.sum(dim=1)[:, None, None] * block / norm
    return hessian


_IMPLICIT_METHODS = ("Radau", "BDF", "LSODA")  # the solve_ivp methods that use a Jacobian


class FlowCoefficients(NamedTuple):
    """Dual coefficients of a kernel gradient flow (from :meth:`FlowPredictor.dual_coefficients`):
    ``coef`` ``A(t)``, ``(N, O)`` (``(T, N, O)`` for ``T`` times), and ``n_evaluations``, the
    number of right-hand-side evaluations the ODE solver used (0 when no time is > 0)."""

    coef: torch.Tensor
    n_evaluations: int


@dataclass(frozen=True)
class FlowPredictor:
    """Kernel gradient flow of an arbitrary cost, integrated by ``scipy.integrate.solve_ivp``
    (built by :func:`gradient_flow`).

    The flow is integrated in its dual coefficients ``A(t) = −η ∫₀ᵗ ∇_f C(f_train(s)) ds``
    (``N × O`` numbers): the outputs are ``f_train(t) = f_train(0) + K A(t)`` and, for any
    test inputs, ``f_test(t) = f_test(0) + K_*x A(t)``.
    """

    k_train_train: torch.Tensor  # with the ridge added
    y_train: torch.Tensor
    cost_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    learning_rate: float
    method: str
    rtol: float
    atol: float
    squeeze: bool
    hessian_fn: HessianFn | None = None  # per-example Hessian blocks (N, O, O) of the cost

    def _integrate(self, times: torch.Tensor, f0: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``A`` at each time, ``(T, N, O)`` in ``y_train``'s dtype and device, and the number
        of right-hand-side evaluations."""
        from scipy.integrate import solve_ivp

        k, y = self.k_train_train, self.y_train
        n, n_out = y.shape
        # scipy integrates in numpy on the CPU; the kernels are tiny next to the ODE work.
        k_c, y_c, f0_c = (a.detach().cpu().to(torch.float64) for a in (k, y, f0))
        eta, cost_fn = self.learning_rate, self.cost_fn

        def outputs(a_flat: np.ndarray) -> torch.Tensor:
            a = torch.from_numpy(np.array(a_flat, dtype=np.float64)).reshape(n, n_out)
            return f0_c + k_c @ a

        def rhs(_t: float, a_flat: np.ndarray) -> np.ndarray:
            f = outputs(a_flat).requires_grad_(True)
            (grad,) = torch.autograd.grad(cost_fn(f, y_c), f)
            return (-eta * grad).reshape(-1).numpy()

        options: dict[str, Any] = {}
        if self.hessian_fn is not None and self.method in _IMPLICIT_METHODS:
            hessian_fn = self.hessian_fn

            def jacobian(_t: float, a_flat: np.ndarray) -> np.ndarray:
                # d rhs_(i,a) / d A_(j,b) = −η H_i[a, b] K_ij: the Hessian of a per-example
                # cost is block-diagonal over examples.
                h = hessian_fn(outputs(a_flat), y_c)                       # (N, O, O)
                jac = -eta * h[:, :, None, :] * k_c[:, None, :, None]      # (N, O, N, O)
                return jac.reshape(n * n_out, n * n_out).numpy()

            options["jac"] = jacobian
        t_np = times.numpy()
        order = np.unique(t_np)
        t_end = float(order[-1])
        if t_end == 0:
            sol_y, nfev = np.zeros((n * n_out, len(order))), 0
        else:
            sol = solve_ivp(rhs, (0.0, t_end), np.zeros(n * n_out), method=self.method,
                            t_eval=order, rtol=self.rtol, atol=self.atol, **options)
            if not sol.success:
                raise ValueError(f"the ODE integrator ({self.method}) failed: {sol.message}. "
                                 "Try method='LSODA' or 'Radau' for stiff kernels, or looser "
                                 "rtol/atol.")
            sol_y, nfev = sol.y, int(sol.nfev)
        idx = np.searchsorted(order, t_np)
        coef = torch.from_numpy(sol_y[:, idx].T.copy()).to(device=y.device, dtype=y.dtype)
        return coef.reshape(len(t_np), n, n_out), nfev

    def _times(self, t: Any) -> tuple[torch.Tensor, bool]:
        times, scalar = _as_times(t, discrete=False)
        if torch.isinf(times).any():
            raise ValueError("gradient_flow integrates numerically and needs finite t; for the "
                             "MSE at t = inf use gradient_descent_mse.")
        return times, scalar

    def __call__(self, t: Any, fx_train_0: Tensorish | None = None,
                 fx_test_0: Tensorish | None = None,
                 k_test_train: Tensorish | None = None) -> Prediction:
        """Outputs at finite time(s) ``t`` (same shapes as :class:`MSEPredictor`)."""
        times, scalar = self._times(t)
        k, y = self.k_train_train, self.y_train
        n, n_out = y.shape
        f0 = _as_initial(fx_train_0, "fx_train_0", (n, n_out), y)
        if k_test_train is not None:
            k_tx = _as_cross_kernel(k_test_train, "k_test_train", n, y)
            g0 = _as_initial(fx_test_0, "fx_test_0", (k_tx.shape[0], n_out), y)
        elif fx_test_0 is not None:
            raise ValueError("fx_test_0 was given without k_test_train; pass the (M, N) "
                             "test-train kernel to predict test outputs.")
        coef, _ = self._integrate(times, f0)
        train = _finish(f0 + k @ coef, scalar, self.squeeze)
        test = (_finish(g0 + k_tx @ coef, scalar, self.squeeze) if k_test_train is not None
                else None)
        return Prediction(train, test)

    def dual_coefficients(self, t: Any, fx_train_0: Tensorish | None = None
                          ) -> FlowCoefficients:
        """``A(t)``: for any test inputs, ``f_test(t) = f_test(0) + k_test_train @ A(t)``.

        Args:
            t: finite time(s) >= 0.
            fx_train_0: ``(N, O)`` outputs on the training inputs at t = 0 (default 0).
        Returns:
            :class:`FlowCoefficients` ``(coef, n_evaluations)``; ``coef`` is ``(N, O)`` (or
            ``(T, N, O)``; ``(N,)`` if ``y_train`` was 1-D).
        """
        times, scalar = self._times(t)
        f0 = _as_initial(fx_train_0, "fx_train_0", tuple(self.y_train.shape), self.y_train)
        coef, nfev = self._integrate(times, f0)
        return FlowCoefficients(_finish(coef, scalar, self.squeeze), nfev)


def gradient_flow(loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  k_train_train: Tensorish, y_train: Tensorish, *,
                  learning_rate: float = 1.0, cost: str = "jgh", method: str = "DOP853",
                  rtol: float = 1e-9, atol: float = 1e-12, diag_reg: float = 0.0,
                  diag_reg_absolute_scale: bool = False) -> FlowPredictor:
    """Kernel gradient flow ``df/dt = −η K ∇_f C(f)`` for any differentiable cost.

    Args:
        loss: ``"mse"`` (per example ``½‖f − y‖²``), ``"cross_entropy"`` (per example
            ``−Σ_o y_o log softmax(f)_o``; ``y`` rows are probabilities, e.g. one-hot), or a
            callable ``C(fx_train (N, O), y_train (N, O)) -> scalar`` giving the *whole* cost,
            normalisation included (``cost`` is then ignored).
        k_train_train: ``(N, N)`` per-output kernel.
        y_train: ``(N, O)`` or ``(N,)`` targets.
        cost: for the named losses, divide the sum over examples by ``N`` (``"jgh"``) or
            ``N · n_out`` (``"nt"``); ``"mse"`` then equals :func:`gradient_descent_mse`.
        method, rtol, atol: passed to ``scipy.integrate.solve_ivp`` (``"DOP853"`` by default,
            ``"LSODA"``/``"Radau"``/``"BDF"`` for stiff kernels: with a named loss these get
            the exact Jacobian, an ``(N·O)²`` matrix). The tolerances apply to the dual
            coefficients ``A(t)`` (see :class:`FlowPredictor`).
        diag_reg: ridge added to ``K`` for the training flow (relative to mean(diag K)
            unless ``diag_reg_absolute_scale``), as in :func:`gradient_descent_mse`.
    Returns:
        :class:`FlowPredictor` ``p(t, fx_train_0=None, fx_test_0=None, k_test_train=None)``
        and ``p.dual_coefficients(t)``; ``∇_f C`` comes from torch autograd.
    """
    check_choice(cost, "cost", COSTS)
    lr = check_nonnegative(learning_rate, "learning_rate")
    if lr == 0:
        raise ValueError("learning_rate must be > 0.")
    rtol = check_nonnegative(rtol, "rtol")
    atol = check_nonnegative(atol, "atol")
    reg = check_nonnegative(diag_reg, "diag_reg")
    k = _as_square_kernel(k_train_train, "k_train_train")
    y, squeeze = _as_targets(y_train, "y_train", k.shape[0], k)
    k = _regularize(k, reg, diag_reg_absolute_scale)
    norm = _normalization(cost, *y.shape)
    hessian_fn = None
    if isinstance(loss, str):
        check_choice(loss, "loss", ("mse", "cross_entropy"))
        if loss == "cross_entropy":
            if (y < 0).any() or not torch.allclose(y.sum(dim=1), torch.ones_like(y[:, 0]),
                                                   atol=1e-6):
                raise ValueError("loss='cross_entropy' needs y_train rows that are "
                                 "probabilities (non-negative, summing to 1), e.g. one-hot "
                                 "labels of shape (N, n_classes).")
            cost_fn, hessian_fn = _cross_entropy_cost(norm), _cross_entropy_hessian(norm)
        else:
            cost_fn, hessian_fn = _mse_cost(norm), _mse_hessian(norm)
    elif callable(loss):
        cost_fn = loss
    else:
        raise ValueError(f"loss must be 'mse', 'cross_entropy' or a callable; got {loss!r}.")
    return FlowPredictor(k, y, cost_fn, lr, method, rtol, atol, squeeze, hessian_fn)
