"""The MSE closed form: kernel gradient flow and gradient descent on the mean squared error
(``gradient_descent_mse``, ``MSEPredictor``) and the learning-rate bound of the descent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from .._validation import (Tensorish, as_square_kernel, check_choice, check_nonnegative,
                           regularize)
from ._checks import (COSTS, Training, as_cross_kernel, as_initial, as_kernel_block,
                      as_test_problem, as_times, check_result, check_training, finish,
                      normalization, prepare_training, training)
from ._spectral import SpectralFlow, step_limit


class Prediction(NamedTuple):
    """Outputs at time(s) t: ``train`` ``(N, O)`` and ``test`` ``(M, O)`` (``None`` without
    ``k_test_train``); with an array of ``T`` times each gains a leading ``T`` axis."""

    train: torch.Tensor
    test: torch.Tensor | None


@dataclass(frozen=True)
class MSEPredictor(SpectralFlow):
    """Closed-form MSE dynamics under one train kernel ``K`` (built by
    :func:`gradient_descent_mse`).

    Call it with times to get :class:`Prediction`; :meth:`dual_coefficients` gives the
    weights ``α(t)`` of the training points in the test outputs (so any later test inputs
    need only their kernel against the training inputs), and :meth:`covariance` the
    covariance over random initialisations (the infinite ensemble).

    The factorisations of ``K`` are computed on first use and cached, so every call shares
    them: the eigendecomposition ``K = V diag(λ) Vᵀ`` (``evals``, ``evecs``) and, when ``K``
    is safely positive definite, a Cholesky factor that answers ``t = inf`` alone, several
    times faster than the eigendecomposition (see :class:`SpectralFlow`).
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

    def _start(self, t: Any, fx_train_0: Tensorish | None
               ) -> tuple[torch.Tensor, bool, torch.Tensor]:
        """Validated ``(times, scalar, f0)`` of a call, ``t = inf`` checked."""
        times, scalar = as_times(t, discrete=self.discrete)
        self.check_times(times)
        f0 = as_initial(fx_train_0, "fx_train_0", tuple(self.y_train.shape), self.y_train)
        return times, scalar, f0

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
        times, scalar, f0 = self._start(t, fx_train_0)
        y = self.y_train
        train = y + self.residual(times, f0 - y)
        check_result(train, self, "The training-set prediction")
        test = None
        problem = as_test_problem(k_test_train, fx_test_0, y)
        if problem is not None:
            k_tx, g0 = problem
            test = g0 + k_tx @ self.alpha(times, f0)
            check_result(test, self, "The test-set prediction")
            test = finish(test, scalar, self.squeeze)
        return Prediction(finish(train, scalar, self.squeeze), test)

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
        times, scalar, f0 = self._start(t, fx_train_0)
        return finish(self.alpha(times, f0), scalar, self.squeeze)

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
        times, scalar = as_times(t, discrete=self.discrete)
        self.check_times(times)
        like = self.y_train
        n = like.shape[0]
        k_tx = as_cross_kernel(k_test_train, "k_test_train", n, like)
        m = k_tx.shape[0]
        p_tx = as_cross_kernel(prior_test_train, "prior_test_train", n, like)
        if p_tx.shape[0] != m:
            raise ValueError(f"prior_test_train must have shape ({m}, {n}) like k_test_train; "
                             f"got {tuple(p_tx.shape)}.")
        p_xx = as_kernel_block(prior_train_train, "prior_train_train", ((n, n),), like)
        p_tt = as_kernel_block(prior_test_test, "prior_test_test", ((m, m), (m,)), like)
        d = self.apply_gain(times, k_tx.T)  # Δᵀ, (T, N, M)
        if p_tt.ndim == 1:
            out = p_tt + (d * (p_xx @ d)).sum(dim=1) - 2.0 * (d * p_tx.T).sum(dim=1)
        else:
            dt = d.transpose(-1, -2)
            cross = dt @ p_tx.T  # Δ P_x*
            out = p_tt - cross - cross.transpose(-1, -2) + dt @ p_xx @ d
            out = 0.5 * (out + out.transpose(-1, -2))
        check_result(out, self, "The ensemble covariance")
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
        cost: ``"jgh"`` or ``"nt"`` (see :mod:`ntkit.predict`).
        diag_reg: ridge added to ``K`` (relative to mean(diag K) unless
            ``diag_reg_absolute_scale``).
        discrete: exact gradient-descent steps instead of continuous flow.
        pseudo_inverse: at ``t = inf``, use ``K⁺`` where ``K`` is numerically singular
            (eigenvalues below ``10 · sqrt(N) · eps · λ_max`` are dropped: the minimum-norm
            kernel-regression solution, and the flow's limit on those modes) instead of
            raising. A positive-definite ``K`` is then solved by Cholesky at ``t = inf``,
            without an eigendecomposition (several times faster for large ``N``); a kernel
            with a clearly negative eigenvalue still raises.
    Returns:
        :class:`MSEPredictor` ``p(t, fx_train_0=None, fx_test_0=None, k_test_train=None)``,
        with ``p.dual_coefficients(t)`` and ``p.covariance(...)``.
    """
    lr, reg = check_training(cost, learning_rate, diag_reg)
    k = as_square_kernel(k_train_train, "k_train_train")
    setup = prepare_training(k, y_train, learning_rate=lr, cost=cost, diag_reg=reg,
                             absolute=diag_reg_absolute_scale)
    return _predictor(setup, lr, cost, reg, discrete, pseudo_inverse)


def _predictor(setup: Training, learning_rate: float, cost: str, diag_reg: float,
               discrete: bool, pseudo_inverse: bool) -> MSEPredictor:
    return MSEPredictor(setup.k, setup.y, learning_rate, cost, bool(discrete), diag_reg,
                        setup.rate, setup.squeeze, pseudo_inverse=bool(pseudo_inverse))


def mse_predictor(k: torch.Tensor, y: torch.Tensor, *, learning_rate: float, cost: str,
                  diag_reg: float, absolute: bool, pseudo_inverse: bool = False
                  ) -> MSEPredictor:
    """:func:`gradient_descent_mse` (continuous flow) for callers that validated already.

    The internal entry point of the estimators: ``k`` is a finite, exactly symmetric ``(N,
    N)`` train kernel (as :func:`ntkit._validation.as_square_kernel` returns, or the
    analytic ``net.kernel(x)``, mirrored by construction), ``y`` finite ``(N, O)`` targets
    in ``k``'s dtype and device, and the scalars are checked; nothing is checked again.
    """
    setup = training(k, y, False, learning_rate=learning_rate, cost=cost, diag_reg=diag_reg,
                     absolute=absolute)
    return _predictor(setup, learning_rate, cost, diag_reg, False, pseudo_inverse)


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
    k = as_square_kernel(k_train_train, "k_train_train")
    k = regularize(k, check_nonnegative(diag_reg, "diag_reg"), diag_reg_absolute_scale)
    return step_limit(k, normalization(cost, k.shape[0], int(output_dim)))
