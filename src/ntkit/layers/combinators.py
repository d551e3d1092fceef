"""Combinators (serial, branches, sums), LayerNorm, and the ``mlp`` shorthand.

Each is a frozen dataclass (equality, hashing and ``repr`` over its fields). Serial folds
its layers' answers to the evaluator's questions; Parallel, FanOut and FanInSum are
elementwise in the kernel entries and so work on every kernel-state layout; LayerNorm
normalises over features (flat inputs) or over channels, pixel by pixel (images and
sequences), so it works on every layout too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._validation import check_choice, check_nonnegative, check_positive_int
from .activations import activation_from_name
from .base import Layer, is_branches
from .dense import PARAMETERIZATIONS, Dense
from .state import (NonGaussianInputError, PairKernel, all_gaussian, is_zero_mean,
                    strongest)


@dataclass(frozen=True, repr=False)
class Serial(Layer):
    """Layers applied one after the other. ``serial(a, b)(x) = b(a(x))``."""

    layers: tuple[Layer, ...]

    def __post_init__(self):
        layers = tuple(self.layers)
        if not layers:
            raise ValueError("serial() needs at least one layer.")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise ValueError(f"serial(): argument {i} is {layer!r}, not an ntkit layer "
                                 "(use nk.Dense, nk.ReLU(), ... or nk.Elementwise(fn)).")
        object.__setattr__(self, "layers", layers)

    def out_dim(self, in_dim):
        for layer in self.layers:
            in_dim = layer.out_dim(in_dim)
        return in_dim

    def kernel_layout(self, layout):
        for layer in self.layers:
            layout = layer.kernel_layout(layout)
        return layout

    def required_layout(self, layout):
        for layer in reversed(self.layers):
            layout = layer.required_layout(layout)
        return layout

    def kernel_map(self, k):
        for i, layer in enumerate(self.layers):
            try:
                k = layer.kernel_map(k)
            except NonGaussianInputError as error:
                raise error.at(f"layer {i}") from None
        return k

    def build(self, in_dim, generator, dtype, device):
        modules = []
        for layer in self.layers:
            modules.append(layer.build(in_dim, generator, dtype, device))
            in_dim = layer.out_dim(in_dim)
        return torch.nn.Sequential(*modules)

    def __repr__(self):
        return "serial(" + ", ".join(map(repr, self.layers)) + ")"


def serial(*layers: Layer) -> Serial:
    """Compose layers left to right into one network (itself a layer)."""
    flat: list[Layer] = []
    for layer in layers:
        flat.extend(layer.layers if isinstance(layer, Serial) else (layer,))
    return Serial(flat)


@dataclass(frozen=True, repr=False)
class FanOut(Layer):
    """Copy the input into ``n`` identical branches (for residual blocks)."""

    n: int

    def __post_init__(self):
        object.__setattr__(self, "n", check_positive_int(self.n, "n"))

    def out_dim(self, in_dim):
        return (in_dim,) * self.n

    def kernel_layout(self, layout):
        return (layout,) * self.n

    def required_layout(self, layout):
        # One state feeds every branch: it must carry what the most demanding one needs.
        return strongest(layout)

    def kernel_map(self, k):
        return (k,) * self.n

    def build(self, in_dim, generator, dtype, device):
        return FanOutModule(self.n)

    def __repr__(self):
        return f"FanOut({self.n})"


@dataclass(frozen=True, repr=False)
class Parallel(Layer):
    """Apply branch ``i`` to input ``i``; independent parameters per branch."""

    branches: tuple[Layer, ...]

    def __post_init__(self):
        branches = tuple(self.branches)
        if not branches:
            raise ValueError("parallel() needs at least one branch.")
        for i, branch in enumerate(branches):
            if not isinstance(branch, Layer):
                raise ValueError(f"parallel(): branch {i} is {branch!r}, not an ntkit layer.")
        object.__setattr__(self, "branches", branches)

    def _check(self, inputs: Any) -> None:
        if not is_branches(inputs):
            raise ValueError("parallel() needs several inputs; put FanOut(n) before it.")
        if len(inputs) != len(self.branches):
            raise ValueError(f"parallel() has {len(self.branches)} branches but received "
                             f"{len(inputs)} inputs; put FanOut(n) with the same n before it.")

    def out_dim(self, in_dim):
        self._check(in_dim)
        return tuple(b.out_dim(d) for b, d in zip(self.branches, in_dim))

    def kernel_layout(self, layout):
        self._check(layout)
        return tuple(b.kernel_layout(lay) for b, lay in zip(self.branches, layout))

    def required_layout(self, layout):
        needs = layout if is_branches(layout) else (layout,) * len(self.branches)
        self._check(needs)
        return tuple(b.required_layout(n) for b, n in zip(self.branches, needs))

    def kernel_map(self, k):
        self._check(k)
        out = []
        for i, (branch, ki) in enumerate(zip(self.branches, k)):
            try:
                out.append(branch.kernel_map(ki))
            except NonGaussianInputError as error:
                raise error.at(f"branch {i}") from None
        return tuple(out)

    def build(self, in_dim, generator, dtype, device):
        self.out_dim(in_dim)
        return ParallelModule([b.build(d, generator, dtype, device)
                               for b, d in zip(self.branches, in_dim)])

    def __repr__(self):
        return "parallel(" + ", ".join(map(repr, self.branches)) + ")"


def parallel(*branches: Layer) -> Parallel:
    """Branches applied side by side, to the outputs of a ``FanOut``."""
    return Parallel(branches)


@dataclass(frozen=True, repr=False)
class FanInSum(Layer):
    """Sum the branches. Independent Gaussian branches add their kernels.

    The sum is Gaussian at infinite width iff every branch is (``PairKernel.gaussian``);
    an activation after a sum with a non-Gaussian branch (``relu(z) + z``) is refused.
    """

    def out_dim(self, in_dim):
        if not is_branches(in_dim):
            return in_dim
        if len(set(in_dim)) != 1:
            raise ValueError(f"FanInSum() needs branches of equal width; got {list(in_dim)}.")
        return in_dim[0]

    def kernel_layout(self, layout):
        if not is_branches(layout):
            return layout
        if len(set(layout)) != 1:
            raise ValueError(f"FanInSum() needs branches of the same kernel layout; got "
                             f"{list(layout)}.")
        return layout[0]

    def kernel_map(self, k):
        if isinstance(k, PairKernel):
            return k
        widths = {ki.width for ki in k}
        if len(widths) != 1:
            raise ValueError(f"FanInSum() needs branches of equal width; got {sorted(widths)}.")
        self.kernel_layout(tuple(ki.layout for ki in k))
        ntks = [ki.ntk for ki in k]
        return k[0].replace(
            cov=sum(ki.cov for ki in k), var1=sum(ki.var1 for ki in k),
            var2=sum(ki.var2 for ki in k),
            ntk=None if ntks[0] is None else sum(ntks),
            mean1=_sum_means([ki.mean1 for ki in k]), mean2=_sum_means([ki.mean2 for ki in k]),
            gaussian=all_gaussian(ki.gaussian for ki in k))

    def build(self, in_dim, generator, dtype, device):
        self.out_dim(in_dim)
        return FanInSumModule()

    def __repr__(self):
        return "FanInSum()"


def _sum_means(means: list) -> Any:
    """The per-example mean of a sum of branches: the sum of theirs; unknown if any is,
    and the exact-zero marker 0.0 if all are."""
    if any(m is None for m in means):
        return None
    total = 0.0
    for m in means:
        if not is_zero_mean(m):
            total = m if is_zero_mean(total) else total + m
    return total


@dataclass(frozen=True, repr=False)
class LayerNorm(Layer):
    """Normalise each example over its features: ``(h − mean h) / std h``.

    Images ``(N, C, H, W)`` and sequences ``(N, C, L)`` are normalised over their channels,
    pixel by pixel (neural-tangents' ``LayerNorm(axis=channel)``): the map below then holds
    for each pixel pair, with each pixel's own variance and mean.

    Kernel map. At infinite width the incoming features ``h_i(x)`` have per-example mean
    ``m(x)`` (tracked in the kernel state: 0 after Dense or an odd activation of it;
    ``E[φ(u)]``, ``u ~ N(0, Σ(x, x))``, after an activation φ of a Dense layer; the row mean
    for raw inputs), so with the uncentred covariance Σ (what the state holds)

        Σ_c(x, x') = Σ(x, x') − m(x) m(x'),
        Σ_LN(x, x') = Σ_c(x, x') / sqrt(Σ_c(x, x) Σ_c(x', x')),
        Θ_LN(x, x') = Θ(x, x') / sqrt(Σ_c(x, x) Σ_c(x', x')).

    The NTK is not centred: the gradient of the feature mean, ``(1/n) Σ_i ∂h_i``, averages
    the features' tangents, which are independent across features at infinite width, so its
    norm is O(1/sqrt(n)) and the centring's effect on the tangent kernel vanishes (likewise
    the variance's gradient). Only the normaliser changes. With a zero mean this is
    neural-tangents' map; raw inputs have a zero NTK, which stays zero. A row whose centred
    variance is zero (or below the rounding of ``Σ(x, x) − m(x)²``) maps to zero. ``eps``
    only guards the finite-width division.

    Gaussianity (``PairKernel.gaussian``) is preserved: the centring and the normaliser are
    deterministic at infinite width, so LayerNorm of a Dense output is Gaussian and may feed
    an activation, while LayerNorm of raw inputs or of an activation's output is not.

    Raises ValueError when the incoming per-example mean is unknown (a user-defined
    activation without ``mean``, or a user-defined layer that does not set the means, or an
    activation after one): put a Dense layer before LayerNorm. (An activation applied to raw
    inputs or to another activation is refused before, by the activation itself.)
    """

    eps: float = 1e-12

    def __post_init__(self):
        object.__setattr__(self, "eps", check_nonnegative(self.eps, "eps"))

    def kernel_layout(self, layout):
        _single_branch(layout)
        return layout

    def kernel_map(self, k):
        _single_branch(k)
        if k.mean1 is None or k.mean2 is None:
            raise ValueError(
                f"{self!r}: the features entering it have a per-example mean (over features) "
                "that ntkit cannot determine, and LayerNorm subtracts it, so its kernel would "
                "be a guess. This happens after a user-defined activation without a "
                "mean(var) method, or after a user-defined layer whose kernel_map does not "
                "set mean1/mean2 of the PairKernel (or an activation following it). "
                "Remedy: put a Dense layer before LayerNorm (its outputs have mean zero), "
                "or give the custom layer its means.")
        centred = k.means_are_zero
        m1, m2 = k.marginals()
        out, safe, positive, var1, var2 = _normalise(k.cov, m1, m2, k.mean1, k.mean2, centred)
        ntk = None if k.ntk is None else torch.where(positive, k.ntk / safe, 0.0)
        if k.variances_are_cov:
            var1 = var2 = out
        else:
            var1 = (var1 > 0).to(k.cov.dtype)
            var2 = (var2 > 0).to(k.cov.dtype)
        return k.replace(cov=out, var1=var1, var2=var2, ntk=ntk, mean1=0.0, mean2=0.0,
                         gaussian=k.gaussian)

    def build(self, in_dim, generator, dtype, device):
        # Images (N, C, H, W) and sequences (N, C, L) are normalised over their channels.
        return LayerNormModule(self.eps, dim=1 if isinstance(in_dim, torch.Size) else -1)

    def __repr__(self):
        return f"LayerNorm(eps={self.eps})"


def _normalise(cov, var_a, var_b, mean_a, mean_b, centred: bool):
    """LayerNorm's map of covariances ``cov`` whose entries have variances ``var_a`` (first
    input) and ``var_b`` (second) and means ``mean_a``/``mean_b`` (broadcastable):
    ``(out, safe, positive, centred var_a, centred var_b)``, where ``out = cov_c / safe`` on
    the ``positive`` entries (both centred variances positive) and 0 elsewhere."""
    positive = None
    if centred:
        var1, var2 = var_a, var_b
    else:
        # Centre: the subtraction uses the same operands for an entry with x = x' (cov =
        # var1 = var2 and mean1 = mean2), so it stays exactly the row variance there.
        cov = cov - mean_a * mean_b
        var1 = var_a - mean_a * mean_a
        var2 = var_b - mean_b * mean_b
        # A centred variance below the rounding of var − mean² is indistinguishable from
        # zero: such a row is constant over its features, and maps to zero.
        tol = 16 * torch.finfo(cov.dtype).eps
        pos1 = var1 > tol * var_a
        pos2 = var2 > tol * var_b
        positive = pos1 & pos2
        var1 = torch.where(pos1, var1, 0.0)
        var2 = torch.where(pos2, var2, 0.0)
    norm = torch.sqrt(var1 * var2)
    if positive is None:
        positive = norm > 0
    # Divide rather than multiply by 1/norm: sqrt(v·v) == v in IEEE arithmetic, so an
    # entry with cov = var1 = var2 (an example with itself) becomes exactly 1, as its
    # unit variance says; v·(1/v) may be 1 - ulp, which a following arccos (ReLU
    # family) turns into a ~1e-8 error and finite differences into noise. The inner
    # `where` keeps the gradient finite at zero-variance rows.
    safe = torch.where(positive, norm, torch.ones_like(norm))
    return torch.where(positive, cov / safe, 0.0), safe, positive, var1, var2


def _single_branch(state: Any) -> None:
    if is_branches(state):
        raise ValueError("LayerNorm() received several branches; use FanInSum() first.")


class FanOutModule(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return (x,) * self.n


class ParallelModule(torch.nn.ModuleList):
    def forward(self, xs):
        return tuple(m(x) for m, x in zip(self, xs))


class FanInSumModule(torch.nn.Module):
    def forward(self, xs):
        if isinstance(xs, torch.Tensor):
            return xs
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return total


class LayerNormModule(torch.nn.Module):
    """Normalise each example over axis ``dim`` (features: -1; channels of images: 1)."""

    def __init__(self, eps: float, dim: int = -1):
        super().__init__()
        self.eps, self.dim = eps, dim

    def forward(self, x):
        centred = x - x.mean(dim=self.dim, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(dim=self.dim, keepdim=True) + self.eps)


def mlp(depth: int, width: int, activation: Any = "relu", W_std: float = 1.0,
        b_std: float = 0.1, out_dim: int = 1, parameterization: str = "ntk") -> Serial:
    """A fully connected network with ``depth`` Dense layers (``depth − 1`` hidden layers).

    ``nk.mlp(4, 512)`` is JGH's network: Dense → ReLU, three times, then Dense(1); every
    Dense has ``W_std`` and ``b_std``. ``activation`` is a name ("relu", "erf", "tanh", ...),
    an ntkit activation, or a torch function (dual by quadrature).
    """
    depth = check_positive_int(depth, "depth")
    width = check_positive_int(width, "width")
    out_dim = check_positive_int(out_dim, "out_dim")
    check_choice(parameterization, "parameterization", PARAMETERIZATIONS)
    act = activation_from_name(activation)
    layers: list[Layer] = []
    for _ in range(depth - 1):
        layers += [Dense(width, W_std, b_std, parameterization), act]
    layers.append(Dense(out_dim, W_std, b_std, parameterization))
    return Serial(layers)
