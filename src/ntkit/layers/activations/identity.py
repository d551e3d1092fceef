"""The identity activation (a residual branch, or a linear network's 'activation')."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import Activation


@dataclass(frozen=True, repr=False)
class Identity(Activation):
    """``φ(x) = x``: dual ``nngp = cov``, ``dot = 1``; the kernel state (per-example means
    included, and whether it is Gaussian) passes unchanged, so it may follow anything.

    Unlike other activations it also passes a tuple of branch states (after ``FanOut``)
    through untouched, since it changes nothing.
    """

    def fn(self, x):
        return x

    def derivative(self, x):
        return torch.ones_like(x)

    def dual(self, cov, var1, var2, need_dot=True):
        shape = torch.broadcast_shapes(cov.shape, var1.shape, var2.shape)
        nngp = cov.expand(shape)
        return nngp, (torch.ones_like(nngp) if need_dot else None)

    def variance(self, var):
        return var

    def mean(self, var):
        return 0.0

    @property
    def affine(self):
        return True

    def kernel_map(self, k):
        return k

    def build(self, in_dim, generator, dtype, device):
        return torch.nn.Identity()
