"""Infinitely wide networks as scikit-learn estimators.

An infinitely wide network trained by gradient flow on the squared loss is kernel regression
with its NTK (or, training only the readout, with its NNGP). These estimators fit and
predict with the closed forms; they take and return numpy arrays and follow scikit-learn's
conventions (``get_params``/``set_params``, ``Pipeline``, ``GridSearchCV``, ``clone``).

Conventions
-----------
* Kernel: ``net.kernel(...)[kind]``, the per-output kernel (``k ⊗ I`` over outputs, so every
  target column is fitted with the same kernel).
* Ridge: ``λ = diag_reg · mean(diag K_train)`` (neural-tangents' convention), or ``λ =
  diag_reg`` with ``diag_reg_absolute_scale=True``. The regularized train kernel is
  ``Θ = K + λ I``.
* Time: the flow of JGH's cost ``C = (1/2N) Σ_i ‖f(x_i) − y_i‖²`` at learning rate 1, i.e.
  ``df(X)/dt = −(1/N) Θ (f(X) − Y)`` from ``f ≡ 0`` (the ensemble mean at initialisation).
  Then ``f_t(x) = k(x, X) Θ⁻¹ (I − e^{−Θ t/N}) Y``; ``t = inf`` is the ridge(less) solve.
* ``predict(X, return_std=True)``: the standard deviation over the infinite ensemble of
  randomly initialised networks trained to time ``t`` (Lee et al. 2019):
  ``Var f_t(x) = K(x,x) + k(x,X) T K_reg T k(X,x) − 2 k(x,X) T K(X,x)`` with
  ``T = Θ⁻¹ (I − e^{−Θ t/N})``, ``K`` the NNGP (ridge added with the same ``diag_reg``), and
  ``k`` the kernel being trained with (NTK or NNGP). For :class:`NNGPRegressor` at
  ``t = inf`` this is the Gaussian-process posterior variance with noise variance ``λ``.
  It does not include observation noise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from .._validation import check_choice, check_nonnegative, resolve_dtype
from ..layers.base import Layer
from ..scale.solvers import resolve_ridge
from ..scale.tiled import kernel_matrix

_WIDTH_PLACEHOLDER = 512  # the analytic kernel does not depend on the declared width
_STIFF_SOLVER_MAX_SIZE = 2000  # n_train * n_classes up to which the flow uses LSODA


def _check_time(t: Any) -> float:
    try:
        value = float(t)
    except (TypeError, ValueError) as err:
        raise ValueError(f"t must be a number >= 0 or numpy.inf; got {t!r}.") from err
    if math.isnan(value) or value < 0:
        raise ValueError(f"t must be >= 0 (or numpy.inf for the converged solution); got {t!r}.")
    return value


class _TrainSolver:
    """Factorisation of ``Θ = K + λI`` that applies ``T = Θ⁻¹ (I − e^{−Θ t/N})``.

    ``t = inf`` uses a Cholesky factorisation (falling back to an eigendecomposition with a
    pseudo-inverse when ``Θ`` is singular, e.g. repeated inputs and ``diag_reg = 0``);
    finite ``t`` uses one eigendecomposition, valid for every ``t``.
    """

    def __init__(self, theta: torch.Tensor, t: float):
        n = theta.shape[0]
        self.t = t
        self.cholesky = None
        if math.isinf(t):
            L, info = torch.linalg.cholesky_ex(theta)
            if int(info) == 0:
                self.cholesky = L
                return
        evals, self.evecs = torch.linalg.eigh(theta)
        evals = evals.clamp(min=0)
        if math.isinf(t):
            cutoff = float(evals.max()) * n * torch.finfo(theta.dtype).eps
            safe = torch.where(evals > cutoff, evals, torch.ones_like(evals))
            self.gain = torch.where(evals > cutoff, 1.0 / safe, torch.zeros_like(evals))
        else:
            # (1 − e^{−e t/N}) / e, with its limit t/N at e = 0.
            x = evals * (t / n)
            safe = torch.where(x > 0, x, torch.ones_like(x))
            self.gain = torch.where(x > 0, -torch.expm1(-safe) / safe, torch.ones_like(x)) * (t / n)

    def apply(self, M: torch.Tensor) -> torch.Tensor:
        if self.cholesky is not None:
            return torch.cholesky_solve(M, self.cholesky)
        return self.evecs @ (self.gain[:, None] * (self.evecs.T @ M))


class _InfiniteNetworkBase(BaseEstimator):
    """Shared machinery: architecture parameters, kernels, the MSE closed form."""

    _kind = "ntk"

    def __init__(self, net: Layer | None = None, *, depth: int = 3, activation: Any = "relu",
                 W_std: float = 1.0, b_std: float = 0.1, parameterization: str = "ntk",
                 t: float = np.inf, diag_reg: float = 0.0,
                 diag_reg_absolute_scale: bool = False, dtype: str = "float64",
                 device: str | None = None):
        self.net = net
        self.depth = depth
        self.activation = activation
        self.W_std = W_std
        self.b_std = b_std
        self.parameterization = parameterization
        self.t = t
        self.diag_reg = diag_reg
        self.diag_reg_absolute_scale = diag_reg_absolute_scale
        self.dtype = dtype
        self.device = device

    # ------------------------------------------------------------------ helpers
    def _build_net(self) -> Layer:
        if self.net is not None:
            if not isinstance(self.net, Layer):
                raise ValueError(f"net must be an ntkit network (e.g. nk.mlp(3, 512)) or None; "
                                 f"got {type(self.net).__name__}.")
            return self.net
        from ..layers.combinators import mlp

        return mlp(self.depth, _WIDTH_PLACEHOLDER, activation=self.activation, W_std=self.W_std,
                   b_std=self.b_std, out_dim=1, parameterization=self.parameterization)

    def _tensor(self, X: np.ndarray) -> torch.Tensor:
        X = np.asarray(X)
        if not X.flags.writeable:  # read-only memmaps: torch needs a writable buffer
            X = X.copy()
        return torch.as_tensor(X, dtype=self._dtype, device=self._device)

    def _kernel(self, X1: torch.Tensor, X2: torch.Tensor | None, kind: str) -> torch.Tensor:
        return kernel_matrix(self.net_, X1, X2, get=kind, progress=False, dtype=self._dtype)

    def _kernel_diag(self, X: torch.Tensor, kind: str) -> torch.Tensor:
        return self.net_.kernel(X, get=kind, diagonal=True, dtype=self._dtype)[kind]

    def _fit_mse(self, X: np.ndarray, Y: np.ndarray) -> None:
        """Fit the closed-form flow on ``Y`` of shape ``(N, k)``."""
        self.net_ = self._build_net()
        self._dtype = resolve_dtype(self.dtype, "dtype")
        self._device = torch.device(self.device) if self.device is not None else None
        self._t = _check_time(self.t)
        check_nonnegative(self.diag_reg, "diag_reg")
        Xt = self._tensor(X)
        K = self._kernel(Xt, None, self._kind)
        self.ridge_ = resolve_ridge(self.diag_reg, K.diagonal(), self.diag_reg_absolute_scale)
        K.diagonal().add_(self.ridge_)
        self._solver = _TrainSolver(K, self._t)
        self._X_train = Xt
        self._coef = self._solver.apply(self._tensor(Y)) if self._t > 0 else \
            torch.zeros(Y.shape, dtype=self._dtype, device=Xt.device)
        self._nngp_train = None  # computed on the first predict(..., return_std=True)

    def _mean(self, X: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        Xt = self._tensor(X)
        k_test_train = self._kernel(Xt, self._X_train, self._kind)
        return k_test_train @ self._coef, k_test_train

    def _std(self, Xt: torch.Tensor, k_test_train: torch.Tensor) -> torch.Tensor:
        """Ensemble standard deviation of ``f_t(x)``, shape ``(n,)``."""
        prior = self._kernel_diag(Xt, "nngp")
        if self._t == 0:
            return prior.clamp(min=0).sqrt()
        if self._nngp_train is None:
            K = self._kernel(self._X_train, None, "nngp")
            K.diagonal().add_(resolve_ridge(self.diag_reg, K.diagonal(),
                                            self.diag_reg_absolute_scale))
            self._nngp_train = K
        nngp_test_train = k_test_train if self._kind == "nngp" else \
            self._kernel(Xt, self._X_train, "nngp")
        S = self._solver.apply(k_test_train.T)                  # (N, n)
        var = (prior + (S * (self._nngp_train @ S)).sum(dim=0)
               - 2.0 * (S * nngp_test_train.T).sum(dim=0))
        return var.clamp(min=0).sqrt()

    def _validate_predict_X(self, X):
        check_is_fitted(self, "net_")
        return validate_data(self, X, reset=False, dtype=np.float64)


class _InfiniteNetworkRegressor(RegressorMixin, _InfiniteNetworkBase):
    def fit(self, X, y) -> _InfiniteNetworkRegressor:
        """Fit on ``X`` of shape ``(N, d)`` and ``y`` of shape ``(N,)`` or ``(N, k)``."""
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self._y_ndim = y.ndim
        self._fit_mse(X, y.reshape(len(y), -1))
        return self

    def predict(self, X, return_std: bool = False):
        """Mean prediction of the infinite ensemble at time ``t``.

        Args:
            X: ``(n, d)`` inputs.
            return_std: also return the ensemble standard deviation of the outputs (the same
                for every target column; no observation noise).
        Returns:
            ``y_mean`` of shape ``(n,)`` or ``(n, k)`` like the training ``y``; with
            ``return_std``, ``(y_mean, y_std)`` with ``y_std`` of the same shape.
        """
        X = self._validate_predict_X(X)
        mean, k_test_train = self._mean(X)
        mean_np = mean.cpu().numpy()
        if self._y_ndim == 1:
            mean_np = mean_np[:, 0]
        if not return_std:
            return mean_np
        std = self._std(self._tensor(X), k_test_train).cpu().numpy()
        std = std if self._y_ndim == 1 else np.repeat(std[:, None], mean_np.shape[1], axis=1)
        return mean_np, std

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags


class NTKRegressor(_InfiniteNetworkRegressor):
    """Kernel regression with the NTK: an infinitely wide network trained by gradient flow on
    the squared loss, for time ``t`` (default: to convergence).

    Args:
        net: an ntkit network; if ``None``, ``nk.mlp(depth, ·, activation, W_std, b_std,
            parameterization=parameterization)`` (the kernel does not depend on the width).
        depth: number of Dense layers (``depth − 1`` hidden layers).
        activation: activation name ("relu", "erf", "gelu", ...) or an ntkit activation.
        W_std, b_std: weight and bias standard deviations.
        parameterization: "ntk" (JGH) or "standard".
        t: training time (JGH cost, learning rate 1); ``np.inf`` for the converged solution.
            A finite ``t`` is early stopping.
        diag_reg: ridge, relative to the mean diagonal of the train kernel unless
            ``diag_reg_absolute_scale``.
        dtype: "float64" (default) or "float32".
        device: torch device for the kernels (e.g. "cuda"); default CPU.

    Attributes:
        net_: the network used. ``ridge_``: the absolute ridge λ. ``n_features_in_``.
    """

    _kind = "ntk"


class NNGPRegressor(_InfiniteNetworkRegressor):
    """Kernel regression with the NNGP: the posterior mean of the infinitely wide network's
    Gaussian process (``t = inf``), or gradient flow of the readout layer alone for finite
    ``t``. ``predict(X, return_std=True)`` gives the GP posterior standard deviation (noise
    variance ``λ``) at ``t = inf``. Parameters as :class:`NTKRegressor`.
    """

    _kind = "nngp"


class NTKClassifier(ClassifierMixin, _InfiniteNetworkBase):
    """Classification with an infinitely wide network's NTK (or NNGP).

    ``loss="mse"`` (default) regresses one-hot targets with the closed form of
    :class:`NTKRegressor` and predicts the argmax of the ``n_classes`` outputs.
    ``loss="cross_entropy"`` trains the outputs with softmax cross-entropy by the kernel
    gradient flow ``df(X)/dt = −(1/N) Θ (softmax(f(X)) − Y)`` from ``f ≡ 0`` to a finite time
    ``t`` (required: on separable data the logits grow without bound), integrated by LSODA
    with the exact Jacobian when ``N · n_classes <= 2000`` and by adaptive Runge–Kutta
    (RK45) otherwise (standardise the inputs: its step count grows with the kernel's
    scale); a test point gets ``f_t(x) = k(x, X) A_t`` with
    ``A_t = −(1/N) ∫₀ᵗ (softmax(f_s(X)) − Y) ds``.

    What ``predict_proba`` means:

    * ``loss="cross_entropy"``: the softmax of the trained logits ``f_t(x)`` — the class
      probabilities of the (infinite-ensemble mean) network.
    * ``loss="mse"``: the one-hot regression outputs ``f(x)`` are a least-squares estimate of
      ``P(y = c | x)`` but need not be non-negative or sum to one; ``predict_proba`` returns
      their Euclidean projection onto the probability simplex (the closest probability
      vector). It preserves the order of the outputs, so its argmax is ``predict``, but it is
      not calibrated: use ``CalibratedClassifierCV`` if calibrated probabilities matter.

    ``decision_function`` returns the raw outputs ``f(x)``, shape ``(n, n_classes)`` (for two
    classes, ``f_1(x) − f_0(x)``, shape ``(n,)``).

    Args:
        kernel: "ntk" (default) or "nngp".
        loss: "mse" or "cross_entropy".
        Others as :class:`NTKRegressor`.
    """

    def __init__(self, net: Layer | None = None, *, depth: int = 3, activation: Any = "relu",
                 W_std: float = 1.0, b_std: float = 0.1, parameterization: str = "ntk",
                 t: float = np.inf, diag_reg: float = 0.0,
                 diag_reg_absolute_scale: bool = False, kernel: str = "ntk",
                 loss: str = "mse", dtype: str = "float64", device: str | None = None):
        super().__init__(net, depth=depth, activation=activation, W_std=W_std, b_std=b_std,
                         parameterization=parameterization, t=t, diag_reg=diag_reg,
                         diag_reg_absolute_scale=diag_reg_absolute_scale, dtype=dtype,
                         device=device)
        self.kernel = kernel
        self.loss = loss

    def fit(self, X, y) -> NTKClassifier:
        """Fit on ``X`` of shape ``(N, d)`` and class labels ``y`` of shape ``(N,)``."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        y = column_or_1d(y, warn=True)
        self._kind = check_choice(self.kernel, "kernel", ("ntk", "nngp"))
        check_choice(self.loss, "loss", ("mse", "cross_entropy"))
        self.classes_, y_index = np.unique(y, return_inverse=True)
        Y = np.eye(len(self.classes_))[y_index]
        if self.loss == "mse":
            self._fit_mse(X, Y)
        else:
            if math.isinf(_check_time(self.t)):
                raise ValueError("loss='cross_entropy' needs a finite training time t (the "
                                 "logits diverge as t -> inf on separable data); e.g. t=100.")
            self._fit_cross_entropy(X, Y)
        return self

    def _fit_cross_entropy(self, X: np.ndarray, Y: np.ndarray) -> None:
        from scipy.integrate import solve_ivp

        self.net_ = self._build_net()
        self._dtype = resolve_dtype(self.dtype, "dtype")
        self._device = torch.device(self.device) if self.device is not None else None
        self._t = _check_time(self.t)
        check_nonnegative(self.diag_reg, "diag_reg")
        Xt = self._tensor(X)
        theta = self._kernel(Xt, None, self._kind)
        self.ridge_ = resolve_ridge(self.diag_reg, theta.diagonal(),
                                    self.diag_reg_absolute_scale)
        theta.diagonal().add_(self.ridge_)
        n, c = Y.shape
        Yt = self._tensor(Y)

        # The train logits are f = Θ A, so integrating A alone determines everything.
        def rhs(_, a_flat):
            A = torch.as_tensor(a_flat, dtype=self._dtype, device=Yt.device).reshape(n, c)
            P = torch.softmax(theta @ A, dim=1)
            return ((Yt - P) / n).reshape(-1).cpu().numpy()

        def jacobian(_, a_flat):
            # d(rhs)_(i,a) / dA_(j,b) = −(1/N) Θ_ij (P_ia δ_ab − P_ia P_ib)
            A = torch.as_tensor(a_flat, dtype=self._dtype, device=Yt.device).reshape(n, c)
            P = torch.softmax(theta @ A, dim=1)
            S = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]       # (n, c, c)
            J = -(theta[:, None, :, None] * S[:, :, None, :]) / n          # (n, c, n, c)
            return J.reshape(n * c, n * c).cpu().numpy()

        if self._t > 0:
            # Large kernel values (unscaled inputs) make the flow stiff; for small problems an
            # implicit-capable method with the exact Jacobian keeps the step count low. The
            # (n c)² Jacobian is too big beyond that, and an explicit Runge–Kutta is used
            # (its cost grows with the kernel's scale: standardise the inputs).
            small = n * c <= _STIFF_SOLVER_MAX_SIZE
            sol = solve_ivp(rhs, (0.0, self._t), np.zeros(n * c),
                            method="LSODA" if small else "RK45", jac=jacobian if small else None,
                            rtol=1e-8, atol=1e-10, t_eval=[self._t])
            if not sol.success:
                raise RuntimeError(f"The cross-entropy gradient flow failed: {sol.message}")
            A = sol.y[:, -1].reshape(n, c)
        else:
            A = np.zeros((n, c))
        self._X_train = Xt
        self._coef = self._tensor(A)
        self.n_flow_evaluations_ = int(sol.nfev) if self._t > 0 else 0

    def _outputs(self, X) -> np.ndarray:
        X = self._validate_predict_X(X)
        return self._mean(X)[0].cpu().numpy()

    def decision_function(self, X) -> np.ndarray:
        """Raw outputs ``f(x)``: ``(n, n_classes)``, or ``f_1 − f_0`` of shape ``(n,)`` for two
        classes."""
        F = self._outputs(X)
        return F[:, 1] - F[:, 0] if F.shape[1] == 2 else F

    def predict(self, X) -> np.ndarray:
        """The class with the largest output, shape ``(n,)``."""
        outputs = self._outputs(X)
        return self.classes_[np.argmax(outputs, axis=1)]

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape ``(n, n_classes)``; see the class docstring for what
        they mean under each loss."""
        F = self._outputs(X)
        if self.loss == "cross_entropy":
            F = F - F.max(axis=1, keepdims=True)
            E = np.exp(F)
            return E / E.sum(axis=1, keepdims=True)
        return _project_to_simplex(F)


def _project_to_simplex(F: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto ``{p >= 0, Σ p = 1}`` (sort-based, exact)."""
    n, c = F.shape
    U = -np.sort(-F, axis=1)
    css = np.cumsum(U, axis=1) - 1.0
    ind = np.arange(1, c + 1)
    cond = U - css / ind > 0
    rho = c - 1 - np.argmax(cond[:, ::-1], axis=1)   # last index where cond holds
    tau = css[np.arange(n), rho] / (rho + 1)
    return np.maximum(F - tau[:, None], 0.0)
