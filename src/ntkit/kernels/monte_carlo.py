"""Monte Carlo estimates of the kernels: empirical NNGP/NTK averaged over initialisations.

As the width grows, the empirical kernels of an ntkit network concentrate on the
infinite-width ``net.kernel(...)`` (JGH Theorems 1-2); this module measures that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validation import (
    Tensorish,
    _describe_rows,
    as_input_pair,
    check_positive_int,
    finite_max_abs,
    resolve_dtype,
)
from ..layers.base import Layer
from .analytic import normalize_get
from .empirical import empirical_nngp, empirical_ntk


@dataclass
class MonteCarloKernels:
    """Sample means and standard errors of empirical kernels over ``n_samples`` networks.

    ``nngp``/``ntk`` are ``(N1, N2)`` means (``None`` when not requested); ``nngp_stderr``/
    ``ntk_stderr`` are the elementwise standard errors of those means,
    ``std(ddof=1) / sqrt(n_samples)``.
    """

    nngp: torch.Tensor | None
    ntk: torch.Tensor | None
    nngp_stderr: torch.Tensor | None
    ntk_stderr: torch.Tensor | None
    n_samples: int

    def __getitem__(self, name: str) -> torch.Tensor:
        value = getattr(self, name, None) if name in ("nngp", "ntk") else None
        if value is None:
            raise KeyError(f"{name!r} was not computed; pass get=({name!r}, ...)")
        return value


def _check_finite_estimate(t: torch.Tensor, name: str, symmetric: bool) -> None:
    """Raise, naming the rows, if an estimate is not finite (the samples were checked, so
    this guards the accumulation itself)."""
    if finite_max_abs(t) is not None:
        return
    bad = ~torch.isfinite(t)
    rows = _describe_rows(bad.any(dim=1).nonzero().flatten())
    cols = "" if symmetric else (
        f" against rows [{_describe_rows(bad.any(dim=0).nonzero().flatten())}] of x2")
    raise ValueError(f"monte_carlo_kernel: {name} overflowed in rows [{rows}] of x1{cols}; "
                     "rescale the inputs (e.g. standardise the features).")


def monte_carlo_kernel(net: Layer, x1: Tensorish, x2: Tensorish | None = None, *,
                       n_samples: int, seed: int = 0,
                       get: str | Sequence[str] = ("nngp", "ntk"), method: str = "auto",
                       dtype: Any = None, batch_size: int | None = None,
                       memory_budget: int | None = None) -> MonteCarloKernels:
    """Average the empirical kernels of ``n_samples`` independent initialisations of ``net``.

    For sample ``s`` the network ``net.module(d, seed=...)`` (seeds drawn from ``seed``;
    ``in_shape=(C, H, W)`` for images) gives

    * ``nngp``: the last hidden layer's post-activation features ``a`` scaled as in the NTK
      parameterization, ``W_std² ⟨a(x), a(x')⟩ / n + b_std²`` with the output layer's
      ``W_std``, ``b_std`` — the covariance of each output given the features, i.e. the
      output-layer covariance averaged over outputs (see :func:`empirical_nngp`);
    * ``ntk``: ``empirical_ntk(module, x1, x2, output="trace")``, the per-output NTK.

    Their means estimate the expectations over initialisation, which converge to
    ``net.kernel(x1, x2)`` as the width grows (for one hidden layer they are equal at every
    width).

    Args:
        net: an ntkit architecture (``nk.mlp(...)``, ``nk.serial(...)``).
        x1, x2: ``(N1, d)`` and ``(N2, d)`` inputs (``x2=None``: ``x2 = x1``), or images
            ``(N, C, H, W)`` / sequences ``(N, C, L)`` for a convolutional network (the
            modules are built with ``in_shape=x1.shape[1:]``).
        n_samples: number of initialisations, at least 2 (for a standard error).
        seed: base seed; the same seed gives the same estimate.
        get: ``"nngp"``, ``"ntk"`` or both.
        method, batch_size, memory_budget: passed to :func:`empirical_ntk`.
        dtype: parameter and kernel dtype (default float64).
    Returns:
        :class:`MonteCarloKernels`, on ``x1``'s device. The standard errors make z-scores
        against a reference kernel; with a few hundred samples such a check detects kernel
        errors of a few percent, so it is a sanity check of convergence, not a precision
        test (ntkit's own tests pin the kernels against independent references instead).
    Raises:
        ValueError: naming the rows, if a sample kernel overflows (inputs too large for
            ``dtype``).
    """
    if not isinstance(net, Layer):
        raise ValueError(f"net must be an ntkit architecture (nk.mlp, nk.serial, ...); got "
                         f"{type(net).__name__}. For a torch module use empirical_ntk.")
    n_samples = check_positive_int(n_samples, "n_samples", minimum=2)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer; got {seed!r}.")
    names = normalize_get(get)
    dtype = resolve_dtype(dtype)
    t1, t2 = as_input_pair(x1, x2, dtype=dtype)
    seeds = np.random.SeedSequence(int(seed)).generate_state(n_samples, dtype=np.uint32)

    # Welford's running mean and sum of squared deviations, on values divided entrywise by a
    # power of two taken from the first sample: an exact rescaling that keeps the squares
    # finite for kernels up to the dtype's maximum and away from underflow for tiny entries
    # (a plain sum of squares overflows above ~1e154 in float64, giving NaN standard errors
    # with finite means; kernel entries of one call can span 1e200 when a row is large),
    # and no cancellation.
    means: dict[str, torch.Tensor] = {}
    m2s: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for count, s in enumerate(seeds, start=1):
        module = (net.module(t1.shape[1], seed=int(s), dtype=dtype, device=t1.device)
                  if t1.dim() == 2 else
                  net.module(in_shape=tuple(t1.shape[1:]), seed=int(s), dtype=dtype,
                             device=t1.device))
        values = {}
        # Both raise, naming the rows, if a sample overflows.
        if "nngp" in names:
            values["nngp"] = empirical_nngp(module, t1, t2, batch_size=batch_size)
        if "ntk" in names:
            values["ntk"] = empirical_ntk(module, t1, t2, method=method, output="trace",
                                          batch_size=batch_size, memory_budget=memory_budget)
        for k, v in values.items():
            if k not in scales:
                _, exponent = torch.frexp(v)
                scales[k] = torch.ldexp(torch.ones_like(v), exponent)  # 1 where v == 0
            v = v / scales[k]
            if k not in means:
                means[k], m2s[k] = v.clone(), torch.zeros_like(v)
                continue
            delta = v - means[k]
            means[k].add_(delta, alpha=1.0 / count)
            m2s[k].addcmul_(delta, v - means[k])

    result: dict[str, torch.Tensor | None] = {}
    for k in ("nngp", "ntk"):
        if k not in means:
            result[k], result[k + "_stderr"] = None, None
            continue
        var = m2s[k].clamp_(min=0) / (n_samples - 1)
        result[k] = means[k] * scales[k]
        result[k + "_stderr"] = torch.sqrt(var / n_samples) * scales[k]
        for name in (k, k + "_stderr"):
            _check_finite_estimate(result[name], name, t2 is None)
    return MonteCarloKernels(result["nngp"], result["ntk"], result["nngp_stderr"],
                             result["ntk_stderr"], n_samples)
