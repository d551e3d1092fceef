"""Input checks and the shared set-up of every predictor in :mod:`ntkit.predict`.

Each public entry point validates its arguments here once; the predictors then work on the
validated tensors. The checks every part of ntkit shares (the square train kernel and its
symmetry tolerance, the ridge rule, the learning rate) live in :mod:`ntkit._validation`;
this module adds what only the predictors need (targets, times, test blocks) and the set-up
every trained flow shares: :func:`check_training` plus :func:`prepare_training`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from .._validation import (Tensorish, as_targets, as_tensor, check_choice, check_finite,
                           check_finite_kernel, check_learning_rate, check_nonnegative,
                           regularize)

COSTS = ("jgh", "nt")


# ------------------------------------------------------------------------------ kernels
def as_cross_kernel(k: Tensorish, name: str, n_train: int, like: torch.Tensor) -> torch.Tensor:
    """An ``(M, n_train)`` kernel between test rows and training columns, finite."""
    t = as_tensor(k, name, dtype=like.dtype, device=like.device)
    if t.ndim != 2 or t.shape[1] != n_train:
        raise ValueError(f"{name} must have shape (M, {n_train}) (test rows, train columns); "
                         f"got {tuple(t.shape)}.")
    check_finite_kernel(t, name)
    return t


def as_kernel_block(k: Tensorish, name: str, shapes: tuple[tuple[int, ...], ...],
                    like: torch.Tensor) -> torch.Tensor:
    """A finite kernel block of one of ``shapes`` (say ``(M, M)`` for a covariance or its
    diagonal ``(M,)`` for variances), in ``like``'s dtype and device."""
    t = as_tensor(k, name, dtype=like.dtype, device=like.device)
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}; got "
                         f"{tuple(t.shape)}.")
    check_finite_kernel(t, name)
    return t


# ----------------------------------------------------------------------- outputs, times
def as_initial(f0: Tensorish | None, name: str, shape: tuple[int, int],
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
    check_finite(t, name)
    return t


def as_test_problem(k_test_train: Tensorish | None, fx_test_0: Tensorish | None,
                    y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(k_test_train (M, N), fx_test_0 (M, O))`` for a prediction on test inputs, or
    ``None`` without ``k_test_train`` (then ``fx_test_0`` must be ``None`` too)."""
    if k_test_train is None:
        if fx_test_0 is not None:
            raise ValueError("fx_test_0 was given without k_test_train; pass the (M, N) "
                             "test-train kernel to predict test outputs.")
        return None
    n, n_out = y.shape
    k_tx = as_cross_kernel(k_test_train, "k_test_train", n, y)
    return k_tx, as_initial(fx_test_0, "fx_test_0", (k_tx.shape[0], n_out), y)


def as_times(t: Any, *, discrete: bool) -> tuple[torch.Tensor, bool]:
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


def finish(out: torch.Tensor, scalar: bool, squeeze: bool) -> torch.Tensor:
    """Drop the output axis of 1-D targets and the time axis of a scalar ``t``."""
    if squeeze:
        out = out[..., 0]
    return out[0] if scalar else out


def check_result(out: torch.Tensor, owner: Any, what: str) -> None:
    """Raise if ``out`` is not finite; ``owner.evals`` (the spectrum, for the message) is only
    looked at then, so a Cholesky-only predictor does not need an eigendecomposition."""
    if not bool(torch.isfinite(out).all()):
        evals = owner.evals
        raise ValueError(f"{what} overflowed to inf/NaN: the train kernel's eigenvalues span "
                         f"[{float(evals[0]):.3e}, {float(evals[-1]):.3e}]; negative eigenvalues "
                         "(a non-PSD kernel) or a learning rate above max_learning_rate make "
                         "the dynamics diverge. Use a PSD kernel, a smaller learning_rate or "
                         "diag_reg.")


# ---------------------------------------------------------------- the shared training set-up
def check_training(cost: str, learning_rate: float, diag_reg: float) -> tuple[float, float]:
    """The scalar arguments every trained flow takes: ``(learning_rate, diag_reg)``."""
    check_choice(cost, "cost", COSTS)
    return check_learning_rate(learning_rate), check_nonnegative(diag_reg, "diag_reg")


def normalization(cost: str, n: int, n_out: int) -> int:
    """What the summed squared error is divided by: ``N`` (``"jgh"``) or ``N · n_out``."""
    return n if cost == "jgh" else n * n_out


class Training(NamedTuple):
    """A validated training problem: the regularised kernel ``k`` ``(N, N)``, the targets
    ``y`` ``(N, O)``, whether they were 1-D (``squeeze``), the cost's normaliser ``norm``
    (:func:`normalization`) and the rate ``learning_rate / norm`` of the flow."""

    k: torch.Tensor
    y: torch.Tensor
    squeeze: bool
    norm: int
    rate: float


def prepare_training(k: torch.Tensor, y_train: Tensorish, *, learning_rate: float, cost: str,
                     diag_reg: float, absolute: bool) -> Training:
    """Validate the targets against a validated kernel ``k``, add the ridge and normalise."""
    y, squeeze = as_targets(y_train, "y_train", k.shape[0], dtype=k.dtype, device=k.device)
    return training(k, y, squeeze, learning_rate=learning_rate, cost=cost, diag_reg=diag_reg,
                    absolute=absolute)


def training(k: torch.Tensor, y: torch.Tensor, squeeze: bool, *, learning_rate: float,
             cost: str, diag_reg: float, absolute: bool) -> Training:
    """:class:`Training` from validated arguments (``k`` from ``as_square_kernel``, ``y``
    ``(N, O)`` finite in ``k``'s dtype, the scalars from :func:`check_training`)."""
    norm = normalization(cost, *y.shape)
    return Training(regularize(k, diag_reg, absolute), y, squeeze, norm, learning_rate / norm)
