"""GP inference: the exact Bayesian posterior of a Gaussian-process prior
(``gp_inference``)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._validation import (Tensorish, as_square_kernel, as_targets, check_nonnegative,
                           regularize)
from ._checks import as_cross_kernel, as_kernel_block
from ._spectral import eigh, require_invertible


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
    k = as_square_kernel(k_train_train, "k_train_train")
    y, squeeze = as_targets(y_train, "y_train", k.shape[0], dtype=k.dtype, device=k.device)
    k_tx = as_cross_kernel(k_test_train, "k_test_train", k.shape[0], k)
    k = regularize(k, reg, diag_reg_absolute_scale)
    evals, evecs = eigh(k)
    require_invertible(evals, "k_train_train", reg, "GP inference")
    left = k_tx @ evecs
    proj = left / evals  # K_*x V Λ⁻¹
    mean = proj @ (evecs.T @ y)
    cov = None
    if k_test_test is not None:
        m = k_tx.shape[0]
        k_tt = as_kernel_block(k_test_test, "k_test_test", ((m, m), (m,)), k)
        if k_tt.ndim == 1:
            cov = k_tt - (proj * left).sum(dim=1)
        else:
            cov = k_tt - proj @ left.T
            cov = 0.5 * (cov + cov.T)
    return GPPosterior(mean[:, 0] if squeeze else mean, cov)
