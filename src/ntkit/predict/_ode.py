"""The ODE flow: kernel gradient flow of any differentiable cost, integrated numerically
(``gradient_flow``, ``FlowPredictor``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from .._validation import Tensorish, as_square_kernel, check_choice, check_nonnegative
from ._checks import (Training, as_initial, as_test_problem, as_times, check_training, finish,
                      prepare_training, training)
from ._mse import Prediction


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
        times, scalar = as_times(t, discrete=False)
        if torch.isinf(times).any():
            raise ValueError("gradient_flow integrates numerically and needs finite t; for the "
                             "MSE at t = inf use gradient_descent_mse.")
        return times, scalar

    def __call__(self, t: Any, fx_train_0: Tensorish | None = None,
                 fx_test_0: Tensorish | None = None,
                 k_test_train: Tensorish | None = None) -> Prediction:
        """Outputs at finite time(s) ``t`` (same shapes as :class:`MSEPredictor`)."""
        times, scalar = self._times(t)
        y = self.y_train
        f0 = as_initial(fx_train_0, "fx_train_0", tuple(y.shape), y)
        problem = as_test_problem(k_test_train, fx_test_0, y)
        coef, _ = self._integrate(times, f0)
        train = finish(f0 + self.k_train_train @ coef, scalar, self.squeeze)
        if problem is None:
            return Prediction(train, None)
        k_tx, g0 = problem
        return Prediction(train, finish(g0 + k_tx @ coef, scalar, self.squeeze))

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
        f0 = as_initial(fx_train_0, "fx_train_0", tuple(self.y_train.shape), self.y_train)
        coef, nfev = self._integrate(times, f0)
        return FlowCoefficients(finish(coef, scalar, self.squeeze), nfev)


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
    lr, reg = check_training(cost, learning_rate, diag_reg)
    rtol = check_nonnegative(rtol, "rtol")
    atol = check_nonnegative(atol, "atol")
    k = as_square_kernel(k_train_train, "k_train_train")
    setup = prepare_training(k, y_train, learning_rate=lr, cost=cost, diag_reg=reg,
                             absolute=diag_reg_absolute_scale)
    return _predictor(loss, setup, lr, method, rtol, atol)


def flow_predictor(loss: str, k: torch.Tensor, y: torch.Tensor, *, learning_rate: float,
                   cost: str, method: str, rtol: float, atol: float, diag_reg: float,
                   absolute: bool) -> FlowPredictor:
    """:func:`gradient_flow` for callers that validated already (the estimators): ``k`` a
    finite, exactly symmetric ``(N, N)`` kernel, ``y`` finite ``(N, O)`` targets in its
    dtype and device, the scalars checked; nothing is checked again."""
    setup = training(k, y, False, learning_rate=learning_rate, cost=cost, diag_reg=diag_reg,
                     absolute=absolute)
    return _predictor(loss, setup, learning_rate, method, rtol, atol)


def _predictor(loss: Any, setup: Training, learning_rate: float, method: str, rtol: float,
               atol: float) -> FlowPredictor:
    k, y, squeeze, norm = setup.k, setup.y, setup.squeeze, setup.norm
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
    return FlowPredictor(k, y, cost_fn, learning_rate, method, rtol, atol, squeeze, hessian_fn)
