"""The ReLU family ``a·min(x, 0) + b·max(x, 0)`` and its arc-cosine duals in closed form."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .fused import abrelu_dual
from .protocol import Activation, check_finite_number, correlation, tracking

_TWO_PI = 2.0 * math.pi


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


@dataclass(frozen=True, repr=False)
class ABReLU(Activation):
    """``φ(x) = a·min(x, 0) + b·max(x, 0)``; ReLU is (0, 1), LeakyReLU (α, 1), Abs (−1, 1).

    Dual (Cho & Saul arc-cosine kernels, generalised): with θ = arccos ρ,
    ``nngp = (a−b)²/(2π)·sqrt(var1 var2 − cov²) + dot·cov`` and
    ``dot = (a²+b²)/2 − (a−b)² θ/(2π)``.
    """

    a: float = 0.0
    b: float = 1.0

    def __post_init__(self):
        for label in ("a", "b"):
            value = check_finite_number(f"{type(self).__name__} slope", label,
                                        getattr(self, label))
            object.__setattr__(self, label, value)

    def fn(self, x):
        return self.a * torch.clamp(x, max=0) + self.b * torch.clamp(x, min=0)

    def derivative(self, x):
        return torch.where(x > 0, torch.full_like(x, self.b), torch.full_like(x, self.a))

    def dual(self, cov, var1, var2, need_dot=True):
        a, b = self.a, self.b
        factor = (a - b) ** 2 / _TWO_PI
        if not tracking(cov, var1, var2):
            # Big tiles (convolutional kernels): one compiled loop (see fused.py).
            fused = abrelu_dual(cov, var1, var2, (a * a + b * b) / 2, factor)
            if fused is not None:
                return fused[0], (fused[1] if need_dot else None)
        rho, norm = correlation(cov, var1, var2)
        if tracking(cov, var1, var2):
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

    def dual_ntk(self, cov, var1, var2, ntk):
        if ntk is not None and not tracking(cov, var1, var2, ntk):
            # Big tiles: the dual and the NTK's product in one compiled loop (fused.py).
            fused = abrelu_dual(cov, var1, var2, (self.a ** 2 + self.b ** 2) / 2,
                                (self.a - self.b) ** 2 / _TWO_PI, ntk)
            if fused is not None:
                return fused
        return super().dual_ntk(cov, var1, var2, ntk)

    def variance(self, var):
        return var * ((self.a * self.a + self.b * self.b) / 2)

    @property
    def affine(self):
        # a == b is a·x: its dual a²·cov is exact for any input, Gaussian or not.
        return self.a == self.b

    def mean(self, var):
        # E[max(u, 0)] = sqrt(var/(2π)) = −E[min(u, 0)]
        if self.a == self.b:
            return 0.0  # a·x: odd
        return torch.sqrt(var) * ((self.b - self.a) / math.sqrt(_TWO_PI))

    def __repr__(self):
        return f"ABReLU(a={self.a}, b={self.b})"


@dataclass(frozen=True, repr=False)
class ReLU(ABReLU):
    """``max(x, 0)``: the arc-cosine kernel of degree 1 (JGH's activation)."""

    a: float = field(default=0.0, init=False, repr=False)
    b: float = field(default=1.0, init=False, repr=False)

    def fn(self, x):
        return torch.relu(x)

    __repr__ = Activation.__repr__


@dataclass(frozen=True, repr=False)
class LeakyReLU(ABReLU):
    """``max(x, 0) + alpha·min(x, 0)``."""

    a: float = field(default=0.01, init=False, repr=False)
    b: float = field(default=1.0, init=False, repr=False)
    alpha: float = 0.01

    def __post_init__(self):
        alpha = check_finite_number("LeakyReLU", "alpha", self.alpha)
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "a", alpha)

    def __repr__(self):
        return f"LeakyReLU(alpha={self.alpha})"


@dataclass(frozen=True, repr=False)
class Abs(ABReLU):
    """``|x|``."""

    a: float = field(default=-1.0, init=False, repr=False)
    b: float = field(default=1.0, init=False, repr=False)

    def fn(self, x):
        return torch.abs(x)

    __repr__ = Activation.__repr__
