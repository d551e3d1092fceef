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
import warnings
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .._validation import check_positive_int
from .base import Layer, PairKernel

_TWO_PI = 2.0 * math.pi


def _tracking(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on any of ``tensors`` (then no in-place ops)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _correlation(cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor):
    """Return ``(rho, norm)``: ``norm = sqrt(var1 var2)`` and ``rho = cov / norm`` in [-1, 1].

    ``var1``/``var2`` are a column and a row (full mode) or two diagonals. Forming the product
    before the square root keeps ``norm`` exactly symmetric and makes ``rho`` exactly 1 for
    x = x' (``sqrt(v·v) == v`` in IEEE arithmetic), where arccos is most sensitive.
    Rows with zero variance (a zero input without bias) have ``cov = 0`` and get ``rho = 0``:
    any value works for the NNGP there and 0 is neural-tangents' convention for the
    derivative term. Differentiable when the inputs require grad (out-of-place ops then).
    """
    tiny = torch.finfo(cov.dtype).tiny
    if _tracking(cov, var1, var2):
        norm = torch.sqrt(var1 * var2).clamp(min=tiny)
        return (cov / norm).clamp(-1.0, 1.0), norm
    # Clamping the zero norms to `tiny` leaves every use of `norm` exact to ~1e-308.
    norm = (var1 * var2).sqrt_().clamp_(min=tiny)
    rho = cov / norm
    return rho.clamp_(-1.0, 1.0), norm


class _SafeArccos(torch.autograd.Function):
    """arccos with derivative −1/sqrt(1−ρ²) for |ρ| < 1 and 0 at |ρ| = 1.

    At ρ = ±1 (x' parallel to x) the ReLU-family kernels have a kink in ρ; every term that
    multiplies the infinite derivative there also multiplies a zero (the derivative of ρ
    along directions that keep it at 1), and torch would return inf·0 = NaN. The zero
    subgradient gives the exact gradient of the NNGP (which is smooth there: its terms
    cancel) and of the NTK along directions that keep ρ = 1.
    """

    @staticmethod
    def forward(ctx, rho):
        ctx.save_for_backward(rho)
        return torch.arccos(rho)

    @staticmethod
    def backward(ctx, grad):
        (rho,) = ctx.saved_tensors
        gap = 1 - rho * rho
        inv = torch.where(gap > 0, gap.clamp(min=torch.finfo(rho.dtype).tiny).rsqrt(),
                          torch.zeros_like(gap))
        return -grad * inv


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

    def _params(self) -> tuple:
        """Everything that determines the layer's numbers (for ``==`` and ``hash``)."""
        return ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._params() == other._params()

    def __hash__(self) -> int:
        return hash((type(self).__qualname__, self._params()))


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
        if _tracking(cov, var1, var2):
            theta = _SafeArccos.apply(rho)
            dot = (a * a + b * b) / 2 - factor * theta
            nngp = dot * cov
            if factor:
                nngp = nngp + factor * torch.sin(theta) * norm
            return nngp, (dot if need_dot else None)
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

    def _params(self):
        return (self.a, self.b)

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
        # arcsin argument 2cov/sqrt((1+2var1)(1+2var2)). The two inverse square roots are taken
        # before the product: O(N) per tile, and no overflow of the product at var ~ 1e154
        # (1e19 in float32), which would give a finite wrong 0.
        inv = torch.rsqrt(1 + 2 * var1) * torch.rsqrt(1 + 2 * var2)
        if _tracking(cov, var1, var2):
            arg = (2 * cov * inv).clamp(-1, 1)
            nngp = torch.arcsin(arg) * (2 / math.pi)
            dot = None
            if need_dot:
                # 1/sqrt((1+2var1)(1+2var2) − 4cov²) = inv/sqrt(1 − arg²), and it is <= 1
                dot = torch.clamp(inv * torch.rsqrt(1 - arg * arg), max=1.0) * (4 / math.pi)
            return nngp, dot
        arg = (2 * cov).mul_(inv).clamp_(-1, 1)
        nngp = torch.arcsin(arg).mul_(2 / math.pi)
        dot = None
        if need_dot:
            one = torch.ones((), dtype=arg.dtype, device=arg.device)
            dot = torch.addcmul(one, arg, arg, value=-1.0).rsqrt_().mul_(inv)
            dot = dot.clamp_(max=1.0).mul_(4 / math.pi)
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

    def _params(self):
        return (self.a, self.b, self.c)

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
# The smooth activations without a closed-form dual (Tanh, Sigmoid, Softplus, SiLU, any
# Elementwise(fn)) integrate
#     E[g(u) g(v)],  u = s1 z1,  v = s2 (rho z1 + r z2) = m + sigma z2,  z1, z2 ~ N(0, 1),
# as a nested pair of one-dimensional rules (outer over z1, inner over z2 given z1). A fixed
# Gauss–Hermite rule fails as soon as s is not small: tanh(s z) has poles at z = ±iπ/(2s), and
# Hermite rules converge slowly for functions analytic only in a strip (48 nodes are 1e-7 off
# at s = 1 and useless at s = 30). Each 1-D rule here is chosen per entry from the distance
# `delta` (in units of z) between the real axis and the integrand's nearest singularity:
#   * delta >= ~0.5: the trapezoid rule on a uniform grid, whose error for an integrand
#     analytic in the strip |Im z| < delta decays like exp(-2π delta / step) (times the
#     Gaussian's growth e^{delta²/2} off the axis); one node set serves the bucket;
#   * smaller delta (a saturated tanh: a feature of width 1/s in a Gaussian of width 1):
#     composite Gauss–Legendre panels, graded geometrically towards the feature at z0 (ratio
#     2 from delta/2 up to 1) and of width <= 1 elsewhere, so every panel is at least its own
#     width away from the singularity; cost grows like log(1/delta), not 1/delta.
# Entries are bucketed by (outer rule, inner rule) so a single huge row does not make its
# whole tile pay for the fine rule.
_Z = 7.5                     # integrate |z| <= 7.5: the Gaussian mass outside is 6e-14
_T_STEP_MAX = 0.45           # the trapezoid resolves the Gaussian itself to ~1e-30 here
_T_STEP_PER_DELTA = 0.15     # measured: sech⁴(s z) is 1e-12 off at this step, 2e-10 at 0.19
_T_LEVELS = 5                # steps 0.45·2^(-l/2), l = 0..4 (down to 0.11); then panels,
                             # which need fewer nodes from there on
_LEGENDRE = 8                # Gauss–Legendre nodes per panel
_P_BASE = np.concatenate([[-_Z], np.arange(-6.0, 6.5, 1.0), [_Z]])
_MAX_GRADED = 64             # graded levels: features down to 2^-64 of the Gaussian's width
_CHUNK_NODES = 1 << 21       # entries x outer x inner nodes per chunk (16 MiB in float64)
_SQRT_2PI = math.sqrt(2.0 * math.pi)


@lru_cache(maxsize=32)
def _gauss_hermite(degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for E[g(z)], z ~ N(0, 1): probabilists' Hermite, weights sum to 1."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(degree)
    return nodes, weights / weights.sum()


@lru_cache(maxsize=32)
def _trapezoid_np(level: int) -> tuple[np.ndarray, np.ndarray]:
    step = _T_STEP_MAX * 2.0 ** (-level / 2)
    k = math.floor(_Z / step)
    nodes = step * np.arange(-k, k + 1, dtype=np.float64)
    weights = np.exp(-0.5 * nodes * nodes)
    return nodes, weights / weights.sum()


@lru_cache(maxsize=4)
def _legendre_np(order: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(order)


def _tensor(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)


def _trapezoid(level: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = _trapezoid_np(level)
    return _tensor(nodes, like), _tensor(weights, like)


def _panels(z0: torch.Tensor, delta: torch.Tensor, levels: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite Gauss–Legendre rule for E[g(z)], z ~ N(0, 1), per entry.

    ``z0`` and ``delta`` are ``(..., )``: the feature's position and its distance to the
    nearest singularity (both in units of z). Break points: a base grid of width <= 1 on
    [-Z, Z], plus ``z0 ± (delta/2)·2^k`` for ``k < levels`` (clipped to [-Z, Z]; clipped panels
    have zero width and zero weight). Returns nodes and weights of shape ``(..., K)``;
    the weights include the Gaussian density and are normalised to sum to 1.
    """
    like = z0
    base = _tensor(_P_BASE, like).expand(*z0.shape, len(_P_BASE))
    pieces = [base, z0.unsqueeze(-1)]
    if levels:
        scales = (0.5 * delta).unsqueeze(-1) * _tensor(2.0 ** np.arange(levels), like)
        pieces += [z0.unsqueeze(-1) - scales, z0.unsqueeze(-1) + scales]
    breaks = torch.cat(pieces, dim=-1).clamp(-_Z, _Z).sort(dim=-1).values
    x, w = _legendre_np(_LEGENDRE)
    x, w = _tensor(x, like), _tensor(w, like)
    half = 0.5 * (breaks[..., 1:] - breaks[..., :-1])
    mid = 0.5 * (breaks[..., 1:] + breaks[..., :-1])
    nodes = (mid.unsqueeze(-1) + half.unsqueeze(-1) * x).flatten(-2)
    weights = ((half.unsqueeze(-1) * w).flatten(-2)
               * torch.exp(-0.5 * nodes * nodes))
    return nodes, weights / weights.sum(dim=-1, keepdim=True)


def _rule_code(delta: torch.Tensor) -> torch.Tensor:
    """Integer code per entry: ``l < _T_LEVELS`` for the trapezoid at level l, else
    ``_T_LEVELS + L`` for panels with L graded levels."""
    want = (_T_STEP_PER_DELTA * delta).clamp(max=_T_STEP_MAX)
    level = torch.ceil(2.0 * torch.log2(_T_STEP_MAX / want)).clamp(min=0)
    graded = torch.ceil(torch.log2(2.0 / delta.clamp(min=1e-300))).clamp(min=1)
    code = torch.where(level < _T_LEVELS, level, _T_LEVELS + graded)
    return code.to(torch.int64)


def _quadrature_dual(values, feature: float, cov, var1, var2, need_dot: bool,
                     refine: bool = False):
    """``E[φ(u)φ(v)]`` and ``E[φ'(u)φ'(v)]`` by the variance-aware nested rule above.

    ``values(x, need_dot)`` returns φ(x) and φ'(x); ``feature`` is the distance of φ's
    nearest complex singularity from the real axis (π/2 for tanh). ``refine`` halves every
    rule's step (for error estimates). Shapes broadcast like ``cov``; the result has
    ``cov``'s shape. Differentiable in its tensor arguments (no in-place ops on them).
    """
    shape = torch.broadcast_shapes(cov.shape, var1.shape, var2.shape)
    c = cov.expand(shape).reshape(-1)
    v1 = var1.expand(shape).reshape(-1)
    v2 = var2.expand(shape).reshape(-1)
    rho, _ = _correlation(c, v1, v2)
    s1, s2 = torch.sqrt(v1), torch.sqrt(v2)
    # sqrt'(0) is infinite; at ρ = ±1 the dual is even in r, so the zero gradient is right
    gap = 1 - rho * rho
    r = torch.sqrt(gap.clamp(min=torch.finfo(gap.dtype).tiny)) * (gap > 0)
    sigma = s2 * r
    scale = 0.5 if refine else 1.0
    with torch.no_grad():
        # Non-finite inputs, a var1·var2 that overflowed (rho would come out 0), and scales
        # beyond the graded rule's reach (s > ~1e18: more than _MAX_GRADED halvings) give NaN:
        # never a finite wrong number; the evaluator reports the rows.
        finite = torch.isfinite(c) & torch.isfinite(v1 * v2)
        d_out = torch.minimum(feature / s1, torch.maximum(sigma, torch.full_like(sigma, feature))
                              / (rho.abs() * s2))
        d_in = feature / sigma
        code_out = _rule_code(scale * d_out) + (1 if refine else 0)
        code_in = _rule_code(scale * d_in) + (1 if refine else 0)
        finite &= (code_out < _T_LEVELS + _MAX_GRADED) & (code_in < _T_LEVELS + _MAX_GRADED)
        key = torch.where(finite, code_out * 1000 + code_in, torch.full_like(code_out, -1))
        keys = torch.unique(key).tolist()
    nngp = torch.full_like(c, math.nan)
    dot = torch.full_like(c, math.nan) if need_dot else None
    parts_n, parts_d, parts_i = [], [], []
    for k in keys:
        if k < 0:
            continue  # non-finite inputs stay NaN: the evaluator names the rows
        idx = (key == k).nonzero().squeeze(-1)
        co, ci = divmod(k, 1000)
        step = max(1, _CHUNK_NODES // (_rule_size(co) * _rule_size(ci)))
        for lo in range(0, idx.numel(), step):
            sub = idx[lo:lo + step]
            n_, d_ = _nested(values, co, ci, s1[sub], s2[sub], rho[sub], sigma[sub],
                             scale * d_out[sub].detach(), scale * d_in[sub].detach(),
                             need_dot)
            parts_i.append(sub)
            parts_n.append(n_)
            parts_d.append(d_)
    if parts_i:
        order = torch.cat(parts_i)
        nngp = nngp.index_put((order,), torch.cat(parts_n))
        if need_dot:
            dot = dot.index_put((order,), torch.cat(parts_d))
    return nngp.reshape(shape), (dot.reshape(shape) if need_dot else None)


def _rule_size(code: int) -> int:
    if code < _T_LEVELS:
        return len(_trapezoid_np(code)[0])
    return (len(_P_BASE) + 2 * (code - _T_LEVELS)) * _LEGENDRE


def _nested(values, code_out, code_in, s1, s2, rho, sigma, d_out, d_in, need_dot):
    """The nested rule for one chunk of entries of one bucket (1-D tensors of equal length).

    Vectorised over entries x outer nodes x inner nodes.
    """
    if code_out < _T_LEVELS:
        zo, wo = _trapezoid(code_out, s1)  # (Ko,), shared
    else:
        zo, wo = _panels(torch.zeros_like(s1), d_out, code_out - _T_LEVELS)  # (n, Ko)
    f_u, df_u = values(s1.unsqueeze(-1) * zo, need_dot)  # (n, Ko)
    m = (rho * s2).unsqueeze(-1) * zo  # the inner mean per outer node, (n, Ko)
    if code_in < _T_LEVELS:
        zi, wi = _trapezoid(code_in, s1)  # (Ki,), shared
    else:
        safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        z0 = (-m / safe_sigma.unsqueeze(-1)).detach().clamp(-_Z, _Z)
        zi, wi = _panels(z0, d_in.unsqueeze(-1).expand_as(z0), code_in - _T_LEVELS)
    v = m.unsqueeze(-1) + sigma[:, None, None] * zi  # (n, Ko, Ki)
    f_v, df_v = values(v, need_dot)
    if wi.dim() == 1:
        e_f = f_v @ wi
        e_d = df_v @ wi if need_dot else None
    else:
        e_f = (f_v * wi).sum(-1)
        e_d = (df_v * wi).sum(-1) if need_dot else None
    nngp = (wo * f_u * e_f).sum(-1)
    dot = (wo * df_u * e_d).sum(-1) if need_dot else None
    return nngp, dot


class Elementwise(Activation):
    """Any torch-differentiable scalar function ``fn``, with its dual by quadrature.

    Writes ``u = s1 z1``, ``v = s2 (ρ z1 + sqrt(1−ρ²) z2)`` and integrates over z1 and, given
    z1, over z2 with rules chosen per kernel entry from the pre-activation scales (see the
    notes above ``_quadrature_dual``): a trapezoid grid for integrands smooth on the
    Gaussian's scale, and Gauss–Legendre panels graded towards the activation's transition
    when the standard deviation is large (a saturated tanh). The rules are designed for
    functions analytic near the real axis except within ``smoothness`` of it (kinks and
    jumps at 0 are break points of the rule and also integrate accurately); for a
    user-supplied ``fn`` the error is estimated on a sample of entries by repeating them
    with every step halved, and a warning gives the number when it exceeds 1e-8 relative.

    Args:
        fn: φ, elementwise on tensors.
        derivative: φ' (default: autograd of ``fn``).
        degree: ``None`` (default) for the adaptive rule; an int selects the old fixed
            ``degree x degree`` Gauss–Hermite rule (exact for polynomials of degree
            < 2·degree; inaccurate for saturating functions at large variance).
        smoothness: distance of φ's nearest complex singularity from the real axis, in
            units of φ's argument (π/2 for tanh); smaller is safer and slower. Default 1.
        name: a label for ``repr``.

    Cost per pair and layer: about 60×60 evaluations of φ and φ' at pre-activation variances
    up to ~2, a few times more in the saturated regime.
    """

    name = "elementwise"
    #: φ's singularity distance used by the rule (subclasses: their known value)
    smoothness: float = 1.0
    _certified = False  # built-in subclasses are verified by tests; no run-time estimate

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, degree: int | None = None,
                 derivative: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 smoothness: float | None = None, name: str | None = None):
        if isinstance(fn, type):
            raise ValueError(f"Elementwise needs a function; got the class {fn.__name__}. Pass "
                             f"an instance ({fn.__name__}()) or a function.")
        if not callable(fn):
            raise ValueError(f"Elementwise needs a callable fn; got {fn!r}.")
        if derivative is not None and not callable(derivative):
            raise ValueError(f"Elementwise derivative must be callable or None; got "
                             f"{derivative!r}.")
        self._fn = fn
        self._derivative = derivative
        self.degree = None if degree is None else check_positive_int(degree, "degree")
        if smoothness is not None:
            if not isinstance(smoothness, (int, float)) or not 0 < smoothness < math.inf:
                raise ValueError(f"Elementwise smoothness must be a positive number; got "
                                 f"{smoothness!r}.")
            self.smoothness = float(smoothness)
        self.name = name or getattr(fn, "__name__", "elementwise")

    @property
    def uses_quadrature(self) -> bool:
        return True

    def fn(self, x):
        return self._fn(x)

    def derivative(self, x):
        if self._derivative is not None:
            return self._derivative(x)
        return super().derivative(x)

    def _values(self, x: torch.Tensor, need_dot: bool):
        """φ(x) and, if asked, φ'(x) (one autograd pass when no derivative is given).

        With ``x`` part of an autograd graph, φ' is built with ``create_graph`` so the dual
        stays differentiable.
        """
        if not need_dot:
            return self._fn(x), None
        if self._derivative is not None:
            return self._fn(x), self._derivative(x)
        if torch.is_grad_enabled() and x.requires_grad:
            out = self._fn(x)
            (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
            return out, grad
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = self._fn(leaf)
            (grad,) = torch.autograd.grad(out.sum(), leaf)
        return out.detach(), grad

    def dual(self, cov, var1, var2, need_dot=True):
        if self.degree is not None:
            return self._hermite_dual(cov, var1, var2, need_dot)
        nngp, dot = _quadrature_dual(self._values, self.smoothness, cov, var1, var2, need_dot)
        if not self._certified:
            self._check_error(cov, var1, var2, nngp, dot)
        return nngp, dot

    def _check_error(self, cov, var1, var2, nngp, dot, sample: int = 8):
        """Repeat a few entries with every step halved and warn if they disagree."""
        with torch.no_grad():
            shape = nngp.shape
            flat = [t.detach().expand(shape).reshape(-1) for t in (cov, var1, var2)]
            big = torch.maximum(flat[1], flat[2])
            ok = torch.isfinite(big) & torch.isfinite(nngp.reshape(-1))
            if not bool(ok.any()):
                return
            big = torch.where(ok, big, torch.full_like(big, -1.0))
            pick = torch.unique(torch.cat([big.argmax().reshape(1),
                                           torch.linspace(0, big.numel() - 1, sample,
                                                          device=big.device).long()]))
            pick = pick[ok[pick]]
            c, a, b = (t[pick] for t in flat)
            n2, d2 = _quadrature_dual(self._values, self.smoothness, c, a, b, dot is not None,
                                      refine=True)
            na, _ = _quadrature_dual(self._values, self.smoothness, a, a, a, False)
            nb, _ = _quadrature_dual(self._values, self.smoothness, b, b, b, False)
            scale = torch.sqrt((na * nb).abs()).clamp(min=torch.finfo(c.dtype).tiny)
            err = ((nngp.reshape(-1)[pick] - n2).abs() / scale).max()
            if dot is not None:
                da = _quadrature_dual(self._values, self.smoothness, a, a, a, True)[1]
                db = _quadrature_dual(self._values, self.smoothness, b, b, b, True)[1]
                dscale = torch.sqrt((da * db).abs()).clamp(min=torch.finfo(c.dtype).tiny)
                err = torch.maximum(err, ((dot.reshape(-1)[pick] - d2).abs() / dscale).max())
            err = float(err)
        tol = 1e-8 if cov.dtype == torch.float64 else 1e-4
        if not err <= tol:  # NaN warns too
            warnings.warn(
                f"{self!r}: the quadrature error of its dual is about {err:.1e} relative "
                f"(estimated by halving every step, at pre-activation variances up to "
                f"{float(torch.max(a.max(), b.max())):.3g}); the function is not smooth enough "
                "on the Gaussian's scale (a kink or jump away from 0, or fast oscillation). "
                "Use a closed-form layer where one exists (nk.ReLU(), nk.LeakyReLU(a), "
                "nk.Abs(), nk.Erf(), nk.GELU(), nk.Sin(...)), pass smoothness= smaller than "
                "the width of its transition, or rescale the inputs.",
                RuntimeWarning, stacklevel=4)

    def _hermite_dual(self, cov, var1, var2, need_dot):
        """The fixed ``degree x degree`` Gauss–Hermite rule (``degree=`` given)."""
        nodes_np, weights_np = _gauss_hermite(self.degree)
        nodes = _tensor(nodes_np, cov)
        weights = _tensor(weights_np, cov)
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
            nngp = nngp + weights[i] * f_u * (f_v @ weights)
            if need_dot:
                dot = dot + weights[i] * df_u * (df_v @ weights)
        return nngp, dot

    def kernel_map(self, k: PairKernel) -> PairKernel:
        out = super().kernel_map(k)
        if k.diagonal:
            return out
        # Entries with x = x' (cov = var1 = var2 exactly) must carry exactly the row variance
        # into the next layer (its correlation must be exactly 1 there). The tile and the
        # variance vector are evaluated with different vector widths, which may differ in
        # the last bit, so copy the variance rather than rely on it.
        same = (k.cov == k.var1) & (k.var1 == k.var2)
        if bool(same.any()):
            row = out.var1.expand_as(out.cov)
            return out.replace(cov=torch.where(same, row, out.cov))
        return out

    def _params(self):
        return (self._fn, self._derivative, self.degree, self.smoothness)

    def __repr__(self):
        extra = "" if self.degree is None else f", degree={self.degree}"
        if self._derivative is not None:
            extra += f", derivative={self._derivative!r}"
        if type(self).smoothness != self.smoothness:
            extra += f", smoothness={self.smoothness}"
        return f"Elementwise({self._fn!r}{extra})"


def _softplus_exact(x: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(x, torch.zeros_like(x))


class _BuiltinSmooth(Elementwise):
    """A named smooth activation with closed-form φ' and a known singularity distance."""

    _certified = True

    def __init__(self, degree: int | None = None):
        super().__init__(type(self)._forward, degree=degree, name=self.name)

    @staticmethod
    def _forward(x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _both(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def fn(self, x):
        return type(self)._forward(x)

    def derivative(self, x):
        return self._both(x)[1]

    def _values(self, x, need_dot):
        if not need_dot:
            return type(self)._forward(x), None
        return self._both(x)

    def _params(self):
        return (self.degree,)

    def __repr__(self):
        cls = type(self).__name__
        return f"{cls}()" if self.degree is None else f"{cls}(degree={self.degree})"


class Tanh(_BuiltinSmooth):
    """``tanh(x)``; φ' = 1 − tanh². Dual by the adaptive quadrature (poles at ±iπ/2)."""

    name = "tanh"
    smoothness = math.pi / 2
    _forward = staticmethod(torch.tanh)

    def _both(self, x):
        t = torch.tanh(x)
        return t, 1 - t * t


class Sigmoid(_BuiltinSmooth):
    """The logistic function ``1 / (1 + e^{-x})``; φ' = σ(1 − σ) (poles at ±iπ)."""

    name = "sigmoid"
    smoothness = math.pi
    _forward = staticmethod(torch.sigmoid)

    def _both(self, x):
        s = torch.sigmoid(x)
        return s, s * (1 - s)


class Softplus(_BuiltinSmooth):
    """``log(1 + e^x)`` (torch's threshold-free value); φ' = sigmoid (branch points ±iπ)."""

    name = "softplus"
    smoothness = math.pi
    # torch's F.softplus switches to x above threshold=20, a 2e-9 jump; use the exact value.
    _forward = staticmethod(_softplus_exact)

    def _both(self, x):
        return torch.logaddexp(x, torch.zeros_like(x)), torch.sigmoid(x)


class SiLU(_BuiltinSmooth):
    """``x·sigmoid(x)`` (Swish); φ' = σ(1 + x(1 − σ)) (poles at ±iπ)."""

    name = "silu"
    smoothness = math.pi
    _forward = staticmethod(F.silu)

    def _both(self, x):
        s = torch.sigmoid(x)
        return x * s, s * (1 + x * (1 - s))


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

    def __eq__(self, other):
        return type(other) is type(self)

    def __hash__(self):
        return hash(type(self).__qualname__)

    def __repr__(self):
        return "Identity()"


_BY_NAME: dict[str, Callable[[], Layer]] = {
    "relu": ReLU, "abs": Abs, "erf": Erf, "gelu": GELU, "sin": Sin, "cos": Cos,
    "tanh": Tanh, "sigmoid": Sigmoid, "softplus": Softplus, "silu": SiLU, "swish": SiLU,
    "identity": Identity, "linear": Identity, "leaky_relu": LeakyReLU,
}


def _torch_functions() -> dict[Callable, Callable[[], Layer]]:
    """torch's spellings of the activations that have a named ntkit layer."""
    table: dict[Callable, Callable[[], Layer]] = {}
    pairs = [
        (("relu",), ReLU), (("erf",), Erf), (("tanh",), Tanh), (("sigmoid",), Sigmoid),
        (("sin",), Sin), (("cos",), Cos), (("abs", "absolute"), Abs),
    ]
    for names, layer in pairs:
        for name in names:
            for space in (torch, torch.special, F):
                fn = getattr(space, name, None)
                if fn is not None:
                    table[fn] = layer
    table[torch.special.expit] = Sigmoid
    table[torch.relu_] = ReLU
    table[F.silu] = SiLU
    return table


def _from_module(m: torch.nn.Module) -> Layer | None:
    """The ntkit layer for a parameter-free torch activation module, if there is one."""
    nn = torch.nn
    simple = {nn.ReLU: ReLU, nn.Tanh: Tanh, nn.Sigmoid: Sigmoid, nn.SiLU: SiLU,
              nn.Identity: Identity}
    if type(m) in simple:
        return simple[type(m)]()
    if type(m) is nn.GELU:
        return GELU() if m.approximate == "none" else None
    if type(m) is nn.LeakyReLU:
        return LeakyReLU(float(m.negative_slope))
    if type(m) is nn.Softplus:
        # torch's module returns x above `threshold`/beta (a jump of ~2e-9 at 20); the ntkit
        # layer is the exact log(1 + e^x), which the kernel integrates.
        return Softplus() if m.beta == 1 else None
    return None


def activation_from_name(activation: str | Layer | Callable) -> Layer:
    """Resolve an activation given by name, ntkit layer, torch function or torch module.

    * ``"relu"``-style names (see ``_BY_NAME``) and ntkit layers;
    * torch spellings of activations with a closed-form or named layer map to it, so the
      kernel uses the closed form: ``torch.relu``, ``F.relu``, ``nn.ReLU()``, ``torch.erf``,
      ``torch.special.erf``, ``torch.tanh``, ``nn.Tanh()``, ``torch.sigmoid``,
      ``nn.Sigmoid()``, ``torch.sin``, ``torch.cos``, ``torch.abs``, ``F.gelu`` and
      ``nn.GELU()`` (exact GELU; ``approximate='tanh'`` stays an ``Elementwise``),
      ``F.silu``/``nn.SiLU()``, ``nn.Softplus()`` (beta 1), ``nn.LeakyReLU(a)`` (slope a),
      ``F.leaky_relu`` (its default slope 0.01), ``nn.Identity()``;
    * any other callable becomes ``Elementwise(fn)`` (dual by quadrature).

    A class (``torch.nn.ReLU``) instead of an instance is refused with a ValueError.
    """
    if isinstance(activation, (Activation, Identity)):
        return activation
    if isinstance(activation, str):
        if activation.lower() in _BY_NAME:
            return _BY_NAME[activation.lower()]()
        raise ValueError(f"Unknown activation {activation!r}; use one of {sorted(_BY_NAME)}, "
                         "an ntkit activation such as nk.LeakyReLU(0.2), or a torch function.")
    if isinstance(activation, type):
        raise ValueError(
            f"activation is the class {activation.__module__}.{activation.__qualname__}; pass an "
            f"instance, {activation.__qualname__}(), or a name such as 'relu', or an ntkit "
            "layer such as nk.ReLU().")
    if isinstance(activation, torch.nn.Module):
        layer = _from_module(activation)
        if layer is not None:
            return layer
        if any(True for _ in activation.parameters()):
            raise ValueError(f"activation {activation!r} has parameters; the analytic kernel "
                             "needs a fixed elementwise function.")
        return Elementwise(activation)
    if callable(activation) and not isinstance(activation, Layer):
        try:
            layer = _torch_functions().get(activation)
        except TypeError:  # an unhashable callable
            layer = None
        if layer is not None:
            return layer()
        if activation is F.gelu:
            return GELU()
        if activation is F.softplus:
            return Softplus()
        if activation is F.leaky_relu:
            return LeakyReLU(0.01)
        return Elementwise(activation)
    raise ValueError(f"Unknown activation {activation!r}; use one of {sorted(_BY_NAME)}, an "
                     "ntkit activation such as nk.LeakyReLU(0.2), or a torch function.")
