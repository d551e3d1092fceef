"""The infinite ensemble: mean and covariance over random initialisations of infinitely wide
networks trained on the MSE (``ensemble``, ``EnsemblePredictor``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .._validation import (UNSET, Tensorish, as_inputs, as_tensor, check_finite_kernel,
                           check_get_renamed)
from ._checks import as_times, check_result, check_training, finish, prepare_training
from ._mse import MSEPredictor


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


def _get_kernel(kernels: Any, get: str, shape: tuple[int, int], what: str) -> torch.Tensor:
    k = getattr(kernels, get, None)
    if k is None:
        raise ValueError(f"the kernel function returned no .{get} for {what}; it must return an "
                         f"object with .{get} when asked for get={get!r}.")
    k = as_tensor(k, f"{what} ({get})")
    if not k.is_floating_point():
        k = k.to(torch.float64)
    if tuple(k.shape) != shape:
        raise ValueError(f"the kernel function returned .{get} of shape {tuple(k.shape)} for "
                         f"{what}; expected {shape} (the per-output kernel).")
    check_finite_kernel(k, f"{what} ({get})")
    return k


@dataclass(frozen=True)
class EnsemblePredictor:
    """Mean and covariance of the infinite ensemble (built by :func:`ensemble`): the MSE flow
    ``flow`` under the trained kernel, with the NNGP ``nngp_train`` as the prior covariance
    of the initial training outputs (see :meth:`MSEPredictor.covariance`)."""

    kernel_fn: KernelFn
    x_train: torch.Tensor
    get: str                   # the trained kernel, "ntk" or "nngp"
    flow: MSEPredictor         # the flow under Θ (or K for "nngp"), regularised
    nngp_train: torch.Tensor   # K on the training inputs
    flow_diagonal: torch.Tensor  # diagonal of the flow's kernel before the ridge, (N,)

    @property
    def kernel(self) -> str:
        """Deprecated name of :attr:`get`."""
        warnings.warn("EnsemblePredictor.kernel is deprecated and will be removed in the next "
                      "release; use EnsemblePredictor.get.", DeprecationWarning, stacklevel=2)
        return self.get

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
        times, scalar = as_times(t, discrete=False)
        self.flow.check_times(times)
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
        get = ("nngp", "ntk") if (compute_cov and self.get == "ntk") else (self.get,)
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
            k_flow_tx = _get_kernel(ks, self.get, (m, n), "k(x_test, x_train)")
            k_nngp_tx = (_get_kernel(ks, "nngp", (m, n), "k(x_test, x_train)")
                         if "nngp" in get else None)
        like = self.flow.y_train
        k_flow_tx = k_flow_tx.to(like)
        # μ(t) = Δ(t) y = K_*x α(t), α(t) = K⁻¹ (I − e^{−aKt}) y: the flow from f = 0.
        mean = k_flow_tx @ self.flow.alpha(times, torch.zeros_like(like))
        check_result(mean, self.flow, "The ensemble mean")
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
        return EnsemblePrediction(finish(mean, scalar, self.flow.squeeze), cov)


def ensemble(net_or_kernel_fn: Any, x_train: Tensorish, y_train: Tensorish, *,
             get: str = "ntk", learning_rate: float = 1.0, cost: str = "jgh",
             diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
             kernel: str = UNSET) -> EnsemblePredictor:
    """Infinite ensemble of infinitely wide networks trained on the MSE (Lee et al. 2019).

    Over random initialisations, the outputs at time t are Gaussian (per output, i.i.d.
    across outputs) with

    * mean ``μ(t) = Δ(t) y`` where ``Δ(t) = Θ_*x Θ⁻¹ (I − exp(−a Θ t))``;
    * covariance ``Σ(t) = K_** − Δ K_x* − K_*x Δᵀ + Δ K_xx Δᵀ``;

    with ``Θ`` the NTK (``get="ntk"``: all layers trained) or ``Θ = K`` the NNGP
    (``get="nngp"``: only the last layer trained; then ``Σ = K_** − K_*x K⁻¹ (I −
    e^{−2aKt}) K_x*``), ``K`` the NNGP, and ``a = η / N`` (``cost="jgh"``) or
    ``η / (N n_out)`` (``cost="nt"``). At ``t = inf`` the mean is kernel regression
    ``Θ_*x Θ⁻¹ y`` and the variance vanishes on the training points (JGH §IV.3); with
    ``get="nngp"`` and ``diag_reg = 0`` it is the GP posterior (:func:`gp_inference`).
    (``diag_reg`` regularises ``Θ`` only; ``K_xx`` above stays the NNGP. For the ridge as
    observation noise in ``K_xx`` too, use :meth:`MSEPredictor.covariance` directly.)

    Args:
        net_or_kernel_fn: an ntkit ``Layer`` (its analytic ``net.kernel``) or a callable
            ``kernel_fn(x1, x2, get) -> obj`` with ``obj.nngp``/``obj.ntk`` ``(N1, N2)``
            per-output kernels (``get`` is a tuple of names).
        x_train: ``(N, d)``; y_train: ``(N, O)`` or ``(N,)``.
        get: the trained kernel, ``"ntk"`` or ``"nngp"`` (as in ``net.kernel(..., get=)``).
        diag_reg: ridge added to the train-train kernel that drives the flow.
        kernel: deprecated former name of ``get`` (a ``DeprecationWarning``).
    Returns:
        :class:`EnsemblePredictor` ``p(t, x_test=None, compute_cov=True)``.
    """
    get = check_get_renamed(get, kernel, old="kernel", where="ntkit.predict.ensemble")
    lr, reg = check_training(cost, learning_rate, diag_reg)
    source = _kernel_source(net_or_kernel_fn)
    xtr = as_inputs(x_train, "x_train")
    if not xtr.is_floating_point() or xtr.dtype != torch.float64:
        xtr = xtr.to(torch.float64)
    n = xtr.shape[0]
    ks = source(xtr, None, ("nngp", "ntk") if get == "ntk" else ("nngp",))
    nngp = _get_kernel(ks, "nngp", (n, n), "k(x_train, x_train)")
    flow = _get_kernel(ks, "ntk", (n, n), "k(x_train, x_train)") if get == "ntk" else nngp
    setup = prepare_training(flow, y_train, learning_rate=lr, cost=cost, diag_reg=reg,
                             absolute=diag_reg_absolute_scale)
    mse = MSEPredictor(setup.k, setup.y, lr, cost, False, reg, setup.rate, setup.squeeze,
                       name=f"the train-train {get.upper()}")
    return EnsemblePredictor(source, xtr, get, mse, nngp, flow.diagonal().clone())
