"""Fully connected layers in the NTK and the standard parameterization."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._validation import check_choice, check_positive_int, check_scale
from .base import Layer, is_branches
from .state import DENSE, PairKernel, require_dense

PARAMETERIZATIONS = ("ntk", "standard")


class _ScaledLayerKey:
    """Equality and hashing over the fields named in ``_KEY_FIELDS``, for layers whose
    ``W_std``/``b_std`` may be tensors (learnable scales): a tensor has no value hash, so it
    is compared by identity."""

    _KEY_FIELDS: tuple[str, ...] = ()

    def _key(self) -> tuple:
        values = (getattr(self, name) for name in self._KEY_FIELDS)
        return tuple(("tensor", id(v)) if isinstance(v, torch.Tensor) else v for v in values)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


@dataclass(frozen=True, init=False, repr=False, eq=False)
class Dense(_ScaledLayerKey, Layer):
    """A fully connected layer ``R^{n} -> R^{out_dim}``.

    * ``parameterization="ntk"`` (JGH): ``W, b ~ N(0, 1)`` and
      ``z = W_std / sqrt(n) · W a + b_std · b``.
    * ``parameterization="standard"``: ``W ~ N(0, W_std²/n)``, ``b ~ N(0, b_std²)`` and
      ``z = W a + b``. The bias is always trainable, so its gradient (1) enters the NTK
      even when ``b_std = 0``.

    Kernel map: ``Σ' = W_std² Σ + b_std²`` in both; the NTK is
    ``Θ' = W_std² Θ + Σ'`` (ntk) or ``Θ' = W_std² Θ + n Σ + 1`` (standard, ``n`` the
    declared fan-in width), where ``Σ`` is the incoming covariance per feature.

    ``W_std`` and ``b_std`` may be 0-d floating tensors with ``requires_grad=True``: the
    analytic kernels are then differentiable in them (kernel learning). ``build`` uses
    their current values.

    A frozen value with fields ``features`` (the constructor's ``out_dim``; the name
    ``out_dim`` is the layer protocol's method), ``W_std``, ``b_std`` and
    ``parameterization``. Its kernel map needs the ``"dense"`` kernel layout; its output is
    Gaussian at infinite width whatever its input (``PairKernel.gaussian = True``). A tensor
    scale is a trainable parameter whose value changes, so it counts by identity in ``==``
    and ``hash`` (numbers by value).
    """

    features: int
    W_std: float | torch.Tensor
    b_std: float | torch.Tensor
    parameterization: str

    def __init__(self, out_dim: int, W_std: float = 1.0, b_std: float = 0.0,
                 parameterization: str = "ntk"):
        object.__setattr__(self, "features", check_positive_int(out_dim, "out_dim"))
        object.__setattr__(self, "W_std", check_scale(W_std, "W_std"))
        object.__setattr__(self, "b_std", check_scale(b_std, "b_std"))
        object.__setattr__(self, "parameterization", check_choice(
            parameterization, "parameterization", PARAMETERIZATIONS))

    _KEY_FIELDS = ("features", "W_std", "b_std", "parameterization")

    def out_dim(self, in_dim):
        _single_branch(in_dim)
        if isinstance(in_dim, torch.Size):
            raise ValueError(
                f"{self!r} needs flat features, but it receives images or sequences of shape "
                f"{tuple(in_dim)} (C, H, W). Put nk.Flatten() or nk.GlobalAvgPool() before it.")
        return self.features

    def required_layout(self, layout):
        return DENSE

    def kernel_layout(self, layout):
        _single_branch(layout)
        require_dense(layout, self)
        return layout

    def kernel_map(self, k: PairKernel) -> PairKernel:
        _single_branch(k)
        require_dense(k.layout, self)
        w2, b2 = self.W_std ** 2, self.b_std ** 2
        # Every operation makes a new tensor or updates one that no backward formula saved
        # (the product's own output), so gradients flow to the inputs and to tensor scales.
        cov = (k.cov * w2).add_(b2)
        var1 = cov if k.variances_are_cov else w2 * k.var1 + b2
        var2 = cov if k.variances_are_cov else w2 * k.var2 + b2
        ntk = k.ntk
        if ntk is not None:
            # Products first, then plain adds: torch.add(..., alpha=) fuses a multiply-add
            # in its vector lanes but not in its scalar tail, so an entry's last bit would
            # depend on where it sits in the tile (and tiled results on the tile shape).
            if self.parameterization == "ntk":
                ntk = cov + ntk * w2
            else:
                ntk = (k.cov * k.width).add_(ntk * w2).add_(1.0)
        # Each output feature is a zero-mean combination of the inputs, independent across
        # features, so the mean over infinitely many of them is exactly 0 for every example.
        # Given its input, each output is a Gaussian (the weights are), jointly over inputs
        # with a covariance that converges to a deterministic limit: a Gaussian process at
        # infinite width, whatever the input was.
        return k.replace(cov=cov, var1=var1, var2=var2, ntk=ntk, width=self.features,
                         mean1=0.0, mean2=0.0, gaussian=True)

    def build(self, in_dim, generator, dtype, device):
        self.out_dim(in_dim)  # rejects several branches
        return DenseModule(in_dim, self.features, _value(self.W_std), _value(self.b_std),
                           self.parameterization, generator=generator, dtype=dtype,
                           device=device)

    def __repr__(self):
        return (f"Dense({self.features}, W_std={_value(self.W_std)!r}, "
                f"b_std={_value(self.b_std)!r}, "
                f"parameterization={self.parameterization!r})")


def _single_branch(state) -> None:
    """Refuse a tuple of branch dims, layouts or states (after FanOut, before FanInSum)."""
    if is_branches(state):
        raise ValueError("Dense received several branches; combine them with FanInSum() "
                         "first.")


def _value(scale: float | torch.Tensor) -> float:
    """A scale's current value as a float (tensor scales are read, not tracked)."""
    return float(scale.detach()) if isinstance(scale, torch.Tensor) else scale


class DenseModule(torch.nn.Module):
    """Finite-width Dense layer. Attributes ``W_std``, ``b_std`` and ``parameterization`` say
    how ``weight`` and ``bias`` enter the forward map (the empirical NTK's structured path
    reads them)."""

    def __init__(self, in_features: int, out_features: int, W_std: float, b_std: float,
                 parameterization: str, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.W_std, self.b_std = float(W_std), float(b_std)
        self.parameterization = parameterization
        weight = torch.randn(out_features, in_features, generator=generator, dtype=dtype)
        bias = torch.randn(out_features, generator=generator, dtype=dtype)
        if parameterization == "standard":
            weight *= W_std / math.sqrt(in_features)
            bias *= b_std
        self.weight = torch.nn.Parameter(weight.to(device))
        self.bias = torch.nn.Parameter(bias.to(device))

    @property
    def weight_scale(self) -> float:
        """Factor multiplying ``weight @ a`` in the forward map."""
        if self.parameterization == "ntk":
            return self.W_std / math.sqrt(self.in_features)
        return 1.0

    @property
    def bias_scale(self) -> float:
        """Factor multiplying ``bias`` in the forward map."""
        return self.b_std if self.parameterization == "ntk" else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parameterization == "ntk":
            return F.linear(x, self.weight) * self.weight_scale + self.bias_scale * self.bias
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"W_std={self.W_std}, b_std={self.b_std}, "
                f"parameterization={self.parameterization!r}")
