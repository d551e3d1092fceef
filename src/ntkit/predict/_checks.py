"""Input checks and the shared set-up of every predictor in :mod:`ntkit.predict`.

Each public entry point validates its arguments here once; the predictors then work on the
validated tensors. The set-up every trained flow shares (the learning-rate check, the ridge
rule and the cost normalisation) is :func:`check_training` plus :func:`prepare_training`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from .._validation import (Tensorish, as_tensor, check_choice, check_nonnegative,
                           finite_max_abs)

COSTS = ("jgh", "nt")


# ------------------------------------------------------------------------------ kernels
def check_finite_kernel(t: torch.Tensor, name: str) -> float:
    """Raise if ``t`` holds NaN or inf; return ``max |t|``."""
    scale = finite_max_abs(t)
    if scale is not None:
        return scale
    bad = (~torch.isfinite(t)).sum().item()
    raise ValueError(f"{name} has {bad} NaN or infinite entries; kernels must be finite "
                     "(check the inputs and the kernel computation).")


def symmetry_tolerance(scale: float, dtype: torch.dtype) -> float:
    """Largest ``max |K − Kᵀ|`` accepted for a train kernel whose ``max |K|`` is ``scale``.

    An accepted ``K`` is symmetrised (:func:`as_square_kernel`), so its asymmetry costs no
    accuracy: the check exists to catch a wrong matrix (say a square test-train kernel),
    whose asymmetry is of the order of ``max |K|``. A kernel whose entries ``(i, j)`` and
    ``(j, i)`` were summed in different orders over ``P`` terms (features, parameters) is
    asymmetric by about ``sqrt(P) · eps · max |K|``; ``sqrt(eps) · max |K|`` lies above that
    for any ``P < 1 / eps`` (8e6 terms in float32, 4e15 in float64) and orders of magnitude
    below a wrong matrix. In float64 it is 1.5e-8, the tolerance used before; in float32 it
    no longer refuses kernels whose only asymmetry is rounding (1e-8 is below float32's eps).
    """
    return max(scale, 1e-300) * float(np.sqrt(torch.finfo(dtype).eps))


def as_square_kernel(k: Tensorish, name: str) -> torch.Tensor:
    """The ``(N, N)`` per-output train kernel as a floating tensor: finite, and symmetric to
    :func:`symmetry_tolerance` (then made exactly symmetric)."""
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
    scale = check_finite_kernel(t, name)
    asym = float((t - t.T).abs_().max())
    if asym > symmetry_tolerance(scale, t.dtype):
        raise ValueError(f"{name} is not symmetric (max |K − Kᵀ| = {asym:.3e}, max |K| = "
                         f"{scale:.3e}); a train-train kernel must be symmetric.")
    if asym > 0:
        # One symmetric K for every use: a Cholesky factor reads one triangle only.
        t = 0.5 * (t + t.T)
    return t


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
def as_targets(y: Tensorish, name: str, n: int, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
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
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values.")
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
def check_learning_rate(learning_rate: float) -> float:
    """``learning_rate`` as a float > 0."""
    lr = check_nonnegative(learning_rate, "learning_rate")
    if lr == 0:
        raise ValueError("learning_rate must be > 0.")
    return lr


def check_training(cost: str, learning_rate: float, diag_reg: float) -> tuple[float, float]:
    """The scalar arguments every trained flow takes: ``(learning_rate, diag_reg)``."""
    check_choice(cost, "cost", COSTS)
    return check_learning_rate(learning_rate), check_nonnegative(diag_reg, "diag_reg")


def regularize(k: torch.Tensor, diag_reg: float, absolute: bool) -> torch.Tensor:
    """The ridge rule (as neural-tangents): ``K + diag_reg · s · I`` with ``s = mean(diag K)``,
    or ``s = 1`` when ``absolute``. ``K`` itself is returned when ``diag_reg = 0``."""
    if diag_reg == 0:
        return k
    scale = 1.0 if absolute else float(torch.diagonal(k).mean())
    out = k.clone()  # the ridge on the diagonal only, without an (N, N) identity
    out.diagonal().add_(diag_reg * scale)
    return out


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
    y, squeeze = as_targets(y_train, "y_train", k.shape[0], k)
    norm = normalization(cost, *y.shape)
    return Training(regularize(k, diag_reg, absolute), y, squeeze, norm, learning_rate / norm)
