"""Infinitely wide networks as scikit-learn estimators.

An infinitely wide network trained by gradient flow on the squared loss is kernel regression
with its NTK (or, training only the readout, with its NNGP). These estimators fit and
predict with the closed forms of :mod:`ntkit.predict` (the cross-entropy flow with its ODE
integrator); they take and return numpy arrays and follow scikit-learn's conventions
(``get_params``/``set_params``, ``Pipeline``, ``GridSearchCV``, ``clone``).

Conventions
-----------
* Kernel: ``net.kernel(...)[get]``, the per-output kernel (``k ⊗ I`` over outputs, so every
  target column is fitted with the same kernel).
* Ridge: ``λ = diag_reg · mean(diag K_train)`` (neural-tangents' convention), or ``λ =
  diag_reg`` with ``diag_reg_absolute_scale=True``. The regularized train kernel is
  ``Θ = K + λ I``.
* Time: the flow of JGH's cost ``C = (1/2N) Σ_i ‖f(x_i) − y_i‖²`` at learning rate 1, i.e.
  ``df(X)/dt = −(1/N) Θ (f(X) − Y)`` from ``f ≡ 0`` (the ensemble mean at initialisation).
  Then ``f_t(x) = k(x, X) Θ⁻¹ (I − e^{−Θ t/N}) Y``; ``t = inf`` is the ridge(less) solve.
  This is ``ntkit.predict.gradient_descent_mse(Θ, Y, cost="jgh", learning_rate=1)``.
  At ``t = inf`` a singular ``Θ`` (repeated inputs with ``diag_reg = 0``) is solved with its
  pseudo-inverse.
* ``solver``: ``"auto"`` (default) asks the cost model of :func:`ntkit.scale.solve`
  (:func:`ntkit.scale.plan_solve`) which path fits the training set: while a float64 train
  kernel fits comfortably it is ``"direct"``; past that (``t = inf`` and ``diag_reg > 0``
  only) the float32 in-RAM, out-of-core (``store=``) or matrix-free CG paths of
  :func:`ntkit.scale.solve`, which give the mean only (no ``return_std``). The choice is
  logged and kept in ``solver_path_`` and ``solve_plan_``. ``"direct"`` forms the ``N × N``
  train kernel and factorises it (Cholesky at ``t = inf``, an eigendecomposition for finite
  ``t``); ``"cg"`` solves ``(K + λ I) α = Y`` by Nyström-preconditioned conjugate gradients
  over tiled kernel mat-vecs, never holding the train kernel: it needs ``t = inf`` and
  ``diag_reg > 0``, and gives the mean only.
* Images: with ``input_shape=(C, H, W)`` (or any shape) ``X`` stays a flat ``(N, C·H·W)``
  array, as scikit-learn expects, and each row is reshaped to ``input_shape`` before the
  kernel (for convolutional networks). Such inputs use the direct path.
* ``predict(X, return_std=True)``: the standard deviation over the infinite ensemble of
  randomly initialised networks trained to time ``t`` (Lee et al. 2019):
  ``Var f_t(x) = K(x,x) + k(x,X) T K_reg T k(X,x) − 2 k(x,X) T K(X,x)`` with
  ``T = Θ⁻¹ (I − e^{−Θ t/N})``, ``K`` the NNGP (ridge added with the same ``diag_reg``), and
  ``k`` the kernel being trained with (NTK or NNGP). For :class:`NNGPRegressor` at
  ``t = inf`` this is the Gaussian-process posterior variance with noise variance ``λ``.
  It does not include observation noise. (``ntkit.predict.MSEPredictor.covariance`` with the
  NNGP as prior and the ridge as noise on the training outputs.)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted, validate_data

from .._validation import (
    check_choice,
    check_nonnegative,
    check_positive_int,
    resolve_dtype,
    resolve_ridge,
)
from ..layers.base import Layer

# The estimators validate X and y once (sklearn's validate_data) and hand the validated
# tensors to the predictors' internal entry points, which do not check them again.
from ..predict._mse import mse_predictor
from ..scale.solvers import KernelOperator, solve_validated
from ..scale.tiled import DEFAULT_TILE, tile_slices
from ._shapes import check_input_shape

_DEFAULT_WIDTH = 512  # the declared hidden width; only the standard-param kernel depends on it
# Features whose root mean square exceeds this are "large": standardising them is the first
# thing to try when the train kernel comes out indefinite (smooth activations' duals are
# integrals that lose accuracy at large pre-activation variances).
_LARGE_FEATURE_SCALE = 3.0
_SOLVERS = ("auto", "direct", "cg")
# Relative residual at which CG stops: prediction errors are about this size relative to y.
_CG_TOL = {torch.float64: 1e-8, torch.float32: 1e-5}
_CG_MAX_ITER = 1000
_PREDICT_BLOCK = DEFAULT_TILE * DEFAULT_TILE  # test-train kernel entries held at once


def _check_time(t: Any) -> float:
    try:
        value = float(t)
    except (TypeError, ValueError) as err:
        raise ValueError(f"t must be a number >= 0 or numpy.inf; got {t!r}.") from err
    if math.isnan(value) or value < 0:
        raise ValueError(f"t must be >= 0 (or numpy.inf for the converged solution); got {t!r}.")
    return value


class _InfiniteNetworkBase(BaseEstimator):
    """Shared machinery: architecture parameters, kernels, fitting the MSE flow, predicting."""

    _get = "ntk"  # the kernel fitted with, as net.kernel(..., get=)

    def __init__(self, net: Layer | None = None, *, depth: int = 3, activation: Any = "relu",
                 W_std: float = 1.0, b_std: float = 0.1, parameterization: str = "ntk",
                 width: int = _DEFAULT_WIDTH, t: float = np.inf, diag_reg: float = 0.0,
                 diag_reg_absolute_scale: bool = False, solver: str = "auto",
                 cg_tol: float | None = None, cg_max_iter: int = _CG_MAX_ITER,
                 n_landmarks: int = 1000, dtype: str = "float64", device: str | None = None,
                 input_shape: tuple[int, ...] | None = None, memory_budget: int | None = None,
                 store: str | None = None):
        self.net = net
        self.depth = depth
        self.activation = activation
        self.W_std = W_std
        self.b_std = b_std
        self.parameterization = parameterization
        self.width = width
        self.t = t
        self.diag_reg = diag_reg
        self.diag_reg_absolute_scale = diag_reg_absolute_scale
        self.solver = solver
        self.cg_tol = cg_tol
        self.cg_max_iter = cg_max_iter
        self.n_landmarks = n_landmarks
        self.dtype = dtype
        self.device = device
        self.input_shape = input_shape
        self.memory_budget = memory_budget
        self.store = store

    # ------------------------------------------------------------------ helpers
    def _build_net(self) -> Layer:
        if self.net is not None:
            if not isinstance(self.net, Layer):
                raise ValueError(f"net must be an ntkit network (e.g. nk.mlp(3, 512)) or None; "
                                 f"got {type(self.net).__name__}.")
            return self.net
        from ..layers.combinators import mlp

        width = check_positive_int(self.width, "width")
        return mlp(self.depth, width, activation=self.activation, W_std=self.W_std,
                   b_std=self.b_std, out_dim=1, parameterization=self.parameterization)

    def _tensor(self, X: np.ndarray, inputs: bool = True) -> torch.Tensor:
        """``X`` as a tensor in the estimator's dtype and device; inputs (``inputs=True``,
        not targets) are reshaped to ``(N, *input_shape)`` when one is set."""
        X = np.asarray(X)
        if not X.flags.writeable:  # read-only memmaps: torch needs a writable buffer
            X = X.copy()
        t = torch.as_tensor(X, dtype=self._dtype, device=self._device)
        if inputs and self._input_shape is not None and t.ndim == 2:
            # Flat rows, as scikit-learn passes them, become images for the kernel.
            t = t.reshape(t.shape[0], *self._input_shape)
        return t

    def _kernel(self, X1: torch.Tensor, X2: torch.Tensor | None, get: str) -> torch.Tensor:
        # net.kernel tiles within its memory budget and refuses a dense kernel that cannot
        # fit; with X2 = None it is exactly symmetric (mirrored tiles), so the predictors
        # can take it without a symmetry check.
        return self.net_.kernel(X1, X2, get=get, dtype=self._dtype)[get]

    def _kernel_diag(self, X: torch.Tensor, get: str) -> torch.Tensor:
        return self.net_.kernel(X, get=get, diagonal=True, dtype=self._dtype)[get]

    def _check_params(self) -> None:
        """Validate the parameters shared by every ``fit`` and set the fitted network."""
        self.net_ = self._build_net()
        self._dtype = resolve_dtype(self.dtype, "dtype")
        self._device = torch.device(self.device) if self.device is not None else None
        self._t = _check_time(self.t)
        check_nonnegative(self.diag_reg, "diag_reg")
        check_choice(self.solver, "solver", _SOLVERS)
        if self.solver == "cg":
            if not math.isinf(self._t):
                raise ValueError(f"solver='cg' gives only the converged solution (t = inf); "
                                 f"got t={self.t!r}. Use solver='direct' for a finite "
                                 "training time.")
            if float(self.diag_reg) == 0:
                raise ValueError("solver='cg' needs diag_reg > 0 (its Nyström preconditioner "
                                 "and the conjugate-gradient convergence rest on the ridge), "
                                 "e.g. diag_reg=1e-6; or use solver='direct'.")
            if self.cg_tol is not None and not (
                    isinstance(self.cg_tol, (int, float)) and 0 < float(self.cg_tol) < 1):
                raise ValueError(f"cg_tol must be a relative residual in (0, 1) or None (1e-8 "
                                 f"in float64, 1e-5 in float32); got {self.cg_tol!r}.")
            check_positive_int(self.cg_max_iter, "cg_max_iter")
            check_positive_int(self.n_landmarks, "n_landmarks")
        self._input_shape = check_input_shape(self.input_shape,
                                              getattr(self, "n_features_in_", None))
        self._flow = None         # the ntkit.predict flow (solver='direct', loss='mse')
        self._nngp_train = None   # computed on the first predict(..., return_std=True)
        self.n_iter_ = None
        self.solver_path_ = None  # the path that fitted: "direct", "cg", "dense_cg", ...
        self.solve_plan_ = None   # the cost model's plan (solver="auto")

    def _auto_path(self, X: np.ndarray, k: int) -> str:
        """``"direct"`` or a path of :func:`ntkit.scale.solve`, from the cost model."""
        from ..scale.plan import plan_solve
        from ..scale.solvers import _count_dense

        scale_possible = (math.isinf(self._t) and float(self.diag_reg) > 0
                          and self._input_shape is None)
        plan = plan_solve(X.shape[0], k, n_features=X.shape[1],
                          depth=max(1, _count_dense(self.net_)),
                          memory_budget=self.memory_budget, store=self.store,
                          ridge_positive=scale_possible,
                          n_landmarks=int(self.n_landmarks)) if scale_possible else None
        self.solve_plan_ = plan
        if plan is None or (plan.path, plan.precision) == ("direct", "float64"):
            return "direct"  # the closed form: finite t, return_std, pseudo-inverse
        return plan.path

    def _fit_mse(self, X: np.ndarray, Y: np.ndarray) -> None:
        """Fit the closed-form flow on ``Y`` of shape ``(N, k)``."""
        self._check_params()
        Xt, Yt = self._tensor(X), self._tensor(Y, inputs=False)
        self._X_train = Xt
        path = self._auto_path(X, Y.shape[1]) if self.solver == "auto" else self.solver
        self.solver_path_ = path
        if path not in ("direct", "cg"):
            from ..scale.solvers import _solve_planned

            tol = _CG_TOL[torch.float64] if self.cg_tol is None else float(self.cg_tol)
            result = _solve_planned(self.net_, Xt, Yt, method=path, diag_reg=self.diag_reg,
                                    absolute=self.diag_reg_absolute_scale, tol=tol,
                                    max_iter=int(self.cg_max_iter), get=self._get,
                                    n_landmarks=int(self.n_landmarks), tile=DEFAULT_TILE,
                                    seed=0, dtype=torch.float64, progress=False,
                                    callback=None, memory_budget=self.memory_budget,
                                    store=self.store, client=None)
            self._warn_unconverged(result, tol)
            self.ridge_ = result.ridge
            self._coef = result.coef.to(self._dtype)
            self.n_iter_ = result.iterations
            self.solve_plan_ = result.plan
            return
        if path == "cg":
            tol = _CG_TOL[self._dtype] if self.cg_tol is None else float(self.cg_tol)
            op = KernelOperator.from_validated(self.net_, Xt, get=self._get)
            result = solve_validated(op, Yt, method="cg", preconditioner="nystrom",
                                     diag_reg=self.diag_reg,
                                     diag_reg_absolute_scale=self.diag_reg_absolute_scale,
                                     tol=tol, max_iter=int(self.cg_max_iter),
                                     n_landmarks=int(self.n_landmarks))
            self._warn_unconverged(result, tol)
            self.ridge_ = result.ridge
            self._coef = result.coef
            self.n_iter_ = result.iterations
            return
        # JGH's cost (½ · mean over examples) at learning rate 1 is the estimator's time.
        try:
            K = self._kernel(Xt, None, self._get)  # refuses a kernel that overflows
            self.ridge_ = resolve_ridge(self.diag_reg, K.diagonal(),
                                        self.diag_reg_absolute_scale)
            self._flow = mse_predictor(K, Yt, learning_rate=1.0, cost="jgh",
                                       diag_reg=self.ridge_, absolute=True,
                                       pseudo_inverse=True)
            del K
            # f_t(x) = k(x, X) @ coef, from f ≡ 0; t was checked by _check_params.
            times = torch.tensor([self._t], dtype=torch.float64)
            self._flow.check_times(times)
            self._coef = self._flow.alpha(times, torch.zeros_like(Yt))[0]
        except ValueError as err:  # an overflowing or indefinite train kernel
            raise ValueError(f"{err} {_input_scale_hint(X)}") from err

    def _warn_unconverged(self, result, tol: float) -> None:
        if not result.converged:
            warnings.warn(f"solver={self.solver_path_!r} stopped after {result.iterations} "
                          f"iterations at relative residual {result.residual:.2e} (tolerance "
                          f"{tol:.0e}); the predictions are approximate. A larger diag_reg "
                          "converges faster; solver='direct' is exact.", ConvergenceWarning,
                          stacklevel=4)

    def _predict_tensors(self, X: np.ndarray, return_std: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs ``(n, k)`` and, with ``return_std``, the ensemble std ``(n,)``, computed in
        blocks of test rows so that the test-train kernel is never held whole."""
        if return_std and self._flow is None:
            raise ValueError("return_std=True needs solver='direct': the ensemble variance "
                             "uses the factorised N x N train kernel, which the "
                             f"{self.solver_path_!r} path never keeps.")
        Xt = self._tensor(X)
        n_train = self._X_train.shape[0]
        mean = torch.empty((Xt.shape[0], self._coef.shape[1]), dtype=self._dtype,
                           device=Xt.device)
        std = torch.empty(Xt.shape[0], dtype=self._dtype, device=Xt.device) \
            if return_std else None
        for rows in tile_slices(Xt.shape[0], max(1, _PREDICT_BLOCK // n_train)):
            if return_std and self._get == "ntk":
                # One pass of the layer recursion yields both kernels.
                both = self.net_.kernel(Xt[rows], self._X_train, get=("nngp", "ntk"),
                                        dtype=self._dtype)
                k_test_train, nngp_test_train = both.ntk, both.nngp
            else:
                k_test_train = self._kernel(Xt[rows], self._X_train, self._get)
                nngp_test_train = k_test_train  # used only when get is "nngp"
            mean[rows] = k_test_train @ self._coef
            if return_std:
                std[rows] = self._std(Xt[rows], k_test_train, nngp_test_train)
        return mean, std

    def _std(self, Xt: torch.Tensor, k_test_train: torch.Tensor,
             nngp_test_train: torch.Tensor) -> torch.Tensor:
        """Ensemble standard deviation of ``f_t(x)``, shape ``(n,)``."""
        if self._nngp_train is None:
            if self._get == "nngp":  # the flow's regularised kernel is that very matrix
                self._nngp_train = self._flow.k_train_train
            else:
                K = self._kernel(self._X_train, None, "nngp")
                K.diagonal().add_(resolve_ridge(self.diag_reg, K.diagonal(),
                                                self.diag_reg_absolute_scale))
                self._nngp_train = K
        var = self._flow.covariance(self._t, k_test_train, self._kernel_diag(Xt, "nngp"),
                                    nngp_test_train, self._nngp_train)
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
                for every target column; no observation noise). Needs ``solver="direct"``.
        Returns:
            ``y_mean`` of shape ``(n,)`` or ``(n, k)`` like the training ``y``; with
            ``return_std``, ``(y_mean, y_std)`` with ``y_std`` of the same shape.
        """
        X = self._validate_predict_X(X)
        mean, std = self._predict_tensors(X, return_std)
        mean_np = mean.cpu().numpy()
        if self._y_ndim == 1:
            mean_np = mean_np[:, 0]
        if not return_std:
            return mean_np
        std = std.cpu().numpy()
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
        net: an ntkit network; if ``None``, ``nk.mlp(depth, width, activation, W_std, b_std,
            parameterization=parameterization)``. When ``net`` is given, ``depth``,
            ``activation``, ``W_std``, ``b_std``, ``parameterization`` and ``width`` are
            ignored.
        depth: number of Dense layers (``depth − 1`` hidden layers).
        activation: activation name ("relu", "erf", "gelu", ...) or an ntkit activation.
        W_std, b_std: weight and bias standard deviations.
        parameterization: "ntk" (JGH) or "standard".
        width: declared width of the hidden layers, an integer >= 1 (default 512). Used only
            with ``parameterization="standard"``: the NTK-parameterised kernels and every
            NNGP do not depend on it, but the standard-parameterised NTK does, since a Dense
            layer after a hidden layer maps ``Θ' = W_std² Θ + width · Σ + 1`` (see
            :class:`ntkit.Dense`), so the kernel, and with it a finite-``t`` or ridge
            prediction, grows with ``width``.
        t: training time (JGH cost, learning rate 1); ``np.inf`` for the converged solution.
            A finite ``t`` is early stopping.
        diag_reg: ridge, relative to the mean diagonal of the train kernel unless
            ``diag_reg_absolute_scale``.
        solver: "auto" (default): the cost model's path (see the module docstring);
            "direct": form the ``N × N`` train kernel and factorise it. "cg":
            for ``t = inf`` only, solve ``(K + λ I) α = y`` by Nyström-preconditioned
            conjugate gradients over tiled kernel mat-vecs, never holding the train kernel
            (for ``N`` too large for memory); needs ``diag_reg > 0`` and does not support
            ``return_std``.
        cg_tol: relative residual at which CG stops (``solver="cg"``); ``None``: 1e-8 in
            float64, 1e-5 in float32 (predictions are then about that accurate relative to
            ``y``).
        cg_max_iter: most CG iterations; a :class:`~sklearn.exceptions.ConvergenceWarning`
            says when they ran out.
        n_landmarks: Nyström landmarks of the CG preconditioner: more cost
            ``O(N m + m³)`` once and save iterations.
        dtype: "float64" (default) or "float32".
        device: torch device for the kernels (e.g. "cuda"); default CPU.
        input_shape: ``None`` (rows are feature vectors) or the shape of one example, e.g.
            ``(C, H, W)`` for a convolutional ``net``: ``X`` stays flat, ``(N, C·H·W)``, and
            each row is reshaped to it before the kernel; ``prod(input_shape)`` must equal
            the number of features.
        memory_budget: most bytes of RAM ``solver="auto"`` may plan for (the free RAM caps
            it anyway).
        store: a directory where ``solver="auto"`` may keep an out-of-core train kernel
            (and resume it); ``None``: never on disk.

    Attributes:
        net_: the network used.
        ridge_: the absolute ridge λ.
        n_iter_: conjugate-gradient iterations (CG paths; ``None`` otherwise).
        solver_path_: the path that fitted (``"direct"``, ``"cg"``, ``"dense_cg"``,
            ``"disk_cg"``, ``"matrix_free_cg"``).
        solve_plan_: the cost model's plan (``solver="auto"`` with ``t = inf`` and
            ``diag_reg > 0``; else ``None``).
        n_features_in_: number of input features seen by ``fit``.
    """

    _get = "ntk"


class NNGPRegressor(_InfiniteNetworkRegressor):
    """Kernel regression with the NNGP: the posterior mean of the infinitely wide network's
    Gaussian process (``t = inf``), or gradient flow of the readout layer alone for finite
    ``t``. ``predict(X, return_std=True)`` gives the GP posterior standard deviation (noise
    variance ``λ``) at ``t = inf``. Parameters as :class:`NTKRegressor`.
    """

    _get = "nngp"


def _input_scale_hint(X: np.ndarray) -> str:
    """A sentence for errors about the train kernel: the largest feature scale of the
    ``(N, d)`` training inputs and, when it is large, the remedy.

    Pre-activation variances grow with the squared input scale; the kernels of smooth
    activations (tanh, sigmoid, softplus, SiLU, ``Elementwise``) are integrals whose
    numerical error grows with that variance and can make the train kernel indefinite.
    """
    with np.errstate(over="ignore"):
        rms = np.sqrt(np.mean(np.square(X), axis=0))
    column = int(np.argmax(rms))
    scale = float(rms[column])
    text = (f"The largest feature scale (root mean square over the {X.shape[0]} training "
            f"rows) is {scale:.3g}, in column {column}.")
    if not scale <= _LARGE_FEATURE_SCALE:  # also catches inf
        text += (" Features this large give large pre-activation variances, at which the "
                 "kernels of smooth activations (tanh, sigmoid, softplus, silu, Elementwise) "
                 "lose accuracy and can come out indefinite: standardise the inputs, e.g. "
                 "make_pipeline(StandardScaler(), estimator).")
    return text
