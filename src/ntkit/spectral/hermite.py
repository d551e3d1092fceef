"""Hermite coefficients of an activation and its dual (JGH Lemma III.3.1, Thm III.3.2).

With the normalised probabilists' Hermite polynomials ``h_i = He_i / sqrt(i!)`` (orthonormal
under N(0, 1)), an activation expands as ``φ(z) = Σ a_i h_i(z)`` with ``a_i = E[φ(z) h_i(z)]``,
and its dual on unit-variance inputs with correlation ρ is ``μ̂(ρ) = E[φ(u)φ(v)] = Σ a_i² ρ^i``.

By Gneiting's criterion (JGH Thm III.3.2) the dual kernel is strictly positive definite on
every sphere when infinitely many even and infinitely many odd coefficients are non-zero.
Up to a finite degree that can only be *evidence*; :class:`HermiteReport` says so.

The expectations are computed with composite Gauss–Legendre quadrature on ``[−L, L]``
(``L = 2·sqrt(n) + 10``, past where ``h_n`` lives) with 0 a panel boundary, so kinks at 0
(ReLU, Abs, LeakyReLU) cost no accuracy. (Plain Gauss–Hermite nodes converge only
algebraically on a kink, which is why they are not used.)

How many terms the dual needs (measured, ``tests/test_spectral.py``): for 1e-8 on
``|ρ| ≤ 0.9``, ReLU needs degree 68 (36 non-zero terms; its ``a_{2k}²`` decay only like
``k^(-5/2)``, so the tail is governed by ``0.9^n``), Erf degree 25 (13 odd terms). Direct
summation is practical at those sizes; degree 160 gives ~1e-13.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validation import check_positive_int


@dataclass
class HermiteReport:
    """``coefficients``: ``a_0 … a_n``; ``nonzero_even``/``nonzero_odd``: how many of the even
    and odd coefficients up to degree ``n`` exceed ``threshold`` in absolute value."""

    coefficients: np.ndarray
    degree: int
    threshold: float
    nonzero_even: int
    nonzero_odd: int

    def dual(self, rho: Any) -> np.ndarray:
        """``Σ_{i≤n} a_i² ρ^i``: the truncated dual on unit-variance inputs."""
        rho = np.asarray(rho, dtype=np.float64)
        return np.polynomial.polynomial.polyval(rho, self.coefficients ** 2)

    def last_nonzero(self, parity: str) -> int | None:
        """The highest ``"even"`` or ``"odd"`` degree with ``|a_i| > threshold`` (or None)."""
        first = {"even": 0, "odd": 1}[parity]
        idx = [i for i in range(first, self.degree + 1, 2)
               if abs(self.coefficients[i]) > self.threshold]
        return idx[-1] if idx else None

    @property
    def evidence(self) -> str:
        """Gneiting's criterion (JGH Thm III.3.2) as far as degree ``n`` can show it."""
        n_even = self.degree // 2 + 1
        n_odd = (self.degree + 1) // 2
        stops = []
        for parity in ("even", "odd"):
            last = self.last_nonzero(parity)
            top = self.degree if self.degree % 2 == (parity == "odd") else self.degree - 1
            if last is None:
                stops.append(f"no {parity} coefficient is non-zero")
            elif last < top - 2:
                stops.append(f"the {parity} coefficients vanish beyond degree {last}")
        if not stops:
            verdict = ("non-zero even and odd coefficients persist up to the top degree, "
                       "consistent with Gneiting's criterion (infinitely many of both parities), "
                       "under which the dual is strictly positive definite on every sphere")
        else:
            verdict = ("; ".join(stops) + ": consistent with finitely many non-zero coefficients "
                       "of that parity, in which case the dual μ̂ alone is not strictly positive "
                       "definite on every sphere (Gneiting), or with coefficients that decay "
                       "below the threshold (raise n or lower the threshold to tell)")
        return (f"Up to degree {self.degree}: {self.nonzero_even}/{n_even} even and "
                f"{self.nonzero_odd}/{n_odd} odd coefficients are non-zero (|a_i| > "
                f"{self.threshold:g}); {verdict}. This is numerical evidence up to degree "
                f"{self.degree}, not a proof.")

    def __str__(self) -> str:
        return self.evidence


def _as_function(activation: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    from ..layers.activations import Identity, activation_from_name

    if isinstance(activation, str):
        activation = activation_from_name(activation)
    if isinstance(activation, Identity):
        return lambda z: z
    if hasattr(activation, "fn"):
        return activation.fn
    if callable(activation):
        return activation
    raise ValueError(f"activation must be a name, an ntkit activation or a torch function; got "
                     f"{activation!r}.")


def _nodes(n: int, panels_per_unit: int = 8, order: int = 20):
    half = 2.0 * math.sqrt(n) + 10.0
    panels = math.ceil(half * panels_per_unit)
    edges = np.linspace(0.0, half, panels + 1)
    x, w = np.polynomial.legendre.leggauss(order)
    mid = 0.5 * (edges[1:] + edges[:-1])[:, None]
    rad = 0.5 * (edges[1:] - edges[:-1])[:, None]
    pos = (mid + rad * x).ravel()
    wts = (rad * w).ravel()
    z = np.concatenate([-pos[::-1], pos])
    weights = np.concatenate([wts[::-1], wts]) * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return z, weights


def hermite_coefficients(activation: Any, n: int, *, threshold: float = 1e-10) -> HermiteReport:
    """Coefficients ``a_0..a_n`` of ``activation`` in normalised Hermite polynomials.

    Args:
        activation: a name (``"relu"``), an ntkit activation, or a torch function.
        n: the highest degree.
        threshold: ``|a_i|`` above which a coefficient counts as non-zero (the quadrature is
            accurate to about 1e-13 for the activations ntkit ships).
    """
    n = check_positive_int(n, "n", minimum=0)
    fn = _as_function(activation)
    z, w = _nodes(n)
    with torch.no_grad():
        values = fn(torch.as_tensor(z, dtype=torch.float64)).numpy().astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("activation returned non-finite values on [-L, L]; its Hermite "
                         "expansion needs φ(z)² integrable under N(0, 1).")
    weighted = values * w
    coefficients = np.empty(n + 1)
    h_prev, h = np.zeros_like(z), np.ones_like(z)
    for i in range(n + 1):
        coefficients[i] = weighted @ h
        # h_{i+1} = (z h_i − sqrt(i) h_{i−1}) / sqrt(i + 1)
        h_prev, h = h, (z * h - math.sqrt(i) * h_prev) / math.sqrt(i + 1)
    nonzero = np.abs(coefficients) > threshold
    return HermiteReport(coefficients=coefficients, degree=n, threshold=threshold,
                         nonzero_even=int(nonzero[0::2].sum()),
                         nonzero_odd=int(nonzero[1::2].sum()))
