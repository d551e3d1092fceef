"""Smooth activations whose Gaussian dual has a closed form: Erf, GELU, Sin, Cos."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .protocol import Activation, check_finite_number, tracking

_TWO_PI = 2.0 * math.pi


@dataclass(frozen=True, repr=False)
class Erf(Activation):
    """``erf(x)``. Dual (Williams 1997): ``nngp = (2/π) arcsin(2cov / sqrt((1+2var1)(1+2var2)))``,
    ``dot = (4/π) / sqrt((1+2var1)(1+2var2) − 4cov²)``."""

    def fn(self, x):
        return torch.erf(x)

    def derivative(self, x):
        return (2.0 / math.sqrt(math.pi)) * torch.exp(-x * x)

    def dual(self, cov, var1, var2, need_dot=True):
        # arcsin argument 2cov/sqrt((1+2var1)(1+2var2)). The two inverse square roots are taken
        # before the product: O(N) per tile, and no overflow of the product at var ~ 1e154
        # (1e19 in float32), which would give a finite wrong 0.
        inv = torch.rsqrt(1 + 2 * var1) * torch.rsqrt(1 + 2 * var2)
        if tracking(cov, var1, var2):
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

    def mean(self, var):
        return 0.0  # odd


@dataclass(frozen=True, repr=False)
class GELU(Activation):
    """``x·Φ(x)`` (exact GELU). Closed-form dual from Tsuchida et al. (arXiv 2002.08517).

    With ``p = var1 var2``, ``q = (1+var1)(1+var2)``, ``δ² = q − cov²`` and
    ``α = arctan2(cov, δ)``:
    ``nngp = cov/4 + [(cov² + p δ²)/(q δ) + cov α] / (2π)``,
    ``dot = 1/4 + α/(2π) + cov/(2π δ)·(1/δ² + (1 − p)/q + 1)``.
    """

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

    def mean(self, var):
        # Stein: E[u Φ(u)] = var E[Φ'(u)] = var / sqrt(2π (1 + var))
        return var * torch.rsqrt(_TWO_PI * (1 + var))


@dataclass(frozen=True, repr=False)
class Sin(Activation):
    """``a·sin(b·x + c)``. Dual: with ``s = var1 + var2``,
    ``nngp = a²/2·(e^{b²(cov − s/2)} − cos(2c)·e^{−b²(cov + s/2)})`` and
    ``dot = a²b²/2·(e^{b²(cov − s/2)} + cos(2c)·e^{−b²(cov + s/2)})``."""

    a: float = 1.0
    b: float = 1.0
    c: float = 0.0

    def __post_init__(self):
        for label in ("a", "b", "c"):
            value = check_finite_number(type(self).__name__, label, getattr(self, label))
            object.__setattr__(self, label, value)

    @property
    def sine_phase(self) -> float:
        """The phase c' of this activation written as ``a·sin(b·x + c')``."""
        return self.c

    def fn(self, x):
        return self.a * torch.sin(self.b * x + self.c)

    def derivative(self, x):
        return self.a * self.b * torch.cos(self.b * x + self.c)

    def dual(self, cov, var1, var2, need_dot=True):
        b2 = self.b ** 2
        half_sum = 0.5 * (var1 + var2)
        plus = torch.exp(b2 * (cov - half_sum))
        minus = torch.exp(-b2 * (cov + half_sum)) * math.cos(2 * self.sine_phase)
        scale = 0.5 * self.a ** 2
        nngp = scale * (plus - minus)
        dot = scale * b2 * (plus + minus) if need_dot else None
        return nngp, dot

    def mean(self, var):
        # E[sin(b u + c)] = sin(c) E[cos(b u)] = sin(c) e^{−b² var/2}
        factor = self.a * math.sin(self.sine_phase)
        if factor == 0.0:
            return 0.0  # odd: a = 0 or a phase that is a multiple of π exactly
        return torch.exp(var * (-0.5 * self.b ** 2)) * factor

    def __repr__(self):
        return f"{type(self).__name__}(a={self.a}, b={self.b}, c={self.c})"


@dataclass(frozen=True, repr=False)
class Cos(Sin):
    """``a·cos(b·x + c)`` = ``a·sin(b·x + c + π/2)``."""

    @property
    def sine_phase(self) -> float:
        return self.c + math.pi / 2

    def fn(self, x):
        return self.a * torch.cos(self.b * x + self.c)

    def derivative(self, x):
        return -self.a * self.b * torch.sin(self.b * x + self.c)
