"""Elementwise activations: each owns its forward map, derivative and Gaussian dual.

For a pair of centred Gaussians ``(u, v)`` with covariance ``[[var1, cov], [cov, var2]]``
an activation φ provides its *dual*

    nngp = E[φ(u) φ(v)]        dot = E[φ'(u) φ'(v)]

in closed form where one exists (ReLU family, Abs, Erf, GELU, Sin, Cos) and by
two-dimensional Gauss–Hermite quadrature otherwise (derivative by autograd). The scale
``W_std**2`` and bias ``b_std**2`` belong to the Dense layer that follows, not here.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .._validation import check_positive_int
from .base import Layer, PairKernel

_TWO_PI = 2.0 * math.pi


def _correlation(cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor):
    """Return ``(rho, norm)``: ``norm = sqrt(var1 var2)`` and ``rho = cov / norm`` in [-1, 1].

    ``var1``/``var2`` are a column and a row (full mode) or two diagonals. Forming the product
    before the square root keeps ``norm`` exactly symmetric and makes ``rho`` exactly 1 for
    x = x' (``sqrt(v·v) == v`` in IEEE arithmetic), where arccos is most sensitive.
    Rows with zero variance (a zero input without bias) have ``cov = 0`` and get ``rho = 0``:
    any value works for the NNGP there and 0 is neural-tangents' convention for the
    derivative term.
    """
    # Clamping the zero norms to `tiny` leaves every use of `norm` exact to ~1e-308.
    norm = (var1 * var2).sqrt_().clamp_(min=torch.finfo(cov.dtype).tiny)
    rho = cov / norm
    return rho.clamp_(-1.0, 1.0), norm


class Activation(Layer):
    """An elementwise nonlinearity. Subclasses implement ``fn`` and ``dual``."""

    name: str = "activation"

    def fn(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """φ'(x), by autograd unless a subclass knows it in closed form."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.fn(x).sum(), x)
        return grad

    def dual(self, cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor,
             need_dot: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError  # pragma: no cover - abstract

    def kernel_map(self, k: PairKernel) -> PairKernel:
        if not isinstance(k, PairKernel):
            raise ValueError(f"{self!r} received {len(k)} branches; combine them with "
                             "FanInSum() before an activation.")
        nngp, dot = self.dual(k.cov, k.var1, k.var2, need_dot=k.ntk is not None)
        ntk = None if k.ntk is None else k.ntk * dot
        if k.diagonal:
            return k.replace(cov=nngp, var1=nngp, var2=nngp, ntk=ntk)
        return k.replace(cov=nngp, var1=self.variance(k.var1), var2=self.variance(k.var2),
                         ntk=ntk)

    def variance(self, var: torch.Tensor) -> torch.Tensor:
        """``E[φ(u)²]`` for ``u ~ N(0, var)``: the NNGP dual at ``cov = var1 = var2``.

        An override must equal ``dual(var, var, var)[0]`` bit for bit: the diagonal of a
        symmetric tile goes through ``dual`` and the row variances through this, and the
        next layer's correlation must come out exactly 1 there.
        """
        return self.dual(var, var, var, need_dot=False)[0]

    def build(self, in_dim, generator, dtype, device):
        return ActivationModule(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class ActivationModule(torch.nn.Module):
    """The finite-width forward map of an :class:`Activation` (no parameters)."""

    def __init__(self, activation: Activation):
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation.fn(x)

    def extra_repr(self) -> str:
        return repr(self.activation)


# --------------------------------------------------------------------------- ReLU family
class ABReLU(Activation):
    """``φ(x) = a·min(x, 0) + b·max(x, 0)``; ReLU is (0, 1), LeakyReLU (α, 1), Abs (−1, 1).

    Dual (Cho & Saul arc-cosine kernels, generalised): with θ = arccos ρ,
    ``nngp = (a−b)²/(2π)·sqrt(var1 var2 − cov²) + dot·cov`` and
    ``dot = (a²+b²)/2 − (a−b)² θ/(2π)``.
    """

    name = "abrelu"

    def __init__(self, a: float = 0.0, b: float = 1.0):
        for label, value in (("a", a), ("b", b)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ABReLU slope {label} must be a finite number; got {value!r}.")
        self.a, self.b = float(a), float(b)

    def fn(self, x):
        return self.a * torch.clamp(x, max=0) + self.b * torch.clamp(x, min=0)

    def derivative(self, x):
        return torch.where(x > 0, torch.full_like(x, self.b), torch.full_like(x, self.a))

    def dual(self, cov, var1, var2, need_dot=True):
        a, b = self.a, self.b
        rho, norm = _correlation(cov, var1, var2)
        factor = (a - b) ** 2 / _TWO_PI
        # In place where possible: this is the hot loop of every ReLU-network kernel.
        theta = rho.arccos_()
        sine = torch.sin(theta) if factor else None  # sin θ · norm = sqrt(var1 var2 − cov²)
        dot = theta.mul_(-factor).add_((a * a + b * b) / 2)
        nngp = dot * cov
        if factor:
            # At ρ = 1 the sine term is exactly 0, so the diagonal is dot·cov = variance(var).
            nngp.addcmul_(sine, norm, value=factor)
        return nngp, (dot if need_dot else None)

    def variance(self, var):
        return var * ((self.a * self.a + self.b * self.b) / 2)

    def __repr__(self):
        return f"ABReLU(a={self.a}, b={self.b})"


class ReLU(ABReLU):
    """``max(x, 0)``: the arc-cosine kernel of degree 1 (JGH's activation)."""

    name = "relu"

    def __init__(self):
        super().__init__(0.0, 1.0)

    def fn(self, x):
        return torch.relu(x)

    def __repr__(self):
        return "ReLU()"


class LeakyReLU(ABReLU):
    """``max(x, 0) + alpha·min(x, 0)``."""

    name = "leaky_relu"

    def __init__(self, alpha: float = 0.01):
        super().__init__(alpha, 1.0)
        self.alpha = float(alpha)

    def __repr__(self):
        return f"LeakyReLU(alpha={self.alpha})"


class Abs(ABReLU):
    """``|x|``."""

    name = "abs"

    def __init__(self):
        super().__init__(-1.0, 1.0)

    def fn(self, x):
        return torch.abs(x)

    def __repr__(self):
        return "Abs()"


# --------------------------------------------------------------------------- smooth closed forms
class Erf(Activation):
    """``erf(x)``. Dual (Williams 1997): ``nngp = (2/π) arcsin(2cov / sqrt((1+2var1)(1+2var2)))``,
    ``dot = (4/π) / sqrt((1+2var1)(1+2var2) − 4cov²)``."""

    name = "erf"

    def fn(self, x):
        return torch.erf(x)

    def derivative(self, x):
        return (2.0 / math.sqrt(math.pi)) * torch.exp(-x * x)

    def dual(self, cov, var1, var2, need_dot=True):
        # arcsin argument 2cov/sqrt((1+2var1)(1+2var2)); the square roots cost O(N) per tile
        spread = (1 + 2 * var1) * (1 + 2 * var2)
        arg = (2 * cov).mul_(spread.rsqrt()).clamp_(-1, 1)
        nngp = torch.arcsin(arg).mul_(2 / math.pi)
        dot = None
        if need_dot:
            # (1+2var1)(1+2var2) − 4cov² = (1 − arg²)·spread, and it is >= 1 (so the clamp)
            one = torch.ones((), dtype=arg.dtype, device=arg.device)
            det = torch.addcmul(one, arg, arg, value=-1.0).mul_(spread)
            dot = det.clamp_(min=1.0).rsqrt_().mul_(4 / math.pi)
        return nngp, dot

    def __repr__(self):
        return "Erf()"


class GELU(Activation):
    """``x·Φ(x)`` (exact GELU). Closed-form dual from Tsuchida et al. (arXiv 2002.08517).

    With ``p = var1 var2``, ``q = (1+var1)(1+var2)``, ``δ² = q − cov²`` and
    ``α = arctan2(cov, δ)``:
    ``nngp = cov/4 + [(cov² + p δ²)/(q δ) + cov α] / (2π)``,
    ``dot = 1/4 + α/(2π) + cov/(2π δ)·(1/δ² + (1 − p)/q + 1)``.
    """

    name = "gelu"

    def fn(self, x):
        return F.gelu(x)

    def derivative(self, x):
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return cdf + x * pdf

    def dual(self, cov, var1, var2, need_dot=True):
        p = var1 * var2
        q = (1 + var1) * (1 + var2)
        delta2 = torch.clamp(q - cov * cov, min=torch.finfo(cov.dtype).tiny)
        delta = torch.sqrt(delta2)
        angle = torch.arctan2(cov, delta)
        nngp = 0.25 * cov + ((cov * cov + p * delta2) / (q * delta) + cov * angle) / _TWO_PI
        dot = None
        if need_dot:
            dot = 0.25 + angle / _TWO_PI + cov / (_TWO_PI * delta) * (1 / delta2 + (1 - p) / q + 1)
        return nngp, dot

    def __repr__(self):
        return "GELU()"


class Sin(Activation):
    """``a·sin(b·x + c)``. Dual: with ``s = var1 + var2``,
    ``nngp = a²/2·(e^{b²(cov − s/2)} − cos(2c)·e^{−b²(cov + s/2)})`` and
    ``dot = a²b²/2·(e^{b²(cov − s/2)} + cos(2c)·e^{−b²(cov + s/2)})``."""

    name = "sin"

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0):
        for label, value in (("a", a), ("b", b), ("c", c)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Sin parameter {label} must be a finite number; got {value!r}.")
        self.a, self.b, self.c = float(a), float(b), float(c)

    def fn(self, x):
        return self.a * torch.sin(self.b * x + self.c)

    def derivative(self, x):
        return self.a * self.b * torch.cos(self.b * x + self.c)

    def dual(self, cov, var1, var2, need_dot=True):
        b2 = self.b ** 2
        half_sum = 0.5 * (var1 + var2)
        plus = torch.exp(b2 * (cov - half_sum))
        minus = torch.exp(-b2 * (cov + half_sum)) * math.cos(2 * self.c)
        scale = 0.5 * self.a ** 2
        nngp = scale * (plus - minus)
        dot = scale * b2 * (plus + minus) if need_dot else None
        return nngp, dot

    def __repr__(self):
        return f"Sin(a={self.a}, b={self.b}, c={self.c})"


class Cos(Sin):
    """``a·cos(b·x + c)`` = ``a·sin(b·x + c + π/2)``."""

    name = "cos"

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0):
        super().__init__(a, b, c + math.pi / 2)
        self.phase = float(c)

    def fn(self, x):
        return self.a * torch.cos(self.b * x + self.phase)

    def derivative(self, x):
        return -self.a * self.b * torch.sin(self.b * x + self.phase)

    def __repr__(self):
        return f"Cos(a={self.a}, b={self.b}, c={self.phase})"


# --------------------------------------------------------------------------- quadrature
@lru_cache(maxsize=32)
def _gauss_hermite(degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for E[g(z)], z ~ N(0, 1): probabilists' Hermite, weights sum to 1."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(degree)
    return nodes, weights / weights.sum()


class Elementwise(Activation):
    """Any torch-differentiable scalar function ``fn``, with its dual by quadrature.

    ``E[φ(u)φ(v)]`` is computed with a ``degree x degree`` Gauss–Hermite rule after writing
    ``u = s1 z1``, ``v = s2 (ρ z1 + sqrt(1−ρ²) z2)``; φ' comes from autograd (or ``derivative``
    if given). Cost per pair and layer: ``degree**2`` evaluations of φ and φ'. The rule is
    exact for polynomials of degree < 2·degree and converges fast for smooth φ; for kinks
    (ReLU-like functions) use the closed-form layers instead.
    """

    name = "elementwise"

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, degree: int = 48,
                 derivative: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 name: str | None = None):
        if not callable(fn):
            raise ValueError(f"Elementwise needs a callable fn; got {fn!r}.")
        self._fn = fn
        self._derivative = derivative
        self.degree = check_positive_int(degree, "degree")
        self.name = name or getattr(fn, "__name__", "elementwise")

    def fn(self, x):
        return self._fn(x)

    def derivative(self, x):
        if self._derivative is not None:
            return self._derivative(x)
        return super().derivative(x)

    def _values(self, x: torch.Tensor, need_dot: bool):
        """φ(x) and, if asked, φ'(x) from one autograd pass."""
        if not need_dot:
            return self._fn(x), None
        if self._derivative is not None:
            return self._fn(x), self._derivative(x)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = self._fn(leaf)
            (grad,) = torch.autograd.grad(out.sum(), leaf)
        return out.detach(), grad

    def dual(self, cov, var1, var2, need_dot=True):
        nodes_np, weights_np = _gauss_hermite(self.degree)
        nodes = torch.as_tensor(nodes_np, dtype=cov.dtype, device=cov.device)
        weights = torch.as_tensor(weights_np, dtype=cov.dtype, device=cov.device)
        rho, _ = _correlation(cov, var1, var2)
        s1 = torch.sqrt(var1).expand_as(cov)
        s2 = torch.sqrt(var2).expand_as(cov)
        r = torch.sqrt(torch.clamp(1 - rho * rho, min=0))
        nngp = torch.zeros_like(cov)
        dot = torch.zeros_like(cov) if need_dot else None
        inner_scale = (s2 * r).unsqueeze(-1) * nodes  # (..., q)
        for i in range(self.degree):
            z = float(nodes_np[i])
            f_u, df_u = self._values(s1 * z, need_dot)
            v = (s2 * rho * z).unsqueeze(-1) + inner_scale
            f_v, df_v = self._values(v, need_dot)
            nngp += weights[i] * f_u * (f_v @ weights)
            if need_dot:
                dot += weights[i] * df_u * (df_v @ weights)
        return nngp, dot

    def __repr__(self):
        return f"Elementwise({self.name}, degree={self.degree})"


def Tanh(degree: int = 48) -> Elementwise:
    """``tanh(x)``; dual by Gauss–Hermite quadrature."""
    return Elementwise(torch.tanh, degree=degree, name="tanh",
                       derivative=lambda x: 1 - torch.tanh(x) ** 2)


def Sigmoid(degree: int = 48) -> Elementwise:
    """The logistic function ``1 / (1 + e^{-x})``; dual by quadrature."""
    def derivative(x):
        s = torch.sigmoid(x)
        return s * (1 - s)
    return Elementwise(torch.sigmoid, degree=degree, name="sigmoid", derivative=derivative)


def Softplus(degree: int = 48) -> Elementwise:
    """``log(1 + e^x)``; dual by quadrature."""
    return Elementwise(F.softplus, degree=degree, name="softplus", derivative=torch.sigmoid)


def SiLU(degree: int = 48) -> Elementwise:
    """``x·sigmoid(x)`` (Swish); dual by quadrature."""
    def derivative(x):
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    return Elementwise(F.silu, degree=degree, name="silu", derivative=derivative)


class Identity(Layer):
    """The identity map (a residual branch, or a linear network's 'activation')."""

    name = "identity"

    def fn(self, x):
        return x

    def derivative(self, x):
        return torch.ones_like(x)

    def kernel_map(self, k):
        return k

    def build(self, in_dim, generator, dtype, device):
        return torch.nn.Identity()

    def __repr__(self):
        return "Identity()"


_BY_NAME: dict[str, Callable[[], Layer]] = {
    "relu": ReLU, "abs": Abs, "erf": Erf, "gelu": GELU, "sin": Sin, "cos": Cos,
    "tanh": Tanh, "sigmoid": Sigmoid, "softplus": Softplus, "silu": SiLU, "swish": SiLU,
    "identity": Identity, "linear": Identity, "leaky_relu": LeakyReLU,
}


def activation_from_name(activation: str | Layer) -> Layer:
    """Resolve ``"relu"``-style names (or pass an activation layer through)."""
    if isinstance(activation, (Activation, Identity)):
        return activation
    if isinstance(activation, str) and activation.lower() in _BY_NAME:
        return _BY_NAME[activation.lower()]()
    if callable(activation) and not isinstance(activation, (str, Layer)):
        return Elementwise(activation)
    raise ValueError(f"Unknown activation {activation!r}; use one of {sorted(_BY_NAME)}, an "
                     "ntkit activation such as nk.LeakyReLU(0.2), or a torch function.")
