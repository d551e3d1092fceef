"""Activations whose dual is computed by quadrature: ``Elementwise(fn)`` and the named
smooth functions Tanh, Sigmoid, Softplus and SiLU (no closed-form dual exists for them)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..._validation import check_positive_int
from .protocol import Activation
from .quadrature import (MAX_HERMITE_DEGREE, estimate_error, hermite_dual, quadrature_dual,
                         quadrature_mean)

Function = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, init=False, repr=False)
class Elementwise(Activation):
    """Any torch-differentiable scalar function ``fn``, with its dual by quadrature.

    Writes ``u = s1 z1``, ``v = s2 (ρ z1 + sqrt(1−ρ²) z2)`` and integrates over z1 and, given
    z1, over z2 with rules chosen per kernel entry from the pre-activation scales (see
    :mod:`ntkit.layers.activations.quadrature`): a trapezoid grid for integrands smooth on
    the Gaussian's scale, and Gauss–Legendre panels graded towards the activation's
    transition when the standard deviation is large (a saturated tanh). The rules are
    designed for functions analytic near the real axis except within ``smoothness`` of it
    (kinks and jumps at 0 are break points of the rule and also integrate accurately); for a
    user-supplied ``fn`` the error is estimated on a sample of entries by repeating them
    with every step halved, and a warning gives the number when it exceeds 1e-8 relative.

    Args:
        fn: φ, elementwise on tensors (stored as the field ``function``).
        derivative: φ' (default: autograd of ``fn``; stored as ``derivative_function``).
        degree: ``None`` (default) for the adaptive rule; an int selects the old fixed
            ``degree x degree`` Gauss–Hermite rule (exact for polynomials of degree
            < 2·degree; inaccurate for saturating functions at large variance).
        smoothness: distance of φ's nearest complex singularity from the real axis, in
            units of φ's argument (π/2 for tanh); smaller is safer and slower. Default 1.

    Equal (and equally hashed) when the class, the function and derivative objects (by
    identity) and the numbers are equal.

    Cost per pair and layer: about 60×60 evaluations of φ and φ' at pre-activation variances
    up to ~2, a few times more in the saturated regime.
    """

    function: Function
    derivative_function: Function | None = None
    degree: int | None = None
    smoothness: float = 1.0
    _certified = False  # built-in subclasses are verified by tests; no run-time estimate

    def __init__(self, fn: Function, *, degree: int | None = None,
                 derivative: Function | None = None, smoothness: float | None = None):
        if isinstance(fn, type):
            raise ValueError(f"Elementwise needs a function; got the class {fn.__name__}. Pass "
                             f"an instance ({fn.__name__}()) or a function.")
        if not callable(fn):
            raise ValueError(f"Elementwise needs a callable fn; got {fn!r}.")
        if derivative is not None and not callable(derivative):
            raise ValueError(f"Elementwise derivative must be callable or None; got "
                             f"{derivative!r}.")
        if degree is not None:
            degree = check_positive_int(degree, "degree")
            if degree > MAX_HERMITE_DEGREE:
                raise ValueError(f"degree must be at most {MAX_HERMITE_DEGREE} (the fixed "
                                 "Gauss-Hermite rule's weights underflow beyond it); got "
                                 f"{degree}. degree=None (the default) selects the adaptive "
                                 "rule, accurate at every variance.")
        if smoothness is None:
            smoothness = 1.0
        elif (isinstance(smoothness, bool) or not isinstance(smoothness, (int, float))
              or not 0 < smoothness < math.inf):
            raise ValueError(f"Elementwise smoothness must be a positive number; got "
                             f"{smoothness!r}.")
        object.__setattr__(self, "function", fn)
        object.__setattr__(self, "derivative_function", derivative)
        object.__setattr__(self, "degree", degree)
        object.__setattr__(self, "smoothness", float(smoothness))

    @property
    def uses_quadrature(self) -> bool:
        return True

    def fn(self, x):
        return self.function(x)

    def derivative(self, x):
        if self.derivative_function is not None:
            return self.derivative_function(x)
        return super().derivative(x)

    def _values(self, x: torch.Tensor, need_dot: bool):
        """φ(x) and, if asked, φ'(x) (one autograd pass when no derivative is given).

        With ``x`` part of an autograd graph, φ' is built with ``create_graph`` so the dual
        stays differentiable.
        """
        if not need_dot:
            return self.function(x), None
        if self.derivative_function is not None:
            return self.function(x), self.derivative_function(x)
        if torch.is_grad_enabled() and x.requires_grad:
            out = self.function(x)
            (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
            return out, grad
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = self.function(leaf)
            (grad,) = torch.autograd.grad(out.sum(), leaf)
        return out.detach(), grad

    def dual(self, cov, var1, var2, need_dot=True):
        if self.degree is not None:
            return hermite_dual(self._values, self.degree, cov, var1, var2, need_dot)
        nngp, dot = quadrature_dual(self._values, self.smoothness, cov, var1, var2, need_dot)
        if not self._certified:
            self._check_error(cov, var1, var2, nngp, dot)
        return nngp, dot

    def mean(self, var):
        """``E[φ(u)]``, u ~ N(0, var), by :func:`quadrature_mean` (the dual's rule family).

        For a user-supplied ``fn`` the rule is repeated with every step halved, and a
        warning gives the difference when it exceeds the dtype's tolerance (relative to
        ``sqrt(E[φ²])``, the scale LayerNorm compares the mean with).
        """
        mean = quadrature_mean(self._values, self.smoothness, var, self.degree)
        if not self._certified and self.degree is None:
            with torch.no_grad():
                finer = quadrature_mean(self._values, self.smoothness, var.detach(), finer=2)
                square = quadrature_mean(lambda x, _: (self.function(x) ** 2, None),
                                         self.smoothness, var.detach())
                scale = torch.sqrt(square.abs()).clamp(min=torch.finfo(var.dtype).tiny)
                err = float(((mean.detach() - finer).abs() / scale).max()) if var.numel() else 0.0
            tol = 1e-8 if var.dtype == torch.float64 else 1e-4
            if not err <= tol:
                warnings.warn(
                    f"{self!r}: the quadrature error of its mean E[φ(u)] (which LayerNorm "
                    f"subtracts) is about {err:.1e} relative; the function is not smooth "
                    "enough on the Gaussian's scale (a kink or jump, or fast oscillation). "
                    "Use a closed-form layer where one exists, pass smoothness= smaller than "
                    "the width of its transition, or rescale the inputs.",
                    RuntimeWarning, stacklevel=4)
        return mean

    def _check_error(self, cov, var1, var2, nngp, dot):
        """Warn when the estimated quadrature error exceeds the dtype's tolerance."""
        err, largest = estimate_error(self._values, self.smoothness, cov, var1, var2, nngp, dot)
        tol = 1e-8 if cov.dtype == torch.float64 else 1e-4
        if not err <= tol:  # NaN warns too
            warnings.warn(
                f"{self!r}: the quadrature error of its dual is about {err:.1e} relative "
                f"(estimated by halving every step, at pre-activation variances up to "
                f"{largest:.3g}); the function is not smooth enough "
                "on the Gaussian's scale (a kink or jump away from 0, or fast oscillation). "
                "Use a closed-form layer where one exists (nk.ReLU(), nk.LeakyReLU(a), "
                "nk.Abs(), nk.Erf(), nk.GELU(), nk.Sin(...)), pass smoothness= smaller than "
                "the width of its transition, or rescale the inputs.",
                RuntimeWarning, stacklevel=4)

    def __repr__(self):
        extra = "" if self.degree is None else f", degree={self.degree}"
        if self.derivative_function is not None:
            extra += f", derivative={self.derivative_function!r}"
        if self.smoothness != 1.0:
            extra += f", smoothness={self.smoothness}"
        return f"Elementwise({self.function!r}{extra})"


def _softplus_exact(x: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(x, torch.zeros_like(x))


@dataclass(frozen=True, init=False, repr=False)
class _BuiltinSmooth(Elementwise):
    """A named smooth activation with closed-form φ' and a known singularity distance.

    Subclasses set ``_forward`` (φ), ``_smoothness`` (the singularity distance) and
    ``_both`` (φ and φ' from shared intermediates). Their only parameter is ``degree``.
    """

    _certified = True
    _smoothness = 1.0

    def __init__(self, degree: int | None = None):
        super().__init__(type(self)._forward, degree=degree, smoothness=type(self)._smoothness)

    @staticmethod
    def _forward(x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _both(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def derivative(self, x):
        return self._both(x)[1]

    def _values(self, x, need_dot):
        if not need_dot:
            return self.function(x), None
        return self._both(x)

    def __reduce__(self):
        return type(self), (self.degree,)

    def __repr__(self):
        cls = type(self).__name__
        return f"{cls}()" if self.degree is None else f"{cls}(degree={self.degree})"


@dataclass(frozen=True, init=False, repr=False)
class Tanh(_BuiltinSmooth):
    """``tanh(x)``; φ' = 1 − tanh². Dual by the adaptive quadrature (poles at ±iπ/2)."""

    _smoothness = math.pi / 2
    _forward = staticmethod(torch.tanh)

    def _both(self, x):
        t = torch.tanh(x)
        return t, 1 - t * t

    def mean(self, var):
        return 0.0  # odd


@dataclass(frozen=True, init=False, repr=False)
class Sigmoid(_BuiltinSmooth):
    """The logistic function ``1 / (1 + e^{-x})``; φ' = σ(1 − σ) (poles at ±iπ)."""

    _smoothness = math.pi
    _forward = staticmethod(torch.sigmoid)

    def _both(self, x):
        s = torch.sigmoid(x)
        return s, s * (1 - s)

    def mean(self, var):
        return torch.full_like(var, 0.5)  # σ(x) − 1/2 is odd


@dataclass(frozen=True, init=False, repr=False)
class Softplus(_BuiltinSmooth):
    """``log(1 + e^x)`` (torch's threshold-free value); φ' = sigmoid (branch points ±iπ)."""

    _smoothness = math.pi
    # torch's F.softplus switches to x above threshold=20, a 2e-9 jump; use the exact value.
    _forward = staticmethod(_softplus_exact)

    def _both(self, x):
        return torch.logaddexp(x, torch.zeros_like(x)), torch.sigmoid(x)


@dataclass(frozen=True, init=False, repr=False)
class SiLU(_BuiltinSmooth):
    """``x·sigmoid(x)`` (Swish); φ' = σ(1 + x(1 − σ)) (poles at ±iπ)."""

    _smoothness = math.pi
    _forward = staticmethod(F.silu)

    def _both(self, x):
        s = torch.sigmoid(x)
        return x * s, s * (1 + x * (1 - s))
