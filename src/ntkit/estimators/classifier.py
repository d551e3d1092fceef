"""Classification with an infinitely wide network: :class:`NTKClassifier` (the conventions
are those of :mod:`ntkit.estimators.kernel_machines`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d, validate_data

from .._validation import UNSET, check_choice, check_get_renamed, resolve_ridge
from ..layers.base import Layer
from ..predict._ode import flow_predictor
from .kernel_machines import (
    _CG_MAX_ITER,
    _DEFAULT_WIDTH,
    _SOLVERS,
    _check_time,
    _InfiniteNetworkBase,
    _input_scale_hint,
)

_STIFF_SOLVER_MAX_SIZE = 2000  # n_train * n_classes up to which the flow uses LSODA


class NTKClassifier(ClassifierMixin, _InfiniteNetworkBase):
    """Classification with an infinitely wide network's NTK (or NNGP).

    ``loss="mse"`` (default) regresses one-hot targets with the closed form of
    :class:`NTKRegressor` and predicts the argmax of the ``n_classes`` outputs.
    ``loss="cross_entropy"`` trains the outputs with softmax cross-entropy by the kernel
    gradient flow ``df(X)/dt = −(1/N) Θ (softmax(f(X)) − Y)`` from ``f ≡ 0`` to a finite time
    ``t`` (required: on separable data the logits grow without bound), integrated by
    ``ntkit.predict.gradient_flow`` with LSODA and the exact Jacobian when
    ``N · n_classes <= 2000`` and by adaptive Runge–Kutta (RK45) otherwise (standardise the
    inputs: its step count grows with the kernel's scale); a test point gets
    ``f_t(x) = k(x, X) A_t`` with ``A_t = −(1/N) ∫₀ᵗ (softmax(f_s(X)) − Y) ds``.

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
        get: the kernel, "ntk" (default) or "nngp" (as in ``net.kernel(..., get=)``).
        loss: "mse" or "cross_entropy".
        solver: "auto" (default), "direct" or "cg" (``loss="mse"`` and ``t = inf``
            only), as in :class:`NTKRegressor`; ``loss="cross_entropy"`` always fits
            directly.
        kernel: deprecated former name of ``get`` (``None``: not given); a
            ``DeprecationWarning`` at ``fit``.
        Others (``input_shape``, ``memory_budget``, ``store``, ...) as
            :class:`NTKRegressor`.

    Attributes:
        classes_: the class labels, in the order of the outputs.
        n_flow_evaluations_: right-hand-side evaluations of the cross-entropy flow.
        net_, ridge_, n_iter_: as :class:`NTKRegressor`.
    """

    def __init__(self, net: Layer | None = None, *, depth: int = 3, activation: Any = "relu",
                 W_std: float = 1.0, b_std: float = 0.1, parameterization: str = "ntk",
                 width: int = _DEFAULT_WIDTH, t: float = np.inf, diag_reg: float = 0.0,
                 diag_reg_absolute_scale: bool = False, get: str = "ntk",
                 loss: str = "mse", solver: str = "auto", cg_tol: float | None = None,
                 cg_max_iter: int = _CG_MAX_ITER, n_landmarks: int = 1000,
                 dtype: str = "float64", device: str | None = None,
                 kernel: str | None = None, input_shape: tuple[int, ...] | None = None,
                 memory_budget: int | None = None, store: str | None = None):
        super().__init__(net, depth=depth, activation=activation, W_std=W_std, b_std=b_std,
                         parameterization=parameterization, width=width, t=t,
                         diag_reg=diag_reg,
                         diag_reg_absolute_scale=diag_reg_absolute_scale, solver=solver,
                         cg_tol=cg_tol, cg_max_iter=cg_max_iter, n_landmarks=n_landmarks,
                         dtype=dtype, device=device, input_shape=input_shape,
                         memory_budget=memory_budget, store=store)
        self.get = get
        self.loss = loss
        self.kernel = kernel

    def fit(self, X, y) -> NTKClassifier:
        """Fit on ``X`` of shape ``(N, d)`` and class labels ``y`` of shape ``(N,)``."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        y = column_or_1d(y, warn=True)
        # sklearn stores constructor arguments as given: None marks kernel= as not passed.
        self._get = check_get_renamed(self.get, UNSET if self.kernel is None else self.kernel,
                                      old="kernel", where="NTKClassifier")
        check_choice(self.loss, "loss", ("mse", "cross_entropy"))
        self.classes_, y_index = np.unique(y, return_inverse=True)
        Y = np.eye(len(self.classes_))[y_index]
        if self.loss == "mse":
            self._fit_mse(X, Y)
        else:
            if check_choice(self.solver, "solver", _SOLVERS) == "cg":
                raise ValueError("solver='cg' solves the t = inf linear system of "
                                 "loss='mse'; loss='cross_entropy' needs solver='direct'.")
            if math.isinf(_check_time(self.t)):
                raise ValueError("loss='cross_entropy' needs a finite training time t (the "
                                 "logits diverge as t -> inf on separable data); e.g. t=100.")
            self._fit_cross_entropy(X, Y)
        return self

    def _fit_cross_entropy(self, X: np.ndarray, Y: np.ndarray) -> None:
        self._check_params()
        Xt = self._tensor(X)
        n, c = Y.shape
        # Large kernel values (unscaled inputs) make the flow stiff; for small problems an
        # implicit-capable method with the exact Jacobian keeps the step count low. The
        # (n c)² Jacobian is too big beyond that, and an explicit Runge–Kutta is used (its
        # cost grows with the kernel's scale: standardise the inputs).
        small = n * c <= _STIFF_SOLVER_MAX_SIZE
        try:
            theta = self._kernel(Xt, None, self._get)  # refuses a kernel that overflows
            self.ridge_ = resolve_ridge(self.diag_reg, theta.diagonal(),
                                        self.diag_reg_absolute_scale)
            flow = flow_predictor("cross_entropy", theta, self._tensor(Y, inputs=False),
                                  learning_rate=1.0,
                                  cost="jgh", method="LSODA" if small else "RK45", rtol=1e-8,
                                  atol=1e-10, diag_reg=self.ridge_, absolute=True)
            del theta
            result = flow.dual_coefficients(self._t)
        except ValueError as err:  # an overflowing or indefinite train kernel
            raise ValueError(f"{err} {_input_scale_hint(X)}") from err
        self._X_train = Xt
        self._coef = result.coef  # the train logits are f = Θ A: A_t determines everything
        self.n_flow_evaluations_ = result.n_evaluations

    def _outputs(self, X) -> np.ndarray:
        X = self._validate_predict_X(X)
        return self._predict_tensors(X)[0].cpu().numpy()

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
