"""The activation protocol: an elementwise map φ, its derivative and its Gaussian dual.

For a pair of centred Gaussians ``(u, v)`` with covariance ``[[var1, cov], [cov, var2]]``
an activation φ provides its *dual*

    nngp = E[φ(u) φ(v)]        dot = E[φ'(u) φ'(v)]

which is all the kernel map of an elementwise layer needs (``ntk ← ntk · dot``). The scale
``W_std**2`` and bias ``b_std**2`` belong to the Dense layer that follows, not here.

Every activation is a frozen dataclass: its fields are its parameters, so equality, hashing
and ``repr`` cover exactly what determines its numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..base import Layer
from ..state import NonGaussianInputError, PairKernel


def tracking(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on any of ``tensors`` (then no in-place ops)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def correlation(cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rho, norm)``: ``norm = sqrt(var1 var2)`` and ``rho = cov / norm`` in [-1, 1].

    ``var1``/``var2`` broadcast against ``cov`` (a column and a row of a tile, or diagonals).
    Forming the product before the square root keeps ``norm`` exactly symmetric and makes
    ``rho`` exactly 1 for x = x' (``sqrt(v·v) == v`` in IEEE arithmetic), where arccos is
    most sensitive. Rows with zero variance (a zero input without bias) have ``cov = 0`` and
    get ``rho = 0``: any value works for the NNGP there and 0 is neural-tangents' convention
    for the derivative term. Differentiable when the inputs require grad (out-of-place ops
    then).
    """
    tiny = torch.finfo(cov.dtype).tiny
    if tracking(cov, var1, var2):
        norm = torch.sqrt(var1 * var2).clamp(min=tiny)
        return (cov / norm).clamp(-1.0, 1.0), norm
    # Clamping the zero norms to `tiny` leaves every use of `norm` exact to ~1e-308.
    norm = (var1 * var2).sqrt_().clamp_(min=tiny)
    rho = cov / norm
    return rho.clamp_(-1.0, 1.0), norm


def check_finite_number(owner: str, label: str, value: object) -> float:
    """``float(value)``, or a ValueError naming ``owner``'s parameter ``label``."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not abs(value) < float("inf")):
        raise ValueError(f"{owner} parameter {label} must be a finite number; got {value!r}.")
    return float(value)


@dataclass(frozen=True, repr=False)
class Activation(Layer):
    """An elementwise nonlinearity. Subclasses implement ``fn`` and ``dual``.

    Subclasses are frozen dataclasses whose fields are their parameters. ``repr`` lists the
    fields that differ from their defaults (``Tanh()``, ``LeakyReLU(alpha=0.2)``).

    The dual assumes centred Gaussian pre-activations, true at infinite width after a Dense
    layer. ``kernel_map`` raises :class:`~ntkit.layers.state.NonGaussianInputError` (a
    ValueError) for a state known not to be Gaussian (``PairKernel.gaussian is False``: raw
    inputs, another activation's output) unless the activation is affine (``affine``),
    whose dual holds for any distribution; an unknown state (``None``) is not checked. The
    output is Gaussian only for an affine activation of a Gaussian.
    """

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
        """``(E[φ(u)φ(v)], E[φ'(u)φ'(v)])`` (the second ``None`` unless ``need_dot``).

        ``cov`` has any shape; ``var1``/``var2`` broadcast against it. The results have the
        broadcast shape. Elementwise in every entry, so any kernel layout works.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def kernel_map(self, k: PairKernel) -> PairKernel:
        if not isinstance(k, PairKernel):
            raise ValueError(f"{self!r} received {len(k)} branches; combine them with "
                             "FanInSum() before an activation.")
        affine = self.affine
        if k.gaussian is False and not affine:
            raise NonGaussianInputError(self)
        # phi(u) for a non-affine phi is not Gaussian; a·u + c is whenever u is.
        gaussian = k.gaussian if affine else False
        m1, m2 = k.marginals()
        nngp, ntk = self.dual_ntk(k.cov, m1, m2, k.ntk)
        # The feature means E[φ(u)] follow from the duals' own assumption, centred Gaussian
        # pre-activations; a nonzero or unknown incoming mean (raw inputs, another
        # activation) breaks it, and then the outgoing mean is unknown as well. O(N) work.
        centred = k.means_are_zero
        mean1 = self.mean(m1) if centred else None
        mean2 = self.mean(m2) if centred else None
        if k.variances_are_cov:
            return k.replace(cov=nngp, var1=nngp, var2=nngp, ntk=ntk, mean1=mean1,
                             mean2=mean2, gaussian=gaussian)
        var1 = self.variance(k.var1)
        var2 = self.variance(k.var2)
        if self.uses_quadrature:
            # Entries with x = x' (cov = var1 = var2 exactly) must carry exactly the row
            # variance into the next layer (its correlation must be exactly 1 there). A
            # numerical rule evaluates the tile and the variance vector with different
            # vector widths and buckets, which may differ in the last bit, so copy the
            # variance rather than rely on it. Closed forms guarantee it by construction
            # (see ``variance``) and skip these passes over the tile.
            same = (k.cov == k.var1) & (k.var1 == k.var2)
            if bool(same.any()):
                nngp = torch.where(same, var1.expand_as(nngp), nngp)
        return k.replace(cov=nngp, var1=var1, var2=var2, ntk=ntk, mean1=mean1, mean2=mean2,
                         gaussian=gaussian)

    def dual_ntk(self, cov: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor,
                 ntk: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(E[φ(u)φ(v)], ntk · E[φ'(u)φ'(v)])`` (the second ``None`` without ``ntk``): the
        kernel map of a tile. From :meth:`dual` unless a subclass fuses the two (the ReLU
        family does for big tiles, see ``fused.py``)."""
        nngp, dot = self.dual(cov, var1, var2, need_dot=ntk is not None)
        return nngp, (None if ntk is None else ntk * dot)

    @property
    def affine(self) -> bool:
        """Whether φ is affine (``a·x``): then its dual ``E[φ(u)φ(v)] = a²·E[uv]`` holds for
        any input distribution, so the kernel map needs no Gaussian input and keeps a
        Gaussian one Gaussian. False unless a subclass knows better (Identity; ABReLU with
        ``a == b``); a user-defined activation that is affine may override it."""
        return False

    @property
    def uses_quadrature(self) -> bool:
        """Whether ``dual`` is a numerical rule (smaller tiles; exact x = x' entries are
        then copied from ``variance``). Closed forms: False; quadrature activations,
        including user-defined ones, override it to return True."""
        return False

    def variance(self, var: torch.Tensor) -> torch.Tensor:
        """``E[φ(u)²]`` for ``u ~ N(0, var)``: the NNGP dual at ``cov = var1 = var2``.

        An override must equal ``dual(var, var, var)[0]`` bit for bit: the diagonal of a
        symmetric tile goes through ``dual`` and the row variances through this, and the
        next layer's correlation must come out exactly 1 there.
        """
        return self.dual(var, var, var, need_dot=False)[0]

    def mean(self, var: torch.Tensor) -> torch.Tensor | float | None:
        """``E[φ(u)]`` for ``u ~ N(0, var)``, elementwise in ``var`` (any shape).

        LayerNorm needs it to centre the features this activation produces. Returns a
        tensor of ``var``'s shape, the float ``0.0`` when φ is odd (the mean is exactly 0),
        or ``None`` when unknown: the default, so that a user-defined activation without it
        makes a following LayerNorm refuse instead of assuming a zero mean.
        """
        return None

    def build(self, in_dim, generator, dtype, device):
        return ActivationModule(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def __repr__(self) -> str:
        args = []
        for f in dataclasses.fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and _same(value, f.default):
                continue
            args.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(args)})"


def _same(value: object, default: object) -> bool:
    """``value == default`` for the plain defaults of activation fields (numbers, None)."""
    if value is None or default is None:
        return value is default
    return type(value) is type(default) and value == default


class ActivationModule(torch.nn.Module):
    """The finite-width forward map of an :class:`Activation` (no parameters)."""

    def __init__(self, activation: Activation):
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation.fn(x)

    def extra_repr(self) -> str:
        return repr(self.activation)
