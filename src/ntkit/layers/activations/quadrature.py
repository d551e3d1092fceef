"""The quadrature engine for Gaussian duals without a closed form.

The smooth activations without a closed-form dual (Tanh, Sigmoid, Softplus, SiLU, any
``Elementwise(fn)``) integrate

    E[g(u) g(v)],  u = s1 z1,  v = s2 (rho z1 + r z2) = m + sigma z2,  z1, z2 ~ N(0, 1),

as a nested pair of one-dimensional rules (outer over z1, inner over z2 given z1). A fixed
Gauss–Hermite rule fails as soon as s is not small: tanh(s z) has poles at z = ±iπ/(2s), and
Hermite rules converge slowly for functions analytic only in a strip (48 nodes are 1e-7 off
at s = 1 and useless at s = 30). Each 1-D rule here is chosen per entry from the distance
``delta`` (in units of z) between the real axis and the integrand's nearest singularity:

* delta >= ~0.5: the trapezoid rule on a uniform grid, whose error for an integrand
  analytic in the strip |Im z| < delta decays like exp(-2π delta / step) (times the
  Gaussian's growth e^{delta²/2} off the axis); one node set serves the bucket;
* smaller delta (a saturated tanh: a feature of width 1/s in a Gaussian of width 1):
  composite Gauss–Legendre panels, graded geometrically towards the feature at z0 (ratio
  2 from delta/2 up to 1) and of width <= 1 elsewhere, so every panel is at least its own
  width away from the singularity; cost grows like log(1/delta), not 1/delta.

Entries are bucketed by (outer rule, inner rule) so a single huge row does not make its
whole tile pay for the fine rule.

Public entry points: :func:`quadrature_dual` (the adaptive rule), :func:`hermite_dual`
(the fixed ``degree x degree`` Gauss–Hermite rule), :func:`estimate_error` (the same
entries with every step halved) and :func:`quadrature_mean` (the 1-D mean ``E[φ(u)]``). Each takes ``values(x, need_dot) -> (φ(x), φ'(x) | None)``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from .protocol import correlation

#: ``values(x, need_dot)``: φ(x) and, if ``need_dot``, φ'(x) (else None), elementwise.
Values = Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]

_Z = 7.5                     # integrate |z| <= 7.5: the Gaussian mass outside is 6e-14
_T_STEP_MAX = 0.45           # the trapezoid resolves the Gaussian itself to ~1e-30 here
_T_STEP_PER_DELTA = 0.15     # measured: sech⁴(s z) is 1e-12 off at this step, 2e-10 at 0.19
_T_LEVELS = 5                # steps 0.45·2^(-l/2), l = 0..4 (down to 0.11); then panels,
                             # which need fewer nodes from there on
_LEGENDRE = 8                # Gauss–Legendre nodes per panel
_P_BASE = np.concatenate([[-_Z], np.arange(-6.0, 6.5, 1.0), [_Z]])
_MAX_GRADED = 64             # graded levels: features down to 2^-64 of the Gaussian's width
_CHUNK_NODES = 1 << 21       # entries x outer x inner nodes per chunk (16 MiB in float64)


# numpy's Golub-Welsch weights underflow to NaN from degree 380 on (checked with numpy 2.4).
MAX_HERMITE_DEGREE = 360


@lru_cache(maxsize=32)
def _gauss_hermite(degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for E[g(z)], z ~ N(0, 1): probabilists' Hermite, weights sum to 1."""
    with np.errstate(all="ignore"):
        nodes, weights = np.polynomial.hermite_e.hermegauss(degree)
        weights = weights / weights.sum()
    if not (np.isfinite(nodes).all() and np.isfinite(weights).all()):
        raise ValueError(f"degree={degree}: the Gauss-Hermite weights are not representable in "
                         "float64 at this degree; use degree=None (the default adaptive rule, "
                         "accurate at every variance) or a degree of at most "
                         f"{MAX_HERMITE_DEGREE}.")
    return nodes, weights


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


def quadrature_dual(values: Values, feature: float, cov: torch.Tensor, var1: torch.Tensor,
                    var2: torch.Tensor, need_dot: bool, refine: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``E[φ(u)φ(v)]`` and ``E[φ'(u)φ'(v)]`` by the variance-aware nested rule (module
    docstring).

    ``values(x, need_dot)`` returns φ(x) and φ'(x); ``feature`` is the distance of φ's
    nearest complex singularity from the real axis (π/2 for tanh). ``refine`` halves every
    rule's step (for error estimates). Shapes broadcast like ``cov``; the result has
    ``cov``'s shape. Differentiable in its tensor arguments (no in-place ops on them).
    """
    shape = torch.broadcast_shapes(cov.shape, var1.shape, var2.shape)
    c = cov.expand(shape).reshape(-1)
    v1 = var1.expand(shape).reshape(-1)
    v2 = var2.expand(shape).reshape(-1)
    rho, _ = correlation(c, v1, v2)
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



def quadrature_mean(values: Values, feature: float, var: torch.Tensor,
                    degree: int | None = None, finer: int = 1) -> torch.Tensor:
    """``E[φ(u)]`` for ``u ~ N(0, var)``, elementwise in ``var`` (any shape).

    The one-dimensional version of :func:`quadrature_dual`'s outer rule: per entry, the
    trapezoid or graded Gauss–Legendre panels chosen from ``feature / sqrt(var)`` (the
    singularity's distance in units of z), ``finer`` levels finer than the dual uses (one
    by default: this costs O(N) per tile, not O(N²); one more halves every step again, for
    an error estimate). ``degree`` selects the fixed Gauss–Hermite rule instead
    (as ``Elementwise(degree=...)`` does for its dual). Non-finite variances, and scales
    beyond the graded rule's reach, give NaN. Differentiable in ``var``.
    """
    shape = var.shape
    flat = var.reshape(-1)
    s = torch.sqrt(flat)
    if degree is not None:
        nodes_np, weights_np = _gauss_hermite(degree)
        f, _ = values(s.unsqueeze(-1) * _tensor(nodes_np, flat), False)
        return (f @ _tensor(weights_np, flat)).reshape(shape)
    with torch.no_grad():
        delta = 0.5 ** finer * feature / s
        code = _rule_code(delta) + finer
        ok = torch.isfinite(flat) & (code < _T_LEVELS + _MAX_GRADED)
        key = torch.where(ok, code, torch.full_like(code, -1))
        keys = torch.unique(key).tolist()
    out = torch.full_like(flat, math.nan)
    parts, where = [], []
    for k in keys:
        if k < 0:
            continue
        idx = (key == k).nonzero().squeeze(-1)
        if k < _T_LEVELS:
            z, w = _trapezoid(k, flat)
            f, _ = values(s[idx].unsqueeze(-1) * z, False)
            parts.append(f @ w)
        else:
            z, w = _panels(torch.zeros_like(s[idx]).detach(), delta[idx], k - _T_LEVELS)
            f, _ = values(s[idx].unsqueeze(-1) * z, False)
            parts.append((f * w).sum(-1))
        where.append(idx)
    if parts:
        out = out.index_put((torch.cat(where),), torch.cat(parts))
    return out.reshape(shape)


def hermite_dual(values: Values, degree: int, cov: torch.Tensor, var1: torch.Tensor,
                 var2: torch.Tensor, need_dot: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed ``degree x degree`` Gauss–Hermite rule for the dual (``cov``'s shape).

    Exact for polynomials of degree < 2·degree; inaccurate for saturating functions at
    large variance (kept for ``Elementwise(..., degree=n)``).
    """
    nodes_np, weights_np = _gauss_hermite(degree)
    nodes = _tensor(nodes_np, cov)
    weights = _tensor(weights_np, cov)
    rho, _ = correlation(cov, var1, var2)
    s1 = torch.sqrt(var1).expand_as(cov)
    s2 = torch.sqrt(var2).expand_as(cov)
    # As in quadrature_dual: r = 0 exactly at ρ = ±1 with a zero (not NaN) gradient there.
    gap = 1 - rho * rho
    r = torch.sqrt(gap.clamp(min=torch.finfo(gap.dtype).tiny)) * (gap > 0)
    nngp = torch.zeros_like(cov)
    dot = torch.zeros_like(cov) if need_dot else None
    inner_scale = (s2 * r).unsqueeze(-1) * nodes  # (..., q)
    for i in range(degree):
        z = float(nodes_np[i])
        f_u, df_u = values(s1 * z, need_dot)
        v = (s2 * rho * z).unsqueeze(-1) + inner_scale
        f_v, df_v = values(v, need_dot)
        nngp = nngp + weights[i] * f_u * (f_v @ weights)
        if need_dot:
            dot = dot + weights[i] * df_u * (df_v @ weights)
    return nngp, dot


def estimate_error(values: Values, feature: float, cov: torch.Tensor, var1: torch.Tensor,
                   var2: torch.Tensor, nngp: torch.Tensor, dot: torch.Tensor | None,
                   sample: int = 8) -> tuple[float, float]:
    """The relative error of ``(nngp, dot) = quadrature_dual(...)``, estimated on a sample.

    Repeats ``sample`` evenly spaced entries plus the one with the largest variance with
    every step halved; the difference is scaled by ``sqrt(|k(x,x) k(x',x')|)`` of the same
    rule (a correlation-sized error). Returns ``(error, largest variance sampled)``;
    ``(0.0, 0.0)`` when no entry is finite. NaN errors are returned as NaN.
    """
    with torch.no_grad():
        shape = nngp.shape
        flat = [t.detach().expand(shape).reshape(-1) for t in (cov, var1, var2)]
        big = torch.maximum(flat[1], flat[2])
        ok = torch.isfinite(big) & torch.isfinite(nngp.reshape(-1))
        if not bool(ok.any()):
            return 0.0, 0.0
        big = torch.where(ok, big, torch.full_like(big, -1.0))
        pick = torch.unique(torch.cat([big.argmax().reshape(1),
                                       torch.linspace(0, big.numel() - 1, sample,
                                                      device=big.device).long()]))
        pick = pick[ok[pick]]
        c, a, b = (t[pick] for t in flat)
        n2, d2 = quadrature_dual(values, feature, c, a, b, dot is not None, refine=True)
        na, _ = quadrature_dual(values, feature, a, a, a, False)
        nb, _ = quadrature_dual(values, feature, b, b, b, False)
        scale = torch.sqrt((na * nb).abs()).clamp(min=torch.finfo(c.dtype).tiny)
        err = ((nngp.reshape(-1)[pick] - n2).abs() / scale).max()
        if dot is not None:
            da = quadrature_dual(values, feature, a, a, a, True)[1]
            db = quadrature_dual(values, feature, b, b, b, True)[1]
            dscale = torch.sqrt((da * db).abs()).clamp(min=torch.finfo(c.dtype).tiny)
            err = torch.maximum(err, ((dot.reshape(-1)[pick] - d2).abs() / dscale).max())
        return float(err), float(torch.max(a.max(), b.max()))
